"""The monitor dashboard as a hub-managed service at /services/monitor/.

The hub starts it (``python -m monitor.dashboard``) on loopback with the site
file the spawner reads; it polls every GPU server's node agent (the site
file's servers, ``[monitor]``) and serves the page and its JSON.  Every user
may look (the ``user`` role gains ``access:services!service=monitor``).
"""

from __future__ import annotations

import os
import sys

from traitlets import Bool, Int, default
from traitlets.config import Configurable


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
