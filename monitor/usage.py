"""Each GPU server's GPUs as its users pick among them: model, memory, free
or in use and by whom, from the node agents.

The spawn form (through ``LXCSpawner.server_notes``, set by the shipped hub
config) and the portal's container cards show it; both ask
:class:`GPUUsage`, which keeps one dashboard :class:`~monitor.dashboard.Poller`
per site file and asks the agents at most once per poll period, however many
pages are opened.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from lxcspawner.settings import Settings, SettingsError


def memory_text(total: int | None) -> str:
    """A GPU's memory as nvidia-smi users say it: "80 GB" (GiB, rounded)."""
    if not total:
        return ""
    gib = total / (1 << 30)
    return f"{gib:.0f} GB" if gib >= 10 else f"{gib:.1f} GB"


def gpu_row(g: dict) -> dict:
    """One GPU of a dashboard card, as the spawn form and the portal show it."""
    users = sorted({u["user"] for u in g.get("users") or [] if u.get("user")})
    return {"index": g.get("index"), "uuid": g.get("uuid"), "name": g.get("name") or "GPU",
            "memory": memory_text(g.get("memory_total")), "state": g.get("state"),
            "users": users,
            "text": ("free" if g.get("state") == "free" else
                     ("in use by " + ", ".join(users) if users else "in use")
                     + (" (idle)" if g.get("state") == "idle" else ""))}


def server_summary(card: dict) -> dict:
    """A dashboard card in short: ``note`` (one line: "1 of 2 GPUs free:
    NVIDIA A100 80GB"), ``status`` and its GPUs (:func:`gpu_row`)."""
    gpus = [gpu_row(g) for g in card["gpus"]] if card["status"] != "stale" else []
    free = sum(g["state"] == "free" for g in gpus)
    models = ", ".join(sorted({g["name"] for g in gpus}))
    note = ("not answering" if card["status"] == "stale" else
            "no GPUs" if not gpus else
            f"{free} of {len(gpus)} GPUs free" + (f": {models}" if models else ""))
    return {"note": note, "status": card["status"], "driver": card.get("driver"),
            "gpus": gpus}


class GPUUsage:
    """``await usage(settings)``: {GPU server: :func:`server_summary`} now,
    or {} where the monitor token cannot be read (no agent can be asked;
    the dashboard says why)."""

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
                token = None
            self._pollers[key] = token and Poller(
                [(n, settings.agent_url(n)) for n in settings.server_names], token,
                poll_seconds=settings.poll_seconds, timeout=2)
        return self._pollers[key]

    async def __call__(self, settings: Settings) -> dict[str, dict[str, Any]]:
        poller = self._poller(settings)
        if not poller:
            return {}
        async with self._lock:
            if time.monotonic() - self._polled.get(settings.source, 0) >= poller.poll_seconds:
                await poller.poll()
                self._polled[settings.source] = time.monotonic()
        return {card["name"]: server_summary(card) for card in poller.view()["servers"]}
