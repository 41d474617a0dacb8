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
    [server]
    name = "gpu17"
    lxd = "/var/lib/lxd/unix.socket"
    [containers]
    prefix = ""
    image = "lxcgpu/default"
    profiles = ["lxcgpu"]
    cpu = 8
    memory = "64GiB"
    processes = 4096
    mounts = ["/data:/data:ro"]
    [network]
    port_isolation = true
"""

from __future__ import annotations

import os
import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from . import naming, store
from .container import IDMAP_BLOCK, IDMAP_USER_FIRST, IDMAP_USER_LAST, ContainerSpec, Mount

DEFAULT_PATH = "/etc/lxcgpu/lxcgpu.toml"
ENV_VAR = "LXCGPU_CONFIG"


class SettingsError(ValueError):
    """The settings file is missing, unreadable or wrong; the message says where."""


def default_server_name() -> str:
    """This machine's short hostname, lower-cased."""
    return socket.gethostname().split(".", 1)[0].lower()


@dataclass(frozen=True)
class Settings:
    """The site's settings; see the module docstring for the file layout."""

    store_url: str = store.DEFAULT_URL
    first_id_block: int = 0          # users' id blocks start at this block index
    ssh_ports: tuple[int, int] = store.SSH_PORTS
    forward_ports: tuple[int, int] = store.FORWARD_PORTS
    forward_limit: int = store.FORWARD_LIMIT
    server: str = field(default_factory=default_server_name)
    lxd: str | None = None           # LXD endpoint; None: the local socket
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
    source: str | None = field(default=None, compare=False)  # the file, for messages

    def __post_init__(self):
        if not self.store_url or not isinstance(self.store_url, str):
            raise ValueError("store url must be a non-empty string")
        for what, rng in (("ssh", self.ssh_ports), ("forward", self.forward_ports)):
            if (not isinstance(rng, tuple) or len(rng) != 2
                    or not all(_is_int(p) for p in rng) or not 1 <= rng[0] <= rng[1] <= 65535):
                raise ValueError(f"{what} port range {rng!r}: need (low, high) in 1..65535")
        last_block = (IDMAP_USER_LAST - IDMAP_USER_FIRST) // IDMAP_BLOCK
        if not _is_int(self.first_id_block) or not 0 <= self.first_id_block <= last_block:
            raise ValueError(f"first_id_block {self.first_id_block!r}: need 0..{last_block}")
        (a, b), (c, d) = self.ssh_ports, self.forward_ports
        if a <= d and c <= b:
            raise ValueError(f"ssh ports {a}-{b} overlap forward ports {c}-{d}")
        if not _is_int(self.forward_limit) or self.forward_limit < 0:
            raise ValueError("forward_limit must be a whole number >= 0")
        if not isinstance(self.server, str) or not naming.is_valid_lxd_name(self.server) \
                or self.server != self.server.lower():
            raise ValueError(
                f"server name {self.server!r} is not a lowercase hostname label "
                "(letters, digits, inner hyphens, starting with a letter): "
                "set [server] name")
        if self.lxd is not None and not (
                isinstance(self.lxd, str)
                and (self.lxd.startswith("/") or self.lxd.startswith("https://"))):
            raise ValueError(f"lxd endpoint {self.lxd!r}: a unix socket path or https://HOST:PORT")
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

        unknown = sorted(set(data) - set(_SCHEMA))
        if unknown:
            raise fail(f"unknown section [{unknown[0]}] (known: {', '.join(_SCHEMA)})")
        for section, keys in _SCHEMA.items():
            table = data.get(section, {})
            if not isinstance(table, Mapping):
                raise fail(f"[{section}] must be a table")
            unknown = sorted(set(table) - set(keys))
            if unknown:
                raise fail(f"unknown key {unknown[0]!r} in [{section}] "
                           f"(known: {', '.join(keys)})")
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
        }
        for k in ("user", "server", "idmap_base"):
            if k in overrides:
                raise TypeError(f"{k} is not an override")
        fields.update(overrides)
        return ContainerSpec(user=user, server=server or self.server, idmap_base=idmap_base,
                             **fields)

    def open_store(self, **kwargs: Any) -> store.Store:
        """A Store built from these settings; ``kwargs`` go to Store (tests
        pass ``idmap_first``/``idmap_last``/``subuid_file`` there)."""
        kwargs.setdefault("idmap_first", IDMAP_USER_FIRST + self.first_id_block * IDMAP_BLOCK)
        kwargs.setdefault("ssh_ports", self.ssh_ports)
        kwargs.setdefault("forward_ports", self.forward_ports)
        kwargs.setdefault("forward_limit", self.forward_limit)
        return store.Store(self.store_url, **kwargs)

    def open_lxd(self, **kwargs: Any):
        """An LXD client for ``[server] lxd`` (the local socket by default)."""
        from .lxd import LXD

        return LXD(self.lxd, **kwargs)


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
    return store.parse_port_range(_typed(str, 'a range string such as "22000-29999"')(v))


def _str_list(v) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise TypeError(f"must be a list of strings, not {v!r}")
    return tuple(v)


def _bool(v) -> bool:
    return _typed(bool, "true or false")(v)


def _cpu(v) -> str:
    # TOML lets people write `cpu = 8`; LXD wants the string.
    return str(_typed((int, str), 'an integer or a CPU list such as "0-7"')(v))


def _mounts(v) -> tuple[Mount, ...]:
    return tuple(Mount.parse(m) for m in _str_list(v))


# section -> key -> (Settings attribute, converter)
_SCHEMA: dict[str, dict[str, tuple[str, Any]]] = {
    "store": {"url": ("store_url", _str), "first_id_block": ("first_id_block", _int)},
    "ports": {"ssh": ("ssh_ports", _range), "forward": ("forward_ports", _range),
              "forward_limit": ("forward_limit", _int)},
    "server": {"name": ("server", _str), "lxd": ("lxd", _str)},
    "containers": {"prefix": ("instance_prefix", _str), "image": ("image", _str),
                   "profiles": ("profiles", _str_list), "cpu": ("cpu", _cpu),
                   "memory": ("memory", _str), "processes": ("processes", _int),
                   "mounts": ("mounts", _mounts)},
    "network": {"port_isolation": ("port_isolation", _bool)},
}
