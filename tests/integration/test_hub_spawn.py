"""Servers through the real hub's REST API: LXCSpawner, the proxy, JupyterLab
inside the user's own container, and what survives what."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import pytest
from tornado.httpclient import HTTPRequest
from tornado.websocket import websocket_connect

from lxcspawner import naming
from lxcspawner.settings import Settings

pytestmark = pytest.mark.lxd

USER = "alice"
SERVER = "node1"


def wait_ready(hub, user: str, name: str = "", timeout: float = 180) -> dict:
    """Poll the hub until the server is ready; its model."""
    deadline = time.monotonic() + timeout
    while True:
        model = hub.api("get", f"/users/{user}").json()
        server = model.get("servers", {}).get(name)
        if server and server.get("ready"):
            return server
        if time.monotonic() > deadline:
            pytest.fail(f"{user}/{name} not ready in {timeout}s: {model}\n{hub.log_text()[-4000:]}")
        time.sleep(0.2)


def ensure_running(hub, user: str, name: str = "") -> dict:
    """The server, started first if this test runs on its own."""
    if name not in hub.api("get", f"/users/{user}").json().get("servers", {}):
        start_server(hub, user, name)
    return wait_ready(hub, user, name)


def wait_stopped(hub, user: str, name: str = "", timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while name in hub.api("get", f"/users/{user}").json().get("servers", {}):
        assert time.monotonic() < deadline, hub.log_text()[-4000:]
        time.sleep(0.2)


def start_server(hub, user: str, name: str = "", **options):
    path = f"/users/{user}/servers/{name}" if name else f"/users/{user}/server"
    r = hub.api("post", path, json=options or None)
    assert r.status_code in (201, 202), (r.status_code, r.text)
    return r


async def run_code(hub, user: str, code: str, name: str = "") -> str:
    """Run code in a new kernel of the user's server, through the proxy; its stdout."""
    base = hub.user_url(user, name)
    headers = {"Authorization": f"token {hub.token}"}
    r = hub.session().post(base + "api/kernels", headers=headers, json={})
    assert r.status_code == 201, (r.status_code, r.text)
    kernel = r.json()["id"]
    try:
        ws_url = base.replace("http", "ws", 1) + f"api/kernels/{kernel}/channels"
        ws = await websocket_connect(HTTPRequest(
            ws_url, headers=headers, ca_certs=str(hub.ca_file) if hub.ca_file else None))
        msg_id = uuid.uuid4().hex
        ws.write_message(json.dumps({
            "header": {"msg_id": msg_id, "msg_type": "execute_request", "username": user,
                       "session": uuid.uuid4().hex, "version": "5.3"},
            "parent_header": {}, "metadata": {}, "channel": "shell",
            "content": {"code": code, "silent": False, "store_history": False,
                        "user_expressions": {}, "allow_stdin": False}}))
        out = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            raw = await asyncio.wait_for(ws.read_message(), 60)
            assert raw is not None, "kernel websocket closed"
            msg = json.loads(raw)
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "stream":
                out.append(msg["content"]["text"])
            elif msg["msg_type"] == "error":
                pytest.fail(f"kernel error: {msg['content']}")
            elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                return "".join(out)
        pytest.fail("no reply from the kernel")
    finally:
        hub.session().delete(base + f"api/kernels/{kernel}", headers=headers)


async def unit_pid(lxd, instance: str, unit: str) -> int:
    res = await lxd.execute(instance, ["systemctl", "show", "-p", "MainPID", "--value", unit])
    return int(res.stdout.strip() or 0)


@pytest.fixture(scope="module")
def alice(hub):
    hub.api("post", f"/users/{USER}")  # 201, or 409 if it exists
    yield USER
    for name in ("", SERVER):
        path = f"/users/{USER}/servers/{name}" if name else f"/users/{USER}/server"
        hub.api("delete", path)


def instance_name(hub) -> str:
    return naming.instance_name(USER, SERVER, hub.run_tag)


async def test_spawn_reaches_jupyter_in_her_container(hub, alice, lxd, logs_on_failure):
    logs_on_failure.append(instance_name(hub))
    start_server(hub, alice)
    events = [json.loads(line[len("data:"):]) for line in hub.api(
        "get", f"/users/{alice}/server/progress", stream=True, timeout=300).iter_lines(
        decode_unicode=True) if line.startswith("data:")]
    messages = [e.get("message", "") for e in events]
    assert any("creating container" in m or "starting container" in m for m in messages) or \
        any("preparing user" in m for m in messages), messages
    assert any("starting Jupyter" in m for m in messages), messages
    assert events[-1].get("ready"), events[-1]
    server = wait_ready(hub, alice)
    st = await lxd.state(instance_name(hub))
    assert server["state"]["instance"] == instance_name(hub)
    assert server["state"]["address"] == st.ipv4
    r = hub.session().get(hub.user_url(alice) + "api/status",
                          headers={"Authorization": f"token {hub.token}"})
    assert r.status_code == 200, r.text
    out = await run_code(hub, alice, "import getpass, socket; print(socket.gethostname(), getpass.getuser())")
    assert out.split() == [naming.hostname(alice, SERVER), alice]


async def test_stop_keeps_the_container_and_restart_is_quick(hub, alice, lxd, logs_on_failure):
    name = instance_name(hub)
    logs_on_failure.append(name)
    ensure_running(hub, alice)
    pid = (await lxd.state(name)).pid
    r = hub.api("delete", f"/users/{alice}/server")
    assert r.status_code in (202, 204), r.text
    wait_stopped(hub, alice)
    st = await lxd.state(name)
    assert st.running and st.pid == pid, "stopping the server must not stop the container"
    assert await unit_pid(lxd, name, "lxcgpu-jupyter") == 0
    t0 = time.monotonic()
    # An API client may say which GPUs ("all" here: this server has none),
    # recorded in the audit log.
    start_server(hub, alice, gpus="all")
    wait_ready(hub, alice)
    print(f"hot spawn: {time.monotonic() - t0:.2f} s")
    assert (await lxd.state(name)).pid == pid
    # Her container ran: Jupyter started at once, the checks meanwhile.
    assert [line for line in hub.log_text().splitlines()
            if f"{alice}: Jupyter in {name}" in line][-1].endswith(
        "; Jupyter started before the checks)")
    out = await run_code(hub, alice, "print(40 + 2)")
    assert out.strip() == "42"
    store = Settings.load(hub.env["LXCGPU_CONFIG"]).open_store()
    try:
        gpus = [a for a in store.audit_log(user=alice, limit=20) if a.action == "container.gpus"]
    finally:
        store.close()
    assert gpus and gpus[0].actor == f"hub:{alice}" and '"all"' in gpus[0].detail


async def test_hub_restart_readopts_without_restarting(hub, alice, lxd, logs_on_failure):
    name = instance_name(hub)
    logs_on_failure.append(name)
    ensure_running(hub, alice)
    pid = (await lxd.state(name)).pid
    jpid = await unit_pid(lxd, name, "lxcgpu-jupyter")
    assert jpid
    hub.restart()
    server = wait_ready(hub, alice, timeout=60)
    assert server["state"]["instance"] == name
    assert await unit_pid(lxd, name, "lxcgpu-jupyter") == jpid, "Jupyter was restarted"
    assert (await lxd.state(name)).pid == pid, "the container was restarted"
    out = await run_code(hub, alice, "print('still here')")
    assert out.strip() == "still here"
    assert len([i for i in await lxd.list_instances() if i["name"] == name]) == 1


async def test_a_failed_check_stops_the_jupyter_started_early(hub, alice, lxd,
                                                              logs_on_failure):
    """Jupyter starts before the checks where her container runs; when a
    check then fails (her keys cannot be written: ~/.ssh made root's), the
    spawn fails with the sentence and that Jupyter, started or still
    starting, is stopped again."""
    name = instance_name(hub)
    logs_on_failure.append(name)
    ensure_running(hub, alice)
    hub.api("delete", f"/users/{alice}/server")
    wait_stopped(hub, alice)
    chown = ["chown", "root:root", f"/home/{alice}/.ssh"]
    (await lxd.execute(name, chown)).check(chown)
    try:
        offset = len(hub.log_text())
        start_server(hub, alice)
        events = [json.loads(line[len("data:"):]) for line in hub.api(
            "get", f"/users/{alice}/server/progress", stream=True, timeout=300).iter_lines(
            decode_unicode=True) if line.startswith("data:")]
        assert events[-1].get("failed"), events[-1]
        assert "could not be written" in events[-1]["message"], events[-1]
        wait_stopped(hub, alice)
        # (Long enough for an early start left to itself to have finished.)
        await asyncio.sleep(2)
        assert await unit_pid(lxd, name, "lxcgpu-jupyter") == 0, "Jupyter still runs"
        log = hub.log_text()[offset:]
        assert f"{alice}: a check failed: the Jupyter started before it is stopped" in log, \
            log[-3000:]
    finally:
        chown = ["chown", f"{alice}:{alice}", f"/home/{alice}/.ssh"]
        (await lxd.execute(name, chown)).check(chown)
    start_server(hub, alice)
    wait_ready(hub, alice)


async def test_named_server_per_gpu_server(hub, alice, lxd, logs_on_failure):
    name = instance_name(hub)
    logs_on_failure.append(name)
    ensure_running(hub, alice)
    start_server(hub, alice, SERVER)
    server = wait_ready(hub, alice, SERVER)
    # The named server for node1 lives in the same container as the default
    # server (which runs on the default node, node1), beside it.
    assert server["state"]["instance"] == name
    assert await unit_pid(lxd, name, f"lxcgpu-jupyter-{SERVER}")
    assert await unit_pid(lxd, name, "lxcgpu-jupyter")
    out = await run_code(hub, alice, "import os; print(os.environ['JUPYTERHUB_SERVER_NAME'])",
                         name=SERVER)
    assert out.strip() == SERVER
    hub.api("delete", f"/users/{alice}/servers/{SERVER}")
    wait_stopped(hub, alice, SERVER)
    assert await unit_pid(lxd, name, f"lxcgpu-jupyter-{SERVER}") == 0
    assert await unit_pid(lxd, name, "lxcgpu-jupyter"), "the default server must keep running"


@pytest.mark.parametrize("how", ["named", "option"])
async def test_unknown_gpu_server_is_refused(hub, alice, lxd, how):
    before = {i["name"] for i in await lxd.list_instances()}
    if how == "named":
        # Her named server for node1 would already fill her named-server
        # limit (one per GPU server): remove it, so the name is what is refused.
        hub.api("delete", f"/users/{alice}/servers/{SERVER}", json={"remove": True})
        deadline = time.monotonic() + 60
        while SERVER in hub.api("get", f"/users/{alice}").json().get("servers", {}):
            assert time.monotonic() < deadline, hub.log_tail(3000)
            time.sleep(0.2)
        r = hub.api("post", f"/users/{alice}/servers/gpu99")
        target = "gpu99"
    else:
        hub.api("post", "/users/bob")
        r = hub.api("post", "/users/bob/server", json={"gpu_server": "gpu99; rm -rf /"})
        target = ""
    # Refused at once, or failed spawn; either way nothing runs and nothing is made.
    user = "bob" if how == "option" else alice
    if r.status_code in (201, 202):
        deadline = time.monotonic() + 30
        while target in hub.api("get", f"/users/{user}").json().get("servers", {}):
            assert time.monotonic() < deadline
            time.sleep(0.2)
    else:
        assert r.status_code in (400, 500), r.text
    assert "unknown GPU server" in hub.log_text()
    assert {i["name"] for i in await lxd.list_instances()} == before


_PROBE = r"""
import socket, sys, urllib.request
gw, hub_port, proxy_api_port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with urllib.request.urlopen(f"http://{gw}:{hub_port}/hub/api/", timeout=5) as r:
    print("hub-api", r.status)
for port in (proxy_api_port, 8443):
    try:
        socket.create_connection((gw, port), timeout=3).close()
        print("open", port)
    except OSError as e:
        print("closed", port, type(e).__name__)
"""


async def test_container_reaches_the_hub_api_but_not_the_proxy_api_or_lxd(hub, alice, lxd):
    name = instance_name(hub)
    ensure_running(hub, alice)
    res = await lxd.execute(name, ["ip", "-4", "route", "show", "default"])
    gw = res.stdout.split()[2]
    proxy_api_port = int(hub.proxy_api_url.rsplit(":", 1)[1])
    res = await lxd.execute(name, ["/opt/jupyter/bin/python", "-c", _PROBE, gw,
                                   hub.env["LXCGPU_HUB_API_PORT"], str(proxy_api_port)],
                            timeout=60)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.split("\n")
    assert lines[0] == "hub-api 200"
    assert lines[1].startswith(f"closed {proxy_api_port}") and lines[2].startswith("closed 8443"), \
        res.stdout
