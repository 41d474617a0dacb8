"""Our DNAT chain against the host's real legacy nat table (python-iptables)."""

from __future__ import annotations

import ipaddress
import subprocess
import sys
from pathlib import Path

import pytest

from lxcspawner.dnat import DNATTable
from lxcspawner.network import Bridge
from lxcspawner.portmap import PortMap
from tests.fixtures.netns import sh

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bridge(run_tag):
    """An interface standing in for a bridge (a veth pair, down, no traffic;
    its own route_localnet), so these tests never touch a real bridge's
    settings."""
    name = "lxcd" + run_tag[1:]
    sh("ip", "link", "add", name, "type", "veth", "peer", "name", name + "p")
    try:
        yield Bridge(name, ipaddress.IPv4Interface("10.213.99.1/24"))
    finally:
        sh("ip", "link", "del", name, check=False)


@pytest.fixture
def table(run_tag):
    prefix = "LXCD" + run_tag[1:].upper()
    t = DNATTable(chain=f"{prefix}-DNAT", post_chain=f"{prefix}-POST",
                  input_chain=f"{prefix}-IN", forward_chain=f"{prefix}-FWD")
    t.teardown()
    yield t
    t.teardown()


def rules(chain: str, table: str = "nat", v6: bool = False) -> list[str]:
    p = sh("ip6tables-legacy" if v6 else "iptables-legacy", "-w", "-t", table, "-S", chain,
           check=False)
    return [line for line in p.stdout.splitlines() if line.startswith("-A ")]


def maps(n: int, addr_base: int = 2) -> list[PortMap]:
    return [PortMap(22000 + i, f"10.213.87.{addr_base + i}", 22, f"u{i}--node1")
            for i in range(n)]


def test_setup_is_idempotent_and_jumps_once(table, bridge):
    table.setup([bridge], hub_api_ports=[8081])
    table.setup([bridge], hub_api_ports=[8081])
    b = bridge.name
    for builtin in ("PREROUTING", "OUTPUT"):
        jumps = [r for r in rules(builtin) if f"-j {table.chain}" in r]
        assert jumps == [f"-A {builtin} -m addrtype --dst-type LOCAL -j {table.chain}"]
    assert [r for r in rules("POSTROUTING") if table.post_chain in r] == [
        f"-A POSTROUTING -j {table.post_chain}"]
    assert rules(table.post_chain) == [
        f"-A {table.post_chain} -s 127.0.0.0/8 -o {b} -j MASQUERADE"]
    assert Path(f"/proc/sys/net/ipv4/conf/{b}/route_localnet").read_text().strip() == "1"
    # The host guard: from the bridge only replies, DHCP, DNS and the hub API.
    c = table.input_chain
    assert [r for r in rules("INPUT", "filter") if c in r] == [f"-A INPUT -j {c}"]
    assert rules(c, "filter") == [
        f"-A {c} -i {b} -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN",
        f"-A {c} -d 10.213.99.1/32 -i {b} -p udp -m udp --dport 67 -j RETURN",
        f"-A {c} -d 255.255.255.255/32 -i {b} -p udp -m udp --dport 67 -j RETURN",
        f"-A {c} -d 10.213.99.1/32 -i {b} -p udp -m udp --dport 53 -j RETURN",
        f"-A {c} -d 10.213.99.1/32 -i {b} -p tcp -m tcp --dport 53 -j RETURN",
        f"-A {c} -d 10.213.99.1/32 -i {b} -p tcp -m tcp --dport 8081 -j RETURN",
        f"-A {c} -i {b} -p tcp -j REJECT --reject-with tcp-reset",
        f"-A {c} -i {b} -j REJECT --reject-with icmp-port-unreachable"]
    assert rules(c, "filter", v6=True) == [
        f"-A {c} -i {b} -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN",
        f"-A {c} -i {b} -p ipv6-icmp -j RETURN",
        f"-A {c} -i {b} -p tcp -j REJECT --reject-with tcp-reset",
        f"-A {c} -i {b} -j REJECT --reject-with icmp6-port-unreachable"]
    f = table.forward_chain
    assert [r for r in rules("FORWARD", "filter") if f in r] == [f"-A FORWARD -j {f}"]
    assert rules(f, "filter") == [
        f"-A {f} -i {b} -o {b} -m conntrack --ctstate DNAT -j RETURN",
        f"-A {f} -i {b} -o {b} -j REJECT --reject-with icmp-port-unreachable"]
    assert rules(f, "filter", v6=True) == [
        f"-A {f} -i {b} -o {b} -j REJECT --reject-with icmp6-port-unreachable"]
    # Isolation off (the site opened it): no FORWARD rules, the guard stays.
    table.setup([bridge], hub_api_ports=[8081], isolate=False)
    assert rules(f, "filter") == [] and len(rules(c, "filter")) == 8


def test_teardown_turns_route_localnet_off_before_removing_the_guard(table, bridge):
    table.setup([bridge])
    sysctl = Path(f"/proc/sys/net/ipv4/conf/{bridge.name}/route_localnet")
    assert sysctl.read_text().strip() == "1"
    table.teardown()
    assert sysctl.read_text().strip() == "0"
    assert rules(table.input_chain, "filter") == []


def test_setup_refuses_bad_interface_names(table):
    for bad in ["br0; rm -rf /", "../all", "a" * 16, ""]:
        with pytest.raises(ValueError):
            table.setup([Bridge(bad, ipaddress.IPv4Interface("10.213.99.1/24"))])


def test_sync_writes_reads_back_and_changes_only_what_differs(table):
    want = maps(5)
    res = table.sync(want)
    assert (res.added, res.removed) == (5, 0)
    assert table.current() == want
    assert rules(table.chain)[0] == (
        f"-A {table.chain} -p tcp -m tcp --dport 22000 -m comment --comment \"lxcgpu:u0--node1\" "
        "-j DNAT --to-destination 10.213.87.2:22")
    assert not table.sync(want).changed
    moved = want[:2] + [PortMap(22002, "10.213.87.99", 22, "u2--node1")] + want[3:]
    res = table.sync(moved)
    assert (res.added, res.removed, res.rebuilt) == (1, 1, False)
    assert sorted(table.current()) == sorted(moved)
    res = table.sync(moved[:1])
    assert (res.added, res.removed) == (0, 4)
    assert table.current() == moved[:1]
    assert table.sync([]).removed == 1 and rules(table.chain) == []


def test_where_the_fast_layout_does_not_apply_rules_read_back_through_python_iptables(table):
    # On a host whose libxtables lays entries out otherwise, the codec's
    # layout check fails and every entry is built and read by python-iptables
    # itself. Our rules must still read back as ours (with a hub-only source
    # too), or every sync would rebuild the chain; foreign ones as not ours.
    table.codec.fast = False
    table.codec._cache.clear()
    want = maps(3) + [PortMap(20000, "10.213.87.9", 8888, "u9--node1", "192.0.2.10")]
    assert table.sync(want).added == 4
    assert sorted(table.current()) == sorted(want)
    assert not table.sync(want).changed
    sh("iptables-legacy", "-w", "-t", "nat", "-A", table.chain, "-p", "udp", "--dport", "53",
       "-j", "RETURN")
    assert table.current()[-1] is None
    assert table.sync(want).rebuilt and sorted(table.current()) == sorted(want)


def test_one_rule_per_host_port(table):
    res = table.sync([PortMap(22000, "10.213.87.3", 22, "b"), PortMap(22000, "10.213.87.2", 22, "a")])
    assert res.added == 1
    assert table.current() == [PortMap(22000, "10.213.87.2", 22, "a")]


def test_foreign_rules_in_our_chain_are_replaced(table):
    table.sync(maps(3))
    sh("iptables-legacy", "-w", "-t", "nat", "-A", table.chain, "-p", "udp", "--dport", "53",
       "-j", "RETURN")
    sh("iptables-legacy", "-w", "-t", "nat", "-I", table.chain, "-p", "tcp", "--dport", "22001",
       "-j", "DNAT", "--to-destination", "10.213.87.200:22")
    assert None in table.current()
    res = table.sync(maps(3))
    assert res.rebuilt
    assert table.current() == maps(3)


def test_rules_outside_our_chains_survive_sync_and_teardown(table, bridge, run_tag):
    comment = f"lxcgpu-test-keep-{run_tag}"
    keep = ["-p", "tcp", "--dport", "7", "-m", "comment", "--comment", comment, "-j", "RETURN"]
    sh("iptables-legacy", "-w", "-t", "nat", "-A", "PREROUTING", *keep)
    try:
        before = [r for r in rules("PREROUTING") if table.chain not in r]
        table.setup([bridge])
        table.sync(maps(50))
        table.sync(maps(10))
        table.teardown()
        assert [r for r in rules("PREROUTING") if table.chain not in r] == before
        saved = sh("iptables-legacy-save").stdout + sh("ip6tables-legacy-save").stdout
        assert not any(c in saved for c in (table.chain, table.post_chain, table.input_chain,
                                            table.forward_chain))
    finally:
        sh("iptables-legacy", "-w", "-t", "nat", "-D", "PREROUTING", *keep, check=False)


def test_agent_without_xtables_stops_with_a_clear_message():
    # Without CAP_NET_ADMIN (dropped from the bounding set) x_tables refuses us,
    # as on a host whose kernel lacks them.
    p = subprocess.run(["setpriv", "--bounding-set=-net_admin", "--", sys.executable, "-m",
                        "monitor.node", "--once", "--chain-prefix", "LXCGPUNOCAP"],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert p.returncode == 3, p.stderr
    assert "legacy iptables (x_tables) is not usable on this host" in p.stderr
    assert "Traceback" not in p.stderr


@pytest.mark.parametrize("args", [["--chain-prefix", "lower"], ["--chain-prefix", "A" * 17],
                                  ["--chain-prefix", "X; reboot"], ["--interval", "0"]])
def test_agent_refuses_bad_options(args):
    p = subprocess.run([sys.executable, "-m", "monitor.node", "--once", *args], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "lxcgpu-node:" in p.stderr and "Traceback" not in p.stderr
