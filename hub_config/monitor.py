"""The monitor dashboard as a hub-managed service at /services/monitor/.

The hub starts it (``python -m monitor.dashboard``) on loopback with the site
file the spawner reads; it polls every GPU server's node agent (the site
file's servers, ``[monitor]``) and serves the page and its JSON.  Every user
may look (the ``user`` role gains ``access:services!service=monitor``).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

from traitlets import Bool, Int, default
from traitlets.config import Configurable

from lxcspawner.settings import Settings, SettingsError

SERVICE = "monitor"
PORT_VAR = "LXCGPU_MONITOR_PORT"
#: What every user's role needs to see the dashboard.
USER_SCOPES = [f"access:services!service={SERVICE}"]


class LXCGPUMonitor(Configurable):
    """Settings of the dashboard as a hub service (``c.LXCGPUMonitor.*``)."""

    enabled = Bool(True, config=True, help="Run the monitor dashboard as a hub service.")

    port = Int(config=True, help="Its loopback port (default $LXCGPU_MONITOR_PORT, else 10102).")

    @default("port")
    def _default_port(self):
        return int(os.environ.get(PORT_VAR) or 10102)

    def service(self, environment: dict) -> dict:
        """The entry for ``JupyterHub.services``."""
        return {
            "name": SERVICE,
            "url": f"http://127.0.0.1:{self.port}",
            "command": [sys.executable, "-m", "monitor.dashboard"],
            "environment": dict(environment),
            "oauth_no_confirm": True,
            "display": True,
        }


class FreeGPUs:
    """The spawn form's note beside each GPU server (``LXCSpawner.server_notes``):
    its free GPUs now, from its node agent, through the dashboard's own
    poller (one per site file in the hub, asked at most once per poll
    period, whoever opens the form)."""

    def __init__(self):
        self._pollers: dict = {}
        self._polled: dict = {}     # site file -> when its poller last asked the agents
        self._lock = asyncio.Lock()

    def _poller(self, settings: Settings):
        from monitor.dashboard import Poller

        key = settings.source
        if key not in self._pollers:
            try:
                token = settings.monitor_token()
            except SettingsError:
                token = None    # no token on the hub: no notes (the dashboard says why)
            self._pollers[key] = token and Poller(
                [(n, settings.agent_url(n)) for n in settings.server_names], token,
                poll_seconds=settings.poll_seconds, timeout=2)
        return self._pollers[key]

    async def __call__(self, settings: Settings) -> dict[str, str]:
        poller = self._poller(settings)
        if not poller:
            return {}
        async with self._lock:
            if time.monotonic() - self._polled.get(settings.source, 0) >= poller.poll_seconds:
                await poller.poll()
                self._polled[settings.source] = time.monotonic()
        notes = {}
        for card in poller.view()["servers"]:
            gpus = card["gpus"]
            free = sum(g["state"] == "free" for g in gpus)
            models = ", ".join(sorted({g["name"] for g in gpus if g.get("name")}))
            notes[card["name"]] = ("not answering" if card["status"] == "stale" else
                                   "no GPUs" if not gpus else
                                   f"{free} of {len(gpus)} GPUs free"
                                   + (f": {models}" if models else ""))
        return notes
