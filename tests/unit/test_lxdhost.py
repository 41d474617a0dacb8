"""The host setup's pure parts: sub-id sizing, subnet choice, preseed."""

import ipaddress

import pytest

import lxdhost


def test_subids_widened_and_others_kept():
    text = "root:100000:65536\nalice:165536:65536\n_lxd:100000:65536\n"
    new, changed = lxdhost.subid_lines(text)
    assert changed
    lines = new.splitlines()
    assert f"root:100000:{lxdhost.SUBID_COUNT}" in lines
    assert f"_lxd:100000:{lxdhost.SUBID_COUNT}" in lines
    assert "alice:165536:65536" in lines
    again, changed2 = lxdhost.subid_lines(new)
    assert again == new and not changed2


def test_subids_cover_a_thousand_users_above_lxds_reserve():
    from lxcspawner.container import IDMAP_BLOCK, IDMAP_USER_FIRST, IDMAP_USER_LAST
    assert IDMAP_USER_FIRST >= lxdhost.SUBID_START
    assert IDMAP_USER_LAST + IDMAP_BLOCK <= lxdhost.SUBID_START + lxdhost.SUBID_COUNT
    assert (IDMAP_USER_LAST - IDMAP_USER_FIRST) // IDMAP_BLOCK + 1 >= 1000


def test_subids_added_when_missing():
    new, changed = lxdhost.subid_lines("")
    assert changed and new.count(":") == 4


def test_subnet_skips_clashes():
    taken = [ipaddress.ip_network("10.213.87.0/24"), ipaddress.ip_network("10.0.0.0/8")]
    assert lxdhost.choose_subnet(taken) == "172.29.83.1/24"
    with pytest.raises(lxdhost.SetupError):
        lxdhost.choose_subnet([ipaddress.ip_network("0.0.0.0/0")])


def test_preseed_only_creates_what_is_missing():
    seed = lxdhost.preseed(True, False, True, subnet="10.213.87.1/24")
    assert list(seed) == ["networks"]
    net = seed["networks"][0]["config"]
    assert net["ipv4.address"] == "10.213.87.1/24" and net["ipv6.address"] == "none"
    assert lxdhost.preseed(True, True, True, subnet="") == {}
    full = lxdhost.preseed(False, False, False, subnet="10.213.87.1/24")
    assert full["storage_pools"][0]["driver"] == "btrfs"
    assert full["profiles"][0]["devices"]["eth0"]["network"] == lxdhost.BRIDGE
