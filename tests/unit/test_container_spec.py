"""What a user's container will look like, without LXD."""

import json

import pytest

from lxcspawner.container import (
    IDMAP_BLOCK, IDMAP_USER_FIRST, ContainerSpec, Mount, idmap_ranges,
)

BASE = IDMAP_USER_FIRST + 3 * IDMAP_BLOCK


def spec(**kw):
    kw.setdefault("idmap_base", BASE)
    return ContainerSpec(user=kw.pop("user", "alice"), server=kw.pop("server", "gpu17"), **kw)


def test_config_is_unprivileged_with_pinned_isolated_idmap():
    cfg = spec().config()
    assert cfg["security.privileged"] == "false"
    assert cfg["security.idmap.isolated"] == "true"
    assert cfg["security.idmap.base"] == str(BASE)
    assert cfg["security.idmap.size"] == "65536"
    assert cfg["user.lxcgpu.owner"] == "alice"
    assert cfg["user.lxcgpu.server"] == "gpu17"
    assert cfg["user.lxcgpu.posix-user"] == "alice"


def test_raw_user_name_is_recorded_next_to_its_slug():
    s = spec(user="Dr. Müller")
    cfg = s.config()
    assert cfg["user.lxcgpu.owner"] == "Dr. Müller"
    assert cfg["user.lxcgpu.posix-user"] == s.posix_user != "Dr. Müller"
    assert s.name.endswith("--gpu17")


def test_limits():
    cfg = spec(cpu="4", memory="16GiB", processes=4000).config()
    assert (cfg["limits.cpu"], cfg["limits.memory"], cfg["limits.processes"]) == \
        ("4", "16GiB", "4000")
    assert "limits.cpu" not in spec().config()


@pytest.mark.parametrize("kw", [
    {"cpu": "four"}, {"cpu": "1;2"}, {"memory": "lots"}, {"memory": "16 GiB"},
    {"processes": 0}, {"processes": "100"}, {"idmap_base": BASE + 1},
    {"idmap_base": 100000}, {"idmap_base": "10000000"}, {"idmap_base": 2**40},
    {"extra_config": {"user.lxcgpu.owner": "mallory"}},
    {"extra_config": {"security.idmap.base": "0"}},
    {"mounts": (Mount("/srv/a", "/data"), Mount("/srv/b", "/data"))},
])
def test_bad_settings_are_refused(kw):
    with pytest.raises(ValueError):
        spec(**kw)


def test_gpu_device_only_where_there_are_gpus():
    assert "lxcgpu-gpu" not in spec(gpus=0).devices()
    assert spec(gpus=8).devices()["lxcgpu-gpu"] == {"type": "gpu", "gputype": "physical"}


def test_mount_devices():
    devs = spec(mounts=(Mount("/srv/datasets", "/data"),
                        Mount("/scratch", "/scratch", readonly=False))).devices()
    assert devs["lxcgpu-mnt-data"] == {"type": "disk", "source": "/srv/datasets",
                                       "path": "/data", "readonly": "true"}
    assert devs["lxcgpu-mnt-scratch"]["readonly"] == "false"


@pytest.mark.parametrize("text,expected", [
    ("/srv/data:/data", Mount("/srv/data", "/data", True)),
    ("/srv/scratch:/scratch:rw", Mount("/srv/scratch", "/scratch", False)),
    ({"source": "/nas/lab", "path": "/nas", "readonly": False}, Mount("/nas/lab", "/nas", False)),
])
def test_mount_parse(text, expected):
    assert Mount.parse(text) == expected


@pytest.mark.parametrize("bad", ["relative:/data", "/a:/b:maybe", "/a", "/srv/../etc:/x",
                                 "/srv:/", "/srv:data"])
def test_mount_parse_refuses(bad):
    with pytest.raises(ValueError):
        Mount.parse(bad)


def test_idmap_ranges_reads_volatile_map():
    cfg = {"volatile.idmap.current": json.dumps([
        {"Isuid": True, "Isgid": False, "Hostid": BASE, "Nsid": 0, "Maprange": 65536},
        {"Isuid": False, "Isgid": True, "Hostid": BASE, "Nsid": 0, "Maprange": 65536},
    ])}
    assert idmap_ranges(cfg) == [("uid", BASE, 65536), ("gid", BASE, 65536)]


def test_pool_overrides_the_root_disk():
    assert "root" not in spec().devices()
    assert spec(pool="fast").devices()["root"] == {"type": "disk", "path": "/", "pool": "fast"}


@pytest.mark.parametrize("status,keys,expected", [
    # What LXD 5.0.2 left here when it was killed 0.15 s into a creation.
    ("Stopped", ["volatile.base_image", "volatile.eth0.hwaddr", "volatile.idmap.next",
                 "volatile.last_state.idmap", "volatile.uuid"], True),
    # A creation that completed, never started.
    ("Stopped", ["volatile.apply_template", "volatile.base_image", "volatile.uuid"], False),
    # Started once, now stopped: the user's data may be there.
    ("Stopped", ["volatile.base_image", "volatile.idmap.current",
                 "volatile.last_state.power", "volatile.uuid"], False),
    ("Running", ["volatile.base_image"], False),
])
def test_half_made_is_only_an_interrupted_creation(status, keys, expected):
    import asyncio

    from lxcspawner.container import half_made
    inst = {"name": "a--gpu17", "status": status, "config": {k: "x" for k in keys}}
    assert asyncio.run(half_made(None, inst)) is expected
