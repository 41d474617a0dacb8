#!/usr/bin/env python3
"""Container lifecycle times for the template image, on btrfs and on dir.

    .venv/bin/python bench/container_lifecycle.py [-n 5] [--pools lxcgpu,dir]

For each storage pool and each of N containers: create from the template,
start, first IPv4 address, sshd answering on port 22, clean stop; then the
idle memory of a booted container (systemd + sshd, nothing else running).
Prints median and max for each step.  ``dir`` is a temporary pool of that
driver, removed at the end; the first container on it pays for unpacking
the image and is reported apart as "cold".
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lxcspawner.container import IDMAP_BLOCK, IDMAP_USER_FIRST, ContainerSpec, ensure_container  # noqa: E402
from lxcspawner.lxd import LXD, LXDError  # noqa: E402
from lxcspawner.provision import provision  # noqa: E402

# A well-formed ed25519 public key (its private half exists nowhere).
BENCH_KEY = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGtra2tra2tra2tra2tra2tra2tra2tra2tra2tra2tr"
             " bench@lxcgpu")

BENCH_BLOCK_FIRST = 15050
DIR_POOL = "lxcgpubench-dir"


def sshd_banner(addr: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((addr, 22), timeout=1) as s:
                if s.recv(16).startswith(b"SSH-"):
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"sshd at {addr} did not answer in {timeout}s")
        time.sleep(0.02)


async def one(lxd: LXD, spec: ContainerSpec) -> dict[str, float]:
    t0 = time.perf_counter()
    await ensure_container(lxd, spec)
    t1 = time.perf_counter()
    await lxd.start(spec.name)
    t2 = time.perf_counter()
    addr = await lxd.wait_for_address(spec.name)
    t3 = time.perf_counter()
    await asyncio.to_thread(sshd_banner, addr)
    t4 = time.perf_counter()
    return {"create": t1 - t0, "start": t2 - t1, "address": t3 - t1, "sshd": t4 - t1,
            "_t4": t4}


def cgroup_memory(name: str) -> dict[str, float]:
    """Anonymous (rss) and page-cache memory of the container's cgroup, MiB."""
    for path in (Path(f"/sys/fs/cgroup/memory/lxc.payload.{name}/memory.stat"),
                 Path(f"/sys/fs/cgroup/lxc.payload.{name}/memory.stat")):
        if path.exists():
            stat = dict(line.split() for line in path.read_text().splitlines())
            rss = int(stat.get("total_rss", stat.get("anon", 0)))
            cache = int(stat.get("total_cache", stat.get("file", 0)))
            return {"rss": rss / 2**20, "cache": cache / 2**20}
    return {}


async def idle_memory(lxd: LXD, name: str, settle: float) -> dict[str, float]:
    """LXD's memory usage of a booted, idle container, and its split."""
    await lxd.execute(name, ["systemctl", "is-system-running", "--wait"], timeout=120)
    await asyncio.sleep(settle)
    mem = {"usage": (await lxd.state(name)).memory_bytes / 2**20}
    mem.update(cgroup_memory(name))
    return mem


async def ensure_dir_pool(lxd: LXD) -> None:
    def make():
        try:
            lxd._request("get", f"/1.0/storage-pools/{DIR_POOL}")
        except LXDError:
            lxd._async_request("post", "/1.0/storage-pools", timeout=60,
                               json={"name": DIR_POOL, "driver": "dir", "config": {}})
    await lxd.run(make, what="create dir pool")


async def drop_dir_pool(lxd: LXD) -> None:
    def drop():
        vols = lxd._request("get", f"/1.0/storage-pools/{DIR_POOL}/volumes").json()["metadata"]
        for v in vols:
            if "/volumes/image/" in v:
                lxd._async_request("delete", v, timeout=120)
        lxd._request("delete", f"/1.0/storage-pools/{DIR_POOL}")
    await lxd.run(drop, what="delete dir pool", timeout=300)


def fmt(values: list[float]) -> str:
    return f"{statistics.median(values):6.2f} {max(values):6.2f}"


async def bench_pool(lxd: LXD, pool: str, n: int, settle: float) -> dict:
    specs = [ContainerSpec(user=f"bench{i}", server="bench", prefix="bench",
                           idmap_base=IDMAP_USER_FIRST + (BENCH_BLOCK_FIRST + i) * IDMAP_BLOCK,
                           pool=pool)
             for i in range(n + 1)]
    rows, restarts, stops, mems, provs = [], [], [], [], {}
    try:
        cold = await one(lxd, specs[0])
        for spec in specs[1:]:
            rows.append(await one(lxd, spec))
        for spec in specs[1:]:
            for key in ("provision", "re-provision"):
                t = time.perf_counter()
                await provision(lxd, spec.name, login=spec.posix_user, keys=[BENCH_KEY],
                                hostname=spec.hostname)
                provs.setdefault(key, []).append(time.perf_counter() - t)
        mems.append(await idle_memory(lxd, specs[1].name, settle))
        if n > 1:
            mems.append(await idle_memory(lxd, specs[2].name, 0))
        for spec in specs[1:]:
            t = time.perf_counter()
            await lxd.stop(spec.name)
            stops.append(time.perf_counter() - t)
        # A second start: the id map is already shifted, caches are warm.
        for spec in specs[1:]:
            restarts.append(await one(lxd, spec))
    finally:
        await asyncio.gather(*(lxd.delete_instance(s.name) for s in specs),
                             return_exceptions=True)
    return {"cold": cold, "rows": rows, "restarts": restarts, "stop": stops, "mem": mems,
            "provision": provs}


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=5, help="containers per pool (default 5)")
    ap.add_argument("--pools", default="lxcgpu,dir",
                    help="pools to measure: lxcgpu (the btrfs pool) and/or dir")
    ap.add_argument("--settle", type=float, default=20,
                    help="seconds to let a booted container settle before its memory is read")
    args = ap.parse_args()
    lxd = LXD(timeout=300, retries=1)
    info = await lxd.server_info()
    print(f"# {time.strftime('%Y-%m-%d')} on {platform.node()}: {platform.machine()}, "
          f"{__import__('os').cpu_count()} cores, kernel {platform.release()}, "
          f"LXD {info['environment']['server_version']}, N={args.n}")
    try:
        for pool in args.pools.split(","):
            target = "lxcgpu" if pool == "lxcgpu" else DIR_POOL
            if target == DIR_POOL:
                await ensure_dir_pool(lxd)
            res = await bench_pool(lxd, target, args.n, args.settle)
            driver = "btrfs" if target == "lxcgpu" else "dir"
            print(f"\n## pool {target} ({driver})   seconds: median max")
            for step in ("create", "start", "address", "sshd"):
                print(f"{step:>8}: {fmt([r[step] for r in res['rows']])}"
                      f"   (cold first container: {res['cold'][step]:.2f})")
            print(f"{'provision':>10}: {fmt(res['provision']['provision'])}"
                  "   (login, sudo, key, hostname in a new container)")
            print(f"{'again':>10}: {fmt(res['provision']['re-provision'])}"
                  "   (the same again: nothing to change)")
            print(f"{'stop':>8}: {fmt(res['stop'])}   (clean shutdown)")
            for step in ("start", "address", "sshd"):
                print(f"{'re-' + step:>10}: {fmt([r[step] for r in res['restarts']])}"
                      "   (second start of a stopped container)")
            for m in res["mem"]:
                split = (f" = {m['rss']:.1f} anonymous + {m['cache']:.1f} page cache"
                         if "rss" in m else "")
                print(f"idle memory: {m['usage']:.1f} MiB{split} (target <= 64)")
    finally:
        if "dir" in args.pools.split(","):
            try:
                await drop_dir_pool(lxd)
            except LXDError as e:
                print(f"(could not remove pool {DIR_POOL}: {e})")
        lxd.close()
    print("\n'address' and 'sshd' count from the start request.")


if __name__ == "__main__":
    asyncio.run(main())
