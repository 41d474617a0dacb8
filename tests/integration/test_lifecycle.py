"""A user's container from the store to SSH, on the real LXD: the steps the
spawner and ``lxcgpu-admin`` share.  One container serves the module."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from lxcspawner import jupyter, lifecycle, naming
from lxcspawner.container import IDMAP_BLOCK, IDMAP_USER_FIRST, ContainerError
from lxcspawner.lxd import LXDError
from lxcspawner.portmap import FORWARD_PREFIX, SSH_PORT_KEY
from lxcspawner.settings import Settings
from tests.fixtures.lxd import REPO, TEST_KEY
from tests.fixtures.sshkeys import keypair

pytestmark = pytest.mark.lxd

SERVER = "life"                     # keeps these names apart from other tests' servers
# Id blocks of their own, above those of the idmap_blocks fixture (15000...)
# and of the benchmarks (15050...), below the top of the users' range.
BLOCK_FIRST, BLOCK_LAST = 15080, 15099
# Ports away from a quickstart's defaults and from the NAT tests' ranges.
SSH_PORTS, FORWARD_PORTS = "28000-28099", "11800-11899"
USER = "erin"


@pytest.fixture(scope="module")
def site(tmp_path_factory, run_tag):
    """A settings file for this module: temp store, this run's prefix."""
    tmp = tmp_path_factory.mktemp("lifecycle")
    config = tmp / "lxcgpu.toml"
    config.write_text(f"""
[store]
url = "sqlite:///{tmp / 'lxcgpu.sqlite'}"
[ports]
ssh = "{SSH_PORTS}"
forward = "{FORWARD_PORTS}"
[server]
name = "{SERVER}"
[containers]
prefix = "{run_tag}"
pool = 0
cpu = 1
memory = "1GiB"
""")
    return config, Settings.load(config)


@pytest.fixture(scope="module")
def store(site):
    s = site[1].open_store(idmap_first=IDMAP_USER_FIRST + BLOCK_FIRST * IDMAP_BLOCK,
                           idmap_last=IDMAP_USER_FIRST + BLOCK_LAST * IDMAP_BLOCK)
    yield s
    s.close()


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lifekeys")
    return {n: keypair(tmp, n) for n in ("erin", "erin2")}


@pytest.fixture(scope="module")
async def erin(lxd, template_image, store, site, keys, run_tag):
    """Erin's container, made by ensure_user_container with her key from the
    store; (UserContainer, progress messages).  Tagged for the sweep."""
    await asyncio.to_thread(store.add_key, USER, keys["erin"][1], actor="test")
    steps: list[str] = []
    uc = await lifecycle.ensure_user_container(
        lxd, store, site[1], USER, progress=steps.append, actor="test",
        extra_config={TEST_KEY: run_tag})
    yield uc, steps
    await lxd.delete_instance(uc.name)


def ssh(key, addr: str, *command: str) -> subprocess.CompletedProcess:
    """``command`` over SSH as the user, once sshd listens (it starts with the container)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection((addr, 22), timeout=2).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    return subprocess.run(
        ["ssh", "-i", str(key), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
         "-o", "UserKnownHostsFile=/dev/null", "-o", "ConnectTimeout=10",
         f"{USER}@{addr}", *command], capture_output=True, text=True, timeout=60)


async def test_creates_starts_and_provisions(lxd, erin, store, keys, run_tag,
                                             logs_on_failure):
    uc, steps = erin
    logs_on_failure.append(uc.name)
    rec = store.user(USER)
    # The account and keys are made while the network comes up (said only
    # if it is not up by then).
    assert [m for m in steps if m != "waiting for network"] == [
        "allocating SSH port and ids", "creating container", "starting container",
        "preparing user"]
    if "waiting for network" in steps:
        assert steps.index("preparing user") < steps.index("waiting for network")
    assert (uc.name, uc.server, uc.user, uc.posix_user) == (
        f"{run_tag}-erin--{SERVER}", SERVER, USER, USER)
    assert uc.ssh_port == rec.ssh_port == 28000 and uc.forwards == {}
    assert uc.ssh_command == f"ssh -p 28000 erin@{SERVER}"
    st = await lxd.state(uc.name)
    # The address is the one the store assigned, pinned on the NIC with
    # LXD's filtering; the container took it.
    assert uc.address == store.address(USER, SERVER) and st.ipv4 == uc.address
    nic = (await lxd.instance(uc.name))["devices"]["eth0"]
    assert nic["ipv4.address"] == uc.address
    assert all(nic[f"security.{k}"] == "true" for k in (
        "mac_filtering", "ipv4_filtering", "ipv6_filtering", "port_isolation"))
    cfg = (await lxd.instance(uc.name))["config"]
    assert cfg[SSH_PORT_KEY] == "28000"
    assert cfg["security.idmap.base"] == str(rec.idmap_base)
    assert rec.idmap_base == IDMAP_USER_FIRST + BLOCK_FIRST * IDMAP_BLOCK
    assert (cfg["limits.cpu"], cfg["limits.memory"]) == ("1", "1GiB")
    assert cfg[TEST_KEY] == run_tag
    # SSH as erin, with the key the store holds.
    out = await asyncio.to_thread(ssh, keys["erin"][0], uc.address, "hostname; whoami")
    assert out.stdout.split() == [f"{SERVER}-erin", "erin"], out.stderr


async def test_second_call_changes_nothing(lxd, erin, store, site, run_tag, logs_on_failure):
    uc, _ = erin
    logs_on_failure.append(uc.name)
    ak = "/home/erin/.ssh/authorized_keys"
    stat = ["stat", "-c", "%i %Y", ak, "/etc/hostname"]
    pid = (await lxd.state(uc.name)).pid
    files = (await lxd.execute(uc.name, stat)).check(stat).stdout
    steps: list[str] = []
    again = await lifecycle.ensure_user_container(
        lxd, store, site[1], USER, progress=steps.append, actor="test",
        extra_config={TEST_KEY: run_tag})
    assert again == uc
    assert steps == ["allocating SSH port and ids", "preparing user"]
    assert (await lxd.state(uc.name)).pid == pid  # not restarted
    assert (await lxd.execute(uc.name, stat)).check(stat).stdout == files


async def test_jupyter_may_start_early_only_in_her_own_running_container(
        lxd, erin, store, run_tag, logs_on_failure):
    """lifecycle.runs_already, what the spawner asks before starting Jupyter
    ahead of the checks (of what lifecycle.find read once for the whole
    spawn): her container, running, her record not suspended; no for
    another owner's instance of that name, a suspended user, a user
    without a container, a stopped container."""
    uc, _ = erin
    logs_on_failure.append(uc.name)

    async def runs(user: str = USER) -> bool:
        found = await lifecycle.find(lxd, store, user, SERVER, prefix=run_tag)
        return lifecycle.runs_already(found, user)

    assert await runs()
    assert not await runs("nobody")
    owner = f"{naming.KEY_PREFIX}owner"
    await lxd.update_config(uc.name, {owner: "mallory"})
    try:
        assert not await runs()
    finally:
        await lxd.update_config(uc.name, {owner: USER})
    await asyncio.to_thread(store.set_suspended, USER, True, actor="test")
    try:
        assert not await runs()
    finally:
        await asyncio.to_thread(store.set_suspended, USER, False, actor="test")
    assert await runs()
    await lxd.stop(uc.name)
    try:
        assert not await runs()
    finally:
        await lxd.start(uc.name)
        await lxd.wait_for_address(uc.name, expected=uc.address)


async def test_a_unit_started_the_moment_the_container_starts(lxd, erin, logs_on_failure):
    """jupyter.start right after LXD's start (a warm spawn whose account is
    there already has nothing else to do first): the container's systemd
    does not listen yet ("Failed to connect to bus"), and the start waits
    for it instead of failing the spawn."""
    uc, _ = erin
    logs_on_failure.append(uc.name)
    await lxd.stop(uc.name)
    await lxd.start(uc.name)
    await jupyter.start(lxd, uc.name, unit="lxcgpu-test-early", login=USER,
                        argv=["sleep", "60"], env={}, booted_now=True)
    assert await jupyter.active(lxd, uc.name, "lxcgpu-test-early")
    await jupyter.stop(lxd, uc.name, "lxcgpu-test-early")
    await lxd.wait_for_address(uc.name, expected=uc.address)


async def test_forwards_reach_the_config(lxd, erin, store, run_tag, logs_on_failure):
    uc, _ = erin
    logs_on_failure.append(uc.name)
    pid = (await lxd.state(uc.name)).pid
    fwd = await asyncio.to_thread(store.add_forward, USER, SERVER, 8888, actor="test")
    key = f"{FORWARD_PREFIX}{fwd.host_port}"
    assert await lifecycle.sync_port_maps(lxd, store, USER, SERVER, prefix=run_tag)
    cfg = (await lxd.instance(uc.name))["config"]
    assert cfg[key] == "8888" and cfg[SSH_PORT_KEY] == "28000"
    assert not await lifecycle.sync_port_maps(lxd, store, USER, SERVER, prefix=run_tag)
    await asyncio.to_thread(store.remove_forward, USER, SERVER, container_port=8888,
                            actor="test")
    assert await lifecycle.sync_port_maps(lxd, store, USER, SERVER, prefix=run_tag)
    cfg = (await lxd.instance(uc.name))["config"]
    assert key not in cfg and cfg[SSH_PORT_KEY] == "28000"
    assert (await lxd.state(uc.name)).pid == pid
    # No container for this user on another server: nothing to write.
    assert not await lifecycle.sync_port_maps(lxd, store, USER, "elsewhere",
                                              prefix=run_tag)


async def test_sync_pushes_key_changes(lxd, erin, store, keys, run_tag, logs_on_failure):
    uc, _ = erin
    logs_on_failure.append(uc.name)
    k2 = await asyncio.to_thread(store.add_key, USER, keys["erin2"][1], actor="test")
    res = await lifecycle.sync_user_container(lxd, store, USER, SERVER, prefix=run_tag)
    assert res == lifecycle.ContainerSync(uc.name, False, True)
    ak = (await lxd.get_file(uc.name, "/home/erin/.ssh/authorized_keys")).decode()
    assert ak.splitlines() == [keys["erin"][1], keys["erin2"][1]]
    await asyncio.to_thread(store.remove_key, USER, k2.fingerprint, actor="test")
    await lifecycle.sync_user_container(lxd, store, USER, SERVER, prefix=run_tag)
    ak = (await lxd.get_file(uc.name, "/home/erin/.ssh/authorized_keys")).decode()
    assert ak == keys["erin"][1] + "\n"


def admin_cli(config, *args) -> subprocess.CompletedProcess:
    """The installed command's code, as a separate process."""
    env = {**os.environ, "LXCGPU_CONFIG": str(config), "SUDO_USER": "sysadm"}
    return subprocess.run([sys.executable, "-m", "lxcspawner.admin", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)


async def test_admin_command_end_to_end(lxd, erin, store, site, tmp_path, logs_on_failure):
    uc, _ = erin
    logs_on_failure.append(uc.name)
    config = site[0]
    pid = (await lxd.state(uc.name)).pid
    up = await asyncio.to_thread(admin_cli, config, "container", "up", USER, "--json")
    assert up.returncode == 0, up.stderr
    data = json.loads(up.stdout)
    assert (data["name"], data["address"], data["ssh_command"]) == (
        uc.name, uc.address, "ssh -p 28000 erin@life")
    assert (await lxd.state(uc.name)).pid == pid
    # A forward added with the command lands in the container's config at once.
    add = await asyncio.to_thread(admin_cli, config, "forward", "add", USER, "6006")
    assert add.returncode == 0, add.stderr
    host_port = int(add.stdout.split(f"{SERVER}:")[1].split()[0])
    assert f"{SERVER}: done: port maps updated in {uc.name}" in add.stdout
    cfg = (await lxd.instance(uc.name))["config"]
    assert cfg[f"{FORWARD_PREFIX}{host_port}"] == "6006"
    rm = await asyncio.to_thread(admin_cli, config, "forward", "remove", USER, "6006")
    assert rm.returncode == 0 and f"{SERVER}: done: port maps updated in {uc.name}" in rm.stdout
    assert f"{FORWARD_PREFIX}{host_port}" not in (await lxd.instance(uc.name))["config"]
    sync = await asyncio.to_thread(admin_cli, config, "container", "sync", USER)
    assert sync.returncode == 0, sync.stderr
    assert sync.stdout.strip() == f"{SERVER}: done: keys and port maps updated in {uc.name}"
    # A key added with the command reaches the running container at once;
    # removing it takes it out again.
    _, newpub = keypair(tmp_path, "erin3")
    add = await asyncio.to_thread(admin_cli, config, "key", "add", USER, str(tmp_path / "erin3.pub"))
    assert add.returncode == 0 and f"{SERVER}: done: keys and port maps updated in {uc.name}" \
        in add.stderr, add
    ak = (await lxd.get_file(uc.name, "/home/erin/.ssh/authorized_keys")).decode()
    assert newpub in ak
    fp = store.list_keys(USER)[-1].fingerprint
    rm = await asyncio.to_thread(admin_cli, config, "key", "remove", USER, fp)
    assert rm.returncode == 0, rm.stderr
    ak = (await lxd.get_file(uc.name, "/home/erin/.ssh/authorized_keys")).decode()
    assert newpub not in ak and ak.strip()
    actions = [(e.actor, e.action, e.ok) for e in store.audit_log(user=USER, limit=6)]
    assert actions == [("admin:sysadm", "key.remove", True),
                       ("admin:sysadm", "key.add", True),
                       ("admin:sysadm", "container.sync", True),
                       ("admin:sysadm", "forward.remove", True),
                       ("admin:sysadm", "forward.add", True),
                       ("admin:sysadm", "container.up", True)]


async def test_a_container_made_before_pinning_is_pinned_with_one_restart(
        lxd, store, site, run_tag, logs_on_failure):
    """A container from before lxcgpu pinned addresses (the profile's NIC,
    DHCP's address) gets its address pinned at its next start through
    lxcgpu, restarted once; the next start leaves it alone; deleting it
    frees the address."""
    user = "frank"
    rec = await asyncio.to_thread(store.ensure_user, user, actor="test")
    spec = site[1].container_spec(user, rec.idmap_base, server=SERVER,
                                  extra_config={TEST_KEY: run_tag})
    assert spec.nic is None
    logs_on_failure.append(spec.name)
    try:
        await lifecycle.ensure_container(lxd, spec)
        await lxd.start(spec.name)
        await lxd.wait_for_address(spec.name)
        steps: list[str] = []
        uc = await lifecycle.ensure_user_container(
            lxd, store, site[1], user, progress=steps.append, actor="test",
            extra_config={TEST_KEY: run_tag})
        assert "restarting container to pin its address" in steps
        assert uc.address == store.address(user, SERVER)
        assert (await lxd.instance(spec.name))["devices"]["eth0"]["ipv4.address"] == uc.address
        assert (await lxd.state(spec.name)).ipv4 == uc.address
        pid = (await lxd.state(spec.name)).pid
        steps.clear()
        await lifecycle.ensure_user_container(lxd, store, site[1], user, progress=steps.append,
                                              actor="test", extra_config={TEST_KEY: run_tag})
        assert "restarting container to pin its address" not in steps
        assert (await lxd.state(spec.name)).pid == pid
        # Deleting asks for --yes and changes nothing without it.
        no = await asyncio.to_thread(admin_cli, site[0], "container", "delete", user)
        assert no.returncode != 0 and "run again with --yes" in no.stderr, no
        assert await lxd.instance(spec.name) is not None
        assert store.address(user, SERVER) == uc.address
        yes = await asyncio.to_thread(admin_cli, site[0], "container", "delete", user, "--yes")
        assert yes.returncode == 0 and "its address is free again" in yes.stdout, yes
    finally:
        await lifecycle.delete_user_container(lxd, store, user, SERVER, prefix=run_tag,
                                              actor="test")
    assert await lxd.instance(spec.name) is None
    assert store.address(user, SERVER) is None
    actions = [(a.action, a.ok) for a in store.audit_log(user=user)]
    assert actions.count(("address.release", True)) == 1
    assert actions.count(("container.delete", True)) == 1


async def test_rebuild_keeps_home_and_settings_and_delete_may_keep_the_home(
        lxd, store, site, run_tag, logs_on_failure):
    """A rebuild replaces the system and keeps the home (moved into a volume
    of its own, once) and the container's own settings; a move that LXD
    cannot make changes nothing; `container delete --keep-home` keeps the
    home for a container made again, plain `--yes` deletes it."""
    user, settings = "gina", site[1]
    extra = {TEST_KEY: run_tag, "security.nesting": "true"}
    uc = await lifecycle.ensure_user_container(lxd, store, settings, user, actor="test",
                                               extra_config=extra)
    logs_on_failure.append(uc.name)
    volume, pool = f"{uc.name}-home", "lxcgpu"
    home = f"/home/{uc.posix_user}"
    try:
        uid = (await lxd.file_entry(uc.name, home)).uid
        await lxd.put_file(uc.name, f"{home}/data.csv", "1,2,3\n", uid=uid, gid=uid)
        await lxd.put_file(uc.name, "/usr/local/bin/mine", "#!/bin/sh\n", mode=0o755)
        # Where the volume cannot be mounted (root replaced /mnt with a file),
        # the rebuild stops before anything changed.
        await lxd.execute(uc.name, ["sh", "-c", "rm -rf /mnt && touch /mnt"])
        uuid = (await lxd.instance(uc.name))["config"]["volatile.uuid"]
        with pytest.raises(LXDError):
            await lifecycle.rebuild_user_container(lxd, store, settings, user, SERVER,
                                                   actor="test")
        inst = await lxd.instance(uc.name)
        assert inst["config"]["volatile.uuid"] == uuid
        assert set(inst["devices"]) == {"eth0"}
        assert await lxd.volume(pool, volume) is None
        assert await lxd.get_file(uc.name, "/usr/local/bin/mine") == b"#!/bin/sh\n"
        await lxd.execute(uc.name, ["sh", "-c", "rm -f /mnt && mkdir /mnt"])

        steps: list[str] = []
        done = await lifecycle.rebuild_user_container(lxd, store, settings, user, SERVER,
                                                      actor="test", progress=steps.append)
        assert done.home_moved and "moving your home into a volume of its own" in steps
        inst = await lxd.instance(uc.name)
        assert inst["config"]["volatile.uuid"] != uuid
        assert {k: inst["config"].get(k) for k in extra} == extra
        assert inst["devices"]["lxcgpu-home"] == {"type": "disk", "pool": pool,
                                                  "source": volume, "path": home}
        assert done.container.address == uc.address and done.container.ssh_port == uc.ssh_port
        assert await lxd.file_entry(uc.name, "/usr/local/bin/mine") is None
        entry = await lxd.file_entry(uc.name, f"{home}/data.csv")
        assert (entry.data, entry.uid) == (b"1,2,3\n", uid)

        # Deleted keeping the home: a container made again gets it back.
        no = await asyncio.to_thread(admin_cli, site[0], "container", "delete", user)
        assert "their home included" in no.stderr and "--yes" in no.stderr
        kept = await asyncio.to_thread(admin_cli, site[0], "container", "delete", user,
                                       "--yes", "--keep-home")
        assert kept.returncode == 0 and "kept (volume" in kept.stdout, kept
        assert await lxd.instance(uc.name) is None and await lxd.volume(pool, volume)
        steps.clear()
        again = await lifecycle.ensure_user_container(lxd, store, settings, user, actor="test",
                                                      extra_config=extra, progress=steps.append)
        assert "attaching your home" in steps
        assert await lxd.get_file(again.name, f"{home}/data.csv") == b"1,2,3\n"
        gone = await asyncio.to_thread(admin_cli, site[0], "container", "delete", user, "--yes")
        assert gone.returncode == 0 and "deleted with it" in gone.stdout, gone
        assert await lxd.volume(pool, volume) is None
    finally:
        await lifecycle.delete_user_container(lxd, store, user, SERVER, prefix=run_tag,
                                              actor="test")
        await lxd.delete_volume(pool, volume)


async def test_runtime_mode_without_nvidias_toolkit_is_a_sentence(
        lxd, store, site, run_tag, tmp_path, logs_on_failure):
    """driver_sync "runtime" on a server without NVIDIA's container toolkit
    (this machine): LXD refuses to start a container with nvidia.runtime
    ("The NVIDIA container tools couldn't be found"), and the start says
    what is missing and what an administrator does.  (No GPU here, so the
    key comes with the container's extra config, as on one made while its
    server had GPUs.)"""
    user = "rt"
    runtime = tmp_path / "runtime.toml"
    runtime.write_text(site[0].read_text() + '[gpus]\ndriver_sync = "runtime"\n')
    settings = Settings.load(runtime)
    logs_on_failure.append(f"{run_tag}-{user}--{SERVER}")
    try:
        with pytest.raises(ContainerError) as e:
            await lifecycle.ensure_user_container(
                lxd, store, settings, user, actor="test",
                extra_config={TEST_KEY: run_tag, "nvidia.runtime": "true"})
        assert str(e.value) == (
            f"{SERVER} cannot give containers its NVIDIA driver: NVIDIA's container toolkit "
            "(nvidia-container-cli) is missing or failing there; an administrator installs "
            "it, or sets driver_sync = \"installer\" for that server (and unsets "
            "nvidia.runtime on its containers)")
        inst = await lxd.instance(naming.instance_name(user, SERVER, run_tag))
        assert inst["status"] == "Stopped"
    finally:
        await lifecycle.delete_user_container(lxd, store, user, SERVER, prefix=run_tag,
                                              actor="test")
