"""On a lent machine with NVIDIA GPUs and LXD: what lxcgpu reads from LXD's
/1.0/resources agrees with NVML (the GPUs, their order, UUIDs and the
driver version the installer mode would install), and so does the node
agent's collector, which the installer mode asks first.  Elsewhere it skips,
saying why.  Run: ``.venv/bin/python -m pytest -s tests/gpu/``."""

from __future__ import annotations

import asyncio

import pytest

from lxcspawner import driversync, gpus
from lxcspawner.lxd import LXD, LXDError


@pytest.fixture(scope="module")
def resources():
    client = LXD(timeout=60, retries=0)
    try:
        return asyncio.run(client.resources())
    except LXDError as e:
        pytest.skip(f"no LXD here ({e}): start it with setup/lxdhost.py up")
    finally:
        client.close()


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def test_lxd_and_nvml_agree(nvml, resources):
    found = gpus.parse_resources(resources)
    print("\nLXD:", [g.json() for g in found])
    host = gpus.host_driver_version(found)
    nvml_version = _text(nvml.nvmlSystemGetDriverVersion())
    print(f"driver: LXD {host}, NVML {nvml_version}; the installer mode would push "
          f"{driversync.installer_name(host or '?')}")
    assert host == nvml_version
    assert len(found) == nvml.nvmlDeviceGetCount()
    for g in found:
        h = nvml.nvmlDeviceGetHandleByIndex(g.index)
        # nvidia-smi's index is PCI bus order: the same GPU at the same index.
        bus = _text(nvml.nvmlDeviceGetPciInfo(h).busId).lower()
        assert bus.endswith(g.pci_address[-12:]), (g.index, bus, g.pci_address)
        if g.uuid:                    # LXD has UUIDs with NVIDIA's container toolkit
            assert g.uuid == _text(nvml.nvmlDeviceGetUUID(h))


async def test_the_node_agent_and_lxd_give_the_installer_mode_one_version(nvml, resources):
    """driver_sync "installer" takes the host's version from the node agent
    (its collector's NVML reading) where it answers, else from LXD: on a real
    GPU server both are the kernel module's version."""
    from monitor.collector import Collector

    c = Collector("gpu-test", process_interval=2)
    try:
        doc = await c.sample()
    finally:
        c.close()
    lxd_version = gpus.host_driver_version(gpus.parse_resources(resources))
    print(f"driver: the agent's collector {doc['gpus']['driver']}, LXD {lxd_version}")
    assert doc["gpus"]["driver"] == lxd_version == _text(nvml.nvmlSystemGetDriverVersion())
