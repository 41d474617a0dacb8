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


def test_sysctls_are_only_ever_raised():
    current = {"fs.inotify.max_user_instances": 128, "kernel.keys.maxkeys": 5000,
               "vm.max_map_count": 262144}
    assert lxdhost.sysctl_raises(current) == {"fs.inotify.max_user_instances": 1048576}
    assert lxdhost.sysctl_raises({k: v for k, v in lxdhost.SYSCTLS.items()}) == {}


def test_tune_sysctls_writes_now_and_for_boot(tmp_path, monkeypatch):
    proc = tmp_path / "proc"
    for key, value in {"fs.inotify.max_user_instances": 128, "kernel.keys.maxkeys": 9999}.items():
        path = proc / key.replace(".", "/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{value}\n")
    monkeypatch.setattr(lxdhost, "SYSCTL_FILE", tmp_path / "sysctl.d" / "60-lxcgpu.conf")
    assert lxdhost.tune_sysctls(proc) == {"fs.inotify.max_user_instances": 1048576}
    assert (proc / "fs/inotify/max_user_instances").read_text() == "1048576\n"
    assert (proc / "kernel/keys/maxkeys").read_text() == "9999\n"
    boot = lxdhost.SYSCTL_FILE.read_text()
    assert "fs.inotify.max_user_instances = 1048576" in boot
    assert "kernel.keys.maxkeys = 9999" in boot
    assert lxdhost.tune_sysctls(proc) == {}
