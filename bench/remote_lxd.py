#!/usr/bin/env python3
"""lxcgpu's container operations on a remote GPU server over HTTPS, against
this machine's LXD over its unix socket, in the same run.

    .venv/bin/python bench/remote_lxd.py [-n 10]

The remote server is a second real LXD daemon in a network namespace of its
own, reached with a client certificate and its certificate pinned (the
tests' tests/fixtures/lxd2.py).  For each server: a first `container up`
(create, start, provision), then N warm ones (running: checks only) and N
key syncs (`lxcspawner.fleet`, what a key change costs per server).  Prints
medians and the remote/local ratio.  Run as root with the quickstart's LXD
up; it pauses nothing and leaves nothing behind.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lxcspawner import fleet, lifecycle  # noqa: E402
from lxcspawner.container import IDMAP_BLOCK, IDMAP_USER_FIRST  # noqa: E402
from lxcspawner.settings import Settings  # noqa: E402
from tests.fixtures.lxd2 import running_second_lxd  # noqa: E402

USER = "benchr"
BLOCK_FIRST, BLOCK_LAST = 15040, 15049   # apart from the tests' and bench/spawn.py's


async def measure(f: fleet.Fleet, server: str, n: int) -> dict[str, float]:
    async def up():
        return await f.on(server, lambda x: lifecycle.ensure_user_container(
            x, f.store, f.settings, USER, server, actor="bench"))
    t0 = time.perf_counter()
    await up()
    out = {"first up": time.perf_counter() - t0}
    warm, sync = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        await up()
        warm.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        [r] = await f.sync_user(USER, [server])
        assert r.status == "done", r
        sync.append(time.perf_counter() - t0)
    out["warm up"] = statistics.median(warm)
    out["key sync"] = statistics.median(sync)
    return out


async def run(n: int, tag: str) -> None:
    with running_second_lxd(tag) as srv, tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "lxcgpu.toml"
        config.write_text(f"""
[store]
url = "sqlite:///{Path(tmp) / 'lxcgpu.sqlite'}"
[ports]
ssh = "27800-27899"
forward = "11600-11699"
[servers.local]
{srv.site_table("remote")}
[containers]
prefix = "{tag}"
cpu = 1
memory = "1GiB"
""")
        settings = Settings.load(config)
        store = settings.open_store(idmap_first=IDMAP_USER_FIRST + BLOCK_FIRST * IDMAP_BLOCK,
                                    idmap_last=IDMAP_USER_FIRST + BLOCK_LAST * IDMAP_BLOCK)
        store.add_key(USER, "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGtra2tra2tra2tra2tra2tra2tra2"
                            "tra2tra2tra2tra2tr bench@lxcgpu", actor="bench")
        f = fleet.Fleet(settings, store, actor="bench")
        try:
            local = await measure(f, "local", n)
            remote = await measure(f, "remote", n)
        finally:
            for server in ("local", "remote"):
                await f.on(server, lambda x, s=server: lifecycle.delete_user_container(
                    x, store, USER, s, prefix=tag, actor="bench"))
            f.close()
            store.close()
    print(f"{platform.node()}, {platform.machine()}, n={n}; seconds, median of n (first: one)")
    print(f"{'':10} {'local socket':>13} {'remote HTTPS':>13} {'ratio':>6}")
    for k in local:
        print(f"{k:10} {local[k]:13.3f} {remote[k]:13.3f} {remote[k] / local[k]:6.2f}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", type=int, default=10, help="warm rounds per server")
    args = p.parse_args()
    asyncio.run(run(args.n, "b" + secrets.token_hex(3)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
