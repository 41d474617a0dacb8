"""User containers on the real LXD, from the real template image."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from pathlib import Path

import pytest

from lxcspawner import naming
from lxcspawner.container import (
    IDMAP_BLOCK, ContainerError, ContainerSpec, Mount, ensure_container, idmap_ranges,
    start_container,
)
from lxcspawner.lxd import LXD, ImageNotFound, LXDUnavailable
from lxcspawner.provision import provision
from tests.fixtures.sshkeys import keypair, ssh_banner

pytestmark = pytest.mark.lxd


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("keys")
    return {u: keypair(tmp, u) for u in ("alice", "bob")}


@pytest.fixture(scope="module")
def shared_dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("shared")
    data, scratch = base / "datasets", base / "scratch"
    data.mkdir()
    scratch.mkdir()
    (data / "README").write_text("lab dataset\n")
    os.chmod(base, 0o755)
    os.chmod(data, 0o755)
    os.chmod(scratch, 0o1777)  # like /tmp: every container's users may write
    return data, scratch


@pytest.fixture(scope="module")
async def alice(lxd, user_containers, keys, shared_dirs):
    data, scratch = shared_dirs
    spec = await user_containers(
        "alice", cpu="1", memory="1GiB", processes=2000,
        mounts=(Mount(str(data), "/data"), Mount(str(scratch), "/scratch", readonly=False)))
    addr = await start_container(lxd, spec.name)
    await provision(lxd, spec.name, login=spec.posix_user, keys=[keys["alice"][1]],
                    hostname=spec.hostname)
    return spec, addr


@pytest.fixture(scope="module")
async def bob(lxd, user_containers, keys):
    spec = await user_containers("bob")
    addr = await start_container(lxd, spec.name)
    await provision(lxd, spec.name, login=spec.posix_user, keys=[keys["bob"][1]],
                    hostname=spec.hostname)
    return spec, addr


async def run_in(lxd: LXD, name: str, *argv: str, user: int = 0) -> str:
    return (await lxd.execute(name, list(argv), user=user, group=user)).check(argv).stdout


async def test_alice_container_runs_systemd_and_sshd(lxd, alice, logs_on_failure):
    spec, addr = alice
    logs_on_failure.append(spec.name)
    st = await lxd.state(spec.name)
    assert st.running and st.ipv4 == addr
    res = await lxd.execute(spec.name, ["systemctl", "is-system-running", "--wait"],
                            timeout=90)
    assert res.stdout.strip() == "running", res.stdout + res.stderr
    banner = await asyncio.to_thread(ssh_banner, addr)
    assert banner.startswith(b"SSH-2.0-OpenSSH")


async def test_alice_account_key_sudo_hostname(lxd, alice, keys, tmp_path, logs_on_failure):
    spec, addr = alice
    logs_on_failure.append(spec.name)
    assert spec.posix_user == "alice"
    passwd = await run_in(lxd, spec.name, "getent", "passwd", "alice")
    uid = int(passwd.split(":")[2])
    assert uid >= 1000 and passwd.strip().endswith(":/home/alice:/bin/bash")
    ak = await lxd.get_file(spec.name, "/home/alice/.ssh/authorized_keys")
    assert ak.decode() == keys["alice"][1] + "\n"
    stat = await run_in(lxd, spec.name, "stat", "-c", "%a %U", "/home/alice/.ssh",
                        "/home/alice/.ssh/authorized_keys")
    assert stat.split("\n")[:2] == ["700 alice", "600 alice"]
    assert (await run_in(lxd, spec.name, "sudo", "-n", "id", "-u", user=uid)).strip() == "0"
    assert (await run_in(lxd, spec.name, "hostname")).strip() == "node1-alice"
    # Real SSH with alice's key lands in her container, as her; password login is off.
    key = keys["alice"][0]
    out = subprocess.run(
        ["ssh", "-i", str(key), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
         "-o", "UserKnownHostsFile=/dev/null", "-o", "ConnectTimeout=10",
         f"alice@{addr}", "hostname; whoami"], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["node1-alice", "alice"], out.stderr
    refused = subprocess.run(
        ["ssh", "-i", str(keys["bob"][0]), "-o", "BatchMode=yes", "-o",
         "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
         f"alice@{addr}", "true"], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 255 and "Permission denied" in refused.stderr


async def test_an_exec_leaves_no_output_with_lxd(lxd, alice):
    """LXD keeps an exec's recorded output until it is deleted: the output is
    read first, then LXD's copies go (after the caller has its result)."""
    spec, _ = alice
    out = await lxd.execute(spec.name, ["echo", "lxcgpu-exec-output"])
    assert out.stdout == "lxcgpu-exec-output\n"
    deadline = time.monotonic() + 10
    while True:
        logs = (await lxd.run(lxd._request, "get", f"/1.0/instances/{spec.name}/logs")).json()
        left = [p for p in logs["metadata"] if p.rsplit("/", 1)[-1].startswith("exec_")]
        if not left or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    assert left == []


async def test_second_user_has_a_disjoint_id_map(lxd, alice, bob, logs_on_failure):
    (sa, _), (sb, _) = alice, bob
    logs_on_failure.extend([sa.name, sb.name])
    ranges = {}
    for spec in (sa, sb):
        inst = await lxd.instance(spec.name)
        ranges[spec.name] = idmap_ranges(inst["config"])
        assert ranges[spec.name], inst["config"]
        assert all(host == spec.idmap_base and count == IDMAP_BLOCK
                   for _, host, count in ranges[spec.name])
    (a_host, a_n), (b_host, b_n) = [(r[0][1], r[0][2]) for r in ranges.values()]
    assert a_host + a_n <= b_host or b_host + b_n <= a_host
    # Seen from the host, each container's root runs as the first id of its block.
    for spec in (sa, sb):
        pid = (await lxd.state(spec.name)).pid
        uids = Path(f"/proc/{pid}/status").read_text().split("Uid:")[1].split()[:1]
        assert uids == [str(spec.idmap_base)]


async def test_limits_and_shared_mounts(lxd, alice, logs_on_failure):
    spec, _ = alice
    logs_on_failure.append(spec.name)
    assert (await run_in(lxd, spec.name, "nproc")).strip() == "1"
    uid = int((await run_in(lxd, spec.name, "id", "-u", "alice")).strip())
    assert (await run_in(lxd, spec.name, "cat", "/data/README", user=uid)) == "lab dataset\n"
    denied = await lxd.execute(spec.name, ["touch", "/data/x"])
    assert denied.returncode != 0 and "Read-only" in denied.stderr
    await run_in(lxd, spec.name, "touch", "/scratch/alice-was-here", user=uid)
    cfg = (await lxd.instance(spec.name))["config"]
    assert cfg["limits.memory"] == "1GiB" and cfg["limits.processes"] == "2000"
    assert cfg["user.lxcgpu.owner"] == "alice"
    assert cfg["security.privileged"] == "false"


async def test_provision_is_idempotent_and_replaces_keys(lxd, alice, keys, logs_on_failure):
    spec, _ = alice
    logs_on_failure.append(spec.name)
    path = "/home/alice/.ssh/authorized_keys"
    before = await run_in(lxd, spec.name, "stat", "-c", "%i %Y", path, "/etc/sudoers.d/lxcgpu")
    t = time.perf_counter()
    await provision(lxd, spec.name, login="alice", keys=[keys["alice"][1]],
                    hostname=spec.hostname)
    elapsed = time.perf_counter() - t
    assert await run_in(lxd, spec.name, "stat", "-c", "%i %Y", path,
                        "/etc/sudoers.d/lxcgpu") == before
    print(f"provision with nothing to change: {elapsed * 1000:.0f} ms")
    # Bad keys: a clear error, nothing changes.
    for bad in ["not a key", "command=\"sh\" ssh-ed25519 AAAA", keys["alice"][1] + "\nssh-rsa x",
                "ssh-ed25519 bm90LWEta2V5"]:
        with pytest.raises(ValueError):
            await provision(lxd, spec.name, login="alice", keys=[bad], hostname=spec.hostname)
    assert (await lxd.get_file(spec.name, path)).decode() == keys["alice"][1] + "\n"
    # Two keys, then back to one: the file holds exactly what was given.
    await provision(lxd, spec.name, login="alice", keys=[keys["alice"][1], keys["bob"][1]],
                    hostname=spec.hostname)
    assert (await lxd.get_file(spec.name, path)).decode().splitlines() == [
        keys["alice"][1], keys["bob"][1]]
    await provision(lxd, spec.name, login="alice", keys=[keys["alice"][1]],
                    hostname=spec.hostname)
    assert (await lxd.get_file(spec.name, path)).decode() == keys["alice"][1] + "\n"


async def test_ensure_is_idempotent_and_never_adopts_foreign(lxd, alice, logs_on_failure):
    spec, _ = alice
    logs_on_failure.append(spec.name)
    again = await ensure_container(lxd, spec)
    assert again["name"] == spec.name and again["status"] == "Running"
    # An instance of that name belonging to someone else is refused.

    class SameName(ContainerSpec):
        @property
        def name(self):
            return spec.name

    with pytest.raises(ContainerError, match="belongs to alice"):
        await ensure_container(lxd, SameName(user="mallory", server=spec.server,
                                             idmap_base=spec.idmap_base))


async def test_stop_start_delete_lifecycle(lxd, user_containers, keys, logs_on_failure):
    spec = await user_containers("carol")
    logs_on_failure.append(spec.name)
    assert (await lxd.state(spec.name)).status == "stopped"
    addr = await start_container(lxd, spec.name)
    assert (await lxd.state(spec.name)).ipv4 == addr
    await start_container(lxd, spec.name)  # already running: fine
    await lxd.stop(spec.name)
    st = await lxd.state(spec.name)
    assert st.status == "stopped" and not st.addresses
    await lxd.stop(spec.name)  # already stopped: fine
    addr2 = await start_container(lxd, spec.name)
    assert addr2
    await lxd.delete_instance(spec.name)
    assert (await lxd.state(spec.name)).status == "missing"
    await lxd.delete_instance(spec.name)  # already gone: fine


async def test_edge_case_names_are_accepted_by_lxd(lxd, run_tag):
    users = ["user--foo", "user", "Alice", "alice", "üser", "a" * 70, "9z9", "a.b", ""]
    # Server "edge" keeps these apart from the other tests' containers on "node1".
    names = [naming.instance_name(u, "foo--edge" if u == "user" else "edge", prefix=run_tag)
             for u in users]
    names.append(naming.instance_name("user", "edge", prefix=run_tag))
    assert len(set(names)) == len(names)
    try:
        for n in names:
            await lxd.create_instance(n, image_alias=None, profiles=["lxcgpu"],
                                      config={"user.lxcgpu-test.run": run_tag})
            assert (await lxd.instance(n))["name"] == n
    finally:
        await asyncio.gather(*(lxd.delete_instance(n) for n in names))


async def test_lxd_not_running_says_what_to_run(tmp_path):
    client = LXD(str(tmp_path / "unix.socket"), retries=1)
    with pytest.raises(LXDUnavailable, match="setup/quickstart"):
        await client.server_info()
    client.close()


async def test_missing_image_says_what_to_run(lxd, run_tag, idmap_blocks):
    spec = ContainerSpec(user="dave", server="node1", prefix=run_tag,
                         idmap_base=idmap_blocks(), image="lxcgpu/no-such-image")
    with pytest.raises(ImageNotFound, match="setup/build-image"):
        await ensure_container(lxd, spec)
    assert await lxd.instance(spec.name) is None


async def test_config_keys_update_and_server_facts(lxd, alice, logs_on_failure):
    spec, _ = alice
    logs_on_failure.append(spec.name)
    await lxd.update_config(spec.name, {"user.lxcgpu-test.extra": "1"})
    assert (await lxd.instance(spec.name))["config"]["user.lxcgpu-test.extra"] == "1"
    await lxd.update_config(spec.name, {"user.lxcgpu-test.extra": None})
    cfg = (await lxd.instance(spec.name))["config"]
    assert "user.lxcgpu-test.extra" not in cfg and cfg["user.lxcgpu.owner"] == "alice"
    # The container keeps running through a config change.
    assert (await lxd.state(spec.name)).running
    # This machine has no GPU: LXD reports none, so specs get no gpu device.
    assert await lxd.gpu_count() == 0


async def test_hostile_user_name_is_slugged_and_mapping_stored(lxd, user_containers, keys,
                                                               logs_on_failure):
    raw = "Dr. Müller; rm -rf / $(id)"
    spec = await user_containers(raw)
    logs_on_failure.append(spec.name)
    assert naming.is_valid_lxd_name(spec.name) and spec.name.endswith("--node1")
    await start_container(lxd, spec.name)
    acct = await provision(lxd, spec.name, login=spec.posix_user, keys=[keys["bob"][1]],
                           hostname=spec.hostname)
    cfg = (await lxd.instance(spec.name))["config"]
    assert cfg["user.lxcgpu.owner"] == raw
    assert cfg["user.lxcgpu.posix-user"] == spec.posix_user == acct.name
    assert spec.posix_user.startswith("dr-muller-rm-rf-id-")
    out = await run_in(lxd, spec.name, "id", "-un", user=acct.uid)
    assert out.strip() == spec.posix_user
    # The root file system is intact: the name never reached a shell.
    assert (await run_in(lxd, spec.name, "test", "-x", "/bin/sh")) == ""
