"""The host setup against the real LXD: a rerun is harmless."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import lxdhost

pytestmark = pytest.mark.lxd
REPO = Path(__file__).resolve().parents[2]


def snapshot() -> dict[str, str]:
    out = {}
    for kind, name in (("storage", lxdhost.POOL), ("network", lxdhost.BRIDGE),
                       ("profile", lxdhost.PROFILE)):
        text = subprocess.run(["lxc", kind, "show", name], capture_output=True, text=True,
                              check=True).stdout
        # "used_by" lists whatever containers exist right now; not ours to compare.
        out[kind] = text.split("used_by:")[0]
    return out


def test_up_again_changes_nothing(lxd):
    before = snapshot()
    subuid = Path("/etc/subuid").read_text()
    proc = subprocess.run([sys.executable, str(REPO / "setup" / "lxdhost.py"), "up"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["running"] and info["subnet"]
    assert "created" not in proc.stdout and "restarting" not in proc.stdout
    assert snapshot() == before
    assert Path("/etc/subuid").read_text() == subuid


def test_bridge_subnet_clashes_with_no_other_route(lxd):
    import ipaddress
    subnet = ipaddress.ip_interface(json.loads(subprocess.run(
        [sys.executable, str(REPO / "setup" / "lxdhost.py"), "status"],
        capture_output=True, text=True, check=True).stdout)["subnet"]).network
    routes = json.loads(subprocess.run(["ip", "-j", "-4", "route"], capture_output=True,
                                       text=True, check=True).stdout)
    for r in routes:
        if r.get("dev") == lxdhost.BRIDGE or r.get("dst") in (None, "default"):
            continue
        assert not subnet.overlaps(ipaddress.ip_network(r["dst"], strict=False)), r


def test_root_subids_cover_every_user_block():
    from lxcspawner.container import IDMAP_BLOCK, IDMAP_USER_FIRST, IDMAP_USER_LAST
    for path in ("/etc/subuid", "/etc/subgid"):
        entries = [line.split(":") for line in Path(path).read_text().splitlines() if line]
        root = [(int(s), int(n)) for name, s, n in entries if name == "root"]
        assert any(s <= IDMAP_USER_FIRST and IDMAP_USER_LAST + IDMAP_BLOCK <= s + n
                   for s, n in root), (path, root)
