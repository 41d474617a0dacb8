"""lxcgpu-node: the agent on each GPU server.

It keeps the server's DNAT chain equal to what LXD's instance config asks for
(``user.lxcgpu.ssh-port``, ``user.lxcgpu.forward.*``, and
``user.lxcgpu.jupyter.*`` for connections from the hub's address only; see
:mod:`lxcspawner.portmap`): one rule per wanted port of every running
container, to the address lxcgpu pinned on the container's NIC (never one the
container reports; see :mod:`lxcspawner.network`).  It needs nothing but the
local LXD, so a rebooted server gets its rules back from LXD alone.

- At start it sets up our chains, the host guard (containers reach only
  DHCP, DNS and the hub API on the host) and loopback access, and rebuilds
  the rules from LXD (a full reconcile).
- It follows LXD's lifecycle events: a started container is mapped at once,
  a stopped or deleted one is unmapped, a config change is applied.
- Every ``--interval`` seconds, and whenever the event stream reconnects
  (events may have been missed), it reconciles everything again.

Stopping the agent leaves the rules in place: SSH keeps working while it
restarts.  ``--remove-rules`` takes them out.

It also samples the server's load (:mod:`monitor.collector`: GPUs through
NVML, who uses each, the host, each container) about once a second and
serves it to the dashboard (:mod:`monitor.loadapi`) at this server's agent
address from the site settings, with the site's monitor token.  Without the
token file it keeps the ports and says why it serves no load.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import re
import secrets
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence
from urllib.parse import urlsplit

from lxcspawner.dnat import DNATTable, SyncResult, XtablesUnavailable
from lxcspawner.lxd import LXD, LXDError, instance_status
from lxcspawner.network import HUB_API_PORT, HUB_API_PORT_ENV, Bridge, NetworkError, hub_api_port
from lxcspawner.portmap import (
    FORWARD_PORTS, JUPYTER_PORTS, SSH_PORTS, PortMap, maps_for, parse_port_range, wanted_ports,
)
from lxcspawner.settings import Settings, SettingsError

from . import loadapi
from .collector import Collector, prometheus

log = logging.getLogger("lxcgpu.node")

DEFAULT_INTERVAL = 60.0
_PREFIX = re.compile(r"^[A-Z][A-Z0-9_]{0,15}$")
DEFAULT_PORTS = (SSH_PORTS, FORWARD_PORTS, JUPYTER_PORTS)


def parse_port_ranges(text: str) -> tuple[tuple[int, int], ...]:
    """``"22000-29999,11000-11999"`` -> ((22000, 29999), (11000, 11999))."""
    return tuple(parse_port_range(part) for part in text.split(","))


# LXD's instance events that never change what a container asks to have
# mapped, nor whether it runs: a spawn's execs and file reads raise a score of
# them, and each one read again would cost LXD a request per event.
_NO_MAP_CHANGE = ("instance-exec", "instance-file-", "instance-log-", "instance-console",
                  "instance-snapshot-", "instance-backup-", "instance-metadata-")


def changes_maps(action: str) -> bool:
    """Whether an LXD lifecycle event may change a container's port maps
    (it started, stopped, changed its config, was made, renamed or
    removed; anything unknown counts)."""
    return action.startswith("instance-") and not action.startswith(_NO_MAP_CHANGE)


class NodeAgent:
    """Reconciles one server's DNAT chain with its LXD (see the module docstring)."""

    def __init__(self, lxd: LXD, table: DNATTable, *, interval: float = DEFAULT_INTERVAL,
                 allowed: Sequence[tuple[int, int]] = DEFAULT_PORTS,
                 hub_api_ports: Sequence[int] = (HUB_API_PORT,), isolate: bool = True,
                 hub_address: str | None = None):
        self.lxd = lxd
        self.hub_address = hub_address  # the only source that reaches Jupyter ports
        self.allowed = tuple(allowed)
        self.table = table
        self.interval = interval
        self.hub_api_ports = tuple(hub_api_ports)
        self.isolate = isolate
        self.bridges: dict[str, Bridge] = {}
        self.maps: dict[str, list[PortMap]] = {}
        self.ready = asyncio.Event()
        self.last_sync: SyncResult | None = None
        self._resync = asyncio.Event()
        self._refreshing: dict[str, asyncio.Task] = {}
        self._apply_lock = asyncio.Lock()
        # python-iptables is blocking and not thread-safe: one thread of its own.
        self._iptables = ThreadPoolExecutor(max_workers=1, thread_name_prefix="iptables")
        self._loop: asyncio.AbstractEventLoop | None = None

    async def _in_iptables_thread(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._iptables, fn, *args)

    # ------------------------------------------------------------ reconcile

    async def reconcile(self, reason: str) -> SyncResult:
        """Everything again, from LXD: chains and jumps, then every map."""
        t0 = time.perf_counter()
        bridges: dict[str, Bridge] = {}
        for record in await self.lxd.bridges():
            try:
                bridges[record["name"]] = Bridge.from_lxd(record)
            except NetworkError as e:
                log.warning("%s; no container there is mapped", e)
        self.bridges = bridges
        await self._in_iptables_thread(
            functools.partial(self.table.setup, list(bridges.values()),
                              hub_api_ports=self.hub_api_ports, isolate=self.isolate))
        instances = await self.lxd.list_instances()
        maps: dict[str, list[PortMap]] = {}
        for m in maps_for(instances, self.bridges, self.allowed, self.hub_address):
            maps.setdefault(m.instance, []).append(m)
        self.maps = maps
        result = await self._apply()
        log.info("reconciled (%s): %d containers, %d rules, +%d -%d in %.0f ms", reason,
                 len(maps), sum(map(len, maps.values())), result.added, result.removed,
                 (time.perf_counter() - t0) * 1000)
        return result

    def _wants_ports(self, inst: dict | None) -> bool:
        """Whether the instance asks for any host port this agent may map."""
        return any(lo <= p <= hi for p in wanted_ports((inst or {}).get("config") or {})
                   for lo, hi in self.allowed)

    async def _apply(self) -> SyncResult:
        async with self._apply_lock:
            wanted = [m for ms in self.maps.values() for m in ms]
            result = await self._in_iptables_thread(self.table.sync, wanted)
            self.last_sync = result
            return result

    async def refresh(self, name: str, why: str) -> None:
        """One container again: map it while it runs, unmap it otherwise.
        Its address is the one pinned on its NIC, known before it boots."""
        inst = await self.lxd.instance(name)
        maps = maps_for([inst], self.bridges, self.allowed, self.hub_address) if inst else []
        if not maps and self._wants_ports(inst) and inst and \
                instance_status(inst) == "running":
            # On a bridge this agent has not seen yet (made since the last
            # reconcile)?  Reconcile everything again.
            self._resync.set()
        if maps:
            if self.maps.get(name) == maps:
                return
            self.maps[name] = maps
        elif self.maps.pop(name, None) is None:
            return
        result = await self._apply()
        if result.changed:
            log.info("%s (%s): %s; +%d -%d rules", name, why,
                     ", ".join(f"{m.host_port}->{m.address}:{m.port}" for m in maps) or "unmapped",
                     result.added, result.removed)

    def _schedule_refresh(self, name: str, why: str) -> None:
        # A newer event for the same container supersedes an older one.
        old = self._refreshing.pop(name, None)
        if old is not None:
            old.cancel()
        task = asyncio.ensure_future(self._guarded(name, why))
        self._refreshing[name] = task
        task.add_done_callback(lambda t: self._refreshing.get(name) is t
                               and self._refreshing.pop(name, None))

    async def _guarded(self, name: str, why: str) -> None:
        try:
            await self.refresh(name, why)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - the periodic reconcile repairs it
            log.warning("updating %s failed: %s; the next reconcile retries", name, e)
            self._resync.set()

    # ------------------------------------------------------------ events

    def _on_event(self, event: dict) -> None:
        """From the event thread: hand the event to the loop."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._handle_event, event)

    def _handle_event(self, event: dict) -> None:
        md = event.get("metadata") or {}
        action = str(md.get("action", ""))
        if not changes_maps(action):
            return
        source = str(md.get("source", "")).split("?", 1)[0].split("/")
        if len(source) < 4 or source[1:3] != ["1.0", "instances"] or not source[3]:
            return
        self._schedule_refresh(source[3], action)
        old = (md.get("context") or {}).get("old_name")
        if old:
            self._schedule_refresh(str(old), action)

    # ------------------------------------------------------------ run

    async def run(self) -> None:
        """Until cancelled: follow events, reconcile at start and periodically."""
        self._loop = asyncio.get_running_loop()
        stream = self.lxd.follow_events(
            self._on_event, on_connect=lambda: self._loop.call_soon_threadsafe(self._resync.set))
        delay = 1.0
        reason = "start"
        try:
            while True:
                try:
                    await self.reconcile(reason)
                    self.ready.set()
                    delay = 1.0
                except LXDError as e:
                    log.warning("cannot reconcile: %s; retrying in %.0f s", e, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 30.0)
                    continue
                try:
                    await asyncio.wait_for(self._resync.wait(), self.interval)
                    reason = "events reconnected, or an update failed"
                except asyncio.TimeoutError:
                    reason = "periodic"
                self._resync.clear()
        finally:
            stream.close()
            for task in list(self._refreshing.values()):
                task.cancel()
            self._iptables.shutdown(wait=True)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lxcgpu-node",
        description="Keep this GPU server's DNAT rules (SSH ports, port forwards) equal to "
                    "what its LXD containers ask for.")
    p.add_argument("--lxd", metavar="ENDPOINT", default=os.environ.get("LXCGPU_LXD"),
                   help="LXD unix socket or https:// URL (default: the local socket)")
    p.add_argument("--project", metavar="NAME", default=os.environ.get("LXCGPU_LXD_PROJECT"),
                   help="the LXD project whose containers to map (default: LXD's default project)")
    p.add_argument("--ports", metavar="RANGES", default=os.environ.get("LXCGPU_NODE_PORTS"),
                   help="host ports it may map (default: the SSH, forward and Jupyter ranges "
                        "of the site settings, $LXCGPU_CONFIG or /etc/lxcgpu/lxcgpu.toml; env "
                        "LXCGPU_NODE_PORTS)")
    p.add_argument("--hub-api-port", metavar="PORTS", default=None,
                   help="the hub API's port on each bridge's address (a comma-separated list "
                        "where several hubs serve one server): the one host service containers "
                        "may reach besides DHCP and DNS (default $LXCGPU_HUB_API_PORT, "
                        f"else {HUB_API_PORT})")
    p.add_argument("--interval", type=float, default=DEFAULT_INTERVAL, metavar="SECONDS",
                   help="full reconcile period (default %(default)s)")
    p.add_argument("--chain-prefix", default="LXCGPU", metavar="NAME",
                   help="our chains are NAME-DNAT, NAME-POSTROUTING (nat), NAME-INPUT and "
                        "NAME-FORWARD (filter, IPv4 and IPv6) (default %(default)s)")
    p.add_argument("--server", metavar="NAME", default=os.environ.get("LXCGPU_SERVER"),
                   help="which GPU server of the site this is (its name in the site file; "
                        "default $LXCGPU_SERVER, else the site's default server)")
    p.add_argument("--listen", metavar="HOST:PORT", default=None,
                   help="where to serve the load API (default: this server's agent address "
                        "in the site file, [servers.NAME] agent or [monitor] agent_port)")
    p.add_argument("--make-token", action="store_true",
                   help="write a new monitor token to the site's [monitor] token_file if "
                        "there is none (0600), and exit; copy that file to every GPU server")
    p.add_argument("--once", action="store_true", help="reconcile once and exit")
    p.add_argument("--remove-rules", action="store_true",
                   help="remove our chains and jumps, and exit")
    p.add_argument("--pidfile", metavar="FILE", help="write the process id here")
    p.add_argument("--log-level", default="INFO",
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def _make_token() -> int:
    """``--make-token``: the site's monitor token file, made once."""
    try:
        path = Path(Settings.load().monitor_token_file)
    except (SettingsError, ValueError) as e:
        print(f"lxcgpu-node: {e}", file=sys.stderr)
        return 2
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        print(f"{path} exists; kept")
        return 0
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(32) + "\n")
    print(f"{path}: a new monitor token (copy it, 0600, to every GPU server of the site)")
    return 0


def _listen_address(url: str) -> tuple[str, int]:
    """``http://HOST:PORT`` or ``HOST:PORT`` -> (host, port)."""
    parts = urlsplit(url if "//" in url else f"//{url}")
    try:
        port = parts.port
    except ValueError:
        port = None
    if not parts.hostname or not port:
        raise ValueError(f"--listen {url!r}: HOST:PORT")
    return parts.hostname, port


def _start_load_api(settings: Settings, server: str, lxd: LXD, host: str,
                    port: int) -> asyncio.Task | None:
    """The collector's loop and the load API, or None (and the reason in
    the log) where the monitor token is missing: the ports are kept anyway."""
    try:
        token = settings.monitor_token()
    except SettingsError as e:
        log.error("no load API: %s", e)
        return None
    collector = Collector(server, lxd, disks=settings.monitor_disks,
                          idle_utilization=settings.idle_utilization,
                          idle_after=settings.idle_minutes * 60)
    try:
        loadapi.serve(loadapi.make_app(server, token, lambda: collector.latest, prometheus),
                      host, port)
    except OSError as e:
        log.error("no load API: cannot listen on %s:%d: %s", host, port, e.strerror or e)
        return None
    return asyncio.ensure_future(collector.run(interval=1.0))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.make_token:
        return _make_token()
    if not _PREFIX.match(args.chain_prefix):
        print(f"lxcgpu-node: --chain-prefix must be 1-16 capitals, digits or _: "
              f"{args.chain_prefix!r}", file=sys.stderr)
        return 2
    if args.interval <= 0:
        print("lxcgpu-node: --interval must be positive", file=sys.stderr)
        return 2
    try:
        allowed = parse_port_ranges(args.ports) if args.ports else None
    except ValueError as e:
        print(f"lxcgpu-node: --ports: {e}", file=sys.stderr)
        return 2
    try:
        api_ports = ((hub_api_port(),) if args.hub_api_port is None else
                     tuple(hub_api_port({HUB_API_PORT_ENV: p.strip()})
                           for p in args.hub_api_port.split(",")))
    except ValueError as e:
        print(f"lxcgpu-node: --hub-api-port: {e}", file=sys.stderr)
        return 2
    try:
        table = DNATTable(chain=f"{args.chain_prefix}-DNAT",
                          post_chain=f"{args.chain_prefix}-POSTROUTING",
                          input_chain=f"{args.chain_prefix}-INPUT",
                          forward_chain=f"{args.chain_prefix}-FORWARD")
    except XtablesUnavailable as e:
        print(f"lxcgpu-node: {e}", file=sys.stderr)
        return 3
    if args.remove_rules:
        table.teardown()
        print(f"removed {table.chain}, {table.post_chain}, {table.input_chain}, "
              f"{table.forward_chain} and their jumps (route_localnet is off again)")
        return 0
    try:
        settings = Settings.load()
    except (SettingsError, ValueError) as e:
        print(f"lxcgpu-node: {e}", file=sys.stderr)
        return 2
    allowed = allowed or (settings.ssh_ports, settings.forward_ports, settings.jupyter_ports)
    if args.pidfile:
        Path(args.pidfile).parent.mkdir(parents=True, exist_ok=True)
        Path(args.pidfile).write_text(f"{os.getpid()}\n")
    try:
        server = settings.gpu_server(args.server).name
        host, port = _listen_address(args.listen or settings.agent_url(server))
    except (SettingsError, ValueError) as e:
        print(f"lxcgpu-node: {e}", file=sys.stderr)
        return 2
    lxd = LXD(args.lxd, project=args.project)
    agent = NodeAgent(lxd, table, interval=args.interval, allowed=allowed,
                      hub_api_ports=api_ports, isolate=settings.port_isolation,
                      hub_address=settings.hub_address)

    async def run() -> int:
        if args.once:
            await agent.reconcile("once")
            return 0
        load = _start_load_api(settings, server, lxd, host, port)
        task = asyncio.ensure_future(agent.run())
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        try:
            await task
        except asyncio.CancelledError:
            log.info("stopping; the rules stay in place")
        finally:
            if load is not None:
                load.cancel()
        return 0

    try:
        return asyncio.run(run())
    except LXDError as e:
        print(f"lxcgpu-node: {e}", file=sys.stderr)
        return 1
    finally:
        lxd.close()
        if args.pidfile:
            try:
                if Path(args.pidfile).read_text().strip() == str(os.getpid()):
                    Path(args.pidfile).unlink()
            except OSError:
                pass


if __name__ == "__main__":
    sys.exit(main())
