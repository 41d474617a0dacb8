"""Logging in to the real hub (shipped config, real proxy) against the test slapd.

Every login goes through the login form, as a browser's would: GET /hub/login
for the XSRF token, then POST the form; redirects are not followed, so no
server is ever spawned here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import pwd
import re
import secrets
import socket
import sqlite3
import ssl
import stat
import time
from pathlib import Path
from urllib.parse import urlparse

import ldap3
import pytest
import requests

from tornado import web
from traitlets.config import PyFileConfigLoader

from hub_config.authenticator import DIRECTORY_DOWN, LXCGPUAuthenticator
from hub_config.culler import LXCGPUCuller
from tests.fixtures.ldap import free_loopback_port

pytestmark = pytest.mark.ldap

REPO = Path(__file__).resolve().parents[2]

# Host-only, Secure, path /: the user origins under the hub's host can
# neither read nor shadow it.
LOGIN_COOKIE = "__Host-jupyterhub-hub-login"
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
    with caplog_at_error() as records, pytest.raises(web.HTTPError) as err:
        asyncio.run(auth.get_authenticated_user(None, data))
    assert err.value.status_code == 503 and err.value.log_message == DIRECTORY_DOWN
    assert "CERTIFICATE_VERIFY_FAILED" in records.text

    good = LXCGPUAuthenticator(**ldap_directory.ldap_authenticator_config())
    assert asyncio.run(good.get_authenticated_user(None, data))["name"] == "alice"


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


@contextlib.contextmanager
def caplog_at_error():
    """The errors the authenticator logs (traitlets' logger), as text."""
    handler = _Records()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)


def test_unreachable_directory_is_a_clear_503_not_a_wrong_password(ldap_directory):
    settings = ldap_directory.ldap_authenticator_config()
    settings["server_port"] = free_loopback_port()      # nothing listens there
    auth = LXCGPUAuthenticator(**settings)
    data = {"username": "alice", "password": ldap_directory.passwords["alice"]}
    with caplog_at_error() as records, pytest.raises(web.HTTPError) as err:
        asyncio.run(auth.get_authenticated_user(None, data))
    assert err.value.status_code == 503 and err.value.log_message == DIRECTORY_DOWN
    assert "cannot be reached" in records.text and str(settings["server_port"]) in records.text \
        or "LDAPSocketOpenError" in records.text


def test_a_directory_that_never_answers_gets_the_same_sentence(ldap_directory):
    silent = socket.create_server(("127.0.0.1", 0))     # accepts, never answers
    try:
        settings = ldap_directory.ldap_authenticator_config()
        settings["server_port"] = silent.getsockname()[1]
        auth = LXCGPUAuthenticator(ldap_timeout=1.5, **settings)
        data = {"username": "alice", "password": ldap_directory.passwords["alice"]}
        t0 = time.monotonic()
        with pytest.raises(web.HTTPError) as err:
            asyncio.run(auth.get_authenticated_user(None, data))
        assert err.value.status_code == 503 and err.value.log_message == DIRECTORY_DOWN
        assert time.monotonic() - t0 < 10
    finally:
        silent.close()


def test_login_page_says_when_the_directory_is_down(hub, ldap_directory):
    """slapd stopped: the login page says so (503, not 500 nor "invalid
    password"); a user already logged in keeps their session."""
    s, r = login(hub, "bob", ldap_directory.passwords["bob"])
    assert_logged_in(hub, s, r)
    ldap_directory.stop()
    try:
        s2, r = login(hub, "alice", ldap_directory.passwords["alice"])
        assert r.status_code == 503, f"{r.status_code}: {r.text[:300]}"
        assert "cannot be reached right now, so logins are not possible" in r.text
        assert "Internal Server Error" not in r.text
        assert s.get(hub.url + "/hub/home", allow_redirects=False, timeout=30).status_code == 200
    finally:
        ldap_directory.start(owned=True)
    s3, r = login(hub, "alice", ldap_directory.passwords["alice"])
    assert_logged_in(hub, s3, r)


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


# -- HTTPS, cookies, the proxy's user --

def test_hub_speaks_https_trusted_through_its_generated_ca(hub):
    """The hub's certificate is checked against the generated CA only (as a
    browser that trusts it would), for the hub's origin and a user's."""
    assert hub.url.startswith("https://lxcgpu.localhost:")
    for url in (hub.api_url + "/", hub.user_url("alice") + "api/status"):
        with hub.session() as s:
            r = s.get(url, allow_redirects=False, timeout=30)
        assert r.status_code < 500, (url, r.status_code)
    # Not trusted without that CA: nothing else vouches for it.
    with requests.Session() as s, pytest.raises(requests.exceptions.SSLError):
        s.trust_env = False
        s.get(hub.api_url + "/", verify=True, timeout=30)
    # The certificate covers the hub, every user origin under it, and loopback.
    cert = (hub.state_dir.parent / "tls" / "hub.crt")
    from hub_config.tls import fingerprint, subject_alt_names
    names = subject_alt_names(cert)
    assert {"DNS:lxcgpu.localhost", "DNS:*.lxcgpu.localhost", "DNS:localhost",
            "IP:127.0.0.1"} <= names, names
    assert len(fingerprint(hub.ca_file).split(":")) == 32
    # No plain HTTP on the public port.
    port = urlparse(hub.url).port
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.sendall(b"GET /hub/api/ HTTP/1.1\r\nHost: lxcgpu.localhost\r\n\r\n")
        raw.settimeout(10)
        try:
            answer = raw.recv(100)
        except (ConnectionResetError, TimeoutError):
            answer = b""
    assert not answer.startswith(b"HTTP/1.1 200"), answer


def test_login_cookies_are_secure_and_host_only(hub, ldap_directory):
    s = hub.session()
    page = s.get(hub.url + "/hub/login", timeout=30)
    xsrf = XSRF_INPUT.search(page.text).group(1)
    r = s.post(hub.url + "/hub/login", allow_redirects=False, timeout=60,
               data={"username": "bob", "password": ldap_directory.passwords["bob"],
                     "_xsrf": xsrf})
    assert r.status_code == 302, r.status_code
    set_cookies = page.raw.headers.getlist("Set-Cookie") + r.raw.headers.getlist("Set-Cookie")
    names = {c.split("=", 1)[0] for c in set_cookies}
    assert {LOGIN_COOKIE, "_xsrf"} <= names, set_cookies
    for cookie in set_cookies:
        attrs = [a.strip().lower() for a in cookie.split(";")[1:]]
        assert "secure" in attrs, cookie
        if cookie.startswith("jupyterhub-session-id="):
            # Not a credential: JupyterHub puts it on the whole domain so that
            # a logout also ends the OAuth tokens of the user's servers.
            continue
        assert not any(a.startswith("domain=") for a in attrs), cookie  # host-only
    login = next(c for c in set_cookies if c.startswith(LOGIN_COOKIE + "="))
    assert "httponly" in login.lower() and "path=/;" in login.lower() + ";", login


def test_proxy_runs_unprivileged_with_a_key_only_it_reads(hub):
    proxy = pwd.getpwnam("lxcgpu-proxy")
    pid = int((hub.state_dir / "jupyterhub-proxy.pid").read_text())
    status = dict(line.split(":", 1) for line in
                  Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    assert status["Uid"].split() == [str(proxy.pw_uid)] * 4, status["Uid"]
    assert status["Gid"].split() == [str(proxy.pw_gid)] * 4, status["Gid"]
    assert status["Groups"].split() in ([], [str(proxy.pw_gid)]), status["Groups"]
    assert int(status["CapEff"], 16) == 0 and int(status["CapBnd"], 16) == 0
    assert status["NoNewPrivs"].strip() == "1"
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    key = Path(argv[argv.index(b"--ssl-key") + 1].decode())
    st = key.stat()
    assert key.parent == hub.proxy_dir
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (proxy.pw_uid, 0o400), oct(st.st_mode)
    assert stat.S_IMODE(key.parent.stat().st_mode) == 0o700
    # The generated key itself stays root's.
    generated = hub.state_dir.parent / "tls" / "hub.key"
    assert generated.stat().st_uid == 0 and stat.S_IMODE(generated.stat().st_mode) == 0o600
