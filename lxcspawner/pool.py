"""Prebuilt containers: a new user's first server as fast as a restart.

A new container's first start is slow: LXD shifts every file of its root
file system (~35,000) into the user's own id block, then systemd boots it for
the first time (machine id, SSH host keys).  Each GPU server therefore keeps
a few containers (``[containers] pool``, default 2; 0 turns it off) made from
the current template, each with an id block reserved for it in the store,
started once (so its files are shifted and its first boot is done) and
stopped.  They belong to no one: no owner keys, no keys, no port maps, no
network device at all (their ``eth0`` is removed), and they stay stopped.

A user whose id block is not on disk yet (they never had a container) takes
one over at their first spawn on that server (:func:`claim`): in one store
transaction the prebuilt container's block becomes theirs (theirs, unused, is
freed) and the container is marked as being taken; then it is renamed to the
user's container name and given the user's configuration (owner keys, GPUs,
mounts, limits), and the spawn goes on as for a stopped container of theirs:
address, port maps, start, account and keys.  Two users never take the same
one (the store's writers serialize); with none ready the container is made
as before, and the spawn page says which happened.

:class:`PoolKeeper` (run by keyportal, a hub service: never on a spawn's
path or in the hub's process) tends each server's pool every few seconds,
one container at a time per server: it makes missing ones, retires those
made from an older template (a template rebuild) or beyond the size, and
forgets what a crash left half-done.  Names: ``[<prefix>-]pool--<server>--
<8 hex>``, two ``--`` where users' containers have one, so no user's
container name can ever be a prebuilt one's; the keeper touches only its own
site's (its prefix), never another lxcgpu's on the same LXD.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Callable, Mapping

from . import naming, network
from .container import KEY_PREFIX
from .lxd import LXD, ImageNotFound, LXDError, instance_status, is_outage, parse_time

if TYPE_CHECKING:
    from .settings import Settings
    from .store import PoolRecord, Store, UserRecord

log = logging.getLogger("lxcspawner.pool")

#: ``user.lxcgpu.pool = <server>`` marks a prebuilt container (no one's).
POOL_KEY = f"{KEY_PREFIX}pool"
POOL_CPU_SHARE = "10%"
#: The user a prebuilt container's configuration is rendered for, before the
#: owner keys are taken out.
PLACEHOLDER_USER = "prebuilt"
#: The keys of a user's container that a prebuilt one does not carry.
OWNER_KEYS = tuple(f"{KEY_PREFIX}{k}" for k in ("owner", "server", "posix-user"))
ACTOR = "pool"
#: Run once in a prebuilt container: Jupyter's imports and JupyterLab's
#: static files, and what makes the account (provision.NEW_ACCOUNT), read
#: into the page cache (its files are its own).
WARM_UP = ["sh", "-c", "/opt/jupyter/bin/python3 -c 'import jupyter_server.serverapp, "
           "jupyterlab.labapp, jupyterhub.singleuser' && "
           "find /opt/jupyter/share/jupyter/lab -type f -exec cat {} + >/dev/null && "
           "/usr/bin/python3 -I -c 'import os, pwd, socket, stat, subprocess' && "
           "useradd --help >/dev/null"]
#: A prebuilt container still being made after this long was left by a crash.
STALE_MAKING = timedelta(minutes=30)
#: A takeover still marked after this long was interrupted (its row is forgotten).
STALE_CLAIM = timedelta(minutes=10)
#: No prebuilt container is made within this many seconds of a container's
#: start on its server (a spawn under way there).
QUIET = 30.0


def member_prefix(server: str, prefix: str = "") -> str:
    """How the names of this site's prebuilt containers on ``server`` start
    (another site on the same LXD has another ``[containers] prefix``)."""
    head = f"{prefix}-" if prefix else ""
    return f"{head}pool--{naming.safe_slug(server, naming.SERVER_SLUG_MAX)}--"


def member_name(server: str, prefix: str = "") -> str:
    """A new prebuilt container's name on ``server``."""
    name = member_prefix(server, prefix) + secrets.token_hex(4)
    assert naming.is_valid_lxd_name(name), name
    return name


def is_member(instance: Mapping[str, Any]) -> bool:
    return bool((instance.get("config") or {}).get(POOL_KEY))


def member_config(settings: "Settings", server: str, idmap_base: int,
                  gpus: int) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """The configuration and devices of a prebuilt container: a user's
    container's (the site's limits, mounts, GPUs, id map) without an owner
    and without a network device, yielding the CPU to users' containers."""
    spec = settings.container_spec(PLACEHOLDER_USER, idmap_base, server=server, gpus=gpus)
    config = {k: v for k, v in spec.config().items() if k not in OWNER_KEYS}
    config[f"{KEY_PREFIX}purpose"] = "prebuilt"
    config[POOL_KEY] = server
    # It is made while users spawn: when CPU is short, its boot and warm-up
    # get a tenth of a user's container's share (LXD's soft CPU allowance, a
    # cgroup weight: no cap on an idle server).  The takeover gives the
    # user's container the user's configuration, without it.
    config["limits.cpu.allowance"] = POOL_CPU_SHARE
    devices = spec.devices()
    devices[network.NIC] = {"type": "none"}
    return config, devices


async def make_member(lxd: LXD, store: "Store", settings: "Settings", server: str,
                      fingerprint: str | None) -> str:
    """Make one prebuilt container on ``server`` from the template (whose
    image is ``fingerprint`` now): reserve a block, create it, start it once
    (shifting its files, booting it for the first time), stop it, mark it
    ready.  Its name; on failure nothing of it is left."""
    name = member_name(server, settings.instance_prefix)
    base = await asyncio.to_thread(store.reserve_pool_block, server, name, actor=ACTOR,
                                   image=fingerprint)
    config, devices = member_config(settings, server, base, await lxd.gpu_count())
    try:
        await lxd.create_instance(name, image_alias=settings.image, config=config,
                                  devices=devices, profiles=settings.profiles)
        await lxd.start(name)
        # The first boot's own work (machine id, SSH host keys) done here too.
        res = await lxd.execute(name, ["systemctl", "is-system-running", "--wait"],
                                timeout=120)
        log.debug("%s: first boot %s", name, res.stdout.strip())
        # Jupyter's files read once: a fresh container's files are new to
        # the page cache, and its first Jupyter start would read them cold.
        res = await lxd.execute(name, WARM_UP, timeout=120)
        if res.returncode != 0:
            log.info("%s: warming Jupyter's files up failed (%s): it starts cold", name,
                     (res.stderr or res.stdout).strip()[-200:])
        await lxd.stop(name, timeout=60)
        if not await asyncio.to_thread(store.pool_ready, name):
            raise LXDError(f"{name} was retired while it was made")
    except BaseException:
        await _forget(lxd, store, name)
        raise
    log.info("%s: prebuilt on %s (id block %d)", name, server, base)
    return name


async def _delete_member(lxd: LXD, name: str) -> None:
    """Delete the instance ``name`` if it is a prebuilt container (never
    anything else of that name); a failure is logged."""
    try:
        inst = await lxd.instance(name)
        if inst is not None and is_member(inst):
            await lxd.delete_instance(name)
    except LXDError as e:
        log.warning("%s: could not delete it: %s", name, e)


async def _forget(lxd: LXD, store: "Store", name: str, *, actor: str = ACTOR,
                  claimed: bool = False) -> None:
    """Delete a prebuilt container and its row (each as far as it exists)."""
    await _delete_member(lxd, name)
    await asyncio.to_thread(store.release_pool_member, name, actor=actor, claimed=claimed)


async def claim(lxd: LXD, store: "Store", settings: "Settings", user: str, server: str, *,
                actor: str, overrides: Mapping[str, Any]
                ) -> tuple["UserRecord", dict | None] | None:
    """Give ``user`` a prebuilt container of ``server`` as their container
    there: (their record with its id block now, the instance renamed and
    configured as theirs); None when none is ready or their block is in use
    already.  If the takeover fails half-way the prebuilt container is
    deleted and the instance is None: the block is the user's all the same,
    and their container is made as before."""
    got = await asyncio.to_thread(store.claim_pool_member, user, server, actor=actor)
    if got is None:
        return None
    member, rec = got
    if "gpus" not in overrides:
        overrides = {**overrides, "gpus": await lxd.gpu_count()}
    spec = settings.container_spec(user, rec.idmap_base, server=server, **overrides)
    try:
        inst = await lxd.instance(member)
        if inst is None or not is_member(inst):
            raise LXDError(f"{member} is gone")
        if instance_status(inst) != "stopped":
            raise LXDError(f"{member} is {inst.get('status')}, not stopped")
        await lxd.rename_instance(member, spec.name)
        # The user's configuration, as a container made for them now has it
        # (also where the site's limits, mounts or GPUs changed since it
        # was prepared); its eth0 follows with the user's address.
        config, devices = spec.config(), spec.devices()
        changes: dict[str, str | None] = {
            k: None for k in inst.get("config") or {}
            if k not in config and not k.startswith(("volatile.", "image."))}
        changes.update(config)
        await lxd.update_instance(spec.name, config=changes, devices={
            **{k: None for k in inst.get("devices") or {}
               if k not in devices and k != network.NIC}, **devices})
    except LXDError as e:
        log.warning("%s: taking over %s failed (%s): making a container instead", user,
                    member, e)
        # Renamed or not: what is left of it goes (never an instance of the
        # user's name that is not the prebuilt one).
        await _delete_member(lxd, spec.name)
        await _forget(lxd, store, member, actor=actor, claimed=True)
        return rec, None
    await asyncio.to_thread(store.release_pool_member, member, actor=actor, claimed=True)
    log.info("%s: %s took over the prebuilt %s", spec.name, user, member)
    return rec, await lxd.instance(spec.name)


# ---------------------------------------------------------------- the keeper

def _age(t: datetime | None, now: datetime) -> timedelta:
    if t is None:
        return timedelta(0)
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    return now - t


async def tend(lxd: LXD, store: "Store", settings: "Settings", server: str, *,
               since: datetime | None = None, make: bool = True,
               now: Callable[[], datetime] = lambda: datetime.now(timezone.utc)) -> dict:
    """One round on one server: forget the half-done, retire the outdated
    and the surplus, make what is missing (one at a time; not with
    ``make=False``).  What it did.  ``since``: when this keeper started; one
    still being made from before was cut off (the hub stopped meanwhile)."""
    done = {"made": 0, "retired": 0, "forgotten": 0, "failed": 0}
    size, fingerprint = settings.pool_size, None
    if size > 0:
        try:
            fingerprint = (await lxd.image_by_alias(settings.image)).get("fingerprint")
        except ImageNotFound as e:
            log.warning("%s: no prebuilt containers: %s", server, e)
            size = 0
    rows: list[PoolRecord] = await asyncio.to_thread(store.pool_members, server)
    mine = member_prefix(server, settings.instance_prefix)
    instances = {i["name"]: i for i in await lxd.list_instances(config_key=POOL_KEY)
                 if (i.get("config") or {}).get(POOL_KEY) == server
                 and i["name"].startswith(mine)}
    t = now()
    keep: list[PoolRecord] = []
    for r in rows:
        inst = instances.pop(r.instance, None)
        if r.claimed_by is not None:
            # Being taken over: the user's now; a takeover a crash cut off is forgotten.
            if _age(r.claimed_at, t) > STALE_CLAIM:
                await asyncio.to_thread(store.release_pool_member, r.instance, actor=ACTOR,
                                        claimed=True)
                done["forgotten"] += 1
            continue
        if inst is None and (r.ready or _age(r.created, t) > STALE_MAKING):
            # Deleted by hand, or its making was cut off.
            await asyncio.to_thread(store.release_pool_member, r.instance, actor=ACTOR)
            done["forgotten"] += 1
            continue
        if not r.ready:
            if _age(r.created, t) > STALE_MAKING or (
                    since is not None and _age(r.created, since) > timedelta(0)):
                await _forget(lxd, store, r.instance)
                done["forgotten"] += 1
            else:
                keep.append(r)          # another keeper is making it
            continue
        if r.image != fingerprint or len(keep) >= size:
            log.info("%s: retiring %s (%s)", server, r.instance,
                     "made from an older template" if r.image != fingerprint else
                     "beyond the pool's size")
            await _forget(lxd, store, r.instance)
            done["retired"] += 1
            continue
        keep.append(r)
    for name in instances:              # prebuilt containers the store does not know
        log.info("%s: deleting %s, which the store does not know", server, name)
        try:
            await lxd.delete_instance(name)
            done["forgotten"] += 1
        except LXDError as e:
            log.warning("%s: could not delete %s: %s", server, name, e)
    for _ in range(size - len(keep) if make else 0):
        try:
            await make_member(lxd, store, settings, server, fingerprint)
            done["made"] += 1
        except LXDError as e:
            done["failed"] += 1
            log.warning("%s: making a prebuilt container failed: %s", server, e)
            if is_outage(e):
                break
    return done


class PoolKeeper:
    """Keeps every GPU server's prebuilt containers (:func:`tend`), each
    server on its own, every ``interval`` seconds, with LXD clients of its
    own (its long operations never wait for or hold up a user's)."""

    def __init__(self, settings: "Settings", store: "Store", *, interval: float = 20,
                 quiet: float = QUIET):
        self.settings, self.store = settings, store
        self.interval = interval
        self.quiet = quiet
        self._lxd: dict[str, LXD] = {}
        self._failing: dict[str, str] = {}
        self._ready: dict[str, set[str]] = {}
        self.started = datetime.now(timezone.utc)

    def lxd_for(self, server: str) -> LXD:
        if server not in self._lxd:
            self._lxd[server] = self.settings.gpu_server(server).open_lxd(retries=0)
        return self._lxd[server]

    def close(self) -> None:
        for lxd in self._lxd.values():
            lxd.close()

    def _ready_now(self, server: str) -> set[str]:
        return {m.instance for m in self.store.pool_members(server)
                if m.ready and m.claimed_by is None}

    async def _started_lately(self, server: str) -> str | None:
        """A container (not a prebuilt one) of ``server`` that LXD started
        less than ``quiet`` seconds ago: a spawn may be under way there."""
        now = datetime.now(timezone.utc)
        for inst in await self.lxd_for(server).list_instances():
            if is_member(inst):
                continue
            try:
                used = parse_time(str(inst.get("last_used_at") or ""))
            except ValueError:
                continue
            if timedelta(0) <= now - used < timedelta(seconds=self.quiet):
                return inst.get("name")
        return None

    async def round(self, server: str) -> dict:
        """One round of :func:`tend` on ``server``.  Making a prebuilt
        container (LXD shifting its files, its first boot, its files read)
        takes the server's CPU and disk for seconds, which would slow a
        user's spawn beside it; so nothing is made in a round that finds one
        taken since the last round (new users come in bunches: a course's
        first session), or a container started in the last ``quiet``
        seconds (a spawn under way), while one is still ready: with none
        ready, the next new user's container would be made on their spawn's
        path, slower than any refill beside it."""
        ready = await asyncio.to_thread(self._ready_now, server)
        taken = bool(ready) and bool(self._ready.get(server, set()) - ready)
        started = None if taken or not ready else await self._started_lately(server)
        if taken:
            log.info("%s: a prebuilt container was taken since the last round; refilling at "
                     "the next round without one", server)
        elif started and len(ready) < self.settings.pool_size:
            log.info("%s: %s started less than %g s ago; refilling at the next round",
                     server, started, self.quiet)
        done = await tend(self.lxd_for(server), self.store, self.settings, server,
                          since=self.started, make=not (taken or started))
        self._ready[server] = await asyncio.to_thread(self._ready_now, server)
        return done

    async def _server(self, server: str) -> None:
        while True:
            try:
                done = await self.round(server)
                if any(done.values()):
                    log.info("%s: prebuilt containers: %s", server, done)
                if self._failing.pop(server, None):
                    log.info("%s: prebuilt containers kept again", server)
            except Exception as e:  # noqa: BLE001 - the keeper lives on
                if self._failing.get(server) != str(e):
                    log.warning("%s: keeping prebuilt containers failed: %s", server, e,
                                exc_info=not isinstance(e, LXDError))
                self._failing[server] = str(e)
            await asyncio.sleep(self.interval)

    async def run(self) -> None:
        if self.settings.pool_size <= 0 and not await asyncio.to_thread(self.store.pool_members):
            log.info("prebuilt containers are off ([containers] pool = 0)")
        await asyncio.gather(*(self._server(s) for s in self.settings.server_names))
