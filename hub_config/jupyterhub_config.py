"""lxcgpu's JupyterHub configuration: ``jupyterhub -f hub_config/jupyterhub_config.py``.

Sites never edit this file.  Their settings (the LDAP / Active Directory server,
who may log in and who is an admin, the GPU servers) go in one site file,
``$LXCGPU_HUB_SITE`` or ``/etc/lxcgpu/jupyterhub_site.py``, loaded near the end
so it can override anything set here; see ``jupyterhub_site.example.py``.

Environment (all optional):

``LXCGPU_HUB_DIR``       the hub's state: database, cookie secret, proxy token,
                         pid files (default ``/var/lib/lxcgpu/hub``, made 0700)
``LXCGPU_HUB_SITE``      the site file (default ``/etc/lxcgpu/jupyterhub_site.py``;
                         a missing default is fine, a missing named file an error)
``LXCGPU_BRIDGE``        the LXD bridge whose address the hub API binds to, so
                         containers can reach it (default ``lxcgpubr0``)
``LXCGPU_HUB_API_PORT``  the hub API's port on that address (default 8081)
``LXCGPU_IDLE_TIMEOUT``  the idle culler's timeout in seconds (default 3600;
                         0 turns it off); the site's ``c.LXCGPUCuller.timeout`` wins
``LXCGPU_CONFIG``        lxcgpu's own settings (``/etc/lxcgpu/lxcgpu.toml``),
                         read by the spawner
"""

import os
import shutil
import sys
from pathlib import Path

# The modules beside this file are imported as ``hub_config.*`` from wherever it
# is installed: a checkout, or the package's share/lxcgpu/hub_config.
_HERE = Path(__file__).resolve().parent
if str(_HERE.parent) not in sys.path:
    sys.path.insert(0, str(_HERE.parent))

from hub_config.authenticator import LXCGPUAuthenticator  # noqa: E402
from hub_config.bridge import bridge_ipv4  # noqa: E402
from hub_config.culler import LXCGPUCuller  # noqa: E402
from hub_config.statedir import hub_dir, secret_file  # noqa: E402

c = get_config()  # noqa: F821 - injected by traitlets

DEFAULT_SITE = "/etc/lxcgpu/jupyterhub_site.py"
STATE = hub_dir()

# --- the hub's own state ---------------------------------------------------
c.JupyterHub.db_url = f"sqlite:///{STATE / 'jupyterhub.sqlite'}"
c.JupyterHub.cookie_secret_file = str(STATE / "jupyterhub_cookie_secret")  # made 0600 by the hub
c.JupyterHub.pid_file = str(STATE / "jupyterhub.pid")

# --- the proxy: configurable-http-proxy, started and stopped by the hub -----
# setup/install-deps puts its wrapper next to this Python; else it is on PATH.
_chp = Path(sys.executable).parent / "configurable-http-proxy"
c.ConfigurableHTTPProxy.command = [
    str(_chp) if _chp.exists() else (shutil.which("configurable-http-proxy")
                                     or "configurable-http-proxy")
]
# Generated once so a restarted hub can still talk to its proxy; the hub hands
# it to the proxy in the environment, never on the command line.
c.ConfigurableHTTPProxy.auth_token = secret_file(STATE / "proxy_token")
c.ConfigurableHTTPProxy.pid_file = str(STATE / "jupyterhub-proxy.pid")
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:8001"
# Where browsers connect.  Put TLS in front (or set ssl_cert/ssl_key) in production.
c.JupyterHub.bind_url = "http://:8000"

# --- login: the lab's LDAP / Active Directory (settings in the site file) ---
c.JupyterHub.authenticator_class = LXCGPUAuthenticator
# StartTLS before any password is sent; LXCGPUAuthenticator also requires a
# valid server certificate unless tls_kwargs says otherwise.
c.LDAPAuthenticator.tls_strategy = "before_bind"
# auth_state is not persisted: the admin flag is decided during login, from
# the groups found then, so no JUPYTERHUB_CRYPT_KEY is needed.

# --- servers: one JupyterHub named server per GPU server --------------------
c.JupyterHub.spawner_class = "lxc"  # lxcspawner.LXCSpawner
c.JupyterHub.allow_named_servers = True
c.JupyterHub.concurrent_spawn_limit = 10
# Jupyter servers live in containers and outlive a hub restart: the restarted
# hub finds them again through the spawner's saved state and poll().
c.JupyterHub.cleanup_servers = False
# The spawner's settings are the site's; their defaults serve one machine:
#   c.LXCSpawner.servers = {"<[server] name>": {}}   # GPU server -> its LXD ({}: local)
#   c.LXCSpawner.default_server = <the first of servers>
#   c.LXCSpawner.lxcgpu_config = $LXCGPU_CONFIG or "/etc/lxcgpu/lxcgpu.toml"
#   c.LXCSpawner.extra_container_config = {}
#   c.LXCSpawner.stop_container_on_stop = False      # stopping Jupyter keeps the container
#   c.LXCSpawner.jupyter_port = 8888

# --- the site's settings ------------------------------------------------------
_site = os.environ.get("LXCGPU_HUB_SITE")
if _site and not Path(_site).is_file():
    raise FileNotFoundError(f"LXCGPU_HUB_SITE={_site}: no such file")
_site = Path(_site or DEFAULT_SITE).absolute()
load_subconfig(str(_site))  # noqa: F821 - injected by traitlets; a missing default is skipped

# --- what depends on the site's settings -------------------------------------
# The hub API listens on the LXD bridge's address, which containers reach
# (jupyterhub-singleuser checks the hub API before it starts), unless the
# site chose its own address, e.g. for GPU servers on other machines.
if "hub_bind_url" not in c.JupyterHub and "hub_connect_url" not in c.JupyterHub:
    _api = f"http://{bridge_ipv4(os.environ.get('LXCGPU_BRIDGE') or 'lxcgpubr0')}:" + (
        os.environ.get("LXCGPU_HUB_API_PORT") or "8081"
    )
    c.JupyterHub.hub_bind_url = _api
    c.JupyterHub.hub_connect_url = _api

_culler = LXCGPUCuller(config=c)
if _culler.timeout:
    c.JupyterHub.services.append(_culler.service())
    c.JupyterHub.load_roles.append(_culler.role())
