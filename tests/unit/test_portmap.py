"""The port maps in a container's config, and the DNAT rules they ask for."""

import pytest

from lxcspawner.portmap import (
    FORWARD_PREFIX, SSH_PORT_KEY, PortMap, config_changes, ipv4_of, maps_for, parse_port_range,
    wanted_ports,
)


def state(status="Running", addr="10.213.87.5", extra=None):
    net = {"lo": {"addresses": [{"family": "inet", "address": "127.0.0.1", "scope": "local"}]}}
    if addr:
        net["eth0"] = {"addresses": [
            {"family": "inet6", "address": "fd42::5", "scope": "global"},
            {"family": "inet", "address": addr, "scope": "global"}]}
    net.update(extra or {})
    return {"status": status, "network": net}


def inst(name, config, **kw):
    return {"name": name, "config": config, "state": state(**kw)}


def test_wanted_ports_reads_ssh_and_forwards():
    cfg = {SSH_PORT_KEY: "22031", f"{FORWARD_PREFIX}11003": "6006",
           f"{FORWARD_PREFIX}11004": "80", "user.lxcgpu.owner": "alice", "limits.cpu": "2"}
    assert wanted_ports(cfg) == {22031: 22, 11003: 6006, 11004: 80}


@pytest.mark.parametrize("key,value", [
    (SSH_PORT_KEY, "0"), (SSH_PORT_KEY, "65536"), (SSH_PORT_KEY, "22 31"),
    (SSH_PORT_KEY, "-1"), (SSH_PORT_KEY, "２２"), (f"{FORWARD_PREFIX}abc", "80"),
    (f"{FORWARD_PREFIX}11003", "eighty"), (f"{FORWARD_PREFIX}", "80"),
])
def test_malformed_entries_are_skipped_not_fatal(key, value, caplog):
    cfg = {key: value, f"{FORWARD_PREFIX}11009": "8080"}
    assert wanted_ports(cfg) == {11009: 8080}
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


def test_maps_for_running_containers_with_addresses_only():
    maps = maps_for([
        inst("alice--gpu17", {SSH_PORT_KEY: "22000", f"{FORWARD_PREFIX}11000": "6006"}),
        inst("bob--gpu17", {SSH_PORT_KEY: "22001"}, status="Stopped", addr=None),
        inst("carol--gpu17", {SSH_PORT_KEY: "22002"}, addr=None),     # no DHCP lease yet
        inst("dave--gpu17", {"user.lxcgpu.owner": "dave"}),            # nothing wanted
    ])
    assert maps == [PortMap(11000, "10.213.87.5", 6006, "alice--gpu17"),
                    PortMap(22000, "10.213.87.5", 22, "alice--gpu17")]


def test_port_claimed_twice_goes_to_first_by_name_whatever_the_order(caplog):
    a = inst("a--gpu17", {SSH_PORT_KEY: "22000"}, addr="10.213.87.2")
    b = inst("b--gpu17", {SSH_PORT_KEY: "22000"}, addr="10.213.87.3")
    assert maps_for([b, a]) == maps_for([a, b]) == [PortMap(22000, "10.213.87.2", 22, "a--gpu17")]
    assert "claimed by a--gpu17 and b--gpu17" in caplog.text


def test_ipv4_prefers_eth0_and_global_scope():
    assert ipv4_of(state(addr="10.213.87.9")) == "10.213.87.9"
    other = {"eth1": {"addresses": [{"family": "inet", "address": "10.9.9.9",
                                     "scope": "global"}]}}
    assert ipv4_of(state(addr=None, extra=other)) == "10.9.9.9"
    assert ipv4_of(state(addr=None)) is None
    assert ipv4_of({}) is None


def test_ports_outside_the_allowed_ranges_are_not_mapped(caplog):
    cfg = {SSH_PORT_KEY: "22000", f"{FORWARD_PREFIX}22": "22", f"{FORWARD_PREFIX}11000": "80",
           f"{FORWARD_PREFIX}443": "443"}
    allowed = [(22000, 29999), (11000, 11999)]
    assert [m.host_port for m in maps_for([inst("a--gpu17", cfg)], allowed)] == [11000, 22000]
    assert "host port 22, outside the allowed ranges 22000-29999, 11000-11999" in caplog.text
    assert len(maps_for([inst("a--gpu17", cfg)])) == 4


@pytest.mark.parametrize("text,expected", [("22000-29999", (22000, 29999)), (" 1 - 1 ", (1, 1)),
                                           ("11000-11999", (11000, 11999))])
def test_parse_port_range(text, expected):
    assert parse_port_range(text) == expected


@pytest.mark.parametrize("text", ["", "22000", "29999-22000", "0-10", "1-65536", "a-b", None,
                                  "1-2-3", "1,2"])
def test_parse_port_range_refuses(text):
    with pytest.raises(ValueError):
        parse_port_range(text)
