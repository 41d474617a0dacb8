"""20 new users start their first servers at once through the real hub (20
new containers on this machine): every one gets its server, none is refused
(JupyterHub's 429), the ones beyond the GPU server's ``lxd_concurrency``
are told they are queued, and the hub API keeps answering meanwhile.

Timings are reported (printed), not asserted: ``bench/spawn.py`` measures
them (docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from lxcspawner import lifecycle
from lxcspawner.lxd import LXD
from lxcspawner.store import Store

pytestmark = pytest.mark.lxd

USERS = [f"burst{i:02d}" for i in range(20)]
READY_TIMEOUT = 900
SERVER = "node1"


def _remove_burst(hub) -> None:
    """Stop the 20 servers and delete their containers (and addresses), so
    that the tests after this one run on a quiet machine, not beside 20
    running containers."""
    for user in USERS:
        hub.api("delete", f"/users/{user}/server")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and any(
            hub.api("get", f"/users/{user}").json().get("servers") for user in USERS):
        time.sleep(1)

    async def delete_all():
        lxd, store = LXD(timeout=120), Store(hub.store_url)
        try:
            for user in USERS:
                await lifecycle.delete_user_container(lxd, store, user, SERVER,
                                                      prefix=hub.run_tag, actor="test")
        finally:
            lxd.close()
            store.close()
    asyncio.run(delete_all())


def test_twenty_new_users_at_once_all_get_their_servers(hub):
    r = hub.api("post", "/users", json={"usernames": USERS})
    assert r.status_code in (201, 409), r.text
    latencies: list[float] = []
    done = threading.Event()

    def probe():
        while not done.is_set():
            t0 = time.perf_counter()
            try:
                ok = hub.api("get", "/").status_code == 200
            except OSError:
                ok = False
            latencies.append(time.perf_counter() - t0 if ok else float("inf"))
            time.sleep(0.2)
    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    t0 = time.monotonic()
    try:
        with ThreadPoolExecutor(len(USERS)) as pool:
            codes = list(pool.map(lambda u: hub.api("post", f"/users/{u}/server").status_code,
                                  USERS))
        assert 429 not in codes, codes
        assert set(codes) <= {201, 202}, codes
        ready: dict[str, float] = {}
        while len(ready) < len(USERS):
            for user in USERS:
                if user in ready:
                    continue
                model = hub.api("get", f"/users/{user}").json()
                server = model["servers"].get("")
                if server and server.get("ready"):
                    ready[user] = time.monotonic() - t0
                elif not server:
                    pytest.fail(f"{user}'s spawn failed:\n{hub.log_tail(4000)}")
            assert time.monotonic() - t0 < READY_TIMEOUT, (sorted(ready), hub.log_tail(4000))
            time.sleep(1)
    finally:
        done.set()
        prober.join()
        _remove_burst(hub)
    assert all(lat != float("inf") for lat in latencies), "the hub API failed during the burst"
    assert "queued on node1 behind" in hub.log_text()
    lat = sorted(latencies)
    print(f"\n20-user burst: all {len(ready)} ready, the last after {max(ready.values()):.1f} s "
          f"(median {statistics.median(ready.values()):.1f} s); hub API during it: "
          f"{len(lat)} requests, p50 {lat[len(lat) // 2] * 1000:.0f} ms, "
          f"p99 {lat[int(len(lat) * 0.99)] * 1000:.0f} ms")
