"""A user's container: its LXD configuration, and create / start / stop / delete.

The configuration is a pure function of a :class:`ContainerSpec`, so what a
container will look like can be read and tested without LXD.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Mapping

from . import gpus, naming
from .idmap import IDMAP_BLOCK, IDMAP_USER_FIRST, IDMAP_USER_LAST  # noqa: F401
from .naming import KEY_PREFIX  # noqa: F401
from .lxd import LXD, LXDError, instance_status
from .network import NIC

log = logging.getLogger("lxcspawner.container")



class ContainerError(LXDError):
    """A container cannot be created or used as asked."""


# What a site may add to a container's LXD config (extra_config): resources,
# start-up, snapshots, environment, NVIDIA's runtime, and its own user.* keys;
# security.nesting (Docker inside), which LXD holds safe in an unprivileged
# container with its own id map.  Nothing that widens what the container may
# do to the host (other security.*, raw.*, linux.*), nor lxcgpu's or LXD's
# own bookkeeping (user.lxcgpu.*, volatile.*).
EXTRA_CONFIG_PREFIXES = ("limits.", "boot.", "snapshots.", "environment.", "nvidia.", "user.")
EXTRA_CONFIG_KEYS = frozenset({"security.nesting"})


def check_extra_key(key: str) -> None:
    """Refuse an extra_config key that is not in the allow-list above."""
    if key.startswith(KEY_PREFIX) or key.startswith("volatile."):
        raise ValueError(f"extra container config may not set {key}: lxcgpu and LXD "
                         "keep their own records there")
    if key in EXTRA_CONFIG_KEYS or any(key.startswith(p) and len(key) > len(p)
                                       for p in EXTRA_CONFIG_PREFIXES):
        return
    raise ValueError(f"extra container config may not set {key}: only "
                     f"{', '.join(p + '*' for p in EXTRA_CONFIG_PREFIXES)} and "
                     f"{', '.join(sorted(EXTRA_CONFIG_KEYS))} are allowed (security.*, "
                     "raw.* and linux.* would loosen the container's isolation)")


@dataclass(frozen=True)
class Mount:
    """A host directory shared into containers (a dataset, scratch, the NAS)."""

    source: str
    path: str
    readonly: bool = True

    def __post_init__(self):
        for what, p in (("source", self.source), ("path", self.path)):
            pp = PurePosixPath(p)
            if not pp.is_absolute() or ".." in pp.parts or "\n" in p or "\0" in p:
                raise ValueError(f"mount {what} must be an absolute path without '..': {p!r}")
        if PurePosixPath(self.path) == PurePosixPath("/"):
            raise ValueError("a shared mount cannot replace the container's root")

    @classmethod
    def parse(cls, value: "Mount | Mapping | str") -> "Mount":
        """From a Mount, a dict (source, path, readonly) or ``src:path[:ro|rw]``."""
        if isinstance(value, Mount):
            return value
        if isinstance(value, Mapping):
            return cls(str(value["source"]), str(value.get("path", value["source"])),
                       bool(value.get("readonly", True)))
        parts = str(value).split(":")
        if len(parts) == 2:
            return cls(parts[0], parts[1])
        if len(parts) == 3 and parts[2] in ("ro", "rw"):
            return cls(parts[0], parts[1], parts[2] == "ro")
        raise ValueError(f"mount {value!r}: use SOURCE:PATH[:ro|rw]")

    @property
    def device_name(self) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", self.path.lower()).strip("-") or "root"
        return f"lxcgpu-mnt-{slug}"[:64]

    def device(self) -> dict[str, str]:
        return {"type": "disk", "source": self.source, "path": self.path,
                "readonly": "true" if self.readonly else "false"}


@dataclass(frozen=True)
class ContainerSpec:
    """Everything that decides how a user's container is configured."""

    user: str                      # the hub user name, as JupyterHub has it
    server: str                    # the GPU server's name
    idmap_base: int                # first host uid/gid of the user's own block
    image: str = "lxcgpu/default"
    profiles: tuple[str, ...] = ("lxcgpu",)
    prefix: str = ""
    cpu: str | None = None         # LXD limits.cpu: "4" or "0-3"
    memory: str | None = None      # LXD limits.memory: "16GiB" or "50%"
    processes: int | None = None   # LXD limits.processes
    mounts: tuple[Mount, ...] = ()
    gpus: int = 0                  # GPUs on the server; a gpu device only if > 0
    gpu_pci: tuple[str, ...] = ()  # the chosen GPUs' PCI addresses; (): every GPU
    nvidia_runtime: bool = False   # LXD injects the host's NVIDIA libraries (driver_sync runtime)
    pool: str | None = None        # storage pool for the root disk (default: the profile's)
    # The container's own eth0 (network.nic_device: its assigned address and
    # LXD's filtering); None: the profile's, as it is.
    nic: Mapping[str, str] | None = None
    # The storage pool holding the user's home volume on this server
    # (home_volume(name)), mounted at /home/<login>; None: the home lives in
    # the container's root file system.
    home_pool: str | None = None
    extra_config: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.idmap_base, int) or isinstance(self.idmap_base, bool):
            raise ValueError("idmap_base must be an integer")
        if not IDMAP_USER_FIRST <= self.idmap_base <= IDMAP_USER_LAST:
            raise ValueError(f"idmap_base {self.idmap_base} outside "
                             f"{IDMAP_USER_FIRST}..{IDMAP_USER_LAST}")
        if (self.idmap_base - IDMAP_USER_FIRST) % IDMAP_BLOCK:
            raise ValueError(f"idmap_base {self.idmap_base} is not aligned to a "
                             f"{IDMAP_BLOCK}-id block from {IDMAP_USER_FIRST}")
        if self.cpu is not None and not re.fullmatch(r"\d+(-\d+)?(,\d+(-\d+)?)*", self.cpu):
            raise ValueError(f"cpu limit {self.cpu!r}: a count or a CPU list such as 0-3")
        if self.memory is not None and not re.fullmatch(r"\d+(\.\d+)?([KMGT]i?B|%)?", self.memory):
            raise ValueError(f"memory limit {self.memory!r}: such as 16GiB or 50%")
        if self.processes is not None and (not isinstance(self.processes, int)
                                           or self.processes < 1):
            raise ValueError("processes limit must be a positive integer")
        for k in self.extra_config:
            check_extra_key(k)
        names = [m.device_name for m in self.mounts]
        if len(set(names)) != len(names):
            raise ValueError("two shared mounts use the same container path")

    @property
    def name(self) -> str:
        return naming.instance_name(self.user, self.server, self.prefix)

    @property
    def posix_user(self) -> str:
        return naming.posix_name(self.user)

    @property
    def hostname(self) -> str:
        return naming.hostname(self.user, self.server)

    def config(self) -> dict[str, str]:
        cfg = {
            "security.privileged": "false",
            "security.idmap.isolated": "true",
            "security.idmap.base": str(self.idmap_base),
            "security.idmap.size": str(IDMAP_BLOCK),
            # Who owns it and why; the container can read these through
            # /dev/lxd, so never a secret here.
            f"{KEY_PREFIX}owner": self.user,
            f"{KEY_PREFIX}server": self.server,
            f"{KEY_PREFIX}posix-user": self.posix_user,
            f"{KEY_PREFIX}purpose": "user-container",
        }
        if self.cpu:
            cfg["limits.cpu"] = self.cpu
        if self.memory:
            cfg["limits.memory"] = self.memory
        if self.processes:
            cfg["limits.processes"] = str(self.processes)
        if self.nvidia_runtime and (self.gpus > 0 or self.gpu_pci):
            cfg["nvidia.runtime"] = "true"
        cfg.update(self.extra_config)
        return cfg

    def devices(self) -> dict[str, dict[str, str]]:
        devs = {m.device_name: m.device() for m in self.mounts}
        if self.pool:
            devs["root"] = {"type": "disk", "path": "/", "pool": self.pool}
        devs.update(gpus.devices(self.gpus, self.gpu_pci))
        if self.nic is not None:
            devs[NIC] = dict(self.nic)
        if self.home_pool:
            devs[HOME_DEVICE] = home_device(self.home_pool, self.name, self.posix_user)
        return devs


# The user's home as a custom volume of its own ("<instance>-home"), so that
# a rebuild replaces the system and keeps the home.  The id map base pinned
# per user keeps the home's owners without a re-chown (FINDINGS.md).
HOME_DEVICE = "lxcgpu-home"


def home_volume(instance: str) -> str:
    """The name of the custom volume that holds the home of ``instance``'s user."""
    return f"{instance}-home"


def home_device(pool: str, instance: str, login: str) -> dict[str, str]:
    return {"type": "disk", "pool": pool, "source": home_volume(instance),
            "path": f"/home/{login}"}


def root_pool(inst: Mapping) -> str:
    """The storage pool of an instance's root disk (its own or its profiles')."""
    pool = ((inst.get("expanded_devices") or inst.get("devices") or {}).get("root")
            or {}).get("pool")
    if not pool:
        raise ContainerError(f"{inst.get('name')} has no root disk in a storage pool")
    return pool


def check_owner(instance: Mapping, user: str) -> None:
    """Refuse an instance whose ``user.lxcgpu.owner`` is not ``user``."""
    owner = (instance.get("config") or {}).get(f"{KEY_PREFIX}owner")
    if owner != user:
        raise ContainerError(f"instance {instance.get('name')} exists but belongs to "
                             f"{owner or 'no lxcgpu user'}, not {user!r}")


async def half_made(lxd: LXD, instance: Mapping) -> bool:
    """Whether ``instance`` is what an interrupted creation left (LXD stopped
    while unpacking the image): stopped, never started (no
    ``volatile.idmap.current`` nor ``volatile.last_state.power``), and
    without the ``volatile.apply_template`` that LXD sets once a creation is
    complete.  Such an instance holds nothing of its user's and cannot be
    used ("Failed to write backup file: Instance storage pool not found")."""
    cfg = instance.get("config") or {}
    return (instance_status(instance) == "stopped"
            and not any(k in cfg for k in ("volatile.apply_template", "volatile.idmap.current",
                                           "volatile.last_state.power")))


async def ensure_container(lxd: LXD, spec: ContainerSpec) -> dict:
    """Create the user's container if it does not exist; return its record.

    An existing instance of that name must belong to the same user (its
    ``user.lxcgpu.owner``): lxcgpu never adopts someone else's container.
    One that an interrupted creation left half-made is made anew."""
    existing = await lxd.instance(spec.name)
    if existing is not None:
        check_owner(existing, spec.user)
        if not await half_made(lxd, existing):
            return existing
        log.warning("%s was left half-made by an interrupted creation (never started, "
                    "never completed): deleting it and creating it again", spec.name)
        await lxd.delete_instance(spec.name)
    log.info("creating %s for %s on %s", spec.name, spec.user, spec.server)
    return await lxd.create_instance(spec.name, image_alias=spec.image, config=spec.config(),
                                     devices=spec.devices(), profiles=spec.profiles)


async def start_container(lxd: LXD, name: str, *, address_timeout: float = 60) -> str:
    """Start the container (if stopped) and return its IPv4 address."""
    await lxd.start(name)
    return await lxd.wait_for_address(name, timeout=address_timeout)


def idmap_ranges(config: Mapping[str, str]) -> list[tuple[str, int, int]]:
    """The host id ranges an instance uses, from ``volatile.idmap.current``:
    ``[(kind, hostid, count), ...]`` with kind ``uid``/``gid``/``both``."""
    raw = config.get("volatile.idmap.current") or config.get("volatile.last_state.idmap") or "[]"
    out = []
    for entry in json.loads(raw):
        kind = "both" if entry.get("Isuid") and entry.get("Isgid") else (
            "uid" if entry.get("Isuid") else "gid")
        out.append((kind, int(entry["Hostid"]), int(entry["Maprange"])))
    return out
