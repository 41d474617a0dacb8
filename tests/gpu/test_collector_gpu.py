"""The collector on real NVIDIA GPUs: run on a machine that has them (see
README.md here); elsewhere every test skips, saying why.

It samples with the real pynvml and prints each device's readings, the cost
of each NVML call the collector makes (and of ``nvidia-smi -q``, which
lxc-gpu forked every few seconds, where it is installed), and checks a real
CUDA process: listed with its memory, a host process, and idle once it has
held memory without work for ``idle_after`` seconds.
"""

from __future__ import annotations

import asyncio
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time

import pytest

from monitor.collector import Collector

GiB = 1 << 30
CALLS = 50


def show(doc: dict) -> None:
    g = doc["gpus"]
    print(f"\n{doc['time']} status={g['status']} driver={g['driver']} "
          f"cost={doc['cost']['seconds'] * 1000:.2f} ms CPU, {doc['cost']['nvml_calls']} NVML calls")
    for d in g["devices"]:
        used = d["memory_used"] / GiB if d["memory_used"] is not None else float("nan")
        print(f"  GPU {d['index']} {d['name']} {d['uuid']} {d['pci_bus_id']}: "
              f"util {d['utilization']}% mem {used:.2f}/{d['memory_total'] / GiB:.1f} GiB "
              f"temp {d['temperature']} C power {d['power_watts']} W error={d['error']} "
              f"processes={d['processes']} idle={d['idle']}")


async def test_samples_of_the_real_gpus(nvml):
    count = nvml.nvmlDeviceGetCount()
    c = Collector("gpu-test", process_interval=2)          # pynvml imported by the collector
    try:
        docs = []
        for _ in range(5):
            docs.append(await c.sample())
            show(docs[-1])
            await asyncio.sleep(1)
    finally:
        c.close()
    for doc in docs:
        g = doc["gpus"]
        assert g["status"] == "ok" and g["message"] is None, g["message"]
        assert re.fullmatch(r"\d+\.\d+(\.\d+)?", g["driver"]), g["driver"]
        assert len(g["devices"]) == count
        uuids = [d["uuid"] for d in g["devices"]]
        assert len(set(uuids)) == count
        for d in g["devices"]:
            h = nvml.nvmlDeviceGetHandleByIndex(d["index"])
            assert d["error"] is None, d["error"]
            assert d["name"] and d["name"].isprintable()
            assert re.fullmatch(r"(GPU|MIG)-[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}", d["uuid"])
            assert re.fullmatch(r"[0-9A-Fa-f]{4,8}:[0-9A-Fa-f]{2}:[0-9A-Fa-f]{2}\.[0-7]",
                                d["pci_bus_id"]), d["pci_bus_id"]
            assert d["memory_total"] == nvml.nvmlDeviceGetMemoryInfo(h).total
            assert 1 * GiB <= d["memory_total"] <= 1024 * GiB
            assert 0 <= d["memory_used"] <= d["memory_total"]
            assert 0 <= d["utilization"] <= 100
            assert d["temperature"] is None or 0 < d["temperature"] < 120
            assert d["power_watts"] is None or 0 < d["power_watts"] < 2000
            for p in d["processes"]:
                assert p["pid"] > 0 and (p["host"] or p["container"])
    # After the first sample (NVML started, static facts read) a sample is
    # cheap: four readings per GPU, plus its process list now and then.
    # (Fewer where a GPU lacks a reading, such as power: it is not asked again.)
    for doc in docs[1:]:
        assert count <= doc["cost"]["nvml_calls"] <= 5 * count, doc["cost"]
        assert doc["cost"]["seconds"] < 0.25, doc["cost"]


def test_cost_of_each_nvml_call(nvml):
    h = nvml.nvmlDeviceGetHandleByIndex(0)
    calls = [
        ("nvmlDeviceGetUtilizationRates", (h,)),
        ("nvmlDeviceGetMemoryInfo", (h,)),
        ("nvmlDeviceGetTemperature", (h, nvml.NVML_TEMPERATURE_GPU)),
        ("nvmlDeviceGetPowerUsage", (h,)),
        ("nvmlDeviceGetComputeRunningProcesses", (h,)),
        ("nvmlDeviceGetHandleByIndex", (0,)),
        ("nvmlDeviceGetName", (h,)),
        ("nvmlDeviceGetUUID", (h,)),
        ("nvmlDeviceGetPciInfo", (h,)),
        ("nvmlDeviceGetCount", ()),
        ("nvmlSystemGetDriverVersion", ()),
    ]
    print(f"\n{'NVML call (GPU 0)':<40} {'mean µs':>9} {'p50 µs':>9} {'max µs':>9} {'CPU µs':>9}")
    per_sample = 0.0
    for name, args in calls:
        fn = getattr(nvml, name)
        try:
            fn(*args)
        except nvml.NVMLError as e:
            print(f"{name:<40} not available: {e}")
            continue
        times = []
        cpu0 = time.process_time()
        for _ in range(CALLS):
            t = time.perf_counter()
            fn(*args)
            times.append(time.perf_counter() - t)
        cpu = (time.process_time() - cpu0) / CALLS
        print(f"{name:<40} {statistics.mean(times) * 1e6:9.1f} "
              f"{statistics.median(times) * 1e6:9.1f} {max(times) * 1e6:9.1f} {cpu * 1e6:9.1f}")
        if name in ("nvmlDeviceGetUtilizationRates", "nvmlDeviceGetMemoryInfo",
                    "nvmlDeviceGetTemperature", "nvmlDeviceGetPowerUsage"):
            per_sample += statistics.median(times)
        assert statistics.median(times) < 0.1, f"{name} takes {statistics.median(times):.3f} s"
    print(f"the per-second readings of one GPU: {per_sample * 1e6:.0f} µs (p50 sum)")
    smi = shutil.which("nvidia-smi")
    if smi is None:
        print("nvidia-smi is not installed here: no lxc-gpu baseline")
        return
    walls, cpus = [], []
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        subprocess.run([smi, "-q"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       check=False, timeout=120)
        walls.append(time.perf_counter() - t)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    print(f"nvidia-smi -q (lxc-gpu's GPU reading, all GPUs): wall p50 "
          f"{statistics.median(walls) * 1000:.0f} ms, its CPU p50 "
          f"{statistics.median(cpus) * 1000:.0f} ms; the collector's per-second readings of "
          f"one GPU: {per_sample * 1e6:.0f} µs wall")


# A CUDA context through the driver API (libcuda comes with the driver): the
# process holds GPU memory and does no work until its stdin closes.
CUDA_CHILD = r"""
import ctypes, sys
cuda = ctypes.CDLL("libcuda.so.1")
def ok(r, what):
    if r != 0:
        print(f"{what} failed: CUresult {r}", flush=True)
        sys.exit(3)
ok(cuda.cuInit(0), "cuInit")
dev, ctx, ptr = ctypes.c_int(), ctypes.c_void_p(), ctypes.c_uint64()
ok(cuda.cuDeviceGet(ctypes.byref(dev), 0), "cuDeviceGet")
ok(cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
ok(cuda.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
ok(cuda.cuMemAlloc_v2(ctypes.byref(ptr), ctypes.c_size_t(256 << 20)), "cuMemAlloc")
print("ready", flush=True)
sys.stdin.readline()
"""


async def test_a_real_cuda_process_is_listed_and_goes_idle(nvml):
    child = subprocess.Popen([sys.executable, "-c", CUDA_CHILD], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = await asyncio.wait_for(asyncio.to_thread(child.stdout.readline), 60)
        if line.strip() != "ready":
            child.wait(30)
            pytest.skip(f"no CUDA context could be made here: {line.strip()} "
                        f"{child.stderr.read().strip()[-500:]}")
        # Idle after 2 s under 5 % with memory held; processes read each sample.
        c = Collector("gpu-test", process_interval=0, idle_after=2)
        try:
            found = None
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                doc = await c.sample()
                dev = doc["gpus"]["devices"][0]
                mine = [p for p in dev["processes"] if p["pid"] == child.pid]
                if mine and dev["idle"] is not None:
                    found = (dev, mine[0])
                    break
                await asyncio.sleep(0.5)
        finally:
            c.close()
        show(doc)
        assert found is not None, (
            f"process {child.pid} was not listed on GPU 0 as idle: {doc['gpus']['devices'][0]}"
            " (where this test runs in a PID namespace, NVML reports host PIDs)")
        dev, proc = found
        assert proc["host"] is True and proc["container"] is None and proc["user"] is None
        assert proc["memory"] is None or proc["memory"] >= 256 << 20
        assert None in dev["idle"]["users"]
        assert os.getpid() not in [p["pid"] for p in dev["processes"]]
    finally:
        if child.poll() is None:
            child.stdin.close()
            try:
                child.wait(30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
