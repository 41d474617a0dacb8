"""Logging in to the real hub (shipped config, real proxy) against the test slapd.

Every login goes through the login form, as a browser's would: GET /hub/login
for the XSRF token, then POST the form; redirects are not followed, so no
server is ever spawned here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import secrets
import sqlite3
import ssl
from pathlib import Path

import ldap3
import pytest

from traitlets.config import PyFileConfigLoader

from hub_config.authenticator import LXCGPUAuthenticator
from hub_config.culler import LXCGPUCuller

pytestmark = pytest.mark.ldap

REPO = Path(__file__).resolve().parents[2]

LOGIN_COOKIE = "jupyterhub-hub-login"
XSRF_INPUT = re.compile(r'name="_xsrf"\s+value="([^"]+)"')


def login(hub, username: str, password: str):
    """POST the login form in a fresh session; returns (session, response)."""
    s = hub.session()
    page = s.get(hub.url + "/hub/login", timeout=30)
    assert page.status_code == 200, page.text[:500]
    xsrf = XSRF_INPUT.search(page.text)
    assert xsrf, "no _xsrf field in the login form"
    r = s.post(
        hub.url + "/hub/login",
        data={"username": username, "password": password, "_xsrf": xsrf.group(1)},
        allow_redirects=False,
        timeout=60,
    )
    return s, r


def assert_logged_in(hub, s, r):
    assert r.status_code == 302, f"{r.status_code}: {r.text[:300]}\n{hub.log_tail(2000)}"
    assert r.headers["Location"].startswith(("/hub/", "/user/")), r.headers["Location"]
    assert s.cookies.get(LOGIN_COOKIE)
    # The cookie is a working session: the home page answers without a login.
    home = s.get(hub.url + "/hub/home", allow_redirects=False, timeout=30)
    assert home.status_code == 200, home.status_code


def assert_refused(hub, s, r):
    assert r.status_code == 403, f"{r.status_code}: {r.text[:300]}\n{hub.log_tail(2000)}"
    assert "Invalid username or password" in r.text
    assert not s.cookies.get(LOGIN_COOKIE)
    home = s.get(hub.url + "/hub/home", allow_redirects=False, timeout=30)
    assert home.status_code == 302 and "/hub/login" in home.headers["Location"]


def hub_user(hub, name: str) -> dict:
    r = hub.api("GET", f"/users/{name}")
    assert r.status_code == 200, r.text
    return r.json()


def set_membership(directory, user: str, group: str, member: bool) -> None:
    """Add ``user`` to or remove them from a group, as the directory's manager."""
    tls = ldap3.Tls(ca_certs_file=str(directory.ca_file), validate=ssl.CERT_REQUIRED)
    server = ldap3.Server("localhost", port=directory.port, tls=tls, mode=ldap3.IP_V4_ONLY,
                          connect_timeout=5, get_info=ldap3.NONE)
    with ldap3.Connection(server, directory.admin_dn, directory.admin_password,
                          auto_bind=ldap3.AUTO_BIND_TLS_BEFORE_BIND) as conn:
        op = ldap3.MODIFY_ADD if member else ldap3.MODIFY_DELETE
        assert conn.modify(directory.group_dn(group),
                           {"member": [(op, [directory.user_dn(user)])]}), conn.result


# -- who gets in --

def test_member_of_allowed_group_logs_in(hub, ldap_directory):
    s, r = login(hub, "alice", ldap_directory.passwords["alice"])
    assert_logged_in(hub, s, r)
    assert hub_user(hub, "alice")["admin"] is False


@pytest.mark.parametrize("username, password", [
    ("alice", "not-the-password"),
    ("alice", ""),
    ("alice", "   "),
    ("nobody", "whatever-password"),
])
def test_bad_credentials_are_refused(hub, ldap_directory, username, password):
    s, r = login(hub, username, password)
    assert_refused(hub, s, r)


def test_user_outside_allowed_groups_is_refused(hub, ldap_directory, run_tag):
    name = f"{run_tag}out"
    password = secrets.token_urlsafe(12)
    ldap_directory.add_user(name, password, groups=[])
    s, r = login(hub, name, password)
    assert_refused(hub, s, r)
    assert hub.api("GET", f"/users/{name}").status_code == 404


@pytest.mark.parametrize("username", [
    "alice)(uid=*", "*", "alice,ou=people", "alice\\2a", "x" * 300,
])
def test_hostile_user_names_are_refused_without_error(hub, ldap_directory, username):
    before = len(hub.log_text())
    s, r = login(hub, username, ldap_directory.passwords["alice"])
    assert_refused(hub, s, r)
    new_log = hub.log_text()[before:]
    assert "Traceback" not in new_log and "[E " not in new_log, new_log


# -- admins --

def test_admin_group_member_is_hub_admin(hub, ldap_directory):
    s, r = login(hub, "carol", ldap_directory.passwords["carol"])
    assert_logged_in(hub, s, r)
    assert hub_user(hub, "carol")["admin"] is True
    assert s.get(hub.url + "/hub/admin", timeout=30).status_code == 200


def test_non_admin_gets_403_at_admin_page(hub, ldap_directory):
    s, r = login(hub, "bob", ldap_directory.passwords["bob"])
    assert_logged_in(hub, s, r)
    assert s.get(hub.url + "/hub/admin", allow_redirects=False, timeout=30).status_code == 403
    assert hub_user(hub, "bob")["admin"] is False


def test_admin_follows_group_membership_at_each_login(hub, ldap_directory, run_tag):
    name = f"{run_tag}adm"
    password = secrets.token_urlsafe(12)
    ldap_directory.add_user(name, password, groups=["gpu-users", "gpu-admins"])
    assert_logged_in(hub, *login(hub, name, password))
    assert hub_user(hub, name)["admin"] is True

    set_membership(ldap_directory, name, "gpu-admins", member=False)
    s, r = login(hub, name, password)
    assert_logged_in(hub, s, r)
    assert hub_user(hub, name)["admin"] is False
    assert s.get(hub.url + "/hub/admin", allow_redirects=False, timeout=30).status_code == 403

    # Only in the admin group: still let in (admin groups are allowed groups).
    set_membership(ldap_directory, name, "gpu-users", member=False)
    set_membership(ldap_directory, name, "gpu-admins", member=True)
    assert_logged_in(hub, *login(hub, name, password))
    assert hub_user(hub, name)["admin"] is True

    # In no group any more: refused, although the hub knows the user.
    set_membership(ldap_directory, name, "gpu-admins", member=False)
    assert_refused(hub, *login(hub, name, password))


# -- the authenticator's defaults, without the hub --

def test_certificate_is_checked_by_default(ldap_directory):
    """With no tls_kwargs at all the demo's private CA is not trusted, so the
    login is refused: ldap3 alone would accept any certificate."""
    settings = ldap_directory.ldap_authenticator_config()
    del settings["tls_kwargs"]
    auth = LXCGPUAuthenticator(**settings)
    assert auth.tls_kwargs == {"validate": ssl.CERT_REQUIRED}
    data = {"username": "alice", "password": ldap_directory.passwords["alice"]}
    with pytest.raises(ldap3.core.exceptions.LDAPException, match="CERTIFICATE_VERIFY_FAILED"):
        asyncio.run(auth.get_authenticated_user(None, data))

    good = LXCGPUAuthenticator(**ldap_directory.ldap_authenticator_config())
    assert asyncio.run(good.get_authenticated_user(None, data))["name"] == "alice"


def test_admin_groups_are_allowed_groups(ldap_directory):
    users = ldap_directory.users_group_dn
    admins = ldap_directory.admins_group_dn
    auth = LXCGPUAuthenticator(bind_dn_template=ldap_directory.bind_dn_template,
                               allowed_groups=[users], admin_groups=[admins])
    assert auth.allowed_groups == [users, admins]
    auth.allowed_groups = [users]  # a later change keeps the admin group in
    assert auth.allowed_groups == [users, admins]


@pytest.mark.parametrize("username", ["alice)(uid=*", "*", "alice,ou=people", "alice\\"])
def test_escaping_holds_with_a_permissive_name_rule(ldap_directory, username):
    """A site may loosen valid_username_regex (as for AD); names are still
    escaped into the DN, so no special character widens a login."""
    auth = LXCGPUAuthenticator(**ldap_directory.ldap_authenticator_config(),
                               valid_username_regex=r"^.+$")
    data = {"username": username, "password": ldap_directory.passwords["alice"]}
    assert asyncio.run(auth.get_authenticated_user(None, data)) is None


def test_example_site_file_loads():
    config = PyFileConfigLoader("jupyterhub_site.example.py",
                                path=str(REPO / "hub_config")).load_config()
    auth = LXCGPUAuthenticator(config=config)
    assert auth.server_address == "ldap.example.org"
    assert auth.tls_kwargs["validate"] == ssl.CERT_REQUIRED
    assert auth.allowed_groups == ["cn=gpu-users,ou=groups,dc=example,dc=org",
                                   "cn=gpu-admins,ou=groups,dc=example,dc=org"]
    assert LXCGPUCuller(config=config).timeout == 3600


# -- how the shipped config wired the hub --

def test_idle_culler_runs_with_its_own_scopes(hub):
    r = hub.api("GET", "/services/idle-culler")
    assert r.status_code == 200, r.text
    service = r.json()
    assert service["roles"] == ["idle-culler"] and not service["admin"]
    assert "--timeout=3600" in service["command"]
    assert service["pid"] and Path(f"/proc/{service['pid']}").exists()
    # JupyterHub 6 has no roles API: read what the hub stored.
    with contextlib.closing(sqlite3.connect(hub.state_dir / "jupyterhub.sqlite")) as db:
        (scopes,) = db.execute("SELECT scopes FROM roles WHERE name = 'idle-culler'").fetchone()
    assert sorted(json.loads(scopes)) == sorted(
        ["list:users", "read:users:activity", "read:servers", "delete:servers"])


def test_hub_api_is_on_the_bridge_and_secrets_stay_out_of_the_log(hub):
    log = hub.log_text()
    port = hub.env["LXCGPU_HUB_API_PORT"]
    assert re.search(rf"Hub API listening on http://\d+\.\d+\.\d+\.\d+:{port}/hub/", log), log
    assert "127.0.0.1:" + port not in log
    proxy_token = (hub.state_dir / "proxy_token").read_text().strip()
    assert hub.token not in log and proxy_token not in log
    for name in ("proxy_token", "jupyterhub_cookie_secret"):
        assert (hub.state_dir / name).stat().st_mode & 0o077 == 0, name


def test_restart_keeps_sessions_and_users(hub, ldap_directory):
    s, r = login(hub, "carol", ldap_directory.passwords["carol"])
    assert_logged_in(hub, s, r)
    hub.restart()
    home = s.get(hub.url + "/hub/home", allow_redirects=False, timeout=30)
    assert home.status_code == 200, home.status_code
    assert hub_user(hub, "carol")["admin"] is True
