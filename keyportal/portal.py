"""What a user (or an admin on a user's behalf) can do through keyportal:
keys, containers, snapshots, forwards and the ssh config, on every GPU server
of the site.  The pages, the REST API and the ``lxcgpu`` client all come
here; authorisation is the caller's (``keyportal.app``), auditing is here.

Every store call runs off the event loop; every LXD call goes through the
site's fleet (one client per server, a timeout on every call), so a server
that is down is named and blocks no other.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from lxcspawner import gpus as gpus_mod
from lxcspawner import lifecycle, naming
from lxcspawner.container import HOME_DEVICE, ContainerError, check_owner
from lxcspawner.fleet import Fleet, ServerResult
from lxcspawner.lxd import (
    LXDError, LXDNotFound, LXDUnavailable, instance_status, is_outage, parse_time,
)
from lxcspawner.settings import Settings, SettingsError
from lxcspawner.store import Exhausted, InvalidInput, NotFound, Store, StoreError

from monitor.usage import GPUUsage

from .operations import Operation, Operations, Progress

log = logging.getLogger("keyportal")

#: The largest request body keyportal reads (keys and names are small).
MAX_BODY = 64 * 1024

#: Scheduled snapshots: LXD's schedule -> the unit of snapshots.expiry for "keep N".
SCHEDULES = {"@hourly": "H", "@daily": "d", "@weekly": "w"}
AUTO_PREFIX = "auto-"
#: The expiry of a snapshot made by hand: never (LXD's zero time would mean
#: "the container's snapshots.expiry").
KEEP_FOREVER = "2999-01-01T00:00:00Z"


class PortalError(Exception):
    """A refusal a user can read; ``status`` is the HTTP status it maps to."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _refusal(e: Exception) -> PortalError:
    """The user's sentence for an error from below (the log has the detail)."""
    if isinstance(e, PortalError):
        return e
    if isinstance(e, LXDUnavailable) or (isinstance(e, LXDError) and is_outage(e)):
        return PortalError("that GPU server's LXD is not reachable right now; try again "
                           "later or ask an administrator", 503)
    if isinstance(e, LXDNotFound):
        return PortalError(str(e), 404)
    if isinstance(e, SettingsError):
        return PortalError(str(e), 404)
    if isinstance(e, ContainerError):
        return PortalError(str(e), 409)
    if isinstance(e, InvalidInput):
        return PortalError(str(e), 400)
    if isinstance(e, NotFound):
        return PortalError(str(e), 404)
    if isinstance(e, Exhausted):
        return PortalError(str(e), 503)
    if isinstance(e, StoreError):          # a limit reached, a conflict
        return PortalError(str(e), 409)
    if isinstance(e, ValueError):
        return PortalError(str(e), 400)
    return PortalError(f"{type(e).__name__}: {e}", 500)


@dataclass
class Container:
    server: str
    name: str
    exists: bool
    state: str                  # running, stopped, ... or "none" / "unreachable"
    address: str | None
    ssh_command: str
    detail: str = ""
    home_volume: bool = False   # the home is a volume of its own (kept by a rebuild)


def _usage_of(gpu, now: list[dict]) -> dict:
    """What the node agent says of ``gpu`` (matched by UUID, else by
    nvidia-smi index): memory, free or in use and by whom."""
    row = next((u for u in now if gpu.uuid and u.get("uuid") == gpu.uuid), None) or \
        next((u for u in now if not gpu.uuid and u.get("index") == gpu.index), None)
    if row is None:
        return {"memory": None, "state": None, "users": [], "now": None}
    return {"memory": row["memory"], "state": row["state"], "users": row["users"],
            "now": row["text"]}


class Portal:
    """One per service process: the site, its store and its fleet."""

    def __init__(self, settings: Settings, store: Store | None = None):
        self.settings = settings
        # Called once a user's tokens are revoked (the app empties the cache
        # of the hub's answers about tokens).
        self.forget_tokens: Callable[[], None] = lambda: None
        self.store = store or settings.open_store()
        self.fleet = Fleet(settings, self.store, actor="keyportal")
        self.operations = Operations(_sentence)
        self.usage = GPUUsage()

    def close(self) -> None:
        self.fleet.close()
        self.store.close()

    # ------------------------------------------------------------ helpers

    async def _store(self, fn, *args, **kwargs):
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except (StoreError, ValueError) as e:
            raise _refusal(e) from None

    async def audit(self, actor: str, action: str, user: str, detail: dict, *,
                    ok: bool = True, source: str | None = None) -> None:
        await asyncio.to_thread(self.store.audit, actor, action, user,
                                {**detail, **({"source": source} if source else {})}, ok=ok)

    async def _step(self, actor: str, action: str, user: str, detail: dict, work, *,
                    source: str | None):
        """Run ``work`` (a coroutine) and audit it, failed or done; a failure
        is the user's sentence (the log and the audit have LXD's)."""
        try:
            result = await work
        except (LXDError, ContainerError, StoreError, OSError, ValueError) as e:
            await self.audit(actor, action, user, {**detail, "error": str(e)}, ok=False,
                             source=source)
            log.warning("%s for %s (%s) failed: %s", action, user, detail, e)
            if isinstance(e, TimeoutError):
                raise PortalError("the GPU server did not finish in time; try again, or ask "
                                  "an administrator", 504) from None
            if isinstance(e, ConnectionError):
                raise _refusal(LXDUnavailable(str(e))) from None
            if isinstance(e, OSError):
                raise PortalError("the file could not be written where the site keeps it; an "
                                  "administrator has the details", 503) from None
            raise _refusal(e) from None
        await self.audit(actor, action, user, detail, source=source)
        return result

    def server(self, name: str) -> str:
        try:
            return self.settings.gpu_server(name).name
        except (SettingsError, ValueError) as e:
            raise PortalError(str(e), 404) from None

    def _idle(self, user: str, server: str) -> None:
        """409 while an operation (a rebuild, an export) works on the
        container."""
        op = self.operations.running(user, server)
        if op is not None:
            raise _busy(op)

    def _start(self, user: str, kind: str, server: str, actor: str, work) -> dict:
        return self.operations.start(user, kind, server, actor, work, _busy).json()

    def operation(self, user: str, op_id: str) -> Operation:
        op = self.operations.get(op_id)
        if op is None or op.user != user:
            raise PortalError("there is no such operation (they are kept an hour after they "
                              "end)", 404)
        return op

    def instance(self, user: str, server: str) -> str:
        return naming.instance_name(user, server, self.settings.instance_prefix)

    async def _owned(self, user: str, server: str) -> str:
        """The user's instance on ``server``; 404 if it does not exist."""
        return (await self._owned_record(user, server))["name"]

    async def _owned_record(self, user: str, server: str) -> dict:
        """LXD's record of the user's instance on ``server`` (checked to be
        theirs); 404 if it does not exist."""
        server = self.server(server)
        name = self.instance(user, server)
        try:
            inst = await self.fleet.lxd(server).instance(name)
        except LXDError as e:
            raise _refusal(e) from None
        if inst is None:
            raise PortalError(f"you have no container on {server} yet: create it first", 404)
        try:
            check_owner(inst, user)
        except ContainerError as e:
            raise _refusal(e) from None
        return inst

    # ------------------------------------------------------------ the user

    async def existing_user(self, user: str) -> None:
        """404 unless lxcgpu knows ``user`` (an admin acting for them)."""
        if await self._store(self.store.get_user, user) is None:
            raise PortalError(f"there is no lxcgpu user {user!r}", 404)

    async def me(self, user: str) -> dict:
        rec = await self._store(self.store.ensure_user, user, actor="keyportal")
        return {"name": rec.name, "login": naming.posix_name(rec.name), "ssh_port": rec.ssh_port,
                "servers": list(self.settings.server_names),
                "suspended": rec.suspended.isoformat() if rec.suspended else None}

    def servers(self) -> list[dict]:
        return [{"name": g.name, "address": g.ssh_host, "remote": g.remote}
                for g in self.settings.servers]

    # ------------------------------------------------------------ keys

    async def keys(self, user: str) -> list[dict]:
        return [_key_json(k) for k in await self._store(self.store.list_keys, user)]

    async def add_keys(self, user: str, text: str, *, actor: str, source: str | None = None
                       ) -> dict:
        """Add every key in ``text`` (one per line; all or none), then write
        them into every container of ``user``; the result per server."""
        if "PRIVATE KEY" in text:
            # Whole, so the store refuses it as what it is (never stored).
            log.warning("%s sent a private key as a public key; refused", user)
            await self._store(self.store.add_key, user, text, actor=actor)
        lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        if not lines:
            raise PortalError("no key given: paste a public key (one line that starts with "
                              "ssh-ed25519, ssh-rsa, ecdsa-sha2-...)")
        if len(lines) > 50:
            raise PortalError("at most 50 keys at once")
        await self._store(self.store.ensure_user, user, actor=actor)
        added = []
        try:
            for line in lines:
                added.append(await self._store(self.store.add_key, user, line, actor=actor))
        except PortalError:
            for rec in added:   # all or none
                await asyncio.to_thread(self.store.remove_key, user, rec.fingerprint,
                                        actor=actor)
            raise
        results = await self.fleet.sync_user(user)
        # The store recorded key.add itself; this records where the change
        # came from and what each server did with it.
        await self.audit(actor, "keys.push", user, {
            "added": [k.fingerprint for k in added],
            "servers": {r.server: r.status for r in results}}, source=source)
        return {"added": [_key_json(k) for k in added], "servers": _results(results)}

    async def remove_key(self, user: str, fingerprint: str, *, actor: str,
                         source: str | None = None) -> dict:
        rec = await self._store(self.store.remove_key, user, fingerprint, actor=actor)
        results = await self.fleet.sync_user(user)
        await self.audit(actor, "keys.push", user, {
            "removed": rec.fingerprint, "servers": {r.server: r.status for r in results}},
            source=source)
        return {"removed": _key_json(rec), "servers": _results(results)}

    # ------------------------------------------------------------ containers

    async def containers(self, user: str) -> list[dict]:
        rec = await self._store(self.store.ensure_user, user, actor="keyportal")
        login = naming.posix_name(user)

        async def one(g) -> Container:
            name = self.instance(user, g.name)
            ssh = f"ssh -p {rec.ssh_port} {login}@{g.ssh_host}"
            try:
                lxd = self.fleet.lxd(g.name)
                inst = await lxd.instance(name)
                if inst is None:
                    return Container(g.name, name, False, "none", None, ssh,
                                     "no container yet: create it (or start Jupyter there)")
                check_owner(inst, user)
                address = await asyncio.to_thread(self.store.address, user, g.name)
                return Container(g.name, name, True, instance_status(inst), address, ssh,
                                 home_volume=_home(inst) is not None)
            except LXDError as e:
                log.warning("containers of %s on %s: %s", user, g.name, e)
                return Container(g.name, name, False, "unreachable", None, ssh,
                                 _refusal(e).args[0])
        return [asdict(c) for c in await asyncio.gather(*(one(g) for g in self.settings.servers))]

    async def create(self, user: str, server: str, *, actor: str, source: str | None = None
                     ) -> dict:
        server = self.server(server)
        self._idle(user, server)
        uc = await self._step(actor, "container.up", user, {"server": server},
                              lifecycle.ensure_user_container(
                                  self.fleet.lxd(server), self.store, self.settings, user,
                                  server, actor=actor), source=source)
        return {"server": server, "name": uc.name, "address": uc.address,
                "ssh_command": uc.ssh_command}

    async def set_state(self, user: str, server: str, action: str, *, actor: str,
                        source: str | None = None) -> dict:
        if action not in ("start", "stop"):
            raise PortalError(f"unknown action {action!r}", 404)
        server = self.server(server)
        if action == "start":
            # Start is "make it ready": keys and port maps as the store says.
            return await self.create(user, server, actor=actor, source=source)
        self._idle(user, server)
        name = await self._owned(user, server)
        await self._step(actor, "container.stop", user, {"server": server},
                         self.fleet.lxd(server).stop(name, timeout=60), source=source)
        return {"server": server, "name": name, "state": "stopped"}

    # ------------------------------------------------------------ snapshots

    async def snapshots(self, user: str, server: str) -> list[dict]:
        """The container's snapshots; ``home`` says whether each has the home
        with it (a home in a volume of its own is snapshotted beside the
        system under the same name)."""
        inst = await self._owned_record(user, server)
        lxd = self.fleet.lxd(self.server(server))
        home = _home(inst)
        try:
            rows = await lxd.snapshots(inst["name"])
            homes = (await lxd.snapshots(home["source"], pool=home["pool"])) if home else []
        except LXDError as e:
            raise _refusal(e) from None
        for r in rows:
            r["home"] = home is None or _paired(r, homes) is not None
        return rows

    async def snapshot(self, user: str, server: str, snapshot: str | None, *, actor: str,
                       source: str | None = None) -> dict:
        server = self.server(server)
        snapshot = snapshot or dt.datetime.now(dt.timezone.utc).strftime("snap-%Y%m%d-%H%M%S")
        try:
            naming.check_snapshot_name(snapshot)
        except ValueError as e:
            raise PortalError(str(e)) from None
        if snapshot.startswith(AUTO_PREFIX):
            raise PortalError(f"names starting with {AUTO_PREFIX!r} are the scheduled "
                              "snapshots': pick another")
        self._idle(user, server)
        inst = await self._owned_record(user, server)
        name, home = inst["name"], _home(inst)
        lxd = self.fleet.lxd(server)
        try:
            existing = await lxd.snapshots(name)
        except LXDError as e:
            raise _refusal(e) from None
        if any(s["name"] == snapshot for s in existing):
            raise PortalError(f"there is a snapshot called {snapshot} already", 409)
        limit = self.snapshot_limit
        manual = [s for s in existing if not s["name"].startswith(AUTO_PREFIX)]
        if len(manual) >= limit:
            raise PortalError(f"you have {len(manual)} snapshots of this container, the most "
                              f"allowed ({limit}): delete one first", 409)
        # Kept until deleted: LXD would otherwise give a snapshot made by
        # hand the container's snapshots.expiry (the schedule's).
        async def create():
            await lxd.create_snapshot(name, snapshot, expires_at=KEEP_FOREVER)
            if home:
                try:
                    await lxd.create_snapshot(home["source"], snapshot, expires_at=KEEP_FOREVER,
                                              pool=home["pool"])
                except LXDError:
                    with contextlib.suppress(LXDError):
                        await lxd.delete_snapshot(name, snapshot)
                    raise
        await self._step(actor, "snapshot.create", user, {"server": server, "snapshot": snapshot},
                         create(), source=source)
        return {"server": server, "name": snapshot}

    @property
    def snapshot_limit(self) -> int:
        return self.settings.snapshot_limit

    async def snapshot_schedule(self, user: str, server: str) -> dict:
        cfg = (await self._owned_record(user, server)).get("config") or {}
        schedule = cfg.get("snapshots.schedule", "")
        expiry = cfg.get("snapshots.expiry", "")
        keep = int(expiry[:-1]) if schedule in SCHEDULES and expiry[:-1].isdigit() else None
        return self._schedule(server, schedule, keep)

    def _schedule(self, server: str, schedule: str, keep: int | None) -> dict:
        return {"server": self.server(server), "schedule": schedule, "keep": keep,
                "limit": self.snapshot_limit}

    async def set_snapshot_schedule(self, user: str, server: str, schedule: Any, keep: Any, *,
                                    actor: str, source: str | None = None) -> dict:
        """Scheduled snapshots by LXD (``snapshots.schedule``), each kept for
        ``keep`` periods (``snapshots.expiry``), named ``auto-<time>``; an
        empty schedule turns them off."""
        if schedule not in ("", *SCHEDULES):
            raise PortalError(f"schedule: one of {', '.join(SCHEDULES)}, or empty for none")
        if schedule:
            if not isinstance(keep, int) or isinstance(keep, bool) \
                    or not 1 <= keep <= self.snapshot_limit:
                raise PortalError(f"keep: how many scheduled snapshots to keep, 1 to "
                                  f"{self.snapshot_limit}")
            changes = {"snapshots.schedule": schedule,
                       "snapshots.expiry": f"{keep}{SCHEDULES[schedule]}",
                       "snapshots.pattern": AUTO_PREFIX + "{{ creation_date|date:'20060102-"
                                                          "150405' }}",
                       "snapshots.schedule.stopped": "false"}
        else:
            changes = {k: None for k in ("snapshots.schedule", "snapshots.expiry",
                                         "snapshots.pattern", "snapshots.schedule.stopped")}
        server = self.server(server)
        self._idle(user, server)
        inst = await self._owned_record(user, server)
        home = _home(inst)
        lxd = self.fleet.lxd(server)

        async def apply():
            await lxd.update_config(inst["name"], changes)
            if home:    # the same schedule for the home (volumes have no .stopped)
                await lxd.update_volume_config(home["pool"], home["source"], {
                    k: v for k, v in changes.items() if k != "snapshots.schedule.stopped"})
        await self._step(actor, "snapshot.schedule", user, {
            "server": server, "schedule": schedule, "keep": keep if schedule else None},
            apply(), source=source)
        return self._schedule(server, schedule, keep if schedule else None)

    async def _existing_snapshot(self, user: str, server: str, snapshot: str
                                 ) -> tuple[dict, dict]:
        """The owned instance's record and its snapshot called ``snapshot``."""
        try:
            naming.check_snapshot_name(snapshot)
        except ValueError as e:
            raise PortalError(str(e)) from None
        inst = await self._owned_record(user, server)
        try:
            rows = await self.fleet.lxd(self.server(server)).snapshots(inst["name"])
        except LXDError as e:
            raise _refusal(e) from None
        for row in rows:
            if row["name"] == snapshot:
                return inst, row
        raise PortalError(f"there is no snapshot {snapshot} of your container on {server}", 404)

    async def restore(self, user: str, server: str, snapshot: str, *, actor: str,
                      source: str | None = None) -> dict:
        """Put the container back to ``snapshot``: the system, and the home
        where it has a volume of its own and a snapshot of the same moment.
        A running container is stopped around it and started again."""
        server = self.server(server)
        self._idle(user, server)
        inst, snap = await self._existing_snapshot(user, server, snapshot)
        name, home = inst["name"], _home(inst)
        lxd = self.fleet.lxd(server)
        home_snap = None
        if home:
            try:
                home_snap = _paired(snap, await lxd.snapshots(home["source"], pool=home["pool"]))
            except LXDError as e:
                raise _refusal(e) from None

        async def restore():
            if home_snap is None:
                await lxd.restore_snapshot(name, snapshot)
            else:
                # A volume cannot be restored while a running container uses it.
                running = await lxd.status(name) == "running"
                if running:
                    await lxd.stop(name, timeout=60)
                try:
                    await lxd.restore_snapshot(home["source"], home_snap, pool=home["pool"])
                    await lxd.restore_snapshot(name, snapshot)
                except BaseException:
                    # A failed restore must not leave the container down too.
                    if running:
                        with contextlib.suppress(LXDError):
                            await lxd.start(name)
                    raise
                if running:
                    await lxd.start(name)
            # The snapshot may predate a key or forward change: the store wins.
            await lifecycle.sync_user_container(lxd, self.store, user, server,
                                                prefix=self.settings.instance_prefix)
        await self._step(actor, "snapshot.restore", user,
                         {"server": server, "snapshot": snapshot, "home": home_snap},
                         restore(), source=source)
        return {"server": server, "name": snapshot, "restored": True,
                "home": "restored" if home is None or home_snap else "unchanged"}

    async def delete_snapshot(self, user: str, server: str, snapshot: str, *, actor: str,
                              source: str | None = None) -> dict:
        server = self.server(server)
        self._idle(user, server)
        inst, snap = await self._existing_snapshot(user, server, snapshot)
        name, home = inst["name"], _home(inst)
        lxd = self.fleet.lxd(server)

        async def delete():
            if home:
                paired = _paired(snap, await lxd.snapshots(home["source"], pool=home["pool"]))
                if paired:
                    await lxd.delete_snapshot(home["source"], paired, pool=home["pool"])
            await lxd.delete_snapshot(name, snapshot)
        await self._step(actor, "snapshot.delete", user, {"server": server, "snapshot": snapshot},
                         delete(), source=source)
        return {"server": server, "name": snapshot, "deleted": True}

    # ------------------------------------------------------------ rebuild

    async def rebuild(self, user: str, server: str, *, actor: str,
                      source: str | None = None) -> dict:
        """Start a rebuild (an operation, see keyportal.operations): a new
        system from the current template; the home, address, SSH port,
        forwards, keys and snapshot schedule stay (see
        lifecycle.rebuild_user_container).  The operation's result says
        where the container runs and which snapshots went."""
        server = self.server(server)
        self._idle(user, server)
        await self._owned(user, server)

        async def work(say: Progress) -> dict:
            done = await self._step(actor, "container.rebuild", user, {"server": server},
                                    lifecycle.rebuild_user_container(
                                        self.fleet.lxd(server), self.store, self.settings,
                                        user, server, actor=actor, progress=say),
                                    source=source)
            uc = done.container
            return {"server": server, "name": uc.name, "address": uc.address,
                    "ssh_command": uc.ssh_command, "home_moved": done.home_moved,
                    "snapshots_removed": done.snapshots_removed}
        return self._start(user, "rebuild", server, actor, work)

    # ------------------------------------------------------------ export

    async def export(self, user: str, server: str, *, actor: str,
                     source: str | None = None) -> dict:
        """Start an export (an operation): an LXD backup of the user's
        container (snapshots included) in the site's export folder,
        ``<export_dir>/<login>/<instance>-<UTC time>.tar.gz``, importable on
        any LXD server with ``lxc import FILE``; the home's volume beside it."""
        if not self.settings.export_dir:
            raise PortalError("exports are not set up on this site: ask an administrator "
                              "([portal] export_dir)", 409)
        server = self.server(server)
        self._idle(user, server)
        inst = await self._owned_record(user, server)
        name, home = inst["name"], _home(inst)
        folder = Path(self.settings.export_dir) / naming.posix_name(user)
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
        dest = folder / f"{name}-{stamp}.tar.gz"
        home_dest = folder / f"{home['source']}-{stamp}.tar.gz" if home else None
        lxd = self.fleet.lxd(server)

        async def export(say: Progress) -> tuple[int, int]:
            def step(what: str):
                # A new step every 64 MiB (a poller is answered at each step).
                return lambda n: say(f"the GPU server is packing {what}" if n == 0 else
                                     f"saving {what} ({(n >> 26) * 64} MiB so far)")
            await asyncio.to_thread(folder.mkdir, mode=0o700, parents=True, exist_ok=True)
            size = await lxd.export_backup(name, dest, progress=step("the system"))
            home_size = 0
            if home:
                home_size = await lxd.export_backup(home["source"], home_dest, pool=home["pool"],
                                                    progress=step("your home"))
            return size, home_size

        async def work(say: Progress) -> dict:
            detail = {"server": server, "file": str(dest),
                      **({"home_file": str(home_dest)} if home else {})}
            size, home_size = await self._step(actor, "container.export", user, detail,
                                               export(say), source=source)
            return {"server": server, "name": name, "file": str(dest), "bytes": size,
                    "home_file": str(home_dest) if home else None, "home_bytes": home_size}
        return self._start(user, "export", server, actor, work)

    # ------------------------------------------------------------ GPUs

    async def gpus(self, user: str, server: str) -> dict:
        """The server's NVIDIA GPUs (nvidia-smi's order) and which the user's
        container gets: every one (``choice`` "all") or those chosen."""
        server = self.server(server)
        inst = await self._owned_record(user, server)
        try:
            _, found = await self.fleet.lxd(server).gpus()
        except LXDError as e:
            raise _refusal(e) from None
        wanted = gpus_mod.chosen_from_config((inst.get("config") or {}).get(
            lifecycle.GPUS_KEY))
        chosen = set()
        for g in found:
            if (g.uuid and g.uuid in wanted) or str(g.index) in wanted:
                chosen.add(g.index)
        now = await self._gpus_now(server) if found else []
        return {"server": server, "choice": "all" if not wanted else sorted(chosen),
                "gpus": [{**g.json(), "yours": not wanted or g.index in chosen,
                          **_usage_of(g, now)} for g in found]}

    async def _gpus_now(self, server: str) -> list[dict]:
        """The server's GPUs now, from its node agent (monitor.usage); [] when
        it does not answer in 3 s (the card then shows no usage)."""
        try:
            usage = await asyncio.wait_for(self.usage(self.settings), 3)
        except Exception as e:  # noqa: BLE001 - the card goes on without it
            log.warning("the GPUs' usage from the node agents: %s", e)
            return []
        return (usage.get(server) or {}).get("gpus") or []

    async def set_gpus(self, user: str, server: str, wanted: Any, *, actor: str,
                       source: str | None = None) -> dict:
        """``wanted``: "all", or a list of UUIDs / nvidia-smi indexes
        (gpus.parse_choice)."""
        try:
            wanted = gpus_mod.parse_choice(wanted)
        except ValueError as e:
            raise PortalError(f"{e}; GET .../gpus lists them") from None
        server = self.server(server)
        self._idle(user, server)
        await self._owned(user, server)
        await self._step(actor, "container.gpus", user,
                         {"server": server, "gpus": wanted or "all"},
                         lifecycle.set_user_gpus(self.fleet.lxd(server), user, server, wanted,
                                                 prefix=self.settings.instance_prefix),
                         source=source)
        return await self.gpus(user, server)

    # ------------------------------------------------------------ forwards

    async def forwards(self, user: str, server: str) -> list[dict]:
        server = self.server(server)
        return [_forward_json(f) for f in
                await self._store(self.store.list_forwards, user=user, server=server)]

    async def add_forward(self, user: str, server: str, port: Any, *, actor: str,
                          source: str | None = None) -> dict:
        server = self.server(server)
        rec = await self._store(self.store.add_forward, user, server, port, actor=actor)
        results = await self.fleet.sync_port_maps(user, [server])
        await self.audit(actor, "forwards.push", user, {
            "server": server, "host_port": rec.host_port, "container_port": rec.container_port},
            source=source)
        return {"forward": _forward_json(rec), "servers": _results(results)}

    async def remove_forward(self, user: str, server: str, port: Any, *, actor: str,
                             source: str | None = None) -> dict:
        server = self.server(server)
        rec = await self._store(self.store.remove_forward, user, server, container_port=port,
                                actor=actor)
        results = await self.fleet.sync_port_maps(user, [server])
        await self.audit(actor, "forwards.push", user, {
            "server": server, "host_port": rec.host_port, "container_port": rec.container_port},
            source=source)
        return {"forward": _forward_json(rec), "servers": _results(results)}

    # ------------------------------------------------------------ admin

    async def admin_users(self) -> list[dict]:
        users = await self._store(self.store.list_users)
        out = []
        for u in users:
            keys = await self._store(self.store.list_keys, u.name)
            out.append({"name": u.name, "login": naming.posix_name(u.name),
                        "ssh_port": u.ssh_port, "keys": len(keys),
                        "suspended": u.suspended.isoformat() if u.suspended else None,
                        "created": u.created.isoformat(timespec="seconds")})
        return out

    async def admin_containers(self) -> list[dict]:
        """Every lxcgpu container on every GPU server (owner, state), and the
        servers that did not answer."""
        owner_key = f"{naming.KEY_PREFIX}owner"

        async def one(g) -> list[dict]:
            try:
                items = await self.fleet.lxd(g.name).list_instances(config_key=owner_key)
            except LXDError as e:
                return [{"server": g.name, "name": None, "owner": None,
                         "state": "unreachable", "detail": _refusal(e).args[0]}]
            return [{"server": g.name, "name": i["name"],
                     "owner": (i.get("config") or {}).get(owner_key),
                     "state": instance_status(i)} for i in items]
        rows = await asyncio.gather(*(one(g) for g in self.settings.servers))
        return [r for server_rows in rows for r in server_rows]

    async def admin_audit(self, *, user: str | None, search: str | None,
                          limit: int) -> list[dict]:
        if not 1 <= limit <= 5000:
            raise PortalError("limit: 1 to 5000 entries")
        records = await self._store(self.store.audit_log, user=user or None,
                                    limit=limit if not search else 5000)
        out = []
        for a in records:
            row = {"time": a.time.isoformat(timespec="seconds"), "actor": a.actor,
                   "action": a.action, "target": a.target, "ok": a.ok,
                   "detail": json.loads(a.detail) if a.detail else None}
            if search and search.lower() not in json.dumps(row).lower():
                continue
            out.append(row)
            if len(out) >= limit:
                break
        return out

    async def push_keys(self, user: str | None, *, actor: str,
                        source: str | None = None) -> dict:
        """Write the store's keys and port maps into the containers of
        ``user`` (every user if None) on every server."""
        names = [user] if user else [u.name for u in await self._store(self.store.list_users)]
        out = {}
        for name in names:
            await self._store(self.store.user, name)        # 404 for an unknown user
            out[name] = _results(await self.fleet.sync_user(name))
        await self.audit(actor, "admin.push-keys", user or "*",
                         {"users": len(names), "failed": sorted(
                             n for n, rs in out.items() if any(
                                 r["status"] in ("failed", "unreachable") for r in rs))},
                         source=source)
        return {"users": out}

    async def remove_user(self, user: str, *, delete_containers: bool, actor: str,
                          source: str | None = None) -> dict:
        """What is left of someone who left the lab: their hub servers
        stopped and tokens revoked, their keys and forwards gone (out of
        every container too), their containers stopped and kept, or deleted
        with their homes.  Each step is audited; their SSH port and id
        block stay reserved (a container kept still has files of theirs).
        Access itself is the directory's: remove them from the lab's groups."""
        if user == actor:
            raise PortalError("you cannot remove yourself", 409)
        await self.existing_user(user)
        done: dict[str, Any] = {"user": user}
        hub = self.hub_api()
        if hub is not None:
            async def end_hub() -> dict:
                model = await asyncio.to_thread(hub.user, user)
                stopped = await asyncio.to_thread(hub.stop_servers, model) if model else []
                revoked = await asyncio.to_thread(hub.revoke_tokens, user) if model else 0
                return {"servers_stopped": stopped, "tokens_revoked": revoked}
            done["hub"] = await self._step(actor, "user.remove.hub", user, {}, end_hub(),
                                           source=source)
            self.forget_tokens()
        keys = await self._store(self.store.list_keys, user)
        for k in keys:
            await self._store(self.store.remove_key, user, k.fingerprint, actor=actor)
        forwards = await self._store(self.store.list_forwards, user=user)
        for f in forwards:
            await self._store(self.store.remove_forward, user, f.server,
                              container_port=f.container_port, actor=actor)
        done["keys_removed"], done["forwards_removed"] = len(keys), len(forwards)

        async def one(g) -> dict:
            lxd = self.fleet.lxd(g.name)
            try:
                if delete_containers:
                    gone = await lifecycle.delete_user_container(
                        lxd, self.store, user, g.name, prefix=self.settings.instance_prefix,
                        actor=actor)
                    status = "deleted" if gone else "none"
                else:
                    try:    # keys and port maps out of it first
                        sync = await lifecycle.sync_user_container(
                            lxd, self.store, user, g.name, prefix=self.settings.instance_prefix)
                    except LXDNotFound:
                        status = "none"
                    else:
                        await lxd.stop(sync.name, timeout=60)
                        status = "stopped, kept"
                ok = True
                detail = ""
            except (LXDError, ContainerError) as e:
                status, ok, detail = "failed", False, _refusal(e).args[0]
                log.warning("removing %s on %s: %s", user, g.name, e)
            await self.audit(actor, "user.remove.container", user,
                             {"server": g.name, "status": status,
                              **({"error": detail} if detail else {})}, ok=ok, source=source)
            return {"server": g.name, "status": status, "detail": detail}
        done["containers"] = list(await asyncio.gather(*(one(g)
                                                         for g in self.settings.servers)))
        await self.audit(actor, "user.remove", user, {
            "delete_containers": delete_containers, "keys": len(keys),
            "forwards": len(forwards)}, ok=all(c["status"] != "failed"
                                               for c in done["containers"]), source=source)
        return done

    def hub_api(self):
        """The hub's API with this service's token (None outside the hub)."""
        url, token = os.environ.get("JUPYTERHUB_API_URL"), os.environ.get("JUPYTERHUB_API_TOKEN")
        if not (url and token):
            return None
        from hub_config.labsync import Hub
        return Hub(url, token)

    # ------------------------------------------------------------ ssh config

    async def ssh_config(self, user: str, identity: str | None = None) -> str:
        rec = await self._store(self.store.ensure_user, user, actor="keyportal")
        login = naming.posix_name(user)
        out = [f"# lxcgpu: {user}'s containers, one Host per GPU server "
               f"(the same port {rec.ssh_port} on each)", ""]
        for g in self.settings.servers:
            out += [f"Host {g.name}", f"    HostName {g.ssh_host}", f"    Port {rec.ssh_port}",
                    f"    User {login}"]
            if identity:
                out.append(f"    IdentityFile {identity}")
            out.append("")
        return "\n".join(out)


def _sentence(e: BaseException) -> tuple[str, int] | None:
    """An operation's failure as the user's sentence and its status (None
    for a bug: the operation logs it)."""
    if isinstance(e, PortalError):
        return str(e), e.status
    if isinstance(e, (LXDError, ContainerError, StoreError, ValueError)):
        r = _refusal(e)
        return str(r), r.status
    return None


def _busy(op: Operation) -> PortalError:
    since = dt.datetime.fromtimestamp(op.created, dt.timezone.utc).strftime("%H:%M:%S UTC")
    return PortalError(f"your container on {op.server} is busy: a {op.kind} started at {since} "
                       f"is running ({op.step}); try again when it has finished", 409)


def _home(inst: dict) -> dict | None:
    """The home volume's disk device of an instance record, if it has one."""
    dev = (inst.get("devices") or {}).get(HOME_DEVICE)
    return dev if dev and dev.get("pool") and dev.get("source") else None


def _paired(snap: dict, home_snaps: list[dict]) -> str | None:
    """The home volume's snapshot that goes with the system's ``snap``: the
    one of the same name; for a scheduled one (LXD takes the system's and
    the home's in separate passes), the scheduled one nearest in time, if
    within two minutes."""
    names = {h["name"] for h in home_snaps}
    if snap["name"] in names:
        return snap["name"]
    if not snap["name"].startswith(AUTO_PREFIX) or not snap.get("created_at"):
        return None
    t = parse_time(snap["created_at"])
    near = [(abs((parse_time(h["created_at"]) - t).total_seconds()), h["name"]) for h in home_snaps
            if h["name"].startswith(AUTO_PREFIX) and h.get("created_at")]
    best = min(near, default=None)
    return best[1] if best and best[0] <= 120 else None


def _key_json(k) -> dict:
    return {"fingerprint": k.fingerprint, "type": k.key.split()[0], "comment": k.comment or None,
            "added": k.created.isoformat(timespec="seconds")}


def _forward_json(f) -> dict:
    return {"server": f.server, "host_port": f.host_port, "container_port": f.container_port,
            "proto": f.proto}


def _results(results: list[ServerResult]) -> list[dict]:
    return [{"server": r.server, "status": r.status, "detail": r.detail} for r in results]
