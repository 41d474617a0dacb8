"""The port maps a container asks for, kept in its LXD config.

LXD is where the truth about a server's NAT lives (ARCHITECTURE.md): each
container carries, in ``user.lxcgpu.*`` keys, the host ports it owns —

- ``user.lxcgpu.ssh-port = 22031``: the owner's SSH port, mapped to the
  container's port 22;
- ``user.lxcgpu.forward.11003 = 8080``: one key per port forward, host port
  in the key, container port in the value (TCP);
- ``user.lxcgpu.jupyter.20040 = 8888`` and ``user.lxcgpu.jupyter.20041 =
  8889``: the owner's Jupyter ports (their default server's and a named
  server's), for a hub that reaches this server over the network; mapped
  for connections from the hub's address only (``[hub] address``).

The store allocates the numbers; the spawner and the portal write them here
whenever they change; the node agent on the server reads them back, with the
address lxcgpu pinned on the container's NIC (never one the container
reports, see lxcspawner.network), into DNAT rules.  Nothing else is needed to
rebuild a server's rules after a reboot.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from .naming import KEY_PREFIX
from .network import Bridge, assigned_ipv4

log = logging.getLogger("lxcspawner.portmap")

SSH_PORTS = (22000, 29999)        # each user's SSH port, the same on every server
FORWARD_PORTS = (11000, 11999)    # forwarded host ports, per server
JUPYTER_PORTS = (20000, 21999)    # each user's pair of Jupyter ports, the same on every server
#: Port forwards a user may hold (the site's [ports] forward_limit by default).
FORWARD_LIMIT = 10
SSH_PORT_KEY = KEY_PREFIX + "ssh-port"
FORWARD_PREFIX = KEY_PREFIX + "forward."
JUPYTER_PREFIX = KEY_PREFIX + "jupyter."
SSH_CONTAINER_PORT = 22
# Where Jupyter listens in a container: the default server, then a named
# server (both may run in one container).
JUPYTER_CONTAINER_PORTS = (8888, 8889)


@dataclass(frozen=True, order=True)
class PortMap:
    """One DNAT: ``host_port`` on the server to ``address:port`` in ``instance``."""

    host_port: int
    address: str
    port: int
    instance: str = ""
    source: str = ""    # only connections from this IPv4 address; "": from anywhere


_RANGE = re.compile(r"^\s*([0-9]{1,5})\s*-\s*([0-9]{1,5})\s*$")


def parse_port_range(text: str) -> tuple[int, int]:
    """``"22000-29999"`` -> ``(22000, 29999)``; ports 1..65535, low <= high."""
    m = _RANGE.fullmatch(text) if isinstance(text, str) else None
    if m is None:
        raise ValueError(f"Port range {text!r} should look like 22000-29999.")
    lo, hi = int(m[1]), int(m[2])
    if not 1 <= lo <= hi <= 65535:
        raise ValueError(f"Port range {text!r} should be ports from 1 to 65535, low to high.")
    return lo, hi


def check_port_ranges(ssh: tuple[int, int], forward: tuple[int, int],
                      jupyter: tuple[int, int]) -> None:
    """ValueError with a sentence if the ranges overlap, or if the Jupyter
    range holds no pair; the store and the site settings both ask."""
    ranges = {"SSH": ssh, "forward": forward, "Jupyter": jupyter}
    names = list(ranges)
    for i, x in enumerate(names):
        for y in names[i + 1:]:
            (a, b), (c, d) = ranges[x], ranges[y]
            if a <= d and c <= b:
                raise ValueError(f"The {x} port range {a}-{b} and the {y} port range "
                                 f"{c}-{d} overlap.")
    if jupyter[1] == jupyter[0]:
        raise ValueError(f"The Jupyter port range {jupyter[0]}-{jupyter[1]} needs room for "
                         "at least one pair of ports (a pair per user).")


def _port(value: object) -> int:
    text = str(value).strip()
    if not text.isascii() or not text.isdigit():
        raise ValueError(f"not a port number: {value!r}")
    port = int(text)
    if not 1 <= port <= 65535:
        raise ValueError(f"port out of range 1-65535: {port}")
    return port


def _ours(key: str) -> bool:
    return key == SSH_PORT_KEY or key.startswith((FORWARD_PREFIX, JUPYTER_PREFIX))


def wanted_ports(config: Mapping[str, str]) -> dict[int, tuple[int, bool]]:
    """Host port -> (container port, for the hub only), as a container's
    config asks.

    A malformed key or value is logged and skipped: one bad entry written by
    hand must not take the other containers' SSH down with it.
    """
    ports: dict[int, tuple[int, bool]] = {}
    for key, value in config.items():
        try:
            if key == SSH_PORT_KEY:
                ports[_port(value)] = (SSH_CONTAINER_PORT, False)
            elif key.startswith(FORWARD_PREFIX):
                ports[_port(key[len(FORWARD_PREFIX):])] = (_port(value), False)
            elif key.startswith(JUPYTER_PREFIX):
                ports[_port(key[len(JUPYTER_PREFIX):])] = (_port(value), True)
        except ValueError as e:
            log.warning("ignoring %s=%r: %s", key, value, e)
    return ports


def jupyter_host_port(first_port: int, container_port: int) -> int:
    """The host port of a user's pair that leads to ``container_port``."""
    return first_port + JUPYTER_CONTAINER_PORTS.index(container_port)


def jupyter_maps(first_port: int | None) -> dict[int, int]:
    """A user's Jupyter host ports -> the container's Jupyter ports."""
    if first_port is None:
        return {}
    return {jupyter_host_port(first_port, port): port for port in JUPYTER_CONTAINER_PORTS}


def config_changes(config: Mapping[str, str], ssh_port: int | None,
                   forwards: Mapping[int, int],
                   jupyter: Mapping[int, int] | None = None) -> dict[str, str | None]:
    """The smallest config update that makes ``config`` ask for exactly this
    SSH port, these forwards and these Jupyter ports (``None`` deletes a
    key); empty if nothing changes."""
    want = {}
    if ssh_port is not None:
        want[SSH_PORT_KEY] = str(_port(ssh_port))
    for prefix, ports in ((FORWARD_PREFIX, forwards), (JUPYTER_PREFIX, jupyter or {})):
        for host_port, port in ports.items():
            want[f"{prefix}{_port(host_port)}"] = str(_port(port))
    changes: dict[str, str | None] = {k: None for k in config if _ours(k) and k not in want}
    changes.update({k: v for k, v in want.items() if config.get(k) != v})
    return changes


def maps_for(instances: Iterable[Mapping], bridges: Mapping[str, Bridge],
             allowed: Sequence[tuple[int, int]] | None = None,
             hub_address: str | None = None) -> list[PortMap]:
    """The DNAT rules a server needs, from its instances' records (LXD's
    ``/1.0/instances?recursion=1``: config, devices, status; never the far
    costlier state): one per wanted port of each running
    container, to the address lxcgpu pinned on its NIC inside one of
    ``bridges`` (name -> Bridge); nothing for the others.  What a container
    reports about its own addresses is never read.

    Host ports outside ``allowed`` (ranges, inclusive) are refused and logged:
    a config edited by hand must never take over the server's own SSH port.

    Jupyter ports are mapped for connections from ``hub_address`` only, and
    not at all without one.

    Two containers claiming the same host port (a config edited by hand, a
    copied container) are both reported in the log; the first by name wins,
    so the outcome never depends on the order LXD lists them in.
    """
    # Here, not at the top: the store reads this module's ranges without pylxd.
    from .lxd import instance_status

    maps: dict[int, PortMap] = {}
    for inst in sorted(instances, key=lambda i: i.get("name", "")):
        name = inst.get("name", "")
        if instance_status(inst) != "running":
            continue
        wanted = wanted_ports(inst.get("config") or {})
        if not wanted:
            continue
        address = assigned_ipv4(inst, bridges)
        if not address:
            log.warning("%s asks for host ports but has no address pinned by lxcgpu on an "
                        "LXD bridge (a container made before lxcgpu pinned addresses: start "
                        "it once through lxcgpu); not mapped", name)
            continue
        for host_port, (port, hub_only) in sorted(wanted.items()):
            if hub_only and not hub_address:
                continue    # no hub reaches this server over the network
            if allowed is not None and not any(lo <= host_port <= hi for lo, hi in allowed):
                log.warning("%s asks for host port %d, outside the allowed ranges %s; "
                            "not mapped", name, host_port,
                            ", ".join(f"{lo}-{hi}" for lo, hi in allowed))
                continue
            if host_port in maps:
                log.warning("host port %d is claimed by %s and %s; keeping %s",
                            host_port, maps[host_port].instance, name, maps[host_port].instance)
                continue
            maps[host_port] = PortMap(host_port, address, port, name,
                                      hub_address if hub_only else "")
    return sorted(maps.values())
