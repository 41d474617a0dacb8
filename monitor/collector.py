"""The node agent's load collector: what one GPU server is doing, and for whom.

lxc-gpu answered "who is using GPU 3?" by forking ``nvidia-smi -q``, ``ps
auxww``, ``free``, ``df``, ``mpstat`` and ``iostat`` every few seconds and
parsing their text.  This module asks the sources directly, in-process:

- **GPUs** through NVML (``pynvml``, from nvidia-ml-py).  NVML is started
  once; each device's handle and static facts (name, UUID, PCI bus id,
  memory size) are read once; utilisation, memory used, temperature and
  power every sample; the per-process memory lists, the costliest calls,
  only every ``process_interval`` seconds (the last list is reused between).
  A server without a driver or GPUs gets ``"status": "no GPUs"`` and a
  sentence saying why, never an exception; a device that fails mid-run is
  reported with its error beside the others, and a driver that went away
  is started again on a later sample.
- **Attribution**: a GPU process's host PID is placed in its LXD container
  by its cgroup (``/proc/PID/cgroup``: ``/lxc.payload.<name>``), and the
  container is placed with its lxcgpu user by the ``user.lxcgpu.owner`` key
  of LXD's instance config.  A process outside any container is a host
  process (``"host": true``).
- **Host load** through psutil (CPU, load, memory, network, the disks asked
  for), and **per-container load** (CPU time, memory, processes) from the
  host's cgroup files of each running container in LXD's instance list,
  read every ``containers_interval`` seconds (LXD's own state of every
  instance cost its daemon 0.27 s of CPU per read with 11 containers).
- **Idle GPUs** as data: a GPU whose processes hold memory while its
  utilisation stays under ``idle_utilization`` percent for ``idle_after``
  seconds carries ``"idle": {"since": ..., "users": [...]}``.

All blocking work of a sample (NVML, /proc, psutil) runs in one
``asyncio.to_thread`` call; LXD is asked through its own async client,
alongside.  ``sample()`` returns one JSON-able document and keeps it in
``latest``, so that HTTP requests read ``latest`` and never call NVML
themselves: the cost of the agent is one sample a second, whatever the
number of readers.  :func:`prometheus` renders a document for Prometheus.

A disk path on a network mount that hangs blocks the sample: list local
paths in ``disks``.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import platform
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Mapping, Sequence

import psutil

from lxcspawner.lxd import instance_status
from lxcspawner.naming import KEY_PREFIX

log = logging.getLogger("lxcgpu.collector")

OWNER_KEY = f"{KEY_PREFIX}owner"
#: A prebuilt container, no one's yet (lxcspawner.pool).
PREBUILT_KEY = f"{KEY_PREFIX}pool"

# NVML's error codes (nvml.h); read from the module where it has them.
_NVML_CODES = {
    "UNINITIALIZED": 1, "NOT_SUPPORTED": 3, "NO_PERMISSION": 4, "DRIVER_NOT_LOADED": 9,
    "LIBRARY_NOT_FOUND": 12, "FUNCTION_NOT_FOUND": 13, "GPU_IS_LOST": 15,
    "RESET_REQUIRED": 16, "LIB_RM_VERSION_MISMATCH": 18,
}
# Errors that say the library or the driver is gone, not one device.
_LIBRARY_GONE = ("UNINITIALIZED", "DRIVER_NOT_LOADED", "LIBRARY_NOT_FOUND",
                 "LIB_RM_VERSION_MISMATCH")
# NVML reports a value it does not have as all ones (NVML_VALUE_NOT_AVAILABLE).
_NOT_AVAILABLE = (1 << 64) - 1


# ------------------------------------------------------------------ attribution

# cgroup v2 (``0::/lxc.payload.c1/...``) and v1 (``4:memory:/lxc.payload.c1``)
# as LXC >= 4 names them (``lxc.payload/c1`` in early 4.0 releases); LXC 3
# used ``/lxc/c1``.  ``lxc.monitor.c1`` is the host-side monitor: not inside.
_PAYLOAD = re.compile(r"/lxc\.payload[./]([^/\s]+)")
_LXC3 = re.compile(r"^/lxc/([^/\s]+)")


def container_of_cgroup(text: str) -> str | None:
    """The container named in the text of a ``/proc/PID/cgroup`` file, as
    LXC names its cgroup (``<project>_<name>`` outside LXD's default
    project), or None for a process outside every container.  The cgroup v2
    line is read first; the outermost container wins where they nest."""
    lines = text.splitlines()
    for line in sorted(lines, key=lambda ln: not ln.startswith("0::")):
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        match = _PAYLOAD.search(parts[2]) or _LXC3.match(parts[2])
        if match:
            return match.group(1)
    return None


CGROUP_ROOT = "/sys/fs/cgroup"
_SUFFIX = re.compile(r"^-\d+$")


def _read_int(path: str) -> int | None:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _cpu_stat_usec(path: str) -> int | None:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(" ")
                if key == "usage_usec":
                    return int(value)
    except (OSError, ValueError):
        pass
    return None


def _payload_dirs(parent: str, cgname: str) -> list[str]:
    """The payload cgroup directories of a container under ``parent``: LXC
    names it ``lxc.payload.<name>`` and, where a stale one of that name was
    left, ``lxc.payload.<name>-<n>``."""
    base = f"lxc.payload.{cgname}"
    try:
        names = [n for n in os.listdir(parent)
                 if n == base or (n.startswith(base) and _SUFFIX.match(n[len(base):]))]
    except OSError:
        return []
    return [os.path.join(parent, n) for n in names]


def container_usage(cgname: str, root: str = CGROUP_ROOT) -> dict[str, int] | None:
    """A running container's CPU time (ns), memory (bytes) and processes,
    read from the host's cgroup files of its payload cgroup (cgroup v2, or
    the v1 ``cpuacct``, ``memory`` and ``pids`` controllers): what LXD's
    instance state reports, without LXD computing the rest of a state
    (disk usage, network) for every container.  Of several directories of
    that name (stale ones left by earlier runs), the one holding processes.
    None where none is found."""
    def live(candidates: list[str], pids_file: str) -> str | None:
        best = None
        for d in candidates:
            n = _read_int(os.path.join(d, pids_file))
            if n:
                return d
            if n is not None and best is None:
                best = d
        return best

    v2 = live([d for d in _payload_dirs(root, cgname)
               if os.path.exists(os.path.join(d, "cpu.stat"))], "pids.current")
    if v2 is not None:
        usec = _cpu_stat_usec(os.path.join(v2, "cpu.stat"))
        return {"cpu": None if usec is None else usec * 1000,
                "memory": _read_int(os.path.join(v2, "memory.current")),
                "processes": _read_int(os.path.join(v2, "pids.current"))}
    pids = live(_payload_dirs(os.path.join(root, "pids"), cgname), "pids.current")
    if pids is None:
        return None
    suffix = os.path.basename(pids)
    cpu = next((os.path.join(root, c, suffix, "cpuacct.usage")
                for c in ("cpuacct", "cpu,cpuacct", "cpu")
                if os.path.exists(os.path.join(root, c, suffix, "cpuacct.usage"))), None)
    return {"cpu": _read_int(cpu) if cpu else None,
            "memory": _read_int(os.path.join(root, "memory", suffix, "memory.usage_in_bytes")),
            "processes": _read_int(os.path.join(pids, "pids.current"))}


def container_of_pid(pid: int, proc: str = "/proc") -> str | None:
    """The container (its cgroup name, see :func:`container_of_cgroup`) that
    the host process ``pid`` runs in, or None for a host process.  Raises
    ProcessLookupError when no process has that id (any longer)."""
    path = os.path.join(proc, str(int(pid)), "cgroup")
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError):
        raise ProcessLookupError(f"no process {pid} (it has ended)") from None
    return container_of_cgroup(text)


def cgroup_name(name: str, project: str | None = None) -> str:
    """The name LXC gives an instance's cgroup: LXD prefixes the project's
    name to instances outside the default project."""
    return name if project in (None, "", "default") else f"{project}_{name}"


def instance_owners(instances: Iterable[Mapping],
                    project: str | None = None) -> dict[str, tuple[str, str | None]]:
    """From LXD's instance records: cgroup name -> (instance name, lxcgpu
    user from ``user.lxcgpu.owner``, or None for a container lxcgpu does not
    own).  ``project`` is the client's project, for records without one."""
    out: dict[str, tuple[str, str | None]] = {}
    for inst in instances:
        name = inst.get("name")
        if not name:
            continue
        owner = (inst.get("config") or {}).get(OWNER_KEY) or None
        out[cgroup_name(name, inst.get("project") or project)] = (name, owner)
    return out


def attribution(cgroup: str | None,
                owners: Mapping[str, tuple[str, str | None]]) -> dict[str, Any]:
    """``{"container", "user", "host"}`` for a process in ``cgroup`` (None:
    on the host).  A container LXD did not list keeps its cgroup name."""
    if cgroup is None:
        return {"container": None, "user": None, "host": True}
    name, user = owners.get(cgroup, (cgroup, None))
    return {"container": name, "user": user, "host": False}


# ------------------------------------------------------------------ helpers

def iso_time(t: float) -> str:
    """A clock reading as ISO 8601 UTC, to the second."""
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _text(value: Any) -> str:
    """NVML's strings: bytes in older pynvml releases, str in newer ones."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace").rstrip("\0")
    return str(value)


# ------------------------------------------------------------------ NVML

@dataclass
class _Device:
    """What is known of one GPU between samples."""

    index: int
    handle: Any = None
    name: str | None = None
    uuid: str | None = None
    pci_bus_id: str | None = None
    memory_total: int | None = None
    unsupported: set[str] = field(default_factory=set)
    error: str | None = None            # the last sample's, to log changes only
    processes_error: str | None = None  # the last process list's, shown until the next
    # The last process list: (host pid, memory bytes or None, cgroup name or None).
    processes: list[tuple[int, int | None, str | None]] = field(default_factory=list)


class _NVMLReader:
    """NVML's side of a sample; runs in the sampling thread only."""

    def __init__(self, nvml: Any, *, proc: str, process_interval: float, init_retry: float):
        self.nvml = nvml               # None: import pynvml at the first sample
        self.proc = proc
        self.process_interval = process_interval
        self.init_retry = init_retry
        self.devices: list[_Device] = []
        self.driver: str | None = None
        self.ready = False          # started, and the devices are known
        self._started = False       # nvmlInit succeeded (and wants an nvmlShutdown)
        self.calls = 0
        self._down_message = "NVML has not been started yet"
        self._next_init = float("-inf")
        self._processes_at: float | None = None

    def _code(self, name: str) -> int:
        return getattr(self.nvml, f"NVML_ERROR_{name}", _NVML_CODES[name])

    def _is(self, error: Exception, *names: str) -> bool:
        return getattr(error, "value", None) in {self._code(n) for n in names}

    def _call(self, fn: str, *args: Any) -> Any:
        self.calls += 1
        return getattr(self.nvml, fn)(*args)

    # Starting and stopping.

    def _start(self) -> str | None:
        """Start NVML and find the devices; a sentence if there are none."""
        if self.nvml is None:
            try:
                self.nvml = importlib.import_module("pynvml")
            except ImportError as e:
                return (f"the NVML Python bindings cannot be loaded ({e}); install "
                        "nvidia-ml-py on this server to see its GPUs")
        try:
            self._call("nvmlInit")
        except self.nvml.NVMLError as e:
            return self._start_failure(e)
        self._started = True
        try:
            driver = _text(self._call("nvmlSystemGetDriverVersion"))
            count = int(self._call("nvmlDeviceGetCount"))
        except Exception as e:  # noqa: BLE001 - NVML is started: shut it down again
            self.stop()
            return f"NVML started but could not list the GPUs: {e}"
        if count == 0:
            self.stop()
            return f"the NVIDIA driver ({driver}) is loaded but sees no GPU on this server"
        self.driver = driver
        self.devices = [_Device(i) for i in range(count)]
        self.ready = True
        self._processes_at = None
        log.info("NVML started: driver %s, %d GPUs", driver, count)
        return None

    def _start_failure(self, e: Exception) -> str:
        if self._is(e, "LIBRARY_NOT_FOUND"):
            return "no NVIDIA driver on this server (NVML's library libnvidia-ml is not installed)"
        if self._is(e, "DRIVER_NOT_LOADED"):
            return "the NVIDIA driver is installed but not loaded (no nvidia kernel module)"
        if self._is(e, "LIB_RM_VERSION_MISMATCH"):
            return ("the NVIDIA driver's library and kernel module are of different versions: "
                    "reboot the server after a driver upgrade")
        if self._is(e, "NO_PERMISSION"):
            return "this agent may not use the NVIDIA driver (no permission on /dev/nvidia*)"
        return f"NVML could not start: {e}"

    def stop(self) -> None:
        """Shut NVML down (it counts starts) and forget the devices."""
        if self._started:
            self._started = False
            try:
                self._call("nvmlShutdown")
            except Exception:  # noqa: BLE001 - shutting down a library that went away
                pass
        self.ready = False
        self.devices = []
        self.driver = None

    # Reading.

    def read(self, now: float) -> dict[str, Any]:
        """The GPU part of a document (processes by cgroup name, not yet by
        user: the owners come from LXD, outside this thread)."""
        if not self.ready:
            if now < self._next_init:
                return self._no_gpus()
            message = self._start()
            if message is not None:
                if message != self._down_message:
                    log.info("no GPUs: %s", message)
                self._down_message = message
                self._next_init = now + self.init_retry
                return self._no_gpus()
        refresh = self._processes_at is None or now - self._processes_at >= self.process_interval
        rows, failed, gone = [], 0, []
        for dev in self.devices:
            row, error = self._read_device(dev, refresh)
            rows.append(row)
            if error is not None:
                failed += 1
                if self._is(error, *_LIBRARY_GONE):
                    gone.append(error)
        if refresh:
            self._processes_at = now
        if rows and failed == len(rows):
            if len(gone) == len(rows):
                # The driver went away (unloaded, upgraded): start NVML
                # again on the next sample.
                log.warning("NVML lost the driver (%s); starting it again", gone[0])
                self.stop()
                self._next_init = now
            return {"status": "error", "message": f"every GPU failed to answer: {rows[0]['error']}",
                    "driver": self.driver, "devices": rows}
        return {"status": "ok", "message": None, "driver": self.driver, "devices": rows}

    def _no_gpus(self) -> dict[str, Any]:
        return {"status": "no GPUs", "message": self._down_message, "driver": None,
                "devices": []}

    def _device_error(self, dev: _Device, e: Exception, what: str) -> str:
        which = f"GPU {dev.index}" + (f" ({dev.pci_bus_id})" if dev.pci_bus_id else "")
        if self._is(e, "GPU_IS_LOST"):
            return (f"{which} has fallen off the bus (NVML: {e}); it needs a GPU reset or a "
                    "reboot of the server")
        if self._is(e, "RESET_REQUIRED"):
            return f"{which} needs a reset (NVML: {e})"
        return f"NVML could not read {what} of {which}: {e}"

    def _optional(self, dev: _Device, key: str, fn: str, *args: Any) -> Any:
        """A reading some GPUs do not have (power, temperature): None there,
        and not asked again."""
        if key in dev.unsupported:
            return None
        try:
            return self._call(fn, dev.handle, *args)
        except self.nvml.NVMLError as e:
            if self._is(e, "NOT_SUPPORTED"):
                dev.unsupported.add(key)
                return None
            raise

    def _read_device(self, dev: _Device, refresh: bool) -> tuple[dict[str, Any], Exception | None]:
        row: dict[str, Any] = {
            "index": dev.index, "name": dev.name, "uuid": dev.uuid,
            "pci_bus_id": dev.pci_bus_id, "utilization": None, "memory_used": None,
            "memory_total": dev.memory_total, "temperature": None, "power_watts": None,
            "error": None, "processes": dev.processes,
        }
        what = "the identity"
        try:
            if dev.handle is None:
                handle = self._call("nvmlDeviceGetHandleByIndex", dev.index)
                dev.name = _text(self._call("nvmlDeviceGetName", handle))
                dev.uuid = _text(self._call("nvmlDeviceGetUUID", handle))
                dev.pci_bus_id = _text(self._call("nvmlDeviceGetPciInfo", handle).busId)
                dev.memory_total = int(self._call("nvmlDeviceGetMemoryInfo", handle).total)
                dev.handle = handle
                row.update(name=dev.name, uuid=dev.uuid, pci_bus_id=dev.pci_bus_id,
                           memory_total=dev.memory_total)
            what = "the load"
            util = self._optional(dev, "utilization", "nvmlDeviceGetUtilizationRates")
            row["utilization"] = None if util is None else int(util.gpu)
            row["memory_used"] = int(self._call("nvmlDeviceGetMemoryInfo", dev.handle).used)
            row["temperature"] = self._optional(dev, "temperature", "nvmlDeviceGetTemperature",
                                                self.nvml.NVML_TEMPERATURE_GPU)
            power = self._optional(dev, "power", "nvmlDeviceGetPowerUsage")
            row["power_watts"] = None if power is None else round(power / 1000, 3)
        except self.nvml.NVMLError as e:
            # Whether its processes still run is unknown: none are shown.
            row.update(error=self._device_error(dev, e, what), processes=[])
            self._log_change(dev, row["error"])
            return row, e
        if refresh:
            try:
                found = self._call("nvmlDeviceGetComputeRunningProcesses", dev.handle)
                dev.processes_error = None
            except self.nvml.NVMLError as e:
                # The load was read: the device works, only its list is missing.
                dev.processes_error = self._device_error(dev, e, "the processes")
                found = []
            dev.processes = self._attribute(found)
            row["processes"] = dev.processes
        row["error"] = dev.processes_error
        self._log_change(dev, row["error"])
        return row, None

    @staticmethod
    def _log_change(dev: _Device, error: str | None) -> None:
        """Log a device's error once, when it starts, and its recovery."""
        if error != dev.error:
            if error is not None:
                log.warning("%s", error)
            else:
                log.info("GPU %d answers again", dev.index)
            dev.error = error

    def _attribute(self, found: Iterable[Any]) -> list[tuple[int, int | None, str | None]]:
        out = []
        for p in found:
            pid = int(p.pid)
            memory = p.usedGpuMemory
            memory = None if memory is None or memory >= _NOT_AVAILABLE else int(memory)
            try:
                cgroup = container_of_pid(pid, self.proc)
            except ProcessLookupError:
                continue                # it ended since NVML listed it
            except OSError as e:
                log.debug("cannot read the cgroup of process %d: %s", pid, e)
                continue
            out.append((pid, memory, cgroup))
        return out


# ------------------------------------------------------------------ host

class _HostReader:
    """psutil's side of a sample; runs in the sampling thread only."""

    def __init__(self, *, disks: Sequence[str], nics: Sequence[str] | None):
        self.disks = tuple(disks)
        self.nics = None if nics is None else tuple(nics)
        self._cpu_primed = False
        self._net: tuple[float, int, int] | None = None
        self._physical: dict[str, bool] = {}
        self._cpus = psutil.cpu_count() or os.cpu_count() or 1

    def _counted(self, names: Iterable[str]) -> list[str]:
        """The interfaces whose traffic is the server's: those asked for, else
        the physical ones (a container's traffic crosses its veth, the bridge
        and the uplink: counting all of them would count it three times)."""
        if self.nics is not None:
            return [n for n in names if n in self.nics]
        # Looked up once per interface; veths come and go with containers,
        # so the table holds only the present ones.
        known = self._physical
        self._physical = {n: known[n] if n in known else
                          os.path.exists(f"/sys/class/net/{n}/device") for n in names}
        physical = [n for n, yes in self._physical.items() if yes]
        return physical or [n for n in names if n != "lo"]

    def read(self, now: float) -> dict[str, Any]:
        # psutil's first non-blocking reading has no interval behind it.
        cpu = psutil.cpu_percent(interval=None)
        cpu_percent = cpu if self._cpu_primed else None
        self._cpu_primed = True
        mem = psutil.virtual_memory()
        per_nic = psutil.net_io_counters(pernic=True)
        names = self._counted(per_nic)
        rx = sum(per_nic[n].bytes_recv for n in names)
        tx = sum(per_nic[n].bytes_sent for n in names)
        rx_rate = tx_rate = None
        if self._net is not None and now > self._net[0]:
            dt = now - self._net[0]
            # A counter that went back (an interface gone) gives no rate.
            if rx >= self._net[1] and tx >= self._net[2]:
                rx_rate = round((rx - self._net[1]) / dt, 1)
                tx_rate = round((tx - self._net[2]) / dt, 1)
        self._net = (now, rx, tx)
        disks: list[dict[str, Any]] = []
        for path in self.disks:
            try:
                du = psutil.disk_usage(path)
            except OSError as e:
                disks.append({"path": path, "error": f"cannot read {path}: "
                                                     f"{e.strerror or e}"})
            else:
                disks.append({"path": path, "total": du.total, "used": du.used, "free": du.free})
        return {
            "cpu_percent": cpu_percent, "cpus": self._cpus,
            "load": [round(x, 2) for x in os.getloadavg()],
            "memory": {"total": mem.total, "used": mem.used, "available": mem.available},
            "network": {"rx_bytes": rx, "tx_bytes": tx, "rx_rate": rx_rate, "tx_rate": tx_rate},
            "disks": disks,
        }


# ------------------------------------------------------------------ the collector

class Collector:
    """Samples this GPU server (see the module docstring).

    :param node: the server's name in documents (default: the host name).
    :param lxd: the local LXD (:class:`lxcspawner.lxd.LXD`), or None for no
        containers.
    :param nvml: the NVML module (default: ``pynvml``, imported at the first
        sample); tests pass a stand-in.
    :param proc: where /proc is (for the cgroups of GPU processes).
    :param disks: paths whose file systems to report.
    :param nics: network interfaces to count (default: the physical ones).
    :param process_interval: seconds between reads of the GPU process lists.
    :param containers_interval: seconds between reads of LXD's instance list.
    :param idle_utilization: a GPU under this utilisation (percent) ...
    :param idle_after: ... for this many seconds, while its processes hold
        memory, is idle.
    :param init_retry: seconds between attempts to start NVML where it failed.
    :param lxd_timeout: how long a sample waits for LXD; a slower answer is
        used by a later sample.
    :param cgroup_root: where the host's cgroup files are, for the
        containers' load.
    :param clock: the wall clock (seconds since the epoch).
    """

    def __init__(self, node: str | None = None, lxd: Any = None, *, nvml: Any = None,
                 proc: str = "/proc", disks: Sequence[str] = ("/",),
                 nics: Sequence[str] | None = None, process_interval: float = 5.0,
                 containers_interval: float = 5.0, idle_utilization: float = 5.0,
                 idle_after: float = 1800.0, init_retry: float = 60.0,
                 lxd_timeout: float = 5.0, cgroup_root: str = CGROUP_ROOT,
                 clock: Callable[[], float] = time.time):
        self.node = node or platform.node()
        self.lxd = lxd
        self.cgroup_root = cgroup_root
        self.clock = clock
        self.containers_interval = containers_interval
        self.idle_utilization = idle_utilization
        self.idle_after = idle_after
        self.lxd_timeout = lxd_timeout
        self.latest: dict[str, Any] | None = None
        self._gpus = _NVMLReader(nvml, proc=proc, process_interval=process_interval,
                                 init_retry=init_retry)
        self._host = _HostReader(disks=disks, nics=nics)
        self._lock = asyncio.Lock()
        # A cancelled sample leaves its thread running: the next one waits for it.
        self._thread_lock = threading.Lock()
        self._owners: dict[str, tuple[str, str | None]] = {}
        self._containers: list[dict[str, Any]] = []
        self._containers_error: str | None = None
        self._cpu_seen: dict[str, tuple[float, float]] = {}   # name -> (clock, cpu seconds)
        self._lxd_task: asyncio.Future | None = None
        self._lxd_at: float | None = None
        self._under_since: dict[str, float] = {}              # GPU -> clock when it went under

    # The blocking part: one thread call per sample.

    def _read_blocking(self, now: float) -> tuple[dict[str, Any], dict[str, Any], int]:
        with self._thread_lock:
            calls = self._gpus.calls
            gpus = self._gpus.read(now)
            host = self._host.read(now)
            return host, gpus, self._gpus.calls - calls

    # LXD.

    async def _refresh_containers(self, now: float) -> None:
        """Ask LXD for the instances when ``containers_interval`` has passed;
        wait at most ``lxd_timeout`` for an answer (a later sample takes a
        late one), and keep the last owners for attribution meanwhile."""
        if self.lxd is None:
            return
        started = False
        if self._lxd_task is None and (self._lxd_at is None
                                       or now - self._lxd_at >= self.containers_interval):
            self._lxd_task = asyncio.ensure_future(self._list_instances())
            self._lxd_at = now
            started = True
        task = self._lxd_task
        if task is None:
            return
        if not task.done():
            if not started:
                return          # still waiting for an earlier request
            try:
                await asyncio.wait_for(asyncio.shield(task), self.lxd_timeout)
            except asyncio.TimeoutError:
                self._containers_error = (f"LXD has not listed the containers in "
                                          f"{self.lxd_timeout:g} s; still waiting")
                self._containers = []
                return
            except Exception:  # noqa: BLE001 - read from the task below
                pass
        self._lxd_task = None
        try:
            instances = task.result()
        except Exception as e:  # noqa: BLE001 - any LXD failure is reported, not raised
            log.warning("listing the containers failed: %s", e)
            self._containers_error = f"LXD could not list the containers: {e}"
            self._containers = []
            return
        self._containers_error = None
        project = getattr(self.lxd, "project", None)
        self._owners = instance_owners(instances, project)
        self._containers = self._container_rows(instances, now)

    async def _list_instances(self) -> list[dict[str, Any]]:
        """LXD's instances, each with a ``state`` of its load from the host's
        cgroup files (``cgroup_root``), not LXD's state of every instance (a
        far costlier request: LXD computes each one's disk usage and network
        too)."""
        instances = await self.lxd.list_instances()
        project = getattr(self.lxd, "project", None)

        def usage() -> None:
            for inst in instances:
                status = str(inst.get("status") or "")
                if instance_status(inst) == "running":
                    found = container_usage(
                        cgroup_name(inst["name"], inst.get("project") or project),
                        self.cgroup_root) or {}
                else:
                    # A stopped one uses nothing, as LXD says of it.
                    found = {"cpu": 0, "memory": 0, "processes": 0}
                inst["state"] = {"status": status, "cpu": {"usage": found.get("cpu")},
                                 "memory": {"usage": found.get("memory")},
                                 "processes": found.get("processes")}
        await asyncio.to_thread(usage)
        return instances

    def _container_rows(self, instances: Iterable[Mapping], now: float) -> list[dict[str, Any]]:
        rows, seen = [], {}
        for inst in instances:
            name = inst.get("name")
            if not name:
                continue
            state = inst.get("state") or {}
            cpu = (state.get("cpu") or {}).get("usage")
            cpu_seconds = None if cpu is None else cpu / 1e9
            cpu_percent = None
            before = self._cpu_seen.get(name)
            if cpu_seconds is not None:
                seen[name] = (now, cpu_seconds)
                if before is not None and now > before[0] and cpu_seconds >= before[1]:
                    cpu_percent = round((cpu_seconds - before[1]) / (now - before[0]) * 100, 2)
            rows.append({
                "name": name,
                "user": (inst.get("config") or {}).get(OWNER_KEY) or None,
                "prebuilt": bool((inst.get("config") or {}).get(PREBUILT_KEY)),
                "state": str(state.get("status") or inst.get("status") or "unknown").lower(),
                "cpu_seconds": None if cpu_seconds is None else round(cpu_seconds, 3),
                "cpu_percent": cpu_percent,
                "memory": (state.get("memory") or {}).get("usage"),
                "processes": state.get("processes"),
            })
        self._cpu_seen = seen
        return sorted(rows, key=lambda r: r["name"])

    # Attribution and idleness (on the event loop: dictionary work only).

    def _finish_devices(self, devices: list[dict[str, Any]], now: float) -> None:
        for dev in devices:
            procs = []
            per_user: dict[str | None, int] = {}
            for pid, memory, cgroup in dev["processes"]:
                who = attribution(cgroup, self._owners)
                procs.append({"pid": pid, "memory": memory, **who})
                per_user[who["user"]] = per_user.get(who["user"], 0) + (memory or 0)
            dev["processes"] = procs
            dev["users"] = [{"user": u, "memory": m} for u, m in
                            sorted(per_user.items(), key=lambda kv: (kv[0] is None, kv[0] or ""))]
            dev["idle"] = self._idle(dev, now)
        keys = {self._gpu_key(d) for d in devices}
        for key in [k for k in self._under_since if k not in keys]:
            del self._under_since[key]

    @staticmethod
    def _gpu_key(dev: Mapping[str, Any]) -> str:
        return dev.get("uuid") or f"#{dev['index']}"

    def _idle(self, dev: dict[str, Any], now: float) -> dict[str, Any] | None:
        """Memory held (by processes whose memory NVML may not report, too)
        while utilisation stays under the threshold: idle after ``idle_after``."""
        procs = dev["processes"]
        holds = bool(procs) and (sum(p["memory"] or 0 for p in procs) > 0
                                 or any(p["memory"] is None for p in procs))
        util = dev["utilization"]
        key = self._gpu_key(dev)
        if not holds or util is None or util >= self.idle_utilization:
            self._under_since.pop(key, None)
            return None
        since = self._under_since.setdefault(key, now)
        if now - since < self.idle_after:
            return None
        return {"since": iso_time(since), "users": [u["user"] for u in dev["users"]]}

    # The public part.

    async def sample(self) -> dict[str, Any]:
        """Sample the server once; the document is also kept in ``latest``."""
        async with self._lock:
            cpu_before = time.process_time()
            now = self.clock()
            (host, gpus, calls), _ = await asyncio.gather(
                asyncio.to_thread(self._read_blocking, now), self._refresh_containers(now))
            self._finish_devices(gpus["devices"], now)
            doc = {
                "node": self.node, "time": iso_time(now), "host": host, "gpus": gpus,
                "containers": self._containers, "containers_error": self._containers_error,
                "cost": {"seconds": round(time.process_time() - cpu_before, 6),
                         "nvml_calls": calls},
            }
            self.latest = doc
            return doc

    async def run(self, interval: float = 1.0) -> None:
        """Sample every ``interval`` seconds into ``latest`` until cancelled.
        A failed sample is logged; the next one is taken as usual."""
        while True:
            started = time.monotonic()
            try:
                await self.sample()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the agent outlives a bad sample
                log.exception("sampling %s failed; trying again in %g s", self.node, interval)
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))

    def close(self) -> None:
        """Shut NVML down (blocking, quick)."""
        with self._thread_lock:
            self._gpus.stop()


# ------------------------------------------------------------------ Prometheus

_METRICS: tuple[tuple[str, str], ...] = (
    ("lxcgpu_gpus", "GPUs NVML sees on the node"),
    ("lxcgpu_gpu_utilization_percent", "GPU utilisation over NVML's last period, percent"),
    ("lxcgpu_gpu_memory_used_bytes", "GPU memory in use"),
    ("lxcgpu_gpu_memory_total_bytes", "GPU memory size"),
    ("lxcgpu_gpu_temperature_celsius", "GPU core temperature"),
    ("lxcgpu_gpu_power_watts", "GPU power draw"),
    ("lxcgpu_gpu_idle", "1 while the GPU holds memory but has been idle for the idle period"),
    ("lxcgpu_gpu_user_memory_bytes",
     "GPU memory held by a user's processes (user=\"\": host processes)"),
    ("lxcgpu_host_cpu_percent", "Host CPU use since the last sample, percent of all cores"),
    ("lxcgpu_host_memory_used_bytes", "Host memory in use"),
    ("lxcgpu_host_load1", "Host load average over one minute"),
    ("lxcgpu_container_cpu_percent", "Container CPU use since the last read, percent of one core"),
    ("lxcgpu_container_memory_bytes", "Container memory in use"),
)


def _label(value: Any) -> str:
    """A label value escaped as the text exposition format asks."""
    return (str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n"))


def _number(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    return repr(float(value))


def prometheus(doc: Mapping[str, Any]) -> str:
    """A collector document in Prometheus' text exposition format (0.0.4):
    every metric a gauge; readings that are missing are left out."""
    samples: dict[str, list[str]] = {name: [] for name, _ in _METRICS}

    def add(metric: str, labels: Mapping[str, Any], value: Any) -> None:
        if value is None:
            return
        text = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
        samples[metric].append(f"{metric}{{{text}}} {_number(value)}")

    node = doc.get("node", "")
    gpus = doc.get("gpus") or {}
    devices = gpus.get("devices") or []
    add("lxcgpu_gpus", {"node": node}, len(devices))
    for dev in devices:
        labels = {"node": node, "gpu": dev.get("index"), "uuid": dev.get("uuid") or ""}
        add("lxcgpu_gpu_utilization_percent", labels, dev.get("utilization"))
        add("lxcgpu_gpu_memory_used_bytes", labels, dev.get("memory_used"))
        add("lxcgpu_gpu_memory_total_bytes", labels, dev.get("memory_total"))
        add("lxcgpu_gpu_temperature_celsius", labels, dev.get("temperature"))
        add("lxcgpu_gpu_power_watts", labels, dev.get("power_watts"))
        if dev.get("error") is None or dev.get("utilization") is not None:
            add("lxcgpu_gpu_idle", labels, 1 if dev.get("idle") else 0)
        for u in dev.get("users") or []:
            add("lxcgpu_gpu_user_memory_bytes", {**labels, "user": u.get("user") or ""},
                u.get("memory"))
    host = doc.get("host") or {}
    add("lxcgpu_host_cpu_percent", {"node": node}, host.get("cpu_percent"))
    add("lxcgpu_host_memory_used_bytes", {"node": node}, (host.get("memory") or {}).get("used"))
    load = host.get("load") or []
    add("lxcgpu_host_load1", {"node": node}, load[0] if load else None)
    for c in doc.get("containers") or []:
        labels = {"node": node, "container": c.get("name"), "user": c.get("user") or ""}
        add("lxcgpu_container_cpu_percent", labels, c.get("cpu_percent"))
        add("lxcgpu_container_memory_bytes", labels, c.get("memory"))
    out = []
    for name, help_text in _METRICS:
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} gauge")
        out.extend(samples[name])
    return "\n".join(out) + "\n"
