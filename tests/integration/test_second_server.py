"""Two GPU servers: this machine's LXD and a second real LXD daemon reached
over HTTPS with a pinned certificate (tests/fixtures/lxd2.py), driven
through ``lxcgpu-admin`` as a sysadmin would.

bob's container is made on node2 with ``--server node2``; a key added once
reaches both his containers; with node2's LXD down the command names it
unreachable and node1 still gets the change; once node2 is back, a sync
brings it up to date.
"""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys

import pytest

from lxcspawner import naming, trust
from tests.fixtures.lxd import REPO
from tests.fixtures.lxd2 import TOKEN_CHARS
from tests.fixtures.sshkeys import keypair

pytestmark = pytest.mark.lxd

USER = "bob"
SSH_PORTS, FORWARD_PORTS = "28200-28299", "12100-12199"
FIRST_ID_BLOCK = 14650


@pytest.fixture(scope="module")
def site(tmp_path_factory, run_tag, second_lxd):
    tmp = tmp_path_factory.mktemp("two-servers")
    config = tmp / "lxcgpu.toml"
    config.write_text(f"""
[store]
url = "sqlite:///{tmp / 'lxcgpu.sqlite'}"
first_id_block = {FIRST_ID_BLOCK}
[ports]
ssh = "{SSH_PORTS}"
forward = "{FORWARD_PORTS}"
[servers.node1]
{second_lxd.site_table("node2")}
[containers]
prefix = "{run_tag}"
cpu = 1
memory = "1GiB"
""")
    yield config
    for server in ("node1", "node2"):
        admin(config, "container", "delete", USER, "--server", server, "--yes")


def admin(config, *argv: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "LXCGPU_CONFIG": str(config), "SUDO_USER": "sysadm"}
    return subprocess.run([sys.executable, "-m", "lxcspawner.admin", *argv], cwd=REPO,
                          env=env, input=stdin, capture_output=True, text=True, timeout=600)


def keys_in(run, name: str, login: str) -> str:
    return run("exec", name, "--", "cat", f"/home/{login}/.ssh/authorized_keys",
               check=False).stdout


def test_one_user_on_two_servers_and_one_of_them_down(site, second_lxd, run_tag, tmp_path):
    # Made on node2 (the second daemon), not here.
    r = admin(site, "--json", "container", "up", USER, "--server", "node2")
    assert r.returncode == 0, r.stderr
    up2 = json.loads(r.stdout)
    name2 = naming.instance_name(USER, "node2", run_tag)
    assert up2["name"] == name2 and up2["address"].startswith("10.213.88.")
    assert name2 in second_lxd.lxc("list", "--format", "csv", "-c", "n").stdout.split()
    assert subprocess.run(["lxc", "info", name2], capture_output=True).returncode != 0
    r = admin(site, "--json", "container", "up", USER)
    assert r.returncode == 0, r.stderr
    up1 = json.loads(r.stdout)
    assert up1["ssh_port"] == up2["ssh_port"]       # one port on every server
    login = naming.posix_name(USER)

    def here(*argv, check=True):
        return subprocess.run(["lxc", *argv], capture_output=True, text=True, check=check)

    # A key added once reaches both containers.
    _, pub = keypair(tmp_path, "bob-laptop")
    r = admin(site, "key", "add", USER, stdin=pub + "\n")
    assert r.returncode == 0, r.stderr
    assert "node1: done" in r.stderr and "node2: done" in r.stderr, r.stderr
    body = pub.split()[1]
    assert body in keys_in(here, up1["name"], login)
    assert body in keys_in(second_lxd.lxc, name2, login)

    # node2's LXD down: the change stands, node1 gets it, node2 is named.
    second_lxd.stop()
    try:
        _, pub2 = keypair(tmp_path, "bob-desktop")
        r = admin(site, "key", "add", USER, stdin=pub2 + "\n")
        assert r.returncode == 0, r.stderr
        assert "node1: done" in r.stderr and "node2: unreachable" in r.stderr, r.stderr
        assert "container sync bob" in r.stderr
        assert pub2.split()[1] in keys_in(here, up1["name"], login)
        r = admin(site, "container", "sync", USER)
        assert r.returncode == 1 and "node2: unreachable" in r.stdout
        assert "node2 are not up to date" in r.stderr
        r = admin(site, "container", "up", "carol", "--server", "node2")
        assert r.returncode == 1 and "not reachable" in r.stderr and "Traceback" not in r.stderr
    finally:
        second_lxd.start()
    # Back: the sync brings the key made meanwhile (the container restarted
    # with the daemon, or is started here).
    r = admin(site, "container", "up", USER, "--server", "node2")
    assert r.returncode == 0, r.stderr
    r = admin(site, "container", "sync", USER)
    assert r.returncode == 0 and "node2: done" in r.stdout, (r.stdout, r.stderr)
    assert pub2.split()[1] in keys_in(second_lxd.lxc, name2, login)


def test_a_server_presenting_another_certificate_is_refused(site, second_lxd, tmp_path):
    # A man in the middle (or a reinstalled server) presents a certificate
    # other than the pinned one: lxcgpu talks to it not at all.
    wrong = tmp_path / "lxcgpu.toml"
    wrong.write_text(site.read_text().replace(f'server_cert = "{second_lxd.server_cert}"',
                                              f'server_cert = "{second_lxd.client_cert}"'))
    assert wrong.read_text() != site.read_text()
    r = admin(wrong, "container", "sync", USER, "--server", "node2")
    assert r.returncode == 1 and "node2: unreachable" in r.stdout, (r.stdout, r.stderr)
    assert "Fingerprints did not match" in r.stdout
    # With the pinned certificate the same command works.
    r = admin(site, "container", "sync", USER, "--server", "node2")
    assert r.returncode == 0, (r.stdout, r.stderr)


def _gpu_server_setup(second_lxd, config, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "LXD_DIR": str(second_lxd.lxd_dir), "LXCGPU_CONFIG": str(config)}
    return subprocess.run([str(REPO / "setup" / "gpu-server"), "--name", "node2",
                           "--listen", second_lxd.address, "--no-agent", *extra],
                          capture_output=True, text=True, env=env, timeout=600)


def test_setup_gpu_server_again_and_the_trust_token(site, second_lxd, tmp_path):
    # The fixture set node2 up with setup/gpu-server and trusted this "hub"
    # with `lxcgpu-admin server trust node2` and the token it printed.
    assert "lxcgpu-admin server trust node2" in second_lxd.setup_output
    assert stat.S_IMODE(os.stat(second_lxd.client_key).st_mode) == 0o600
    r = admin(site, "--json", "server", "list")
    assert r.returncode == 0, r.stderr
    assert {row["name"]: row["state"] for row in json.loads(r.stdout)} == {
        "node1": "trusted", "node2": "trusted"}

    # A rerun checks and changes nothing: no new token while the hub is trusted.
    again = _gpu_server_setup(second_lxd, site)
    assert again.returncode == 0, again.stdout + again.stderr
    for said in ("is trusted here already", f"listens on {second_lxd.address}:8443 already",
                 "lxcgpu/default is here already"):
        assert said in again.stdout, again.stdout
    assert not [line for line in again.stdout.splitlines()
                if len(line) > 40 and set(line) <= set(TOKEN_CHARS)]

    # Another hub, with a token whose fingerprint is not node2's (a machine
    # in between answering for node2 would present its own certificate):
    # refused before anything is trusted or written.
    other = tmp_path / "other.toml"
    other.write_text(site.read_text().replace(str(second_lxd.client_cert.parent),
                                              str(tmp_path / "hub2")))
    assert str(tmp_path / "hub2") in other.read_text()
    made = _gpu_server_setup(second_lxd, site, "--new-token")
    genuine = [line for line in made.stdout.splitlines()
               if len(line) > 40 and set(line) <= set(TOKEN_CHARS)]
    assert made.returncode == 0 and len(genuine) == 1, made.stdout + made.stderr
    data = json.loads(base64.b64decode(genuine[0]))
    forged = base64.b64encode(json.dumps({**data, "fingerprint": "ab" * 32}).encode()).decode()
    trusted_before = second_lxd.lxc("config", "trust", "list", "--format", "csv").stdout
    r = admin(other, "server", "trust", "node2", stdin=forged + "\n")
    assert r.returncode == 1 and "not the token's" in r.stderr and "Nothing was trusted" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "hub2").exists()
    assert second_lxd.lxc("config", "trust", "list", "--format", "csv").stdout == trusted_before
    # Garbage is one sentence too.
    r = admin(other, "server", "trust", "node2", stdin="hello\n")
    assert r.returncode == 1 and "not an LXD trust token" in r.stderr

    # The genuine token: hub2 is trusted, its key private; used once only.
    r = admin(other, "server", "trust", "node2", stdin=genuine[0] + "\n")
    assert r.returncode == 0 and "trusts this hub now" in r.stdout, r.stdout + r.stderr
    hub2_cert = tmp_path / "hub2" / "lxd-client.crt"
    try:
        assert stat.S_IMODE(os.stat(tmp_path / "hub2" / "lxd-client.key").st_mode) == 0o600
        r = admin(other, "--json", "server", "list")
        assert {row["name"]: row["state"] for row in json.loads(r.stdout)}["node2"] == "trusted"
        third = tmp_path / "third.toml"
        third.write_text(site.read_text().replace(str(second_lxd.client_cert.parent),
                                                  str(tmp_path / "hub3")))
        r = admin(third, "server", "trust", "node2", stdin=genuine[0] + "\n")
        assert r.returncode == 1 and "refused the token" in r.stderr, r.stderr
        r = admin(third, "--json", "server", "list")
        assert json.loads(r.stdout)[1]["state"] == "NOT trusted"
        audit = admin(site, "--json", "audit", "--limit", "5")
        assert "server.trust" in audit.stdout
    finally:
        second_lxd.lxc("config", "trust", "remove",
                       trust.fingerprint_of(hub2_cert.read_text()), check=False)
