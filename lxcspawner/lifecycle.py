"""A user's container from start to ready: the steps the spawner and the
admin command share.

The store decides the numbers (the user's SSH port and id block, their
forwards, their container's address on each server); LXD holds the container,
its NIC with that address pinned (lxcspawner.network) and, in its config, the
port maps the node agent turns into DNAT rules.  Every step reconciles to the desired
state, so running any of them again changes nothing.  The store is
synchronous and runs in a thread; LXD calls are already off the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from . import driversync, gpus, naming, network, pool
from .container import (HOME_DEVICE, ContainerError, ContainerSpec, check_extra_key, check_owner,
                        ensure_container, half_made, home_volume, root_pool)
from .lxd import LXD, InstanceState, LXDError, LXDNotFound, instance_status, is_outage
from .portmap import config_changes, jupyter_maps
from .provision import provision
from .settings import Settings
from .store import Exhausted, Store, UserRecord

log = logging.getLogger("lxcspawner.lifecycle")

Progress = Callable[[str], None]

# ContainerSpec fields a caller may set over the site settings.
SPEC_OVERRIDES = frozenset({"image", "profiles", "prefix", "cpu", "memory", "processes",
                            "mounts", "gpus", "gpu_pci", "pool", "extra_config"})


@dataclass(frozen=True)
class UserContainer:
    """A user's container on one GPU server, as the user reaches it."""

    name: str                      # the LXD instance name
    server: str                    # the GPU server, as users know it
    user: str                      # the hub user name
    posix_user: str                # the login inside
    address: str | None            # its assigned IPv4 on the bridge
    ssh_port: int                  # the user's port on the server (-> container:22)
    forwards: dict[int, int] = field(default_factory=dict)  # host port -> container port
    jupyter_port: int | None = None  # the first of the user's Jupyter host ports
    online: bool = True              # its address is up (ensure_user_container's wait_network)

    @property
    def ssh_command(self) -> str:
        return f"ssh -p {self.ssh_port} {self.posix_user}@{self.server}"


@dataclass(frozen=True)
class PortMaps:
    """The host ports a user's container on one server asks for."""

    ssh_port: int | None = None                          # -> container:22
    forwards: dict[int, int] = field(default_factory=dict)  # host port -> container port
    jupyter_port: int | None = None                      # the first of the Jupyter pair


async def _wanted_ports(store: Store, user: str, server: str, rec=None) -> PortMaps:
    """The user's SSH port, their TCP forwards on ``server`` and their
    Jupyter ports, from the store; none while the user is suspended (their
    container keeps none).  ``rec``: their record, read in this spawn."""
    def read():
        nonlocal rec
        if rec is None:
            rec = store.user(user)
        if rec.suspended is not None:
            return PortMaps(), []
        fwds = store.list_forwards(user=user, server=server)
        jupyter = rec.jupyter_port
        if jupyter is None:
            try:
                jupyter = store.jupyter_port(user)
            except Exhausted as e:
                # SSH and forwards must not depend on it: only Jupyter on
                # GPU servers elsewhere is missing until the range is widened.
                log.error("%s", e)
        return PortMaps(rec.ssh_port, jupyter_port=jupyter), fwds
    maps, fwds = await asyncio.to_thread(read)
    for f in fwds:
        if f.proto != "tcp":
            log.warning("forward %s of %s on %s is %s; only tcp is mapped", f.host_port,
                        user, server, f.proto)
            continue
        maps.forwards[f.host_port] = f.container_port
    return maps


def _port_changes(name: str, config: Mapping[str, str], maps: PortMaps) -> dict:
    """The config changes that give the container ``maps`` (logged)."""
    changes = config_changes(config, maps.ssh_port, maps.forwards,
                             jupyter_maps(maps.jupyter_port))
    if changes:
        log.info("port maps of %s: %s", name, changes)
    return changes


async def _write_port_maps(lxd: LXD, name: str, config: dict, maps: PortMaps) -> bool:
    changes = _port_changes(name, config, maps)
    if changes:
        await lxd.update_config(name, changes)
    return bool(changes)


async def sync_port_maps(lxd: LXD, store: Store, user: str, server: str, *,
                         prefix: str = "") -> bool | None:
    """Write the user's SSH port and forwards on ``server`` into their
    container's config, if that container exists; True if anything changed,
    None if there is no container."""
    name = naming.instance_name(user, server, prefix)
    inst = await lxd.instance(name)
    if inst is None:
        return None
    check_owner(inst, user)
    maps = await _wanted_ports(store, user, server)
    return await _write_port_maps(lxd, name, inst.get("config") or {}, maps)


@dataclass(frozen=True)
class ContainerSync:
    """What :func:`sync_user_container` did."""

    name: str
    ports_changed: bool
    provisioned: bool              # False: the container is not running


async def sync_user_container(lxd: LXD, store: Store, user: str, server: str, *,
                              prefix: str = "") -> ContainerSync:
    """Push the store's view (port maps; SSH keys if it runs) into the user's
    existing container.  A missing container is an LXDNotFound error."""
    name = naming.instance_name(user, server, prefix)
    inst = await lxd.instance(name)
    if inst is None:
        raise LXDNotFound(f"{user} has no container on {server} (no instance {name})", 404)
    check_owner(inst, user)
    maps = await _wanted_ports(store, user, server)
    changed = await _write_port_maps(lxd, name, inst.get("config") or {}, maps)
    if instance_status(inst) != "running":
        return ContainerSync(name, changed, False)
    keys = await asyncio.to_thread(store.authorized_keys, user)
    await provision(lxd, name, login=naming.posix_name(user), keys=keys,
                    hostname=naming.hostname(user, server))
    return ContainerSync(name, changed, True)


async def _fixed_nic(lxd: LXD, store: Store, settings: Settings, user: str, server: str,
                     name: str, profiles: Sequence[str], current: Mapping | None,
                     actor: str) -> dict[str, str]:
    """The NIC the user's container must have on ``server``: the profiles'
    eth0 with the address the store assigned pinned and LXD's filtering on.
    A new address is allocated only when the store has none valid for the
    bridge, avoiding those LXD has pinned on other instances there."""
    base = network.profile_nic(list(await asyncio.gather(*(lxd.profile(p) for p in profiles))))
    bridge = network.Bridge.from_lxd(await lxd.network(network.nic_network(base)))
    address = await asyncio.to_thread(store.address, user, server)
    have = (current or {}).get(network.NIC) or {}
    if not (address and have.get("ipv4.address") == address and bridge.holds(address)
            and address in set(bridge.static_addresses())):
        taken = {network.assigned_ipv4(i, {bridge.name: bridge})
                 for i in await lxd.list_instances(all_projects=True)
                 if (i.get("name"), i.get("project", "default")) != (name, lxd.project or "default")}
        free = [a for a in bridge.static_addresses() if a not in taken]
        if not free and not any(True for _ in bridge.static_addresses()):
            raise ContainerError(
                f"the LXD bridge {bridge.name} hands out its whole subnet by DHCP, leaving no "
                "room for the fixed addresses lxcgpu gives containers: run "
                "`setup/lxdhost.py up`, or set the bridge's ipv4.dhcp.ranges to part of it")
        address = await asyncio.to_thread(store.assign_address, user, server, free,
                                          actor=actor)
    return network.nic_device(base, address, port_isolation=settings.port_isolation)


async def _home_pool(lxd: LXD, spec: ContainerSpec) -> str | None:
    """The pool holding the user's home volume on this server, if they have
    one there (their container was rebuilt before, or deleted keeping it)."""
    pool = spec.pool
    if not pool:
        for name in reversed(spec.profiles):     # a later profile's root wins
            root = ((await lxd.profile(name)).get("devices") or {}).get("root") or {}
            if root.get("pool"):
                pool = root["pool"]
                break
    if pool and await lxd.volume(pool, home_volume(spec.name)) is not None:
        return pool
    return None


_ADDRESS_LOCKS: dict[tuple[str, int], asyncio.Lock] = {}


def _address_lock(lxd: LXD) -> asyncio.Lock:
    """One lock per LXD endpoint (and event loop) for address allocation."""
    key = (lxd.endpoint, id(asyncio.get_running_loop()))
    if key not in _ADDRESS_LOCKS:
        _ADDRESS_LOCKS[key] = asyncio.Lock()
    return _ADDRESS_LOCKS[key]


async def _runtime_setting(lxd: LXD, spec: ContainerSpec, inst: Mapping[str, Any]) -> None:
    """A stopped container of a server in driver_sync "runtime" gets
    ``nvidia.runtime`` before it starts (one made before the mode was chosen
    too), where the server has GPUs."""
    if not spec.nvidia_runtime or (inst.get("config") or {}).get("nvidia.runtime") == "true":
        return
    if (await lxd.gpus())[0] > 0:
        await lxd.update_config(spec.name, {"nvidia.runtime": "true"})


def _no_toolkit(server: str, e: LXDError) -> ContainerError | None:
    """LXD's refusal of a container with ``nvidia.runtime`` on a server
    without NVIDIA's container toolkit (at any config change: "Initialize
    LXC: The NVIDIA container tools couldn't be found"; at a start: "Load
    go-lxc struct: ..."), as the sentence of what is missing; None for any
    other error."""
    said = str(e).lower()
    if "nvidia container tools" not in said and "nvidia-container-cli" not in said:
        return None
    if "requirement error" in said or "unsatisfied condition" in said:
        # nvidia.require.driver / nvidia.require.cuda (the site's extra config).
        return ContainerError(
            f"{server}'s NVIDIA driver is older than the lab requires for containers "
            "(nvidia.require.*): an administrator upgrades the driver there, or you start "
            "your server on another GPU server")
    return ContainerError(
        f"{server} cannot give containers its NVIDIA driver: NVIDIA's container "
        "toolkit (nvidia-container-cli) is missing or failing there; an administrator "
        "installs it, or sets driver_sync = \"installer\" for that server (and unsets "
        "nvidia.runtime on its containers)")


#: The GPUs a user chose for their container on a server (UUIDs, or nvidia-smi
#: indexes where the host's LXD has no UUIDs); absent: every GPU.
GPUS_KEY = f"{naming.KEY_PREFIX}gpus"


async def _chosen_pci(lxd: LXD, server: str, wanted: Sequence[str]) -> list[str]:
    """The PCI addresses of the GPUs ``wanted`` names on this server now;
    ContainerError when one of them is gone."""
    try:
        chosen = gpus.choose((await lxd.gpus())[1], wanted, server)
    except gpus.GPUChoiceError as e:
        raise ContainerError(f"{e}: choose your GPUs again (keyportal, or lxcgpu gpus "
                             f"{server} all)") from None
    return [g.pci_address for g in chosen]


async def set_user_gpus(lxd: LXD, user: str, server: str, wanted: Sequence[str | int], *,
                        prefix: str = "") -> list:
    """Give ``user``'s container on ``server`` the GPUs ``wanted`` names (by
    UUID or nvidia-smi index; empty: every GPU of the server), at once
    (containers take GPU devices while running); the chosen GPUs.
    ValueError (gpus.GPUChoiceError) names the server's GPUs for a wrong one."""
    name = naming.instance_name(user, server, prefix)
    inst = await lxd.instance(name)
    if inst is None:
        raise ContainerError(f"{user} has no container on {server}: start it first")
    check_owner(inst, user)
    count, found = await lxd.gpus()
    chosen = gpus.choose(found, wanted, server) if wanted else ()
    changes = gpus.device_changes(inst.get("devices") or {}, count,
                                  [g.pci_address for g in chosen])
    if changes:
        await lxd.update_devices(name, changes)
    await lxd.update_config(name, {GPUS_KEY: ",".join(g.uuid or str(g.index)
                                                      for g in chosen) or None})
    log.info("%s: GPUs %s", name, ", ".join(str(g.index) for g in chosen) or "all")
    return list(chosen)


async def _gpu_devices(lxd: LXD, name: str, inst: Mapping[str, Any], server: str) -> None:
    """Before a start: chosen GPUs follow their UUIDs to their PCI addresses
    now (a card moved to another slot)."""
    wanted = gpus.chosen_from_config((inst.get("config") or {}).get(GPUS_KEY))
    if not wanted:
        return
    count = (await lxd.gpus())[0]
    changes = gpus.device_changes(inst.get("devices") or {}, count,
                                  await _chosen_pci(lxd, server, wanted))
    if changes:
        await lxd.update_devices(name, changes)


async def _sync_driver(lxd: LXD, settings: Settings, name: str, server: str,
                       say: Callable[[str], None]) -> None:
    """driver_sync "installer": the container's NVIDIA userspace driver made
    the host's (lxcspawner.driversync); nothing on a server without an
    NVIDIA driver, or when the versions match."""
    if settings.driver_sync_for(server) != "installer":
        return
    host = await driversync.host_version(lxd, settings, server)
    if host is None:
        return
    try:
        await driversync.sync(lxd, name, host, settings.installer_dir,
                              arch=(await lxd.server_info()).get("environment", {}).get(
                                  "kernel_architecture"), progress=say)
    except driversync.DriverSyncError as e:
        raise ContainerError(str(e)) from e


async def _start(lxd: LXD, spec: ContainerSpec, *, created: bool,
                 say: Callable[[str], None]) -> None:
    """Start the container.  The first start of one made just now shifts its
    whole root file system to the user's ids; where LXD fails that (seen in
    bursts of first starts on a dir pool: "Failed to handle idmapped
    storage"), the half-shifted container holds nothing of the user's and
    is made anew, once, rather than started again."""
    try:
        await lxd.start(spec.name)
    except LXDError as e:
        if not created or is_outage(e) or _no_toolkit(spec.server, e):
            raise
        log.warning("%s: its first start failed (%s): deleting it and creating it again",
                    spec.name, e)
        say("starting container failed; making it again")
        await lxd.delete_instance(spec.name)
        await ensure_container(lxd, spec)
        await lxd.start(spec.name)


async def delete_user_container(lxd: LXD, store: Store, user: str, server: str, *,
                                prefix: str = "", actor: str = "system",
                                keep_home: bool = False) -> bool:
    """Delete ``user``'s container on ``server`` and free its address; True
    if there was a container.  Its home volume goes too unless ``keep_home``
    (a container made again later finds it).  Keys, forwards and the SSH
    port stay theirs."""
    name = naming.instance_name(user, server, prefix)
    inst = await lxd.instance(name)
    if inst is not None:
        check_owner(inst, user)
        home = (inst.get("devices") or {}).get(HOME_DEVICE)
        await lxd.delete_instance(name)
        if home and not keep_home:
            await lxd.delete_volume(home["pool"], home["source"])
    await asyncio.to_thread(store.release_address, user, server, actor=actor)
    return inst is not None


@dataclass(frozen=True)
class Found:
    """What a spawn reads first, once, for everything after: the user's
    record (made at their first spawn) and their instance on the server
    (None where there is none)."""
    rec: UserRecord
    inst: dict | None


async def find(lxd: LXD, store: Store, user: str, server: str, *, prefix: str,
               actor: str = "system") -> Found:
    """The user's record and their instance on ``server``, read at once."""
    rec, inst = await asyncio.gather(asyncio.to_thread(store.ensure_user, user, actor=actor),
                                     lxd.instance(naming.instance_name(user, server, prefix)))
    return Found(rec, inst)


def runs_already(found: Found, user: str) -> bool:
    """Whether ``user`` is not suspended and their container exists, is
    theirs (its owner key) and runs: what starting a process of theirs in
    it at once needs, before :func:`ensure_user_container` has checked and
    provisioned the rest."""
    if found.rec.suspended is not None or found.inst is None:
        return False
    try:
        check_owner(found.inst, user)
    except ContainerError:
        return False
    return instance_status(found.inst) == "running"


def _suspended(rec, user: str) -> ContainerError:
    return ContainerError(f"{user}'s account is suspended (no longer in the lab's groups, "
                          f"since {rec.suspended:%Y-%m-%d %H:%M} UTC): their containers "
                          "stay as they are but do not start; an administrator can "
                          "restore access in the directory")


async def ensure_user_container(lxd: LXD, store: Store, settings: Settings, user: str,
                                server: str | None = None, *, start: bool = True,
                                progress: Progress | None = None, actor: str = "system",
                                address_timeout: float = 60, wait_network: bool = True,
                                found: Found | None = None, **overrides: Any) -> UserContainer:
    """Make ``user``'s container on ``server`` (default: ``settings.server``)
    exist, carry its port maps, run and be ready for SSH with the user's keys.

    Image, profiles, prefix, limits and mounts come from ``settings``;
    ``overrides`` replace any of :data:`SPEC_OVERRIDES` (``gpus`` defaults to
    the GPUs LXD sees on the server).  ``progress`` gets a short message before
    each step.  With ``start=False`` a stopped container is left stopped and
    not provisioned.  ``found``: the user's record and instance as
    :func:`find` read them just now (else it reads them).  With
    ``wait_network=False`` a container that was just started is returned
    before its address is up (``online`` False: the caller starts what needs
    no network meanwhile, then waits for it).  Idempotent: a running,
    provisioned container is left alone (no restart, no rewrite).
    """
    bad = set(overrides) - SPEC_OVERRIDES
    if bad:
        raise TypeError(f"unknown container setting(s): {', '.join(sorted(bad))}")
    server = server or settings.server
    try:
        return await _ensure_user_container(lxd, store, settings, user, server, start=start,
                                            say=progress or (lambda msg: None), actor=actor,
                                            address_timeout=address_timeout, wait_network=wait_network,
                                            found=found, **overrides)
    except LXDError as e:
        toolkit = _no_toolkit(server, e)
        if toolkit is None:
            raise
        log.error("%s on %s: LXD cannot use NVIDIA's container toolkit: %s", user, server, e)
        raise toolkit from e


async def _ensure_user_container(lxd: LXD, store: Store, settings: Settings, user: str,
                                 server: str, *, start: bool, say: Progress, actor: str,
                                 address_timeout: float, wait_network: bool,
                                 found: Found | None, **overrides: Any) -> UserContainer:
    say("allocating SSH port and ids")
    if found is None:
        found = await find(lxd, store, user, server, actor=actor,
                           prefix=overrides.get("prefix", settings.instance_prefix))
    rec, inst = found.rec, found.inst
    if rec.suspended is not None:
        raise _suspended(rec, user)
    spec = settings.container_spec(user, rec.idmap_base, server=server, **overrides)
    if inst is not None:
        check_owner(inst, user)
        if await half_made(lxd, inst):
            inst = None     # ensure_container makes it anew
    if inst is None and not rec.idmap_used and settings.pool_size > 0:
        # A new user: a prebuilt container of this server becomes theirs.
        taken = await pool.claim(lxd, store, settings, user, server, actor=actor,
                                 overrides=overrides)
        if taken is not None:
            rec, inst = taken
            spec = settings.container_spec(user, rec.idmap_base, server=server, **overrides)
            if inst is not None:
                say("using a prepared container")
    profiles = list(inst.get("profiles") or ()) if inst is not None else list(spec.profiles)
    # From choosing a free address to LXD holding it on the new instance,
    # no other container of this process takes one on the same LXD (two
    # lxcgpu servers may be projects of one LXD, sharing its bridge).
    async with _address_lock(lxd):
        nic = await _fixed_nic(lxd, store, settings, user, server, spec.name, profiles,
                               inst.get("devices") if inst is not None else None, actor)
        if inst is None:
            if not rec.idmap_used:
                if settings.pool_size > 0:
                    say("no prepared container was free")
                await asyncio.to_thread(store.mark_idmap_used, user)
            say("creating container")
            if "gpus" not in overrides:
                overrides = {**overrides, "gpus": await lxd.gpu_count()}
            spec = settings.container_spec(user, rec.idmap_base, server=server, nic=nic,
                                           **overrides)
            home = await _home_pool(lxd, spec)
            if home:
                say("attaching your home")
                spec = settings.container_spec(user, rec.idmap_base, server=server, nic=nic,
                                               home_pool=home, **overrides)
        created = inst is None
        if created:
            inst = await ensure_container(lxd, spec)
    address = nic["ipv4.address"]

    # A stopped container's state is its record's status (no address yet);
    # only a running one's addresses are asked of LXD.
    status = instance_status(inst)
    maps, state = await asyncio.gather(
        _wanted_ports(store, user, server, rec),
        lxd.state(spec.name) if status == "running"
        else asyncio.sleep(0, InstanceState(spec.name, status)))
    restart = False
    nic_change = {}
    if (inst.get("devices") or {}).get(network.NIC) != nic:
        # A container made before lxcgpu pinned addresses (or on a renumbered
        # bridge): its NIC changes once, stopped, so it takes the address.
        if state.running:
            say("restarting container to pin its address")
            log.info("%s: restarting it to pin its address %s", spec.name, address)
            await lxd.stop(spec.name)
            state = InstanceState(spec.name, "stopped")
            restart = True
        nic_change = {network.NIC: nic}
    # The port maps before the start, so the node agent maps the ports on
    # the start event; with the NIC in one change.
    port_changes = _port_changes(spec.name, inst.get("config") or {}, maps)
    if port_changes or nic_change:
        await lxd.update_instance(spec.name, config=port_changes or None,
                                  devices=nic_change or None)

    if start or restart:
        if not state.running:
            await _runtime_setting(lxd, spec, inst)
            await _gpu_devices(lxd, spec.name, inst, server)
            say("starting container")
            await _start(lxd, spec, created=created, say=say)
        # The address comes while the system boots; what needs no network
        # (the driver, the user's account and keys) is done meanwhile.
        network_up = None
        online = address in state.addresses
        if not online and wait_network:
            online = True
            network_up = asyncio.ensure_future(lxd.wait_for_address(
                spec.name, timeout=address_timeout, expected=address))
        try:
            await _sync_driver(lxd, settings, spec.name, server, say)
            say("preparing user")
            keys = await asyncio.to_thread(store.authorized_keys, user)
            await provision(lxd, spec.name, login=spec.posix_user, keys=keys,
                            hostname=spec.hostname)
            if network_up is not None and not network_up.done():
                say("waiting for network")
            if network_up is not None:
                await network_up
        finally:
            if network_up is not None and not network_up.done():
                network_up.cancel()
        return UserContainer(spec.name, server, user, spec.posix_user, address, maps.ssh_port,
                             maps.forwards, maps.jupyter_port, online)
    return UserContainer(spec.name, server, user, spec.posix_user, address, maps.ssh_port,
                         maps.forwards, maps.jupyter_port)


# While a container's home is copied into its new volume at its first
# rebuild, the volume is mounted here in the old system.
MOVING_HOME_AT = "/mnt/.lxcgpu-home"
MOVING_HOME_DEVICE = "lxcgpu-home-moving"


@dataclass(frozen=True)
class Rebuilt:
    container: UserContainer
    home_moved: bool                # the home was copied into its volume this time
    snapshots_removed: list[str]    # the old system's snapshots, gone with it


async def _move_home(lxd: LXD, name: str, pool: str, login: str, *, timeout: float,
                     say: Progress) -> None:
    """Copy the home of a container made before homes had volumes of their
    own into a new volume (once; reflinks where the pool allows).  The copy
    runs in the old system as its root: whatever that root did to ``cp``
    only touches this user's own data.  On failure the new volume goes and
    the container is as it was."""
    volume = home_volume(name)
    old = await lxd.volume(pool, volume)
    if old is not None:
        if old.get("used_by"):
            raise ContainerError(f"the volume {volume} exists and is in use by "
                                 f"{', '.join(old['used_by'])}: an administrator must look")
        # What an interrupted earlier move left: copy afresh.
        await lxd.delete_volume(pool, volume)
    say("moving your home into a volume of its own")
    await lxd.create_volume(pool, volume, description=f"home of {login} in {name} (lxcgpu)")
    try:
        if await lxd.status(name) != "running":
            await lxd.start(name)
        await lxd.update_devices(name, {MOVING_HOME_DEVICE: {
            "type": "disk", "pool": pool, "source": volume, "path": MOVING_HOME_AT}})
        home = f"/home/{login}"
        entry = await lxd.file_entry(name, home)
        if entry is not None and entry.type == "directory":
            argv = ["cp", "-a", "--reflink=auto", "--", f"{home}/.", f"{MOVING_HOME_AT}/"]
            res = await lxd.execute(name, argv, timeout=timeout)
            if res.returncode != 0:
                why = (res.stderr or res.stdout).strip().splitlines()
                raise ContainerError(f"your home in {name} could not be copied into its own "
                                     f"volume ({why[-1][:200] if why else res.returncode}); "
                                     "nothing was changed")
        await lxd.update_devices(name, {MOVING_HOME_DEVICE: None})
    except BaseException:
        with contextlib.suppress(LXDError):
            await lxd.update_devices(name, {MOVING_HOME_DEVICE: None})
        with contextlib.suppress(LXDError):
            await lxd.delete_volume(pool, volume)
        raise


async def rebuild_user_container(lxd: LXD, store: Store, settings: Settings, user: str,
                                 server: str, *, progress: Progress | None = None,
                                 actor: str = "system", copy_timeout: float = 6 * 3600
                                 ) -> Rebuilt:
    """Replace the system of ``user``'s container on ``server`` with a new
    one from the template; the home survives with its owners (a volume of
    its own, the pinned id map base), and so do the address, SSH port,
    forwards, keys and the container's own settings (snapshot schedule,
    ``security.nesting``, limits an admin set: extra config keys).  The old system's snapshots go
    with it (the home's stay).  A container whose home is still in its
    system has it copied into a volume first, once.  Nothing changes
    before the template is known to exist and the home is safe."""
    say = progress or (lambda msg: None)
    name = naming.instance_name(user, server, settings.instance_prefix)
    inst = await lxd.instance(name)
    if inst is None:
        raise ContainerError(f"{user} has no container on {server} to rebuild")
    check_owner(inst, user)
    rec = await asyncio.to_thread(store.ensure_user, user, actor=actor)
    if rec.suspended is not None:
        raise _suspended(rec, user)
    spec = settings.container_spec(user, rec.idmap_base, server=server)
    await lxd.image_by_alias(spec.image)
    moved = False
    if HOME_DEVICE not in (inst.get("devices") or {}):
        await _move_home(lxd, name, root_pool(inst), spec.posix_user, timeout=copy_timeout,
                         say=say)
        moved = True
    # The container's own settings beyond what the site gives every
    # container (a snapshot schedule, Docker's nesting, an admin's limit).
    base = spec.config()
    carried = {}
    for key, value in (inst.get("config") or {}).items():
        with contextlib.suppress(ValueError):
            if key not in base:
                check_extra_key(key)
                carried[key] = value
    snapshots = [s["name"] for s in await lxd.snapshots(name)]
    # The GPUs they chose, on the new system too.
    chose = (inst.get("config") or {}).get(GPUS_KEY)
    gpu_pci = await _chosen_pci(lxd, server, gpus.chosen_from_config(chose)) if chose else []
    say("stopping container")
    try:
        await lxd.stop(name, timeout=60)
    except LXDError as e:
        if is_outage(e):
            raise
        log.warning("%s: a clean stop failed (%s); it is stopped by force", name, e)
    say("removing the old system")
    await lxd.delete_instance(name)
    log.info("%s: old system removed (%d snapshots with it); making it anew", name,
             len(snapshots))
    uc = await ensure_user_container(lxd, store, settings, user, server, progress=progress,
                                     actor=actor, extra_config=carried,
                                     **({"gpu_pci": tuple(gpu_pci)} if gpu_pci else {}))
    if chose:
        await lxd.update_config(name, {GPUS_KEY: chose})
    return Rebuilt(uc, moved, snapshots)
