"""The ``lxcgpu`` client against the real keyportal, hub, proxy and LXD.

The client is downloaded from the hub, as users get it, and runs as they run
it: its own process, an isolated interpreter (standard library only), a
config folder of its own, the demo hub's ``*.localhost`` name resolved to
loopback by the client itself (as browsers and curl do).
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys

import pytest

from lxcspawner import naming
from lxcspawner.lxd import LXD
from tests.fixtures.sshkeys import keypair
from tests.integration.test_keyportal_api import make_token

pytestmark = pytest.mark.lxd

USER, SERVER = "alice", "node1"


@pytest.fixture(scope="module")
def cli(hub, tmp_path_factory):
    """The client as downloaded from the hub: its path and a temporary home."""
    tmp = tmp_path_factory.mktemp("lxcgpu-cli")
    with hub.session() as s:
        r = s.get(f"{hub.url}/services/keyportal/lxcgpu", timeout=30)
    assert r.status_code == 200 and r.text.startswith("#!/usr/bin/env python3")
    path = tmp / "lxcgpu"
    path.write_text(r.text)
    path.chmod(0o755)
    return path, tmp


def run(cli, *argv, stdin: str = "") -> tuple[int, str, str]:
    """``lxcgpu ARGV`` as a user runs it: its own process, an isolated
    interpreter (nothing of the project importable), its own config folder."""
    path, tmp = cli
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp), "XDG_CONFIG_HOME": str(tmp / "config"),
           "LANG": "C.UTF-8"}
    p = subprocess.run([sys.executable, "-I", str(path), *argv], input=stdin, env=env,
                       cwd=tmp, capture_output=True, text=True, timeout=900)
    return p.returncode, p.stdout, p.stderr


def test_login_status_snapshots_forwards_keys_and_ssh_config(hub, cli, tmp_path):
    rc, out, err = run(cli, "--help")
    assert rc == 0 and "snapshot" in out, err
    rc, out, err = run(cli, "status")
    assert rc == 1 and "not logged in" in err
    token = make_token(hub, USER)
    # Without the hub's CA: refused, and told how to give it.
    rc, out, err = run(cli, "login", hub.url, stdin=token + "\n")
    assert rc == 1 and "--ca FILE" in err, err
    rc, out, err = run(cli, "login", hub.url, "--ca", str(hub.ca_file),
                       stdin="not-a-token\n")
    assert rc == 1 and "log in" in err, err
    rc, out, err = run(cli, "login", hub.url, "--ca", str(hub.ca_file),
                       stdin=token + "\n")
    assert rc == 0 and f"as {USER}" in out, err
    config = cli[1] / "config" / "lxcgpu" / "config.json"
    assert stat.S_IMODE(os.stat(config).st_mode) == 0o600
    assert json.loads(config.read_text())["token"] == token

    rc, out, err = run(cli, "start", SERVER)
    assert rc == 0 and "ssh -p" in out, err
    rc, out, err = run(cli, "status")
    assert rc == 0 and SERVER in out and "running" in out, err

    _, pub = keypair(tmp_path, "cli")
    (tmp_path / "cli.pub").write_text(pub + "\n")
    rc, out, err = run(cli, "keys", "add", str(tmp_path / "cli.pub"))
    assert rc == 0 and f"{SERVER}: done" in out, err
    fp = out.split()[1]
    rc, out, err = run(cli, "keys", "--json")
    assert fp in [k["fingerprint"] for k in json.loads(out)]
    rc, out, err = run(cli, "keys", "remove", fp)
    assert rc == 1 and "--yes" in err          # asks first; no terminal here
    rc, out, err = run(cli, "keys", "remove", fp, "--yes")
    assert rc == 0 and "removed" in out, err

    lxd = LXD(timeout=120, retries=1)
    name = naming.instance_name(USER, SERVER, hub.run_tag)
    try:
        asyncio.run(lxd.put_file(name, "/home/alice/notes.txt", "kept\n"))
        rc, out, err = run(cli, "snapshot", SERVER, "cli-test")
        assert rc == 0 and "cli-test" in out, err
        rc, out, err = run(cli, "snapshot", SERVER, "bad name")
        assert rc == 1 and "not a snapshot name" in err
        rc, out, err = run(cli, "snapshots", SERVER)
        assert rc == 0 and "cli-test" in out
        asyncio.run(lxd.put_file(name, "/home/alice/notes.txt", "lost\n"))
        rc, out, err = run(cli, "restore", SERVER, "cli-test", "--yes")
        assert rc == 0 and "back at cli-test" in out, err
        assert asyncio.run(lxd.get_file(name, "/home/alice/notes.txt")) == b"kept\n"
        rc, out, err = run(cli, "delete-snapshot", SERVER, "cli-test", "--yes")
        assert rc == 0, err
        # lxc-gpu's rebuild: a new system, the home kept.
        asyncio.run(lxd.put_file(name, "/usr/local/bin/mine", "#!/bin/sh\n", mode=0o755))
        rc, out, err = run(cli, "rebuild", SERVER)
        assert rc == 1 and "--yes" in err and "home" in err
        rc, out, err = run(cli, "rebuild", SERVER, "--yes")
        assert rc == 0 and "has a new system" in out, err
        assert "  starting ..." in err or "  stopping container ..." in err, err
        rc, out, err = run(cli, "operations")
        assert rc == 0 and "rebuild" in out and "done" in out, out
        rc, out, err = run(cli, "gpus", SERVER)
        assert rc == 0 and out.strip() == f"{SERVER} has no GPUs", out + err
        rc, out, err = run(cli, "gpus", SERVER, "0")
        assert rc == 1 and "has no GPU '0'" in err
        assert asyncio.run(lxd.get_file(name, "/home/alice/notes.txt")) == b"kept\n"
        assert asyncio.run(lxd.file_entry(name, "/usr/local/bin/mine")) is None
        rc, out, err = run(cli, "snapshot", SERVER, "with-home")
        rc, out, err = run(cli, "snapshots", SERVER)
        assert rc == 0 and "HOME" in out and "with-home" in out and "yes" in out, out
        rc, out, err = run(cli, "delete-snapshot", SERVER, "with-home", "--yes")
        assert rc == 0, err
    finally:
        lxd.close()

    rc, out, err = run(cli, "schedule", SERVER, "@daily", "2")
    assert rc == 0 and "@daily, the newest 2 kept" in out, err
    rc, out, err = run(cli, "schedule", SERVER, "@daily")
    assert rc == 1 and "how many to keep" in err
    rc, out, err = run(cli, "schedule", SERVER, "off")
    assert rc == 0 and "no scheduled snapshots" in out, err

    rc, out, err = run(cli, "forward", SERVER, "6006")
    assert rc == 0 and "port 6006" in out, err
    rc, out, err = run(cli, "forwards", SERVER)
    assert rc == 0 and "6006" in out
    rc, out, err = run(cli, "unforward", SERVER, "6006")
    assert rc == 0, err
    rc, out, err = run(cli, "forward", SERVER, "99999")
    assert rc == 1 and "65535" in err

    rc, out, err = run(cli, "ssh-config", "--identity", "~/.ssh/id_ed25519")
    assert rc == 0 and f"Host {SERVER}\n" in out and "IdentityFile ~/.ssh/id_ed25519" in out
    rc, out, err = run(cli, "start", "nowhere")
    assert rc == 1 and "unknown GPU server" in err
    lxd = LXD(timeout=120, retries=1)
    try:
        asyncio.run(lxd.delete_instance(name))
        asyncio.run(lxd.delete_volume("lxcgpu", f"{name}-home"))
    finally:
        lxd.close()
