"""Someone removed from the lab's groups loses access without logging in
again, through a real hub against the real slapd with the service account:

- their browser session and API tokens stop working within
  ``auth_refresh_age`` (the same session and token keep working across the
  same wait while the user is still a member: the control);
- within the lab sync's interval their server is stopped, their tokens are
  revoked, and their SSH keys and port maps are taken out of their container
  (kept in the store, suspended), the container itself kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
import time

import pytest

from lxcspawner import naming
from lxcspawner.portmap import SSH_PORT_KEY
from lxcspawner.store import Store
from tests.fixtures.hub import (
    LXCGPU_TOML, TEST_SERVICE, _delete_run_containers, _ldap_settings, launch_hub,
)
from tests.fixtures.sshkeys import keypair
from tests.integration.test_hub_spawn import wait_ready
from tests.fixtures.lxd import TEST_KEY
from tests.integration.test_hub_login import assert_logged_in, assert_refused, login, set_membership

REFRESH_AGE = 2
SYNC_INTERVAL = 3


@pytest.fixture(scope="module")
def refreshing_hub(request, ldap_directory, run_tag, tmp_path_factory):
    """A hub whose authenticator checks the directory every 2 s of activity,
    with the directory's manager as its service account (its password read
    from the root-only file, never written into the site file)."""
    tag = f"{run_tag}r"
    root = tmp_path_factory.mktemp("lxcgpu-refresh-hub")
    toml = LXCGPU_TOML.format(store=root / "lxcgpu.sqlite", run_tag=tag).replace(
        "first_id_block = 14800", "first_id_block = 14950")
    settings = _ldap_settings(ldap_directory) + f"""
from pathlib import Path as _P
c.LDAPAuthenticator.lookup_dn_search_user = {ldap_directory.admin_dn!r}
c.LDAPAuthenticator.lookup_dn_search_password = _P({str(ldap_directory.admin_password_file)!r}).read_text().strip()
c.Authenticator.auth_refresh_age = {REFRESH_AGE}
c.LXCGPULabSync.interval = {SYNC_INTERVAL}
"""
    instance = launch_hub(root, toml, ldap_settings=settings,
                          admin_group=ldap_directory.admins_group_dn, tag_key=TEST_KEY,
                          tag=tag, service=TEST_SERVICE)
    try:
        instance.start()
        yield instance
    finally:
        instance.stop()
        asyncio.run(_delete_run_containers(tag))
        with contextlib.suppress(Exception):
            shutil.rmtree(instance.proxy_dir, ignore_errors=True)
        if request.session.testsfailed:
            print(f"\n===== refreshing hub log (tail) =====\n{instance.log_tail()}")


def token_works(hub, token: str) -> int:
    with hub.session() as s:
        return s.get(hub.api_url + "/user", headers={"Authorization": f"token {token}"},
                     timeout=30).status_code


def test_a_user_removed_from_the_groups_loses_session_and_tokens(refreshing_hub, ldap_directory,
                                                                 run_tag):
    hub = refreshing_hub
    name, password = f"{run_tag}leaver", secrets.token_urlsafe(12)
    ldap_directory.add_user(name, password, groups=["gpu-users"])
    s, r = login(hub, name, password)
    assert_logged_in(hub, s, r)
    r = hub.api("post", f"/users/{name}/tokens", json={"note": "a script of theirs"})
    assert r.status_code == 201, r.text
    token = r.json()["token"]

    # Control: still a member, the refresh keeps both working.
    time.sleep(REFRESH_AGE + 1)
    assert s.get(hub.url + "/hub/home", allow_redirects=False, timeout=30).status_code == 200
    assert token_works(hub, token) == 200

    set_membership(ldap_directory, name, "gpu-users", member=False)
    time.sleep(REFRESH_AGE + 1)
    home = s.get(hub.url + "/hub/home", allow_redirects=False, timeout=30)
    assert home.status_code == 302 and "/hub/login" in home.headers["Location"], home.status_code
    assert token_works(hub, token) == 403
    assert_refused(hub, *login(hub, name, password))
    assert f"{name} is in none of the allowed groups any more" in hub.log_text()


async def test_the_lab_sync_ends_servers_tokens_keys_and_port_maps(
        refreshing_hub, ldap_directory, lxd, run_tag, tmp_path, logs_on_failure):
    hub = refreshing_hub
    name, password = f"{run_tag}gone", secrets.token_urlsafe(12)
    ldap_directory.add_user(name, password, groups=["gpu-users"])
    assert_logged_in(hub, *login(hub, name, password))
    store = Store(hub.store_url)
    try:
        await asyncio.to_thread(store.add_key, name, keypair(tmp_path, "gone")[1], actor="test")
        r = hub.api("post", f"/users/{name}/server")
        assert r.status_code in (201, 202), r.text
        await asyncio.to_thread(wait_ready, hub, name, "", 240)
        instance = naming.instance_name(name, "node1", f"{run_tag}r")
        logs_on_failure.append(instance)
        r = hub.api("post", f"/users/{name}/tokens", json={"note": "a script of theirs"})
        assert r.status_code == 201, r.text
        ak = f"/home/{naming.posix_name(name)}/.ssh/authorized_keys"
        assert (await lxd.get_file(instance, ak)).strip()
        assert SSH_PORT_KEY in (await lxd.instance(instance))["config"]

        set_membership(ldap_directory, name, "gpu-users", member=False)
        deadline = time.monotonic() + 8 * SYNC_INTERVAL

        async def done() -> bool:
            return bool((await asyncio.to_thread(store.user, name)).suspended
                        and SSH_PORT_KEY not in (await lxd.instance(instance))["config"]
                        and not (await lxd.get_file(instance, ak)).strip())
        while not await done():
            assert time.monotonic() < deadline, hub.log_tail(3000)
            await asyncio.sleep(0.5)
        model = hub.api("get", f"/users/{name}").json()
        assert model["servers"] == {}, model
        tokens = hub.api("get", f"/users/{name}/tokens").json()
        assert tokens.get("api_tokens", []) == [], tokens
        cfg = (await lxd.instance(instance))["config"]
        assert SSH_PORT_KEY not in cfg
        assert (await lxd.get_file(instance, ak)).strip() == b""
        assert (await lxd.state(instance)).running          # the container and its jobs stay
        assert len(await asyncio.to_thread(store.list_keys, name)) == 1   # nothing deleted
        actions = [a.action for a in await asyncio.to_thread(store.audit_log, user=name)]
        assert "user.suspend" in actions and "user.access-ended" in actions
    finally:
        store.close()
