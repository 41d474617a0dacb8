"""The port maps in a container's config, and the DNAT rules they ask for."""

import pytest

from lxcspawner.network import Bridge
from lxcspawner.portmap import (
    FORWARD_PREFIX, JUPYTER_PREFIX, SSH_PORT_KEY, PortMap, config_changes, jupyter_maps,
    maps_for, parse_port_range, wanted_ports,
)


BRIDGES = {"lxcgpubr0": Bridge.from_lxd({
    "name": "lxcgpubr0", "managed": True, "type": "bridge",
    "config": {"ipv4.address": "10.213.87.1/24",
               "ipv4.dhcp.ranges": "10.213.87.192-10.213.87.254"}})}


def inst(name, config, addr="10.213.87.5", network="lxcgpubr0", status="Running"):
    """LXD's record of an instance (``recursion=1``)."""
    nic = {"type": "nic", "name": "eth0", "network": network}
    if addr:
        nic["ipv4.address"] = addr
    return {"name": name, "config": config, "expanded_devices": {"eth0": nic},
            "status": status}


def test_wanted_ports_reads_ssh_and_forwards():
    cfg = {SSH_PORT_KEY: "22031", f"{FORWARD_PREFIX}11003": "6006",
           f"{FORWARD_PREFIX}11004": "80", "user.lxcgpu.owner": "alice", "limits.cpu": "2"}
    assert wanted_ports(cfg) == {22031: (22, False), 11003: (6006, False), 11004: (80, False)}


def test_jupyter_ports_are_for_the_hub_only():
    cfg = {SSH_PORT_KEY: "22031", **{f"{JUPYTER_PREFIX}{p}": str(c)
                                     for p, c in jupyter_maps(20040).items()}}
    assert jupyter_maps(20040) == {20040: 8888, 20041: 8889} and jupyter_maps(None) == {}
    assert wanted_ports(cfg) == {22031: (22, False), 20040: (8888, True), 20041: (8889, True)}
    i = inst("alice--gpu18", cfg, addr="10.213.87.5")
    # No hub address: no Jupyter map at all, SSH as ever.
    assert maps_for([i], BRIDGES) == [PortMap(22031, "10.213.87.5", 22, "alice--gpu18")]
    assert maps_for([i], BRIDGES, hub_address="192.0.2.10") == [
        PortMap(20040, "10.213.87.5", 8888, "alice--gpu18", "192.0.2.10"),
        PortMap(20041, "10.213.87.5", 8889, "alice--gpu18", "192.0.2.10"),
        PortMap(22031, "10.213.87.5", 22, "alice--gpu18")]
    assert config_changes(cfg, 22031, {}, jupyter_maps(20040)) == {}
    assert config_changes(cfg, 22031, {}) == {f"{JUPYTER_PREFIX}20040": None,
                                              f"{JUPYTER_PREFIX}20041": None}


@pytest.mark.parametrize("key,value", [
    (SSH_PORT_KEY, "0"), (SSH_PORT_KEY, "65536"), (SSH_PORT_KEY, "22 31"),
    (SSH_PORT_KEY, "-1"), (SSH_PORT_KEY, "２２"), (f"{FORWARD_PREFIX}abc", "80"),
    (f"{FORWARD_PREFIX}11003", "eighty"), (f"{FORWARD_PREFIX}", "80"),
])
def test_malformed_entries_are_skipped_not_fatal(key, value, caplog):
    cfg = {key: value, f"{FORWARD_PREFIX}11009": "8080"}
    assert wanted_ports(cfg) == {11009: (8080, False)}
    assert "ignoring" in caplog.text


def test_config_changes_minimal_update():
    cfg = {SSH_PORT_KEY: "22031", f"{FORWARD_PREFIX}11003": "6006",
           f"{FORWARD_PREFIX}11004": "80", "user.lxcgpu.owner": "alice"}
    assert config_changes(cfg, 22031, {11003: 6006, 11004: 80}) == {}
    assert config_changes(cfg, 22031, {11003: 6006}) == {f"{FORWARD_PREFIX}11004": None}
    assert config_changes(cfg, 22032, {11003: 6006, 11004: 80, 11005: 22}) == {
        SSH_PORT_KEY: "22032", f"{FORWARD_PREFIX}11005": "22"}
    assert config_changes({}, None, {}) == {}
    assert config_changes(cfg, None, {}) == {
        SSH_PORT_KEY: None, f"{FORWARD_PREFIX}11003": None, f"{FORWARD_PREFIX}11004": None}


@pytest.mark.parametrize("ssh,fwd", [(0, {}), (70000, {}), (22031, {11003: 0}),
                                     (22031, {"x": 80})])
def test_config_changes_refuses_bad_ports(ssh, fwd):
    with pytest.raises(ValueError):
        config_changes({}, ssh, fwd)


def test_maps_for_running_containers_to_their_pinned_address_only(caplog):
    maps = maps_for([
        inst("alice--gpu17", {SSH_PORT_KEY: "22000", f"{FORWARD_PREFIX}11000": "6006"}),
        inst("bob--gpu17", {SSH_PORT_KEY: "22001"}, status="Stopped", addr="10.213.87.6"),
        inst("carol--gpu17", {SSH_PORT_KEY: "22002"}, addr=None),     # made before pinning
        inst("dave--gpu17", {"user.lxcgpu.owner": "dave"}),            # nothing wanted
    ], BRIDGES)
    # To the pinned address, whatever alice's container says it has (.99).
    assert maps == [PortMap(11000, "10.213.87.5", 6006, "alice--gpu17"),
                    PortMap(22000, "10.213.87.5", 22, "alice--gpu17")]
    assert "carol--gpu17 asks for host ports but has no address pinned by lxcgpu" in caplog.text


@pytest.mark.parametrize("addr,network", [
    ("10.213.87.1", "lxcgpubr0"),      # the gateway (the host itself)
    ("10.213.87.0", "lxcgpubr0"),      # the network address
    ("10.213.87.255", "lxcgpubr0"),    # broadcast
    ("192.0.2.2", "lxcgpubr0"),        # outside the bridge: the host's LAN address
    ("127.0.0.1", "lxcgpubr0"),        # loopback
    ("10.213.87.5", "otherbr0"),       # a bridge that is not one of ours
    ("not-an-address", "lxcgpubr0"),
])
def test_no_map_to_an_address_outside_the_bridge_subnet(addr, network):
    cfg = {SSH_PORT_KEY: "22000"}
    assert maps_for([inst("a--gpu17", cfg, addr=addr, network=network)], BRIDGES) == []


def test_port_claimed_twice_goes_to_first_by_name_whatever_the_order(caplog):
    a = inst("a--gpu17", {SSH_PORT_KEY: "22000"}, addr="10.213.87.2")
    b = inst("b--gpu17", {SSH_PORT_KEY: "22000"}, addr="10.213.87.3")
    assert maps_for([b, a], BRIDGES) == maps_for([a, b], BRIDGES) == [
        PortMap(22000, "10.213.87.2", 22, "a--gpu17")]
    assert "claimed by a--gpu17 and b--gpu17" in caplog.text


def test_ports_outside_the_allowed_ranges_are_not_mapped(caplog):
    cfg = {SSH_PORT_KEY: "22000", f"{FORWARD_PREFIX}22": "22", f"{FORWARD_PREFIX}11000": "80",
           f"{FORWARD_PREFIX}443": "443"}
    allowed = [(22000, 29999), (11000, 11999)]
    assert [m.host_port for m in maps_for([inst("a--gpu17", cfg)], BRIDGES, allowed)] == [
        11000, 22000]
    assert "host port 22, outside the allowed ranges 22000-29999, 11000-11999" in caplog.text
    assert len(maps_for([inst("a--gpu17", cfg)], BRIDGES)) == 4


@pytest.mark.parametrize("text,expected", [("22000-29999", (22000, 29999)), (" 1 - 1 ", (1, 1)),
                                           ("11000-11999", (11000, 11999))])
def test_parse_port_range(text, expected):
    assert parse_port_range(text) == expected


@pytest.mark.parametrize("text", ["", "22000", "29999-22000", "0-10", "1-65536", "a-b", None,
                                  "1-2-3", "1,2"])
def test_parse_port_range_refuses(text):
    with pytest.raises(ValueError):
        parse_port_range(text)
