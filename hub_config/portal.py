"""keyportal as a hub-managed service at /services/keyportal/.

The hub starts it (``python -m keyportal``) on loopback, with the site file
the spawner reads; users reach it through the proxy on the hub's origin,
log in through the hub's OAuth, or call its API with a hub token.  Its
scopes: every user may use it for themselves (the ``user`` role gains
``access:services!service=keyportal`` and ``custom:keyportal:use!user``).
"""

from __future__ import annotations

import os
import sys

from traitlets import Bool, Int, default
from traitlets.config import Configurable

SERVICE = "keyportal"
PORT_VAR = "LXCGPU_PORTAL_PORT"
USE_SCOPE = "custom:keyportal:use"
ADMIN_SCOPE = "custom:keyportal:admin"

CUSTOM_SCOPES = {
    USE_SCOPE: {
        "description": "Manage SSH keys, containers, snapshots and port forwards in keyportal.",
    },
    ADMIN_SCOPE: {
        "description": "Manage every user's keys and containers in keyportal.",
        "subscopes": [USE_SCOPE],
    },
}

# The hub's default user role ("self"), plus the portal for oneself.
USER_ROLE = {
    "name": "user",
    "description": "Standard user privileges, keyportal for oneself",
    "scopes": ["self", f"access:services!service={SERVICE}", f"{USE_SCOPE}!user"],
}


# What the service itself may do in the hub: an admin's "remove a user"
# stops that user's servers and revokes their tokens (keyportal.portal).
SERVICE_ROLE = {
    "name": SERVICE,
    "description": "keyportal: stop a removed user's servers and revoke their tokens",
    "scopes": ["read:users", "read:servers", "delete:servers", "read:tokens", "tokens"],
    "services": [SERVICE],
}


class LXCGPUPortal(Configurable):
    """Settings of keyportal as a hub service (``c.LXCGPUPortal.*``)."""

    enabled = Bool(True, config=True, help="Run keyportal as a hub service.")

    port = Int(config=True, help="Its loopback port (default $LXCGPU_PORTAL_PORT, else 10101).")

    @default("port")
    def _default_port(self):
        return int(os.environ.get(PORT_VAR) or 10101)

    def service(self, environment: dict) -> dict:
        """The entry for ``JupyterHub.services``."""
        return {
            "name": SERVICE,
            "url": f"http://127.0.0.1:{self.port}",
            "command": [sys.executable, "-m", "keyportal"],
            "environment": dict(environment),
            "oauth_no_confirm": True,
            "display": True,
        }
