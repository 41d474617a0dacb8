"""The NVIDIA userspace driver inside a container, kept in step with the
host's kernel driver.

CUDA programs fail when the container's ``libcuda`` differs from the host's
kernel module.  Two ways to keep them equal, chosen per GPU server
(``[gpus] driver_sync``, ``[servers.X] driver_sync``):

- ``runtime``: LXD injects the host's own libraries at each start
  (``nvidia.runtime=true``, through NVIDIA's container toolkit on the host);
  nothing is installed in the container.
- ``installer`` (lxc-gpu's way): at each start the version inside (the
  versioned target of ``libcuda.so.1`` or ``libnvidia-ml.so.1``) is compared
  with the host's; on a mismatch the host version's
  ``NVIDIA-Linux-<arch>-<version>.run`` from ``[gpus] installer_dir`` (the
  lab's NAS, on the hub's host) is pushed into the container and run there
  with ``--no-kernel-module --silent``.  Matching versions cost one read of
  a link through LXD's file API.
- ``none``: lxcgpu leaves the driver to the image and the users.

A host driver upgrade is picked up at each container's next start: the
host's version is read at every start, from the server's node agent (NVML's
driver version, the kernel module libcuda must match) where it answers, else
from LXD's resources (the ``nvidia`` module's version).

While the installer runs, its log's last line is the spawn page's progress.
"""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from . import gpus
from .lxd import LXD, LXDError

if TYPE_CHECKING:
    from .settings import Settings

log = logging.getLogger(__name__)

#: Where Debian and Ubuntu (then others) keep the driver's libraries.
LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64",
            "/usr/lib")
LIBS = ("libcuda.so.1", "libnvidia-ml.so.1")
#: The installer's place inside the container while it runs (root's alone).
IN_CONTAINER = "/root/.lxcgpu-nvidia-installer.run"
#: Its log (nvidia-installer's own default place), read while it runs.
INSTALLER_LOG = "/var/log/nvidia-installer.log"
INSTALLER_ARGS = ("--no-kernel-module", "--silent", "--no-x-check", "--no-nouveau-check",
                  f"--log-file-name={INSTALLER_LOG}")
#: Seconds between two reads of the installer's log while it runs.
LOG_POLL = 2.0
#: Seconds the node agent has to say the host's driver version.
AGENT_TIMEOUT = 2.0
_VERSIONED = re.compile(r"\.so\.(\d+\.\d+(?:\.\d+)?)$")
_HOST_VERSION = re.compile(r"^\d+\.\d+(\.\d+)?$")


class DriverSyncError(Exception):
    """The driver could not be put in step; the message says why and what to do."""


def installer_name(version: str, arch: str = "x86_64") -> str:
    return f"NVIDIA-Linux-{arch}-{version}.run"


def _arch(lxd_arch: str | None) -> str:
    return {"aarch64": "aarch64", "arm64": "aarch64"}.get(lxd_arch or "", "x86_64")


async def container_version(lxd: LXD, name: str) -> str | None:
    """The NVIDIA userspace driver's version inside the container, from the
    versioned file ``libcuda.so.1`` (or ``libnvidia-ml.so.1``) links to;
    None where there is none."""
    for lib in LIBS:
        for folder in LIB_DIRS:
            entry = await lxd.file_entry(name, f"{folder}/{lib}", max_bytes=4096)
            if entry is None:
                continue
            if entry.type == "symlink":
                m = _VERSIONED.search(entry.data.decode("utf-8", "replace").strip())
                if m:
                    return m.group(1)
    return None


async def agent_version(settings: "Settings", server: str) -> str | None:
    """The NVIDIA driver version ``server``'s node agent reads through NVML;
    None where the site has no monitor token or the agent does not answer
    (logged)."""
    from tornado.httpclient import AsyncHTTPClient

    from monitor.loadapi import fetch_load
    from .settings import SettingsError

    try:
        token = settings.monitor_token()
    except SettingsError as e:
        log.debug("%s: no node agent to ask for the driver version: %s", server, e)
        return None
    url = settings.agent_url(server)
    try:
        doc = await fetch_load(AsyncHTTPClient(), url, token, server, timeout=AGENT_TIMEOUT)
    except (OSError, RuntimeError, ValueError) as e:
        log.warning("%s: the driver version from LXD instead: %s", server, e)
        return None
    found = ((doc.get("gpus") or {}).get("driver") or "").strip()
    return found if _HOST_VERSION.match(found) else None


async def host_version(lxd: LXD, settings: "Settings", server: str) -> str | None:
    """The host's NVIDIA kernel driver version: its node agent's, else LXD's;
    None on a server without one."""
    return (await agent_version(settings, server)
            or gpus.host_driver_version((await lxd.gpus())[1]))


async def _follow_log(lxd: LXD, name: str, version: str, say: Callable[[str], None],
                      poll: float) -> None:
    """Say the installer log's newest line whenever it changes (until cancelled)."""
    last = None
    while True:
        await asyncio.sleep(poll)
        try:
            entry = await lxd.file_entry(name, INSTALLER_LOG)
        except LXDError as e:           # too large, or LXD busy: the next read
            log.debug("%s: reading %s: %s", name, INSTALLER_LOG, e)
            continue
        if entry is None or entry.type != "file":
            continue
        lines = [ln.strip() for ln in entry.data.decode("utf-8", "replace").splitlines()]
        line = next((ln for ln in reversed(lines) if ln), None)
        if line and line != last:
            last = line
            say(f"installing the NVIDIA driver {version}: {line[:160]}")


async def sync(lxd: LXD, name: str, host_version: str, installer_dir: str | None, *,
               arch: str | None = None, progress: Callable[[str], None] | None = None,
               timeout: float = 1800, poll: float = LOG_POLL) -> str:
    """Put the container's driver at ``host_version`` (installer mode); what
    was done: "matched" or "installed".  DriverSyncError with the user's
    sentence when it cannot."""
    say = progress or (lambda msg: None)
    inside = await container_version(lxd, name)
    if inside == host_version:
        return "matched"
    if not installer_dir:
        raise DriverSyncError(
            f"the NVIDIA driver in {name} is {inside or 'missing'}, the server's is "
            f"{host_version}, and no installer folder is set: an administrator sets [gpus] "
            "installer_dir (or driver_sync = \"runtime\")")
    installer = Path(installer_dir) / installer_name(host_version, _arch(arch))
    if not installer.is_file():
        raise DriverSyncError(
            f"the NVIDIA driver {host_version} installer is missing: an administrator puts "
            f"{installer.name} at {installer} (from nvidia.com), or sets driver_sync = "
            "\"runtime\" for this server")
    say(f"installing the NVIDIA driver {host_version} (was {inside or 'none'}; a few minutes)")
    log.info("%s: driver %s inside, %s on the host: running %s", name, inside, host_version,
             installer)
    follow = None
    try:
        await lxd.push_file(name, IN_CONTAINER, installer, mode=0o700)
        # A log from an earlier install is not this one's progress.
        await lxd.execute(name, ["rm", "-f", "--", INSTALLER_LOG], timeout=60)
        follow = asyncio.create_task(_follow_log(lxd, name, host_version, say, poll))
        res = await lxd.execute(name, [IN_CONTAINER, *INSTALLER_ARGS], timeout=timeout)
    except LXDError as e:
        raise DriverSyncError(f"installing the NVIDIA driver {host_version} in {name} failed: "
                              f"{e}") from e
    finally:
        if follow is not None:
            follow.cancel()
        try:
            await lxd.execute(name, ["rm", "-f", "--", IN_CONTAINER], timeout=60)
        except LXDError as e:
            log.warning("%s: could not remove %s: %s", name, IN_CONTAINER, e)
    after = await container_version(lxd, name)
    if res.returncode != 0 or after != host_version:
        tail = (res.stdout + res.stderr).strip().splitlines()[-5:]
        log.error("%s: the driver installer exited %s; the driver is now %s:\n%s", name,
                  res.returncode, after, "\n".join(tail))
        raise DriverSyncError(
            f"the NVIDIA driver {host_version} installer failed in {name} (exit "
            f"{res.returncode}; the driver there is {after or 'missing'}): an administrator "
            "has the installer's output in the hub's log")
    say(f"NVIDIA driver {host_version} installed")
    return "installed"
