#!/usr/bin/env python3
"""keyportal through a real hub: snapshot and restore against LXD's own
time, a key change reaching a user's containers on two servers, and API
latency with many users in the store.

    .venv/bin/python bench/portal.py [-n 10] [--users 200]

Run as root with LXD up and the template image built (``setup/test`` or
``setup/quickstart``; pause the quickstart's node agent as for
bench/spawn.py).  It makes a second LXD server the way the tests do
(``setup/gpu-server`` in a network namespace), starts its own hub with the
shipped config (keyportal included), one user with a container on each
server, and measures, each through the proxy with the user's token:

- snapshot and restore: ``POST .../snapshots`` and ``.../restore`` against
  the same LXD call made directly (the baseline, in the same run): p50 and
  the ratio;
- rebuild: ``POST .../rebuild`` polled to its end (``operations/ID``), the
  first one moving a 64 MiB home into its volume, then the rest against a
  plain container made again from the same image by LXD directly;
- a key added and removed: ``POST keys`` / ``DELETE keys/...`` (the store,
  then both containers at once);
- ``GET containers`` and ``GET me`` with ``--users`` users in the store.

Everything it made is deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "setup")]

from lxcspawner import naming  # noqa: E402
from lxcspawner.container import IDMAP_BLOCK, IDMAP_USER_FIRST  # noqa: E402
from lxcspawner.settings import Settings  # noqa: E402
from lxdhost import POOL  # noqa: E402
from tests.fixtures.hub import launch_hub  # noqa: E402
from tests.fixtures.lxd2 import running_second_lxd  # noqa: E402

BENCH_KEY = "user.lxcgpu-bench.run"
SERVICE = "lxcgpu-bench"
USER = "benchp"
# Its own id blocks and ports.
FIRST_BLOCK = 14000   # 14000-14400: apart from the tests (14650+) and the other benches
TOML = """\
[store]
url = "sqlite:///{store}"
first_id_block = {block}
[ports]
ssh = "27000-27899"
forward = "11800-11899"
jupyter = "20800-20899"
[servers.node1]
{node2}
[containers]
prefix = "{prefix}"
"""


def med(values: list[float]) -> float:
    return statistics.median(values)


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def call(hub, token: str, method: str, path: str, **kw):
    with hub.session() as s:
        t = time.perf_counter()
        r = s.request(method, f"{hub.url}/services/keyportal/api/v1/{path}",
                      headers={"Authorization": f"token {token}"}, timeout=900, **kw)
        dt = time.perf_counter() - t
    if r.status_code >= 400:
        raise RuntimeError(f"{method} {path}: {r.status_code} {r.text}")
    return r, dt


def line(what: str, values: list[float], unit: str = "s") -> str:
    k = 1000 if unit == "ms" else 1
    return (f"{what:<52} p50 {med(values) * k:8.3f} {unit}  p95 {pct(values, 95) * k:8.3f}"
            f"  max {max(values) * k:8.3f}")


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=10, help="rounds of each (default 10)")
    ap.add_argument("--users", type=int, default=200, help="users in the store (default 200)")
    args = ap.parse_args()
    prefix = "p" + secrets.token_hex(3)
    print(f"# {time.strftime('%Y-%m-%d')} on {platform.node()}: {platform.machine()}, "
          f"{os.cpu_count()} cores, kernel {platform.release()}, N={args.n}, "
          f"users={args.users}, load average {os.getloadavg()[0]:.2f}")
    root = Path(tempfile.mkdtemp(prefix="lxcgpu-bench-portal-"))
    with running_second_lxd(prefix) as srv:
        toml = TOML.format(store=root / "lxcgpu.sqlite", block=FIRST_BLOCK,
                           node2=srv.site_table("node2"), prefix=prefix)
        hub = launch_hub(root, toml, ldap_settings="# No LDAP: users come through the API.",
                         admin_group="cn=gpu-admins,ou=groups,dc=bench,dc=invalid",
                         tag_key=BENCH_KEY, tag=prefix, service=SERVICE)
        settings = Settings.load(root / "lxcgpu.toml")
        lxds = {s: settings.open_lxd(s, timeout=600, retries=1) for s in ("node1", "node2")}
        names = {s: naming.instance_name(USER, s, prefix) for s in lxds}
        try:
            await asyncio.to_thread(hub.start)
            hub.api("POST", f"/users/{USER}")
            token = hub.api("POST", f"/users/{USER}/tokens",
                            json={"note": "bench", "expires_in": 3600}).json()["token"]
            for s in lxds:
                _, dt = await asyncio.to_thread(call, hub, token, "POST", f"containers/{s}")
                print(f"{'first container on ' + s + ' (create, start, ready)':<52} {dt:8.3f} s")

            print("\n## snapshot and restore, node1: through keyportal vs LXD directly "
                  "(alternating rounds)")
            api_snap, lxd_snap, api_rest, lxd_rest = [], [], [], []
            lxd = lxds["node1"]
            for i in range(args.n):
                _, dt = await asyncio.to_thread(call, hub, token, "POST",
                                                "containers/node1/snapshots",
                                                json={"name": f"api{i}"})
                api_snap.append(dt)
                t = time.perf_counter()
                await lxd.create_snapshot(names["node1"], f"lxd{i}")
                lxd_snap.append(time.perf_counter() - t)
                _, dt = await asyncio.to_thread(
                    call, hub, token, "POST", f"containers/node1/snapshots/api{i}/restore")
                api_rest.append(dt)
                t = time.perf_counter()
                await lxd.restore_snapshot(names["node1"], f"lxd{i}")
                lxd_rest.append(time.perf_counter() - t)
                await lxd.delete_snapshot(names["node1"], f"api{i}")
                await lxd.delete_snapshot(names["node1"], f"lxd{i}")
            print(line("snapshot through keyportal", api_snap))
            print(line("snapshot, LXD directly", lxd_snap))
            print(f"{'':>4}ratio (p50): {med(api_snap) / med(lxd_snap):.2f}x")
            print(line("restore through keyportal (+ keys, port maps)", api_rest))
            print(line("restore, LXD directly", lxd_rest))
            print(f"{'':>4}ratio (p50): {med(api_rest) / med(lxd_rest):.2f}x")

            print("\n## rebuild, node1: through keyportal (the operation, polled to its end) vs "
                  "LXD directly (a plain container from the same image: stop, delete, create, "
                  "start, an address)")

            def rebuild() -> tuple[float, dict]:
                t = time.perf_counter()
                op = call(hub, token, "POST", "containers/node1/rebuild")[0].json()
                while op["status"] == "running":
                    op = call(hub, token, "GET", f"operations/{op['id']}?wait=30")[0].json()
                if op["status"] != "done":
                    raise RuntimeError(f"rebuild failed: {op['message']}")
                return time.perf_counter() - t, op["result"]
            await lxd.put_file(names["node1"], f"/home/{naming.posix_name(USER)}/data.bin",
                               os.urandom(64 << 20))
            dt, result = await asyncio.to_thread(rebuild)
            assert result["home_moved"], result
            print(f"{'first rebuild (a 64 MiB home moved into its volume)':<52} {dt:8.3f} s")
            raw = f"{prefix}-raw"
            await lxd.create_instance(raw, image_alias=settings.image, profiles=settings.profiles)
            await lxd.start(raw)
            api_rb, lxd_rb = [], []
            for _ in range(max(3, args.n // 2)):
                dt, result = await asyncio.to_thread(rebuild)
                assert not result["home_moved"], result
                api_rb.append(dt)
                t = time.perf_counter()
                await lxd.delete_instance(raw)          # a forced stop, then the delete
                await lxd.create_instance(raw, image_alias=settings.image,
                                          profiles=settings.profiles)
                await lxd.start(raw)
                await lxd.wait_for_address(raw, timeout=120)
                lxd_rb.append(time.perf_counter() - t)
            await lxd.delete_instance(raw)
            print(line("rebuild through keyportal (home kept, user ready)", api_rb))
            print(line("a plain container made again, LXD directly", lxd_rb))
            print(f"{'':>4}ratio (p50): {med(api_rb) / med(lxd_rb):.2f}x")

            print("\n## a key change reaching the user's containers on node1 and node2")
            adds, removes = [], []
            for i in range(args.n):
                key = root / f"k{i}"
                subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                               check=True)
                r, dt = await asyncio.to_thread(call, hub, token, "POST", "keys",
                                                json={"key": (root / f"k{i}.pub").read_text()})
                assert [x["status"] for x in r.json()["servers"]] == ["done", "done"], r.text
                adds.append(dt)
                fp = r.json()["added"][0]["fingerprint"]
                _, dt = await asyncio.to_thread(call, hub, token, "DELETE",
                                                "keys/" + fp.replace("/", "%2F"))
                removes.append(dt)
            print(line("POST keys (both containers written)", adds))
            print(line("DELETE keys/... (both containers written)", removes))

            print(f"\n## API latency with {args.users} users in the store")
            store = settings.open_store(
                idmap_first=IDMAP_USER_FIRST + FIRST_BLOCK * IDMAP_BLOCK)
            try:
                for i in range(args.users):
                    store.ensure_user(f"many{i:04d}", actor="bench")
            finally:
                store.close()
            for path in ("containers", "me"):
                times = []
                for _ in range(max(50, args.n)):
                    _, dt = await asyncio.to_thread(call, hub, token, "GET", path)
                    times.append(dt)
                print(line(f"GET {path}", times, "ms"))
        except BaseException:
            print(f"--- hub log (tail) ---\n{hub.log_tail()}", file=sys.stderr)
            raise
        finally:
            await asyncio.to_thread(hub.stop)
            shutil.rmtree(hub.proxy_dir, ignore_errors=True)
            for s, client in lxds.items():
                try:
                    await client.delete_instance(names[s])
                    if await client.volume(POOL, f"{names[s]}-home") is not None:
                        await client.delete_volume(POOL, f"{names[s]}-home")
                    if s == "node1" and await client.instance(f"{prefix}-raw") is not None:
                        await client.delete_instance(f"{prefix}-raw")
                except Exception as e:  # noqa: BLE001 - say it, go on
                    print(f"(could not delete {names[s]}: {e})")
                client.close()
            shutil.rmtree(root, ignore_errors=True)
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
