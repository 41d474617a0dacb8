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
``LXCGPU_TLS_DIR``       the generated HTTPS certificate and its CA, used when
                         the site gives none (default ``/var/lib/lxcgpu/tls``)
``LXCGPU_PROXY_USER``    the unprivileged user the proxy runs as when the hub
                         runs as root (default ``lxcgpu-proxy``)
``LXCGPU_PROXY_DIR``     that user's copy of the certificate and key
                         (default ``/var/lib/lxcgpu/proxy``, 0700)
"""

import copy
import ipaddress
import os
import shutil
import sys
from pathlib import Path
from urllib.parse import urlparse

# The modules beside this file are imported as ``hub_config.*`` from wherever it
# is installed: a checkout, or the package's share/lxcgpu/hub_config.
_HERE = Path(__file__).resolve().parent
if str(_HERE.parent) not in sys.path:
    sys.path.insert(0, str(_HERE.parent))

from hub_config.authenticator import LXCGPUAuthenticator  # noqa: E402
from hub_config.bridge import bridge_ipv4  # noqa: E402
from hub_config.culler import LXCGPUCuller  # noqa: E402
from hub_config.labsync import LXCGPULabSync  # noqa: E402
from hub_config import monitor as _monitor_service  # noqa: E402
from hub_config import portal as _portal_service  # noqa: E402
from hub_config.origins import DEFAULT_DOMAIN, subdomain_hook  # noqa: E402
from hub_config.proxy import DEFAULT_DIR as PROXY_DIR  # noqa: E402
from monitor.usage import GPUUsage  # noqa: E402
from hub_config.proxy import DEFAULT_USER as PROXY_USER  # noqa: E402
from hub_config.proxy import proxy_user, unprivileged_command  # noqa: E402
from hub_config.statedir import hub_dir, secret_file  # noqa: E402
from lxcspawner.network import hub_api_port  # noqa: E402
from lxcspawner.settings import ENV_VAR as LXCGPU_CONFIG_VAR  # noqa: E402
from lxcspawner.settings import Settings  # noqa: E402
from hub_config.tls import DEFAULT_DIR as TLS_DIR  # noqa: E402
from hub_config.tls import (  # noqa: E402
    ensure_hub_certificate, install_for_proxy, machine_addresses, machine_hostname,
    wanted_names,
)

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
# Where browsers connect: HTTPS on every interface.  Without a certificate of
# the site's own (c.JupyterHub.ssl_cert / ssl_key) a generated one is used
# (see "HTTPS" below).  Plain HTTP only where the site binds to loopback
# (e.g. behind a TLS-terminating proxy of its own on this machine).
c.JupyterHub.bind_url = "https://:8000"
# User servers on their own origins (see "origins" below): users at
# <user>.<hub host>, the hub and services on the hub's host.
c.JupyterHub.subdomain_hook = subdomain_hook

# --- login: the lab's LDAP / Active Directory (settings in the site file) ---
c.JupyterHub.authenticator_class = LXCGPUAuthenticator
# StartTLS before any password is sent; LXCGPUAuthenticator also requires a
# valid server certificate unless tls_kwargs says otherwise.
c.LDAPAuthenticator.tls_strategy = "before_bind"
# Leaving the lab: with a service account (LDAPAuthenticator.lookup_dn_search_user
# and lookup_dn_search_password in the site file), every 5 minutes of a user's
# activity the directory is asked again; someone no longer in the allowed
# groups loses their session and their API tokens then (strict: tokens too),
# without logging in again.  Checked again before every spawn.
c.Authenticator.auth_refresh_age = 300
c.Authenticator.refresh_pre_spawn = True
c.Authenticator.auth_refresh_strict = True
# auth_state is not persisted: the admin flag is decided during login, from
# the groups found then, so no JUPYTERHUB_CRYPT_KEY is needed.

# --- servers: one JupyterHub named server per GPU server --------------------
c.JupyterHub.spawner_class = "lxc"  # lxcspawner.LXCSpawner
c.JupyterHub.allow_named_servers = True
# Spawns wait their turn per GPU server (LXCSpawner.lxd_concurrency at once,
# the spawn page says "queued"); the hub refuses (429) only past this many
# at once, far more than a burst of a lab's users.
c.JupyterHub.concurrent_spawn_limit = 100
# Jupyter servers live in containers and outlive a hub restart: the restarted
# hub finds them again through the spawner's saved state and poll().
c.JupyterHub.cleanup_servers = False
# The spawner's settings are the site's; their defaults serve one machine:
#   (the GPU servers are the site file's [servers.<name>] tables; the first
#   is the default)
#   c.LXCSpawner.lxcgpu_config = $LXCGPU_CONFIG or "/etc/lxcgpu/lxcgpu.toml"
#   c.LXCSpawner.extra_container_config = {}
#   c.LXCSpawner.stop_container_on_stop = False      # stopping Jupyter keeps the container
#   c.LXCSpawner.hub_ca_file = <the generated CA>    # trusted by containers on remote servers

# --- the site's settings ------------------------------------------------------
_site = os.environ.get("LXCGPU_HUB_SITE")
if _site and not Path(_site).is_file():
    raise FileNotFoundError(f"LXCGPU_HUB_SITE={_site}: no such file")
_site = Path(_site or DEFAULT_SITE).absolute()
load_subconfig(str(_site))  # noqa: F821 - injected by traitlets; a missing default is skipped
for _moved in ("servers", "default_server"):
    if _moved in c.LXCSpawner:
        raise ValueError(f"{_site}: c.LXCSpawner.{_moved} moved to the lxcgpu site file: list "
                         "the GPU servers as [servers.<name>] tables in /etc/lxcgpu/lxcgpu.toml "
                         "(the first is the default; docs/admin.md section 6) and remove it here")

# --- what depends on the site's settings -------------------------------------
# The hub API listens on the LXD bridge's address, which containers reach
# (jupyterhub-singleuser checks the hub API before it starts), unless the
# site chose its own address, e.g. for GPU servers on other machines.
if "hub_bind_url" not in c.JupyterHub and "hub_connect_url" not in c.JupyterHub:
    # The port is the one the node agent's host guard opens to containers
    # (lxcspawner.network.hub_api_port: $LXCGPU_HUB_API_PORT, else 8081).
    _api = (f"http://{bridge_ipv4(os.environ.get('LXCGPU_BRIDGE') or 'lxcgpubr0')}:"
            f"{hub_api_port()}")
    c.JupyterHub.hub_bind_url = _api
    c.JupyterHub.hub_connect_url = _api

# One named server per GPU server (each is named after its GPU server), so a
# user cannot start more servers than there are GPU servers.
if "named_server_limit_per_user" not in c.JupyterHub:
    c.JupyterHub.named_server_limit_per_user = len(
        Settings.load(c.LXCSpawner.get("lxcgpu_config") or None).servers)

# --- origins: each user's servers on an origin of their own -------------------
# A user is root in their container and controls every byte their server
# serves; on the hub's origin a page of theirs could act with the session of
# whoever opens it.  Unless the site chose (c.JupyterHub.subdomain_host: its
# wildcard DNS name, or "" for one shared origin), the hub is
# lxcgpu.localhost and alice's servers are alice.lxcgpu.localhost: browsers
# resolve every *.localhost name to loopback, so this works with no DNS on
# this machine and, through an SSH tunnel, from a laptop (docs/admin.md).
_bind = urlparse(c.JupyterHub.bind_url)


def _is_loopback(host: str | None) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False  # "" (every interface) or a name


_site_tls = "ssl_cert" in c.JupyterHub or "ssl_key" in c.JupyterHub
_https = _site_tls or _bind.scheme == "https" or not _is_loopback(_bind.hostname)
if "subdomain_host" not in c.JupyterHub:
    _port = _bind.port or 8000
    c.JupyterHub.subdomain_host = (f"{'https' if _https else 'http'}://{DEFAULT_DOMAIN}"
                                   + ("" if _port == (443 if _https else 80) else f":{_port}"))
if "cookie_host_prefix_enabled" not in c.JupyterHub:
    # __Host- cookies: host-only, Secure, path /; no user origin can set or
    # shadow the hub's (JupyterHub allows them with https subdomains only).
    c.JupyterHub.cookie_host_prefix_enabled = c.JupyterHub.subdomain_host.startswith("https://")

# --- HTTPS --------------------------------------------------------------------
# Beyond loopback the hub speaks HTTPS only: with the site's certificate, else
# with one generated here for the hub's origin, a wildcard under it (the
# users' origins), this machine's name and addresses.  Its CA is
# $LXCGPU_TLS_DIR/ca.crt (setup/hub prints its path and fingerprint).
if _https:
    if not _site_tls:
        _tls = Path(os.environ.get("LXCGPU_TLS_DIR") or TLS_DIR).absolute()
        # The addresses go into a new certificate, but one that lacks a new
        # address is kept: names decide, not interfaces that come and go.
        _addresses = [] if _is_loopback(_bind.hostname) else machine_addresses()
        ensure_hub_certificate(
            _tls, wanted_names(urlparse(c.JupyterHub.subdomain_host).hostname
                               or _bind.hostname or None, hostname=machine_hostname()),
            optional=wanted_names(None, addresses=_addresses))
        c.JupyterHub.ssl_cert = str(_tls / "hub.crt")
        c.JupyterHub.ssl_key = str(_tls / "hub.key")
        # Containers on GPU servers elsewhere call the hub API over HTTPS:
        # the spawner puts this CA into their trust store.
        if "hub_ca_file" not in c.LXCSpawner:
            c.LXCSpawner.hub_ca_file = str(_tls / "ca.crt")
    if not (c.JupyterHub.get("ssl_cert") and c.JupyterHub.get("ssl_key")):
        raise ValueError("set both c.JupyterHub.ssl_cert and c.JupyterHub.ssl_key")
    c.JupyterHub.bind_url = _bind._replace(scheme="https").geturl()
    # Every cookie the hub sets is Secure (its own are already whenever the
    # public URL is https; this covers the _xsrf cookie and a site's
    # shared-origin setup too).
    _tornado = dict(c.JupyterHub.get("tornado_settings") or {})
    _tornado["cookie_options"] = {"secure": True, **_tornado.get("cookie_options", {})}
    c.JupyterHub.tornado_settings = _tornado

# --- the proxy as an unprivileged user ------------------------------------------
# A hub run as root (setup/hub, the systemd unit) starts its proxy as
# $LXCGPU_PROXY_USER through setpriv; the proxy reads its own copy of the key.
# setup/install-deps keeps a copy of Node and the proxy for that user in
# /usr/local/lib/lxcgpu-proxy, outside the checkout (which may be root's only).
_proxy_runtime = Path("/usr/local/lib/lxcgpu-proxy/bin")
if os.geteuid() == 0:
    _proxy_user = os.environ.get("LXCGPU_PROXY_USER") or PROXY_USER
    if c.ConfigurableHTTPProxy.command == [str(_chp)] and \
            (_proxy_runtime / "configurable-http-proxy").exists():
        _chp = _proxy_runtime / "configurable-http-proxy"
        c.ConfigurableHTTPProxy.command = [str(_chp)]
    c.ConfigurableHTTPProxy.command = unprivileged_command(
        c.ConfigurableHTTPProxy.command, _proxy_user,
        needs=tuple(p for p in [_chp.parent / "node"] if _chp.exists() and p.exists()),
        low_port=(urlparse(c.JupyterHub.bind_url).port or 8000) < 1024)
    if _https:
        _pw = proxy_user(_proxy_user)
        _cert, _key = install_for_proxy(
            Path(c.JupyterHub.ssl_cert), Path(c.JupyterHub.ssl_key),
            Path(os.environ.get("LXCGPU_PROXY_DIR") or PROXY_DIR).absolute(),
            _pw.pw_uid, _pw.pw_gid)
        c.JupyterHub.ssl_cert, c.JupyterHub.ssl_key = str(_cert), str(_key)

# --- leaving the lab: the lab sync ----------------------------------------------
# With a service account, hub_config/labsync.py checks every hub user against
# the directory every c.LXCGPULabSync.interval seconds and ends the access of
# those who left (servers stopped, tokens revoked, SSH keys and port maps out
# of their containers).  API tokens never live longer than 90 days unless the
# site says otherwise.
if "token_expires_in_max_seconds" not in c.JupyterHub:
    c.JupyterHub.token_expires_in_max_seconds = 90 * 24 * 3600
_labsync = LXCGPULabSync(config=c)
_ldap = {**{k: (sorted(v) if isinstance(v, (set, frozenset)) else v)
            for k, v in c.LDAPAuthenticator.items()},
         **dict(c.LXCGPUAuthenticator.items())}
for _k in ("allowed_users", "admin_users"):
    if _k in c.Authenticator:
        _ldap[_k] = sorted(c.Authenticator[_k])
if _labsync.interval and _ldap.get("lookup_dn_search_user"):
    _entry = _labsync.service({k: v for k, v in _ldap.items() if not callable(v)})
    _entry["environment"].update({
        "PYTHONPATH": str(_HERE.parent),
        # The same site file as the spawner's.
        **({LXCGPU_CONFIG_VAR: str(_config)} if (_config := c.LXCSpawner.get("lxcgpu_config")
                                                 or os.environ.get(LXCGPU_CONFIG_VAR)) else {}),
    })
    c.JupyterHub.services.append(_entry)
    c.JupyterHub.load_roles.append(_labsync.role())

_culler = LXCGPUCuller(config=c)
if _culler.timeout:
    c.JupyterHub.services.append(_culler.service())
    c.JupyterHub.load_roles.append(_culler.role())

def _service_env() -> dict:
    """The environment of our services: the project importable, the same site
    file as the spawner's."""
    config = c.LXCSpawner.get("lxcgpu_config") or os.environ.get(LXCGPU_CONFIG_VAR)
    return {"PYTHONPATH": str(_HERE.parent),
            **({LXCGPU_CONFIG_VAR: str(config)} if config else {})}


# --- monitor: the dashboard of every GPU server's load (monitor/) -----------
# (Set up below keyportal: every user's role gains its access scope there.)
_monitor = _monitor_service.LXCGPUMonitor(config=c)
_user_role = None   # the user role this file defines, if the site defines none

# --- keyportal: keys, containers, snapshots, forwards (keyportal/) ------------
_portal = _portal_service.LXCGPUPortal(config=c)
if _portal.enabled:
    c.JupyterHub.services.append(_portal.service(_service_env()))
    _scopes = dict(c.JupyterHub.get("custom_scopes") or {})
    _scopes.update({k: v for k, v in _portal_service.CUSTOM_SCOPES.items() if k not in _scopes})
    c.JupyterHub.custom_scopes = _scopes
    # Appended roles are a traitlets LazyConfigValue until the hub reads them;
    # its get_value() freezes it (later appends would be lost): read a copy.
    _roles = copy.deepcopy(c.JupyterHub.load_roles)
    _roles = _roles.get_value([]) if hasattr(_roles, "get_value") else list(_roles)
    if not any(r.get("name") == "user" for r in _roles):
        _user_role = copy.deepcopy(_portal_service.USER_ROLE)
        if _monitor.enabled:
            _user_role["scopes"] += _monitor_service.USER_SCOPES
        c.JupyterHub.load_roles.append(_user_role)
    if not any(r.get("name") == _portal_service.SERVICE for r in _roles):
        c.JupyterHub.load_roles.append(_portal_service.SERVICE_ROLE)
    # The hub's pages link to it (hub_config/templates/page.html extends the
    # hub's own); a site's template paths come first.
    c.JupyterHub.template_paths = [*(c.JupyterHub.get("template_paths") or []),
                                   str(_HERE / "templates")]

if _monitor.enabled:
    c.JupyterHub.services.append(_monitor.service(_service_env()))
    # The spawn form shows each server's GPUs, free or in use and by whom
    # (unless the site set its own notes).
    if "server_notes" not in c.LXCSpawner:
        c.LXCSpawner.server_notes = GPUUsage()
    if _user_role is None and not _portal.enabled:  # keyportal off: a user role for the monitor
        _roles = copy.deepcopy(c.JupyterHub.load_roles)
        _roles = _roles.get_value([]) if hasattr(_roles, "get_value") else list(_roles)
        if not any(r.get("name") == "user" for r in _roles):
            c.JupyterHub.load_roles.append({
                "name": "user", "description": "Standard user privileges, the GPU dashboard",
                "scopes": ["self", *_monitor_service.USER_SCOPES]})
