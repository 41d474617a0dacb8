"""LXCSpawner: a JupyterHub spawner that serves Jupyter from the user's own
LXD container on a GPU server.

Settings and lifecycle only; the work lives in the core modules:
:mod:`lxcspawner.lifecycle` (the container, its port maps, the user and keys
inside), :mod:`lxcspawner.jupyter` (the Jupyter unit inside), and
:mod:`lxcspawner.lxd` (LXD, off the event loop).

- One JupyterHub named server per GPU server (``/user/alice/gpu17``); the
  default server runs on the server picked in the options form, by default
  the first of the site file's ``[servers]`` (:mod:`lxcspawner.settings`).
- ``stop()`` stops Jupyter only: the container keeps running, and so do the
  user's SSH jobs in it (unless :attr:`LXCSpawner.stop_container_on_stop`).
- The state saved in JupyterHub's database names the instance, the GPU server
  and the address used, so a restarted hub re-adopts running servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import Any

from jupyterhub.spawner import Spawner
from tornado import web
from traitlets import Any as AnyTrait
from traitlets import Bool, Dict, Integer, List, TraitError, Unicode, default, validate

from . import gpus, jupyter, naming
from .lifecycle import ensure_user_container, find, runs_already, set_user_gpus
from .container import ContainerError
from .lxd import LXD, LXDError, is_outage
from .portmap import jupyter_host_port
from .provision import ProvisionError
from .settings import Settings, SettingsError
from .store import Store

# Progress (percent) the spawn page shows for each step.
_STEPS = {
    "allocating SSH port and ids": 5,
    "creating container": 15,
    "using a prepared container": 15,
    "no prepared container was free": 10,
    "restarting container to pin its address": 30,
    "starting container": 35,
    "preparing user": 55,
    "starting Jupyter": 70,
    "waiting for network": 80,
    "waiting for Jupyter": 92,
}


class GPUServerDown(web.HTTPError):
    """A spawn failed because the GPU server's LXD stopped answering: 503,
    and a sentence for the spawn page (JupyterHub shows ``str()`` there)."""

    def __init__(self, server: str):
        self.sentence = (f"The GPU server {server} stopped answering while your server was "
                         "starting (its LXD service is not responding). Nothing is lost: "
                         "please try again in a minute, and tell your administrator if it "
                         "keeps happening.")
        super().__init__(503, self.sentence)

    def __str__(self) -> str:
        return self.sentence


class SpawnFailed(web.HTTPError):
    """A spawn failed on an LXD error that is not an outage: 500, with a
    sentence for the spawn page instead of LXD's text (which the log has)."""

    def __init__(self, server: str):
        self.sentence = (f"Your server could not be started on the GPU server {server}: its "
                         "LXD reported an error (the hub's log has the details). Please try "
                         "again; if it fails again, tell your administrator.")
        super().__init__(500, self.sentence)

    def __str__(self) -> str:
        return self.sentence


_UNSET = object()


class _Shared:
    """What all spawners of one hub share: settings, the store, one LXD
    client and one concurrency limit per GPU server."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._store: Store | None = None
        self._store_lock = asyncio.Lock()
        self.lxd: dict[str, LXD] = {}
        self.limits: dict[str, asyncio.Semaphore] = {}
        self.queued: dict[str, int] = {}   # spawns waiting for their turn, per server

    async def store(self) -> Store:
        """The store, opened (and migrated) once, off the event loop."""
        async with self._store_lock:
            if self._store is None:
                self._store = await asyncio.to_thread(self.settings.open_store)
        return self._store


class LXCSpawner(Spawner):
    """Jupyter in the user's own LXD container on a GPU server."""

    _shared: dict[str, _Shared] = {}
    # The spawn in progress (set by start(); these defaults mean "none").
    _events: list[dict] = []
    _spawn_done = True
    _start_task: asyncio.Future | None = None
    # The configured hub_connect_url, for spawns on local GPU servers (one on
    # a remote server sets its own).
    _hub_connect_default: Any = _UNSET

    servers = AnyTrait(
        config=True,
        help="Not a setting any more: the GPU servers are the site file's "
             "[servers.<name>] tables (docs/admin.md section 6).",
    )

    @validate("servers")
    def _moved_servers(self, proposal):
        raise TraitError("LXCSpawner.servers moved to the site file: list the GPU servers as "
                         "[servers.<name>] tables in /etc/lxcgpu/lxcgpu.toml (docs/admin.md "
                         "section 6), and remove c.LXCSpawner.servers")

    default_server = AnyTrait(
        config=True,
        help="Not a setting any more: the first of the site file's [servers] is the default.",
    )

    @validate("default_server")
    def _moved_default(self, proposal):
        raise TraitError("LXCSpawner.default_server moved to the site file: the first "
                         "[servers.<name>] table is the default GPU server")

    lxcgpu_config = Unicode(
        config=True,
        help="The site settings file (store, port ranges, image, limits, mounts); "
             "default: $LXCGPU_CONFIG, else /etc/lxcgpu/lxcgpu.toml.",
    )

    @default("lxcgpu_config")
    def _default_lxcgpu_config(self):
        return os.environ.get("LXCGPU_CONFIG", "")

    extra_container_config = Dict(
        config=True,
        help="Extra LXD config keys for new containers, e.g. "
             "{'security.nesting': 'true'} for Docker inside.",
    )

    stop_container_on_stop = Bool(
        False, config=True,
        help="Also stop the container when the Jupyter server stops. Off by default: "
             "training jobs started over SSH keep running after Jupyter is stopped "
             "(by the user, the admin or the idle culler).",
    )

    hub_ca_file = Unicode(
        "", config=True,
        help="The CA of the hub's HTTPS certificate, put into the trust store of "
             "containers on GPU servers the hub reaches over the network (their Jupyter "
             "calls the hub API at the site file's [hub] url). The shipped hub config sets "
             "it to the generated CA; a site whose certificate comes from a CA the "
             "template image already trusts leaves it empty.",
    )

    singleuser_command = List(
        Unicode(), ["/opt/jupyter/bin/jupyterhub-singleuser"], config=True,
        help="jupyterhub-singleuser inside the container (the template image's).",
    )

    lxd_concurrency = Integer(
        4, config=True,
        help="At most this many container operations at once per GPU server "
             "(JupyterHub.concurrent_spawn_limit caps the hub as a whole).",
    )

    server_notes = AnyTrait(
        None, allow_none=True, config=True,
        help="An async callable, settings -> {GPU server name: a short note, or a dict with "
             "the note (\"note\") and the server's GPUs (\"gpus\": rows with index, name, "
             "memory and text, such as \"in use by alice\")}, which the spawn form shows "
             "beside each server (the shipped config sets the monitor's "
             "monitor.usage.GPUUsage); notes that fail or take over 3 s are left out.",
    )

    @default("start_timeout")
    def _default_start_timeout(self):
        # A first start creates the container and shifts its id map, and a
        # burst of spawns queues behind lxd_concurrency: JupyterHub's 60 s is
        # too short. Every step has its own bound (address_timeout,
        # http_timeout with a liveness check), so this only ends a long wait.
        return 900

    @default("http_timeout")
    def _default_http_timeout(self):
        # Jupyter's first start in a new container on a loaded server (a
        # burst of starts on two cores) takes over JupyterHub's 30 s; a
        # Jupyter that dies is reported at once (wait_listening checks it).
        return 180

    address_timeout = Integer(
        120, config=True,
        help="Seconds to wait for a started container's address (a burst of first "
             "starts on a busy server can take a minute).")

    # ------------------------------------------------------------ shared parts

    @property
    def _settings(self) -> Settings:
        return self._shared_parts().settings

    def _shared_parts(self) -> _Shared:
        key = self.lxcgpu_config
        if key not in self._shared:
            # lxcspawner's own modules (lifecycle, pool, ...) log into the hub's log.
            package = logging.getLogger("lxcspawner")
            if not package.handlers and self.log.handlers:
                for handler in self.log.handlers:
                    package.addHandler(handler)
                package.setLevel(self.log.getEffectiveLevel())
                package.propagate = False
            self._shared[key] = _Shared(Settings.load(key or None))
        return self._shared[key]

    def _lxd(self, server: str) -> LXD:
        shared = self._shared_parts()
        if server not in shared.lxd:
            shared.lxd[server] = shared.settings.gpu_server(server).open_lxd()
            shared.limits[server] = asyncio.Semaphore(self.lxd_concurrency)
        return shared.lxd[server]

    # ------------------------------------------------------------ choice of server

    @default("options_form")
    def _default_options_form(self):
        return self._options_form

    async def _options_form(self, spawner) -> str:
        names = self._settings.server_names
        if self.name or len(names) == 1:
            return ""
        notes = await self._server_notes()
        esc = web.escape.xhtml_escape

        def note(n: str) -> str:
            said = notes.get(n)
            text = said.get("note") if isinstance(said, dict) else said
            return f" ({esc(str(text))})" if text else ""

        options = "\n".join(
            f'<option value="{esc(n)}"{" selected" if n == self._settings.server else ""}>'
            f"{esc(n)}{note(n)}</option>" for n in names)
        rows = []
        for n in names:
            said = notes.get(n)
            for g in (said.get("gpus") or []) if isinstance(said, dict) else []:
                if not isinstance(g, dict):
                    continue
                rows.append(f"<tr><td>{esc(n)}</td><td>{esc(str(g.get('index', '')))}</td>"
                            f"<td>{esc(str(g.get('name') or ''))}</td>"
                            f"<td>{esc(str(g.get('memory') or ''))}</td>"
                            f"<td>{esc(str(g.get('text') or ''))}</td></tr>")
        table = ('<table class="table table-sm small mt-2 lxcgpu-gpus">\n<thead><tr><th>Server'
                 "</th><th>GPU</th><th>Model</th><th>Memory</th><th>Now</th></tr></thead>\n"
                 f"<tbody>\n{chr(10).join(rows)}\n</tbody></table>\n") if rows else ""
        return (f'<label for="gpu_server">GPU server</label>\n'
                f'<select class="form-control" name="gpu_server" id="gpu_server">\n'
                f"{options}\n</select>\n{table}"
                '<label for="gpus" class="mt-2">GPUs</label>\n'
                '<input class="form-control" name="gpus" id="gpus" value="" '
                'placeholder="as before (all, unless you chose some); or all, or 0,2 '
                '(nvidia-smi indexes), or GPU UUIDs">')

    async def _server_notes(self) -> dict[str, Any]:
        if self.server_notes is None:
            return {}
        try:
            notes = await asyncio.wait_for(self.server_notes(self._settings), 3)
        except Exception as e:  # noqa: BLE001 - the form goes on without its notes
            self.log.warning("the spawn form's server notes failed: %s", e)
            return {}
        return {k: v if isinstance(v, dict) else str(v)
                for k, v in (notes or {}).items() if isinstance(k, str)}

    def options_from_form(self, formdata: dict) -> dict:
        choice = (formdata.get("gpu_server") or [self._settings.server])[0]
        options = {"gpu_server": self._check_server(choice)}
        wanted = (formdata.get("gpus") or [""])[0].strip()
        if wanted:
            options["gpus"] = wanted
        return options

    def _wanted_gpus(self) -> list[str] | None:
        """The GPUs user_options asks for (the form's text or an API
        client's list): None to keep the container's, [] for all."""
        wanted = self.user_options.get("gpus")
        if wanted is None:
            return None
        try:
            return gpus.parse_choice(wanted)
        except ValueError as e:
            raise ContainerError(str(e)) from None

    def _check_server(self, name: Any) -> str:
        names = self._settings.server_names
        if not isinstance(name, str) or name not in names:
            raise web.HTTPError(400, f"unknown GPU server {name!r}; choose one of "
                                     f"{', '.join(names)}")
        return name

    def gpu_server(self) -> str:
        """The GPU server this spawner's server runs on (validated)."""
        if self.name:
            # A named server is named after its GPU server.
            return self._check_server(self.name)
        return self._check_server(self.user_options.get("gpu_server", self._settings.server))

    # ------------------------------------------------------------ state

    instance = Unicode("", help="The LXD instance the server runs in (state).")
    instance_server = Unicode("", help="Its GPU server (state).")
    address = Unicode("", help="The address the hub reaches Jupyter at (state): the "
                               "container's on a local bridge, else the GPU server's.")
    jupyter_at = Integer(0, help="The port the hub reaches Jupyter at there (state).")

    def get_state(self) -> dict:
        state = super().get_state()
        if self.instance:
            state.update(instance=self.instance, server=self.instance_server,
                         address=self.address, port=self.jupyter_at)
        return state

    def load_state(self, state: dict) -> None:
        super().load_state(state)
        self.instance = state.get("instance", "")
        self.instance_server = state.get("server", "")
        self.address = state.get("address", "")
        self.jupyter_at = state.get("port") or jupyter.container_port(self.name)

    def clear_state(self) -> None:
        super().clear_state()
        self.instance = self.instance_server = self.address = ""
        self.jupyter_at = 0

    # ------------------------------------------------------------ lifecycle

    def _unit(self) -> str:
        return jupyter.unit_name(self.name)

    def _say(self, message: str) -> None:
        progress = _STEPS.get(message) or (
            2 if message.startswith("queued") else 45 if "NVIDIA driver" in message else
            60 if message.startswith("giving your container") else 90)
        self._events.append({"progress": progress, "message": message})
        self._marks.append((time.monotonic(), message))
        self._new_event.set()

    def _steps_taken(self) -> str:
        """Each step of this spawn with its seconds, for the log."""
        marks = [*self._marks, (time.monotonic(), "")]
        return ", ".join(f"{m} {b[0] - a:.2f}" for (a, m), b in zip(marks, marks[1:]))

    async def progress(self):
        """The spawn's real steps, as they happen."""
        if not hasattr(self, "_new_event"):
            return
        seen = 0
        while True:
            while seen < len(self._events):
                yield self._events[seen]
                seen += 1
            if self._spawn_done:
                return
            await self._new_event.wait()
            self._new_event.clear()

    async def start(self):
        self._events: list[dict] = []
        self._marks: list[tuple[float, str]] = [(time.monotonic(), "checks")]
        self._new_event = asyncio.Event()
        self._spawn_done = False
        # JupyterHub gives up on a start after start_timeout without cancelling
        # it; stop() cancels it, so a late start never leaves Jupyter running.
        self._start_task = asyncio.ensure_future(self._start())
        try:
            return await self._start_task
        except (ContainerError, ProvisionError):
            raise       # lxcgpu's own sentences, for the user as they are
        except LXDError as e:
            # The log has LXD's own words; the user gets a sentence.
            server = self.gpu_server()
            if is_outage(e):
                self.log.error("%s: spawn on %s failed, LXD stopped answering: %s",
                               self._log_name, server, e)
                raise GPUServerDown(server) from e
            self.log.error("%s: spawn on %s failed: %s", self._log_name, server, e)
            raise SpawnFailed(server) from e
        finally:
            self._spawn_done = True
            self._new_event.set()

    @contextlib.asynccontextmanager
    async def _turn(self, shared: _Shared, server: str):
        """This spawn's turn on ``server`` (at most lxd_concurrency at once):
        a burst of spawns waits in line, and the spawn page says so."""
        limit = shared.limits[server]
        if limit.locked():
            ahead = shared.queued.get(server, 0) + self.lxd_concurrency
            self._say(f"queued: {ahead} servers are starting on {server} before yours")
            self.log.info("%s: queued on %s behind %d spawns", self._log_name, server, ahead)
        shared.queued[server] = shared.queued.get(server, 0) + 1
        try:
            await limit.acquire()
        finally:
            shared.queued[server] -= 1
        try:
            yield
        finally:
            limit.release()

    def _remote_hub(self, server: str) -> tuple[str, str | None]:
        """For a GPU server the hub reaches over the network: the hub URL its
        containers call, and the hub's CA (PEM) they must trust, if any."""
        try:
            hub_url = self._settings.hub_for_remote(server)
        except SettingsError as e:
            self.log.error("%s: %s", self._log_name, e)
            raise ContainerError(f"Jupyter on {server} is not set up on this hub yet (the "
                                 "hub's log says what is missing); please tell your "
                                 "administrator. Your container there is reachable over "
                                 "SSH.") from None
        if not (self.hub_ca_file and hub_url.startswith("https://")):
            return hub_url, None
        try:
            with open(self.hub_ca_file, encoding="ascii") as f:
                return hub_url, f.read(jupyter.CA_MAX + 1)
        except (OSError, UnicodeDecodeError) as e:
            self.log.error("%s: cannot read c.LXCSpawner.hub_ca_file %s: %s", self._log_name,
                           self.hub_ca_file, e)
            raise ContainerError(f"Jupyter on {server} is not set up on this hub yet (the "
                                 "hub's certificate authority cannot be read); please tell "
                                 "your administrator.") from None

    async def _start_early(self, lxd: LXD, name: str, env: dict, argv: list[str]) -> bool:
        """Start Jupyter in the user's container ``name``, which runs already,
        is theirs and they may use (lifecycle.runs_already); whether it did.
        Anything in the way (the login missing, LXD busy) leaves it to the
        usual start after the checks."""
        try:
            await jupyter.start(lxd, name, unit=self._unit(),
                                login=naming.posix_name(self.user.name), argv=argv, env=env)
            self.log.info("%s: Jupyter started in %s before the checks", self._log_name, name)
            return True
        except (LXDError, ContainerError, OSError) as e:
            self.log.info("%s: Jupyter not started before the checks: %s", self._log_name, e)
            return False

    async def _undo_early(self, early: asyncio.Future, lxd: LXD, name: str) -> None:
        """The checks failed (or the start was cancelled): a Jupyter started
        early (or perhaps started: its start was cut off) is stopped again."""
        if not early.done():
            early.cancel()
        try:
            started = await early
        except (asyncio.CancelledError, Exception):  # noqa: BLE001 - undone either way
            started = True
        if started:
            self.log.info("%s: a check failed: the Jupyter started before it is stopped",
                          self._log_name)
            with contextlib.suppress(LXDError):
                await jupyter.stop(lxd, name, self._unit())

    async def _start(self):
        server = self.gpu_server()
        gpu = self._settings.gpu_server(server)
        # On a GPU server elsewhere the container calls the hub at its public
        # URL, and the proxy reaches Jupyter through the user's Jupyter port
        # on that server (mapped by its node agent for the hub's address only).
        hub_url, hub_ca = self._remote_hub(server) if gpu.remote else (None, None)
        shared = self._shared_parts()
        lxd = self._lxd(server)
        settings = shared.settings
        inside = jupyter.container_port(self.name)
        wanted = self._wanted_gpus()
        if wanted:
            # Checked before anything is made: a wrong GPU changes nothing.
            try:
                gpus.choose((await lxd.gpus())[1], wanted, server)
            except gpus.GPUChoiceError as e:
                raise ContainerError(str(e)) from None
        if self._hub_connect_default is _UNSET:
            self._hub_connect_default = self.hub_connect_url
        self.ip, self.port = "0.0.0.0", inside
        async with self._turn(shared, server):
            early = None
            store = await shared.store()
            actor = f"hub:{self.user.name}"
            found = await find(lxd, store, self.user.name, server, actor=actor,
                               prefix=settings.instance_prefix)
            if not gpu.remote:
                self.hub_connect_url = self._hub_connect_default
            try:
                if not gpu.remote and runs_already(found, self.user.name):
                    # The user's container runs already: Jupyter starts at
                    # once, while the checks and provisioning below run.
                    early_in = found.inst["name"]
                    early = asyncio.ensure_future(self._start_early(
                        lxd, early_in, self.get_env(),
                        [*self.singleuser_command, *self.get_args()]))
                uc = await ensure_user_container(
                    lxd, store, settings, self.user.name, server,
                    progress=self._say, actor=actor, found=found,
                    address_timeout=self.address_timeout, wait_network=False,
                    extra_config=dict(self.extra_container_config))
                started_early = early is not None and await early
                if wanted is not None:
                    self._say("giving your container " + (
                        f"GPU {', '.join(wanted)}" if wanted else "every GPU of the server"))
                    await set_user_gpus(lxd, self.user.name, server, wanted,
                                        prefix=settings.instance_prefix)
                    await asyncio.to_thread(
                        store.audit, actor, "container.gpus", self.user.name,
                        {"server": server, "gpus": wanted or "all"})
            except BaseException:
                if early is not None:
                    await self._undo_early(early, lxd, early_in)
                raise
            if gpu.remote:
                if uc.jupyter_port is None:
                    raise ContainerError(f"Jupyter on {server} needs a Jupyter port for you, "
                                         "and the lab's range of them is used up; please tell "
                                         "your administrator (SSH to your container works).")
                address = gpu.ssh_host
                port = jupyter_host_port(uc.jupyter_port, inside)
                self.hub_connect_url = hub_url
                if hub_ca:
                    await jupyter.trust_hub_ca(lxd, uc.name, hub_ca)
            else:
                address, port = uc.address, inside
            self.instance, self.instance_server = uc.name, server
            self.address, self.jupyter_at = address, port
            env = self.get_env()
            argv = [*self.singleuser_command, *self.get_args()]
            booted_now = not uc.online
            # Jupyter runs already unless the checks restarted the container.
            hot = started_early and uc.online
            if not hot:
                self._say("starting Jupyter")
                await jupyter.start(lxd, uc.name, unit=self._unit(), login=uc.posix_user,
                                    argv=argv, env=env, booted_now=booted_now)
            if booted_now:
                # Jupyter's imports (most of its start) need no network: they
                # ran while the container's address came up.
                self._say("waiting for network")
                await lxd.wait_for_address(uc.name, timeout=self.address_timeout,
                                           expected=uc.address)
        url = f"http://{address}:{port}"
        restarted = False

        async def alive() -> bool:
            nonlocal restarted
            if await jupyter.active(lxd, uc.name, self._unit()):
                return True
            if booted_now and not restarted:
                # It gave up on the hub before the address came (a slow
                # boot, many at once): once more, with the network up.
                restarted = True
                self.log.info("%s: Jupyter ended before the network was up; starting it "
                              "again", self._log_name)
                await jupyter.start(lxd, uc.name, unit=self._unit(), login=uc.posix_user,
                                    argv=argv, env=env)
                return True
            return False

        # JupyterHub polls a started server with waits growing to seconds;
        # following it closely here lets the hub find it up at its first try.
        self._say("waiting for Jupyter")
        await jupyter.wait_listening(address, port, timeout=self.http_timeout,
                                     unit=self._unit(), alive=alive)
        self.log.info("%s: Jupyter in %s on %s at %s:%d (seconds: %s%s)", self._log_name,
                      uc.name, server, address, port, self._steps_taken(),
                      "; Jupyter started before the checks" if hot else "")
        return url

    async def poll(self):
        """Running while the container runs and Jupyter answers at the
        address lxcgpu pinned on its NIC; nothing runs inside for this."""
        if not self.instance:
            return 0
        try:
            status = await self._lxd(self.instance_server).status(self.instance)
        except LXDError as e:
            # LXD unreachable says nothing about the server; keep it.
            self.log.warning("%s: cannot poll %s: %s", self._log_name, self.instance, e)
            return None
        if status != "running" or not self.address:
            return 0
        return None if await jupyter.answers(self.address, self.jupyter_at) else 0

    async def stop(self, now: bool = False):
        task = self._start_task
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if not self.instance:
            return
        lxd = self._lxd(self.instance_server)
        try:
            await jupyter.stop(lxd, self.instance, self._unit())
            if self.stop_container_on_stop:
                await lxd.stop(self.instance, force=now)
        except LXDError as e:
            self.log.warning("%s: stopping Jupyter in %s: %s", self._log_name, self.instance, e)
