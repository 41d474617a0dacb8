"""The store, on a temporary SQLite file and on a real PostgreSQL database
(Debian's, tests/fixtures/postgres.py): allocation, keys, forwards, audit,
migrations, and allocators in several processes at once."""

import base64
import multiprocessing
import sqlite3
import struct
import subprocess
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import pytest
import sqlalchemy
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from lxcspawner.container import IDMAP_BLOCK, IDMAP_USER_FIRST
from lxcspawner.store import (
    Base, Exhausted, InvalidInput, LimitReached, NotFound, Store, StoreError, key_fingerprint,
    parse_port_range, subuid_range,
)

FIRST = IDMAP_USER_FIRST
N_PROCS = 8


def fake_key(kind="ssh-ed25519", fill=b"k"):
    blob = struct.pack(">I", len(kind)) + kind.encode() + struct.pack(">I", 32) + fill * 32
    if kind == "ssh-rsa":  # and a 2048-bit modulus
        blob += struct.pack(">I", 257) + b"\0\xc1" + fill * 255
    return f"{kind} {base64.b64encode(blob).decode()}"


def url(tmp_path, name="store.sqlite"):
    return f"sqlite:///{tmp_path / name}"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """An empty database: a temp SQLite file, or a new PostgreSQL database."""
    if request.param == "sqlite":
        return url(tmp_path)
    return request.getfixturevalue("postgres").new_database()


@pytest.fixture
def make_store(db_url, tmp_path):
    """Stores on one database; no subuid grant unless a test passes one."""
    stores = []

    def make(**kw):
        kw.setdefault("subuid_file", str(tmp_path / "no-subuid"))
        s = Store(db_url, **kw)
        stores.append(s)
        return s
    yield make
    for s in stores:
        s.close()


@pytest.fixture
def store(make_store):
    return make_store()


def table_rows(db_url, table):
    engine = sqlalchemy.create_engine(db_url)
    try:
        with engine.connect() as c:
            return c.execute(sqlalchemy.text(f'SELECT count(*) FROM "{table}"')).scalar()
    finally:
        engine.dispose()


# ---------------------------------------------------------------- allocation

def test_users_get_the_lowest_free_port_and_id_block(store):
    a, b, c = (store.ensure_user(n) for n in ("alice", "bob", "Carol Ünicode"))
    assert [u.ssh_port for u in (a, b, c)] == [22000, 22001, 22002]
    assert [u.idmap_base for u in (a, b, c)] == [FIRST, FIRST + IDMAP_BLOCK,
                                                 FIRST + 2 * IDMAP_BLOCK]
    assert a.created.tzinfo is not None
    assert store.ensure_user("alice") == a
    assert store.user("bob") == b and store.get_user("nobody") is None
    assert [u.name for u in store.list_users()] == ["Carol Ünicode", "alice", "bob"]
    assert [e.action for e in store.audit_log()] == ["user.create"] * 3
    with pytest.raises(NotFound, match="no lxcgpu user 'nobody'"):
        store.user("nobody")


@pytest.mark.parametrize("name", ["", " alice", "alice\n", "a\x00b", "x" * 256, None, 7])
def test_bad_user_names_are_refused(store, name):
    with pytest.raises(InvalidInput):
        store.ensure_user(name)
    assert store.list_users() == []


def test_ssh_ports_exhausted(make_store, db_url):
    store = make_store(ssh_ports=(22000, 22001))
    store.ensure_user("a"), store.ensure_user("b")
    with pytest.raises(Exhausted, match=r"All 2 SSH ports \(22000-22001\) are taken"):
        store.ensure_user("c")
    with pytest.raises(Exhausted):
        store.add_key("c", fake_key(), actor="c")
    assert [u.name for u in store.list_users()] == ["a", "b"]
    assert len(store.audit_log()) == 2 and table_rows(db_url, "ssh_keys") == 0


def test_id_blocks_exhausted(make_store):
    store = make_store(idmap_last=FIRST + IDMAP_BLOCK)
    assert store.ensure_user("a").idmap_base == FIRST
    assert store.ensure_user("b").idmap_base == FIRST + IDMAP_BLOCK
    with pytest.raises(Exhausted, match=f"all 2 blocks of {IDMAP_BLOCK} host ids "
                                        f"\\({FIRST}-{FIRST + 2 * IDMAP_BLOCK - 1}\\)"):
        store.ensure_user("c")
    assert len(store.list_users()) == 2


def test_subuid_grant_limits_the_id_blocks(make_store, tmp_path):
    subuid = tmp_path / "subuid"
    # The grant starts mid-block: blocks must lie wholly inside it.
    subuid.write_text(f"_lxd:100000:1000000000\nroot:{FIRST + 100}:{3 * IDMAP_BLOCK}\n")
    store = make_store(subuid_file=str(subuid))
    assert store.subuid_grant == (FIRST + 100, 3 * IDMAP_BLOCK)
    assert [store.ensure_user(n).idmap_base for n in "ab"] == [FIRST + IDMAP_BLOCK,
                                                              FIRST + 2 * IDMAP_BLOCK]
    with pytest.raises(Exhausted):
        store.ensure_user("c")


def test_subuid_grant_without_room(make_store, tmp_path):
    subuid = tmp_path / "subuid"
    subuid.write_text("root:100000:65536\n")
    store = make_store(subuid_file=str(subuid))
    with pytest.raises(Exhausted, match="subuid grant leaves no room"):
        store.ensure_user("a")


def test_subuid_range(tmp_path):
    f = tmp_path / "subuid"
    assert subuid_range(path=str(f)) is None
    f.write_text("lxd:100000:65536\n")
    assert subuid_range(path=str(f)) is None
    f.write_text("# comment\nroot:100000:65536\nbad line\nroot:2000000:1000000\n"
                 "0:5000000:1000000\nalice:1:2000000000\n")
    assert subuid_range(path=str(f)) == (2000000, 1000000)
    assert subuid_range("alice", str(f)) == (1, 2000000000)


@pytest.mark.parametrize("text, expected", [("22000-29999", (22000, 29999)),
                                            (" 1 - 65535 ", (1, 65535)), ("80-80", (80, 80))])
def test_parse_port_range(text, expected):
    assert parse_port_range(text) == expected


@pytest.mark.parametrize("text", ["22000", "abc", "0-10", "10-5", "1-65536", "1-2-3", ""])
def test_parse_port_range_refuses(text):
    with pytest.raises(InvalidInput):
        parse_port_range(text)


@pytest.mark.parametrize("kw", [
    {"ssh_ports": (11000, 12000)}, {"forward_ports": "21000-22000"},
    {"ssh_ports": (11500, 11500)}, {"ssh_ports": (0, 10)}, {"forward_ports": ("a", 2)},
    {"forward_limit": -1}, {"idmap_first": FIRST + 1}, {"idmap_first": FIRST - IDMAP_BLOCK},
    {"idmap_last": FIRST - 1}, {"jupyter_ports": "22000-22001"},
    {"jupyter_ports": (11990, 12010)}, {"jupyter_ports": (20000, 20000)},
])
def test_bad_settings_are_refused(tmp_path, kw):
    with pytest.raises(InvalidInput):
        Store(url(tmp_path), upgrade=False, **kw)
    assert not (tmp_path / "store.sqlite").exists()


def test_string_port_ranges(make_store):
    store = make_store(ssh_ports="30000-30010", forward_ports="12000-12010")
    assert store.ensure_user("a").ssh_port == 30000
    assert store.add_forward("a", "gpu1", 80, actor="a").host_port == 12000


def test_jupyter_ports_come_in_pairs_once_per_user(store):
    assert store.get_user("alice") is None
    assert store.jupyter_port("alice", actor="hub") == 20000
    assert store.jupyter_port("bob") == 20002
    assert store.jupyter_port("alice") == 20000          # kept
    assert store.user("alice").jupyter_port == 20000
    assert store.user("alice").ssh_port == 22000          # made with the user
    assert [(a.action, a.actor) for a in store.audit_log(user="alice")] == [
        ("user.jupyter-port", "hub"), ("user.create", "hub")]


def test_jupyter_ports_exhausted(make_store, db_url):
    store = make_store(jupyter_ports=(20000, 20003))
    assert [store.jupyter_port(u) for u in ("a", "b")] == [20000, 20002]
    store.ensure_user("c")
    with pytest.raises(Exhausted, match=r"All 2 Jupyter port pairs \(20000-20003\) are taken"):
        store.jupyter_port("c")
    assert store.user("c").jupyter_port is None


def older_store_with_alice(tmp_path, revision: str) -> None:
    """A store file at an older schema ``revision``, with alice in it."""
    from alembic import command
    from alembic.config import Config
    from lxcspawner.store import MIGRATIONS
    store = Store(url(tmp_path), upgrade=False, subuid_file=str(tmp_path / "none"))
    with store._writer.begin() as conn:
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        cfg.set_main_option("path_separator", "os")
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
        conn.execute(sqlalchemy.text(
            "INSERT INTO users (name, ssh_port, idmap_base, created) "
            "VALUES ('alice', 22007, 1065536, '2026-12-01 10:00:00')"))
    store.close()


def test_an_older_store_keeps_its_users_and_gains_jupyter_ports(tmp_path):
    older_store_with_alice(tmp_path, "0003_suspended")
    with Store(url(tmp_path), subuid_file=str(tmp_path / "none")) as new:
        rec = new.user("alice")
        assert (rec.ssh_port, rec.idmap_base, rec.jupyter_port) == (22007, 1065536, None)
        assert new.jupyter_port("alice") == 20000


# ---------------------------------------------------------------- prebuilt containers

def test_prebuilt_containers_and_users_never_share_an_id_block(store):
    alice = store.ensure_user("alice")
    base = store.reserve_pool_block("gpu1", "pool--gpu1--00000001", actor="pool", image="f1")
    bob = store.ensure_user("bob")
    assert (alice.idmap_base, base, bob.idmap_base) == (
        FIRST, FIRST + IDMAP_BLOCK, FIRST + 2 * IDMAP_BLOCK)
    (m,) = store.pool_members("gpu1")
    assert (m.instance, m.idmap_base, m.ready, m.image, m.claimed_by) == (
        "pool--gpu1--00000001", base, False, "f1", None)
    assert store.pool_members("gpu2") == []
    with pytest.raises(InvalidInput):
        store.reserve_pool_block("gpu1", "not a name", actor="pool")


def test_a_new_user_takes_over_the_oldest_ready_one_and_its_block(store):
    store.reserve_pool_block("gpu1", "pool--gpu1--00000001", actor="pool")
    store.reserve_pool_block("gpu1", "pool--gpu1--00000002", actor="pool")
    # Not ready yet: nothing to take.
    assert store.claim_pool_member("alice", "gpu1", actor="hub:alice") is None
    own = store.user("alice")
    assert not own.idmap_used
    assert store.pool_ready("pool--gpu1--00000002")
    instance, rec = store.claim_pool_member("alice", "gpu1", actor="hub:alice")
    assert instance == "pool--gpu1--00000002"
    assert own.idmap_base == FIRST + 2 * IDMAP_BLOCK
    assert rec.idmap_base == FIRST + IDMAP_BLOCK and rec.idmap_used
    assert store.user("alice") == rec
    # Her own block, never on disk, is free again.
    assert store.ensure_user("bob").idmap_base == own.idmap_base
    # Being taken over: the keeper may not retire it; its user's step ends it.
    assert not store.release_pool_member(instance, actor="pool")
    assert store.release_pool_member(instance, actor="hub:alice", claimed=True)
    assert [m.instance for m in store.pool_members()] == ["pool--gpu1--00000001"]
    assert store.audit_log(user="alice")[0].action == "pool.claim"


def test_a_user_whose_block_is_on_disk_keeps_it(store):
    store.reserve_pool_block("gpu1", "pool--gpu1--00000001", actor="pool")
    store.pool_ready("pool--gpu1--00000001")
    rec = store.ensure_user("alice")
    store.mark_idmap_used("alice")
    assert store.claim_pool_member("alice", "gpu1", actor="hub:alice") is None
    assert store.user("alice").idmap_base == rec.idmap_base
    # Another server's prebuilt containers are not this one's.
    assert store.claim_pool_member("bob", "gpu2", actor="hub:bob") is None
    assert store.pool_members("gpu1")[0].claimed_by is None
    with pytest.raises(NotFound):
        store.mark_idmap_used("nobody")


def test_an_older_store_keeps_its_users_blocks(tmp_path):
    """Users from before prebuilt containers count as having their block on
    disk: none of them is ever given another."""
    older_store_with_alice(tmp_path, "0004_jupyter_port")
    with Store(url(tmp_path), subuid_file=str(tmp_path / "none")) as new:
        assert new.user("alice").idmap_used
        assert not new.ensure_user("bob").idmap_used


# ---------------------------------------------------------------- keys

def test_keys_are_normalized_and_deduplicated(store):
    k = fake_key()
    rec = store.add_key("alice", f"  {k}   alice@laptop \n", actor="alice")
    assert rec.key == f"{k} alice@laptop" and rec.comment == "alice@laptop"
    assert rec.fingerprint == key_fingerprint(k) and rec.fingerprint.startswith("SHA256:")
    # The user is created on the way, with the same actor.
    assert store.user("alice").ssh_port == 22000
    assert store.add_key("alice", f"{k} other comment\r\n", actor="alice") == rec
    assert store.list_keys("alice") == [rec]
    # Another user may add the same key.
    assert store.add_key("bob", k, actor="bob").user == "bob"
    assert store.authorized_keys("alice") == [f"{k} alice@laptop"]
    assert [(e.action, e.target) for e in store.audit_log()] == [
        ("key.add", "bob"), ("user.create", "bob"), ("key.add", "alice"),
        ("user.create", "alice")]


@pytest.mark.parametrize("make_bad", [
    lambda k, priv: "garbage",
    lambda k, priv: "",
    lambda k, priv: priv,
    lambda k, priv: priv.replace("\n", " "),
    lambda k, priv: f"{k}\n{fake_key('ssh-rsa')}",
    lambda k, priv: f"{k} me@host {fake_key('ssh-rsa')}",
    lambda k, priv: f"{k} me\nssh-ed25519 AAAA",
    lambda k, priv: f"{k} me\rcommand=x",
    lambda k, priv: f'command="/bin/sh" {k}',
    lambda k, priv: "ssh-ed25519 " + base64.b64encode(b"\0\0\0\x07ssh-rsa").decode(),
    lambda k, priv: f"{k} {'c' * 20000}",
    lambda k, priv: 42,
])
def test_bad_keys_are_refused_and_nothing_is_stored(store, db_url, tmp_path, make_bad):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k")],
                   check=True)
    priv = (tmp_path / "k").read_text()
    with pytest.raises(InvalidInput) as e:
        store.add_key("alice", make_bad(fake_key(), priv), actor="alice")
    assert str(e.value)[0].isupper() and str(e.value).endswith(".")
    assert store.get_user("alice") is None and store.list_keys("alice") == []
    assert store.audit_log() == [] and table_rows(db_url, "ssh_keys") == 0


def test_private_key_message(store, tmp_path):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k")],
                   check=True)
    with pytest.raises(InvalidInput, match="private key"):
        store.add_key("alice", (tmp_path / "k").read_text(), actor="alice")


@pytest.mark.parametrize("kind", ["ed25519", "ecdsa"])
def test_fingerprint_matches_ssh_keygen(store, tmp_path, kind):
    key = tmp_path / "id"
    subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", "alice@laptop",
                    "-f", str(key)], check=True)
    listed = subprocess.run(["ssh-keygen", "-lf", f"{key}.pub"], check=True,
                            capture_output=True, text=True).stdout.split()
    rec = store.add_key("alice", (tmp_path / "id.pub").read_text(), actor="alice")
    assert rec.fingerprint == listed[1]
    assert rec.key == (tmp_path / "id.pub").read_text().strip()


def test_remove_key_by_fingerprint_and_by_id(store):
    a = store.add_key("alice", fake_key(fill=b"a"), actor="alice")
    b = store.add_key("alice", fake_key(fill=b"b"), actor="alice")
    c = store.add_key("alice", fake_key(fill=b"c"), actor="alice")
    other = store.add_key("bob", fake_key(fill=b"o"), actor="bob")
    assert store.remove_key("alice", a.fingerprint, actor="alice") == a
    assert store.remove_key("alice", b.id, actor="admin") == b
    assert store.remove_key("alice", f" {c.id} ", actor="alice") == c
    assert store.list_keys("alice") == []
    for which in (a.fingerprint, a.id, other.id, other.fingerprint, "SHA256:nope"):
        with pytest.raises(NotFound, match="alice has no key"):
            store.remove_key("alice", which, actor="alice")
    for which in ("", "md5:ab", True, None, "1.5"):
        with pytest.raises(InvalidInput):
            store.remove_key("alice", which, actor="alice")
    assert store.list_keys("bob") == [other]
    removals = [e for e in store.audit_log() if e.action == "key.remove"]
    assert [e.actor for e in removals] == ["alice", "admin", "alice"]
    assert a.fingerprint in removals[-1].detail


# ---------------------------------------------------------------- forwards

def test_forwards_take_the_lowest_free_port_per_server(store):
    f1 = store.add_forward("alice", "gpu1", 8888, actor="alice")
    f2 = store.add_forward("alice", "gpu1", "6006", actor="alice")
    f3 = store.add_forward("bob", "gpu1", 8888, actor="bob")
    g1 = store.add_forward("bob", "gpu2", 8888, actor="bob")
    assert [f.host_port for f in (f1, f2, f3, g1)] == [11000, 11001, 11002, 11000]
    assert (f2.container_port, f2.proto, f2.server) == (6006, "tcp", "gpu1")
    store.remove_forward("alice", "gpu1", container_port=8888, actor="alice")
    assert store.add_forward("carol", "gpu1", 22, actor="carol").host_port == 11000
    assert [f.host_port for f in store.list_forwards(server="gpu1")] == [11000, 11001, 11002]
    assert store.list_forwards("bob") == [f3, g1]
    assert store.list_forwards("bob", "gpu2") == [g1]
    assert len(store.list_forwards()) == 4


def test_identical_forward_request_is_idempotent(store):
    f = store.add_forward("alice", "gpu1", 8888, actor="alice")
    assert store.add_forward("alice", "gpu1", "8888", actor="alice") == f
    assert store.list_forwards() == [f]
    assert [e.action for e in store.audit_log()] == ["forward.add", "user.create"]


def test_forward_limit_per_user_and_server(make_store):
    store = make_store(forward_limit=3)
    for p in (1, 2, 3):
        store.add_forward("alice", "gpu1", p, actor="alice")
    with pytest.raises(LimitReached, match="alice may have at most 3 port forwards on gpu1 and already has 3"):
        store.add_forward("alice", "gpu1", 4, actor="alice")
    # An existing one is still returned, and other servers and users are free.
    assert store.add_forward("alice", "gpu1", 3, actor="alice").container_port == 3
    store.add_forward("alice", "gpu2", 4, actor="alice")
    store.add_forward("bob", "gpu1", 4, actor="bob")
    assert len(store.list_forwards("alice", "gpu1")) == 3


def test_default_forward_limit_is_ten(store):
    for p in range(1, 11):
        store.add_forward("alice", "gpu1", p, actor="alice")
    with pytest.raises(LimitReached):
        store.add_forward("alice", "gpu1", 11, actor="alice")


def test_forward_ports_exhausted(make_store):
    store = make_store(forward_ports=(11000, 11001))
    store.add_forward("alice", "gpu1", 1, actor="alice")
    store.add_forward("bob", "gpu1", 1, actor="bob")
    with pytest.raises(Exhausted, match=r"All 2 forward ports on gpu1 \(11000-11001\)"):
        store.add_forward("carol", "gpu1", 1, actor="carol")
    # Nothing was written, not even carol's user record.
    assert store.get_user("carol") is None and len(store.list_forwards()) == 2
    assert store.add_forward("carol", "gpu2", 1, actor="carol").host_port == 11000


@pytest.mark.parametrize("port", [0, -1, 65536, "0", "65536", "http", "80a", "", " ", None,
                                  8.5, True, "٨٠", [80]])
def test_bad_container_ports_are_refused(store, port):
    store.add_forward("alice", "gpu1", 8888, actor="alice")
    before = store.audit_log()
    with pytest.raises(InvalidInput, match="container port must be a number from 1 to 65535"):
        store.add_forward("alice", "gpu1", port, actor="alice")
    assert len(store.list_forwards()) == 1 and store.audit_log() == before


@pytest.mark.parametrize("kw", [{"server": "GPU1"}, {"server": "-gpu"}, {"server": "gpu1/x"},
                                {"server": "a" * 64}, {"server": ""}, {"proto": "udp"},
                                {"user": "bad\nname"}, {"actor": ""}])
def test_bad_forward_requests_are_refused(store, kw):
    args = {"user": "alice", "server": "gpu1", "container_port": 80, "actor": "alice"} | kw
    with pytest.raises(InvalidInput):
        store.add_forward(**args)
    assert store.list_forwards() == [] and store.list_users() == []


def test_remove_forward(store):
    a = store.add_forward("alice", "gpu1", 8888, actor="alice")
    b = store.add_forward("alice", "gpu1", 6006, actor="alice")
    c = store.add_forward("alice", "gpu2", 8888, actor="alice")
    with pytest.raises(InvalidInput):
        store.remove_forward("alice", "gpu1", actor="alice")
    with pytest.raises(InvalidInput):
        store.remove_forward("alice", "gpu1", container_port=1, host_port=2, actor="alice")
    with pytest.raises(NotFound, match="alice has no forward on host port 11000 on gpu9"):
        store.remove_forward("alice", "gpu9", host_port=11000, actor="alice")
    with pytest.raises(NotFound):
        store.remove_forward("bob", "gpu1", container_port=8888, actor="bob")
    assert store.remove_forward("alice", "gpu1", container_port="8888", actor="alice") == a
    assert store.remove_forward("alice", "gpu1", host_port=b.host_port, actor="admin") == b
    with pytest.raises(NotFound, match="no forward of container port 8888/tcp on gpu1"):
        store.remove_forward("alice", "gpu1", container_port=8888, actor="alice")
    assert store.list_forwards() == [c]
    assert [(e.action, e.actor) for e in store.audit_log(limit=2)] == [
        ("forward.remove", "admin"), ("forward.remove", "alice")]


# ---------------------------------------------------------------- audit

def test_every_mutation_is_audited_newest_first(store):
    k = store.add_key("alice", fake_key(), actor="alice")
    f = store.add_forward("alice", "gpu1", 8888, actor="alice")
    store.remove_forward("alice", "gpu1", host_port=f.host_port, actor="admin")
    store.remove_key("alice", k.id, actor="alice")
    store.ensure_user("bob", actor="hub")
    store.audit("admin", "forward.add", "bob", {"why": "denied"}, ok=False)
    log = store.audit_log()
    assert [(e.actor, e.action, e.target, e.ok) for e in log] == [
        ("admin", "forward.add", "bob", False),
        ("hub", "user.create", "bob", True),
        ("alice", "key.remove", "alice", True),
        ("admin", "forward.remove", "alice", True),
        ("alice", "forward.add", "alice", True),
        ("alice", "key.add", "alice", True),
        ("alice", "user.create", "alice", True),
    ]
    assert [e.id for e in log] == sorted((e.id for e in log), reverse=True)
    assert all(a.time >= b.time for a, b in zip(log, log[1:]))
    assert log[0].detail == '{"why": "denied"}'
    assert '"host_port": 11000' in log[3].detail
    assert len(store.audit_log(user="alice")) == 5
    assert [e.action for e in store.audit_log(user="bob", limit=1)] == ["forward.add"]
    with pytest.raises(InvalidInput):
        store.audit_log(limit=0)
    with pytest.raises(InvalidInput):
        store.audit("admin", "", "bob")


# ---------------------------------------------------------------- migrations

def test_migrations_match_the_models_and_upgrade_is_idempotent(tmp_path):
    store = Store(url(tmp_path), upgrade=False, subuid_file=str(tmp_path / "none"))
    assert not (tmp_path / "store.sqlite").exists() or table_rows(url(tmp_path), "sqlite_master") == 0
    store.upgrade()
    store.ensure_user("alice")
    with sqlite3.connect(tmp_path / "store.sqlite") as c:
        schema = c.execute("SELECT type, name, sql FROM sqlite_master ORDER BY name").fetchall()
    store.upgrade()
    store.close()
    with Store(url(tmp_path), subuid_file=str(tmp_path / "none")) as again:
        assert again.user("alice").ssh_port == 22000
        with again._engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    with sqlite3.connect(tmp_path / "store.sqlite") as c:
        assert c.execute("SELECT type, name, sql FROM sqlite_master ORDER BY name"
                         ).fetchall() == schema
        assert c.execute("SELECT version_num FROM alembic_version").fetchall() == [
            ("0005_pool",)]
        assert c.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert {n for t, n, _ in schema if t == "table"} == {
        "alembic_version", "users", "ssh_keys", "forwards", "addresses", "audit",
        "pool_members"}


def test_migrations_on_postgresql_match_the_models(postgres, tmp_path):
    db = postgres.new_database()
    store = Store(db, upgrade=False, subuid_file=str(tmp_path / "none"))
    assert table_names(db) == set()
    store.upgrade()
    store.upgrade()     # again: nothing to do
    store.ensure_user("alice")
    store.close()
    with Store(db, subuid_file=str(tmp_path / "none")) as again:
        assert again.user("alice").ssh_port == 22000
        with again._engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
            assert conn.execute(sqlalchemy.text("SELECT version_num FROM alembic_version")
                                ).scalars().all() == ["0005_pool"]
    assert table_names(db) == {"alembic_version", "users", "ssh_keys", "forwards",
                               "addresses", "audit", "pool_members"}


def table_names(db_url) -> set[str]:
    engine = sqlalchemy.create_engine(db_url)
    try:
        return set(sqlalchemy.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_foreign_keys_are_enforced(store):
    store.ensure_user("alice")
    with store._engine.begin() as conn:
        with pytest.raises(Exception, match="(?i)foreign key"):
            conn.exec_driver_sql(
                'INSERT INTO ssh_keys ("user", key, fingerprint, comment, created) '
                "VALUES ('ghost', 'k', 'f', '', '2026-01-01')")


def test_store_errors_are_value_errors():
    assert issubclass(StoreError, ValueError)
    assert all(issubclass(c, StoreError) for c in (NotFound, Exhausted, LimitReached,
                                                   InvalidInput))


# ---------------------------------------------------------------- processes

_barrier = None


def _init_worker(barrier):
    global _barrier
    _barrier = barrier


def _in_process(db_url, subuid_file, job, i):
    """One allocator process: start together, open the store (all at once on
    a fresh file, so the first upgrade races too), then do ``job``."""
    _barrier.wait(timeout=60)
    limit = {"forward_limit": 3} if job == "limited-forwards" else {}
    with Store(db_url, subuid_file=subuid_file, **limit) as store:
        if job == "limited-forwards":
            try:
                return [store.add_forward("alice", "gpu1", 8000 + i, actor=f"p{i}")]
            except LimitReached:
                return []
        if job == "users":
            return [store.ensure_user(f"p{i}-u{j}", actor=f"p{i}") for j in range(25)]
        if job == "same-forward":
            return [store.add_forward("alice", "gpu1", 8888, actor=f"p{i}")]
        if job == "claims":
            got = store.claim_pool_member(f"new{i}", "gpu1", actor=f"p{i}")
            return [None if got is None else (got[0], got[1].name, got[1].idmap_base)]
        return [store.add_forward(f"user{i}", "gpu1", 8888, actor=f"p{i}")]


@pytest.fixture(scope="module")
def processes():
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(N_PROCS, mp_context=ctx, initializer=_init_worker,
                             initargs=(ctx.Barrier(N_PROCS),)) as pool:
        def run(db_url, tmp_path, job):
            futures = [pool.submit(_in_process, db_url, str(tmp_path / "none"), job, i)
                       for i in range(N_PROCS)]
            return [r for f in futures for r in f.result(timeout=120)]
        yield run


def test_parallel_users_never_collide(processes, db_url, tmp_path):
    users = processes(db_url, tmp_path, "users")
    assert len(users) == N_PROCS * 25
    assert sorted(u.ssh_port for u in users) == list(range(22000, 22000 + len(users)))
    assert sorted(u.idmap_base for u in users) == [
        FIRST + k * IDMAP_BLOCK for k in range(len(users))]
    assert table_rows(db_url, "users") == len(users)
    assert table_rows(db_url, "audit") == len(users)


def test_parallel_claims_never_share_a_prebuilt_container(processes, db_url, tmp_path):
    """Eight new users take over prebuilt containers at once, from eight
    processes, with five ready: five get one each, each a different one with
    its block; three get none."""
    with Store(db_url, subuid_file=str(tmp_path / "none")) as store:
        for k in range(5):
            store.reserve_pool_block("gpu1", f"pool--gpu1--{k:08x}", actor="pool")
            store.pool_ready(f"pool--gpu1--{k:08x}")
        bases = {m.instance: m.idmap_base for m in store.pool_members("gpu1")}
    got = [g for g in processes(db_url, tmp_path, "claims") if g is not None]
    assert len(got) == 5
    assert sorted(g[0] for g in got) == sorted(bases)
    assert all(bases[instance] == base for instance, _, base in got)
    with Store(db_url, subuid_file=str(tmp_path / "none")) as store:
        assert {u.name: u.idmap_base for u in store.list_users() if u.idmap_used} == \
            {user: base for _, user, base in got}
        assert all(m.claimed_by for m in store.pool_members())


def test_parallel_identical_forwards_make_one(processes, db_url, tmp_path):
    forwards = processes(db_url, tmp_path, "same-forward")
    assert len(set(forwards)) == 1 and forwards[0].host_port == 11000
    assert table_rows(db_url, "forwards") == 1 and table_rows(db_url, "users") == 1
    assert table_rows(db_url, "audit") == 2


def test_parallel_different_forwards_get_distinct_ports(processes, db_url, tmp_path):
    forwards = processes(db_url, tmp_path, "different-forwards")
    assert sorted(f.host_port for f in forwards) == list(range(11000, 11000 + N_PROCS))
    assert sorted(f.user for f in forwards) == sorted(f"user{i}" for i in range(N_PROCS))


def test_parallel_forwards_never_pass_the_limit(processes, db_url, tmp_path):
    forwards = processes(db_url, tmp_path, "limited-forwards")
    assert len(forwards) == 3 and table_rows(db_url, "forwards") == 3
    assert len({f.host_port for f in forwards}) == 3


def test_forward_to_a_chosen_host_port(store):
    f = store.add_forward("alice", "gpu17", 6006, actor="admin", host_port="11500")
    assert (f.host_port, f.container_port) == (11500, 6006)
    # The same request, with or without the host port, is the same forward.
    assert store.add_forward("alice", "gpu17", 6006, actor="admin", host_port=11500) == f
    assert store.add_forward("alice", "gpu17", 6006, actor="admin") == f
    # Another server has its own ports.
    assert store.add_forward("bob", "gpu18", 80, actor="admin", host_port=11500).host_port == 11500
    rows = store.list_forwards()
    for port, host_port in [(80, 11500), (6006, 11501), (81, 10999), (81, 12000), (81, "x")]:
        with pytest.raises(InvalidInput):
            store.add_forward("alice", "gpu17", port, actor="admin", host_port=host_port)
    assert store.list_forwards() == rows
    # Without a host port the lowest free one is used, skipping the chosen one.
    assert store.add_forward("alice", "gpu17", 81, actor="admin").host_port == 11000


# ---------------------------------------------------------------- addresses

FREE = [f"10.213.87.{i}" for i in range(2, 6)]


def test_addresses_are_assigned_lowest_free_per_server_and_kept(store):
    assert store.address("alice", "gpu17") is None
    assert store.assign_address("alice", "gpu17", FREE, actor="t") == "10.213.87.2"
    assert store.assign_address("bob", "gpu17", FREE, actor="t") == "10.213.87.3"
    # The same address on another server is another assignment.
    assert store.assign_address("bob", "gpu18", FREE, actor="t") == "10.213.87.2"
    # Asked again, an assignment still among the candidates is kept.
    assert store.assign_address("bob", "gpu17", FREE, actor="t") == "10.213.87.3"
    assert store.address("bob", "gpu17") == "10.213.87.3"
    assert store.list_addresses("gpu17") == [("alice", "gpu17", "10.213.87.2"),
                                             ("bob", "gpu17", "10.213.87.3")]
    actions = [a.action for a in store.audit_log(user="bob")]
    assert actions.count("address.assign") == 2


def test_an_address_outside_the_candidates_is_replaced(store):
    store.assign_address("alice", "gpu17", FREE, actor="t")
    # The bridge was renumbered: the old address is no candidate any more.
    assert store.assign_address("alice", "gpu17", ["10.99.0.2", "10.99.0.3"],
                                actor="t") == "10.99.0.2"
    assert store.address("alice", "gpu17") == "10.99.0.2"


def test_no_free_address_is_a_clear_error_and_changes_nothing(store):
    store.assign_address("alice", "gpu17", FREE[:1], actor="t")
    with pytest.raises(Exhausted, match="No address is free for a new container on gpu17"):
        store.assign_address("bob", "gpu17", FREE[:1], actor="t")
    assert store.address("bob", "gpu17") is None


def test_a_released_address_is_reused(store):
    store.assign_address("alice", "gpu17", FREE, actor="t")
    assert store.release_address("alice", "gpu17", actor="t") == "10.213.87.2"
    assert store.release_address("alice", "gpu17", actor="t") is None
    assert store.assign_address("bob", "gpu17", FREE, actor="t") == "10.213.87.2"


def test_two_stores_never_assign_one_address_twice(db_url, tmp_path):
    a = Store(db_url, subuid_file=str(tmp_path / "none"))
    b = Store(db_url, subuid_file=str(tmp_path / "none"))
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda i: (a if i % 2 else b).assign_address(
            f"user{i}", "gpu17", [f"10.0.0.{n}" for n in range(2, 40)], actor="t"), range(16)))
    assert len(set(got)) == 16
    a.close()
    b.close()


def test_a_suspended_user_keeps_their_keys_in_the_store_but_none_reach_containers(store):
    store.add_key("alice", fake_key(), actor="t")
    assert store.set_suspended("alice", True, actor="lab-sync", reason="left") is True
    assert store.set_suspended("alice", True, actor="lab-sync") is False     # already
    assert store.user("alice").suspended is not None
    assert store.authorized_keys("alice") == [] and len(store.list_keys("alice")) == 1
    assert store.set_suspended("alice", False, actor="lab-sync") is True
    assert len(store.authorized_keys("alice")) == 1 and store.user("alice").suspended is None
    assert [a.action for a in store.audit_log(user="alice")][:2] == ["user.resume",
                                                                     "user.suspend"]
    assert store.set_suspended("nobody", True, actor="t") is False


def test_the_store_imports_nothing_that_talks_to_lxd():
    # The portal and the hub open the store without pylxd: key parsing and id
    # arithmetic are modules of their own (sshkeys, idmap).
    import subprocess
    import sys

    code = ("import sys, lxcspawner.store; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'pylxd' or m in "
            "('lxcspawner.lxd', 'lxcspawner.container', 'lxcspawner.provision')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
