"""The hub config's helpers: the bridge address and the state directory's secrets."""

import json
import os
import stat

import pytest

from hub_config.bridge import BridgeError, parse_ipv4
from hub_config.statedir import hub_dir, secret_file


def ip_json(*addrs):
    return json.dumps([{"ifname": "lxcgpubr0", "addr_info": [
        {"family": fam, "local": a, "prefixlen": 24} for fam, a in addrs]}])


def test_bridge_address_is_the_first_ipv4():
    assert parse_ipv4(ip_json(("inet", "10.213.87.1"), ("inet", "10.213.88.1")),
                      "lxcgpubr0") == "10.213.87.1"


@pytest.mark.parametrize("text", ["", "[]", ip_json(("inet6", "fd42::1")), "not json"])
def test_bridge_without_ipv4_says_what_to_do(text):
    with pytest.raises(BridgeError) as e:
        parse_ipv4(text, "lxcgpubr0")
    assert "lxcgpubr0" in str(e.value)


def test_state_dir_is_private(tmp_path):
    d = hub_dir({"LXCGPU_HUB_DIR": str(tmp_path / "hub")})
    assert d == tmp_path / "hub" and stat.S_IMODE(d.stat().st_mode) == 0o700


def test_secret_is_generated_once_private_and_kept(tmp_path):
    path = tmp_path / "proxy_token"
    first = secret_file(path)
    assert len(first) == 64 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert secret_file(path) == first
    assert [p.name for p in tmp_path.iterdir()] == ["proxy_token"]  # no temp files left


def test_secret_readable_by_others_or_empty_is_refused(tmp_path):
    path = tmp_path / "proxy_token"
    path.write_text("abc\n")
    os.chmod(path, 0o644)
    with pytest.raises(PermissionError):
        secret_file(path)
    os.chmod(path, 0o600)
    path.write_text("\n")
    with pytest.raises(ValueError):
        secret_file(path)
