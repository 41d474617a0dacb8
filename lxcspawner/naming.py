"""Names: one slug scheme from hub users and GPU servers to LXD and POSIX names.

A name that is already valid and unambiguous is kept as it is (``alice``).
Anything else is slugged to lowercase ASCII and gets a short hash of the
original appended (``Alice`` -> ``alice-3f2a9c1b``), so two different inputs
never meet on one name:

- kept names match ``[a-z][a-z0-9]*(-[a-z0-9]+)*``: no ``--``, no trailing
  hyphen, and never ending in ``-`` plus eight hex digits;
- hashed names always end in ``-`` plus eight hex digits.

The two sets are disjoint, and within the hashed set two names meet only if
their SHA-256 prefixes do.  Instance names join the user and server slugs
with ``--``, which neither slug contains, so the pair can be read back.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

# lxcgpu's own keys in LXD's instance config (owner, SSH port, forwards).
KEY_PREFIX = "user.lxcgpu."
LXD_NAME_MAX = 63
POSIX_NAME_MAX = 32
SERVER_SLUG_MAX = 24
HASH_LEN = 8

_KEEP = re.compile(r"^[a-z][a-z0-9]*(?:-[a-z0-9]+)*$")
_HASHED_TAIL = re.compile(rf"-[0-9a-f]{{{HASH_LEN}}}$")
_VALID_LXD = re.compile(r"^[a-zA-Z](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?$")

# Accounts of the template image and of Debian in general that a hub user must
# never become inside a container (a hub user called "root" gets a slug).
RESERVED_POSIX = frozenset("""
    root daemon bin sys sync games man lp mail news uucp proxy www-data backup
    list irc gnats nobody nogroup sshd messagebus systemd-network
    systemd-resolve systemd-timesync systemd-coredump systemd-journal _apt
    sudo adm admin staff users operator shadow utmp tty disk kmem dialout
    cdrom floppy tape audio video plugdev netdev input kvm render sgx
    lxd lxcgpu jupyter ubuntu debian
""".split())


def _hash(name: str) -> str:
    return hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:HASH_LEN]


def is_kept(name: str, max_length: int = LXD_NAME_MAX) -> bool:
    """True if ``safe_slug`` returns ``name`` unchanged."""
    return (
        0 < len(name) <= max_length
        and _KEEP.fullmatch(name) is not None
        and _HASHED_TAIL.search(name) is None
    )


def safe_slug(name: str, max_length: int = LXD_NAME_MAX) -> str:
    """A name of at most ``max_length`` characters from ``[a-z0-9-]`` that
    starts with a letter, ends with a letter or digit, and is distinct for
    distinct inputs (see the module docstring)."""
    if max_length < HASH_LEN + 3:
        raise ValueError(f"max_length {max_length} leaves no room for a hashed slug")
    if is_kept(name, max_length):
        return name
    ascii_ = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    clean = re.sub(r"[^a-z0-9]+", "-", ascii_.lower()).strip("-")
    if not clean[:1].isalpha():
        clean = f"x-{clean}".rstrip("-")
    clean = clean[: max_length - HASH_LEN - 1].rstrip("-")
    return f"{clean}-{_hash(name)}"


def instance_name(user: str, server: str, prefix: str = "") -> str:
    """The LXD instance name of ``user``'s container on GPU server ``server``.

    ``prefix`` (a kept name such as a test run's tag) is prepended with a
    hyphen; the user and server slugs are joined with ``--``.
    """
    if prefix and not is_kept(prefix, 16):
        raise ValueError(f"invalid instance name prefix {prefix!r}: "
                         "use up to 16 lowercase letters, digits and single hyphens")
    head = f"{prefix}-" if prefix else ""
    server_slug = safe_slug(server, SERVER_SLUG_MAX)
    budget = LXD_NAME_MAX - len(head) - 2 - len(server_slug)
    name = f"{head}{safe_slug(user, budget)}--{server_slug}"
    assert is_valid_lxd_name(name), name
    return name


def posix_name(user: str) -> str:
    """The login name inside the container for hub user ``user``.

    Reserved and system account names are always slugged, so a hub user
    named ``root`` can never become root over SSH."""
    if is_kept(user, POSIX_NAME_MAX) and user not in RESERVED_POSIX \
            and not user.startswith(("systemd-", "lxd")):
        return user
    if is_kept(user, POSIX_NAME_MAX):
        # Force a hashed form, marked "u-", for reserved names that would
        # otherwise be kept.
        base = f"u-{user}"[: POSIX_NAME_MAX - HASH_LEN - 1].rstrip("-")
        return f"{base}-{_hash(user)}"
    return safe_slug(user, POSIX_NAME_MAX)


def hostname(user: str, server: str) -> str:
    """The hostname inside the container: ``<server>-<user>``."""
    return safe_slug(f"{server}-{user}", LXD_NAME_MAX)


_SERVER_NAME = re.compile(r"^[a-z](?:[a-z0-9-]{0,61}[a-z0-9])?$")


def is_server_name(name: object) -> bool:
    """The one rule for a GPU server's name (the site file's
    ``[servers.<name>]``, the named server ``/user/alice/<name>``, the
    store's records, the Jupyter unit): a lower-case hostname label that
    starts with a letter, as LXD's instance names must."""
    return isinstance(name, str) and _SERVER_NAME.fullmatch(name) is not None


def check_server_name(name: object) -> str:
    """``name`` if :func:`is_server_name` holds, else ValueError saying the rule."""
    if not is_server_name(name):
        raise ValueError(f"{name!r} is not a GPU server name: use a lower-case hostname "
                         "label (letters, digits and inner hyphens, starting with a letter, "
                         "at most 63 characters)")
    return name  # type: ignore[return-value]


def is_valid_lxd_name(name: str) -> bool:
    """LXD's rule for instance names (a valid hostname label)."""
    return _VALID_LXD.fullmatch(name) is not None


_POSIX = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")


def is_valid_posix_name(name: str) -> bool:
    return _POSIX.fullmatch(name) is not None


# Snapshot names: what a user may call a snapshot.  LXD forbids "/" and
# allows much else; lxcgpu keeps to letters, digits, ".", "_" and "-" (no
# leading dot, no ".."), so a name is safe in a URL path, a shell and a file
# name without quoting.
SNAPSHOT_NAME_MAX = 63
_SNAPSHOT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def check_snapshot_name(name: object) -> str:
    """``name`` if it is a valid snapshot name, else ValueError saying the rule."""
    if (not isinstance(name, str) or not 0 < len(name) <= SNAPSHOT_NAME_MAX
            or not _SNAPSHOT.fullmatch(name) or ".." in name):
        raise ValueError(f"{name!r} is not a snapshot name: use up to {SNAPSHOT_NAME_MAX} "
                         "letters, digits, '.', '_' and '-', starting with a letter or digit")
    return name
