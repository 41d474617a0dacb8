"""The idle culler: a hub-managed service that stops idle Jupyter servers.

It runs ``jupyterhub_idle_culler`` with a role that holds only the scopes it
needs.  Stopping a server stops Jupyter only (the spawner never stops a
container), so training jobs started over SSH keep running.  Named servers are
stopped, never removed, and users are never deleted.
"""

from __future__ import annotations

import os
import sys

from traitlets import Int, TraitError, default, validate
from traitlets.config import Configurable

SERVICE = "idle-culler"
ENV_VAR = "LXCGPU_IDLE_TIMEOUT"
SCOPES = ["list:users", "read:users:activity", "read:servers", "delete:servers"]


class LXCGPUCuller(Configurable):
    """Settings of the idle culler, from the site file (``c.LXCGPUCuller.*``)."""

    timeout = Int(
        config=True,
        help="""Seconds without activity after which a Jupyter server is stopped
        (its container keeps running).  0 turns the culler off.
        Default: $LXCGPU_IDLE_TIMEOUT, else 3600.""",
    )

    @default("timeout")
    def _default_timeout(self):
        return int(os.environ.get(ENV_VAR) or 3600)

    @validate("timeout", "cull_every")
    def _non_negative(self, proposal):
        if proposal.value < 0:
            raise TraitError(f"LXCGPUCuller.{proposal.trait.name} must be >= 0")
        return proposal.value

    cull_every = Int(
        0,
        config=True,
        help="Seconds between checks; 0: half the timeout.",
    )

    def service(self) -> dict:
        """The entry for ``JupyterHub.services``."""
        command = [sys.executable, "-m", "jupyterhub_idle_culler", f"--timeout={self.timeout}"]
        if self.cull_every:
            command.append(f"--cull-every={self.cull_every}")
        return {"name": SERVICE, "command": command}

    def role(self) -> dict:
        """The entry for ``JupyterHub.load_roles``: the culler's scopes, no more."""
        return {"name": SERVICE, "scopes": list(SCOPES), "services": [SERVICE]}
