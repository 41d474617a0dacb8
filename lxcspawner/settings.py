"""Site settings shared by the admin command, the portal and the hub.

They come from one TOML file: ``$LXCGPU_CONFIG`` if set, else
``/etc/lxcgpu/lxcgpu.toml``.  Without the default file every setting has its
default; a file named explicitly must exist.  Unknown sections and keys are
errors that name them, so a typo never silently falls back to a default::

    [store]
    url = "sqlite:////var/lib/lxcgpu/lxcgpu.sqlite"
    [ports]
    ssh = "22000-29999"
    forward = "11000-11999"
    forward_limit = 10
    jupyter = "20000-21999"              # pairs: the hub's way to Jupyter on remote servers
    [servers.gpu17]                      # this machine: its local LXD
    address = "gpu17.lab.example.org"    # where users SSH to (default: the name)
    [servers.gpu18]                      # another GPU server, over HTTPS
    lxd = "https://gpu18.lab.example.org:8443"
    client_cert = "/etc/lxcgpu/lxd-client.crt"   # the hub's LXD client certificate
    client_key = "/etc/lxcgpu/lxd-client.key"
    server_cert = "/etc/lxcgpu/servers/gpu18.crt"  # gpu18's LXD certificate, pinned
    project = "default"
    [containers]
    prefix = ""
    image = "lxcgpu/default"
    profiles = ["lxcgpu"]
    cpu = 8
    memory = "64GiB"
    processes = 4096
    mounts = ["/data:/data:ro"]
    pool = 2                             # prebuilt containers per GPU server for new users (0: off)
    [network]
    port_isolation = true
    [gpus]
    driver_sync = "runtime"              # none, runtime (LXD's nvidia.runtime) or installer
    installer_dir = "/nas/nvidia"        # NVIDIA-Linux-x86_64-<version>.run files (installer)
    [monitor]                            # the node agents' load API and the dashboard
    agent_port = 9101                    # [servers.X] agent = "http://HOST:PORT" overrides
    token_file = "/etc/lxcgpu/monitor.token"
    idle_utilization = 5                 # % under which a GPU holding memory may be idle
    idle_minutes = 30
    disks = ["/"]
    public = false                       # the dashboard without login (a wall screen)
    [hub]                                # needed once a GPU server is remote
    url = "https://hub.lab.example.org"  # the hub as containers on remote servers reach it
    address = "192.0.2.10"               # the hub's address as GPU servers see it

The servers' order is the order users see them in; the first is the default.
A file without ``[servers]`` may name the one server of a one-machine lab
the older way, ``[server] name = "gpu17"`` (and ``lxd``); without either,
the one server is this machine's local LXD under its short hostname.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping
from urllib.parse import urlparse

from . import naming, portmap
from .container import IDMAP_BLOCK, IDMAP_USER_FIRST, IDMAP_USER_LAST, ContainerSpec, Mount
from .portmap import check_port_ranges
from .sitedefaults import DEFAULT_STORE_URL

if TYPE_CHECKING:
    from .store import Store

DEFAULT_PATH = "/etc/lxcgpu/lxcgpu.toml"
#: How a container's NVIDIA userspace driver follows the host's (lxcspawner.driversync).
DRIVER_SYNC_MODES = ("none", "runtime", "installer")
ENV_VAR = "LXCGPU_CONFIG"


class SettingsError(ValueError):
    """The settings file is missing, unreadable or wrong; the message says where."""


def default_server_name() -> str:
    """This machine's short hostname, lower-cased."""
    return socket.gethostname().split(".", 1)[0].lower()


@dataclass(frozen=True)
class GPUServer:
    """One GPU server of the site: how the hub reaches its LXD, and where
    users reach it over SSH."""

    name: str
    lxd: str | None = None           # unix socket path or https://HOST:PORT; None: local socket
    project: str | None = None       # LXD project; None: LXD's default
    client_cert: str | None = None   # HTTPS: the hub's client certificate and key
    client_key: str | None = None
    server_cert: str | None = None   # HTTPS: the server's certificate, pinned
    address: str | None = None       # the host users SSH to; None: the name
    agent: str | None = None         # its node agent's load API, http://HOST:PORT (see agent_url)
    driver_sync: str | None = None   # none, runtime or installer; None: [gpus] driver_sync

    def __post_init__(self):
        naming.check_server_name(self.name)
        for attr in ("lxd", "project", "client_cert", "client_key", "server_cert", "address",
                     "agent"):
            v = getattr(self, attr)
            if v is not None and (not isinstance(v, str) or not v or v != v.strip()):
                raise ValueError(f"GPU server {self.name}: {attr} must be a non-empty string")
        if self.driver_sync is not None and self.driver_sync not in DRIVER_SYNC_MODES:
            raise ValueError(f"GPU server {self.name}: driver_sync {self.driver_sync!r}: one "
                             f"of {', '.join(DRIVER_SYNC_MODES)}")
        if self.agent is not None:
            url = urlparse(self.agent)
            try:
                port = url.port
            except ValueError:
                port = None
            if url.scheme != "http" or not url.hostname or not port \
                    or url.path not in ("", "/") or url.query or url.fragment:
                raise ValueError(f"GPU server {self.name}: agent {self.agent!r} must be "
                                 "http://HOST:PORT (its node agent's load API)")
        certs = (self.client_cert, self.client_key, self.server_cert)
        if self.remote:
            if not self.lxd.startswith("https://") or len(self.lxd) <= len("https://"):
                raise ValueError(f"GPU server {self.name}: lxd {self.lxd!r} must be a unix "
                                 "socket path or https://HOST:PORT")
            missing = [k for k, v in zip(("client_cert", "client_key", "server_cert"), certs)
                       if v is None]
            if missing:
                raise ValueError(f"GPU server {self.name}: LXD over HTTPS needs "
                                 f"{', '.join(missing)} (the hub's client certificate and key, "
                                 "and the server's certificate to pin; docs/admin.md section 6)")
        elif any(v is not None for v in certs):
            raise ValueError(f"GPU server {self.name}: client_cert, client_key and "
                             "server_cert are for LXD over https:// only")
        if self.project is not None and not naming.is_valid_lxd_name(self.project):
            raise ValueError(f"GPU server {self.name}: project {self.project!r} is not an "
                             "LXD project name")

    @property
    def remote(self) -> bool:
        """Whether its LXD is reached over the network (not a local socket)."""
        return self.lxd is not None and not self.lxd.startswith("/")

    @property
    def ssh_host(self) -> str:
        """The host name users give ssh for this server."""
        return self.address or self.name

    def open_lxd(self, **kwargs: Any):
        """An LXD client for this server (certificates pinned over HTTPS)."""
        from .lxd import LXD

        cert = (self.client_cert, self.client_key) if self.client_cert else None
        return LXD(self.lxd, cert=cert, verify=self.server_cert or True,
                   project=self.project, **kwargs)


@dataclass(frozen=True)
class Settings:
    """The site's settings; see the module docstring for the file layout."""

    store_url: str = DEFAULT_STORE_URL
    first_id_block: int = 0          # users' id blocks start at this block index
    ssh_ports: tuple[int, int] = portmap.SSH_PORTS
    forward_ports: tuple[int, int] = portmap.FORWARD_PORTS
    forward_limit: int = portmap.FORWARD_LIMIT
    jupyter_ports: tuple[int, int] = portmap.JUPYTER_PORTS
    # The GPU servers, in the order users see them; the first is the default.
    # Empty: one server, ``server`` (default: the short hostname) on ``lxd``.
    servers: tuple[GPUServer, ...] = ()
    server: str | None = None        # the default server's name (None: the first)
    lxd: str | None = None           # the one-server form's LXD endpoint
    instance_prefix: str = ""
    image: str = "lxcgpu/default"
    profiles: tuple[str, ...] = ("lxcgpu",)
    cpu: str | None = None           # None: unlimited
    memory: str | None = None
    processes: int | None = None
    mounts: tuple[Mount, ...] = ()
    # LXD's security.port_isolation on containers' NICs: containers on one
    # bridge cannot reach each other directly (docs/security.md).
    port_isolation: bool = True
    # How containers on remote GPU servers reach the hub (its public URL: the
    # hub API through the proxy, over HTTPS), and the hub's address as the
    # GPU servers see it (only it reaches users' Jupyter ports there).
    hub_url: str | None = None
    hub_address: str | None = None
    # Prebuilt containers kept ready on each GPU server for new users' first
    # spawns (lxcspawner.pool); 0 turns the pool off.
    pool_size: int = 2
    # keyportal: snapshots a user may keep of each container.
    snapshot_limit: int = 10
    # keyportal: where users' exports (LXD backups) are written, e.g. the
    # lab's NAS; None: exports are off.
    export_dir: str | None = None
    # GPUs: how a container's NVIDIA userspace driver follows the host's
    # (lxcspawner.driversync), and where the installers are.
    driver_sync: str = "none"
    installer_dir: str | None = None
    # monitor: the node agents' load API and the dashboard.
    agent_port: int = 9101           # each agent's port (where [servers.X] agent is not set)
    monitor_token_file: str = "/etc/lxcgpu/monitor.token"   # shared by agents and dashboard
    idle_utilization: int = 5        # percent: under it, with memory held, a GPU may be idle
    idle_minutes: int = 30           # ... for this long: marked idle
    monitor_disks: tuple[str, ...] = ("/",)
    monitor_public: bool = False     # the dashboard without login (read-only, no process ids)
    history_minutes: int = 60        # the dashboard's memory of each server
    poll_seconds: float = 3.0        # how often the dashboard asks each agent
    source: str | None = field(default=None, compare=False)  # the file, for messages

    def __post_init__(self):
        if not self.store_url or not isinstance(self.store_url, str):
            raise ValueError("store url must be a non-empty string")
        for what, rng in (("ssh", self.ssh_ports), ("forward", self.forward_ports),
                          ("jupyter", self.jupyter_ports)):
            if (not isinstance(rng, tuple) or len(rng) != 2
                    or not all(_is_int(p) for p in rng) or not 1 <= rng[0] <= rng[1] <= 65535):
                raise ValueError(f"{what} port range {rng!r}: need (low, high) in 1..65535")
        last_block = (IDMAP_USER_LAST - IDMAP_USER_FIRST) // IDMAP_BLOCK
        if not _is_int(self.first_id_block) or not 0 <= self.first_id_block <= last_block:
            raise ValueError(f"first_id_block {self.first_id_block!r}: need 0..{last_block}")
        check_port_ranges(self.ssh_ports, self.forward_ports, self.jupyter_ports)
        self._check_hub()
        if not _is_int(self.forward_limit) or self.forward_limit < 0:
            raise ValueError("forward_limit must be a whole number >= 0")
        if not _is_int(self.pool_size) or not 0 <= self.pool_size <= 50:
            raise ValueError(f"[containers] pool {self.pool_size!r}: a whole number 0..50 "
                             "(prebuilt containers per GPU server; 0 turns them off)")
        if not _is_int(self.snapshot_limit) or self.snapshot_limit < 0:
            raise ValueError("[portal] snapshot_limit must be a whole number >= 0")
        if self.export_dir is not None and not (isinstance(self.export_dir, str)
                                                and self.export_dir.startswith("/")):
            raise ValueError(f"[portal] export_dir {self.export_dir!r}: an absolute path")
        self._check_monitor()
        if self.driver_sync not in DRIVER_SYNC_MODES:
            raise ValueError(f"[gpus] driver_sync {self.driver_sync!r}: one of "
                             f"{', '.join(DRIVER_SYNC_MODES)}")
        if self.installer_dir is not None and not (isinstance(self.installer_dir, str)
                                                   and self.installer_dir.startswith("/")):
            raise ValueError(f"[gpus] installer_dir {self.installer_dir!r}: an absolute path")
        self._settle_servers()
        if self.instance_prefix and not naming.is_kept(self.instance_prefix, 16):
            raise ValueError(f"instance prefix {self.instance_prefix!r}: up to 16 lowercase "
                             "letters, digits and single hyphens, starting with a letter")
        if not self.image or not isinstance(self.image, str):
            raise ValueError("image must be a non-empty image alias")
        if not isinstance(self.profiles, tuple) or not all(
                isinstance(p, str) and p for p in self.profiles):
            raise ValueError("profiles must be a list of profile names")
        if not isinstance(self.port_isolation, bool):
            raise ValueError("port_isolation must be true or false")
        if not all(isinstance(m, Mount) for m in self.mounts):
            raise ValueError("mounts must be Mount objects")
        # The limits and mounts are checked by the one place that owns them.
        self.container_spec("settings-check", IDMAP_USER_FIRST)

    def _check_monitor(self) -> None:
        if not _is_int(self.agent_port) or not 1 <= self.agent_port <= 65535:
            raise ValueError(f"[monitor] agent_port {self.agent_port!r}: a port, 1-65535")
        if not isinstance(self.monitor_token_file, str) \
                or not self.monitor_token_file.startswith("/"):
            raise ValueError(f"[monitor] token_file {self.monitor_token_file!r}: an absolute "
                             "path")
        if not _is_int(self.idle_utilization) or not 0 <= self.idle_utilization <= 100:
            raise ValueError("[monitor] idle_utilization: a percentage, 0-100")
        if not _is_int(self.idle_minutes) or self.idle_minutes < 1:
            raise ValueError("[monitor] idle_minutes: a whole number of minutes, at least 1")
        if not isinstance(self.monitor_disks, tuple) or not all(
                isinstance(d, str) and d.startswith("/") for d in self.monitor_disks):
            raise ValueError("[monitor] disks: a list of absolute paths")
        if not isinstance(self.monitor_public, bool):
            raise ValueError("[monitor] public must be true or false")
        if not _is_int(self.history_minutes) or not 1 <= self.history_minutes <= 24 * 60:
            raise ValueError("[monitor] history_minutes: 1 to 1440")
        if not isinstance(self.poll_seconds, (int, float)) or isinstance(self.poll_seconds, bool) \
                or not 0.5 <= self.poll_seconds <= 600:
            raise ValueError("[monitor] poll_seconds: 0.5 to 600")

    def driver_sync_for(self, server: str | None = None) -> str:
        """How GPU server ``server`` keeps containers' NVIDIA driver in step:
        its own ``driver_sync``, else ``[gpus] driver_sync`` (also for a name
        the site does not list)."""
        name = server or self.server
        own = next((g.driver_sync for g in self.servers if g.name == name), None)
        return own or self.driver_sync

    def agent_url(self, server: str | None = None) -> str:
        """Where the node agent of GPU server ``server`` serves its load API:
        its ``agent`` setting, else ``http://127.0.0.1:<agent_port>`` for
        this machine's LXD and ``http://<its LXD host>:<agent_port>`` for a
        remote one."""
        g = self.gpu_server(server)
        if g.agent:
            return g.agent.rstrip("/")
        host = urlparse(g.lxd).hostname if g.remote else "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.agent_port}"

    def monitor_token(self) -> str:
        """The shared secret of the agents' load API (``[monitor] token_file``:
        root's, not readable by others); SettingsError saying what is wrong."""
        path = Path(self.monitor_token_file)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise SettingsError(f"the monitor token file {path} does not exist: setup/hub "
                                "makes it on the hub host; copy it to each GPU server "
                                "(docs/admin.md section 2.7)") from None
        except OSError as e:
            raise SettingsError(f"the monitor token file {path}: {e.strerror or e}") from None
        with os.fdopen(fd) as f:
            if os.fstat(f.fileno()).st_mode & 0o077:
                raise SettingsError(f"the monitor token file {path} is readable by others: "
                                    f"chmod 600 {path}")
            token = f.read().strip()
        if len(token) < 32 or not token.isprintable() or " " in token:
            raise SettingsError(f"the monitor token file {path} must hold one token of at "
                                "least 32 characters")
        return token

    def _check_hub(self) -> None:
        if self.hub_url is not None:
            url = urlparse(self.hub_url) if isinstance(self.hub_url, str) else None
            if url is None or url.scheme not in ("http", "https") or not url.hostname \
                    or url.path not in ("", "/") or url.query or url.fragment:
                raise ValueError(f"[hub] url {self.hub_url!r}: the hub's public URL, such as "
                                 "https://hub.lab.example.org or https://192.0.2.10:8000")
        if self.hub_address is not None:
            try:
                ipaddress.IPv4Address(self.hub_address)
            except (ipaddress.AddressValueError, ValueError):
                raise ValueError(f"[hub] address {self.hub_address!r}: the hub's IPv4 address "
                                 "as the GPU servers see it, such as 192.0.2.10") from None

    def hub_for_remote(self, server: str) -> str:
        """The hub's URL that containers on remote GPU server ``server`` call
        (the hub's address must be set too, for that server's node agent);
        SettingsError saying what to set where either is missing."""
        missing = [k for k, v in (("url", self.hub_url), ("address", self.hub_address))
                   if v is None]
        if missing:
            where = self.source or DEFAULT_PATH
            raise SettingsError(f"Jupyter on {server}, a GPU server the hub reaches over the "
                                f"network, needs [hub] {' and '.join(missing)} in {where} "
                                "(docs/admin.md section 6)")
        return self.hub_url.rstrip("/")

    def _settle_servers(self) -> None:
        servers = self.servers
        if not isinstance(servers, tuple) or not all(isinstance(g, GPUServer) for g in servers):
            raise ValueError("servers must be a tuple of GPUServer")
        if not servers:
            name = self.server or default_server_name()
            try:
                naming.check_server_name(name)
            except ValueError as e:
                hint = ("; it is this machine's short hostname: name the GPU server in a "
                        "[servers.<name>] table") if self.server is None else ""
                raise ValueError(f"{e}{hint}") from None
            if self.lxd is not None and not (isinstance(self.lxd, str)
                                             and self.lxd.startswith("/")):
                raise ValueError(f"[server] lxd {self.lxd!r}: a unix socket path; a GPU "
                                 "server over HTTPS is a [servers.<name>] table with its "
                                 "certificates")
            servers = (GPUServer(name, self.lxd),)
        elif self.lxd is not None:
            raise ValueError("give each GPU server's LXD in its [servers.<name>] table, "
                             "not in [server]")
        names = [g.name for g in servers]
        if len(set(names)) != len(names):
            raise ValueError(f"GPU server names repeat: {', '.join(names)}")
        server = self.server or names[0]
        if server not in names:
            raise ValueError(f"default server {server!r} is not one of the GPU servers "
                             f"({', '.join(names)})")
        object.__setattr__(self, "servers", servers)
        object.__setattr__(self, "server", server)

    @property
    def server_names(self) -> tuple[str, ...]:
        return tuple(g.name for g in self.servers)

    def gpu_server(self, name: str | None = None) -> GPUServer:
        """The GPU server called ``name`` (default: the default server);
        SettingsError naming the known ones if there is none."""
        name = name or self.server
        try:
            naming.check_server_name(name)
        except ValueError as e:
            raise SettingsError(str(e)) from None
        for g in self.servers:
            if g.name == name:
                return g
        where = (f"in {self.source}" if self.source
                 else f"there is no {DEFAULT_PATH}: only this machine")
        raise SettingsError(f"unknown GPU server {name!r}: this site's servers are "
                            f"{', '.join(self.server_names)} ({where})")

    # ------------------------------------------------------------ reading

    @classmethod
    def load(cls, path: str | os.PathLike | None = None,
             environ: Mapping[str, str] | None = None) -> "Settings":
        """Read the settings file: ``path``, else ``$LXCGPU_CONFIG``, else
        the default file (whose absence means all defaults)."""
        environ = os.environ if environ is None else environ
        explicit = path is not None or bool(environ.get(ENV_VAR))
        path = Path(path if path is not None else (environ.get(ENV_VAR) or DEFAULT_PATH))
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            if explicit:
                raise SettingsError(f"settings file {path} does not exist") from None
            return cls()
        except tomllib.TOMLDecodeError as e:
            raise SettingsError(f"{path}: not valid TOML: {e}") from None
        except OSError as e:
            raise SettingsError(f"{path}: cannot read: {e.strerror or e}") from None
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "settings") -> "Settings":
        """Settings from a parsed TOML document; errors name ``source`` and the key."""
        kw: dict[str, Any] = {"source": source}

        def fail(msg: str) -> SettingsError:
            return SettingsError(f"{source}: {msg}")

        unknown = sorted(set(data) - set(_SCHEMA) - {"servers"})
        if unknown:
            raise fail(f"unknown section [{unknown[0]}] "
                       f"(known: {', '.join([*_SCHEMA, 'servers'])})")
        if "servers" in data:
            if "server" in data:
                raise fail("[server] is the one-server form: with [servers.<name>] tables, "
                           "list every GPU server there and drop [server]")
            kw["servers"] = _servers(data["servers"], fail)
        for section, keys in _SCHEMA.items():
            table = _table(data.get(section, {}), section, keys, fail)
            for key, (attr, convert) in keys.items():
                if key not in table:
                    continue
                try:
                    kw[attr] = convert(table[key])
                except (TypeError, ValueError) as e:
                    raise fail(f"[{section}] {key}: {e}") from None
        try:
            return cls(**kw)
        except (TypeError, ValueError) as e:
            raise fail(str(e)) from None

    # ------------------------------------------------------------ using

    def container_spec(self, user: str, idmap_base: int, *, server: str | None = None,
                       **overrides: Any) -> ContainerSpec:
        """The ContainerSpec of ``user``'s container on ``server`` (default: this
        server) from these settings; ``overrides`` replace ContainerSpec fields."""
        fields = {
            "image": self.image, "profiles": self.profiles, "prefix": self.instance_prefix,
            "cpu": self.cpu, "memory": self.memory, "processes": self.processes,
            "mounts": self.mounts,
            "nvidia_runtime": self.driver_sync_for(server) == "runtime",
        }
        for k in ("user", "server", "idmap_base"):
            if k in overrides:
                raise TypeError(f"{k} is not an override")
        fields.update(overrides)
        return ContainerSpec(user=user, server=server or self.server, idmap_base=idmap_base,
                             **fields)

    def open_store(self, **kwargs: Any) -> Store:
        """A Store built from these settings; ``kwargs`` go to Store (tests
        pass ``idmap_first``/``idmap_last``/``subuid_file`` there)."""
        kwargs.setdefault("idmap_first", IDMAP_USER_FIRST + self.first_id_block * IDMAP_BLOCK)
        kwargs.setdefault("ssh_ports", self.ssh_ports)
        kwargs.setdefault("forward_ports", self.forward_ports)
        kwargs.setdefault("forward_limit", self.forward_limit)
        kwargs.setdefault("jupyter_ports", self.jupyter_ports)
        # Imported here: the node agent reads these settings, never the store
        # (SQLAlchemy and Alembic would double its memory).
        from .store import Store

        return Store(self.store_url, **kwargs)

    def open_lxd(self, server: str | None = None, **kwargs: Any):
        """An LXD client for GPU server ``server`` (default: the default server)."""
        return self.gpu_server(server).open_lxd(**kwargs)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _typed(kind: type | tuple[type, ...], what: str):
    def check(v):
        if not isinstance(v, kind) or isinstance(v, bool) and kind is not bool:
            raise TypeError(f"must be {what}, not {type(v).__name__} {v!r}")
        return v
    return check


def _str(v) -> str:
    return _typed(str, "a string")(v)


def _int(v) -> int:
    return _typed(int, "an integer")(v)


def _range(v) -> tuple[int, int]:
    return portmap.parse_port_range(_typed(str, 'a range string such as "22000-29999"')(v))


def _str_list(v) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise TypeError(f"must be a list of strings, not {v!r}")
    return tuple(v)


def _seconds(v) -> float:
    return float(_typed((int, float), "a number of seconds")(v))


def _bool(v) -> bool:
    return _typed(bool, "true or false")(v)


def _cpu(v) -> str:
    # TOML lets people write `cpu = 8`; LXD wants the string.
    return str(_typed((int, str), 'an integer or a CPU list such as "0-7"')(v))


def _mounts(v) -> tuple[Mount, ...]:
    return tuple(Mount.parse(m) for m in _str_list(v))


# the keys of a [servers.<name>] table (GPUServer's fields)
_SERVER_KEYS = ("lxd", "project", "client_cert", "client_key", "server_cert", "address",
                "agent", "driver_sync")


def _table(table, section: str, known, fail) -> Mapping:
    """``table`` if it is a TOML table holding only ``known`` keys."""
    if not isinstance(table, Mapping):
        raise fail(f"[{section}] must be a table")
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise fail(f"unknown key {unknown[0]!r} in [{section}] (known: {', '.join(known)})")
    return table


def _servers(tables, fail) -> tuple[GPUServer, ...]:
    if not isinstance(tables, Mapping) or not tables:
        raise fail("[servers] must hold one [servers.<name>] table per GPU server")
    out = []
    for name, table in tables.items():
        table = _table(table, f"servers.{name}", _SERVER_KEYS, fail)
        try:
            out.append(GPUServer(name, **{k: _str(v) for k, v in table.items()}))
        except (TypeError, ValueError) as e:
            raise fail(f"[servers.{name}]: {e}") from None
    return tuple(out)


# section -> key -> (Settings attribute, converter)
_SCHEMA: dict[str, dict[str, tuple[str, Any]]] = {
    "store": {"url": ("store_url", _str), "first_id_block": ("first_id_block", _int)},
    "ports": {"ssh": ("ssh_ports", _range), "forward": ("forward_ports", _range),
              "forward_limit": ("forward_limit", _int),
              "jupyter": ("jupyter_ports", _range)},
    "server": {"name": ("server", _str), "lxd": ("lxd", _str)},
    "containers": {"prefix": ("instance_prefix", _str), "image": ("image", _str),
                   "profiles": ("profiles", _str_list), "cpu": ("cpu", _cpu),
                   "memory": ("memory", _str), "processes": ("processes", _int),
                   "mounts": ("mounts", _mounts), "pool": ("pool_size", _int)},
    "network": {"port_isolation": ("port_isolation", _bool)},
    "hub": {"url": ("hub_url", _str), "address": ("hub_address", _str)},
    "portal": {"snapshot_limit": ("snapshot_limit", _int), "export_dir": ("export_dir", _str)},
    "gpus": {"driver_sync": ("driver_sync", _str), "installer_dir": ("installer_dir", _str)},
    "monitor": {"agent_port": ("agent_port", _int), "token_file": ("monitor_token_file", _str),
                "idle_utilization": ("idle_utilization", _int),
                "idle_minutes": ("idle_minutes", _int), "disks": ("monitor_disks", _str_list),
                "public": ("monitor_public", _bool),
                "history_minutes": ("history_minutes", _int),
                "poll_seconds": ("poll_seconds", _seconds)},
}
