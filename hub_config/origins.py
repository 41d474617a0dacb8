"""Origins: each user's servers on a host of their own, the hub and services on the hub's.

With ``c.JupyterHub.subdomain_host = "https://HUB"`` JupyterHub serves
alice's servers (default and named alike) at ``https://alice.HUB/user/alice/...``:
another origin than the hub's, so a page alice serves cannot read hub pages
or use the hub's cookies of whoever opens it.  JupyterHub 6 would also give
each service an origin (``NAME--service.HUB``); lxcgpu's services (the portal,
the dashboard) are lxcgpu's own code and stay on the hub's host, under
``/services/NAME/``, with one certificate name fewer to think about.

The one-machine default is ``lxcgpu.localhost``: browsers resolve ``*.localhost``
to loopback themselves (RFC 6761), so no DNS is needed on this machine or at
the far end of an SSH tunnel.
"""

from __future__ import annotations

from jupyterhub.utils import subdomain_hook_idna

DEFAULT_DOMAIN = "lxcgpu.localhost"


def subdomain_hook(name: str, domain: str, kind: str) -> str:
    """Users: JupyterHub's own ``idna`` scheme (``alice.HUB``; names that are not
    a safe DNS label get a truncated name and a hash).  Services: the hub's host."""
    if kind == "service":
        return domain
    return subdomain_hook_idna(name, domain, kind)
