"""The application layer on real LXD: one user's change on every GPU server.

The site has three servers: ``fa`` (the local LXD's default project), ``fb``
(the same LXD, the test run's own project: a server of its own as far as
lxcgpu can tell, with containers of its own) and ``gone`` (an LXD over
HTTPS on a loopback port where nothing listens).  A key added once reaches
the user's containers on ``fa`` and ``fb``; ``gone`` is reported
unreachable and blocks neither; a stopped container gets the change at its
next start.  (A second LXD *daemon* over HTTPS is the multi-server test's.)
"""

from __future__ import annotations

import asyncio
import shutil

import pytest

from lxcspawner import fleet, lifecycle, naming
from lxcspawner.container import IDMAP_BLOCK, IDMAP_USER_FIRST
from lxcspawner.portmap import FORWARD_PREFIX
from lxcspawner.settings import Settings
from tests.fixtures.ldap import free_loopback_port
from tests.fixtures.lxd import TEST_KEY
from tests.fixtures.lxd2 import client_certificate
from tests.fixtures.sshkeys import keypair

pytestmark = pytest.mark.lxd

USER = "fleetu"
# Id blocks and ports of this module's own (see test_lifecycle for the others).
BLOCK_FIRST, BLOCK_LAST = 14700, 14749
SSH_PORTS, FORWARD_PORTS = "28100-28199", "11900-11999"


@pytest.fixture(scope="module")
def site(tmp_path_factory, run_tag, nat_project):
    tmp = tmp_path_factory.mktemp("fleet")
    # Real certificates; nothing answers at that port anyway.
    crt, key = client_certificate(tmp)
    shutil.copy(crt, tmp / "gone.crt")
    config = tmp / "lxcgpu.toml"
    config.write_text(f"""
[store]
url = "sqlite:///{tmp / 'lxcgpu.sqlite'}"
[ports]
ssh = "{SSH_PORTS}"
forward = "{FORWARD_PORTS}"
[servers.fa]
[servers.fb]
project = "{nat_project.project}"
[servers.gone]
lxd = "https://127.0.0.1:{free_loopback_port()}"
client_cert = "{crt}"
client_key = "{key}"
server_cert = "{tmp / 'gone.crt'}"
[containers]
prefix = "{run_tag}"
cpu = 1
memory = "1GiB"
""")
    return Settings.load(config)


@pytest.fixture(scope="module")
async def the_fleet(site, lxd, template_image):
    store = site.open_store(idmap_first=IDMAP_USER_FIRST + BLOCK_FIRST * IDMAP_BLOCK,
                            idmap_last=IDMAP_USER_FIRST + BLOCK_LAST * IDMAP_BLOCK)
    f = fleet.Fleet(site, store, actor="test")
    try:
        yield f
    finally:
        for server in ("fa", "fb"):
            await f.on(server, lambda x, s=server: lifecycle.delete_user_container(
                x, store, USER, s, prefix=site.instance_prefix, actor="test"))
        f.close()
        store.close()


async def up(f: fleet.Fleet, server: str) -> lifecycle.UserContainer:
    return await f.on(server, lambda x: lifecycle.ensure_user_container(
        x, f.store, f.settings, USER, server, actor="test",
        extra_config={TEST_KEY: f.settings.instance_prefix}))


async def authorized_keys(f: fleet.Fleet, uc: lifecycle.UserContainer) -> str:
    res = await f.lxd(uc.server).execute(
        uc.name, ["cat", f"/home/{uc.posix_user}/.ssh/authorized_keys"])
    return res.stdout


async def test_a_key_added_once_reaches_every_server_and_a_dead_one_is_named(the_fleet,
                                                                            tmp_path):
    f = the_fleet
    # Nothing there yet: "none" where LXD answers, "unreachable" where not.
    results = await f.sync_user(USER)
    assert [(r.server, r.status) for r in results] == [
        ("fa", "none"), ("fb", "none"), ("gone", "unreachable")]
    assert "did not answer" in results[2].detail

    a, b = await asyncio.gather(up(f, "fa"), up(f, "fb"))
    assert a.name != b.name and a.address != b.address
    assert f.lxd("fb").project and (await f.lxd("fa").instance(b.name)) is None

    _, pub = keypair(tmp_path, "laptop")
    await asyncio.to_thread(f.store.add_key, USER, pub, actor="test")
    results = await f.sync_user(USER)
    assert [(r.server, r.status) for r in results] == [
        ("fa", "done"), ("fb", "done"), ("gone", "unreachable")], fleet.summary(results)
    key_body = pub.split()[1]
    assert key_body in await authorized_keys(f, a)
    assert key_body in await authorized_keys(f, b)

    # fb's container stopped: the change is recorded, and its next start brings it.
    await f.lxd("fb").stop(b.name)
    [key] = await asyncio.to_thread(f.store.list_keys, USER)
    await asyncio.to_thread(f.store.remove_key, USER, key.id, actor="test")
    results = await f.sync_user(USER, ["fb", "fa"])
    assert [(r.server, r.status) for r in results] == [("fb", "done"), ("fa", "done")]
    assert "stopped" in results[0].detail
    assert key_body not in await authorized_keys(f, a)
    b = await up(f, "fb")
    assert key_body not in await authorized_keys(f, b)


async def test_port_maps_go_to_the_named_server_only(the_fleet):
    f = the_fleet
    fwd = await asyncio.to_thread(f.store.add_forward, USER, "fb", 8888, actor="test")
    results = await f.sync_port_maps(USER, ["fb"])
    assert [(r.server, r.status) for r in results] == [("fb", "done")]
    name_b = naming.instance_name(USER, "fb", f.settings.instance_prefix)
    name_a = naming.instance_name(USER, "fa", f.settings.instance_prefix)
    cfg_b = (await f.lxd("fb").instance(name_b))["config"]
    cfg_a = (await f.lxd("fa").instance(name_a))["config"]
    assert cfg_b[f"{FORWARD_PREFIX}{fwd.host_port}"] == "8888"
    assert not any(k.startswith(FORWARD_PREFIX) for k in cfg_a)
