"""The dashboard: the JupyterHub service at /services/monitor/.

It asks every GPU server's node agent for its load (``api/v1/load``, with the
site's monitor token; :mod:`monitor.loadapi`) every ``[monitor]
poll_seconds``, all servers at once, each with a timeout, so a server that is
down delays no other.  It keeps ``[monitor] history_minutes`` of each
server in memory (one point a minute: the sparklines) and serves:

- ``/services/monitor/``: the page (one card per server; its script asks
  for the data every few seconds and redraws without a reload);
- ``/services/monitor/api/v1/load``: the same as JSON, filtered by
  ``?server=``, ``?user=`` and ``?state=`` (free, busy, idle, stale).

Who may look: anyone the hub lets use the service (every user's role has
``access:services!service=monitor``), with the hub's login or a token in the
``Authorization`` header; or, with ``[monitor] public = true``, anyone who
reaches the hub (a screen on the lab's wall), then without process ids and
container names.

A server is **stale** once its last answer is older than three polls (or it
never answered): its card says since when and keeps its last data.  A GPU is
**free** when no process holds it (an idle-held GPU is not free).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jinja2
from jupyterhub.services.auth import HubOAuth, HubOAuthCallbackHandler, HubOAuthenticated
from tornado import httpclient, httpserver, ioloop, web

from lxcspawner.settings import Settings, SettingsError

from .loadapi import fetch_load, quiet_access_log, unreachable

log = logging.getLogger("lxcgpu.monitor")

SERVICE = "monitor"
STATES = ("free", "busy", "idle", "stale")
TEMPLATES = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(Path(__file__).with_name("templates"))),
    autoescape=True)


def _iso(t: float | None) -> str | None:
    return None if t is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


@dataclass
class ServerState:
    name: str
    url: str
    doc: dict | None = None           # the agent's last answer
    last_ok: float | None = None
    first_try: float | None = None
    error: str | None = None          # the last failure, a sentence
    # One point a minute: (minute, cpu %, memory %, {gpu uuid: (util %, memory %)}).
    history: deque = field(default_factory=deque)


class Poller:
    """Polls every agent of the site; keeps the last answers and an hour of
    minutes."""

    def __init__(self, servers: list[tuple[str, str]], token: str, *, poll_seconds: float = 3,
                 history_minutes: int = 60, timeout: float | None = None,
                 clock=time.time, unusable: str | None = None):
        # unusable: why no agent can be asked (no token): every server says it.
        self.unusable = unusable
        self.servers = {name: ServerState(name, url) for name, url in servers}
        self.token = token
        self.poll_seconds = poll_seconds
        self.history_minutes = history_minutes
        self.timeout = timeout or max(2.0, min(10.0, poll_seconds * 2))
        self.clock = clock
        self.http = httpclient.AsyncHTTPClient()
        self.generation = 0           # bumps with each poll (the page's cache key)
        self._cache: tuple[tuple, bytes] | None = None

    async def _one(self, s: ServerState) -> None:
        now = self.clock()
        if s.first_try is None:
            s.first_try = now
        if self.unusable:
            s.error = self.unusable
            return
        try:
            doc = await self._fetch(s)
        except (OSError, RuntimeError, ValueError) as e:
            if isinstance(e, OSError):
                e = RuntimeError(unreachable(s.url, e))
            if s.error != str(e):
                log.warning("%s: %s", s.name, e)
            s.error = str(e)
            return
        if s.error:
            log.info("%s: its agent answers again", s.name)
        s.doc, s.last_ok, s.error = doc, now, None
        self._remember(s, doc, now)

    async def _fetch(self, s: ServerState) -> dict:
        """The agent's document; RuntimeError (a sentence) or OSError if none."""
        return await fetch_load(self.http, s.url, self.token, s.name, timeout=self.timeout)

    def _remember(self, s: ServerState, doc: dict, now: float) -> None:
        minute = int(now // 60)
        host = doc.get("host") or {}
        mem = host.get("memory") or {}
        mem_pct = 100 * mem.get("used", 0) / mem["total"] if mem.get("total") else 0
        gpus = {}
        for g in (doc.get("gpus") or {}).get("devices") or []:
            total = g.get("memory_total") or 0
            gpus[g.get("uuid")] = (g.get("utilization") or 0,
                                   100 * (g.get("memory_used") or 0) / total if total else 0)
        point = (host.get("cpu_percent") or 0, mem_pct, gpus)
        h = s.history
        if h and h[-1][0] == minute:
            # The minute's running mean: its n points so far, and this one.
            _, n, (cpu, memp, old) = h[-1]
            merged = {u: tuple((a * n + b) / (n + 1) for a, b in zip(old.get(u, v), v))
                      for u, v in gpus.items()}
            h[-1] = (minute, n + 1, ((cpu * n + point[0]) / (n + 1),
                                     (memp * n + point[1]) / (n + 1), merged))
        else:
            h.append((minute, 1, point))
        while h and h[0][0] <= minute - self.history_minutes:
            h.popleft()

    async def poll(self) -> None:
        await asyncio.gather(*(self._one(s) for s in self.servers.values()))
        self.generation += 1

    async def run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.poll()
            except Exception:       # noqa: BLE001 - the loop must live on
                log.exception("poll failed")
            await asyncio.sleep(max(0.1, self.poll_seconds - (time.monotonic() - started)))

    # ------------------------------------------------------------ the view

    def stale(self, s: ServerState, now: float) -> bool:
        return s.last_ok is None or now - s.last_ok > 3 * self.poll_seconds

    def view(self, *, server: str | None = None, user: str | None = None,
             state: str | None = None, public: bool = False) -> dict:
        """What the page shows, as JSON-able data."""
        now = self.clock()
        cards, free = [], []
        totals = {"gpus": 0, "free": 0, "busy": 0, "idle": 0, "servers": 0, "stale": 0}
        for s in self.servers.values():
            stale = self.stale(s, now)
            totals["servers"] += 1
            totals["stale"] += stale
            card = self._card(s, stale, now, public)
            for g in card["gpus"]:
                totals["gpus"] += 1
                totals[g["state"]] += 1
                if g["state"] == "free" and not stale:
                    free.append({"server": s.name, "index": g["index"], "name": g["name"]})
            if server and s.name != server:
                continue
            if user:
                card["gpus"] = [g for g in card["gpus"]
                                if any(u["user"] == user for u in g["users"])]
                card["containers"] = [c for c in card["containers"] if c.get("user") == user]
                if not card["gpus"] and not card["containers"]:
                    continue
            if state == "stale":
                if not stale:
                    continue
            elif state:
                card["gpus"] = [g for g in card["gpus"] if g["state"] == state and not stale]
                if not card["gpus"]:
                    continue
            cards.append(card)
        return {"time": _iso(now), "poll_seconds": self.poll_seconds,
                "summary": {**totals, "free_gpus": free}, "servers": cards,
                "filters": {"server": server, "user": user, "state": state}}

    def _card(self, s: ServerState, stale: bool, now: float, public: bool) -> dict:
        doc = s.doc or {}
        gpus_part = doc.get("gpus") or {}
        history = list(s.history)
        card: dict[str, Any] = {
            "name": s.name, "status": "stale" if stale else "ok",
            "since": _iso(s.last_ok if s.last_ok is not None else s.first_try) if stale else None,
            "error": s.error if stale else None, "sampled": doc.get("time"),
            "host": doc.get("host"), "gpu_status": gpus_part.get("status"),
            "gpu_message": gpus_part.get("message"), "driver": gpus_part.get("driver"),
            "history": {"cpu": [round(h[2][0], 1) for h in history],
                        "memory": [round(h[2][1], 1) for h in history]},
            "gpus": [], "containers": [],
        }
        for g in gpus_part.get("devices") or []:
            procs = g.get("processes") or []
            idle = g.get("idle")
            gstate = "idle" if idle else "busy" if procs else "free"
            uuid = g.get("uuid")
            card["gpus"].append({
                "index": g.get("index"), "name": g.get("name"), "uuid": uuid,
                "utilization": g.get("utilization"), "memory_used": g.get("memory_used"),
                "memory_total": g.get("memory_total"), "temperature": g.get("temperature"),
                "power_watts": g.get("power_watts"), "error": g.get("error"),
                "state": gstate, "idle": idle,
                "users": [{"user": u.get("user"), "memory": u.get("memory")}
                          for u in g.get("users") or []],
                "processes": [] if public else procs,
                "history": {"utilization": [round(h[2][2].get(uuid, (0, 0))[0], 1)
                                            for h in history],
                            "memory": [round(h[2][2].get(uuid, (0, 0))[1], 1)
                                       for h in history]},
            })
        for c in doc.get("containers") or []:
            if public:
                c = {"user": c.get("user"), "state": c.get("state"), "prebuilt": c.get("prebuilt"),
                     "cpu_percent": c.get("cpu_percent"), "memory": c.get("memory")}
            card["containers"].append(c)
        return card

    def encoded(self, public: bool) -> bytes:
        """The unfiltered view, encoded once per poll."""
        key = (self.generation, int(self.clock() // self.poll_seconds), public)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, json.dumps(self.view(public=public),
                                           separators=(",", ":")).encode())
        return self._cache[1]


# ---------------------------------------------------------------- handlers

class _Base(HubOAuthenticated, web.RequestHandler):
    @property
    def poller(self) -> Poller:
        return self.settings["poller"]

    @property
    def public(self) -> bool:
        return self.settings["public"]

    def get_current_user(self):
        if self.public:
            return {"name": None, "public": True}
        return super().get_current_user()

    def prepare(self):
        if "token" in self.request.query_arguments:
            raise web.HTTPError(400, "tokens in URLs are refused: send it in the "
                                "Authorization header")


class PageHandler(_Base):
    @web.authenticated
    def get(self):
        user = self.current_user or {}
        self.set_header("Cache-Control", "no-store")
        xsrf = self.xsrf_token
        self.finish(TEMPLATES.get_template("dashboard.html").render(
            prefix=self.settings["prefix"], hub=self.settings["hub_prefix"],
            user=user.get("name"), public=self.public,
            xsrf=xsrf.decode() if isinstance(xsrf, bytes) else xsrf,
            poll_ms=int(self.poller.poll_seconds * 1000),
            servers=list(self.poller.servers)))


class LoadHandler(_Base):
    def get(self):
        if self.current_user is None:
            self.set_status(401 if not self.request.cookies else 403)
            self._json({"status": self.get_status(),
                        "message": "log in to the hub first, or send a JupyterHub token in "
                                   "the Authorization header"})
            return
        server = self.get_query_argument("server", "") or None
        user = self.get_query_argument("user", "") or None
        state = self.get_query_argument("state", "") or None
        if server and server not in self.poller.servers:
            self.set_status(404)
            self._json({"status": 404, "message": f"no GPU server {server!r} here; the "
                        f"servers are {', '.join(self.poller.servers)}"})
            return
        if state and state not in STATES:
            self.set_status(400)
            self._json({"status": 400, "message": f"state: one of {', '.join(STATES)}"})
            return
        if user and len(user) > 255:
            self.set_status(400)
            self._json({"status": 400, "message": "user: a user name"})
            return
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        if not (server or user or state):
            self.finish(self.poller.encoded(self.public))
            return
        self.finish(json.dumps(self.poller.view(server=server, user=user, state=state,
                                                public=self.public), separators=(",", ":")))

    def _json(self, data: dict) -> None:
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(json.dumps(data))


def make_app(poller: Poller, prefix: str, hub_auth: HubOAuth | None, *,
             public: bool = False) -> web.Application:
    hub_prefix = os.environ.get("JUPYTERHUB_BASE_URL", "/") + "hub/"
    routes = [
        (prefix, PageHandler),
        (prefix + "api/v1/load", LoadHandler),
        (prefix + "oauth_callback", HubOAuthCallbackHandler),
    ]
    # Each open page asks every few seconds: answers are not worth a log line.
    return web.Application(routes, poller=poller, prefix=prefix, hub_prefix=hub_prefix,
                           hub_auth=hub_auth, public=public, cookie_secret=os.urandom(32),
                           log_function=quiet_access_log(log))


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO,
                        format="[%(levelname).1s %(asctime)s monitor] %(message)s")
    url = os.environ.get("JUPYTERHUB_SERVICE_URL")
    prefix = os.environ.get("JUPYTERHUB_SERVICE_PREFIX", f"/services/{SERVICE}/")
    if not url or not os.environ.get("JUPYTERHUB_API_TOKEN"):
        print("monitor: run by the hub as a service (JUPYTERHUB_SERVICE_URL and "
              "JUPYTERHUB_API_TOKEN unset)", file=sys.stderr)
        return 2
    try:
        settings = Settings.load()
        servers = [(name, settings.agent_url(name)) for name in settings.server_names]
    except SettingsError as e:
        print(f"monitor: {e}", file=sys.stderr)
        return 2
    try:
        token, missing = settings.monitor_token(), None
    except SettingsError as e:
        # The page says so on every card (an admin sees what to fix).
        log.error("no agent can be asked: %s", e)
        token, missing = "", str(e)
    poller = Poller(servers, token, poll_seconds=settings.poll_seconds,
                    history_minutes=settings.history_minutes, unusable=missing)
    hub_auth = HubOAuth.instance(cache_max_age=60, allow_token_in_url=False)
    app = make_app(poller, prefix, hub_auth, public=settings.monitor_public)
    parts = urlsplit(url)
    server = httpserver.HTTPServer(app, xheaders=True, max_body_size=4096)
    server.listen(parts.port or 80, parts.hostname or "127.0.0.1")
    log.info("monitor on %s (prefix %s%s), agents: %s", url, prefix,
             ", public" if settings.monitor_public else "",
             ", ".join(f"{n} {u}" for n, u in servers))
    loop = ioloop.IOLoop.current()
    loop.add_callback(poller.run)
    try:
        loop.start()
    except KeyboardInterrupt:
        log.info("monitor stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
