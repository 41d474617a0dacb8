"""A GPU server's GPUs from LXD's /1.0/resources, and the devices a
container gets.

resources-no-gpu.json is this machine's LXD's own answer (no GPU here); the
others follow LXD 5.0's api.ResourcesGPUCard fields (id, pci_address,
driver, driver_version, vendor_id, product, and the nvidia section that LXD
fills through nvidia-container-cli): one RTX 4090 with and without the
container toolkit on the host, and eight A100s whose DRM numbers (LXD's
``id``) are not in PCI order, beside the board's own ASPEED VGA.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lxcspawner import gpus
from lxcspawner.container import IDMAP_USER_FIRST, ContainerSpec
from lxcspawner.settings import Settings, SettingsError

DATA = Path(__file__).resolve().parents[1] / "fixtures" / "data"


def resources(name: str) -> dict:
    return json.loads((DATA / f"resources-{name}.json").read_text())


def test_no_gpu_here():
    res = resources("no-gpu")
    assert gpus.parse_resources(res) == []
    assert gpus.host_driver_version([]) is None
    assert gpus.devices(0) == {}
    with pytest.raises(gpus.GPUChoiceError, match="node1 has no GPU '0'; it has no GPUs"):
        gpus.choose([], ["0"], "node1")


def test_one_gpu_with_and_without_the_container_toolkit():
    (g,) = gpus.parse_resources(resources("1-gpu"))
    assert (g.index, g.model, g.pci_address) == (0, "NVIDIA GeForce RTX 4090", "0000:01:00.0")
    assert g.uuid == "GPU-5e0b2d6a-0a8c-4f0b-9a3e-1c2d3e4f5a6b"
    assert (g.driver_version, g.cuda_version) == ("550.54.14", "12.4")
    # Without the toolkit LXD has no nvidia section: no UUID, the kernel
    # driver's version from sysfs, LXD's product name.
    (bare,) = gpus.parse_resources(resources("1-gpu-no-toolkit"))
    assert bare.uuid is None and bare.driver_version == "550.54.14"
    assert bare.model == "AD102 [GeForce RTX 4090]"
    assert gpus.host_driver_version([bare]) == "550.54.14"


def test_eight_gpus_in_nvidia_smi_order_not_drm_order():
    found = gpus.parse_resources(resources("8-gpus"))
    assert len(found) == 8                         # the ASPEED VGA is not one of them
    assert [g.pci_address for g in found] == sorted(g.pci_address for g in found)
    assert [g.index for g in found] == list(range(8))
    assert [g.drm_id for g in found] == [3, 1, 0, 2, 7, 5, 4, 6]
    assert found[2].uuid == "GPU-00000002-1111-2222-3333-000000000002"
    assert gpus.host_driver_version(found) == "550.54.14"
    # Every GPU by default: one device, no filter.
    assert gpus.devices(9) == {"lxcgpu-gpu": {"type": "gpu", "gputype": "physical"}}
    # Chosen by UUID and by index: one device each, by PCI address.
    chosen = gpus.choose(found, ["gpu-00000005-1111-2222-3333-000000000005", "2", 2], "gpu17")
    assert [g.index for g in chosen] == [2, 5]
    assert gpus.devices(9, [g.pci_address for g in chosen]) == {
        "lxcgpu-gpu-0": {"type": "gpu", "gputype": "physical", "pci": "0000:47:00.0"},
        "lxcgpu-gpu-1": {"type": "gpu", "gputype": "physical", "pci": "0000:90:00.0"}}
    with pytest.raises(gpus.GPUChoiceError) as e:
        gpus.choose(found, ["8"], "gpu17")
    assert "gpu17 has no GPU '8'; its GPUs: 0 (GPU-00000000" in str(e.value)
    with pytest.raises(gpus.GPUChoiceError):
        gpus.choose(found, ["GPU-nope"], "gpu17")
    with pytest.raises(ValueError, match="not a PCI address"):
        gpus.devices(1, ["../../etc"])


def test_the_container_spec_renders_gpus_and_the_runtime():
    base = dict(user="alice", server="gpu17", idmap_base=IDMAP_USER_FIRST)
    assert "lxcgpu-gpu" not in ContainerSpec(**base).devices()
    spec = ContainerSpec(**base, gpus=8, nvidia_runtime=True)
    assert spec.devices()["lxcgpu-gpu"] == {"type": "gpu", "gputype": "physical"}
    assert spec.config()["nvidia.runtime"] == "true"
    spec = ContainerSpec(**base, gpus=8, gpu_pci=("0000:47:00.0",))
    assert [k for k in spec.devices() if gpus.is_gpu_device(k)] == ["lxcgpu-gpu-0"]
    assert "nvidia.runtime" not in spec.config()
    # No GPUs: no runtime either (LXD would fail the start without a driver).
    assert "nvidia.runtime" not in ContainerSpec(**base, nvidia_runtime=True).config()


def test_driver_sync_per_server():
    s = Settings.from_dict({"gpus": {"driver_sync": "runtime", "installer_dir": "/nas/nvidia"},
                            "servers": {"gpu17": {}, "gpu18": {"driver_sync": "installer"}}})
    assert s.driver_sync_for("gpu17") == "runtime" and s.driver_sync_for("gpu18") == "installer"
    assert s.container_spec("alice", IDMAP_USER_FIRST, server="gpu17").nvidia_runtime
    assert not s.container_spec("alice", IDMAP_USER_FIRST, server="gpu18").nvidia_runtime
    assert Settings().driver_sync == "none"
    for bad, said in (({"gpus": {"driver_sync": "magic"}}, "driver_sync 'magic'"),
                      ({"gpus": {"installer_dir": "nas"}}, "installer_dir"),
                      ({"servers": {"a": {"driver_sync": "yes"}}}, "driver_sync 'yes'")):
        with pytest.raises(SettingsError, match=said):
            Settings.from_dict(bad)


def test_device_changes_between_all_and_a_choice():
    found = gpus.parse_resources(resources("8-gpus"))
    current = {"eth0": {"type": "nic"}, "lxcgpu-gpu": {"type": "gpu", "gputype": "physical"}}
    assert gpus.device_changes(current, 9) == {}                  # all, already
    pci = [found[1].pci_address, found[6].pci_address]
    changes = gpus.device_changes(current, 9, pci)
    assert changes == {"lxcgpu-gpu": None,
                       "lxcgpu-gpu-0": {"type": "gpu", "gputype": "physical", "pci": pci[0]},
                       "lxcgpu-gpu-1": {"type": "gpu", "gputype": "physical", "pci": pci[1]}}
    chosen = {"eth0": {"type": "nic"}, **{k: v for k, v in changes.items() if v}}
    assert gpus.device_changes(chosen, 9, pci) == {}
    # Back to all; a card that moved slot is followed by its PCI address.
    assert gpus.device_changes(chosen, 9) == {
        "lxcgpu-gpu-0": None, "lxcgpu-gpu-1": None,
        "lxcgpu-gpu": {"type": "gpu", "gputype": "physical"}}
    moved = gpus.device_changes(chosen, 9, [pci[0], found[7].pci_address])
    assert moved == {"lxcgpu-gpu-1": {"type": "gpu", "gputype": "physical",
                                      "pci": found[7].pci_address}}
    assert gpus.chosen_from_config("GPU-a,3") == ("GPU-a", "3")
    assert gpus.chosen_from_config(None) == ()


def test_one_parser_of_a_choice_for_the_api_the_cli_and_the_form():
    assert gpus.parse_choice("all") == [] and gpus.parse_choice("") == []
    assert gpus.parse_choice(["All"]) == [] and gpus.parse_choice("ALL") == []
    assert gpus.parse_choice("0, 2,GPU-a") == ["0", "2", "GPU-a"]
    assert gpus.parse_choice([0, "GPU-a"]) == ["0", "GPU-a"]
    for bad in (5, [True], ["x"] * 65, ["x" * 81], {"a": 1}, None):
        with pytest.raises(ValueError, match='GPUs: "all", or GPU UUIDs'):
            gpus.parse_choice(bad)


def test_the_portal_card_shows_each_gpus_usage_from_the_node_agent():
    """keyportal's GPU rows (LXD's GPUs) with what the node agent says of
    each (monitor.usage rows): matched by UUID, by nvidia-smi index where
    LXD has no UUIDs (no container toolkit), nothing when the agent is silent."""
    from keyportal.portal import _usage_of
    from monitor.usage import gpu_row

    eight = gpus.parse_resources(resources("8-gpus"))
    now = [gpu_row({"index": g.index, "uuid": g.uuid, "name": g.model, "state": "free",
                    "memory_total": 80 << 30, "users": []}) for g in eight]
    now[3] = gpu_row({"index": 3, "uuid": eight[3].uuid, "name": eight[3].model,
                      "state": "busy", "memory_total": 80 << 30,
                      "users": [{"user": "bob", "memory": 1}, {"user": "alice", "memory": 2}]})
    # The agent lists them in its own order: matching is by UUID.
    now.reverse()
    assert _usage_of(eight[3], now) == {"memory": "80 GB", "state": "busy",
                                        "users": ["alice", "bob"],
                                        "now": "in use by alice, bob"}
    assert _usage_of(eight[0], now)["now"] == "free"
    assert _usage_of(eight[0], []) == {"memory": None, "state": None, "users": [],
                                       "now": None}
    (no_toolkit,) = gpus.parse_resources(resources("1-gpu-no-toolkit"))
    assert no_toolkit.uuid is None
    assert _usage_of(no_toolkit, [gpu_row({"index": 0, "uuid": "GPU-x", "state": "idle",
                                           "users": [{"user": "carol"}]})])["now"] == \
        "in use by carol (idle)"


def test_lxds_nvidia_refusals_are_sentences():
    """What LXD says when NVIDIA's container toolkit is missing (seen on this
    machine: tests/integration/test_lifecycle.py) or when the host's driver
    fails the site's nvidia.require.driver (nvidia-container-cli's words)."""
    from lxcspawner.lifecycle import _no_toolkit
    from lxcspawner.lxd import LXDError

    missing = _no_toolkit("gpu17", LXDError("Initialize LXC: The NVIDIA container tools "
                                            "couldn't be found"))
    assert "NVIDIA's container toolkit (nvidia-container-cli) is missing" in str(missing)
    old = _no_toolkit("gpu17", LXDError(
        "Failed to start device \"gpu\": nvidia-container-cli: requirement error: "
        "unsatisfied condition: driver >= 560"))
    assert str(old).startswith("gpu17's NVIDIA driver is older than the lab requires")
    assert _no_toolkit("gpu17", LXDError("Failed to start: no space left on device")) is None
