"""The node agent's load collector, without GPUs: NVML faked at the pynvml
boundary (tests/fixtures/fake_nvml.py), GPU processes placed in containers
through cgroup files under a temporary /proc root, LXD's instance list from
a stand-in at its API boundary, psutil real.  The collector against the real
LXD and /proc is in tests/integration/test_monitor_attribution.py; against
real GPUs in tests/gpu/."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys

import psutil
import pytest

from lxcspawner.lxd import LXDError
from monitor.collector import (
    Collector, attribution, container_of_cgroup, container_of_pid, container_usage,
    instance_owners, iso_time,
    prometheus,
)
from tests.fixtures.fake_nvml import (
    GiB, NVML_ERROR_DRIVER_NOT_LOADED, NVML_ERROR_GPU_IS_LOST, NVML_ERROR_LIBRARY_NOT_FOUND,
    FakeLXD, FakeNVML, gpus, instance, write_cgroup, write_payload_cgroup,
)

T0 = 1_700_000_000.0        # 2023-11-14T22:13:20Z


class Clock:
    def __init__(self, t: float = T0):
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def proc(tmp_path):
    root = tmp_path / "proc"
    root.mkdir()
    return root


def collector(nvml, proc, clock, **kw) -> Collector:
    """A collector reading its containers' load from a cgroup tree beside
    ``proc``, which a FakeLXD keeps equal to its instances' load."""
    kw.setdefault("disks", ("/",))
    root = proc.parent / "cgroup"
    if isinstance(kw.get("lxd"), FakeLXD):
        kw["lxd"].cgroup_root = root
    return Collector("gpu1", nvml=nvml, proc=str(proc), clock=clock, cgroup_root=str(root),
                     **kw)


@pytest.mark.parametrize("v2", [False, True], ids=["cgroup-v1", "cgroup-v2"])
def test_a_containers_load_from_the_hosts_cgroup_files(tmp_path, v2):
    """The payload cgroup of a container, as LXC names it; a stale one of
    the same name (``-1``, left by an earlier run, no processes) is passed
    over for the live one; a project's container has the project's prefix."""
    write_payload_cgroup(tmp_path, "alice--gpu1", v2=v2, cpu_ns=3_000_000, memory=0, processes=0)
    write_payload_cgroup(tmp_path, "alice--gpu1", v2=v2, cpu_ns=12_000_000_000, memory=3 * GiB,
                processes=40, suffix="-1")
    write_payload_cgroup(tmp_path, "lab_bob--gpu1", v2=v2, cpu_ns=2_000_000_000, memory=GiB,
                processes=12)
    assert container_usage("alice--gpu1", str(tmp_path)) == {
        "cpu": 12_000_000_000, "memory": 3 * GiB, "processes": 40}
    assert container_usage("lab_bob--gpu1", str(tmp_path)) == {
        "cpu": 2_000_000_000, "memory": GiB, "processes": 12}
    assert container_usage("alice--gpu10", str(tmp_path)) is None
    assert container_usage("carol--gpu1", str(tmp_path)) is None


async def test_the_containers_load_is_read_from_cgroups_not_lxds_state(tmp_path, proc, clock):
    """With ``cgroup_root`` the collector asks LXD for its instance list
    only (no state: FakeLXD strips it) and reads each running container's
    load from the cgroup files; a stopped one uses nothing; a running one
    whose cgroup is not found has no figures (not zeros)."""
    write_payload_cgroup(tmp_path / "cg", "alice--gpu1", v2=False, cpu_ns=10 * 10**9, memory=3 * GiB,
                processes=40)
    write_payload_cgroup(tmp_path / "cg", "lab_bob--gpu1", v2=False, cpu_ns=2 * 10**9, memory=GiB,
                processes=12)
    lxd = FakeLXD([instance("alice--gpu1", "alice"),
                   instance("bob--gpu1", "bob", project="lab"),
                   instance("carol--gpu1", "carol"),
                   instance("dave--gpu1", "dave", status="Stopped")])
    c = Collector("gpu1", lxd=lxd, nvml=FakeNVML([]), proc=str(proc), clock=clock,
                  disks=("/",), cgroup_root=str(tmp_path / "cg"))
    doc = await c.sample()
    rows = {r["name"]: (r["state"], r["cpu_seconds"], r["memory"], r["processes"])
            for r in doc["containers"]}
    assert rows == {"alice--gpu1": ("running", 10.0, 3 * GiB, 40),
                    "bob--gpu1": ("running", 2.0, GiB, 12),
                    "carol--gpu1": ("running", None, None, None),
                    "dave--gpu1": ("stopped", 0.0, 0, 0)}


# ------------------------------------------------------------------ cgroups

@pytest.mark.parametrize("text, expected", [
    ("0::/lxc.payload.alice--node1/system.slice/ssh.service\n", "alice--node1"),
    ("0::/lxc.payload.lab_bob--node1/user.slice\n", "lab_bob--node1"),        # a project
    ("0::/lxc.payload.c1\n", "c1"),
    # cgroup v1 / hybrid: the v2 line is only "/", a v1 line names it.
    ("12:memory:/lxc.payload.c2/init.scope\n1:name=systemd:/\n0::/\n", "c2"),
    ("4:pids:/lxc/old-c3/system.slice\n0::/\n", "old-c3"),                 # LXC 3
    ("0::/lxc.payload/c4/init.scope\n", "c4"),                             # early LXC 4.0
    ("0::/lxc.monitor.c1\n", None),                   # the host-side monitor process
    ("0::/user.slice/user-1000.slice/session-3.scope\n", None),
    ("0::/system.slice/lxcgpu-node.service\n", None),
    ("0::/system.slice/lxc/not-at-root\n", None),
    # nested: the container this host's LXD knows is the outer one
    ("0::/lxc.payload.outer/lxc.payload.inner/init.scope\n", "outer"),
    ("", None),
])
def test_container_of_cgroup(text, expected):
    assert container_of_cgroup(text) == expected


def test_container_of_pid_reads_the_proc_root(proc):
    write_cgroup(proc, 10, "alice--node1")
    write_cgroup(proc, 11, None)
    write_cgroup(proc, 12, "bob--node1", project="lab", v1=True)
    assert container_of_pid(10, str(proc)) == "alice--node1"
    assert container_of_pid(11, str(proc)) is None
    assert container_of_pid(12, str(proc)) == "lab_bob--node1"
    with pytest.raises(ProcessLookupError):
        container_of_pid(13, str(proc))


def test_owners_and_attribution():
    owners = instance_owners([
        instance("alice--node1", "alice"), instance("bob--node1", "bob", project="lab"),
        instance("build-vm", None), {"name": "", "config": {}},
    ], project=None)
    assert owners == {"alice--node1": ("alice--node1", "alice"),
                      "lab_bob--node1": ("bob--node1", "bob"),
                      "build-vm": ("build-vm", None)}
    # A record without a project takes the client's.
    assert instance_owners([{"name": "x", "config": {}}], project="lab") == {"lab_x": ("x", None)}
    assert attribution("lab_bob--node1", owners) == {
        "container": "bob--node1", "user": "bob", "host": False}
    assert attribution(None, owners) == {"container": None, "user": None, "host": True}
    assert attribution("unknown", owners) == {"container": "unknown", "user": None,
                                              "host": False}


# ------------------------------------------------------------------ a full sample

@pytest.fixture
def node(proc):
    """Three GPUs: alice and bob on 0, a host process and carol (project
    "lab") on 1, a container lxcgpu does not own and a process that ended
    on 2; four containers in LXD."""
    devs = gpus(3)
    devs[0].utilization, devs[0].memory_used, devs[0].temperature = 37, 13 * GiB, 61
    devs[0].processes = [(101, 10 * GiB), (102, 2 * GiB), (103, 1 * GiB)]
    devs[1].utilization, devs[1].memory_used, devs[1].power_mw = 99, 30 * GiB, 301_500
    devs[1].processes = [(201, 4 * GiB), (202, 25 * GiB)]
    devs[2].processes = [(301, None), (302, 1 * GiB)]
    devs[2].name = "NVIDIA H100 80GB HBM3"
    write_cgroup(proc, 101, "alice--gpu1")
    write_cgroup(proc, 102, "bob--gpu1")
    write_cgroup(proc, 103, "alice--gpu1", v1=True)
    write_cgroup(proc, 201, None)
    write_cgroup(proc, 202, "carol--gpu1", project="lab")
    write_cgroup(proc, 301, "ci-runner")
    # 302 has no /proc entry: it ended between NVML's list and the lookup.
    lxd = FakeLXD([
        instance("alice--gpu1", "alice", cpu_ns=10 * 10**9, memory=3 * GiB, processes=40),
        instance("bob--gpu1", "bob", cpu_ns=2 * 10**9, memory=GiB, processes=12),
        instance("carol--gpu1", "carol", project="lab", cpu_ns=0, memory=GiB // 2,
                 processes=9),
        instance("ci-runner", None, cpu_ns=5 * 10**9, memory=2 * GiB, processes=30),
        instance("dave--gpu1", "dave", status="Stopped"),
        {**instance("pool--gpu1--0a1b2c3d", None, status="Stopped"),
         "config": {"user.lxcgpu.pool": "gpu1"}},
    ])
    return FakeNVML(devs, bytes_strings=True), lxd


async def test_sample_attributes_gpu_processes_to_containers_and_users(node, proc, clock):
    nvml, lxd = node
    c = collector(nvml, proc, clock, lxd=lxd)
    doc = await c.sample()
    json.dumps(doc)                                   # JSON-able as it is
    assert c.latest is doc
    assert doc["node"] == "gpu1" and doc["time"] == "2023-11-14T22:13:20Z"
    g = doc["gpus"]
    assert (g["status"], g["message"], g["driver"]) == ("ok", None, "550.54.15")
    d0, d1, d2 = g["devices"]
    assert {k: d0[k] for k in ("index", "name", "uuid", "pci_bus_id", "utilization",
                               "memory_used", "memory_total", "temperature", "power_watts",
                               "error", "idle")} == {
        "index": 0, "name": "NVIDIA A100-SXM4-80GB",
        "uuid": "GPU-00000000-1111-2222-3333-444444444444", "pci_bus_id": "00000000:17:00.0",
        "utilization": 37, "memory_used": 13 * GiB, "memory_total": 80 * GiB,
        "temperature": 61, "power_watts": 62.0, "error": None, "idle": None}
    assert d0["processes"] == [
        {"pid": 101, "memory": 10 * GiB, "container": "alice--gpu1", "user": "alice",
         "host": False},
        {"pid": 102, "memory": 2 * GiB, "container": "bob--gpu1", "user": "bob", "host": False},
        {"pid": 103, "memory": 1 * GiB, "container": "alice--gpu1", "user": "alice",
         "host": False}]
    assert d0["users"] == [{"user": "alice", "memory": 11 * GiB},
                           {"user": "bob", "memory": 2 * GiB}]
    assert d1["power_watts"] == 301.5
    assert d1["processes"] == [
        {"pid": 201, "memory": 4 * GiB, "container": None, "user": None, "host": True},
        {"pid": 202, "memory": 25 * GiB, "container": "carol--gpu1", "user": "carol",
         "host": False}]
    assert d1["users"] == [{"user": "carol", "memory": 25 * GiB},
                           {"user": None, "memory": 4 * GiB}]
    assert d2["name"] == "NVIDIA H100 80GB HBM3"
    assert d2["processes"] == [{"pid": 301, "memory": None, "container": "ci-runner",
                                "user": None, "host": False}]
    assert d2["users"] == [{"user": None, "memory": 0}]
    assert doc["containers_error"] is None
    # A prebuilt container (no one's yet) is marked so.
    assert doc["containers"] == [
        {"name": "alice--gpu1", "user": "alice", "state": "running", "cpu_seconds": 10.0,
         "cpu_percent": None, "memory": 3 * GiB, "processes": 40, "prebuilt": False},
        {"name": "bob--gpu1", "user": "bob", "state": "running", "cpu_seconds": 2.0,
         "cpu_percent": None, "memory": GiB, "processes": 12, "prebuilt": False},
        {"name": "carol--gpu1", "user": "carol", "state": "running", "cpu_seconds": 0.0,
         "cpu_percent": None, "memory": GiB // 2, "processes": 9, "prebuilt": False},
        {"name": "ci-runner", "user": None, "state": "running", "cpu_seconds": 5.0,
         "cpu_percent": None, "memory": 2 * GiB, "processes": 30, "prebuilt": False},
        {"name": "dave--gpu1", "user": "dave", "state": "stopped", "cpu_seconds": 0.0,
         "cpu_percent": None, "memory": 0, "processes": 0, "prebuilt": False},
        {"name": "pool--gpu1--0a1b2c3d", "user": None, "state": "stopped", "cpu_seconds": 0.0,
         "cpu_percent": None, "memory": 0, "processes": 0, "prebuilt": True}]
    assert doc["cost"]["seconds"] >= 0
    # nvmlInit, driver, count; then per GPU: handle, name, uuid, PCI, memory
    # size, and the sample: utilisation, memory, temperature, power, processes.
    assert doc["cost"]["nvml_calls"] == 3 + 3 * 10

    # Five seconds on: alice used 2.5 s of CPU, ci-runner none.
    lxd.instances[0]["state"]["cpu"]["usage"] = int(12.5 * 10**9)
    clock.t += 5
    doc = await c.sample()
    rows = {r["name"]: r for r in doc["containers"]}
    assert rows["alice--gpu1"]["cpu_percent"] == 50.0
    assert rows["alice--gpu1"]["cpu_seconds"] == 12.5
    assert rows["ci-runner"]["cpu_percent"] == 0.0
    assert lxd.calls == 2


async def test_host_load(proc, clock, tmp_path):
    missing = str(tmp_path / "not-mounted")
    c = collector(FakeNVML(gpus(1)), proc, clock, disks=("/", missing))
    first = (await c.sample())["host"]
    assert first["cpu_percent"] is None          # no interval behind psutil's first reading
    assert first["network"]["rx_rate"] is None and first["network"]["tx_rate"] is None
    assert first["cpus"] == psutil.cpu_count()
    assert len(first["load"]) == 3 and all(x >= 0 for x in first["load"])
    mem = first["memory"]
    assert 0 < mem["used"] < mem["total"] and 0 < mem["available"] <= mem["total"]
    root, gone = first["disks"]
    assert root["path"] == "/" and root["total"] >= root["used"] > 0 and root["free"] > 0
    assert gone["path"] == missing and "total" not in gone
    assert gone["error"].startswith(f"cannot read {missing}: ") and "No such file" in gone["error"]
    clock.t += 1
    second = (await c.sample())["host"]
    assert 0.0 <= second["cpu_percent"] <= 100.0
    net = second["network"]
    assert net["rx_bytes"] >= first["network"]["rx_bytes"]
    assert net["rx_rate"] >= 0 and net["tx_rate"] >= 0


# ------------------------------------------------------------------ no GPUs

@pytest.mark.parametrize("code, says", [
    (NVML_ERROR_LIBRARY_NOT_FOUND, "no NVIDIA driver on this server"),
    (NVML_ERROR_DRIVER_NOT_LOADED, "not loaded"),
])
async def test_no_driver_is_no_gpus(proc, clock, code, says):
    nvml = FakeNVML(gpus(2), init_error=code)
    c = collector(nvml, proc, clock, init_retry=60)
    doc = await c.sample()
    assert doc["gpus"]["status"] == "no GPUs"
    assert says in doc["gpus"]["message"] and doc["gpus"]["message"][0].islower()
    assert doc["gpus"]["devices"] == [] and doc["gpus"]["driver"] is None
    assert doc["host"]["memory"]["total"] > 0
    assert "lxcgpu_gpus{node=\"gpu1\"} 0" in prometheus(doc).splitlines()
    # Not tried again every second...
    clock.t += 30
    assert (await c.sample())["gpus"]["status"] == "no GPUs"
    assert nvml.calls["nvmlInit"] == 1
    # ... but once init_retry has passed: the driver is there now.
    nvml.init_error = None
    clock.t += 30
    doc = await c.sample()
    assert nvml.calls["nvmlInit"] == 2
    assert doc["gpus"]["status"] == "ok" and len(doc["gpus"]["devices"]) == 2


async def test_driver_without_gpus(proc, clock):
    doc = await collector(FakeNVML([]), proc, clock).sample()
    assert doc["gpus"] == {"status": "no GPUs", "driver": None, "devices": [], "message":
                           "the NVIDIA driver (550.54.15) is loaded but sees no GPU on this "
                           "server"}


async def test_pynvml_that_cannot_be_imported(proc, clock, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)     # import pynvml -> ImportError
    c = Collector("gpu1", proc=str(proc), clock=clock)
    doc = await c.sample()
    assert doc["gpus"]["status"] == "no GPUs" and doc["gpus"]["devices"] == []
    assert "nvidia-ml-py" in doc["gpus"]["message"]


# ------------------------------------------------------------------ failures mid-run

async def test_one_gpu_failing_mid_run(node, proc, clock):
    nvml, lxd = node
    c = collector(nvml, proc, clock, lxd=lxd)
    await c.sample()
    nvml.devices[1].fail = NVML_ERROR_GPU_IS_LOST
    clock.t += 1
    doc = await c.sample()
    d0, d1, d2 = doc["gpus"]["devices"]
    assert doc["gpus"]["status"] == "ok"
    assert d0["error"] is None and d0["utilization"] == 37 and d2["error"] is None
    assert d1["error"] == ("GPU 1 (00000000:18:00.0) has fallen off the bus (NVML: GPU is "
                           "lost); it needs a GPU reset or a reboot of the server")
    assert d1["utilization"] is None and d1["processes"] == [] and d1["users"] == []
    assert d1["name"] == "NVIDIA A100-SXM4-80GB"          # what was known stays
    assert d1["idle"] is None
    # It comes back: the next sample reads it normally, with the same handle.
    nvml.devices[1].fail = None
    clock.t += 1
    doc = await c.sample()
    d1 = doc["gpus"]["devices"][1]
    assert d1["error"] is None and d1["utilization"] == 99
    assert [p["pid"] for p in d1["processes"]] == [201, 202]
    assert nvml.calls["nvmlDeviceGetHandleByIndex"] == 3


async def test_every_gpu_failing_and_the_driver_coming_back(node, proc, clock):
    nvml, lxd = node
    c = collector(nvml, proc, clock, init_retry=60)
    await c.sample()
    for d in nvml.devices:
        d.fail = NVML_ERROR_GPU_IS_LOST
    clock.t += 1
    doc = await c.sample()
    assert doc["gpus"]["status"] == "error"
    assert doc["gpus"]["message"].startswith("every GPU failed to answer: GPU 0 ")
    assert all(d["error"] for d in doc["gpus"]["devices"])
    for d in nvml.devices:
        d.fail = None
    # The driver itself goes away (unloaded for an upgrade).
    nvml.lost = True
    clock.t += 1
    doc = await c.sample()
    assert doc["gpus"]["status"] == "error" and "Uninitialized" in doc["gpus"]["message"]
    # NVML is started again on the next sample; the driver is not loaded yet.
    nvml.lost = False
    nvml.init_error = NVML_ERROR_DRIVER_NOT_LOADED
    clock.t += 1
    doc = await c.sample()
    assert doc["gpus"]["status"] == "no GPUs" and "not loaded" in doc["gpus"]["message"]
    nvml.init_error = None
    clock.t += 60
    doc = await c.sample()
    assert doc["gpus"]["status"] == "ok" and doc["gpus"]["devices"][0]["utilization"] == 37
    assert nvml.calls["nvmlInit"] == 3


async def test_unsupported_readings_are_null_and_not_asked_again(proc, clock):
    devs = gpus(2)
    devs[1].unsupported = {"power"}
    nvml = FakeNVML(devs)
    c = collector(nvml, proc, clock)
    for _ in range(3):
        doc = await c.sample()
        clock.t += 1
    assert doc["gpus"]["devices"][1]["power_watts"] is None
    assert doc["gpus"]["devices"][1]["error"] is None
    assert doc["gpus"]["devices"][0]["power_watts"] == 62.0
    assert nvml.calls["nvmlDeviceGetPowerUsage"] == 3 + 1


async def test_a_process_list_that_fails_keeps_the_readings(node, proc, clock, caplog):
    caplog.set_level(logging.INFO, logger="lxcgpu.collector")
    nvml, _ = node
    nvml.devices[0].unsupported = {"processes"}
    c = collector(nvml, proc, clock, process_interval=5)
    for _ in range(3):                  # one list read, then two samples reusing it
        doc = await c.sample()
        d0 = doc["gpus"]["devices"][0]
        assert doc["gpus"]["status"] == "ok"
        assert d0["utilization"] == 37 and d0["processes"] == [] and d0["idle"] is None
        assert d0["error"] == ("NVML could not read the processes of GPU 0 "
                               "(00000000:17:00.0): Not Supported")
        clock.t += 1
    assert caplog.text.count("could not read the processes of GPU 0") == 1   # logged once
    nvml.devices[0].unsupported = set()
    clock.t += 2
    d0 = (await c.sample())["gpus"]["devices"][0]
    assert d0["error"] is None and [p["pid"] for p in d0["processes"]] == [101, 102, 103]
    assert "GPU 0 answers again" in caplog.text


async def test_lxd_error_is_reported_and_survived(node, proc, clock):
    nvml, lxd = node
    c = collector(nvml, proc, clock, lxd=lxd, containers_interval=5)
    await c.sample()
    lxd.error = LXDError("GET /1.0/instances: HTTP 500", 500)
    clock.t += 5
    doc = await c.sample()
    assert doc["containers"] == []
    assert doc["containers_error"] == ("LXD could not list the containers: "
                                       "GET /1.0/instances: HTTP 500")
    # GPU processes keep their owners from the last list.
    assert doc["gpus"]["devices"][0]["processes"][0]["user"] == "alice"
    lxd.error = None
    clock.t += 1
    assert (await c.sample())["containers_error"] is not None      # not asked again yet
    clock.t += 4
    doc = await c.sample()
    assert doc["containers_error"] is None and len(doc["containers"]) == 6
    assert lxd.calls == 3


async def test_slow_lxd_does_not_hold_the_sample(node, proc, clock):
    nvml, lxd = node
    gate = asyncio.Event()
    real = lxd.list_instances

    async def slow(**kw):
        await gate.wait()
        return await real(**kw)
    lxd.list_instances = slow
    c = collector(nvml, proc, clock, lxd=lxd, lxd_timeout=0.05)
    doc = await c.sample()
    assert doc["containers"] == [] and doc["containers_error"] == (
        "LXD has not listed the containers in 0.05 s; still waiting")
    assert doc["gpus"]["devices"][0]["processes"][0]["container"] == "alice--gpu1"
    gate.set()
    # LXD answers; the list's cgroup files are read in a thread meanwhile.
    await asyncio.sleep(0.1)
    clock.t += 1
    doc = await c.sample()
    assert doc["containers_error"] is None and len(doc["containers"]) == 6
    assert doc["gpus"]["devices"][0]["processes"][0]["user"] == "alice"


async def test_without_lxd(proc, clock):
    doc = await collector(FakeNVML(gpus(1)), proc, clock, lxd=None).sample()
    assert doc["containers"] == [] and doc["containers_error"] is None


# ------------------------------------------------------------------ cadence

async def test_processes_are_read_every_process_interval(node, proc, clock):
    nvml, _ = node
    c = collector(nvml, proc, clock, process_interval=5)
    costs = []
    for second in range(7):
        if second == 1:
            nvml.devices[2].processes.append((303, 3 * GiB))
            write_cgroup(proc, 303, "bob--gpu1")
        doc = await c.sample()
        costs.append(doc["cost"]["nvml_calls"])
        pids = [p["pid"] for p in doc["gpus"]["devices"][2]["processes"]]
        # The list read at 0 s is reused until 5 s.
        assert pids == ([301] if second < 5 else [301, 303]), second
        clock.t += 1
    assert nvml.calls["nvmlDeviceGetComputeRunningProcesses"] == 2 * 3
    assert nvml.calls["nvmlInit"] == 1 and nvml.calls["nvmlDeviceGetName"] == 3
    # 4 readings per GPU each second, and its process list every fifth.
    assert costs == [33, 12, 12, 12, 12, 15, 12]


# ------------------------------------------------------------------ idle GPUs

async def test_idle_gpu_marking(proc, clock):
    devs = gpus(3)
    devs[0].processes = [(101, 20 * GiB)]       # alice: memory held, no work
    devs[0].utilization = 1
    devs[1].utilization = 0                      # nobody at all: not idle
    devs[2].processes = [(301, None)]            # memory NVML cannot report counts as held
    devs[2].utilization = 4
    write_cgroup(proc, 101, "alice--gpu1")
    write_cgroup(proc, 301, None)
    lxd = FakeLXD([instance("alice--gpu1", "alice")])
    c = collector(FakeNVML(devs), proc, clock, lxd=lxd, idle_after=1800, idle_utilization=5)

    async def idle():
        return [d["idle"] for d in (await c.sample())["gpus"]["devices"]]

    assert await idle() == [None, None, None]
    clock.t += 1799
    assert await idle() == [None, None, None]
    clock.t += 1
    assert await idle() == [{"since": "2023-11-14T22:13:20Z", "users": ["alice"]}, None,
                            {"since": "2023-11-14T22:13:20Z", "users": [None]}]
    doc = c.latest
    lines = prometheus(doc).splitlines()
    uuid0 = doc["gpus"]["devices"][0]["uuid"]
    assert f'lxcgpu_gpu_idle{{node="gpu1",gpu="0",uuid="{uuid0}"}} 1' in lines
    assert f'lxcgpu_gpu_idle{{node="gpu1",gpu="1",uuid="{doc["gpus"]["devices"][1]["uuid"]}"}} 0' \
        in lines
    # One second of work (5 % is not under the threshold) starts it over.
    c._gpus.nvml.devices[0].utilization = 5
    clock.t += 1
    assert (await idle())[0] is None
    c._gpus.nvml.devices[0].utilization = 0
    clock.t += 1
    restart = clock.t
    assert (await idle())[0] is None
    clock.t += 1800
    assert (await idle())[0] == {"since": iso_time(restart), "users": ["alice"]}
    # The process ends: no memory held, not idle.
    c._gpus.nvml.devices[0].processes = []
    clock.t += 5
    assert (await idle())[0] is None


# ------------------------------------------------------------------ Prometheus

# The exposition format's grammar for names, labels and escaped values.
_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_ESCAPED = r'(?:[^"\\\n]|\\[\\"n])*'
_SAMPLE = re.compile(rf'^({_NAME})\{{((?:[a-zA-Z_][a-zA-Z0-9_]*="{_ESCAPED}",?)*)\}} (\S+)$')
_LABEL = re.compile(rf'([a-zA-Z_][a-zA-Z0-9_]*)="({_ESCAPED})"')


def parse(text: str) -> tuple[dict[str, str], list[tuple[str, dict[str, str], float]]]:
    """Types by metric, and samples, of a text exposition; each family's
    lines together, after its HELP and TYPE."""
    types, samples, order = {}, [], []
    for line in text.splitlines():
        if line.startswith("# HELP "):
            order.append(line.split()[2])
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            assert name == order[-1]
            types[name] = kind
            continue
        m = _SAMPLE.match(line)
        assert m, f"not a sample line: {line!r}"
        assert m.group(1) == order[-1], f"{m.group(1)} outside its family"
        labels = {k: re.sub(r"\\(.)", lambda e: {"n": "\n"}.get(e.group(1), e.group(1)), v)
                  for k, v in _LABEL.findall(m.group(2))}
        samples.append((m.group(1), labels, float(m.group(3))))
    assert len(order) == len(set(order))
    return types, samples


async def test_prometheus_exposition(node, proc, clock):
    nvml, lxd = node
    lxd.instances[0]["config"]["user.lxcgpu.owner"] = 'o"brien\\x'     # quote, backslash
    c = collector(nvml, proc, clock, lxd=lxd)
    await c.sample()
    lxd.instances[0]["state"]["cpu"]["usage"] = 11 * 10**9
    clock.t += 5
    doc = await c.sample()
    doc["node"] = "gpu1\nb"                               # escaping of newlines too
    text = prometheus(doc)
    assert text.endswith("\n")
    assert 'user="o\\"brien\\\\x"' in text and 'node="gpu1\\nb"' in text
    types, samples = parse(text)
    assert set(types.values()) == {"gauge"}
    assert set(types) == {
        "lxcgpu_gpus", "lxcgpu_gpu_utilization_percent", "lxcgpu_gpu_memory_used_bytes",
        "lxcgpu_gpu_memory_total_bytes", "lxcgpu_gpu_temperature_celsius",
        "lxcgpu_gpu_power_watts", "lxcgpu_gpu_idle", "lxcgpu_gpu_user_memory_bytes",
        "lxcgpu_host_cpu_percent", "lxcgpu_host_memory_used_bytes", "lxcgpu_host_load1",
        "lxcgpu_container_cpu_percent", "lxcgpu_container_memory_bytes"}
    got = {(name, tuple(sorted(labels.items()))): value for name, labels, value in samples}
    node = "gpu1\nb"
    uuid0 = doc["gpus"]["devices"][0]["uuid"]
    g0 = (("gpu", "0"), ("node", node), ("uuid", uuid0))
    assert got[("lxcgpu_gpus", (("node", node),))] == 3
    assert got[("lxcgpu_gpu_utilization_percent", g0)] == 37
    assert got[("lxcgpu_gpu_memory_used_bytes", g0)] == 13 * GiB
    assert got[("lxcgpu_gpu_memory_total_bytes", g0)] == 80 * GiB
    assert got[("lxcgpu_gpu_temperature_celsius", g0)] == 61
    assert got[("lxcgpu_gpu_power_watts", g0)] == 62.0
    assert got[("lxcgpu_gpu_idle", g0)] == 0
    assert got[("lxcgpu_gpu_user_memory_bytes", g0[:2] + (("user", 'o"brien\\x'),) + g0[2:])] \
        == 11 * GiB
    g1 = (("gpu", "1"), ("node", node), ("uuid", doc["gpus"]["devices"][1]["uuid"]))
    assert got[("lxcgpu_gpu_user_memory_bytes", g1[:2] + (("user", ""),) + g1[2:])] == 4 * GiB
    assert got[("lxcgpu_host_memory_used_bytes", (("node", node),))] == \
        doc["host"]["memory"]["used"]
    assert got[("lxcgpu_host_load1", (("node", node),))] == doc["host"]["load"][0]
    assert ("lxcgpu_host_cpu_percent", (("node", node),)) in got
    alice = (("container", "alice--gpu1"), ("node", node), ("user", 'o"brien\\x'))
    assert got[("lxcgpu_container_cpu_percent", alice)] == 20.0
    assert got[("lxcgpu_container_memory_bytes", alice)] == 3 * GiB
    runner = (("container", "ci-runner"), ("node", node), ("user", ""))
    assert got[("lxcgpu_container_memory_bytes", runner)] == 2 * GiB
    user_series = [s for s in samples if s[0] == "lxcgpu_gpu_user_memory_bytes"]
    assert len(user_series) == 2 + 2 + 1


async def test_prometheus_of_a_failed_gpu_leaves_readings_out(node, proc, clock):
    nvml, _ = node
    nvml.devices[2].fail = NVML_ERROR_GPU_IS_LOST
    doc = await collector(nvml, proc, clock).sample()
    _, samples = parse(prometheus(doc))
    assert not [s for s in samples if s[1].get("gpu") == "2"]
    assert [s[2] for s in samples if s[0] == "lxcgpu_gpus"] == [3]


# ------------------------------------------------------------------ run()

async def test_run_keeps_latest_and_outlives_a_bad_sample(proc, clock, caplog):
    class Flaky(FakeNVML):
        bad = 1

        def nvmlDeviceGetUtilizationRates(self, handle):
            if self.bad:
                self.bad -= 1
                raise RuntimeError("a bug in a binding")
            return super().nvmlDeviceGetUtilizationRates(handle)

    c = collector(Flaky(gpus(2)), proc, clock)
    task = asyncio.ensure_future(c.run(interval=0.01))
    try:
        for _ in range(500):
            if c.latest is not None:
                break
            await asyncio.sleep(0.01)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert c.latest["gpus"]["status"] == "ok" and len(c.latest["gpus"]["devices"]) == 2
    assert "sampling gpu1 failed" in caplog.text and "a bug in a binding" in caplog.text
