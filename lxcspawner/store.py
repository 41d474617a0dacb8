"""The store: what must be unique across the lab, in one database.

Each user's SSH port (the same on every GPU server), their Jupyter port pair
(the same on every server: how the hub's proxy reaches their Jupyter on a
GPU server elsewhere) and id map base (a block of 65536 host ids), forwarded host ports (unique per GPU server), each
container's address on its GPU server's bridge (unique per server), users'
SSH public keys, the prebuilt containers of each server with the id block
each holds (lxcspawner.pool), and the audit log.  Allocation picks the lowest free value and
never hands out one that is taken; nothing is ever deleted except a key, a
forward or an address released on request (and those of a user whose row is
deleted).

The API is synchronous (SQLAlchemy): callers on an event loop run it in an
executor.  Every mutation and its audit entry commit in one transaction; bad
input raises a :class:`StoreError` subclass whose message is a sentence fit
for the user, and changes nothing.

Concurrency.  On SQLite (the default) every writing transaction starts with
``BEGIN IMMEDIATE``, so allocators in different processes serialize on the
database's write lock (WAL keeps readers unblocked, and a 30 s busy timeout
makes writers wait rather than fail).  On PostgreSQL every writing
transaction first takes one advisory lock (``pg_advisory_xact_lock``), to
the same effect.  The unique constraints stay the last word: a transaction
that loses a race anyway (another database) gets an IntegrityError and is
retried a few times.

The schema is managed by alembic (``lxcspawner/migrations``); ``Store()``
upgrades to the newest revision on start, inside the same kind of write
transaction, so concurrent first starts are safe.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import random
import re
import sqlite3
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

from alembic import command
from alembic.config import Config
from sqlalchemy import (
    BigInteger, DateTime, ForeignKey, Integer, MetaData, String, Text, TypeDecorator,
    UniqueConstraint, create_engine, event, false, func, select, text, true,
)
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from . import idmap, naming, portmap
from .idmap import subuid_range  # noqa: F401  (lxcspawner.store.subuid_range)
from .sitedefaults import DEFAULT_STORE_URL
from .sshkeys import KEY_TYPES, normalize_public_key

log = logging.getLogger("lxcspawner.store")

DEFAULT_URL = DEFAULT_STORE_URL
SSH_PORTS = portmap.SSH_PORTS
FORWARD_PORTS = portmap.FORWARD_PORTS
JUPYTER_PORTS = portmap.JUPYTER_PORTS
FORWARD_LIMIT = portmap.FORWARD_LIMIT
PROTOCOLS = ("tcp",)
BUSY_TIMEOUT_S = 30
KEY_MAX = 16384           # an RSA-16384 public key is about 2.8 KB
NAME_MAX = 255
MIGRATIONS = Path(__file__).parent / "migrations"
# The write transaction's execution option that makes SQLite take the write
# lock at BEGIN rather than at the first write.
_WRITE = "lxcgpu_write"
_ATTEMPTS = 8             # write attempts on a unique-constraint race
_PG_UPGRADE_LOCK = 0x6C786367  # "lxcg": the advisory lock serializing upgrades
_PG_WRITE_LOCK = 0x6C786377    # "lxcw": the one serializing writers

_PORT = re.compile(r"^[0-9]{1,5}$")
# A second key pasted on the same line ends up in the first one's comment.
_ANOTHER_KEY = re.compile(
    r"(?:^|\s)(?:%s)\s+AAAA[A-Za-z0-9+/]" % "|".join(re.escape(k) for k in sorted(KEY_TYPES)))

T = TypeVar("T")


class StoreError(ValueError):
    """The store refuses a request; the message is a sentence for the user."""


class NotFound(StoreError):
    """The user, key or forward asked for does not exist."""


class Exhausted(StoreError):
    """A port range or the id range is used up."""


class LimitReached(StoreError):
    """The user already has as many forwards on that server as allowed."""


class InvalidInput(StoreError):
    """A bad port, key, name or setting."""


# ---------------------------------------------------------------- records

@dataclass(frozen=True)
class UserRecord:
    name: str
    ssh_port: int
    idmap_base: int
    created: datetime
    # Set while the user is not in the lab's groups any more: their keys stay
    # in the store but reach no container, and their port maps are removed.
    suspended: datetime | None = None
    # The first of the user's two Jupyter host ports (allocated when first
    # needed; see Store.jupyter_port).
    jupyter_port: int | None = None
    # A container with the id block was made (Store.mark_idmap_used).
    idmap_used: bool = True


@dataclass(frozen=True)
class PoolRecord:
    instance: str
    server: str
    idmap_base: int
    created: datetime
    ready: bool                 # made, started once (its files shifted) and stopped
    image: str | None           # the template's fingerprint it was made from
    claimed_by: str | None      # a user taking it over right now
    claimed_at: datetime | None


@dataclass(frozen=True)
class KeyRecord:
    id: int
    user: str
    key: str              # the normalized line: ``type base64 [comment]``
    fingerprint: str      # ``SHA256:...`` as ``ssh-keygen -l`` prints it
    comment: str
    created: datetime


@dataclass(frozen=True)
class ForwardRecord:
    id: int
    user: str
    server: str
    host_port: int
    container_port: int
    proto: str
    created: datetime


@dataclass(frozen=True)
class AuditRecord:
    id: int
    time: datetime
    actor: str
    action: str
    target: str
    detail: str | None
    ok: bool


# ---------------------------------------------------------------- schema

class _UTCDateTime(TypeDecorator):
    """A UTC time, stored naive (SQLite has no time zones), read back aware."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value, dialect):
        return None if value is None else value.astimezone(timezone.utc).replace(tzinfo=None)

    def process_result_value(self, value, dialect):
        return None if value is None else value.replace(tzinfo=timezone.utc)


def _now() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    # Named constraints, so later migrations (batch mode on SQLite) can
    # address them.
    metadata = MetaData(naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    })


class User(Base):
    __tablename__ = "users"

    name: Mapped[str] = mapped_column(String(NAME_MAX), primary_key=True)
    ssh_port: Mapped[int] = mapped_column(Integer, unique=True)
    idmap_base: Mapped[int] = mapped_column(BigInteger, unique=True)
    created: Mapped[datetime] = mapped_column(_UTCDateTime, default=_now)
    suspended: Mapped[datetime | None] = mapped_column(_UTCDateTime, nullable=True)
    jupyter_port: Mapped[int | None] = mapped_column(Integer, unique=True, nullable=True)
    # A container with this id block was made (its files are the block's):
    # only a block not yet used may be swapped for a prebuilt container's.
    idmap_used: Mapped[bool] = mapped_column(default=False, server_default=true())


class PoolMember(Base):
    """A prebuilt container (lxcspawner.pool) and the id block its files carry."""

    __tablename__ = "pool_members"

    instance: Mapped[str] = mapped_column(String(63), primary_key=True)
    server: Mapped[str] = mapped_column(String(63))
    idmap_base: Mapped[int] = mapped_column(BigInteger, unique=True)
    created: Mapped[datetime] = mapped_column(_UTCDateTime, default=_now)
    ready: Mapped[bool] = mapped_column(default=False, server_default=false())
    image: Mapped[str | None] = mapped_column(String(64), nullable=True)
    claimed_by: Mapped[str | None] = mapped_column(String(NAME_MAX), nullable=True)
    claimed_at: Mapped[datetime | None] = mapped_column(_UTCDateTime, nullable=True)


class SSHKey(Base):
    __tablename__ = "ssh_keys"
    __table_args__ = (UniqueConstraint("user", "fingerprint"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user: Mapped[str] = mapped_column(ForeignKey("users.name", ondelete="CASCADE"))
    key: Mapped[str] = mapped_column(Text)
    fingerprint: Mapped[str] = mapped_column(String(64))
    comment: Mapped[str] = mapped_column(Text, default="")
    created: Mapped[datetime] = mapped_column(_UTCDateTime, default=_now)


class Forward(Base):
    __tablename__ = "forwards"
    __table_args__ = (UniqueConstraint("server", "host_port"),
                      UniqueConstraint("user", "server", "container_port", "proto"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user: Mapped[str] = mapped_column(ForeignKey("users.name", ondelete="CASCADE"))
    server: Mapped[str] = mapped_column(String(63))
    host_port: Mapped[int] = mapped_column(Integer)
    container_port: Mapped[int] = mapped_column(Integer)
    proto: Mapped[str] = mapped_column(String(8), default="tcp")
    created: Mapped[datetime] = mapped_column(_UTCDateTime, default=_now)


class Address(Base):
    """The address lxcgpu assigned to a user's container on one GPU server."""

    __tablename__ = "addresses"
    __table_args__ = (UniqueConstraint("server", "address"),)

    user: Mapped[str] = mapped_column(ForeignKey("users.name", ondelete="CASCADE"),
                                      primary_key=True)
    server: Mapped[str] = mapped_column(String(63), primary_key=True)
    address: Mapped[str] = mapped_column(String(45))
    created: Mapped[datetime] = mapped_column(_UTCDateTime, default=_now)


class Audit(Base):
    __tablename__ = "audit"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    time: Mapped[datetime] = mapped_column(_UTCDateTime, default=_now)
    actor: Mapped[str] = mapped_column(String(NAME_MAX))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(NAME_MAX), index=True)
    detail: Mapped[str | None] = mapped_column(Text)
    ok: Mapped[bool] = mapped_column(default=True)


def _user_record(r: User) -> UserRecord:
    return UserRecord(r.name, r.ssh_port, r.idmap_base, r.created, r.suspended, r.jupyter_port,
                      r.idmap_used)


def _pool_record(r: PoolMember) -> PoolRecord:
    return PoolRecord(r.instance, r.server, r.idmap_base, r.created, r.ready, r.image,
                      r.claimed_by, r.claimed_at)


def _key_record(r: SSHKey) -> KeyRecord:
    return KeyRecord(r.id, r.user, r.key, r.fingerprint, r.comment, r.created)


def _forward_record(r: Forward) -> ForwardRecord:
    return ForwardRecord(r.id, r.user, r.server, r.host_port, r.container_port, r.proto,
                         r.created)


def _audit_record(r: Audit) -> AuditRecord:
    return AuditRecord(r.id, r.time, r.actor, r.action, r.target, r.detail, r.ok)


# ---------------------------------------------------------------- pure helpers

def parse_port_range(text: str) -> tuple[int, int]:
    """``"22000-29999"`` -> ``(22000, 29999)``; ports 1..65535, low <= high."""
    try:
        return portmap.parse_port_range(text)
    except ValueError as e:
        raise InvalidInput(str(e)) from None


def _check_range(value: Any, what: str) -> tuple[int, int]:
    if isinstance(value, str):
        return parse_port_range(value)
    try:
        lo, hi = value
    except (TypeError, ValueError):
        raise InvalidInput(f"{what} should be a (low, high) pair of ports.") from None
    if not all(isinstance(p, int) and not isinstance(p, bool) for p in (lo, hi)) \
            or not 1 <= lo <= hi <= 65535:
        raise InvalidInput(f"{what} {value!r} should be ports from 1 to 65535, low to high.")
    return lo, hi


def _idmap_bases(first: int, last: int, grant: tuple[int, int] | None) -> range:
    try:
        return idmap.block_bases(first, last, grant)
    except ValueError as e:
        raise InvalidInput(str(e)) from None


def key_fingerprint(public_key: str) -> str:
    """The SHA256 fingerprint of a public key line, as ``ssh-keygen -l`` prints it."""
    return _parse_key(public_key)[1]


def _fingerprint(blob: bytes) -> str:
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def _parse_key(public_key: Any) -> tuple[str, str, str]:
    """(normalized line, fingerprint, comment) of one public key."""
    if not isinstance(public_key, str) or not public_key.strip():
        raise InvalidInput("Paste an SSH public key, such as the contents of "
                           "~/.ssh/id_ed25519.pub.")
    if "PRIVATE KEY" in public_key:
        raise InvalidInput("That is a private key, which must never leave your computer: "
                           "paste the public key (the .pub file) instead.")
    if len(public_key) > KEY_MAX:
        raise InvalidInput(f"That key is longer than {KEY_MAX} characters; "
                           "paste one public key.")
    try:
        # strip(): a key copied on Windows ends in CR LF.
        line = normalize_public_key(public_key.strip())
    except ValueError as e:
        raise InvalidInput(f"That is not a valid SSH public key: {e}.") from None
    kind, body, *rest = line.split(" ", 2)
    comment = rest[0] if rest else ""
    if _ANOTHER_KEY.search(comment):
        raise InvalidInput("That text holds more than one key: add one key at a time.")
    return line, _fingerprint(base64.b64decode(body)), comment


def _check_name(name: Any, what: str = "user name") -> str:
    if not isinstance(name, str) or not 0 < len(name) <= NAME_MAX or name != name.strip() \
            or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise InvalidInput(f"{name!r} is not a valid {what}.")
    return name


def _check_server(server: Any) -> str:
    try:
        return naming.check_server_name(server)
    except ValueError as e:
        raise InvalidInput(f"{e}.") from None


def _check_port(port: Any, what: str) -> int:
    if isinstance(port, str) and _PORT.fullmatch(port.strip()):
        port = int(port)
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise InvalidInput(f"The {what} must be a number from 1 to 65535, not {port!r}.")
    return port


def _check_proto(proto: Any) -> str:
    if proto not in PROTOCOLS:
        raise InvalidInput(f"Only {', '.join(PROTOCOLS)} ports can be forwarded, not {proto!r}.")
    return proto


def _lowest_free(candidates: range, used: set[int]) -> int | None:
    return next((c for c in candidates if c not in used), None)


# ---------------------------------------------------------------- SQLite

def _sqlite_connect(dbapi_connection, connection_record) -> None:
    # Let SQLAlchemy's "begin" event emit BEGIN itself (pysqlite would
    # otherwise begin lazily, before the first write only).
    dbapi_connection.isolation_level = None
    cur = dbapi_connection.cursor()
    cur.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_S * 1000}")
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            cur.execute("PRAGMA journal_mode = WAL")
            break
        except sqlite3.OperationalError as e:
            # Turning a new file to WAL takes an exclusive lock, and when
            # processes race for it SQLite answers "locked" at once rather
            # than wait (waiting would deadlock): step back and retry.
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(random.uniform(0.005, 0.05))
    cur.execute("PRAGMA foreign_keys = ON")
    cur.close()


def _pg_begin(conn: Connection) -> None:
    # Writers take one advisory lock for their transaction: they serialize as
    # on SQLite, instead of racing for the lowest free port and retrying.
    if conn.get_execution_options().get(_WRITE):
        conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_WRITE_LOCK})")


def _sqlite_begin(conn: Connection) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(_WRITE)
                         else "BEGIN")


def _make_engine(url: str) -> Engine:
    u = make_url(url)
    if u.get_backend_name() == "postgresql":
        engine = create_engine(u, pool_pre_ping=True)
        event.listen(engine, "begin", _pg_begin)
        return engine
    if u.get_backend_name() != "sqlite":
        return create_engine(u, pool_pre_ping=True)
    if u.database and u.database != ":memory:" and not u.query.get("uri"):
        import contextlib
        import os
        db = Path(u.database)
        db.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # The store is for its owner only (root): created 0600, and an older
        # file fixed.  SQLite gives -wal and -shm the database file's mode;
        # existing ones are fixed too.
        os.close(os.open(db, os.O_CREAT | os.O_WRONLY, 0o600))
        for f in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
            with contextlib.suppress(FileNotFoundError):
                if f.stat().st_mode & 0o077:
                    os.chmod(f, 0o600)
    engine = create_engine(u)
    event.listen(engine, "connect", _sqlite_connect)
    event.listen(engine, "begin", _sqlite_begin)
    return engine


# ---------------------------------------------------------------- the store

class Store:
    """Users' ports, id blocks, keys and forwards, and the audit log.

    ``ssh_ports``, ``forward_ports`` and ``jupyter_ports`` are (low, high)
    pairs or ``"low-high"`` strings and must not overlap.  Users' id blocks start at ``idmap_first``
    plus a multiple of 65536, at most ``idmap_last``, and lie wholly inside
    root's grant in ``subuid_file`` when that file grants root any ids.
    """

    def __init__(self, url: str = DEFAULT_URL, *,
                 ssh_ports: tuple[int, int] | str = SSH_PORTS,
                 forward_ports: tuple[int, int] | str = FORWARD_PORTS,
                 forward_limit: int = FORWARD_LIMIT,
                 jupyter_ports: tuple[int, int] | str = JUPYTER_PORTS,
                 idmap_first: int = idmap.IDMAP_USER_FIRST,
                 idmap_last: int = idmap.IDMAP_USER_LAST,
                 subuid_file: str = "/etc/subuid", upgrade: bool = True):
        self.ssh_ports = _check_range(ssh_ports, "The SSH port range")
        self.forward_ports = _check_range(forward_ports, "The forward port range")
        self.jupyter_ports = _check_range(jupyter_ports, "The Jupyter port range")
        try:
            portmap.check_port_ranges(self.ssh_ports, self.forward_ports, self.jupyter_ports)
        except ValueError as e:
            raise InvalidInput(str(e)) from None
        if not isinstance(forward_limit, int) or isinstance(forward_limit, bool) \
                or forward_limit < 0:
            raise InvalidInput(f"The forward limit must be a whole number >= 0, "
                               f"not {forward_limit!r}.")
        self.forward_limit = forward_limit
        self.subuid_grant = subuid_range("root", subuid_file)
        self.idmap_bases = _idmap_bases(idmap_first, idmap_last, self.subuid_grant)
        self._engine = _make_engine(url)
        self._writer = self._engine.execution_options(**{_WRITE: True})
        if upgrade:
            self.upgrade()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def upgrade(self) -> None:
        """Bring the schema to the newest revision (a no-op when it is)."""
        with self._writer.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_UPGRADE_LOCK})
            cfg = Config()
            cfg.set_main_option("script_location", str(MIGRATIONS).replace("%", "%%"))
            cfg.set_main_option("path_separator", "os")
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    def close(self) -> None:
        self._engine.dispose()

    # -- transactions

    def _read(self, fn: Callable[[Session], T]) -> T:
        with Session(self._engine) as s:
            return fn(s)

    def _write(self, fn: Callable[[Session], T]) -> T:
        """Run ``fn`` in one write transaction, retried when it loses a race
        on a unique constraint (never on SQLite, where writers serialize)."""
        for attempt in range(_ATTEMPTS):
            try:
                with Session(self._writer, expire_on_commit=False) as s, s.begin():
                    return fn(s)
            except IntegrityError as e:
                if attempt == _ATTEMPTS - 1:
                    raise StoreError("The store is busy with a conflicting change; "
                                     "please try again.") from e
                log.debug("retrying after a conflicting write: %s", e)
                time.sleep(random.uniform(0, 0.01 * 2 ** attempt))
        raise AssertionError("unreachable")

    # -- audit

    @staticmethod
    def _audit(s: Session, actor: str, action: str, target: str, detail: Any = None,
               ok: bool = True) -> None:
        if detail is not None and not isinstance(detail, str):
            detail = json.dumps(detail, sort_keys=True, default=str)
        s.add(Audit(time=_now(), actor=actor, action=action, target=target, detail=detail,
                    ok=bool(ok)))

    def audit(self, actor: str, action: str, target: str, detail: Any = None,
              ok: bool = True) -> None:
        """Record an action (also a failed one, with ``ok=False``).  ``detail``
        is text or anything JSON can encode."""
        actor, target = _check_name(actor, "actor"), _check_name(target, "audit target")
        if not isinstance(action, str) or not 0 < len(action) <= 64:
            raise InvalidInput(f"{action!r} is not a valid audit action.")
        self._write(lambda s: self._audit(s, actor, action, target, detail, ok))

    def audit_log(self, *, user: str | None = None, limit: int = 100) -> list[AuditRecord]:
        """The newest ``limit`` entries, newest first; only ``user``'s if given."""
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise InvalidInput(f"The limit must be a positive whole number, not {limit!r}.")
        q = select(Audit).order_by(Audit.id.desc()).limit(limit)
        if user is not None:
            q = q.where(Audit.target == _check_name(user))
        return self._read(lambda s: [_audit_record(r) for r in s.scalars(q)])

    # -- users

    def _ensure_user(self, s: Session, name: str, actor: str) -> User:
        row = s.get(User, name)
        if row is not None:
            return row
        lo, hi = self.ssh_ports
        # Ports of forwards count as used too, in case the ranges were moved.
        used = set(s.scalars(select(User.ssh_port).where(User.ssh_port.between(lo, hi))))
        used |= set(s.scalars(select(Forward.host_port).where(Forward.host_port.between(lo, hi))))
        port = _lowest_free(range(lo, hi + 1), used)
        if port is None:
            raise Exhausted(f"All {hi - lo + 1} SSH ports ({lo}-{hi}) are taken, so no new "
                            "user can be added; ask an administrator to widen the range.")
        base = self._free_block(s, "No new user can be added")
        row = User(name=name, ssh_port=port, idmap_base=base, created=_now(), idmap_used=False)
        s.add(row)
        s.flush()
        self._audit(s, actor, "user.create", name, {"ssh_port": port, "idmap_base": base})
        log.info("user %s: SSH port %d, id block %d", name, port, base)
        return row

    def _free_block(self, s: Session, refusal: str) -> int:
        """The lowest id block neither a user nor a prebuilt container holds."""
        bases, block = self.idmap_bases, idmap.IDMAP_BLOCK
        used = set(s.scalars(select(User.idmap_base)))
        used |= set(s.scalars(select(PoolMember.idmap_base)))
        base = _lowest_free(bases, used)
        if base is None:
            why = (f"all {len(bases)} blocks of {block} host ids ({bases[0]}-"
                   f"{bases[-1] + block - 1}) are taken" if bases else
                   "root's /etc/subuid grant leaves no room for a block of host ids")
            raise Exhausted(f"{refusal}: {why}; ask an administrator to grant root more ids.")
        return base

    def ensure_user(self, name: str, *, actor: str = "system") -> UserRecord:
        """The user's record, allocating their SSH port and id block the first
        time (the lowest free ones)."""
        name, actor = _check_name(name), _check_name(actor, "actor")
        existing = self.get_user(name)
        if existing is not None:
            return existing
        return self._write(lambda s: _user_record(self._ensure_user(s, name, actor)))

    def get_user(self, name: str) -> UserRecord | None:
        name = _check_name(name)

        def txn(s: Session) -> UserRecord | None:
            row = s.get(User, name)
            return None if row is None else _user_record(row)
        return self._read(txn)

    def user(self, name: str) -> UserRecord:
        """The user's record; NotFound if they have none yet."""
        rec = self.get_user(name)
        if rec is None:
            raise NotFound(f"There is no lxcgpu user {name!r}.")
        return rec

    def list_users(self) -> list[UserRecord]:
        return self._read(lambda s: [_user_record(r) for r in
                                     s.scalars(select(User).order_by(User.name))])

    def mark_idmap_used(self, name: str) -> None:
        """A container with the user's id block is about to be made: from now
        on the block stays theirs (no prebuilt container's may replace it)."""
        name = _check_name(name)

        def txn(s: Session) -> None:
            row = s.get(User, name)
            if row is None:
                raise NotFound(f"There is no lxcgpu user {name!r}.")
            row.idmap_used = True
        if not self.user(name).idmap_used:
            self._write(txn)

    # -- prebuilt containers (lxcspawner.pool)

    def reserve_pool_block(self, server: str, instance: str, *, actor: str,
                           image: str | None = None) -> int:
        """A free id block for a prebuilt container about to be made on ``server``."""
        server, actor = _check_server(server), _check_name(actor, "actor")
        if not naming.is_valid_lxd_name(instance):
            raise InvalidInput(f"{instance!r} is not an instance name.")

        def txn(s: Session) -> int:
            base = self._free_block(s, "No prebuilt container can be made")
            s.add(PoolMember(instance=instance, server=server, idmap_base=base, created=_now(),
                             ready=False, image=image))
            s.flush()
            self._audit(s, actor, "pool.reserve", instance, {"server": server,
                                                             "idmap_base": base})
            return base
        return self._write(txn)

    def pool_ready(self, instance: str) -> bool:
        """The prebuilt container is made and shifted; False if its row is gone."""
        def txn(s: Session) -> bool:
            row = s.get(PoolMember, instance)
            if row is None:
                return False
            row.ready = True
            return True
        return self._write(txn)

    def pool_members(self, server: str | None = None) -> list[PoolRecord]:
        q = select(PoolMember).order_by(PoolMember.created, PoolMember.instance)
        if server is not None:
            q = q.where(PoolMember.server == _check_server(server))
        return self._read(lambda s: [_pool_record(r) for r in s.scalars(q)])

    def release_pool_member(self, instance: str, *, actor: str,
                            claimed: bool = False) -> bool:
        """Forget a prebuilt container (retired, failed, or taken over by its
        user: ``claimed``); its block is free again unless a user took it.
        False if it was not there, or (not ``claimed``) a user is taking it
        over right now: then it is theirs, not to be deleted."""
        actor = _check_name(actor, "actor")

        def txn(s: Session) -> bool:
            row = s.get(PoolMember, instance)
            if row is None or (row.claimed_by is not None and not claimed):
                return False
            s.delete(row)
            self._audit(s, actor, "pool.release", instance,
                        {"server": row.server, "claimed_by": row.claimed_by})
            return True
        return self._write(txn)

    def claim_pool_member(self, user: str, server: str, *,
                          actor: str) -> tuple[str, UserRecord] | None:
        """Give ``user`` the oldest ready prebuilt container of ``server``:
        its id block becomes the user's (their own, never used, is freed);
        (the instance, the user's record now).  None when the user's block
        is on disk already (they had a container before) or none is ready.
        Two users never get the same one (writers serialize)."""
        user, server, actor = (_check_name(user), _check_server(server),
                               _check_name(actor, "actor"))

        def txn(s: Session) -> tuple[str, UserRecord] | None:
            row = self._ensure_user(s, user, actor)
            if row.idmap_used:
                return None
            member = s.scalars(select(PoolMember).where(
                PoolMember.server == server, PoolMember.ready.is_(True),
                PoolMember.claimed_by.is_(None)).order_by(
                PoolMember.created, PoolMember.instance).limit(1)).first()
            if member is None:
                return None
            was = row.idmap_base
            row.idmap_base = member.idmap_base
            row.idmap_used = True
            member.claimed_by, member.claimed_at = user, _now()
            s.flush()
            self._audit(s, actor, "pool.claim", user, {"server": server,
                                                       "instance": member.instance,
                                                       "idmap_base": member.idmap_base,
                                                       "was": was})
            log.info("%s takes over the prebuilt %s on %s (id block %d)", user,
                     member.instance, server, member.idmap_base)
            return member.instance, _user_record(row)
        return self._write(txn)

    def jupyter_port(self, name: str, *, actor: str = "system") -> int:
        """The first of the user's two Jupyter host ports, allocated the first
        time (the lowest free pair): on every GPU server the hub reaches over
        the network, port P leads to their default server's Jupyter and P+1
        to a named server's (see lxcspawner.portmap)."""
        name, actor = _check_name(name), _check_name(actor, "actor")
        existing = self.get_user(name)
        if existing is not None and existing.jupyter_port is not None:
            return existing.jupyter_port

        def txn(s: Session) -> int:
            row = self._ensure_user(s, name, actor)
            if row.jupyter_port is not None:
                return row.jupyter_port
            lo, hi = self.jupyter_ports
            # Ports of the other kinds count as used too, in case the ranges moved.
            used: set[int] = set()
            for column in (User.jupyter_port, User.ssh_port):
                used |= set(s.scalars(select(column).where(column.between(lo - 1, hi))))
            used |= set(s.scalars(select(Forward.host_port).where(
                Forward.host_port.between(lo - 1, hi))))
            port = next((p for p in range(lo, hi, 2) if p not in used and p + 1 not in used
                         and p - 1 not in used), None)
            if port is None:
                pairs = (hi - lo + 1) // 2
                raise Exhausted(f"All {pairs} Jupyter port pairs ({lo}-{hi}) are taken, so "
                                f"{name} cannot get Jupyter on GPU servers elsewhere; ask an "
                                "administrator to widen the range.")
            row.jupyter_port = port
            s.flush()
            self._audit(s, actor, "user.jupyter-port", name, {"jupyter_port": port})
            log.info("user %s: Jupyter ports %d-%d", name, port, port + 1)
            return port
        return self._write(txn)

    # -- keys

    def add_key(self, user: str, public_key: str, *, actor: str) -> KeyRecord:
        """Add one public key; adding a key the user already has returns it."""
        user, actor = _check_name(user), _check_name(actor, "actor")
        line, fingerprint, comment = _parse_key(public_key)

        def txn(s: Session) -> KeyRecord:
            self._ensure_user(s, user, actor)
            row = s.scalar(select(SSHKey).where(SSHKey.user == user,
                                                SSHKey.fingerprint == fingerprint))
            if row is None:
                row = SSHKey(user=user, key=line, fingerprint=fingerprint, comment=comment,
                             created=_now())
                s.add(row)
                s.flush()
                self._audit(s, actor, "key.add", user,
                            {"id": row.id, "fingerprint": fingerprint, "comment": comment})
            return _key_record(row)
        return self._write(txn)

    def list_keys(self, user: str) -> list[KeyRecord]:
        q = select(SSHKey).where(SSHKey.user == _check_name(user)).order_by(SSHKey.id)
        return self._read(lambda s: [_key_record(r) for r in s.scalars(q)])

    def authorized_keys(self, user: str) -> list[str]:
        """The user's key lines, oldest first; none while they are suspended
        (the keys stay in the store)."""
        rec = self.get_user(user)
        if rec is not None and rec.suspended is not None:
            return []
        return [k.key for k in self.list_keys(user)]

    def set_suspended(self, name: str, suspended: bool, *, actor: str,
                      reason: str = "") -> bool:
        """Suspend a user who left the lab's groups (or resume one who is
        back); True if that changed anything.  Nothing of theirs is deleted."""
        name, actor = _check_name(name), _check_name(actor, "actor")

        def txn(s: Session) -> bool:
            row = s.get(User, name)
            if row is None or (row.suspended is not None) == suspended:
                return False
            row.suspended = _now() if suspended else None
            self._audit(s, actor, "user.suspend" if suspended else "user.resume", name,
                        {"reason": reason} if reason else None)
            log.info("user %s %s%s", name, "suspended" if suspended else "resumed",
                     f": {reason}" if reason else "")
            return True
        return self._write(txn)

    def remove_key(self, user: str, fingerprint_or_id: str | int, *, actor: str) -> KeyRecord:
        """Remove one of the user's keys, named by fingerprint or id."""
        user, actor = _check_name(user), _check_name(actor, "actor")
        which = fingerprint_or_id.strip() if isinstance(fingerprint_or_id, str) \
            else fingerprint_or_id
        if isinstance(which, str) and which.isascii() and which.isdigit():
            which = int(which)
        if isinstance(which, int) and not isinstance(which, bool):
            cond = SSHKey.id == which
        elif isinstance(which, str) and which.startswith("SHA256:"):
            cond = SSHKey.fingerprint == which
        else:
            raise InvalidInput(f"Name a key by its fingerprint (SHA256:...) or its id, "
                               f"not {fingerprint_or_id!r}.")

        def txn(s: Session) -> KeyRecord:
            row = s.scalar(select(SSHKey).where(SSHKey.user == user, cond))
            if row is None:
                raise NotFound(f"{user} has no key {fingerprint_or_id}.")
            rec = _key_record(row)
            s.delete(row)
            self._audit(s, actor, "key.remove", user,
                        {"id": rec.id, "fingerprint": rec.fingerprint, "comment": rec.comment})
            return rec
        return self._write(txn)

    # -- container addresses

    def address(self, user: str, server: str) -> str | None:
        """The address assigned to ``user``'s container on ``server``, if any."""
        user, server = _check_name(user), _check_server(server)
        return self._read(lambda s: s.scalar(select(Address.address).where(
            Address.user == user, Address.server == server)))

    def assign_address(self, user: str, server: str, candidates: Iterable[str], *,
                       actor: str) -> str:
        """Assign ``user``'s container on ``server`` the first of ``candidates``
        (the bridge's free addresses, lowest first) that no other user holds
        on that server; an assignment already among ``candidates`` is kept,
        one outside them (the bridge was renumbered) replaced."""
        user, actor, server = _check_name(user), _check_name(actor, "actor"), _check_server(server)
        candidates = list(candidates)

        def txn(s: Session) -> str:
            self._ensure_user(s, user, actor)
            row = s.get(Address, (user, server))
            wanted = set(candidates)
            if row is not None and row.address in wanted:
                return row.address
            used = set(s.scalars(select(Address.address).where(Address.server == server,
                                                               Address.user != user)))
            address = next((a for a in candidates if a not in used), None)
            if address is None:
                raise Exhausted(f"No address is free for a new container on {server}: all "
                                f"{len(candidates)} are taken; ask an administrator to give "
                                "the server's bridge a larger subnet.")
            old = None if row is None else row.address
            if row is None:
                s.add(Address(user=user, server=server, address=address, created=_now()))
            else:
                row.address = address
            s.flush()
            self._audit(s, actor, "address.assign", user,
                        {"server": server, "address": address, "was": old})
            log.info("%s on %s: address %s", user, server, address)
            return address
        return self._write(txn)

    def release_address(self, user: str, server: str, *, actor: str) -> str | None:
        """Free the address of ``user``'s container on ``server`` (the
        container is gone); the address it had, or None."""
        user, actor, server = _check_name(user), _check_name(actor, "actor"), _check_server(server)

        def txn(s: Session) -> str | None:
            row = s.get(Address, (user, server))
            if row is None:
                return None
            s.delete(row)
            self._audit(s, actor, "address.release", user,
                        {"server": server, "address": row.address})
            return row.address
        return self._write(txn)

    def list_addresses(self, server: str | None = None) -> list[tuple[str, str, str]]:
        """``(user, server, address)`` of every assignment (on ``server``)."""
        q = select(Address).order_by(Address.server, Address.user)
        if server is not None:
            q = q.where(Address.server == _check_server(server))
        return self._read(lambda s: [(r.user, r.server, r.address) for r in s.scalars(q)])

    # -- forwards

    def add_forward(self, user: str, server: str, container_port: int | str, *, actor: str,
                    proto: str = "tcp", host_port: int | str | None = None) -> ForwardRecord:
        """Forward a free host port of ``server`` (the lowest, or ``host_port``
        if asked for and free) to the user's ``container_port``; the same
        request again returns the same forward."""
        user, actor = _check_name(user), _check_name(actor, "actor")
        server, proto = _check_server(server), _check_proto(proto)
        container_port = _check_port(container_port, "container port")
        lo, hi = self.forward_ports
        if host_port is not None:
            host_port = _check_port(host_port, "host port")
            if not lo <= host_port <= hi:
                raise InvalidInput(f"The host port must be in the forward range {lo}-{hi}, "
                                   f"not {host_port}.")
        same = select(Forward).where(Forward.user == user, Forward.server == server,
                                     Forward.container_port == container_port,
                                     Forward.proto == proto)

        def txn(s: Session) -> ForwardRecord:
            self._ensure_user(s, user, actor)
            row = s.scalar(same)
            if row is not None:
                if host_port is not None and row.host_port != host_port:
                    raise InvalidInput(f"{user}'s port {container_port} on {server} is already "
                                       f"forwarded from host port {row.host_port}; remove that "
                                       "forward first.")
                return _forward_record(row)
            count = s.scalar(select(func.count()).select_from(Forward).where(
                Forward.user == user, Forward.server == server))
            if count >= self.forward_limit:
                raise LimitReached(f"{user} may have at most {self.forward_limit} port "
                                   f"forwards on {server} and already has {count}; "
                                   "remove one first.")
            used = set(s.scalars(select(Forward.host_port).where(
                Forward.server == server, Forward.host_port.between(lo, hi))))
            # SSH ports are open on every server, in case the ranges were moved.
            used |= set(s.scalars(select(User.ssh_port).where(User.ssh_port.between(lo, hi))))
            if host_port is not None:
                if host_port in used:
                    raise InvalidInput(f"Host port {host_port} on {server} is already in use; "
                                       "leave it out to get a free one.")
                port = host_port
            else:
                port = _lowest_free(range(lo, hi + 1), used)
            if port is None:
                raise Exhausted(f"All {hi - lo + 1} forward ports on {server} ({lo}-{hi}) "
                                "are taken; try another server or ask an administrator.")
            row = Forward(user=user, server=server, host_port=port,
                          container_port=container_port, proto=proto, created=_now())
            s.add(row)
            s.flush()
            self._audit(s, actor, "forward.add", user,
                        {"id": row.id, "server": server, "host_port": port,
                         "container_port": container_port, "proto": proto})
            return _forward_record(row)
        return self._write(txn)

    def list_forwards(self, user: str | None = None,
                      server: str | None = None) -> list[ForwardRecord]:
        q = select(Forward).order_by(Forward.server, Forward.host_port)
        if user is not None:
            q = q.where(Forward.user == _check_name(user))
        if server is not None:
            q = q.where(Forward.server == _check_server(server))
        return self._read(lambda s: [_forward_record(r) for r in s.scalars(q)])

    def remove_forward(self, user: str, server: str, *, container_port: int | str | None = None,
                       host_port: int | str | None = None, actor: str,
                       proto: str = "tcp") -> ForwardRecord:
        """Remove one of the user's forwards on ``server``, named by exactly
        one of its container port (with ``proto``) and its host port."""
        user, actor, server = _check_name(user), _check_name(actor, "actor"), _check_server(server)
        if (container_port is None) == (host_port is None):
            raise InvalidInput("Name the forward by its container port or by its host port.")
        if container_port is not None:
            port = _check_port(container_port, "container port")
            cond = (Forward.container_port == port) & (Forward.proto == _check_proto(proto))
            what = f"of container port {port}/{proto}"
        else:
            port = _check_port(host_port, "host port")
            cond = Forward.host_port == port
            what = f"on host port {port}"

        def txn(s: Session) -> ForwardRecord:
            row = s.scalar(select(Forward).where(Forward.user == user,
                                                 Forward.server == server, cond))
            if row is None:
                raise NotFound(f"{user} has no forward {what} on {server}.")
            rec = _forward_record(row)
            s.delete(row)
            self._audit(s, actor, "forward.remove", user,
                        {"id": rec.id, "server": server, "host_port": rec.host_port,
                         "container_port": rec.container_port, "proto": rec.proto})
            return rec
        return self._write(txn)

