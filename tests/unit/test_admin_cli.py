"""``lxcgpu-admin`` on a temporary SQLite store: arguments, output, exit
codes, and bad input that changes nothing.  No LXD: the settings point at a
socket that does not exist, so commands that would touch a container say so."""

import base64
import io
import json
import os
import pwd
import struct
import sys

import pytest

from lxcspawner import admin
from lxcspawner.settings import Settings
from lxcspawner.store import Store


def fake_key(kind="ssh-ed25519", fill=b"k", comment=""):
    blob = struct.pack(">I", len(kind)) + kind.encode() + struct.pack(">I", 32) + fill * 32
    if kind == "ssh-rsa":  # and a 2048-bit modulus
        blob += struct.pack(">I", 257) + b"\0\xc1" + fill * 255
    return f"{kind} {base64.b64encode(blob).decode()}" + (f" {comment}" if comment else "")


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A settings file naming a temp store; LXD unreachable."""
    config = tmp_path / "lxcgpu.toml"
    config.write_text(f"""
[store]
url = "sqlite:///{tmp_path / 'store.sqlite'}"
[ports]
forward_limit = 2
[servers.gpu17]
lxd = "{tmp_path / 'no-lxd.socket'}"
[servers.gpu18]
lxd = "{tmp_path / 'no-lxd-either.socket'}"
""")
    monkeypatch.setenv("LXCGPU_CONFIG", str(config))
    monkeypatch.setenv("SUDO_USER", "sysadm")
    # The host's /etc/subuid may grant root fewer ids than the users' range;
    # the store is told of a grant file that does not exist (no limit).
    open_store = Settings.open_store
    monkeypatch.setattr(Settings, "open_store", lambda self, **kw: open_store(
        self, subuid_file=str(tmp_path / "no-subuid"), **kw))
    return tmp_path


@pytest.fixture
def cli(site, capsys, monkeypatch):
    """Run ``lxcgpu-admin ARGS`` -> (exit status, stdout, stderr)."""
    def run(*args, stdin=None):
        if stdin is not None:
            monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        rc = admin.main(list(args))
        out, err = capsys.readouterr()
        return rc, out, err
    return run


@pytest.fixture
def store(site):
    s = Settings.load().open_store()
    yield s
    s.close()


def test_user_add_show_list(cli):
    rc, out, err = cli("user", "add", "alice")
    assert rc == 0 and err == ""
    assert "ssh port  22000" in out and "id base   10000000" in out and "added" in out
    rc, out, _ = cli("user", "add", "alice", "--json")
    data = json.loads(out)
    assert (data["ssh_port"], data["idmap_base"], data["new"], data["login"]) == (
        22000, 10000000, False, "alice")
    cli("user", "add", "Dr. Müller")
    rc, out, _ = cli("--json", "user", "list")
    assert [(u["name"], u["ssh_port"]) for u in json.loads(out)] == [
        ("Dr. Müller", 22001), ("alice", 22000)]
    rc, out, _ = cli("user", "list")
    lines = out.splitlines()
    assert lines[0].split() == ["USER", "SSH", "PORT", "ID", "BASE", "CREATED"]
    assert lines[2].startswith("alice  ") and "10000000" in lines[2]
    rc, out, _ = cli("user", "show", "Dr. Müller", "--json")
    data = json.loads(out)
    assert data["login"].startswith("dr-muller-") and data["keys"] == data["forwards"] == []
    rc, out, _ = cli("user", "show", "alice")
    assert "ssh -p 22000 alice@<server>" in out and "keys:\n(none)" in out
    # The id base `user add` showed is fixed: no prebuilt container's replaces it.
    assert "id base   10000000\n" in out and json.loads(
        cli("user", "show", "alice", "--json")[1])["idmap_used"] is True


def test_an_id_base_not_fixed_yet_says_so(cli, store):
    store.ensure_user("bob", actor="test")      # as the hub or the portal registers
    rc, out, _ = cli("user", "show", "bob")
    assert "(until their first container, which may bring another; `user add` fixes it)" \
        in out
    cli("user", "add", "bob")
    assert "may bring another" not in cli("user", "show", "bob")[1]


def test_unknown_user_is_one_line_exit_1(cli):
    rc, out, err = cli("user", "show", "nobody")
    assert (rc, out) == (1, "")
    assert err == "lxcgpu-admin: There is no lxcgpu user 'nobody'.\n"
    for args in (["key", "list", "nobody"], ["forward", "list", "nobody"]):
        rc, _, err = cli(*args)
        assert rc == 1 and err.count("\n") == 1 and "Traceback" not in err


def test_key_add_from_file_and_stdin(cli, site, store):
    a, b, c = fake_key(comment="alice@laptop"), fake_key("ssh-rsa", b"r"), fake_key(fill=b"c")
    keyfile = site / "keys.pub"
    keyfile.write_text(f"# alice's keys\n\n{a}\n   \n{b}\n")
    rc, out, err = cli("key", "add", "alice", str(keyfile))
    assert rc == 0, err
    assert out.count("added") == 2 and "alice@laptop" in out
    assert "new user alice: SSH port 22000" in err
    assert store.authorized_keys("alice") == [a, b]
    # Again: nothing new; then one more from stdin, named "-" or not at all.
    rc, out, _ = cli("key", "add", "alice", str(keyfile), "--json")
    assert [r["added"] for r in json.loads(out)] == [False, False]
    rc, out, _ = cli("key", "add", "alice", "-", stdin=f"{c}\n")
    assert rc == 0 and "added" in out
    rc, out, _ = cli("key", "add", "bob", stdin=f"{c}\n")
    assert rc == 0 and store.authorized_keys("bob") == [c]
    rc, out, _ = cli("key", "list", "alice", "--json")
    keys = json.loads(out)
    assert [k["key"] for k in keys] == [a, b, c]
    assert all(k["fingerprint"].startswith("SHA256:") for k in keys)
    rc, out, _ = cli("key", "list", "alice")
    assert out.splitlines()[0].split() == ["ID", "FINGERPRINT", "TYPE", "COMMENT", "ADDED"]
    assert "ssh-rsa" in out


def test_one_bad_key_line_adds_nothing(cli, site, store):
    a = fake_key()
    store.add_key("alice", a, actor="test")
    before = (store.list_keys("alice"), store.audit_log())
    bad = site / "keys.pub"
    bad.write_text(f"{fake_key(fill=b'x')}\n# comment\n{fake_key('ssh-rsa')}\n"
                   'command="sh" ' f"{fake_key(fill=b'y')}\n")
    rc, out, err = cli("key", "add", "alice", str(bad))
    assert (rc, out) == (1, "")
    assert "line 4" in err and "Nothing was added" in err and err.count("\n") == 1
    assert (store.list_keys("alice"), store.audit_log()) == before
    # A new user is not even created.
    rc, _, err = cli("key", "add", "carol", str(bad))
    assert rc == 1 and store.get_user("carol") is None
    for text in ("", "# only a comment\n\n", "not a key\n"):
        rc, _, err = cli("key", "add", "alice", stdin=text)
        assert rc == 1 and "stdin" in err
    assert store.list_keys("alice") == before[0]


def test_private_key_is_refused_and_never_echoed(cli, site, store):
    secret = base64.b64encode(b"openssh-key-v1\0" + b"s" * 60).decode()
    path = site / "id_ed25519"
    path.write_text(f"-----BEGIN OPENSSH PRIVATE KEY-----\n{secret}\n"
                    "-----END OPENSSH PRIVATE KEY-----\n")
    rc, out, err = cli("key", "add", "alice", str(path))
    assert rc == 1 and "line 1" in err and "private key" in err
    assert secret not in out + err
    assert store.get_user("alice") is None


def test_a_key_on_the_command_line_is_not_a_key(cli, store):
    # The second argument is a file name: a pasted key is refused as such.
    rc, _, err = cli("key", "add", "alice", fake_key())
    assert rc == 1 and "No such file" in err
    assert store.get_user("alice") is None


def test_key_remove(cli, store):
    k1 = store.add_key("alice", fake_key(fill=b"1"), actor="test")
    k2 = store.add_key("alice", fake_key(fill=b"2", comment="old"), actor="test")
    rc, out, _ = cli("key", "remove", "alice", k2.fingerprint)
    assert rc == 0 and out == f"removed key {k2.id} {k2.fingerprint} old\n"
    rc, out, _ = cli("key", "remove", "alice", str(k1.id), "--json")
    assert json.loads(out)["fingerprint"] == k1.fingerprint
    assert store.list_keys("alice") == []
    rc, _, err = cli("key", "remove", "alice", str(k1.id))
    assert rc == 1 and "has no key" in err
    rc, _, err = cli("key", "remove", "alice", "nonsense")
    assert rc == 1 and "fingerprint" in err


def test_forwards(cli, store):
    rc, out, err = cli("forward", "add", "alice", "8888")
    assert rc == 0, err
    first, result, hint = out.splitlines()
    assert first == "alice: gpu17:11000 -> container port 8888/tcp"
    # LXD is not reachable here: the store keeps the forward, the output says so.
    assert result.startswith("gpu17: unreachable: the GPU server's LXD did not answer")
    assert "next start" in hint and "container sync alice" in hint
    rc, out, _ = cli("forward", "add", "alice", "8888", "--json")  # the same again
    data = json.loads(out)
    assert data["forward"]["host_port"] == 11000
    assert data["container"]["server"] == "gpu17"
    assert data["container"]["status"] == "unreachable"
    rc, out, _ = cli("forward", "add", "alice", "6006", "--server", "gpu18")
    assert "gpu18:11000" in out and "gpu18: unreachable" in out
    rc, _, err = cli("forward", "add", "alice", "6006", "--server", "gpu19")
    assert rc == 1 and "unknown GPU server 'gpu19'" in err and "gpu17, gpu18" in err
    cli("forward", "add", "bob", "22")
    rc, out, _ = cli("forward", "list", "--json")
    assert [(f["user"], f["server"], f["host_port"], f["container_port"])
            for f in json.loads(out)] == [("alice", "gpu17", 11000, 8888),
                                          ("bob", "gpu17", 11001, 22),
                                          ("alice", "gpu18", 11000, 6006)]
    rc, out, _ = cli("forward", "list", "alice", "--server", "gpu18", "--json")
    assert [f["container_port"] for f in json.loads(out)] == [6006]
    rc, out, _ = cli("forward", "list", "bob")
    assert out.splitlines()[1].split()[:4] == ["bob", "gpu17", "11001", "22"]
    # The limit (2 in this site's settings) is one clear line.
    cli("forward", "add", "alice", "1")
    before = store.list_forwards()
    rc, _, err = cli("forward", "add", "alice", "2")
    assert rc == 1 and "at most 2" in err and err.count("\n") == 1
    assert store.list_forwards() == before
    # Remove by container port, or by host port.
    rc, out, _ = cli("forward", "remove", "alice", "8888")
    assert rc == 0 and out.startswith("alice: removed gpu17:11000 -> container port 8888")
    rc, out, _ = cli("forward", "remove", "bob", "11001", "--host-port")
    assert rc == 0 and "removed gpu17:11001" in out
    rc, _, err = cli("forward", "remove", "bob", "11001", "--host-port")
    assert rc == 1 and "no forward on host port 11001" in err
    assert [(f.user, f.container_port) for f in store.list_forwards()] == [
        ("alice", 1), ("alice", 6006)]


@pytest.mark.parametrize("args", [
    ["forward", "add", "alice", "99999"], ["forward", "add", "alice", "0"],
    ["forward", "add", "alice", "http"], ["forward", "remove", "alice", "-1"],
    ["forward", "add", "alice"], ["audit", "--limit", "0"], ["audit", "--limit", "x"],
    ["user"], ["user", "frobnicate"], [], ["key", "add"],
])
def test_bad_command_lines_exit_2_and_change_nothing(cli, site, args):
    with pytest.raises(SystemExit) as e:
        cli(*args)
    assert e.value.code == 2
    assert not (site / "store.sqlite").exists()


def test_bad_server_name_changes_nothing(cli, store):
    rc, _, err = cli("forward", "add", "alice", "80", "--server", "GPU 1")
    assert rc == 1 and "not a GPU server name" in err
    assert store.get_user("alice") is None and store.list_forwards() == []


def test_audit(cli, store):
    cli("user", "add", "alice")
    cli("key", "add", "alice", stdin=fake_key() + "\n")
    cli("forward", "add", "bob", "80")
    rc, out, _ = cli("audit", "--json")
    entries = json.loads(out)
    assert [(e["action"], e["target"]) for e in entries] == [
        ("forward.add", "bob"), ("user.create", "bob"), ("key.add", "alice"),
        ("user.create", "alice")]
    assert {e["actor"] for e in entries} == {"admin:sysadm"}
    rc, out, _ = cli("audit", "--user", "alice", "--limit", "1", "--json")
    assert [e["action"] for e in json.loads(out)] == ["key.add"]
    rc, out, _ = cli("audit", "--user", "alice")
    lines = out.splitlines()
    assert lines[0].split() == ["TIME", "ACTOR", "ACTION", "TARGET", "OK", "DETAIL"]
    assert "admin:sysadm  key.add" in lines[1]


def test_actor_without_sudo(monkeypatch):
    monkeypatch.delenv("SUDO_USER", raising=False)
    assert admin.current_actor() == f"admin:{pwd.getpwuid(os.geteuid()).pw_name}"
    monkeypatch.setenv("SUDO_USER", "jdoe")
    assert admin.current_actor() == "admin:jdoe"


def test_settings_errors(cli, site, monkeypatch):
    bad = site / "bad.toml"
    bad.write_text('[ports]\nshh = "22000-29999"\n')
    rc, _, err = cli("--config", str(bad), "user", "list")
    assert rc == 1 and err == (f"lxcgpu-admin: {bad}: unknown key 'shh' in [ports] "
                               "(known: ssh, forward, forward_limit, jupyter)\n")
    rc, _, err = cli("user", "list", "--config", str(site / "missing.toml"))
    assert rc == 1 and "missing.toml does not exist" in err
    monkeypatch.setenv("LXCGPU_CONFIG", str(site / "gone.toml"))
    rc, _, err = cli("user", "list")
    assert rc == 1 and "gone.toml does not exist" in err


def test_store_that_cannot_be_opened(cli, site):
    (site / "blocker").write_text("a file, not a directory")
    cfg = site / "c.toml"
    cfg.write_text(f'[store]\nurl = "sqlite:///{site}/blocker/store.sqlite"\n'
                   '[server]\nname = "gpu17"\n')
    rc, _, err = cli("--config", str(cfg), "user", "list")
    assert rc == 1 and err.startswith("lxcgpu-admin: ") and err.count("\n") == 1


def test_container_commands_without_lxd(cli, store):
    store.ensure_user("alice")
    rc, out, err = cli("container", "up", "alice")
    assert rc == 1 and out == ""
    assert "LXD is not reachable" in err and "Traceback" not in err
    # sync goes to every server and says, per server, what happened.
    rc, out, err = cli("container", "sync", "alice")
    assert rc == 1 and "Traceback" not in err
    assert [line.split(":", 2)[:2] for line in out.splitlines()[:2]] == [
        ["gpu17", " unreachable"], ["gpu18", " unreachable"]]
    assert "LXD is not reachable" in out and "on gpu17, gpu18 are not up to date" in err
    entries = store.audit_log(user="alice")
    assert [(e.action, e.ok) for e in entries[:2]] == [("container.sync", False),
                                                       ("container.up", False)]


def test_store_is_the_one_in_the_settings(site, store):
    assert isinstance(store, Store)
    assert (site / "store.sqlite").exists()
