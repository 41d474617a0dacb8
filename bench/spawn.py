#!/usr/bin/env python3
"""Spawn times through a real JupyterHub: hot, warm, the raw floor, a burst.

    .venv/bin/python bench/spawn.py [-n 10] [--concurrent 10] [--keep]
    .venv/bin/python bench/spawn.py --remote [-n 5]   # this machine vs a server elsewhere
    .venv/bin/python bench/spawn.py --driver-sync [-n 5]   # the NVIDIA driver check and sync
    .venv/bin/python bench/spawn.py --boot [-n 5]          # a warm start, step by step
    .venv/bin/python bench/spawn.py --versus-docker [-n 5] # side by side with DockerSpawner

Run as root with LXD up and the template image built (``setup/quickstart``
or ``setup/test``).  Where setup/quickstart's node agent runs, pause it
first (``setup/quickstart agent-stop && .venv/bin/lxcgpu-node
--remove-rules``; ``setup/quickstart agent-start`` after): its host guard
opens only the quickstart hub's API port to containers, not the bench hub's.  It starts its own JupyterHub with the shipped config
and its proxy (the way ``tests/fixtures/hub.py`` does, reusing its ``Hub``),
and the node agent of its site (``lxcgpu-node``, as every GPU server runs
one, with chains of its own: LXCGPUSPAWN-*; its CPU time is printed at the
end), with a temporary store and a unique container prefix; users are made
through the hub's API with a service token, so nobody logs in and no LDAP
is needed.  Measured, each from ``POST /hub/api/users/U/server`` until
``GET /user/U/lab`` answers 200 through the proxy:

- hot spawn: the container runs, Jupyter is stopped;
- warm spawn: the container is stopped too;
- the floor, no hub: ``jupyter.start`` of the same unit with the same
  environment and command as the spawner's, until the server answers HTTP
  at its own address (hot), after LXD's start and the first address (warm);
- a burst of K first spawns of K new users at once (new containers): how
  many succeed, the hub API's latency meanwhile, the hub's memory after it
  and one Jupyter server's memory inside its container.

Containers are named ``<prefix>-<user>--node1``, tagged
``user.lxcgpu-bench.run=<prefix>`` and deleted at the end, also on failure
(unless ``--keep``).  Their id blocks are 15050-15079, the benches' own.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import datetime
import json
import math
import os
import platform
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "setup")]

from lxcspawner import jupyter, naming, pool  # noqa: E402
from lxcspawner.container import IDMAP_BLOCK, IDMAP_USER_FIRST  # noqa: E402
from lxcspawner.lxd import LXD, LXDError  # noqa: E402
from lxcspawner.settings import Settings  # noqa: E402
from portmap import proc_stat  # noqa: E402  (bench/: a process's CPU time)
from tests.fixtures.hub import VENV_BIN, Hub, launch_hub  # noqa: E402
from tests.fixtures.netns import Agent  # noqa: E402

BENCH_KEY = "user.lxcgpu-bench.run"
SERVICE = "lxcgpu-bench"
SERVER = "node1"
# Id blocks 15050-15079 are the benches' (bench/container_lifecycle.py uses 15050-15059 too: run one bench at a time).
BLOCK_FIRST, BLOCK_LAST = 15050, 15079
# Ports of their own, apart from the defaults and from the tests' ranges.
SSH_PORTS, FORWARD_PORTS = "27900-27999", "11700-11799"
SPAWN_TIMEOUT = 300  # seconds for one spawn to reach JupyterLab
POLL = 0.02  # seconds between polls of a server that should be up (resolution)
HAMMER_EVERY = 0.05  # seconds between hub API requests during the burst

TARGETS = {"hot": 3.0, "warm": 6.0, "overhead": 1.3, "api_p99_ms": 200, "hub_rss_mb": 300}

LXCGPU_TOML = f"""\
[store]
url = "sqlite:///{{store}}"
# Ids the hub gives on its own (prebuilt containers, users not reserved) come
# from the benches' blocks too, never from real users' (block 0 up).
first_id_block = {BLOCK_FIRST}
[ports]
ssh = "{SSH_PORTS}"
forward = "{FORWARD_PORTS}"
[server]
name = "{SERVER}"
[containers]
prefix = "{{prefix}}"
"""

# The chains of the bench's node agent (LXCGPUSPAWN-DNAT, ...), apart from
# setup/quickstart's LXCGPU-* and bench/portmap.py's LXCGPUBENCH-*.
AGENT_CHAINS = "LXCGPUSPAWN"

LOG_LINE = re.compile(r"^\[\w (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) JupyterHub \S+\] (.*)$")


# ------------------------------------------------------------------ figures

def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p95 of 10 values is the largest)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def med(values: list[float]) -> float:
    return statistics.median(values)


def mark(ok: bool) -> str:
    return "ok" if ok else "MISSED"


# ------------------------------------------------------------------ the hub

def prepare_hub(root: Path, prefix: str, *, site_extra: str = "",
                env: dict[str, str] | None = None) -> Hub:
    """The shipped hub config with a bench site file: one GPU server (this
    machine), containers tagged with ``prefix``, an admin service token; not
    started yet.  ``site_extra`` is appended to the site file and ``env`` to
    the hub's environment (bench/versus_docker.py swaps the spawner so)."""
    hub = launch_hub(
        root, LXCGPU_TOML.format(store=root / "lxcgpu.sqlite", prefix=prefix),
        ldap_settings="# No LDAP: the bench makes users through the API and never logs in.",
        admin_group="cn=gpu-admins,ou=groups,dc=bench,dc=invalid",
        tag_key=BENCH_KEY, tag=prefix, service=SERVICE)
    if site_extra:
        with open(root / "jupyterhub_site.py", "a") as site:
            site.write("\n" + site_extra)
    hub.env.update(env or {})
    return hub


def start_hub(root: Path, prefix: str) -> Hub:
    """:func:`prepare_hub`, started."""
    hub = prepare_hub(root, prefix)
    hub.start()
    return hub


def reserve_users(config: Path, users: list[str]) -> None:
    """Give the users their SSH ports and the benches' id blocks in the
    hub's store before the hub first sees them, fixed as `lxcgpu-admin user
    add` fixes them (so none takes over a prebuilt container instead)."""
    store = Settings.load(config).open_store(
        idmap_first=IDMAP_USER_FIRST + BLOCK_FIRST * IDMAP_BLOCK,
        idmap_last=IDMAP_USER_FIRST + BLOCK_LAST * IDMAP_BLOCK)
    try:
        for user in users:
            store.ensure_user(user, actor="bench")
            store.mark_idmap_used(user)
    finally:
        store.close()


def hub_times(hub: Hub, offset: int, user: str) -> dict[str, float]:
    """Wall-clock times from the hub's log since ``offset``: when the
    spawner's start() returned and when the hub saw the server answer."""
    found = {}
    for line in hub.log_text()[offset:].splitlines():
        m = LOG_LINE.match(line)
        if not m:
            continue
        t = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f").timestamp()
        if m.group(2).startswith(f"{user}: Jupyter in "):
            found.setdefault("started", t)
        elif m.group(2).startswith(f"User {user} took "):
            found.setdefault("up", t)
    return found


def wait_lab(hub: Hub, user: str, timeout: float = SPAWN_TIMEOUT, server: str = "") -> float:
    """Poll ``/user/U/[SERVER/]lab`` through the proxy until JupyterLab
    answers 200; the perf_counter then."""
    url = hub.user_url(user, server) + "lab"
    headers = {"Authorization": f"token {hub.token}"}
    deadline = time.monotonic() + timeout
    with hub.session() as s:
        while True:
            try:
                r = s.get(url, headers=headers, allow_redirects=False, timeout=10)
                if r.status_code == 200:
                    t = time.perf_counter()
                    if "jupyter-config-data" not in r.text:
                        raise RuntimeError(f"{url} answered 200 but not with JupyterLab")
                    return t
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} not ready in {timeout}s\n{hub.log_tail()}")
            time.sleep(POLL)


def server_path(user: str, server: str = "") -> str:
    """The hub API path of a user's default or named server."""
    return f"/users/{user}/servers/{server}" if server else f"/users/{user}/server"


def follow_progress(hub: Hub, user: str, server: str = "") -> dict:
    """Read the spawn's progress stream, as the spawn page does, until the
    server is ready or failed; the last event."""
    last = {}
    with hub.api("GET", f"{server_path(user, server)}/progress", stream=True,
                 timeout=SPAWN_TIMEOUT) as events:
        for line in events.iter_lines(decode_unicode=True):
            if line.startswith("data:"):
                last = json.loads(line[5:])
                if last.get("ready") or last.get("failed"):
                    break
    return last


def spawn_until_lab(hub: Hub, user: str, server: str = "") -> dict[str, float]:
    """Start the user's server and wait for JupyterLab: total seconds and
    its parts (spawner.start, then until the hub saw the server, then until
    /lab answered through the proxy).

    The hub answers the POST when the server is ready and routed (201), or
    after its slow_spawn_timeout (202; then the progress stream says when):
    polling /user/U/lab meanwhile would load the hub that is being measured.
    """
    offset = len(hub.log_text())
    w0, t0 = time.time(), time.perf_counter()
    r = hub.api("POST", server_path(user, server))
    if r.status_code not in (201, 202):
        raise RuntimeError(f"spawn of {user}/{server}: {r.status_code} {r.text}")
    if r.status_code == 202 and not (last := follow_progress(hub, user, server)).get("ready"):
        raise RuntimeError(f"spawn of {user}/{server} failed: {last}\n{hub.log_tail()}")
    total = wait_lab(hub, user, server=server) - t0
    marks = hub_times(hub, offset, user)
    out = {"total": total}
    if "started" in marks and "up" in marks:
        out.update(start=marks["started"] - w0, up=marks["up"] - marks["started"],
                   proxy=total - (marks["up"] - w0))
    return out


def stop_server(hub: Hub, user: str, timeout: float = 120, server: str = "") -> None:
    r = hub.api("DELETE", server_path(user, server))
    if r.status_code not in (202, 204):
        raise RuntimeError(f"stop of {user}/{server}: {r.status_code} {r.text}")
    deadline = time.monotonic() + timeout
    while server in hub.api("GET", f"/users/{user}").json().get("servers", {}):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{user}'s server did not stop in {timeout}s")
        time.sleep(0.1)


class NodeAgent:
    """The node agent of the bench's site on this machine, as every GPU
    server runs one: it follows LXD's events (mapping the SSH ports, letting
    containers reach only the hub's API port) and reads the containers'
    load, so its cost is in the spawns measured.  Chains of its own
    (AGENT_CHAINS), removed by stop(); ``cpu``: its CPU seconds until then."""

    def __init__(self, root: Path):
        self.agent = Agent(AGENT_CHAINS, root / "node-agent.log", config=root / "lxcgpu.toml",
                           extra=("--server", SERVER))
        self.cpu: float | None = None

    def start(self) -> None:
        self.agent.start()

    def stop(self) -> None:
        """Its CPU time read, the agent stopped and its chains removed; an
        agent that ended before is an error (its log says why)."""
        proc = self.agent.proc
        ended = proc is not None and proc.poll() is not None
        if proc is not None and not ended:
            self.cpu = proc_stat(proc.pid)[1]
        self.agent.stop()
        removed = subprocess.run(self.agent.argv("--remove-rules"), cwd=REPO, text=True,
                                 capture_output=True, timeout=60)
        if removed.returncode != 0:
            raise RuntimeError(f"the node agent's chains {AGENT_CHAINS}-* were not removed: "
                               f"{removed.stderr.strip()[-300:]}")
        if ended:
            raise RuntimeError(f"the node agent ended during the run (exit {proc.returncode}):"
                               f"\n{self.said()}")

    def said(self) -> str:
        """The end of its log."""
        log = self.agent.log
        return log.read_text()[-3000:] if log.exists() else ""

    def figure(self) -> str:
        cpu = "its CPU time unknown" if self.cpu is None else f"{self.cpu:.2f} s of CPU"
        return f"the node agent (chains {AGENT_CHAINS}-*): {cpu} in the run"


# ------------------------------------------------------------------ the floor

def parse_env_file(text: str) -> dict[str, str]:
    """The inverse of :func:`lxcspawner.jupyter.env_file`."""
    env = {}
    for line in text.splitlines():
        key, _, value = line.partition("=")
        env[key] = re.sub(r"\\(.)", r"\1", value[1:-1])
    return env


async def spawner_unit(lxd: LXD, name: str, unit: str) -> tuple[list[str], dict[str, str]]:
    """The command line and environment the spawner gave a running unit."""
    res = await lxd.execute(name, ["systemctl", "show", "-p", "MainPID", "--value", unit])
    pid = int(res.stdout.strip() or 0)
    if not pid:
        raise RuntimeError(f"{unit} does not run in {name}")
    # /proc files read as empty through LXD's file API: cat them.
    argv = (await lxd.execute(name, ["cat", f"/proc/{pid}/cmdline"])).stdout
    env = await lxd.get_file(name, f"{jupyter.ENV_DIR}/{unit}.env")
    if not argv or env is None:
        raise RuntimeError(f"cannot read {unit}'s command line and environment in {name}")
    return argv.rstrip("\0").split("\0"), parse_env_file(env.decode())


def wait_http(url: str, timeout: float = 120) -> float:
    """Poll until anything answers HTTP at ``url``; the perf_counter then."""
    deadline = time.monotonic() + timeout
    with requests.Session() as s:
        s.trust_env = False
        while True:
            try:
                s.get(url, allow_redirects=False, timeout=10)
                return time.perf_counter()
            except requests.RequestException:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"nothing answered at {url} in {timeout}s") from None
                time.sleep(POLL)


async def floor(lxd: LXD, name: str, user: str, login: str, argv: list[str],
                env: dict[str, str], warm: bool) -> dict[str, float]:
    """Jupyter started as the spawner starts it, without the hub: seconds
    for LXD's start and the address (warm), jupyter.start, and until the
    server answers at its own address."""
    out = {}
    t0 = time.perf_counter()
    if warm:
        await lxd.start(name)
        await lxd.wait_for_address(name)
    t1 = time.perf_counter()
    await jupyter.start(lxd, name, unit=jupyter.UNIT, login=login, argv=argv, env=env,
                        booted_now=warm)
    t2 = time.perf_counter()
    addr = (await lxd.state(name)).ipv4
    t3 = await asyncio.to_thread(wait_http, f"http://{addr}:8888/user/{user}/api")
    await jupyter.stop(lxd, name, jupyter.UNIT)
    out.update(boot=t1 - t0, start=t2 - t1, listen=t3 - t2, total=t3 - t0)
    return out


async def python_imports(lxd: LXD, name: str) -> float:
    """Seconds the server's Python imports take by themselves in the container."""
    code = ("import time; t = time.perf_counter(); import jupyter_server.serverapp, "
            "jupyterlab.labapp, jupyterhub.singleuser; print(time.perf_counter() - t)")
    res = await lxd.execute(name, ["/opt/jupyter/bin/python3", "-c", code])
    return float(res.check(["python3"]).stdout)


# ------------------------------------------------------------------ the burst

class Hammer(threading.Thread):
    """GET /hub/api/users/<user> every 50 ms through the proxy; latencies."""

    def __init__(self, hub: Hub, user: str):
        super().__init__(daemon=True)
        self.hub, self.user = hub, user
        self.latencies: list[float] = []
        self.errors = 0
        self.done = threading.Event()

    def run(self):
        url = f"{self.hub.api_url}/users/{self.user}"
        headers = {"Authorization": f"token {self.hub.token}"}
        with self.hub.session() as s:
            next_at = time.perf_counter()
            while not self.done.is_set():
                t = time.perf_counter()
                try:
                    ok = s.get(url, headers=headers, timeout=30).status_code == 200
                except requests.RequestException:
                    ok = False
                if ok:
                    self.latencies.append(time.perf_counter() - t)
                else:
                    self.errors += 1
                next_at += HAMMER_EVERY
                time.sleep(max(0.0, next_at - time.perf_counter()))


def first_spawn(hub: Hub, user: str) -> tuple[bool, float, str]:
    """Start a new user's server and follow its progress; (ready, seconds
    until /lab answered, the last progress message)."""
    t0 = time.perf_counter()
    r = hub.api("POST", f"/users/{user}/server")
    if r.status_code not in (201, 202):
        return False, time.perf_counter() - t0, f"{r.status_code} {r.text[:200]}"
    last = follow_progress(hub, user)
    if not last.get("ready"):
        return False, time.perf_counter() - t0, last.get("message", "no events")
    return True, wait_lab(hub, user) - t0, last.get("message", "")


def warnings_about(hub: Hub, offset: int, user: str, limit: int = 3) -> list[str]:
    """The hub's warnings and errors about ``user`` since ``offset`` (first lines)."""
    return [line[:300] for line in hub.log_text()[offset:].splitlines()
            if line.startswith(("[W", "[E")) and user in line][:limit]


async def burst(hub: Hub, users: list[str], probe: str) -> dict:
    idle = Hammer(hub, probe)
    idle.start()
    await asyncio.sleep(3)
    idle.done.set()
    idle.join()
    offset = len(hub.log_text())
    hammer = Hammer(hub, probe)
    hammer.start()
    t0 = time.perf_counter()
    loop = asyncio.get_running_loop()
    # A thread per user: the default executor has only cores + 4 threads.
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=len(users))
    try:
        results = await asyncio.gather(*(loop.run_in_executor(pool, first_spawn, hub, u)
                                         for u in users))
    finally:
        pool.shutdown(wait=False)
        hammer.done.set()
        hammer.join()
    wall = time.perf_counter() - t0
    return {"results": dict(zip(users, results)), "wall": wall, "idle": idle, "busy": hammer,
            "log_offset": offset}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def jupyter_memory(lxd: LXD, name: str) -> dict[str, float]:
    """The Jupyter unit's memory inside its container, MiB: the unit's
    cgroup (MemoryCurrent, if systemd accounts it there) and the server
    process's resident set."""
    res = await lxd.execute(name, ["systemctl", "show", "-p", "MainPID", "-p", "MemoryCurrent",
                                   jupyter.UNIT])
    props = dict(line.split("=", 1) for line in res.stdout.split())
    out = {}
    if props.get("MemoryCurrent", "").isdigit() and int(props["MemoryCurrent"]) < 2**62:
        out["cgroup"] = int(props["MemoryCurrent"]) / 2**20
    status = await lxd.execute(name, ["cat", f"/proc/{props.get('MainPID', '0')}/status"])
    for line in status.stdout.splitlines():
        if line.startswith("VmRSS:"):
            out["rss"] = int(line.split()[1]) / 1024
    return out


# ------------------------------------------------------------------ main

async def delete_containers(lxd: LXD, prefix: str) -> int:
    """Delete this run's containers (tagged with its prefix) and its hubs'
    prebuilt ones (named after its prefix); how many."""
    gone = 0
    for inst in await lxd.list_instances():
        cfg = inst.get("config") or {}
        if cfg.get(BENCH_KEY) == prefix or (
                cfg.get(pool.POOL_KEY) and inst["name"].startswith(f"{prefix}-pool--")):
            await lxd.delete_instance(inst["name"])
            gone += 1
    return gone


def report(title: str, rows: list[dict[str, float]], target: float | None = None) -> None:
    totals = [r["total"] for r in rows]
    line = f"{title:<28} p50 {med(totals):6.2f}  p95 {pct(totals, 95):6.2f}  max {max(totals):6.2f}"
    if target is not None:
        line += f"   target p50 <= {target:g} s: {mark(med(totals) <= target)}"
    print(line)


def parts(rows: list[dict[str, float]], keys: list[tuple[str, str]]) -> None:
    for key, what in keys:
        values = [r[key] for r in rows if key in r]
        if values:
            print(f"{'':>4}{what:<52} p50 {med(values):6.2f}  max {max(values):6.2f}")


async def run(args, hub: Hub, lxd: LXD, prefix: str, root: Path) -> None:
    user = "benchu"
    users = [f"bench{i}" for i in range(args.concurrent)]
    reserve_users(root / "lxcgpu.toml", [user, *users])
    r = hub.api("POST", "/users", json={"usernames": [user, *users]})
    if r.status_code != 201:
        raise RuntimeError(f"creating users: {r.status_code} {r.text}")
    name = naming.instance_name(user, SERVER, prefix)
    login = naming.posix_name(user)

    print("\n## one user, N times   seconds from POST .../server to /user/U/lab = 200")
    cold = await asyncio.to_thread(spawn_until_lab, hub, user)
    print(f"{'cold (new container)':<28} {cold['total']:6.2f}")
    argv, env = await spawner_unit(lxd, name, jupyter.UNIT)
    await asyncio.to_thread(stop_server, hub, user)

    hot = []
    for _ in range(args.n):
        hot.append(await asyncio.to_thread(spawn_until_lab, hub, user))
        await asyncio.to_thread(stop_server, hub, user)
    report("hot (container running)", hot, TARGETS["hot"])
    parts(hot, [("start", "spawner.start() (checks, provision, jupyter.start)"),
                ("up", "then until the hub saw Jupyter answer (wait_up)"),
                ("proxy", "then until /lab answered through the proxy")])

    warm = []
    for _ in range(args.n):
        await lxd.stop(name)
        warm.append(await asyncio.to_thread(spawn_until_lab, hub, user))
        await asyncio.to_thread(stop_server, hub, user)
    report("warm (container stopped)", warm, TARGETS["warm"])
    parts(warm, [("start", "spawner.start() (LXD start, address, provision, ...)"),
                 ("up", "then until the hub saw Jupyter answer (wait_up)"),
                 ("proxy", "then until /lab answered through the proxy")])

    # The floor runs the spawner's own command and environment, with a
    # valid token of the user's (the server's token died with its stop).
    token = hub.api("POST", f"/users/{user}/tokens",
                    json={"note": "bench floor", "expires_in": 3600}).json()["token"]
    env.update(JUPYTERHUB_API_TOKEN=token, JPY_API_TOKEN=token)
    floor_hot, floor_warm = [], []
    for _ in range(args.n):
        floor_hot.append(await floor(lxd, name, user, login, argv, env, warm=False))
    for _ in range(args.n):
        await lxd.stop(name)
        floor_warm.append(await floor(lxd, name, user, login, argv, env, warm=True))
    print("\n## the floor: no hub, no proxy   seconds until Jupyter answers at its address")
    report("floor hot", floor_hot)
    parts(floor_hot, [("start", "jupyter.start (env file, systemctl, systemd-run)"),
                      ("listen", "then until jupyterhub-singleuser answered HTTP")])
    report("floor warm", floor_warm)
    parts(floor_warm, [("boot", "LXD start + first IPv4 address"),
                       ("start", "jupyter.start"),
                       ("listen", "then until jupyterhub-singleuser answered HTTP")])
    imports = [await python_imports(lxd, name) for _ in range(3)]
    print(f"{'':>4}{'of which its Python imports alone':<52} p50 {med(imports):6.2f}")
    lag_hot = med([r["up"] for r in hot if "up" in r]) - med([r["listen"] for r in floor_hot])
    lag_warm = med([r["up"] for r in warm if "up" in r]) - med([r["listen"] for r in floor_warm])
    print(f"hub's wait_up lag (its p50 up - the floor's p50 listen): hot {lag_hot:.2f} s, "
          f"warm {lag_warm:.2f} s")
    ratio_hot = med([r["total"] for r in hot]) / med([r["total"] for r in floor_hot])
    ratio_warm = med([r["total"] for r in warm]) / med([r["total"] for r in floor_warm])
    print(f"spawner overhead (p50 spawn / p50 floor): hot {ratio_hot:.2f}x, warm "
          f"{ratio_warm:.2f}x   target <= {TARGETS['overhead']}x: "
          f"{mark(ratio_hot <= TARGETS['overhead'])} / {mark(ratio_warm <= TARGETS['overhead'])}")

    if not users:
        return
    print(f"\n## burst: {len(users)} new users spawn at once (new containers)")
    b = await burst(hub, users, user)
    ok = [t for ready, t, _ in b["results"].values() if ready]
    print(f"servers ready: {len(ok)} of {len(users)}; the last spawn ended after "
          f"{b['wall']:.1f} s")
    for u, (ready, t, msg) in b["results"].items():
        if not ready:
            print(f"    {u} failed after {t:.1f} s: {msg}")
            for line in warnings_about(hub, b["log_offset"], u):
                print(f"        {line}")
    if ok:
        print(f"    seconds to /lab per user: p50 {med(ok):.1f}  max {max(ok):.1f}")
    for label, h in (("idle, before", b["idle"]), ("during the burst", b["busy"])):
        lat = [x * 1000 for x in h.latencies]
        line = (f"hub API GET /users/U, {label}: {len(lat)} requests, {h.errors} failed, "
                f"p50 {med(lat):.0f} ms  p99 {pct(lat, 99):.0f} ms  max {max(lat):.0f} ms")
        if h is b["busy"]:
            line += f"   target p99 <= {TARGETS['api_p99_ms']} ms: " \
                    f"{mark(pct(lat, 99) <= TARGETS['api_p99_ms'])}"
        print(line)
    hub_rss = rss_mb(hub.proc.pid)
    proxy_pid = int((hub.state_dir / "jupyterhub-proxy.pid").read_text())
    print(f"hub resident memory after the burst: {hub_rss:.0f} MiB   target <= "
          f"{TARGETS['hub_rss_mb']} MB: {mark(hub_rss * 1.048576 <= TARGETS['hub_rss_mb'])}"
          f"   (proxy: {rss_mb(proxy_pid):.0f} MiB)")
    ready_users = [u for u, (ready, _, _) in b["results"].items() if ready]
    if ready_users:
        mem = await jupyter_memory(lxd, naming.instance_name(ready_users[0], SERVER, prefix))
        cg = f"unit cgroup {mem['cgroup']:.0f} MiB, " if "cgroup" in mem else ""
        print(f"one Jupyter server in its container (no kernel): {cg}"
              f"server process RSS {mem.get('rss', float('nan')):.0f} MiB")


REMOTE_TOML = """\
[store]
url = "sqlite:///{store}"
[ports]
ssh = "{ssh}"
forward = "{forward}"
jupyter = "{jupyter}"
[hub]
url = "https://{hub_ip}:{port}"
address = "{hub_ip}"
[servers.node1]
{node2}
[containers]
prefix = "{prefix}"
"""
JUPYTER_PORTS = "20700-20799"


async def run_remote(args, prefix: str, root: Path) -> None:
    """Hot and warm spawns of one user on this machine (node1) and on a
    second LXD server reached over HTTPS (node2: its own network namespace,
    its own node agent; Jupyter through the user's Jupyter port there and
    the hub API through the proxy over HTTPS), in alternating rounds."""
    from tests.fixtures.hub import free_port
    from tests.fixtures.lxd2 import NamespacedAgent, running_second_lxd

    user = "benchr"
    with running_second_lxd(prefix) as srv:
        port = free_port("0.0.0.0")
        toml = REMOTE_TOML.format(store=root / "lxcgpu.sqlite", ssh=SSH_PORTS,
                                  forward=FORWARD_PORTS, jupyter=JUPYTER_PORTS,
                                  hub_ip=srv.host_ip, port=port, node2=srv.site_table("node2"),
                                  prefix=prefix)
        hub = await asyncio.to_thread(
            launch_hub, root, toml,
            ldap_settings="# No LDAP: the bench makes users through the API.",
            admin_group="cn=gpu-admins,ou=groups,dc=bench,dc=invalid", tag_key=BENCH_KEY,
            tag=prefix, service=SERVICE, bind_host="0.0.0.0", public_port=port)
        agent = NamespacedAgent(srv, root / "lxcgpu.toml", root / "node2-agent.log")
        settings = Settings.load(root / "lxcgpu.toml")
        lxds = {name: settings.open_lxd(name, timeout=300, retries=1)
                for name in ("node1", "node2")}
        try:
            agent.start()
            await asyncio.to_thread(hub.start)
            reserve_users(root / "lxcgpu.toml", [user])
            hub.api("POST", f"/users/{user}")
            servers = ("node1", "node2")
            print("\n## this machine (node1) and a server elsewhere (node2: LXD over HTTPS, "
                  "Jupyter through the\n## user's Jupyter port, the hub API over HTTPS), one "
                  "user, alternating rounds")
            for server in servers:
                cold = await asyncio.to_thread(spawn_until_lab, hub, user, server)
                print(f"{'cold (new container) ' + server:<28} {cold['total']:6.2f}")
                await asyncio.to_thread(stop_server, hub, user, server=server)
            rounds: dict[str, dict[str, list]] = {k: {s: [] for s in servers}
                                                  for k in ("hot", "warm")}
            for kind in ("hot", "warm"):
                for _ in range(args.n):
                    for server in servers:
                        if kind == "warm":
                            await lxds[server].stop(naming.instance_name(user, server, prefix))
                        rounds[kind][server].append(
                            await asyncio.to_thread(spawn_until_lab, hub, user, server))
                        await asyncio.to_thread(stop_server, hub, user, server=server)
            for kind in ("hot", "warm"):
                for server in servers:
                    report(f"{kind} {server}", rounds[kind][server])
                local = med([r["total"] for r in rounds[kind]["node1"]])
                remote = med([r["total"] for r in rounds[kind]["node2"]])
                print(f"{'':>4}{kind}: node2 / node1 (p50) = {remote / local:.2f}x "
                      f"({remote - local:+.2f} s)")
        except BaseException:
            print(f"--- hub log (tail) ---\n{hub.log_tail()}\n--- node2 agent ---\n"
                  f"{agent.log.read_text()[-3000:] if agent.log.exists() else ''}",
                  file=sys.stderr)
            raise
        finally:
            await asyncio.to_thread(hub.stop)
            agent.stop()
            shutil.rmtree(hub.proxy_dir, ignore_errors=True)
            for server, lxd in lxds.items():
                if not args.keep:
                    try:
                        await delete_containers(lxd, prefix)
                    except LXDError as e:
                        print(f"(could not delete {server}'s bench containers: {e})")
                lxd.close()


async def run_boot(args, lxd: LXD, prefix: str) -> None:
    """Where a warm start's time goes, step by step, on a container of the
    template (issue 14's "faster boot"): LXD's start, the first address
    (DHCP), systemd's own account (``systemd-analyze``: the boot, the
    critical chain, the slowest units) and Jupyter's Python imports."""
    name = f"{prefix}-boot"
    await lxd.create_instance(name, image_alias=Settings().image, profiles=["lxcgpu"],
                              config={BENCH_KEY: prefix})
    rows = []
    try:
        await lxd.start(name)                   # the first start shifts the files: not counted
        await lxd.wait_for_address(name, timeout=120)
        await lxd.execute(name, ["systemctl", "is-system-running", "--wait"], timeout=120)
        await lxd.stop(name, timeout=60)
        for _ in range(args.n):
            t0 = time.perf_counter()
            await lxd.start(name)
            t1 = time.perf_counter()
            await lxd.wait_for_address(name, timeout=120)
            t2 = time.perf_counter()
            await lxd.execute(name, ["systemctl", "is-system-running", "--wait"], timeout=120)
            t3 = time.perf_counter()
            rows.append({"lxd start": t1 - t0, "address (DHCP)": t2 - t1,
                         "systemd settled": t3 - t2, "total": t3 - t0})
            analyze = (await lxd.execute(name, ["systemd-analyze"])).stdout.strip()
            await lxd.stop(name, timeout=60)
        await lxd.start(name)
        await lxd.wait_for_address(name, timeout=120)
        await lxd.execute(name, ["systemctl", "is-system-running", "--wait"], timeout=120)
        chain = (await lxd.execute(name, ["systemd-analyze", "critical-chain",
                                          "--no-pager"])).stdout.strip().splitlines()
        blame = (await lxd.execute(name, ["systemd-analyze", "blame", "--no-pager"])
                 ).stdout.strip().splitlines()
        imports = await python_imports(lxd, name)
        print(f"\n## a warm start, step by step (p50 of {args.n})")
        for key in rows[0]:
            print(f"{key:<44} {med([r[key] for r in rows]):7.3f} s")
        print(f"{'Jupyter server Python imports':<44} {imports:7.3f} s")
        print(f"\nsystemd-analyze (the last start): {analyze}")
        print("critical chain:\n  " + "\n  ".join(chain[:14]))
        print("slowest units:\n  " + "\n  ".join(blame[:12]))
    finally:
        await lxd.delete_instance(name)


async def run_driver_sync(args, lxd: LXD, prefix: str, root: Path) -> None:
    """driver_sync "installer" on a real container (no GPU here: the host's
    version is given, the installer is tests/fixtures/fake_nvidia.py's,
    padded to a real one's size): the check at a start when the versions
    match, against a warm start of the same container; then a sync."""
    from lxcspawner import driversync
    from monitor import loadapi
    from monitor.collector import prometheus
    from tests.fixtures.fake_nvidia import write_installer

    host, old, libdir = "550.54.14", "535.104.05", "/usr/lib/x86_64-linux-gnu"
    name = f"{prefix}-driver"
    await lxd.create_instance(name, image_alias=Settings().image, profiles=["lxcgpu"],
                              config={BENCH_KEY: prefix})

    async def link(version: str) -> None:
        for lib in ("libcuda", "libnvidia-ml"):
            (await lxd.execute(name, ["ln", "-sf", f"{lib}.so.{version}",
                                      f"{libdir}/{lib}.so.1"])).check(["ln"])
    try:
        starts = []
        for _ in range(args.n):
            t = time.perf_counter()
            await lxd.start(name)
            await lxd.wait_for_address(name, timeout=120)
            starts.append(time.perf_counter() - t)
            await lxd.stop(name, timeout=60)
        await lxd.start(name)
        await lxd.wait_for_address(name, timeout=120)
        await link(host)
        checks = []
        for _ in range(max(20, args.n)):
            t = time.perf_counter()
            assert await driversync.sync(lxd, name, host, None) == "matched"
            checks.append(time.perf_counter() - t)
        # The host's version as a spawn reads it: from the node agent's load
        # API (monitor.loadapi, on loopback, serving a sample that says it).
        token = secrets.token_urlsafe(32)
        token_file = root / "monitor.token"
        token_file.touch(mode=0o600)
        token_file.write_text(token + "\n")
        sample = {"node": "bench", "gpus": {"status": "ok", "driver": host, "devices": []}}
        agent, port = loadapi.serve(loadapi.make_app("bench", token, lambda: sample,
                                                     prometheus), "127.0.0.1", 0)
        settings = Settings.from_dict(
            {"monitor": {"token_file": str(token_file)},
             "servers": {"bench": {"agent": f"http://127.0.0.1:{port}"}}},
            source=str(root / "bench.toml"))
        reads = []
        try:
            for _ in range(max(20, args.n)):
                t = time.perf_counter()
                assert await driversync.host_version(lxd, settings, "bench") == host
                reads.append(time.perf_counter() - t)
        finally:
            agent.stop()
        total = med(reads) + med(checks)
        print("\n## driver_sync installer: the check at a start when the versions match")
        print(f"{'the host version from the node agent:':<44} p50 {med(reads) * 1000:7.1f} ms  "
              f"p95 {pct(reads, 95) * 1000:7.1f} ms")
        print(f"{'the container version (links through LXD):':<44} p50 "
              f"{med(checks) * 1000:7.1f} ms  p95 {pct(checks, 95) * 1000:7.1f} ms")
        print(f"{'the check, both (sum of the p50s):':<44}     {total * 1000:7.1f} ms  "
              "(target < 50 ms)")
        print(f"{'a warm start of the same container':<44} p50 {med(starts):7.3f} s  "
              f"(the check adds {total / med(starts) * 100:.1f} %)")
        installer = write_installer(root, host, pad_bytes=args.installer_mib << 20)
        syncs = []
        for _ in range(3):
            await link(old)
            t = time.perf_counter()
            assert await driversync.sync(lxd, name, host, str(root)) == "installed"
            syncs.append(time.perf_counter() - t)
        print(f"{'a sync, fake installer of ' + str(args.installer_mib) + ' MiB':<44} p50 "
              f"{med(syncs):7.3f} s  (pushed at "
              f"{installer.stat().st_size / 2**20 / med(syncs):.0f} MiB/s or more; a real "
              "installer's own run adds its minute or two)")
    finally:
        await lxd.delete_instance(name)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=10, help="hot and warm spawns each (default 10)")
    ap.add_argument("--concurrent", type=int, default=10,
                    help="new users spawning at once in the burst (default 10; "
                         "0 skips it; spawns beyond the spawner's lxd_concurrency queue)")
    ap.add_argument("--keep", action="store_true", help="keep the containers")
    ap.add_argument("--remote", action="store_true",
                    help="instead: hot and warm spawns on this machine and on a second LXD "
                         "server over HTTPS (made for the run, as the tests make it), side "
                         "by side")
    ap.add_argument("--boot", action="store_true",
                    help="instead: where a warm start's time goes (LXD, DHCP, systemd's "
                         "units, Python imports), on a container of the template")
    ap.add_argument("--driver-sync", action="store_true",
                    help="instead: the NVIDIA driver check at a start with matching versions "
                         "against a warm start, and a sync with a fake installer")
    ap.add_argument("--installer-mib", type=int, default=350,
                    help="--driver-sync: the fake installer's size (default %(default)s MiB, "
                         "as NVIDIA's)")
    ap.add_argument("--versus-docker", action="store_true",
                    help="instead: lxcgpu's spawns side by side with DockerSpawner's "
                         "(bench/versus_docker.py; -n rounds, default there 5)")
    args = ap.parse_args()
    if args.versus_docker:
        # Its own run from start to end (daemons, two hubs, signals, cleanup).
        argv = [sys.executable, str(Path(__file__).with_name("versus_docker.py"))]
        os.execv(argv[0], argv + (["-n", str(args.n)] if "-n" in sys.argv else []))
    if args.n < 1 or not 0 <= args.concurrent <= BLOCK_LAST - BLOCK_FIRST:
        ap.error(f"need -n >= 1 and --concurrent 0..{BLOCK_LAST - BLOCK_FIRST}")
    if shutil.which("configurable-http-proxy", path=f"{VENV_BIN}:{os.environ['PATH']}") is None:
        sys.exit("configurable-http-proxy is missing: run setup/install-deps")

    prefix = "b" + secrets.token_hex(3)
    lxd = LXD(timeout=300, retries=1)
    info = await lxd.server_info()
    print(f"# {time.strftime('%Y-%m-%d')} on {platform.node()}: {platform.machine()}, "
          f"{os.cpu_count()} cores, kernel {platform.release()}, "
          f"LXD {info['environment']['server_version']}, N={args.n}, "
          f"concurrent={args.concurrent}, containers {prefix}-*, "
          f"load average {os.getloadavg()[0]:.2f}")
    root = Path(tempfile.mkdtemp(prefix="lxcgpu-bench-spawn-"))
    if args.boot or args.driver_sync:
        try:
            await (run_boot(args, lxd, prefix) if args.boot
                   else run_driver_sync(args, lxd, prefix, root))
        finally:
            print(f"load average at the end: {os.getloadavg()[0]:.2f}")
            shutil.rmtree(root, ignore_errors=True)
            lxd.close()
        return
    if args.remote:
        try:
            await run_remote(args, prefix, root)
        finally:
            print(f"load average at the end: {os.getloadavg()[0]:.2f}")
            shutil.rmtree(root, ignore_errors=True)
            lxd.close()
        return
    hub = agent = None
    try:
        hub = await asyncio.to_thread(start_hub, root, prefix)
        agent = NodeAgent(root)
        agent.start()
        await run(args, hub, lxd, prefix, root)
    except BaseException:
        if hub is not None:
            print(f"--- hub log (tail) ---\n{hub.log_tail()}", file=sys.stderr)
        if agent is not None:
            print(f"--- node agent log (tail) ---\n{agent.said()}", file=sys.stderr)
        raise
    finally:
        print(f"load average at the end: {os.getloadavg()[0]:.2f}")
        if hub is not None:
            hub.stop()
        if agent is not None:
            try:
                agent.stop()
                print(agent.figure())
            except RuntimeError as e:   # told; the containers still go
                print(f"NODE AGENT: {e}", file=sys.stderr)
        if args.keep:
            print(f"\nkept: containers tagged {BENCH_KEY}={prefix}; hub state in {root}")
        else:
            try:
                print(f"\ndeleted {await delete_containers(lxd, prefix)} containers")
            except LXDError as e:
                print(f"(could not delete the containers tagged {BENCH_KEY}={prefix}: {e})")
            shutil.rmtree(root, ignore_errors=True)
        lxd.close()


if __name__ == "__main__":
    asyncio.run(main())
