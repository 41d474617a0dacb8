"""Prebuilt containers on the real LXD (lxcspawner.pool): the keeper makes
them (stopped, shifted, no owner, no network, no keys, no port maps); a new
user's first container is one of them, theirs alone; two new users at once
get different ones; an empty pool falls back to making one and says so; a
template change retires the old ones; a user whose id block is on disk never
takes one."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta, timezone

import pytest

from lxcspawner import lifecycle, naming, pool
from lxcspawner.container import IDMAP_BLOCK, IDMAP_USER_FIRST
from lxcspawner.network import NIC
from lxcspawner.portmap import SSH_PORT_KEY
from lxcspawner.settings import Settings
from tests.fixtures.lxd import TEST_KEY
from tests.fixtures.sshkeys import keypair

pytestmark = pytest.mark.lxd

SERVER = "pl"
# Id blocks of their own, apart from the other tests' (see tests/fixtures/hub.py).
BLOCK_FIRST, BLOCK_LAST = 14500, 14519


@pytest.fixture(scope="module")
def site(tmp_path_factory, run_tag):
    tmp = tmp_path_factory.mktemp("pool")
    config = tmp / "lxcgpu.toml"
    config.write_text(f"""
[store]
url = "sqlite:///{tmp / 'lxcgpu.sqlite'}"
[ports]
ssh = "28100-28199"
forward = "11900-11999"
[server]
name = "{SERVER}"
[containers]
prefix = "{run_tag}"
pool = 2
cpu = 1
""")
    return Settings.load(config)


@pytest.fixture(scope="module")
async def store(site, lxd):
    s = site.open_store(idmap_first=IDMAP_USER_FIRST + BLOCK_FIRST * IDMAP_BLOCK,
                        idmap_last=IDMAP_USER_FIRST + BLOCK_LAST * IDMAP_BLOCK)
    yield s
    for m in s.pool_members():
        await lxd.delete_instance(m.instance)
    for u in s.list_users():
        await lifecycle.delete_user_container(lxd, s, u.name, SERVER,
                                              prefix=site.instance_prefix, actor="test")
    s.close()


async def members(lxd) -> dict[str, dict]:
    return {i["name"]: i for i in await lxd.list_instances(config_key=pool.POOL_KEY)
            if i["config"][pool.POOL_KEY] == SERVER}


async def test_the_keeper_makes_prebuilt_containers_that_belong_to_no_one(
        lxd, template_image, store, site, run_tag):
    done = await pool.tend(lxd, store, site, SERVER)
    assert done == {"made": 2, "retired": 0, "forgotten": 0, "failed": 0}
    rows = store.pool_members(SERVER)
    found = await members(lxd)
    assert sorted(found) == sorted(r.instance for r in rows)
    for r in rows:
        inst = found[r.instance]
        assert r.ready and r.image == template_image["fingerprint"]
        assert r.instance.startswith(f"{run_tag}-pool--{SERVER}--")
        cfg = inst["config"]
        # Stopped, its own block its id map, and its files shifted to that
        # block where LXD shifts them on disk (Debian 12's LXD); an LXD that
        # maps them when it mounts them (idmapped mounts: Debian 13's) leaves
        # them as they are and records no map on disk.
        assert inst["status"] == "Stopped"
        assert cfg["security.idmap.base"] == str(r.idmap_base)
        assert json.loads(cfg["volatile.idmap.next"])[0]["Hostid"] == r.idmap_base
        on_disk = json.loads(cfg["volatile.last_state.idmap"])
        assert on_disk == [] or on_disk[0]["Hostid"] == r.idmap_base
        # No one's: no owner, no port maps, no keys, no network at all.
        assert not {f"{naming.KEY_PREFIX}owner", SSH_PORT_KEY} & set(cfg)
        assert inst["devices"][NIC] == {"type": "none"}
        assert await lxd.file_entry(r.instance, "/root/.ssh/authorized_keys") is None
        assert cfg["limits.cpu"] == "1"
        # Made beside users' spawns, it yields the CPU to them.
        assert cfg["limits.cpu.allowance"] == pool.POOL_CPU_SHARE
    # A second round has nothing to do.
    assert await pool.tend(lxd, store, site, SERVER) == {
        "made": 0, "retired": 0, "forgotten": 0, "failed": 0}


async def test_a_new_users_first_container_is_a_prebuilt_one_and_theirs_alone(
        lxd, store, site, run_tag, tmp_path, logs_on_failure):
    user = "pa"
    name = naming.instance_name(user, SERVER, run_tag)
    logs_on_failure.append(name)
    key = keypair(tmp_path, user)
    store.add_key(user, key[1], actor="test")
    own = store.user(user)
    before = {r.instance: r.idmap_base for r in store.pool_members(SERVER)}
    # What the site set when they were prepared and no longer does (a limit,
    # a shared mount) is not carried over to the user.
    for member in before:
        await lxd.update_config(member, {"limits.memory": "512MiB"})
        await lxd.update_devices(member, {"lxcgpu-mnt-old": {
            "type": "disk", "source": "/srv", "path": "/old", "readonly": "true"}})
    steps: list[str] = []
    uc = await lifecycle.ensure_user_container(lxd, store, site, user, progress=steps.append,
                                               actor="test", extra_config={TEST_KEY: run_tag})
    assert "using a prepared container" in steps and "creating container" not in steps
    rec = store.user(user)
    taken = [i for i, b in before.items() if b == rec.idmap_base]
    assert len(taken) == 1 and rec.idmap_base != own.idmap_base and rec.idmap_used
    assert await lxd.instance(taken[0]) is None
    assert [r.instance for r in store.pool_members(SERVER)] == [
        i for i in before if i != taken[0]]
    inst = await lxd.instance(name)
    cfg = inst["config"]
    # Its configuration is the user's, as a container made for them has it.
    expected = site.container_spec(user, rec.idmap_base, server=SERVER,
                                   extra_config={TEST_KEY: run_tag}, gpus=0).config()
    assert {k: cfg.get(k) for k in expected} == expected
    assert pool.POOL_KEY not in cfg and cfg[SSH_PORT_KEY] == str(rec.ssh_port)
    assert "limits.memory" not in cfg and "lxcgpu-mnt-old" not in inst["devices"]
    assert "limits.cpu.allowance" not in cfg
    assert json.loads(cfg["volatile.idmap.current"])[0]["Hostid"] == rec.idmap_base
    assert inst["devices"][NIC]["ipv4.address"] == uc.address == store.address(user, SERVER)
    # Inside: the user's hostname, login and keys; nothing of the pool.
    res = await lxd.execute(name, ["sh", "-c", f"hostname; id -un -- {user}; cat /etc/hostname; "
                                   "grep -c pool /etc/hosts || true"])
    assert res.stdout.split() == [naming.hostname(user, SERVER), user,
                                  naming.hostname(user, SERVER), "0"], res.stdout
    keys = await lxd.get_file(name, f"/home/{user}/.ssh/authorized_keys")
    assert keys.decode().strip() == key[1].strip()
    assert (await lxd.state(name)).ipv4 == uc.address
    assert any(a.action == "pool.claim" for a in store.audit_log(user=user))


async def test_two_at_once_get_different_ones_then_the_pool_is_empty(
        lxd, store, site, run_tag, logs_on_failure):
    await pool.tend(lxd, store, site, SERVER)          # back to 2
    users = ["pb", "pc"]
    logs_on_failure.extend(naming.instance_name(u, SERVER, run_tag) for u in users)
    ready = {r.idmap_base for r in store.pool_members(SERVER) if r.ready}
    assert len(ready) == 2
    steps: dict[str, list[str]] = {u: [] for u in users}
    await asyncio.gather(*(lifecycle.ensure_user_container(
        lxd, store, site, u, progress=steps[u].append, actor="test",
        extra_config={TEST_KEY: run_tag}) for u in users))
    assert all("using a prepared container" in s for s in steps.values()), steps
    assert {store.user(u).idmap_base for u in users} == ready
    assert store.pool_members(SERVER) == []
    # The pool is empty: the next new user's container is made, and they are told.
    late: list[str] = []
    logs_on_failure.append(naming.instance_name("pd", SERVER, run_tag))
    await lifecycle.ensure_user_container(lxd, store, site, "pd", progress=late.append,
                                          actor="test", extra_config={TEST_KEY: run_tag},
                                          start=False)
    assert late[:3] == ["allocating SSH port and ids", "no prepared container was free",
                        "creating container"]
    assert store.user("pd").idmap_used


async def test_a_user_whose_block_is_on_disk_never_takes_one(lxd, store, site, run_tag):
    """pd's container was made with pd's block: deleted and made again, it
    is made again with that block, even with prebuilt ones ready."""
    await pool.tend(lxd, store, site, SERVER)
    block = store.user("pd").idmap_base
    await lifecycle.delete_user_container(lxd, store, "pd", SERVER, prefix=run_tag,
                                          actor="test")
    steps: list[str] = []
    await lifecycle.ensure_user_container(lxd, store, site, "pd", progress=steps.append,
                                          actor="test", extra_config={TEST_KEY: run_tag},
                                          start=False)
    assert "creating container" in steps and "using a prepared container" not in steps
    assert "no prepared container was free" not in steps
    assert store.user("pd").idmap_base == block
    assert len([r for r in store.pool_members(SERVER) if r.ready]) == 2


async def test_the_keeper_refills_when_no_spawn_is_under_way(lxd, store, site, run_tag,
                                                            logs_on_failure):
    """Making a prebuilt container would slow a spawn beside it: the keeper
    makes none in a round that finds one taken since its last round (new
    users come in bunches), nor within ``quiet`` seconds of a container's
    start on the server, while one is still ready; it makes it at the next
    round without either, and at once when none is ready."""
    def ready() -> int:
        return len([r for r in store.pool_members(SERVER) if r.ready])

    keeper = pool.PoolKeeper(site, store, quiet=0)
    try:
        await keeper.round(SERVER)
        assert ready() == 2
        name = naming.instance_name("pe", SERVER, run_tag)
        logs_on_failure.append(name)
        steps: list[str] = []
        await lifecycle.ensure_user_container(lxd, store, site, "pe", progress=steps.append,
                                              actor="test", extra_config={TEST_KEY: run_tag},
                                              start=False)
        assert "using a prepared container" in steps
        assert (await keeper.round(SERVER))["made"] == 0
        assert ready() == 1
        # pe's container starts (their spawn under way).
        await lxd.start(name)
        keeper.quiet = 300
        assert (await keeper.round(SERVER))["made"] == 0
        assert ready() == 1
        keeper.quiet = 0
        assert (await keeper.round(SERVER))["made"] == 1
        assert ready() == 2
        # With none ready, it makes them whatever started (a new user's
        # container would otherwise be made on their spawn's path).
        for user in ("pf", "pg"):
            logs_on_failure.append(naming.instance_name(user, SERVER, run_tag))
            await lifecycle.ensure_user_container(lxd, store, site, user, actor="test",
                                                  extra_config={TEST_KEY: run_tag},
                                                  start=False)
        assert ready() == 0
        keeper.quiet = 300
        assert (await keeper.round(SERVER))["made"] == 2
    finally:
        keeper.close()


async def test_a_template_change_retires_the_old_ones_and_strays_are_deleted(
        lxd, store, site, run_tag):
    """The template's alias now points at another image than the one they
    were made from (as after setup/build-image): the keeper retires them and
    makes new ones.  (The image is the same here; the store's record of what
    they were made from is set back, which is what the keeper compares.)"""
    await pool.tend(lxd, store, site, SERVER)
    old = {r.instance for r in store.pool_members(SERVER)}
    assert len(old) == 2
    with store._writer.begin() as conn:
        from sqlalchemy import text
        conn.execute(text("UPDATE pool_members SET image = 'an-older-template'"))
    # A stray: a prebuilt container of this server the store does not know.
    stray = pool.member_name(SERVER, run_tag)
    config, devices = pool.member_config(site, SERVER, IDMAP_USER_FIRST
                                         + BLOCK_LAST * IDMAP_BLOCK, 0)
    await lxd.create_instance(stray, image_alias=None, config=config, devices=devices,
                              profiles=site.profiles)
    # One a keeper was making when the hub stopped (reserved, made, never
    # ready): the next keeper forgets it.
    cut = pool.member_name(SERVER, run_tag)
    base = store.reserve_pool_block(SERVER, cut, actor="pool")
    config, devices = pool.member_config(site, SERVER, base, 0)
    await lxd.create_instance(cut, image_alias=None, config=config, devices=devices,
                              profiles=site.profiles)
    # Another lxcgpu site's on the same LXD (another prefix): not this keeper's.
    theirs = pool.member_name(SERVER, f"{run_tag}x")
    await lxd.create_instance(theirs, image_alias=None, config=config, devices=devices,
                              profiles=site.profiles)
    try:
        # A keeper started before it was reserved keeps it (being made).
        before = datetime.now(timezone.utc) - timedelta(seconds=60)
        assert (await pool.tend(lxd, store, site, SERVER, since=before))["forgotten"] == 1
        assert cut in {r.instance for r in store.pool_members(SERVER)}
        done = await pool.tend(lxd, store, site, SERVER, since=datetime.now(timezone.utc))
        assert done == {"made": 1, "retired": 0, "forgotten": 1, "failed": 0}
        now = set(await members(lxd))
        assert now - {theirs} == {r.instance for r in store.pool_members(SERVER)}
        assert not now & old and stray not in now and cut not in now and theirs in now
    finally:
        await lxd.delete_instance(theirs)
