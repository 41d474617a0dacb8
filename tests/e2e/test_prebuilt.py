"""A researcher the lab has never seen, with prebuilt containers on
(``[containers] pool = 1``), through real parts: the hub, its proxy,
keyportal's keeper making the prebuilt container on this machine's LXD, the
test slapd and a browser.  They log in; their first server is the prebuilt
container taken over (the spawn page says so), JupyterLab opens in it, the
proxy routes nothing to anything of the pool, and the keeper makes a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
import time
from urllib.parse import urlsplit

import pytest
import requests
from playwright.async_api import expect

from lxcspawner import naming, pool
from lxcspawner.store import Store
from tests.fixtures.browser import log_in, recording_page
from tests.fixtures.hub import LXCGPU_TOML, TEST_SERVICE, _ldap_settings, launch_hub
from tests.fixtures.lxd import TEST_KEY

pytestmark = [pytest.mark.lxd, pytest.mark.ldap]

SERVER = "node1"
FIRST_ID_BLOCK = 14550     # apart from the other tests' (tests/fixtures/hub.py)
USER = "ppl"               # after the run's tag: a researcher the lab never saw


@pytest.fixture(scope="module")
async def pool_hub(ldap_directory, run_tag, tmp_path_factory, lxd):
    root = tmp_path_factory.mktemp("pool-hub")
    # A prefix of its own: the session's other hubs (prefix: the run tag,
    # no prebuilt containers) would take this hub's prebuilt ones for strays
    # of their own site and delete them, as a keeper does.
    prefix = f"{run_tag}p"
    toml = (LXCGPU_TOML.format(store=root / "lxcgpu.sqlite", run_tag=prefix)
            .replace("first_id_block = 14800", f"first_id_block = {FIRST_ID_BLOCK}")
            .replace("[containers]\n", "[containers]\npool = 1\n"))
    hub = launch_hub(root, toml, ldap_settings=_ldap_settings(ldap_directory),
                     admin_group=ldap_directory.admins_group_dn, tag_key=TEST_KEY,
                     tag=run_tag, service=TEST_SERVICE)
    store = Store(hub.store_url, upgrade=False)
    try:
        hub.start()
        yield hub, store
    finally:
        hub.stop()
        shutil.rmtree(hub.proxy_dir, ignore_errors=True)
        for inst in await lxd.list_instances(config_key=pool.POOL_KEY):
            if inst["name"].startswith(f"{prefix}-pool--"):
                await lxd.delete_instance(inst["name"])
        await lxd.delete_instance(naming.instance_name(f"{run_tag}{USER}", SERVER, prefix))
        store.close()


async def ready_members(store: Store, timeout: float, *, besides=()) -> list:
    deadline = time.monotonic() + timeout
    while True:
        ready = [m for m in store.pool_members(SERVER) if m.ready and m.instance not in besides]
        if ready:
            return ready
        assert time.monotonic() < deadline, "the keeper made no prebuilt container in time"
        await asyncio.sleep(1)


def proxy_routes(hub) -> dict:
    token = (hub.state_dir / "proxy_token").read_text().strip()
    r = requests.get(f"{hub.proxy_api_url}/api/routes", timeout=10,
                     headers={"Authorization": f"token {token}"})
    r.raise_for_status()
    return r.json()


async def test_a_new_researchers_first_server_is_a_prebuilt_container(
        pool_hub, lxd, browser, artifacts, ldap_directory, logs_on_failure):
    hub, store = pool_hub
    (member,) = await ready_members(store, 180)
    name = f"{hub.run_tag}{USER}"
    password = secrets.token_urlsafe(12)
    ldap_directory.add_user(name, password, groups=["gpu-users"])
    instance = naming.instance_name(name, SERVER, f"{hub.run_tag}p")
    logs_on_failure.append(instance)
    context, page, progress = await recording_page(browser)
    try:
        started = time.monotonic()
        # When the hub was asked for the server (after the login, as a
        # "Start" press asks for it).
        asked: list[float] = []
        page.on("request", lambda r: asked.append(time.monotonic())
                if urlsplit(r.url).path == "/hub/spawn" else None)
        await log_in(page, hub, name, password)
        await page.wait_for_url(f"{hub.user_url(name)}lab**", timeout=180_000)
        served = time.monotonic() - started
        await expect(page.locator(".jp-LauncherCard").first).to_be_visible(timeout=90_000)
        took = time.monotonic() - started
        await page.screenshot(path=artifacts / "prebuilt-jupyterlab.png")
    except BaseException:
        with contextlib.suppress(Exception):
            await page.screenshot(path=artifacts / "prebuilt-failure.png")
        raise
    finally:
        await context.close()
    messages = [m for m, _ in progress]
    print(f"a new researcher: login to JupyterLab's page {served:.2f} s, to its launcher "
          f"{took:.2f} s; the server asked for to JupyterLab's page "
          f"{started + served - asked[0]:.2f} s; {messages}")
    assert "using a prepared container" in messages and "creating container" not in messages
    # The prebuilt container is theirs now: its block, their name, their owner key.
    rec = store.user(name)
    assert rec.idmap_base == member.idmap_base and rec.idmap_used
    inst = await lxd.instance(instance)
    assert inst["config"][f"{naming.KEY_PREFIX}owner"] == name
    assert await lxd.instance(member.instance) is None
    # The proxy routes the hub (on loopback, and on the bridge for
    # containers) and the user's server, nothing else.
    address = (await lxd.state(instance)).ipv4
    gateway = (await lxd.network(hub.env["LXCGPU_BRIDGE"]))["config"]["ipv4.address"]
    hosts = {urlsplit(r["target"]).hostname for r in proxy_routes(hub).values()}
    assert hosts == {"127.0.0.1", gateway.split("/")[0], address}, hosts
    # The keeper makes a new one in the background.
    (new,) = await ready_members(store, 180, besides={member.instance})
    fresh = await lxd.instance(new.instance)
    assert fresh["status"] == "Stopped" and pool.is_member(fresh)
    assert f"{naming.KEY_PREFIX}owner" not in fresh["config"]
    hub.api("DELETE", f"/users/{name}/server")
