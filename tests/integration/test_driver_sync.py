"""driver_sync "installer" in a real container: an older NVIDIA userspace
driver inside is found, the host version's installer (here a fake one, a
shell script in the installer folder that writes the versioned libraries as
NVIDIA's .run does) is pushed in and run with --no-kernel-module --silent,
and the versions are equal after; a second start does nothing; a missing
installer and a failing one give a sentence naming what to do; a link the
user planted where the installer goes is replaced, never followed.

No GPU here, so the host's version is given to the sync (on a GPU server it
comes from the node agent's NVML, else LXD's /1.0/resources: through the hub
in tests/e2e/test_monitor_dashboard.py, LXD's in tests/unit/test_gpus.py).
"""

from __future__ import annotations

import time

import pytest

from lxcspawner import driversync
from lxcspawner.container import start_container
from tests.fixtures.fake_nvidia import write_installer

pytestmark = pytest.mark.lxd

USER = "drv"
SERVER = "drv"
LIBDIR = "/usr/lib/x86_64-linux-gnu"
HOST = "550.54.14"
OLD = "535.104.05"

@pytest.fixture(scope="module")
async def drv(lxd, user_containers):
    spec = await user_containers(USER, server=SERVER)
    await start_container(lxd, spec.name)
    return spec.name


async def test_an_older_driver_is_replaced_by_the_hosts(lxd, drv, tmp_path):
    # An older driver inside, as an image built months ago has.
    for lib in ("libcuda", "libnvidia-ml"):
        (await lxd.execute(drv, ["ln", "-sf", f"{lib}.so.{OLD}", f"{LIBDIR}/{lib}.so.1"])
         ).check(["ln"])
    assert await driversync.container_version(lxd, drv) == OLD
    # An earlier install's log is not this one's progress.
    (await lxd.execute(drv, ["sh", "-c", f"echo stale line > {driversync.INSTALLER_LOG}"])
     ).check(["sh"])
    write_installer(tmp_path, HOST, pause=1.5)
    said: list[str] = []
    assert await driversync.sync(lxd, drv, HOST, str(tmp_path), progress=said.append,
                                 poll=0.4) == "installed"
    assert await driversync.container_version(lxd, drv) == HOST
    # The installer's log, line by line as it runs, is the progress.
    assert said[0] == f"installing the NVIDIA driver {HOST} (was {OLD}; a few minutes)"
    assert said[-1] == f"NVIDIA driver {HOST} installed"
    assert f"installing the NVIDIA driver {HOST}: Installing NVIDIA driver version {HOST}." \
        in said
    assert f"installing the NVIDIA driver {HOST}: -> Installing 'NVIDIA Accelerated " \
        f"Graphics Driver for Linux-x86_64' ({HOST}):" in said
    assert not any("stale line" in m for m in said)
    count = len(said)
    # The installer does not stay in the container.
    assert await lxd.file_entry(drv, driversync.IN_CONTAINER) is None
    # The next start: the versions match, nothing is pushed or run.
    (tmp_path / driversync.installer_name(HOST)).unlink()
    t = time.perf_counter()
    assert await driversync.sync(lxd, drv, HOST, str(tmp_path), progress=said.append) == \
        "matched"
    print(f"driver check with matching versions: {(time.perf_counter() - t) * 1000:.1f} ms")
    assert len(said) == count


async def test_a_missing_or_failing_installer_is_a_sentence(lxd, drv, tmp_path):
    with pytest.raises(driversync.DriverSyncError) as e:
        await driversync.sync(lxd, drv, "560.28.03", str(tmp_path))
    assert f"puts NVIDIA-Linux-x86_64-560.28.03.run at {tmp_path}" in str(e.value)
    with pytest.raises(driversync.DriverSyncError, match=r"installer_dir"):
        await driversync.sync(lxd, drv, "560.28.03", None)
    write_installer(tmp_path, "560.28.03", "#!/bin/sh\necho 'ERROR: unable to load' >&2\nexit 1\n")
    with pytest.raises(driversync.DriverSyncError) as e:
        await driversync.sync(lxd, drv, "560.28.03", str(tmp_path))
    assert "installer failed" in str(e.value) and "exit 1" in str(e.value)
    assert await lxd.file_entry(drv, driversync.IN_CONTAINER) is None


async def test_a_planted_link_is_replaced_not_followed(lxd, drv, tmp_path):
    """Root in the container links the installer's path to /etc/shadow:
    lxcgpu's write replaces the link; /etc/shadow keeps its contents."""
    before = await lxd.get_file(drv, "/etc/shadow")
    (await lxd.execute(drv, ["ln", "-sf", "/etc/shadow", driversync.IN_CONTAINER])
     ).check(["ln"])
    for lib in ("libcuda", "libnvidia-ml"):
        (await lxd.execute(drv, ["ln", "-sf", f"{lib}.so.{OLD}", f"{LIBDIR}/{lib}.so.1"])
         ).check(["ln"])
    write_installer(tmp_path, HOST)
    assert await driversync.sync(lxd, drv, HOST, str(tmp_path)) == "installed"
    assert await lxd.get_file(drv, "/etc/shadow") == before
    assert await lxd.file_entry(drv, driversync.IN_CONTAINER) is None
