"""The IPv4 address of the LXD bridge: where containers reach the hub API.

``jupyterhub-singleuser`` inside a container checks the hub API before it
listens, so the hub API must be bound on an address the containers can reach;
the bridge's own (gateway) address is reachable from every container on it and
from nowhere else.
"""

from __future__ import annotations

import json
import shutil
import subprocess

IP_TIMEOUT = 10  # seconds


class BridgeError(RuntimeError):
    """The bridge is missing or has no IPv4 address; the message says what to do."""


def parse_ipv4(ip_json: str, bridge: str) -> str:
    """The first IPv4 address in ``ip -j -4 addr show dev BRIDGE`` output."""
    try:
        links = json.loads(ip_json or "[]")
    except json.JSONDecodeError as e:
        raise BridgeError(f"unreadable output of `ip -j -4 addr show dev {bridge}`: {e}") from None
    for link in links:
        for addr in link.get("addr_info", []):
            if addr.get("family") == "inet" and addr.get("local"):
                return addr["local"]
    raise BridgeError(
        f"the LXD bridge {bridge} has no IPv4 address: run setup/quickstart "
        "(or set LXCGPU_BRIDGE to the bridge your containers use)"
    )


def bridge_ipv4(bridge: str) -> str:
    """Read the bridge's IPv4 address with ``ip`` (an argv list, no shell)."""
    ip = shutil.which("ip") or shutil.which("ip", path="/usr/sbin:/sbin:/usr/bin:/bin")
    if ip is None:
        raise BridgeError("`ip` not found: install iproute2")
    try:
        result = subprocess.run(
            [ip, "-j", "-4", "addr", "show", "dev", bridge],
            capture_output=True, text=True, timeout=IP_TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        raise BridgeError(f"`ip addr show dev {bridge}` timed out") from None
    if result.returncode != 0:
        raise BridgeError(
            f"the LXD bridge {bridge} does not exist ({result.stderr.strip()}): run "
            "setup/quickstart (or set LXCGPU_BRIDGE to the bridge your containers use)"
        )
    return parse_ipv4(result.stdout, bridge)
