"""The ``lxcgpu`` client against the real keyportal, hub, proxy and LXD.

The client is downloaded from the hub, as users get it, and runs on its own
(standard library only: checked in an isolated interpreter).  Its commands
run in this process so that the hub's *.localhost name resolves as in the
other hub tests; its config lives in a temporary XDG_CONFIG_HOME.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import stat
import subprocess
import sys
import types

import pytest

from lxcspawner import naming
from lxcspawner.lxd import LXD
from tests.fixtures.sshkeys import keypair
from tests.integration.test_keyportal_api import make_token

pytestmark = pytest.mark.lxd

USER, SERVER = "alice", "node1"


@pytest.fixture(scope="module")
def cli(hub, tmp_path_factory):
    """The client module as downloaded from the hub."""
    tmp = tmp_path_factory.mktemp("lxcgpu-cli")
    with hub.session() as s:
        r = s.get(f"{hub.url}/services/keyportal/lxcgpu", timeout=30)
    assert r.status_code == 200 and r.text.startswith("#!/usr/bin/env python3")
    path = tmp / "lxcgpu"
    path.write_text(r.text)
    path.chmod(0o755)
    # On its own: an isolated interpreter, no project on the path.
    p = subprocess.run([sys.executable, "-I", str(path), "--help"], capture_output=True,
                       text=True, cwd=tmp, timeout=30)
    assert p.returncode == 0 and "snapshot" in p.stdout, p.stderr
    module = types.ModuleType("lxcgpu_cli")
    module.__file__ = str(path)
    exec(compile(r.text, str(path), "exec"), module.__dict__)
    return module, tmp


def run(cli, monkeypatch, *argv, stdin: str = "") -> tuple[int, str, str]:
    module, tmp = cli
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp / "config"))
    for var in ("LXCGPU_HUB", "LXCGPU_TOKEN", "LXCGPU_CA"):
        monkeypatch.delenv(var, raising=False)
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    rc = module.main(list(argv))
    monkeypatch.undo()
    return rc, out.getvalue(), err.getvalue()


def test_login_status_snapshots_forwards_keys_and_ssh_config(hub, cli, monkeypatch, tmp_path):
    rc, out, err = run(cli, monkeypatch, "status")
    assert rc == 1 and "not logged in" in err
    token = make_token(hub, USER)
    # Without the hub's CA: refused, and told how to give it.
    rc, out, err = run(cli, monkeypatch, "login", hub.url, stdin=token + "\n")
    assert rc == 1 and "--ca FILE" in err, err
    rc, out, err = run(cli, monkeypatch, "login", hub.url, "--ca", str(hub.ca_file),
                       stdin="not-a-token\n")
    assert rc == 1 and "log in" in err, err
    rc, out, err = run(cli, monkeypatch, "login", hub.url, "--ca", str(hub.ca_file),
                       stdin=token + "\n")
    assert rc == 0 and f"as {USER}" in out, err
    config = cli[1] / "config" / "lxcgpu" / "config.json"
    assert stat.S_IMODE(os.stat(config).st_mode) == 0o600
    assert json.loads(config.read_text())["token"] == token

    rc, out, err = run(cli, monkeypatch, "start", SERVER)
    assert rc == 0 and "ssh -p" in out, err
    rc, out, err = run(cli, monkeypatch, "status")
    assert rc == 0 and SERVER in out and "running" in out, err

    _, pub = keypair(tmp_path, "cli")
    (tmp_path / "cli.pub").write_text(pub + "\n")
    rc, out, err = run(cli, monkeypatch, "keys", "add", str(tmp_path / "cli.pub"))
    assert rc == 0 and f"{SERVER}: done" in out, err
    fp = out.split()[1]
    rc, out, err = run(cli, monkeypatch, "keys", "--json")
    assert fp in [k["fingerprint"] for k in json.loads(out)]
    rc, out, err = run(cli, monkeypatch, "keys", "remove", fp)
    assert rc == 1 and "--yes" in err          # asks first; no terminal here
    rc, out, err = run(cli, monkeypatch, "keys", "remove", fp, "--yes")
    assert rc == 0 and "removed" in out, err

    lxd = LXD(timeout=120, retries=1)
    name = naming.instance_name(USER, SERVER, hub.run_tag)
    try:
        asyncio.run(lxd.put_file(name, "/home/alice/notes.txt", "kept\n"))
        rc, out, err = run(cli, monkeypatch, "snapshot", SERVER, "cli-test")
        assert rc == 0 and "cli-test" in out, err
        rc, out, err = run(cli, monkeypatch, "snapshot", SERVER, "bad name")
        assert rc == 1 and "not a snapshot name" in err
        rc, out, err = run(cli, monkeypatch, "snapshots", SERVER)
        assert rc == 0 and "cli-test" in out
        asyncio.run(lxd.put_file(name, "/home/alice/notes.txt", "lost\n"))
        rc, out, err = run(cli, monkeypatch, "restore", SERVER, "cli-test", "--yes")
        assert rc == 0 and "back at cli-test" in out, err
        assert asyncio.run(lxd.get_file(name, "/home/alice/notes.txt")) == b"kept\n"
        rc, out, err = run(cli, monkeypatch, "delete-snapshot", SERVER, "cli-test", "--yes")
        assert rc == 0, err
    finally:
        lxd.close()

    rc, out, err = run(cli, monkeypatch, "forward", SERVER, "6006")
    assert rc == 0 and "port 6006" in out, err
    rc, out, err = run(cli, monkeypatch, "forwards", SERVER)
    assert rc == 0 and "6006" in out
    rc, out, err = run(cli, monkeypatch, "unforward", SERVER, "6006")
    assert rc == 0, err
    rc, out, err = run(cli, monkeypatch, "forward", SERVER, "99999")
    assert rc == 1 and "65535" in err

    rc, out, err = run(cli, monkeypatch, "ssh-config", "--identity", "~/.ssh/id_ed25519")
    assert rc == 0 and f"Host {SERVER}\n" in out and "IdentityFile ~/.ssh/id_ed25519" in out
    rc, out, err = run(cli, monkeypatch, "start", "nowhere")
    assert rc == 1 and "unknown GPU server" in err
