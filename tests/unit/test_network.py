"""Containers' addresses on the bridge: what lxcgpu may allocate and pins."""

import ipaddress

import pytest

from lxcspawner.network import (
    Bridge, NetworkError, assigned_ipv4, dynamic_range, hub_api_port, nic_device, profile_nic,
    reported_addresses,
)


def record(address="10.213.87.1/24", ranges="10.213.87.192-10.213.87.254", **kw):
    cfg = {"ipv4.address": address}
    if ranges is not None:
        cfg["ipv4.dhcp.ranges"] = ranges
    return {"name": "lxcgpubr0", "managed": True, "type": "bridge", "config": cfg, **kw}


def test_static_addresses_leave_out_gateway_and_dynamic_range():
    b = Bridge.from_lxd(record())
    got = list(b.static_addresses())
    assert got[0] == "10.213.87.2" and got[-1] == "10.213.87.191" and len(got) == 190
    assert b.holds("10.213.87.200")            # a container's, though not ours to give
    assert not b.holds("10.213.87.1") and not b.holds("10.213.88.2")


def test_a_bridge_with_no_dynamic_range_leaves_nothing_to_allocate():
    assert list(Bridge.from_lxd(record(ranges=None)).static_addresses()) == []


@pytest.mark.parametrize("rec,match", [
    (record(address="none"), "has no IPv4 subnet"),
    (record(address="10.0.0.1/30"), "too small"),
    (record(ranges="10.213.87.9-10.213.87.2"), "not a range"),
    (record(ranges="10.213.87.9"), "expected ranges"),
    (record(ranges="a-b"), "expected ranges"),
    ({**record(), "managed": False}, "not a bridge managed by LXD"),
])
def test_bridges_lxcgpu_cannot_use_are_refused_with_a_reason(rec, match):
    with pytest.raises(NetworkError, match=match):
        Bridge.from_lxd(rec)


@pytest.mark.parametrize("net,expected", [("10.213.87.0/24", "10.213.87.192-10.213.87.254"),
                                          ("10.8.0.0/16", "10.8.192.0-10.8.255.254")])
def test_dynamic_range_is_the_top_quarter(net, expected):
    assert dynamic_range(ipaddress.IPv4Network(net)) == expected


def test_nic_device_pins_the_address_and_filters():
    base = {"type": "nic", "name": "eth0", "network": "lxcgpubr0",
            "security.mac_filtering": "false", "ipv4.address": "10.213.87.77"}
    dev = nic_device(base, "10.213.87.5")
    assert dev == {"type": "nic", "name": "eth0", "network": "lxcgpubr0",
                   "ipv4.address": "10.213.87.5", "security.mac_filtering": "true",
                   "security.ipv4_filtering": "true", "security.ipv6_filtering": "true",
                   "security.port_isolation": "true"}
    assert "security.port_isolation" not in nic_device(base, "10.213.87.5",
                                                       port_isolation=False)


def test_profile_nic_is_the_last_profiles_eth0():
    a = {"name": "default", "devices": {"eth0": {"type": "nic", "network": "lxdbr0"}}}
    b = {"name": "lxcgpu", "devices": {"eth0": {"type": "nic", "network": "lxcgpubr0"}}}
    assert profile_nic([a, b])["network"] == "lxcgpubr0"
    with pytest.raises(NetworkError, match="give it no eth0 on an LXD bridge"):
        profile_nic([{"name": "bare", "devices": {}}])


def test_assigned_ipv4_reads_the_nic_never_the_state():
    bridges = {"lxcgpubr0": Bridge.from_lxd(record())}
    inst = {"expanded_devices": {"eth0": {"type": "nic", "network": "lxcgpubr0",
                                          "ipv4.address": "10.213.87.5"}},
            "state": {"network": {"eth0": {"addresses": [
                {"family": "inet", "address": "10.213.87.6", "scope": "global"}]}}}}
    assert assigned_ipv4(inst, bridges) == "10.213.87.5"
    assert assigned_ipv4({"expanded_devices": {}}, bridges) is None


def test_hub_api_port_from_the_environment():
    assert hub_api_port({}) == 8081
    assert hub_api_port({"LXCGPU_HUB_API_PORT": "9000"}) == 9000
    with pytest.raises(ValueError, match="not a port number"):
        hub_api_port({"LXCGPU_HUB_API_PORT": "80x"})


def test_reported_addresses_are_eth0s_only_whatever_comes_first():
    # A container running Docker: docker0 is listed before eth0 (seen in
    # LXD's state); the proxy was once routed to docker0's 172.17.0.1.
    state = {"network": {
        "docker0": {"addresses": [{"family": "inet", "address": "172.17.0.1",
                                   "scope": "global"}]},
        "lo": {"addresses": [{"family": "inet", "address": "127.0.0.1", "scope": "local"}]},
        "eth0": {"addresses": [
            {"family": "inet6", "address": "fe80::1", "scope": "link"},
            {"family": "inet", "address": "10.213.87.5", "scope": "global"},
            {"family": "inet6", "address": "fd42::5", "scope": "global"}]},
    }}
    assert reported_addresses(state) == ("10.213.87.5", "fd42::5")
    assert reported_addresses({"network": None}) == ()
    assert reported_addresses({}) == ()
