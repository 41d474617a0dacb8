"""The application layer: one user's change applied on every GPU server.

A change a researcher or an admin makes (a key added or removed, a forward,
a new SSH port, leaving the lab) is first recorded in the store, which is
the truth.  :class:`Fleet` then brings the user's container on each of the
site's GPU servers (``[servers.<name>]`` in the site file) up to date, all
servers at once, and says per server what happened (:class:`ServerResult`):

- ``done``: the container has it now (or, stopped, gets it at its next
  start: keys and port maps are written at every start);
- ``none``: the user has no container there, nothing to do;
- ``failed``: that server's LXD refused; the reason is a sentence;
- ``unreachable``: that server's LXD did not answer.

A server that is down never blocks the others, and it catches up by itself:
every start of a container writes the store's keys and port maps into it,
and ``lxcgpu-admin container sync USER`` (or the next change) pushes them to
the running ones.  The container operations themselves (create, start,
stop, delete) go through :meth:`Fleet.on` for one server.

``lxcgpu-admin``, the lab sync service and the key portal use this module;
it talks to LXD only through :mod:`lxcspawner.lifecycle`.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Awaitable, Callable, Sequence, TypeVar

from . import lifecycle, naming
from .lxd import LXD, LXDError, LXDNotFound, LXDUnavailable, is_outage
from .settings import GPUServer, Settings
from .store import Store

log = logging.getLogger(__name__)

T = TypeVar("T")

DONE, NONE, FAILED, UNREACHABLE = "done", "none", "failed", "unreachable"


@dataclass(frozen=True)
class ServerResult:
    """What one change did on one GPU server."""

    server: str
    status: str          # done | none | failed | unreachable
    detail: str          # a sentence for the person who made the change

    @property
    def ok(self) -> bool:
        return self.status in (DONE, NONE)


def summary(results: Sequence[ServerResult]) -> str:
    """One line per server: ``gpu17: done: keys updated in alice--gpu17``."""
    return "\n".join(f"{r.server}: {r.status}: {r.detail}" for r in results)


class Fleet:
    """The site's GPU servers, each with one LXD client, opened when first used.

    :param lxd_timeout: seconds per LXD call; a server that does not answer
        within it is reported unreachable (its LXD client does not retry).
    """

    def __init__(self, settings: Settings, store: Store, *, lxd_timeout: float = 30,
                 actor: str = "system"):
        self.settings = settings
        self.store = store
        self.actor = actor
        self.lxd_timeout = lxd_timeout
        self._lxd: dict[str, LXD] = {}

    @property
    def servers(self) -> tuple[GPUServer, ...]:
        return self.settings.servers

    def lxd(self, server: str) -> LXD:
        """The LXD client of ``server`` (a site server; SettingsError if not)."""
        if server not in self._lxd:
            self._lxd[server] = self.settings.gpu_server(server).open_lxd(
                retries=0, timeout=self.lxd_timeout)
        return self._lxd[server]

    def close(self) -> None:
        for lxd in self._lxd.values():
            lxd.close()
        self._lxd.clear()

    # ------------------------------------------------------------ one server

    async def on(self, server: str, fn: Callable[[LXD], Awaitable[T]]) -> T:
        """Run ``fn`` with ``server``'s LXD client; LXD's errors propagate
        (an unreachable server is :class:`~lxcspawner.lxd.LXDUnavailable`)."""
        return await fn(self.lxd(server))

    # ------------------------------------------------------------ every server

    async def each(self, what: str, fn: Callable[[str, LXD], Awaitable[ServerResult]],
                   servers: Sequence[str] | None = None) -> list[ServerResult]:
        """Run ``fn(server, lxd)`` on every server (or ``servers``) at once;
        one result per server, in the site's order, whatever the others did."""
        names = list(servers) if servers is not None else list(self.settings.server_names)

        async def one(server: str) -> ServerResult:
            try:
                return await fn(server, self.lxd(server))
            except LXDUnavailable as e:
                log.warning("%s on %s: LXD unreachable: %s", what, server, e)
                return ServerResult(server, UNREACHABLE,
                                    f"the GPU server's LXD did not answer ({e})")
            except LXDError as e:
                if is_outage(e):
                    log.warning("%s on %s: LXD failing: %s", what, server, e)
                    return ServerResult(server, UNREACHABLE,
                                        f"the GPU server's LXD is not working ({e})")
                log.warning("%s on %s failed: %s", what, server, e)
                return ServerResult(server, FAILED, str(e))
        return list(await asyncio.gather(*(one(s) for s in names)))

    async def sync_user(self, user: str, servers: Sequence[str] | None = None
                        ) -> list[ServerResult]:
        """Push the store's view of ``user`` (SSH keys, port maps; none while
        suspended) into their container on every server."""
        prefix = self.settings.instance_prefix

        async def sync(server: str, lxd: LXD) -> ServerResult:
            try:
                res = await lifecycle.sync_user_container(lxd, self.store, user, server,
                                                          prefix=prefix)
            except LXDNotFound:
                return ServerResult(server, NONE, f"{user} has no container on {server}")
            if res.provisioned:
                return ServerResult(server, DONE, f"keys and port maps updated in {res.name}")
            return ServerResult(server, DONE, f"{res.name} is stopped: port maps updated; "
                                              "it gets the keys when it starts")
        return await self.each(f"sync {user}", sync, servers)

    async def sync_port_maps(self, user: str, servers: Sequence[str] | None = None
                             ) -> list[ServerResult]:
        """Write ``user``'s SSH port and forwards into their containers."""
        prefix = self.settings.instance_prefix

        async def sync(server: str, lxd: LXD) -> ServerResult:
            changed = await lifecycle.sync_port_maps(lxd, self.store, user, server,
                                                     prefix=prefix)
            if changed is None:
                return ServerResult(server, NONE, f"{user} has no container on {server}")
            name = naming.instance_name(user, server, prefix)
            return ServerResult(server, DONE, f"port maps {'updated' if changed else 'unchanged'}"
                                              f" in {name}")
        return await self.each(f"port maps of {user}", sync, servers)
