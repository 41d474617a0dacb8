"""The slug scheme: valid, stable and collision-free names."""

import itertools

import pytest

from lxcspawner import naming

EDGE_USERS = [
    "alice", "Alice", "ALICE", "user", "user--foo", "user-foo", "üser", "user",
    "a" * 63, "a" * 64, "a" * 200, "9z9", "0", "-alice", "alice-", "a.b", "a_b",
    "", " ", "root", "systemd-network", "alice-deadbeef", "x-e3b0c442",
    "名前", "o'brien", "a/b", "a b", "alice;rm -rf /", "$(id)", "alice\n",
]
SERVERS = ["gpu17", "foo", "foo--gpu", "GPU17", "gpu.lab.example.org", "", "s" * 40]


@pytest.mark.parametrize("user", EDGE_USERS)
@pytest.mark.parametrize("server", SERVERS)
def test_instance_names_are_valid(user, server):
    name = naming.instance_name(user, server)
    assert naming.is_valid_lxd_name(name), name
    assert len(name) <= 63
    assert name[0].isalpha() and name[-1] != "-"
    assert set(name) <= set("abcdefghijklmnopqrstuvwxyz0123456789-")
    # Stable: the same input gives the same name every time.
    assert naming.instance_name(user, server) == name


def test_instance_names_are_distinct():
    pairs = set(itertools.product(EDGE_USERS, SERVERS))
    names = {naming.instance_name(u, s) for u, s in pairs}
    assert len(names) == len(pairs)


def test_user_with_double_hyphen_does_not_collide_with_server_suffix():
    # dockerspawner's test_name_collision: user--foo on server s must not meet
    # user on a server whose name brings the "--foo".
    assert naming.instance_name("user--foo", "gpu") != naming.instance_name("user", "foo--gpu")
    assert naming.instance_name("user-foo", "gpu") != naming.instance_name("user", "foo-gpu")
    assert naming.instance_name("user", "foo") != naming.instance_name("user--foo", "")


@pytest.mark.parametrize("name,expected", [
    ("alice", "alice"),
    ("bob-2", "bob-2"),
    ("gpu17", "gpu17"),
])
def test_valid_names_are_kept(name, expected):
    assert naming.safe_slug(name) == expected
    assert naming.instance_name(name, "gpu17") == f"{expected}--gpu17"


def test_case_variants_get_distinct_hashed_names():
    assert naming.safe_slug("Alice") != "alice"
    assert naming.safe_slug("Alice").startswith("alice-")
    assert naming.safe_slug("Alice") != naming.safe_slug("ALICE")


def test_hashed_looking_name_is_not_kept():
    hashed = naming.safe_slug("Alice")
    # A user literally named like Alice's slug must not receive Alice's name.
    assert naming.safe_slug(hashed) != hashed


@pytest.mark.parametrize("user", ["9z9", "0", "-alice", "", "名前"])
def test_hashed_names_start_with_a_letter(user):
    slug = naming.safe_slug(user)
    assert slug[0].isalpha()


def test_unicode_is_transliterated():
    assert naming.safe_slug("üser").startswith("user-")


def test_long_names_are_truncated_with_hash():
    a64, a65 = "a" * 64, "a" * 65
    assert len(naming.instance_name(a64, "gpu17")) <= 63
    assert naming.instance_name(a64, "gpu17") != naming.instance_name(a65, "gpu17")


def test_prefix():
    assert naming.instance_name("alice", "gpu17", prefix="t1") == "t1-alice--gpu17"
    for bad in ["T1", "1t", "t--1", "a" * 17, "t_1"]:
        with pytest.raises(ValueError):
            naming.instance_name("alice", "gpu17", prefix=bad)


@pytest.mark.parametrize("user", EDGE_USERS)
def test_posix_names_are_valid_and_never_reserved(user):
    login = naming.posix_name(user)
    assert naming.is_valid_posix_name(login), login
    assert login not in naming.RESERVED_POSIX
    assert not login.startswith("systemd-")


def test_posix_names_are_distinct():
    logins = {naming.posix_name(u) for u in set(EDGE_USERS)}
    assert len(logins) == len(set(EDGE_USERS))


def test_root_never_becomes_root():
    assert naming.posix_name("root") != "root"
    assert naming.posix_name("root").startswith("u-root-")
    assert naming.posix_name("alice") == "alice"


@pytest.mark.parametrize("user", EDGE_USERS)
def test_hostnames_are_valid(user):
    assert naming.is_valid_lxd_name(naming.hostname(user, "gpu17"))


def test_hostname_is_server_dash_user():
    assert naming.hostname("alice", "gpu17") == "gpu17-alice"


def test_slug_needs_room_for_hash():
    with pytest.raises(ValueError):
        naming.safe_slug("Alice", 5)


@pytest.mark.parametrize("name", ["before-break", "snap-20261205-080000", "v1.2_final", "A"])
def test_snapshot_names_kept(name):
    assert naming.check_snapshot_name(name) == name


@pytest.mark.parametrize("name", ["", "a/b", "..", "a..b", ".hidden", "-x", "has space",
                                  "x;rm", "$(id)", "a" * 64, "é", None, 5])
def test_snapshot_names_refused_with_the_rule(name):
    with pytest.raises(ValueError, match="letters, digits"):
        naming.check_snapshot_name(name)
