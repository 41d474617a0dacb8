"""Refusals that need no daemon: weak SSH keys, the extra config allow-list,
exec environments, the store's file modes (the caps: tests/security)."""

from __future__ import annotations

import base64
import os
import stat
import struct
import subprocess

import pytest

from lxcspawner.container import IDMAP_USER_FIRST, ContainerSpec, check_extra_key
from lxcspawner.lxd import LXD
from lxcspawner.provision import authorized_keys_text
from lxcspawner.sshkeys import WeakKeyError, normalize_public_key, rsa_bits
from lxcspawner.store import InvalidInput, Store


def rsa_key(tmp_path, bits: int) -> str:
    path = tmp_path / f"rsa{bits}"
    if not path.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "rsa", "-b", str(bits), "-N", "", "-f", str(path)],
                       check=True)
    return (tmp_path / f"rsa{bits}.pub").read_text().strip()


def dss_key() -> str:
    kind = "ssh-dss"
    blob = b"".join(struct.pack(">I", len(f)) + f for f in
                    (kind.encode(), b"\x00" + b"p" * 128, b"q" * 20, b"g" * 128, b"y" * 128))
    return f"{kind} {base64.b64encode(blob).decode()}"


def test_rsa_key_sizes(tmp_path):
    for bits in (1024, 2048):
        key = rsa_key(tmp_path, bits)
        assert rsa_bits(base64.b64decode(key.split()[1])) == bits
    with pytest.raises(WeakKeyError, match="1024 bits.*2048.*ssh-keygen -t ed25519"):
        normalize_public_key(rsa_key(tmp_path, 1024))
    assert normalize_public_key(rsa_key(tmp_path, 2048)).startswith("ssh-rsa AAAA")


def test_dss_key_is_refused_with_a_reason():
    with pytest.raises(WeakKeyError, match="DSA keys.*ssh-keygen -t ed25519"):
        normalize_public_key(dss_key())


def test_store_refuses_weak_keys_in_a_sentence(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 's.sqlite'}")
    with pytest.raises(InvalidInput, match="DSA keys"):
        store.add_key("alice", dss_key(), actor="alice")
    with pytest.raises(InvalidInput, match="1024 bits"):
        store.add_key("alice", rsa_key(tmp_path, 1024), actor="alice")
    assert store.get_user("alice") is None or store.list_keys("alice") == []


def test_weak_keys_already_stored_are_left_out_not_fatal(tmp_path):
    good = rsa_key(tmp_path, 2048)
    assert authorized_keys_text([dss_key(), good]) == good + "\n"


def spec(**extra):
    return ContainerSpec(user="alice", server="node1", idmap_base=IDMAP_USER_FIRST,
                         extra_config=extra)


@pytest.mark.parametrize("key", [
    "limits.memory.swap", "boot.autostart", "snapshots.schedule", "environment.TZ",
    "nvidia.runtime", "user.lab.note", "security.nesting",
])
def test_extra_config_allows_the_list(key):
    check_extra_key(key)
    assert spec(**{key: "x"}).config()[key] == "x"


@pytest.mark.parametrize("key", [
    "security.privileged", "security.idmap.isolated", "security.idmap.base",
    "security.syscalls.intercept.mount", "raw.lxc", "raw.idmap", "raw.apparmor",
    "linux.kernel_modules", "user.lxcgpu.owner", "volatile.eth0.hwaddr", "limits.",
    "user.", "image.os", "migration.stateful",
])
def test_extra_config_refuses_the_rest(key):
    with pytest.raises(ValueError, match=f"may not set {key}"):
        spec(**{key: "true"})


async def test_execute_refuses_any_environment():
    client = LXD("/nonexistent/unix.socket")
    with pytest.raises(ValueError, match="host command line"):
        await client.execute("c1", ["true"], env={"TOKEN": "secret"})
    client.close()


def test_store_files_are_private(tmp_path):
    db = tmp_path / "lxcgpu.sqlite"
    Store(f"sqlite:///{db}").ensure_user("alice")
    for f in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        if f.exists():
            assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    os.chmod(db, 0o644)
    Store(f"sqlite:///{db}")
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
