"""A GPU server's NVIDIA GPUs as LXD reports them, and which of them a
container gets.

LXD's ``/1.0/resources`` lists each GPU card with its PCI address, its DRM
card number (``id``: not the index ``nvidia-smi`` shows) and, where the host
has NVIDIA's container toolkit, an ``nvidia`` section (UUID, model, brand,
architecture, the driver's NVRM and CUDA versions).  Users know GPUs by the
``nvidia-smi`` index and by UUID; ``nvidia-smi`` numbers them in PCI bus
order, so that is the order (and the index) here, and a chosen GPU is passed
to LXD by its PCI address.

By default a container gets every GPU of its server (lxc-gpu's sharing
model: one ``gpu`` device of ``gputype=physical`` without a filter); a
choice of GPUs (by UUID or index) gets one device per GPU, by PCI address.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

NVIDIA_VENDOR = "10de"
#: The device name of "every GPU of the server".
ALL_GPUS_DEVICE = "lxcgpu-gpu"
#: Devices of chosen GPUs: lxcgpu-gpu-<index>.
CHOSEN_PREFIX = "lxcgpu-gpu-"

_PCI = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")
_VERSION = re.compile(r"^\d+(\.\d+){1,3}$")


class GPUChoiceError(ValueError):
    """A choice of GPUs this server does not have; the message says which it has."""


@dataclass(frozen=True)
class GPU:
    index: int                  # nvidia-smi's (PCI bus order)
    pci_address: str            # 0000:41:00.0
    drm_id: int | None          # LXD's "id": the DRM card number
    uuid: str | None            # GPU-... (with the container toolkit on the host)
    model: str                  # "NVIDIA A100-SXM4-80GB", or LXD's product name
    driver_version: str | None  # the host's NVIDIA kernel driver, e.g. 550.54.14
    cuda_version: str | None
    architecture: str | None

    def json(self) -> dict:
        return {"index": self.index, "uuid": self.uuid, "model": self.model,
                "pci_address": self.pci_address, "drm_id": self.drm_id,
                "driver_version": self.driver_version, "cuda_version": self.cuda_version,
                "architecture": self.architecture}


def _is_nvidia(card: Mapping[str, Any]) -> bool:
    return bool(card.get("nvidia")) or card.get("driver") == "nvidia" or \
        str(card.get("vendor_id") or "").lower() == NVIDIA_VENDOR


def parse_resources(resources: Mapping[str, Any]) -> list[GPU]:
    """The NVIDIA GPUs of LXD's ``/1.0/resources`` answer, in nvidia-smi's order."""
    cards = [c for c in ((resources.get("gpu") or {}).get("cards") or [])
             if isinstance(c, Mapping) and _is_nvidia(c)]
    cards.sort(key=lambda c: str(c.get("pci_address") or ""))
    out = []
    for i, card in enumerate(cards):
        nv = card.get("nvidia") or {}
        driver = nv.get("nvrm_version") or (card.get("driver_version")
                                            if card.get("driver") == "nvidia" else None)
        out.append(GPU(
            index=i, pci_address=str(card.get("pci_address") or ""),
            drm_id=card.get("id") if isinstance(card.get("id"), int) else None,
            uuid=nv.get("uuid") or None,
            model=nv.get("model") or card.get("product") or "NVIDIA GPU",
            driver_version=driver or None, cuda_version=nv.get("cuda_version") or None,
            architecture=nv.get("architecture") or None))
    return out


def host_driver_version(gpus: Sequence[GPU]) -> str | None:
    """The host's NVIDIA driver version (every GPU of a host has the same)."""
    for g in gpus:
        if g.driver_version and _VERSION.match(g.driver_version):
            return g.driver_version
    return None


def parse_choice(value: Any) -> list[str]:
    """A choice of GPUs as the API, the CLI and the spawn form send it: a
    list of UUIDs / nvidia-smi indexes, or a text of them separated by
    commas; "all" (or nothing) is every GPU: [].  ValueError with the
    sentence for anything else."""
    if isinstance(value, str):
        value = [w.strip() for w in value.split(",") if w.strip()]
    if not isinstance(value, list) or len(value) > 64 or not all(
            isinstance(w, (str, int)) and not isinstance(w, bool) and len(str(w)) <= 80
            for w in value):
        raise ValueError('GPUs: "all", or GPU UUIDs or nvidia-smi indexes (a list, or '
                         "separated by commas)")
    items = [str(w) for w in value]
    return [] if [w.lower() for w in items] == ["all"] else items


def choose(gpus: Sequence[GPU], wanted: Iterable[str | int], server: str) -> tuple[GPU, ...]:
    """The GPUs named by UUID (``GPU-...``) or nvidia-smi index; GPUChoiceError
    naming the server's GPUs for anything else."""
    chosen: list[GPU] = []
    for w in wanted:
        key = str(w).strip()
        match = [g for g in gpus if (g.uuid and g.uuid.lower() == key.lower())
                 or (key.isdigit() and g.index == int(key))]
        if not match:
            have = ", ".join(f"{g.index} ({g.uuid or g.pci_address}, {g.model})" for g in gpus)
            raise GPUChoiceError(f"{server} has no GPU {key!r}"
                                 + (f"; its GPUs: {have}" if gpus else "; it has no GPUs"))
        if match[0] not in chosen:
            chosen.append(match[0])
    return tuple(sorted(chosen, key=lambda g: g.index))


def devices(gpu_count: int, chosen_pci: Sequence[str] = ()) -> dict[str, dict[str, str]]:
    """The container's GPU devices: every GPU of the server (one device, no
    filter) when none is chosen, else one per chosen PCI address; none on a
    server without GPUs."""
    if chosen_pci:
        out = {}
        for i, pci in enumerate(chosen_pci):
            if not _PCI.match(pci):
                raise ValueError(f"{pci!r} is not a PCI address such as 0000:41:00.0")
            out[f"{CHOSEN_PREFIX}{i}"] = {"type": "gpu", "gputype": "physical", "pci": pci}
        return out
    if gpu_count > 0:
        return {ALL_GPUS_DEVICE: {"type": "gpu", "gputype": "physical"}}
    return {}


def is_gpu_device(name: str) -> bool:
    return name == ALL_GPUS_DEVICE or name.startswith(CHOSEN_PREFIX)


def device_changes(current: Mapping[str, Any], gpu_count: int,
                   chosen_pci: Sequence[str] = ()) -> dict[str, dict[str, str] | None]:
    """What to change in an instance's devices so that its GPU devices are
    ``devices(gpu_count, chosen_pci)``: new ones set, stale ones None
    (removed); empty when they are already so."""
    want = devices(gpu_count, chosen_pci)
    have = {k: dict(v) for k, v in current.items() if is_gpu_device(k)}
    changes: dict[str, dict[str, str] | None] = {k: None for k in have if k not in want}
    changes.update({k: v for k, v in want.items() if have.get(k) != v})
    return changes


def chosen_from_config(value: str | None) -> tuple[str, ...]:
    """The GPUs a container's ``user.lxcgpu.gpus`` names (UUIDs or indexes); () for all."""
    return tuple(v for v in (value or "").split(",") if v)
