#!/usr/bin/env python3
"""How fast the node agent's DNAT chain follows LXD, against the seed's way.

Run as root on a host with legacy x_tables (it uses chains of its own,
LXCGPUBENCH-*, and removes them at the end):

    .venv/bin/python bench/portmap.py [--users 1000] [--changes 200]

Prints:
- a full resync of N users' maps into an empty chain (python-iptables, one commit);
- one change (a container's new address) with N maps present, p50/p95/max;
- the seed's approach for the same work: one ``iptables`` command per rule
  (legacy backend, like the seed's hosts), from scratch and for one change,
  and the ratios;
- the agent's resident memory and idle CPU holding N maps: a child process
  runs the agent's code (NodeAgent, its LXD event stream, the DNAT table)
  with the N maps applied, and is measured from /proc while idle.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lxcspawner.dnat import DNATTable  # noqa: E402
from lxcspawner.portmap import PortMap  # noqa: E402

PREFIX = "LXCGPUBENCH"
SEED_CHAIN = "LXCGPUBENCH-SEED"


def user_maps(n: int, salt: int = 0) -> list[PortMap]:
    # Container addresses spread over a /16 as on a busy bridge.
    return [PortMap(22000 + i, f"10.213.{(i + salt) // 250 % 250}.{2 + (i + salt) % 250}", 22,
                    f"user{i}--gpu17") for i in range(n)]


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def iptables(*args: str) -> None:
    subprocess.run(["iptables-legacy", "-w", "-t", "nat", *args], check=True,
                   capture_output=True)


def seed_cleanup() -> None:
    subprocess.run(["iptables-legacy", "-w", "-t", "nat", "-F", SEED_CHAIN], capture_output=True)
    subprocess.run(["iptables-legacy", "-w", "-t", "nat", "-X", SEED_CHAIN], capture_output=True)


def bench_ours(n: int, changes: int) -> dict:
    table = DNATTable(chain=f"{PREFIX}-DNAT", post_chain=f"{PREFIX}-POST",
                      input_chain=f"{PREFIX}-INPUT")
    table.teardown()
    maps = user_maps(n)
    full = []
    for _ in range(5):
        table.teardown()
        table.setup([])
        t0 = time.perf_counter()
        res = table.sync(maps)
        full.append(time.perf_counter() - t0)
        assert res.added == n, res
    t0 = time.perf_counter()
    res = table.sync(maps)
    noop = time.perf_counter() - t0
    assert not res.changed
    one = []
    for k in range(changes):
        i = (k * 37) % n
        moved = PortMap(maps[i].host_port, f"10.213.251.{2 + k % 250}", 22, maps[i].instance)
        maps[i] = moved
        t0 = time.perf_counter()
        res = table.sync(maps)
        one.append(time.perf_counter() - t0)
        assert (res.added, res.removed) == (1, 1), res
    assert len(table.current()) == n
    table.teardown()
    return {"full": full, "noop": noop, "one": one, "fast": table.codec.fast}


def bench_seed(n: int, changes: int) -> dict:
    maps = user_maps(n)
    seed_cleanup()
    iptables("-N", SEED_CHAIN)
    t0 = time.perf_counter()
    for m in maps:
        iptables("-A", SEED_CHAIN, "-p", "tcp", "--dport", str(m.host_port), "-j", "DNAT",
                 "--to-destination", f"{m.address}:{m.port}")
    full = time.perf_counter() - t0
    one = []
    for k in range(changes):
        i = (k * 37) % n
        old, new = maps[i], PortMap(maps[i].host_port, f"10.213.251.{2 + k % 250}", 22)
        t0 = time.perf_counter()
        iptables("-D", SEED_CHAIN, "-p", "tcp", "--dport", str(old.host_port), "-j", "DNAT",
                 "--to-destination", f"{old.address}:{old.port}")
        iptables("-A", SEED_CHAIN, "-p", "tcp", "--dport", str(new.host_port), "-j", "DNAT",
                 "--to-destination", f"{new.address}:{new.port}")
        one.append(time.perf_counter() - t0)
        maps[i] = new
    seed_cleanup()
    return {"full": full, "one": one}


def proc_stat(pid: int) -> tuple[int, float]:
    """(resident KiB, CPU seconds) of a process."""
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return rss, (int(fields[11]) + int(fields[12])) / ticks


def agent_child(n: int) -> None:
    """The agent's code holding n maps, idle (run in a child process)."""
    from lxcspawner.lxd import LXD
    from monitor.node import NodeAgent

    async def main():
        table = DNATTable(chain=f"{PREFIX}-DNAT", post_chain=f"{PREFIX}-POST",
                      input_chain=f"{PREFIX}-INPUT")
        agent = NodeAgent(LXD(), table, interval=3600)
        agent._loop = asyncio.get_running_loop()
        stream = agent.lxd.follow_events(agent._on_event)
        for m in user_maps(n):
            agent.maps.setdefault(m.instance, []).append(m)
        await agent._apply()
        # SIGTERM (the parent's terminate) ends the wait, so the chain goes
        # (Python's default for SIGTERM would exit without the finally).
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM,
                                                      asyncio.current_task().cancel)
        print("ready", flush=True)
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            pass
        finally:
            stream.close()
            table.teardown()
    asyncio.run(main())


def bench_agent(n: int, idle: float) -> dict:
    child = subprocess.Popen([sys.executable, __file__, "--agent-child", "--users", str(n)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        time.sleep(1)
        rss0, cpu0 = proc_stat(child.pid)
        time.sleep(idle)
        rss1, cpu1 = proc_stat(child.pid)
    finally:
        child.terminate()
        child.wait(30)
        # Whatever became of the child, its chain does not stay behind.
        DNATTable(chain=f"{PREFIX}-DNAT", post_chain=f"{PREFIX}-POST",
                  input_chain=f"{PREFIX}-INPUT").teardown()
    return {"rss_mib": rss1 / 1024, "idle_cpu_pct": 100 * (cpu1 - cpu0) / idle}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--users", type=int, default=1000)
    ap.add_argument("--changes", type=int, default=200)
    ap.add_argument("--seed-changes", type=int, default=50)
    ap.add_argument("--idle", type=float, default=20.0, help="seconds to watch the idle agent")
    ap.add_argument("--agent-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.agent_child:
        agent_child(args.users)
        return
    n = args.users
    ours = bench_ours(n, args.changes)
    seed = bench_seed(n, args.seed_changes)
    agent = bench_agent(n, args.idle)
    full_ms = statistics.median(ours["full"]) * 1000
    one = [x * 1000 for x in ours["one"]]
    seed_one = [x * 1000 for x in seed["one"]]
    print(f"maps: {n} users (one SSH port each), python-iptables fast path: {ours['fast']}")
    print(f"full resync into an empty chain: median {full_ms:.1f} ms "
          f"(min {min(ours['full']) * 1000:.1f}, max {max(ours['full']) * 1000:.1f}; target <= 300)")
    print(f"resync with nothing to change:   {ours['noop'] * 1000:.1f} ms")
    print(f"one change with {n} present:    p50 {pct(one, 50):.1f} ms, p95 {pct(one, 95):.1f} ms, "
          f"max {max(one):.1f} ms over {len(one)} (target p95 <= 50)")
    print(f"seed (one iptables command per rule): full {seed['full']:.2f} s, one change "
          f"p50 {pct(seed_one, 50):.1f} ms, p95 {pct(seed_one, 95):.1f} ms")
    print(f"ratio seed/ours: full {seed['full'] * 1000 / full_ms:.0f}x, one change "
          f"{pct(seed_one, 50) / pct(one, 50):.0f}x (target >= 10x)")
    print(f"agent with {n} maps: resident {agent['rss_mib']:.1f} MiB (target <= 60), idle CPU "
          f"{agent['idle_cpu_pct']:.2f}% over {args.idle:.0f} s")


if __name__ == "__main__":
    main()
