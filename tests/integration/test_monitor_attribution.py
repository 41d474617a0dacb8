"""The collector's attribution on the real LXD and the real /proc: a process
started in a user's container is found by its host PID, placed in that
container by its cgroup, and with its user by ``user.lxcgpu.owner``; a host
process is a host process; the container's load comes from LXD.

No GPU here: NVML is faked at the pynvml boundary, and the "GPU processes"
it reports are real host PIDs (the container's process and this test's own).
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from lxcspawner.container import start_container
from monitor.collector import (
    Collector, attribution, cgroup_name, container_of_pid, instance_owners,
)
from tests.fixtures.fake_nvml import GiB, FakeNVML, gpus

pytestmark = pytest.mark.lxd

USER = "moni"
SERVER = "mon"                  # keeps the name apart from other tests' containers
SLEEP = "2999"                  # the argument that marks the test's process


def host_pids_in(argv: list[str], cgroup: str) -> list[int]:
    """Host PIDs running ``argv`` (argv[0] by name or path: systemd-run
    starts it by its full path) in the container whose cgroup is ``cgroup``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
            if args and os.path.basename(args[0]) == argv[0] and args[1:] == argv[1:] and \
                    container_of_pid(int(entry.name)) == cgroup:
                pids.append(int(entry.name))
        except OSError:
            continue            # it ended meanwhile (ProcessLookupError is one)
    return pids


@pytest.fixture(scope="module")
async def moni(lxd, user_containers):
    """A running container of USER with ``sleep 2999`` started in it (by
    systemd-run: an exec'd command must end by itself), and that process's
    host PID."""
    spec = await user_containers(USER, server=SERVER)
    await start_container(lxd, spec.name)
    # systemd-run needs the container's systemd up; its state ("running",
    # or "degraded" in a container) does not matter here.
    await lxd.execute(spec.name, ["systemctl", "is-system-running", "--wait"], timeout=90)
    res = await lxd.execute(spec.name, ["systemd-run", "--unit=lxcgpu-test-monitor", "--",
                                        "sleep", SLEEP], timeout=30)
    res.check(["systemd-run"])
    want = cgroup_name(spec.name, lxd.project)
    deadline = time.monotonic() + 30
    while True:
        found = await asyncio.to_thread(host_pids_in, ["sleep", SLEEP], want)
        if found:
            break
        assert time.monotonic() < deadline, f"sleep {SLEEP} never appeared in {spec.name}"
        await asyncio.sleep(0.1)
    assert len(found) == 1, found
    return spec, found[0]


async def test_container_process_is_attributed_to_its_user(lxd, moni, logs_on_failure):
    spec, pid = moni
    logs_on_failure.append(spec.name)
    cgroup = container_of_pid(pid)
    assert cgroup == cgroup_name(spec.name, lxd.project)
    owners = instance_owners(await lxd.list_instances(), lxd.project)
    assert owners[cgroup] == (spec.name, USER)
    assert attribution(cgroup, owners) == {"container": spec.name, "user": USER,
                                           "host": False}
    # This test runs on the host (or in a container of its own, whose
    # cgroup namespace shows it at the root): a host process either way.
    assert container_of_pid(os.getpid()) is None
    assert attribution(container_of_pid(os.getpid()), owners)["host"] is True


async def test_collector_on_real_lxd(lxd, moni, logs_on_failure):
    spec, pid = moni
    logs_on_failure.append(spec.name)
    devs = gpus(1)
    devs[0].processes = [(pid, 3 * GiB), (os.getpid(), GiB)]
    devs[0].memory_used = 4 * GiB
    c = Collector("mon", lxd=lxd, nvml=FakeNVML(devs), containers_interval=0,
                  lxd_timeout=60)
    doc = await c.sample()
    assert doc["containers_error"] is None
    dev = doc["gpus"]["devices"][0]
    assert dev["processes"] == [
        {"pid": pid, "memory": 3 * GiB, "container": spec.name, "user": USER, "host": False},
        {"pid": os.getpid(), "memory": GiB, "container": None, "user": None, "host": True}]
    assert dev["users"] == [{"user": USER, "memory": 3 * GiB}, {"user": None, "memory": GiB}]
    row = next(r for r in doc["containers"] if r["name"] == spec.name)
    assert row["user"] == USER and row["state"] == "running"
    assert row["processes"] >= 2                 # its init and the sleep, at least
    assert row["memory"] > 0 and row["cpu_seconds"] > 0
    assert row["cpu_percent"] is None            # nothing to compare with yet
    # A second read, a second later, gives a rate over the time between the two.
    await asyncio.sleep(1)
    doc = await c.sample()
    again = next(r for r in doc["containers"] if r["name"] == spec.name)
    assert again["cpu_seconds"] >= row["cpu_seconds"]
    assert again["cpu_percent"] is not None and again["cpu_percent"] >= 0
