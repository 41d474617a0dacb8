"""The monitor through real parts: two GPU servers' node agents and the
dashboard the hub runs, in a real browser.

node1 is this machine's LXD with its agent on loopback; node2 is the second
real LXD daemon in its own network namespace (tests/fixtures/lxd2.py) with
its agent there, on node2's address.  Both agents serve their load with the
site's monitor token (and refuse requests without it); the hub's dashboard
polls both.  This machine has no GPU: node1's agent sees two through a fake
NVML at the library boundary (tests/fixtures/nvml_module: pynvml over
tests/fixtures/fake_nvml.py), one of them used by a process of alice's
container; node2 has none.  A researcher logs in: the spawn form shows each
server's GPUs, free or in use and by whom; the dashboard both cards and
alice's container; a CPU-heavy process started in that container shows
within seconds; node2's agent is stopped and its card goes stale within
seconds.

The site keeps containers' NVIDIA driver in step with the installer
(driver_sync "installer", a fake installer in its folder): a spawn on node1
finds the host's version through node1's agent, runs the installer, and the
spawn page shows it, line by line; the next start does nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import secrets
import subprocess
import shutil
import time
import urllib.error
import urllib.request

import pytest
from playwright.async_api import expect

from lxcspawner import naming
from lxcspawner.container import start_container
from lxcspawner import driversync
from tests.fixtures.browser import log_in, recording_page
from tests.fixtures.fake_nvidia import write_installer
from tests.fixtures.hub import _ldap_settings, free_port, launch_hub
from tests.fixtures.lxd import TEST_KEY
from tests.fixtures.lxd2 import NamespacedAgent
from tests.fixtures.netns import Agent

pytestmark = [pytest.mark.lxd, pytest.mark.ldap]

FIRST_ID_BLOCK = 14600
PORTS = 'ssh = "28500-28599"\nforward = "12400-12499"\njupyter = "20600-20699"\n'
OWNER = "alice"
DRIVER = "550.54.15"        # node1's, as its (fake) NVML says
GPU_MODEL = "NVIDIA A100-SXM4-80GB"


def get(url: str, token: str | None = None, *, timeout: float = 10) -> tuple[int, bytes, dict]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"}
                                 if token else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


@pytest.fixture(scope="module")
def monitor_site(second_lxd, ldap_directory, run_tag, tmp_path_factory):
    """A hub whose site has node1 (here) and node2 (the second LXD), the
    monitor token in a 0600 file, and both node agents running."""
    root = tmp_path_factory.mktemp("monitor-site")
    token = secrets.token_urlsafe(32)
    token_file = root / "monitor.token"
    token_file.touch(mode=0o600)
    token_file.write_text(token + "\n")
    agent_port = free_port("127.0.0.1")
    nvml = root / "node1-nvml.json"
    nvml.write_text(json.dumps({"driver": DRIVER, "gpus": 2, "processes": {}}))
    installers = root / "installers"
    installers.mkdir()
    write_installer(installers, DRIVER, pause=2.5)
    toml = (f'[store]\nurl = "sqlite:///{root / "lxcgpu.sqlite"}"\n'
            f"first_id_block = {FIRST_ID_BLOCK}\n[ports]\n{PORTS}"
            f'[monitor]\ntoken_file = "{token_file}"\nagent_port = {agent_port}\n'
            f"poll_seconds = 1\n"
            f'[gpus]\ndriver_sync = "installer"\ninstaller_dir = "{installers}"\n'
            f"[servers.node1]\n{second_lxd.site_table('node2')}"
            f'[containers]\nprefix = "{run_tag}"\n')
    hub = launch_hub(root, toml, ldap_settings=_ldap_settings(ldap_directory),
                     admin_group=ldap_directory.admins_group_dn, tag_key=TEST_KEY,
                     tag=run_tag, service="lxcgpu-tests")
    config = root / "lxcgpu.toml"
    node1 = Agent("LXCM" + run_tag[1:].upper(), root / "node1-agent.log", config=config,
                  extra=("--server", "node1"), nvml=nvml)
    node2 = NamespacedAgent(second_lxd, config, root / "node2-agent.log")
    node1.start()
    node2.start()
    try:
        hub.start()
        yield {"hub": hub, "token": token, "agents": {"node1": node1, "node2": node2},
               "nvml": nvml,
               "urls": {"node1": f"http://127.0.0.1:{agent_port}",
                        "node2": f"http://{second_lxd.address}:{agent_port}"}}
    finally:
        hub.stop()
        shutil.rmtree(hub.proxy_dir, ignore_errors=True)
        node1.stop()
        node2.stop()
        subprocess.run(node1.argv("--remove-rules"), capture_output=True, timeout=60,
                       env=node1.env())
        print(f"\n===== node1 agent log =====\n{node1.log_text()[-4000:]}")
        print(f"\n===== node2 agent log =====\n{(root / 'node2-agent.log').read_text()[-4000:]}")


def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.5)
    raise AssertionError(f"{what}: not within {timeout} s (last: {last!r})")


def test_the_agents_serve_their_load_with_the_token_only(monitor_site):
    token = monitor_site["token"]
    for name, url in monitor_site["urls"].items():
        def loaded():
            code, body, _ = get(f"{url}/api/v1/load", token)
            return json.loads(body) if code == 200 else None
        doc = wait_for(loaded, 30, f"{name}'s first sample")
        assert doc["node"] == name
        if name == "node1":
            assert doc["gpus"]["status"] == "ok" and doc["gpus"]["driver"] == DRIVER
            assert [g["name"] for g in doc["gpus"]["devices"]] == [GPU_MODEL] * 2
        else:
            assert doc["gpus"]["status"] == "no GPUs" and doc["gpus"]["devices"] == []
        assert doc["host"]["cpus"] >= 1 and doc["host"]["memory"]["total"] > 0
        # Without the token, with a wrong one, or with it in the URL: refused.
        assert get(f"{url}/api/v1/load")[0] == 401
        assert get(f"{url}/api/v1/load", "x" * 43)[0] == 401
        assert get(f"{url}/metrics")[0] == 401
        code, body, _ = get(f"{url}/api/v1/load?token={token}")
        assert code == 400 and b"URL" in body
        code, body, headers = get(f"{url}/metrics", token)
        assert code == 200 and headers["Content-Type"].startswith("text/plain")
        assert f'lxcgpu_gpus{{node="{name}"}} {2 if name == "node1" else 0}' in body.decode()
        assert get(f"{url}/api/v1/health")[0] == 200


async def test_the_dashboard_shows_both_servers_a_busy_container_and_a_stale_one(
        monitor_site, user_containers, lxd, browser, artifacts, ldap_directory):
    hub = monitor_site["hub"]
    spec = await user_containers(OWNER)
    await start_container(lxd, spec.name)
    # A process of alice's container uses node1's GPU 1 (10 GiB).
    pid = (await lxd.state(spec.name)).pid
    monitor_site["nvml"].write_text(json.dumps(
        {"driver": DRIVER, "gpus": 2, "processes": {"1": [[pid, 10 << 30]]}}))
    context = await browser.new_context(viewport={"width": 1400, "height": 1100},
                                        ignore_https_errors=True)
    page = await context.new_page()
    try:
        await log_in(page, hub, "bob", ldap_directory.passwords["bob"])
        # The spawn form says what each server has free.
        # The spawn form says what each server has, free or in use and by whom.
        async def form_shows_alice():
            await page.goto(f"{hub.url}/hub/spawn")
            return "in use by alice" in await page.locator("table.lxcgpu-gpus").inner_text()
        deadline = time.monotonic() + 30
        while not await form_shows_alice():
            assert time.monotonic() < deadline, await page.content()
            await asyncio.sleep(1)
        await expect(page.locator("#gpu_server option[value=node1]")).to_have_text(
            f"node1 (1 of 2 GPUs free: {GPU_MODEL})")
        await expect(page.locator("#gpu_server option[value=node2]")).to_have_text(
            "node2 (no GPUs)")
        rows = page.locator("table.lxcgpu-gpus tbody tr")
        await expect(rows).to_have_count(2)
        await expect(rows.nth(0)).to_have_text(re.compile(
            rf"^\s*node1\s*0\s*{GPU_MODEL}\s*80 GB\s*free\s*$"))
        await expect(rows.nth(1)).to_have_text(re.compile(
            rf"^\s*node1\s*1\s*{GPU_MODEL}\s*80 GB\s*in use by alice\s*$"))
        await page.screenshot(path=artifacts / "monitor-spawn-form.png", full_page=True)
        # A GPU this server does not have: refused before anything is made.
        bobs = naming.instance_name("bob", "node1", hub.run_tag)
        had = await lxd.instance(bobs)
        await page.select_option("#gpu_server", "node1")
        await page.fill("#gpus", "0")
        await page.click("form#spawn_form button[type=submit]")
        await expect(page.locator("body")).to_contain_text(
            "node1 has no GPU '0'; it has no GPUs", timeout=60_000)
        now = await lxd.instance(bobs)
        assert (had is None and now is None) or (had["config"] == now["config"]
                                                  and had["devices"] == now["devices"])
        # From the hub's own pages: the navigation bar's link.
        await page.goto(f"{hub.url}/hub/home")
        await page.click("#monitor-link")
        await page.wait_for_url("**/services/monitor/", timeout=30_000)
        node1, node2 = page.locator("#server-node1"), page.locator("#server-node2")
        await expect(node1).to_contain_text(GPU_MODEL, timeout=30_000)
        await expect(node1).to_contain_text(OWNER)
        await expect(node2).to_contain_text("no GPUs")
        await expect(node1.locator(".badge").first).to_have_text("up")
        await expect(page.locator("#summary")).to_contain_text("2 of 2 servers up")
        # alice's container, by her name (not a number), with its state.
        row = node1.locator("table.containers tr", has_text=spec.name)
        await expect(row).to_contain_text(OWNER, timeout=30_000)
        await expect(row).to_contain_text("running")
        # A CPU-heavy process in it shows within seconds, without a reload.
        await lxd.execute(spec.name, ["sh", "-c", "timeout 40 sh -c 'while :; do :; done' "
                                      ">/dev/null 2>&1 &"])
        started = time.monotonic()
        cpu = row.locator("td").nth(3)
        await expect(cpu).to_have_text(re.compile(r"^([4-9]\d|\d{3})%$"), timeout=20_000)
        busy_after = time.monotonic() - started
        # Filters: by user, and by server.
        await page.fill("#filters input[name=user]", OWNER)
        await page.click("#filters button")
        await expect(page.locator("table.containers tr", has_text=spec.name)).to_have_count(1)
        await expect(node2).to_have_count(0)
        await page.fill("#filters input[name=user]", "")
        await page.select_option("#filters select[name=server]", "node2")
        await page.click("#filters button")
        await expect(node1).to_have_count(0)
        await expect(node2).to_have_count(1)
        await page.select_option("#filters select[name=server]", "")
        await page.click("#filters button")
        await page.screenshot(path=artifacts / "monitor-dashboard.png", full_page=True)
        # node2's agent stops: its card goes stale within seconds.
        monitor_site["agents"]["node2"].proc.terminate()
        await asyncio.to_thread(monitor_site["agents"]["node2"].proc.wait, 15)
        stopped = time.monotonic()
        await expect(node2.locator(".stale-badge")).to_contain_text("stale since",
                                                                    timeout=30_000)
        stale_after = time.monotonic() - stopped
        await expect(page.locator("#summary")).to_contain_text("1 of 2 servers up")
        spawn = await context.new_page()
        await spawn.goto(f"{hub.url}/hub/spawn")
        await expect(spawn.locator("#gpu_server option[value=node2]")).to_have_text(
            "node2 (not answering)", timeout=15_000)
        await spawn.close()
        await page.screenshot(path=artifacts / "monitor-stale.png", full_page=True)
        print(f"busy shown after {busy_after:.1f} s; stale shown after {stale_after:.1f} s")
        assert stale_after < 15
    except BaseException:
        with contextlib.suppress(Exception):
            await page.screenshot(path=artifacts / "monitor-failure.png", full_page=True)
        raise
    finally:
        await context.close()
        node2 = monitor_site["agents"]["node2"]
        if node2.proc is None or node2.proc.poll() is not None:   # stopped above: back
            node2.start()


async def test_the_dashboard_json_needs_a_login_or_a_token(monitor_site):
    hub = monitor_site["hub"]
    url = f"{hub.url}/services/monitor/api/v1/load"
    with hub.session() as s:
        r = await asyncio.to_thread(s.get, url, timeout=30, allow_redirects=False)
        assert r.status_code == 401, r.text
        hub.api("post", "/users/bob")
        token = hub.api("post", "/users/bob/tokens",
                        json={"note": "monitor", "expires_in": 600}).json()["token"]
        r = await asyncio.to_thread(s.get, url + "?state=free", timeout=30,
                                    headers={"Authorization": f"token {token}"})
        assert r.status_code == 200, r.text
        data = r.json()
        assert data["filters"]["state"] == "free" and data["summary"]["servers"] == 2
        r = await asyncio.to_thread(s.get, url + "?state=asleep", timeout=30,
                                    headers={"Authorization": f"token {token}"})
        assert r.status_code == 400 and "state: one of" in r.json()["message"]
        r = await asyncio.to_thread(s.get, url + "?server=nowhere", timeout=30,
                                    headers={"Authorization": f"token {token}"})
        assert r.status_code == 404


async def test_a_spawn_puts_the_hosts_driver_in_the_container_and_says_so(
        monitor_site, lxd, browser, artifacts, ldap_directory):
    """The acceptance of driver_sync "installer": bob's container, made from
    the template (no NVIDIA driver inside), gets node1's driver version (read
    through node1's agent) from the installer in the site's folder, and the
    spawn page shows it as it happens; the next start does nothing."""
    hub = monitor_site["hub"]
    user = "bob"
    name = naming.instance_name(user, "node1", hub.run_tag)
    context, page, progress = await recording_page(browser, height=900)
    try:
        await log_in(page, hub, user, ldap_directory.passwords[user])
        await page.goto(f"{hub.url}/hub/spawn")
        await page.select_option("#gpu_server", "node1")
        await page.click("form#spawn_form button[type=submit]")
        await page.wait_for_url(f"**/hub/spawn-pending/{user}**", timeout=30_000)
        await expect(page.locator("#progress-log .progress-log-event").filter(
            has_text=f"installing the NVIDIA driver {DRIVER}: Installing NVIDIA driver "
                     f"version {DRIVER}.")).to_be_attached(timeout=180_000)
        await page.screenshot(path=artifacts / "driver-sync-progress.png")
        await page.wait_for_url(f"{hub.user_url(user)}**", timeout=180_000)
    except BaseException:
        with contextlib.suppress(Exception):
            await page.screenshot(path=artifacts / "driver-sync-failure.png", full_page=True)
        raise
    finally:
        await context.close()
    messages = [m for m, _ in progress]
    said = [m for m in messages if "NVIDIA driver" in m]
    assert said[0] == f"installing the NVIDIA driver {DRIVER} (was none; a few minutes)", \
        messages
    assert said[-1] == f"NVIDIA driver {DRIVER} installed", messages
    # Between the container's start and the user's account, on the bar's way up.
    at = messages.index(said[0])
    assert messages.index("starting container") < at < messages.index("preparing user")
    bar = [pct for _, pct in progress]
    assert bar == sorted(bar), progress
    assert await driversync.container_version(lxd, name) == DRIVER
    assert await lxd.file_entry(name, driversync.IN_CONTAINER) is None

    # The next start: the versions match; nothing is installed or said.
    r = hub.api("delete", f"/users/{user}/server")
    assert r.status_code in (202, 204), r.text
    deadline = time.monotonic() + 60
    while "" in hub.api("get", f"/users/{user}").json().get("servers", {}):
        assert time.monotonic() < deadline, hub.log_tail()
        await asyncio.sleep(0.3)
    r = hub.api("post", f"/users/{user}/server", json={"gpu_server": "node1"})
    assert r.status_code in (201, 202), r.text
    events = [json.loads(line[len("data:"):]) for line in hub.api(
        "get", f"/users/{user}/server/progress", stream=True, timeout=300).iter_lines(
        decode_unicode=True) if line.startswith("data:")]
    assert events[-1].get("ready"), events
    assert not [e for e in events if "NVIDIA driver" in e.get("message", "")], events
    hub.api("delete", f"/users/{user}/server")
