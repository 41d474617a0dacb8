"""The dashboard's poller and view, against real load APIs on loopback
(tornado servers of monitor.loadapi serving fixed documents): free, busy
and idle GPUs, filters, a stale server with since-when and why, the public
view without process ids, and an agent that refuses a wrong token."""

from __future__ import annotations

import json
import socket

import pytest
from tornado import httpserver

from monitor import dashboard, loadapi
from monitor.collector import prometheus

TOKEN = "t" * 43


def gpu(index, *, procs=(), util=0, idle=None):
    return {"index": index, "name": "NVIDIA A100", "uuid": f"GPU-{index}", "pci_bus_id": "0",
            "utilization": util, "memory_used": sum(m for _, m in procs),
            "memory_total": 80 << 30, "temperature": 40, "power_watts": 60.0, "error": None,
            "processes": [{"pid": 100 + i, "memory": m, "container": f"{u}--n", "user": u,
                           "host": False} for i, (u, m) in enumerate(procs)],
            "users": [{"user": u, "memory": m} for u, m in procs], "idle": idle}


def doc(node, gpus, containers=()):
    return {"node": node, "time": "2026-12-05T10:00:00Z",
            "host": {"cpu_percent": 50.0, "cpus": 8, "load": [1, 1, 1],
                     "memory": {"total": 100, "used": 40, "available": 60},
                     "network": {}, "disks": []},
            "gpus": {"status": "ok" if gpus else "no GPUs", "message": None, "driver": "550",
                     "devices": gpus},
            "containers": list(containers), "containers_error": None, "cost": {}}


def serve(document) -> tuple[httpserver.HTTPServer, str]:
    app = loadapi.make_app(document["node"], TOKEN, lambda: document, prometheus)
    server, port = loadapi.serve(app, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{port}"


@pytest.fixture
async def site():
    docs = {
        "gpu1": doc("gpu1", [gpu(0), gpu(1, procs=[("alice", 10 << 30)], util=90),
                             gpu(2, procs=[("bob", 5 << 30)], util=0,
                                 idle={"since": "2026-12-05T09:00:00Z", "users": ["bob"]})],
                    [{"name": "alice--gpu1", "user": "alice", "state": "running",
                      "cpu_percent": 99.0, "memory": 1 << 30, "processes": 12}]),
        "gpu2": doc("gpu2", [gpu(0)]),
    }
    servers, urls = [], []
    for name, d in docs.items():
        server, url = serve(d)
        servers.append(server)
        urls.append((name, url))
    # A server whose agent is not there (a port nothing listens on).
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    urls.append(("gpu3", f"http://127.0.0.1:{dead}"))
    yield urls
    for server in servers:
        server.stop()


async def test_free_busy_idle_and_a_stale_server(site):
    p = dashboard.Poller(site, TOKEN, poll_seconds=1, timeout=2)
    await p.poll()
    v = p.view()
    t = v["summary"]
    assert (t["gpus"], t["free"], t["busy"], t["idle"]) == (4, 2, 1, 1)
    assert (t["servers"], t["stale"]) == (3, 1)
    assert {(g["server"], g["index"]) for g in t["free_gpus"]} == {("gpu1", 0), ("gpu2", 0)}
    cards = {c["name"]: c for c in v["servers"]}
    assert [g["state"] for g in cards["gpu1"]["gpus"]] == ["free", "busy", "idle"]
    assert cards["gpu1"]["gpus"][1]["users"] == [{"user": "alice", "memory": 10 << 30}]
    stale = cards["gpu3"]
    assert stale["status"] == "stale" and stale["since"]
    assert "does not answer (connection refused)" in stale["error"]
    assert cards["gpu1"]["status"] == "ok" and cards["gpu1"]["history"]["cpu"] == [50.0]


async def test_filters(site):
    p = dashboard.Poller(site, TOKEN, poll_seconds=1, timeout=2)
    await p.poll()
    assert [c["name"] for c in p.view(server="gpu2")["servers"]] == ["gpu2"]
    mine = p.view(user="alice")["servers"]
    assert [c["name"] for c in mine] == ["gpu1"]
    assert [g["index"] for g in mine[0]["gpus"]] == [1]
    assert [c["name"] for c in mine[0]["containers"]] == ["alice--gpu1"]
    assert [(c["name"], [g["index"] for g in c["gpus"]])
            for c in p.view(state="free")["servers"]] == [("gpu1", [0]), ("gpu2", [0])]
    assert [c["name"] for c in p.view(state="stale")["servers"]] == ["gpu3"]
    assert [c["name"] for c in p.view(state="idle")["servers"]] == ["gpu1"]


async def test_the_public_view_has_no_process_ids_or_container_names(site):
    p = dashboard.Poller(site, TOKEN, poll_seconds=1, timeout=2)
    await p.poll()
    card = next(c for c in p.view(public=True)["servers"] if c["name"] == "gpu1")
    assert all(g["processes"] == [] for g in card["gpus"])
    assert card["gpus"][1]["users"] == [{"user": "alice", "memory": 10 << 30}]
    assert card["containers"] == [{"user": "alice", "state": "running", "cpu_percent": 99.0,
                                   "memory": 1 << 30, "prebuilt": None}]
    full = next(c for c in p.view()["servers"] if c["name"] == "gpu1")
    assert full["gpus"][1]["processes"][0]["pid"] == 100


async def test_a_wrong_token_or_none_is_refused_and_said(site):
    p = dashboard.Poller(site[:1], "w" * 43, poll_seconds=1, timeout=2)
    await p.poll()
    card = p.view()["servers"][0]
    assert card["status"] == "stale" and "answered 401" in card["error"]
    none = dashboard.Poller(site[:1], "", poll_seconds=1, unusable="the monitor token file "
                            "/etc/lxcgpu/monitor.token does not exist")
    await none.poll()
    assert "does not exist" in none.view()["servers"][0]["error"]


async def test_a_server_goes_stale_after_three_polls_and_keeps_its_data(site):
    now = [1000.0]
    p = dashboard.Poller(site[:1], TOKEN, poll_seconds=1, timeout=2, clock=lambda: now[0])
    await p.poll()
    p.servers["gpu1"].url = site[2][1]           # its agent goes away
    now[0] += 2
    await p.poll()
    card = p.view()["servers"][0]
    assert card["status"] == "ok"                 # one missed poll: not yet
    now[0] += 2
    await p.poll()
    card = p.view()["servers"][0]
    assert card["status"] == "stale" and card["since"] == "1970-01-01T00:16:40Z"
    assert len(card["gpus"]) == 3                 # its last data stays


async def test_the_public_mode_serves_page_and_json_without_login(site):
    """[monitor] public = true: a wall screen with no hub login sees the page
    and the JSON, without process ids or container names."""
    from tornado.httpclient import AsyncHTTPClient

    p = dashboard.Poller(site, TOKEN, poll_seconds=1, timeout=2)
    await p.poll()
    server, port = loadapi.serve(dashboard.make_app(p, "/services/monitor/", None, public=True),
                                 "127.0.0.1", 0)
    try:
        http = AsyncHTTPClient()
        base = f"http://127.0.0.1:{port}/services/monitor/"
        page = await http.fetch(base)
        assert page.code == 200 and b"GPU servers" in page.body
        assert b"Keys &amp; containers" not in page.body      # no hub menu on a wall
        data = json.loads((await http.fetch(base + "api/v1/load")).body)
        gpu1 = next(c for c in data["servers"] if c["name"] == "gpu1")
        assert gpu1["gpus"][1]["processes"] == [] and "name" not in gpu1["containers"][0]
        r = await http.fetch(base + "api/v1/load?state=asleep", raise_error=False)
        assert r.code == 400
        r = await http.fetch(base + "api/v1/load?token=x", raise_error=False)
        assert r.code == 400
    finally:
        server.stop()


async def test_each_servers_gpus_for_the_spawn_form_and_the_portal(site, tmp_path):
    """monitor.usage.GPUUsage (LXCSpawner.server_notes, the portal's cards):
    each server's GPUs with model, memory, free or in use and by whom, from
    its agent, and a one-line note."""
    from lxcspawner.settings import Settings
    from monitor.usage import GPUUsage

    token = tmp_path / "monitor.token"
    token.touch(mode=0o600)
    token.write_text(TOKEN + "\n")
    settings = Settings.from_dict({"monitor": {"token_file": str(token), "poll_seconds": 1},
                                   "servers": {name: {"agent": url} for name, url in site}},
                                  source=str(tmp_path / "site.toml"))
    usage = await GPUUsage()(settings)
    assert {k: v["note"] for k, v in usage.items()} == {
        "gpu1": "1 of 3 GPUs free: NVIDIA A100", "gpu2": "1 of 1 GPUs free: NVIDIA A100",
        "gpu3": "not answering"}
    assert [(g["index"], g["memory"], g["state"], g["users"], g["text"])
            for g in usage["gpu1"]["gpus"]] == [
        (0, "80 GB", "free", [], "free"),
        (1, "80 GB", "busy", ["alice"], "in use by alice"),
        (2, "80 GB", "idle", ["bob"], "in use by bob (idle)")]
    assert usage["gpu3"]["status"] == "stale" and usage["gpu3"]["gpus"] == []
    no_token = Settings.from_dict({"monitor": {"token_file": str(tmp_path / "none")},
                                   "servers": {name: {"agent": url} for name, url in site}},
                                  source=str(tmp_path / "other.toml"))
    assert await GPUUsage()(no_token) == {}
