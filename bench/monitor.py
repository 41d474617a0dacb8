#!/usr/bin/env python3
"""The node agent's cost on a GPU server: the load collector against
lxc-gpu's collection loop.

    .venv/bin/python bench/monitor.py [--seconds 20] [--gpus 8] [--containers 50]

- collector: :class:`monitor.collector.Collector` sampling at 1 Hz for
  ``--seconds``, with ``--gpus`` fake GPUs (tests/fixtures/fake_nvml.py)
  running two processes of each of ``--containers`` containers (cgroup
  files under a temporary /proc root, the instances from an in-process
  stand-in for LXD's list), psutil and the disks real.  The agent's CPU time
  (``time.process_time``) over the whole run, as a percent of one core, and
  per sample.  The fake NVML costs next to nothing: add the NVML calls per
  sample times the per-call cost that tests/gpu measures on a real GPU.
- dashboard: ``--servers`` node agents (the real load API on loopback, each
  serving a document the collector made from ``--gpus`` fake GPUs), the
  dashboard's poller asking them all over HTTP, and the dashboard's JSON
  (all servers, and filtered by a user) and page, each ``--requests``
  times, with an hour of history: p50 and p95 (target p95 <= 50 ms).
- lxc-gpu: its ``scripts/monitor.bash`` forked ``df -h`` (every 60 s),
  ``free``, ``iostat -dxy 3 1``, ``mpstat -P ALL 3 1``, ``nvidia-smi -q``,
  ``ps auxww`` and ``sensors`` (each again 2-5 s after it ended), each piped
  to a ``curl`` POST.  Those installed here are forked ``--rounds`` times
  (argv lists, no shell); curl posts to a closed loopback port.  Their wall
  time and CPU time (``RUSAGE_CHILDREN``) per round, and per second at
  lxc-gpu's periods.  ``ps`` grows with the processes on the machine, which
  a server with 50 containers has many more of.

Sections (``--section``) can be run alone; all by default.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]

from monitor.collector import Collector  # noqa: E402
from tests.fixtures.fake_nvml import (  # noqa: E402
    GiB, FakeLXD, FakeNVML, gpus, instance, write_cgroup, write_payload_cgroup,
)

# lxc-gpu's scripts/monitor.bash: (argv, seconds it slept after each run).
LXCGPU_LOOP: tuple[tuple[tuple[str, ...], float], ...] = (
    (("df", "-h"), 60),
    (("free",), 5),
    (("iostat", "-dxy", "3", "1"), 2),
    (("mpstat", "-P", "ALL", "3", "1"), 2),
    (("nvidia-smi", "-q"), 5),
    (("ps", "auxww"), 5),
    (("sensors",), 5),
)


def header() -> str:
    return (f"# {time.strftime('%Y-%m-%d')} on {platform.node()}: {platform.machine()}, "
            f"{os.cpu_count()} cores, kernel {platform.release()}, Python "
            f"{platform.python_version()}, {len(psutil.pids())} processes, load average "
            f"{os.getloadavg()[0]:.2f}")


# ------------------------------------------------------------------ collector

def fake_node(root: Path, n_gpus: int, n_containers: int) -> tuple[FakeNVML, FakeLXD]:
    """``n_gpus`` busy GPUs; two GPU processes of each container, spread over
    them, plus a host process on each GPU."""
    devs = gpus(n_gpus, utilization=80, memory_used=40 * GiB)
    instances = []
    pid = 10_000
    for i in range(n_containers):
        name = f"user{i:02d}--gpu1"
        instances.append(instance(name, f"user{i:02d}", cpu_ns=i * 10**9, memory=4 * GiB,
                                  processes=30))
        # Their load as the collector reads it: the host's cgroup files (v1).
        write_payload_cgroup(root / "cgroup", name, v2=False, cpu_ns=i * 10**9,
                             memory=4 * GiB, processes=30)
        for j in range(2):
            pid += 1
            write_cgroup(root, pid, name)
            devs[(2 * i + j) % n_gpus].processes.append((pid, 2 * GiB))
    for d in devs:
        pid += 1
        write_cgroup(root, pid, None)
        d.processes.append((pid, GiB))
    return FakeNVML(devs), FakeLXD(instances)


async def collector_run(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="lxcgpu-bench-monitor-") as tmp:
        nvml, lxd = fake_node(Path(tmp), args.gpus, args.containers)
        c = Collector("bench", lxd=lxd, nvml=nvml, proc=tmp, disks=("/",),
                      cgroup_root=f"{tmp}/cgroup")
        await c.sample()                      # NVML started, facts read, psutil primed
        costs, calls = [], []
        cpu0, wall0 = time.process_time(), time.monotonic()
        for i in range(args.seconds):
            doc = await c.sample()
            costs.append(doc["cost"]["seconds"])
            calls.append(doc["cost"]["nvml_calls"])
            await asyncio.sleep(max(0.0, wall0 + i + 1 - time.monotonic()))
        cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
        procs = sum(len(d["processes"]) for d in doc["gpus"]["devices"])
    return {"cpu": cpu, "wall": wall, "costs": costs, "calls": calls, "processes": procs}


def bench_collector(args: argparse.Namespace) -> float:
    """Print the collector's figures; its CPU seconds per second."""
    r = asyncio.run(collector_run(args))
    fast = [c for c, n in zip(r["costs"], r["calls"]) if n <= 4 * args.gpus]
    slow = [c for c, n in zip(r["costs"], r["calls"]) if n > 4 * args.gpus]
    per_second = r["cpu"] / r["wall"]
    print(f"\n## collector: {args.gpus} fake GPUs, {args.containers} containers, "
          f"{r['processes']} GPU processes, 1 Hz for {r['wall']:.1f} s")
    print(f"{'agent CPU over the run':<44} {r['cpu'] * 1000:9.1f} ms  "
          f"= {per_second * 100:.3f} % of one core")
    for what, values in (("sample, readings only", fast),
                         ("sample, with process lists and LXD", slow)):
        if values:
            print(f"{what:<44} p50 {statistics.median(values) * 1000:7.2f} ms CPU  "
                  f"max {max(values) * 1000:7.2f} ms  (n={len(values)})")
    print(f"{'NVML calls per sample':<44} {min(r['calls'])} (readings), {max(r['calls'])} "
          "(with process lists): times the per-call cost of tests/gpu")
    return per_second


# ------------------------------------------------------------------ lxc-gpu

def closed_port() -> int:
    """A loopback port nothing listens on (curl is refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def fork(argv: list[str], stdin: bytes | None = None) -> tuple[float, float, bytes]:
    """Run ``argv``: (wall seconds, its CPU seconds, its output)."""
    cpu, t = children_cpu(), time.perf_counter()
    out = subprocess.run(argv, input=stdin, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         check=False, timeout=120).stdout
    return time.perf_counter() - t, children_cpu() - cpu, out


def bench_lxcgpu(args: argparse.Namespace) -> float:
    """Print the forks' figures; their CPU seconds per second at lxc-gpu's periods."""
    curl = shutil.which("curl")
    port = closed_port()
    present = [(argv, pause) for argv, pause in LXCGPU_LOOP if shutil.which(argv[0])]
    absent = [" ".join(argv) for argv, _ in LXCGPU_LOOP if not shutil.which(argv[0])]
    print(f"\n## lxc-gpu's collection loop: {args.rounds} rounds of each fork")
    print(f"{'command':<26} {'wall p50':>10} {'CPU p50':>10} {'+ curl CPU':>11} "
          f"{'every':>8} {'CPU per second':>15}")
    total = 0.0
    for argv, pause in present:
        walls, cpus, curls = [], [], []
        for _ in range(args.rounds):
            wall, cpu, out = fork([shutil.which(argv[0]), *argv[1:]])
            walls.append(wall)
            cpus.append(cpu)
            if curl and not args.no_curl:
                curls.append(fork([curl, "-s", "-o", "/dev/null", "--max-time", "5", "-X", "POST",
                                   "--data-binary", "@-",
                                   f"http://127.0.0.1:{port}/feed/bench/{argv[0]}"], out)[1])
        period = statistics.median(walls) + pause
        cpu = statistics.median(cpus) + (statistics.median(curls) if curls else 0.0)
        total += cpu / period
        print(f"{' '.join(argv):<26} {statistics.median(walls) * 1000:8.1f} ms "
              f"{statistics.median(cpus) * 1000:8.1f} ms "
              f"{(statistics.median(curls) * 1000 if curls else 0):8.1f} ms "
              f"{period:6.1f} s {cpu / period * 1000:10.2f} ms/s")
    print(f"{'all of them':<26} {'':>10} {'':>10} {'':>11} {'':>8} {total * 1000:10.2f} ms/s "
          f"= {total * 100:.3f} % of one core")
    if absent:
        print(f"not installed here, so not counted: {', '.join(absent)}")
    if not curl or args.no_curl:
        print("curl not counted")
    return total


# ------------------------------------------------------------------ dashboard

def _get(url: str) -> float:
    t = time.perf_counter()
    with urllib.request.urlopen(url, timeout=30) as r:
        r.read()
    return time.perf_counter() - t


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, -(-len(ordered) * p // 100) - 1)]


async def dashboard_run(args: argparse.Namespace) -> dict:
    """``--servers`` agents on loopback (the real load API, each serving a
    document the collector made from ``--gpus`` fake GPUs), the dashboard
    polling them over HTTP, and its JSON and page asked for again and again."""
    from monitor import dashboard, loadapi
    from monitor.collector import prometheus

    token = "b" * 43
    servers, listeners = [], []
    with tempfile.TemporaryDirectory(prefix="lxcgpu-bench-dashboard-") as tmp:
        nvml, lxd = fake_node(Path(tmp), args.gpus, 6)
        c = Collector("template", lxd=lxd, nvml=nvml, proc=tmp, disks=("/",),
                      cgroup_root=f"{tmp}/cgroup")
        await c.sample()
        base = await c.sample()
        c.close()
    for i in range(args.servers):
        name = f"gpu{i + 1:02d}"
        doc = {**base, "node": name}
        app = loadapi.make_app(name, token, lambda doc=doc: doc, prometheus)
        server, port = loadapi.serve(app, "127.0.0.1", 0)
        listeners.append(server)
        servers.append((name, f"http://127.0.0.1:{port}"))
    poller = dashboard.Poller(servers, token, poll_seconds=3, history_minutes=60)
    polls = []
    for _ in range(5):
        t = time.perf_counter()
        await poller.poll()
        polls.append(time.perf_counter() - t)
    stale = sum(poller.stale(s, time.time()) for s in poller.servers.values())
    # An hour of history: one point a minute for every GPU of every server.
    now = time.time()
    for s in poller.servers.values():
        for m in range(60):
            poller._remember(s, s.doc, now - (60 - m) * 60)
    # The dashboard's own app (public: no hub to log in to here), served
    # the same way.
    app = dashboard.make_app(poller, "/services/monitor/", None, public=True)
    front, port = loadapi.serve(app, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{port}/services/monitor/"
    times: dict[str, list[float]] = {"JSON, all servers": [], "JSON, ?user=user03": [],
                                     "page": []}
    paths = {"JSON, all servers": "api/v1/load", "JSON, ?user=user03": "api/v1/load?user=user03",
             "page": ""}
    size = len(await asyncio.to_thread(
        lambda: urllib.request.urlopen(url + "api/v1/load", timeout=30).read()))
    for i in range(args.requests):
        for what, path in paths.items():
            if i % 20 == 0:
                poller.generation += 1          # a new poll: the JSON is encoded again
            times[what].append(await asyncio.to_thread(_get, url + path))
    for server in (*listeners, front):
        server.stop()
    return {"polls": polls, "stale": stale, "times": times, "size": size}


def bench_dashboard(args: argparse.Namespace) -> float:
    r = asyncio.run(dashboard_run(args))
    print(f"\n## dashboard: {args.servers} servers of {args.gpus} fake GPUs each, their "
          "agents' real load API on loopback; an hour of history")
    print(f"{'a poll of every agent (concurrent)':<44} p50 "
          f"{statistics.median(r['polls']) * 1000:7.1f} ms  max {max(r['polls']) * 1000:7.1f} ms"
          f"  ({r['stale']} stale)")
    print(f"{'the JSON view, all servers':<44} {r['size'] / 1024:7.0f} KiB")
    for what, values in r["times"].items():
        print(f"{what:<44} p50 {statistics.median(values) * 1000:7.2f} ms  "
              f"p95 {_pct(values, 95) * 1000:7.2f} ms  (n={len(values)}; new poll every 20)")
    return _pct(r["times"]["JSON, all servers"], 95)


# ------------------------------------------------------------------ main

SECTIONS = {"collector": bench_collector, "lxcgpu": bench_lxcgpu,
            "dashboard": bench_dashboard}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--section", action="append", choices=sorted(SECTIONS),
                    help="run only this part (repeatable; default: all)")
    ap.add_argument("--seconds", type=int, default=20,
                    help="seconds the collector samples at 1 Hz (default %(default)s)")
    ap.add_argument("--gpus", type=int, default=8, help="fake GPUs (default %(default)s)")
    ap.add_argument("--containers", type=int, default=50,
                    help="containers with GPU processes (default %(default)s)")
    ap.add_argument("--rounds", type=int, default=5,
                    help="forks of each lxc-gpu command (default %(default)s)")
    ap.add_argument("--servers", type=int, default=20,
                    help="GPU servers the dashboard polls (default %(default)s)")
    ap.add_argument("--requests", type=int, default=200,
                    help="dashboard requests of each kind (default %(default)s)")
    ap.add_argument("--no-curl", action="store_true",
                    help="leave out the curl that lxc-gpu forked for each post")
    args = ap.parse_args(argv)
    sections = args.section or list(SECTIONS)
    print(header())
    results = {name: SECTIONS[name](args) for name in sections}
    if "collector" in results and "lxcgpu" in results and results["collector"] > 0:
        print(f"\nlxc-gpu's forks / the collector, CPU per second: "
              f"{results['lxcgpu'] / results['collector']:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
