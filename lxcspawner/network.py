"""Container addresses on a GPU server's LXD bridge, decided by lxcgpu.

A container's address is never what the container says it is.  lxcgpu
allocates one per (user, GPU server) in the store, from the bridge's subnet
minus its gateway and minus LXD's dynamic DHCP range (``ipv4.dhcp.ranges``,
which ``setup/lxdhost.py`` sets to the top quarter of the subnet), and pins it
on the container's NIC as ``ipv4.address``, where only LXD's API can change
it.  The same NIC carries LXD's own protections:

- ``security.mac_filtering`` and ``security.ipv4_filtering`` /
  ``security.ipv6_filtering``: the container can send only from its own MAC
  and its own address, so it cannot answer for a neighbour or the gateway;
- ``security.port_isolation`` (the site's ``[network] port_isolation``, on by
  default): containers on the bridge cannot reach each other directly.

Everything that routes traffic to a container (the node agent's DNAT rules,
the hub's proxy route) uses :func:`assigned_ipv4`: the address on the NIC in
LXD's own record, checked to lie inside its bridge's subnet.  A container that
adds, changes or removes addresses inside moves nothing.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from typing import Iterator, Mapping

NIC = "eth0"
# The port the hub API listens on at the bridge's address; the node agent
# lets containers reach the host there and nowhere else.
HUB_API_PORT_ENV = "LXCGPU_HUB_API_PORT"
HUB_API_PORT = 8081


def hub_api_port(environ: Mapping[str, str] | None = None) -> int:
    """The hub API's port: ``$LXCGPU_HUB_API_PORT``, else 8081."""
    text = (os.environ if environ is None else environ).get(HUB_API_PORT_ENV) or ""
    if not text:
        return HUB_API_PORT
    if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError(f"{HUB_API_PORT_ENV}={text!r} is not a port number (1-65535)")
    return int(text)


class NetworkError(ValueError):
    """The container's network is not one lxcgpu can assign addresses on."""


@dataclass(frozen=True)
class Bridge:
    """An LXD-managed bridge as lxcgpu uses it: its gateway interface and the
    ranges LXD's DHCP hands out dynamically (never allocated by lxcgpu)."""

    name: str
    gateway: ipaddress.IPv4Interface
    dynamic: tuple[tuple[ipaddress.IPv4Address, ipaddress.IPv4Address], ...] = ()

    @classmethod
    def from_lxd(cls, record: Mapping) -> "Bridge":
        """From LXD's ``/1.0/networks/<name>`` record."""
        name = str(record.get("name", ""))
        cfg = record.get("config") or {}
        if not record.get("managed") or record.get("type") != "bridge":
            raise NetworkError(f"network {name!r} is not a bridge managed by LXD")
        text = str(cfg.get("ipv4.address") or "")
        try:
            gateway = ipaddress.IPv4Interface(text)
        except ValueError:
            raise NetworkError(f"the LXD bridge {name} has no IPv4 subnet (ipv4.address is "
                               f"{text or 'unset'}); lxcgpu assigns containers' addresses "
                               "from it") from None
        if gateway.network.prefixlen > 29:
            raise NetworkError(f"the LXD bridge {name}'s subnet {gateway.network} is too small")
        return cls(name, gateway, parse_dhcp_ranges(str(cfg.get("ipv4.dhcp.ranges") or ""),
                                                    gateway.network))

    @property
    def network(self) -> ipaddress.IPv4Network:
        return self.gateway.network

    def holds(self, address: str | None) -> bool:
        """Whether ``address`` may be a container's: a host address of the
        subnet other than the gateway."""
        try:
            a = ipaddress.IPv4Address(address or "")
        except ValueError:
            return False
        net = self.network
        return (a in net and a not in (net.network_address, net.broadcast_address)
                and a != self.gateway.ip)

    def static_addresses(self) -> Iterator[str]:
        """The addresses lxcgpu may allocate, lowest first: the subnet's host
        addresses but the gateway and LXD's dynamic ranges."""
        for a in self.network.hosts():
            if a == self.gateway.ip or any(lo <= a <= hi for lo, hi in self.dynamic):
                continue
            yield str(a)


def parse_dhcp_ranges(text: str, network: ipaddress.IPv4Network
                      ) -> tuple[tuple[ipaddress.IPv4Address, ipaddress.IPv4Address], ...]:
    """LXD's ``ipv4.dhcp.ranges`` (``"A-B,C-D"``); empty means LXD hands out
    the whole subnet dynamically, which is then the one range."""
    if not text.strip():
        hosts = list(_ends(network))
        return ((hosts[0], hosts[1]),)
    out = []
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        try:
            a, b = ipaddress.IPv4Address(lo.strip()), ipaddress.IPv4Address(hi.strip())
        except ValueError:
            raise NetworkError(f"ipv4.dhcp.ranges {text!r}: expected ranges such as "
                               "10.213.87.192-10.213.87.254") from None
        if not sep or a > b:
            raise NetworkError(f"ipv4.dhcp.ranges {text!r}: {part!r} is not a range low-high")
        out.append((a, b))
    return tuple(out)


def _ends(network: ipaddress.IPv4Network) -> tuple[ipaddress.IPv4Address, ipaddress.IPv4Address]:
    return network.network_address + 1, network.broadcast_address - 1


def dynamic_range(network: ipaddress.IPv4Network) -> str:
    """The dynamic DHCP range lxcgpu gives a bridge: its top quarter (for
    containers that are not lxcgpu's); the rest is for assigned addresses."""
    first, last = _ends(network)
    start = network.network_address + network.num_addresses * 3 // 4
    return f"{max(start, first)}-{last}"


def nic_device(base: Mapping[str, str], address: str, *, port_isolation: bool = True
               ) -> dict[str, str]:
    """The container's own ``eth0``: the profile's NIC (``base``) with the
    assigned address pinned and LXD's filtering on."""
    if base.get("type") != "nic":
        raise NetworkError("the profile's eth0 is not a NIC")
    dev = {k: v for k, v in base.items() if not k.startswith("security.")
           and k != "ipv4.address"}
    dev.update({
        "ipv4.address": address,
        "security.mac_filtering": "true",
        "security.ipv4_filtering": "true",
        "security.ipv6_filtering": "true",
    })
    if port_isolation:
        dev["security.port_isolation"] = "true"
    return dev


def nic_network(device: Mapping[str, str] | None) -> str | None:
    """The bridge a NIC device is on (``network``, or ``parent`` of a bridged NIC)."""
    if not device or device.get("type") != "nic":
        return None
    if device.get("network"):
        return str(device["network"])
    if device.get("nictype") == "bridged" and device.get("parent"):
        return str(device["parent"])
    return None


def profile_nic(profiles: list[Mapping]) -> dict[str, str]:
    """``eth0`` as the instance's profiles give it (the last one wins, as in LXD)."""
    nic: dict[str, str] | None = None
    for p in profiles:
        dev = (p.get("devices") or {}).get(NIC)
        if dev is not None:
            nic = dict(dev)
    if nic is None or nic_network(nic) is None:
        names = ", ".join(str(p.get("name")) for p in profiles) or "none"
        raise NetworkError(f"the container's profiles ({names}) give it no eth0 on an LXD "
                           "bridge; run `setup/lxdhost.py up` to make the lxcgpu profile")
    return nic


def assigned_ipv4(instance: Mapping, bridges: Mapping[str, Bridge]) -> str | None:
    """The address lxcgpu assigned to the instance, from LXD's record of its
    NIC (``expanded_devices``), if it lies inside that NIC's bridge subnet;
    None otherwise.  Never what the container reports about itself."""
    devices = instance.get("expanded_devices") or instance.get("devices") or {}
    dev = devices.get(NIC)
    bridge = bridges.get(nic_network(dev) or "")
    address = (dev or {}).get("ipv4.address")
    if bridge is None or not bridge.holds(address):
        return None
    return str(address)


def reported_addresses(state: Mapping) -> tuple[str, ...]:
    """The global addresses an instance's state (LXD's ``/state``) reports on
    lxcgpu's NIC, eth0: the one reading of them.  Other interfaces (a
    ``docker0`` inside, say) are the container's own business.  These are
    what the container says; what lxcgpu trusts is :func:`assigned_ipv4`."""
    net = (state.get("network") or {}).get(NIC) or {}
    return tuple(a["address"] for a in net.get("addresses") or ()
                 if a.get("scope") == "global" and a.get("family") in ("inet", "inet6")
                 and a.get("address"))
