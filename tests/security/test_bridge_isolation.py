"""Containers on one GPU server cannot reach, pose as or redirect to one
another, nor reach the host's services beyond the hub API: each attack run
for real, as root inside a container from the template image, against the
protections lxcgpu sets up (LXD's NIC filtering and port isolation on pinned
addresses, the node agent's host guard).  Each has a control that shows the
same probe succeeding where the protection is absent, so the test can fail.

The containers live in the node agent's test project (``nat_project``) so
its DNAT rules are the ones under test; ``carol`` has the profile's NIC with
an address but none of LXD's protections, as every container had before.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import threading
import time

import pytest

from lxcspawner import network
from lxcspawner.container import ContainerSpec, ensure_container
from lxcspawner.portmap import SSH_PORT_KEY
from tests.fixtures.netns import hub_api_ports_for_tests, sh
from tests.fixtures.sshkeys import ssh_banner

pytestmark = pytest.mark.lxd

SERVER = "sec1"
# SSH ports of this module's containers, inside the agent's ranges, away
# from the NAT tests' (29000...).
PORTS = {"alice": 28950, "bob": 28951, "carol": 28952}

# Connect from inside a container; prints "ok <first bytes>" or "no <error>".
_CONNECT = r"""
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
src = sys.argv[3] if len(sys.argv) > 3 else ""
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
try:
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(3)
    if src:
        s.bind((src, 0))
    s.connect(socket.getaddrinfo(host, port, fam, socket.SOCK_STREAM)[0][4])
    s.settimeout(2)
    try:
        data = s.recv(64)
    except socket.timeout:
        data = b""
    print("ok", data.decode(errors="replace").strip())
except OSError as e:
    print("no", type(e).__name__, e)
"""


async def connect(lxd, name: str, host: str, port: int, src: str = "") -> str:
    res = await lxd.execute(name, ["python3", "-c", _CONNECT, host, str(port),
                                   *([src] if src else [])], timeout=30)
    return res.stdout.strip() or res.stderr.strip()


async def root_sh(lxd, name: str, script: str) -> None:
    (await lxd.execute(name, ["sh", "-ec", script], timeout=30)).check(["sh", script[:40]])


class Listener:
    """A TCP listener on the host that greets whoever connects."""

    def __init__(self, host: str, port: int = 0, family=socket.AF_INET, scope: int = 0):
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port, 0, scope) if family == socket.AF_INET6 else (host, port))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.peers: list[str] = []
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        while not self._stop:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                continue
            self.peers.append(peer[0])
            try:
                conn.sendall(b"host-secret\n")
            finally:
                conn.close()

    def close(self):
        self._stop = True
        self._thread.join()
        self.sock.close()


@pytest.fixture(scope="module")
async def lab(nat_project, node_agent, pinned_nics, idmap_blocks, run_tag):
    """alice and bob as lxcgpu makes them; carol unprotected; each with an
    SSH port map, running, with a small web server on 8888."""
    base = (await nat_project.profile("lxcgpu"))["devices"]["eth0"]
    specs = {}
    for user in ("alice", "bob", "carol"):
        nic = await pinned_nics()
        if user == "carol":
            nic = {**base, "ipv4.address": nic["ipv4.address"]}
        spec = ContainerSpec(user=user, server=SERVER, idmap_base=idmap_blocks(),
                             prefix=run_tag, nic=nic)
        await ensure_container(nat_project, spec)
        await nat_project.update_config(spec.name, {SSH_PORT_KEY: str(PORTS[user])})
        specs[user] = spec
    # The address allocator looks across projects, from a project's client too.
    listed = {i["name"] for i in await nat_project.list_instances(all_projects=True)}
    assert {s.name for s in specs.values()} <= listed
    await asyncio.gather(*(nat_project.start(s.name) for s in specs.values()))
    for user, spec in specs.items():
        addr = spec.nic["ipv4.address"]
        await nat_project.wait_for_address(spec.name, expected=addr, timeout=120)
        res = await nat_project.execute(spec.name, [
            "systemd-run", "--unit=lxcgpu-test-web", "--", "python3", "-c",
            "import socket,sys\ns=socket.create_server(('0.0.0.0',8888))\nwhile True:\n"
            " c,_=s.accept(); c.sendall(sys.argv[1].encode()+b'\\n'); c.close()",
            f"jupyter-of-{user}"], timeout=30)
        res.check(["systemd-run"])
        await asyncio.to_thread(ssh_banner, addr, 60)
        deadline = time.monotonic() + 30
        while not _host_connect(addr, 8888).startswith("ok"):
            assert time.monotonic() < deadline, f"{user}'s web server did not start"
            await asyncio.sleep(0.1)
    try:
        yield specs
    finally:
        await asyncio.gather(*(nat_project.delete_instance(s.name) for s in specs.values()),
                             return_exceptions=True)


def addr(lab, user: str) -> str:
    return lab[user].nic["ipv4.address"]


async def free_address(lxd, bridge: network.Bridge) -> str:
    """A static address of the bridge that no instance (of any project, of
    any test or site on this LXD) has pinned: nothing answers there but the
    container that takes it in a test."""
    taken = {network.assigned_ipv4(i, {bridge.name: bridge})
             for i in await lxd.list_instances(all_projects=True)}
    return next(x for x in reversed(list(bridge.static_addresses())) if x not in taken)


@pytest.fixture(scope="module")
def bridge(pinned_nics) -> network.Bridge:
    return pinned_nics.bridge


@pytest.fixture(scope="module")
def gw(bridge) -> str:
    return str(bridge.gateway.ip)


async def test_neighbours_cannot_reach_each_other_directly(nat_project, lab, node_agent):
    """Two layers keep containers on one bridge apart: LXD's port isolation
    (frames between two isolated ports are never forwarded) and, where the
    bridge's frames pass iptables (br_netfilter), the agent's LXCGPU-FORWARD.
    With an exception for the pair in the agent's chain, carol (not
    isolated) reaches bob and alice (isolated) still does not."""
    b = addr(lab, "bob")
    for user in ("alice", "carol"):
        for port in (22, 8888):
            got = await connect(nat_project, lab[user].name, b, port)
            assert got.startswith("no"), f"{user} reached bob:{port}: {got}"
    chain = f"{node_agent.prefix}-FORWARD"
    exceptions = [[flag, addr(lab, u), "-j", "ACCEPT"] for u in ("alice", "carol")
                  for flag in ("-s", "-d")]
    for rule in exceptions:
        sh("iptables-legacy", "-w", "-I", chain, *rule)
    try:
        assert (await connect(nat_project, lab["carol"].name, b, 8888)) == "ok jupyter-of-bob"
        assert (await connect(nat_project, lab["alice"].name, b, 8888)).startswith("no")
    finally:
        for rule in exceptions:
            sh("iptables-legacy", "-w", "-D", chain, *rule, check=False)


async def test_routing_a_neighbour_through_the_host_is_refused(nat_project, lab, gw):
    """Port isolation stops the direct path; routing the neighbour through
    the gateway instead meets the agent's LXCGPU-FORWARD, for the isolated
    and the unprotected alike (carol reaches bob directly, see above)."""
    b = addr(lab, "bob")
    for user in ("alice", "carol"):
        name = lab[user].name
        await root_sh(nat_project, name, f"ip route replace {b}/32 via {gw} dev eth0")
        try:
            got = await connect(nat_project, name, b, 8888)
            assert got.startswith("no"), f"{user} reached bob through the host: {got}"
        finally:
            await root_sh(nat_project, name, f"ip route del {b}/32 || true")


async def test_a_second_address_is_useless(nat_project, lab, gw, bridge):
    """alice takes on a free address beside her own: nothing she sends from
    it leaves, and the host cannot reach her there (MAC and IP filtering).
    carol, unfiltered, does the same and both work: what lxcgpu prevents."""
    listener = Listener(gw, hub_api_ports_for_tests()[-1])
    extra = await free_address(nat_project, bridge)
    try:
        for user, expect_ok in (("alice", False), ("carol", True)):
            name = lab[user].name
            # Its own address works: the hub API port is open to containers.
            assert (await connect(nat_project, name, gw, listener.port)) == "ok host-secret"
            await root_sh(nat_project, name, f"ip addr add {extra}/32 dev eth0")
            try:
                out = await connect(nat_project, name, gw, listener.port, src=extra)
                sh("ip", "neigh", "flush", "to", extra, check=False)
                into = await asyncio.to_thread(_host_connect, extra, 8888)
            finally:
                await root_sh(nat_project, name, f"ip addr del {extra}/32 dev eth0")
                sh("ip", "neigh", "flush", "to", extra, check=False)
            assert out.startswith("ok") == expect_ok, (user, out)
            assert (into == f"ok jupyter-of-{user}") == expect_ok, (user, into)
        assert listener.peers.count(extra) == 1      # carol's, never alice's
    finally:
        listener.close()


async def test_changing_its_address_moves_no_rule(nat_project, lab, node_agent, bridge, gw):
    """alice takes a free address instead of her own: her SSH port still
    maps to the address lxcgpu pinned (where nothing answers now), never
    to where she went, even after LXD events and a full reconcile."""
    a, mine = lab["alice"].name, addr(lab, "alice")
    other = await free_address(nat_project, bridge)
    await root_sh(nat_project, a, f"ip addr flush dev eth0; ip addr add {other}/24 dev eth0; "
                  f"ip route replace default via {gw}")
    try:
        # An LXD event for alice (a config change), then wait past a reconcile.
        await nat_project.update_config(a, {"user.lxcgpu-test.poke": "1"})
        await asyncio.sleep(node_agent.interval + 1)
        rules = [r for r in node_agent.rules() if f"--dport {PORTS['alice']} " in r]
        assert len(rules) == 1 and rules[0].endswith(f"--to-destination {mine}:22"), rules
        assert not any(other in r for r in node_agent.rules())
        # And the host reaches nothing at the address she took.
        got = await asyncio.to_thread(_host_connect, other, 22)
        assert got.startswith("no"), got
    finally:
        await root_sh(nat_project, a, f"ip addr flush dev eth0; ip addr add {mine}/24 dev eth0; "
                      f"ip route replace default via {gw}")
        await nat_project.update_config(a, {"user.lxcgpu-test.poke": None})
    assert await asyncio.to_thread(_host_connect, mine, 22) != ""


def _host_connect(host: str, port: int) -> str:
    try:
        with socket.create_connection((host, port), timeout=3) as s:
            s.settimeout(2)
            return "ok " + s.recv(64).decode(errors="replace").strip()
    except OSError as e:
        return f"no {e}"


@pytest.fixture
def host_address(run_tag):
    """A non-loopback address of the host's own (on a veth pair of this
    test's, so no traffic leaves the machine), with a listener on it."""
    name = "lxcs" + run_tag[1:]
    net = ipaddress.IPv4Network("10.213.97.0/30")
    sh("ip", "link", "add", name, "type", "veth", "peer", "name", name + "p")
    try:
        sh("ip", "addr", "add", f"{net[1]}/30", "dev", name)
        sh("ip", "link", "set", name, "up")
        sh("ip", "link", "set", name + "p", "up")
        listener = Listener(str(net[1]))
        try:
            yield str(net[1]), listener
        finally:
            listener.close()
    finally:
        sh("ip", "link", "del", name, check=False)


async def test_host_services_beyond_the_hub_api_are_refused(nat_project, lab, host_address, gw):
    a = lab["alice"].name
    host_ip, on_host = host_address
    on_gateway = Listener(gw)                          # a port the guard does not open
    hub_api = Listener(gw, hub_api_ports_for_tests()[-1])
    try:
        # Control: the hub API port is open, and both listeners answer the host.
        assert (await connect(nat_project, a, gw, hub_api.port)) == "ok host-secret"
        assert _host_connect(host_ip, on_host.port) == "ok host-secret"
        assert _host_connect(gw, on_gateway.port) == "ok host-secret"
        on_host.peers.clear()
        on_gateway.peers.clear()
        for user in ("alice", "carol"):                 # the guard covers every container
            name = lab[user].name
            for host, port in ((gw, on_gateway.port), (host_ip, on_host.port), (gw, 22)):
                got = await connect(nat_project, name, host, port)
                assert got.startswith("no") and "refused" in got.lower(), (user, host, got)
        assert on_host.peers == [] and on_gateway.peers == []
    finally:
        on_gateway.close()
        hub_api.close()


async def test_ipv6_reaches_nothing_on_the_host(nat_project, lab):
    """IPv6 is off on the bridge (no host address there at all); the agent's
    ip6tables guard refuses new connections from it in any case."""
    assert sh("ip", "-6", "-o", "addr", "show", "dev", "lxcgpubr0").stdout.strip() == ""
    rules = sh("ip6tables-legacy", "-w", "-S").stdout
    assert "-i lxcgpubr0 -j REJECT" in rules
    got = await connect(nat_project, lab["alice"].name, "ff02::1%eth0", 22)
    assert got.startswith("no"), got
