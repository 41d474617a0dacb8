"""Provisioning inside a user's container: the login, sudo, SSH keys, hostname.

Everything is written through LXD's file API (LXD resolves paths inside the
container, so no host process follows a path the user controls) or run as an
argv list through LXD's exec API.  Each step reads first and writes only what
differs, so provisioning a container that is already right costs a handful of
file reads and no exec.
"""

from __future__ import annotations

import base64
import binascii
import logging
from dataclasses import dataclass
from typing import Iterable, Sequence

from . import naming
from .lxd import LXD, LXDError

log = logging.getLogger("lxcspawner.provision")

SUDOERS_PATH = "/etc/sudoers.d/lxcgpu"
FIRST_UID = 1000

KEY_TYPES = frozenset({
    "ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521", "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com", "ssh-dss",
})


class ProvisionError(LXDError):
    """The container cannot be provisioned as asked."""


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int
    home: str


def normalize_public_key(line: str) -> str:
    """Validate one OpenSSH public key line and return it as ``type base64 [comment]``.

    Options (``command=...``), several keys in one string, and anything that
    is not a known key type with a well-formed body raise ValueError."""
    if not isinstance(line, str) or "\n" in line.strip() or "\r" in line or "\0" in line:
        raise ValueError("a public key is a single line")
    parts = line.strip().split(None, 2)
    if len(parts) < 2:
        raise ValueError("a public key looks like 'ssh-ed25519 AAAA... comment'")
    kind, body = parts[0], parts[1]
    if kind not in KEY_TYPES:
        raise ValueError(f"unsupported key type {kind[:40]!r} (options before the key "
                         "are not allowed)")
    try:
        blob = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the key's body is not valid base64") from None
    # The blob starts with the key type as an SSH string.
    if len(blob) < 4 + len(kind) or blob[4:4 + len(kind)].decode("latin-1") != kind:
        raise ValueError("the key's body does not match its type")
    comment = parts[2].strip() if len(parts) == 3 else ""
    if any(ord(c) < 32 for c in comment):
        raise ValueError("the key's comment contains control characters")
    return f"{kind} {body}" + (f" {comment}" if comment else "")


def authorized_keys_text(keys: Iterable[str]) -> str:
    lines = []
    for k in keys:
        n = normalize_public_key(k)
        if n not in lines:
            lines.append(n)
    return "".join(f"{line}\n" for line in lines)


def parse_passwd(text: str) -> dict[str, Account]:
    out = {}
    for line in text.splitlines():
        f = line.split(":")
        if len(f) >= 7 and f[2].isdigit() and f[3].isdigit():
            out[f[0]] = Account(f[0], int(f[2]), int(f[3]), f[5])
    return out


def hosts_text(current: str, hostname: str) -> str:
    """``/etc/hosts`` with the 127.0.1.1 line naming ``hostname``."""
    lines = [ln for ln in current.splitlines() if not ln.startswith("127.0.1.1")]
    if not any(ln.startswith("127.0.0.1") for ln in lines):
        lines.insert(0, "127.0.0.1\tlocalhost")
    idx = next(i for i, ln in enumerate(lines) if ln.startswith("127.0.0.1")) + 1
    lines.insert(idx, f"127.0.1.1\t{hostname}")
    return "\n".join(lines) + "\n"


async def _read(lxd: LXD, name: str, path: str) -> str | None:
    data = await lxd.get_file(name, path)
    return None if data is None else data.decode("utf-8", "replace")


async def ensure_account(lxd: LXD, name: str, login: str) -> tuple[Account, bool]:
    """The login account inside, created if missing; (account, created)."""
    if not naming.is_valid_posix_name(login) or login in naming.RESERVED_POSIX:
        raise ProvisionError(f"refusing to provision login {login!r}")
    accounts = parse_passwd(await _read(lxd, name, "/etc/passwd") or "")
    acct = accounts.get(login)
    if acct is None:
        argv = ["useradd", "--create-home", "--shell", "/bin/bash", "--user-group",
                "--comment", "lxcgpu user", "--", login]
        (await lxd.execute(name, argv)).check(argv)
        accounts = parse_passwd(await _read(lxd, name, "/etc/passwd") or "")
        acct = accounts.get(login)
        if acct is None:
            raise ProvisionError(f"useradd {login} succeeded but the account is missing")
        created = True
    else:
        created = False
    if acct.uid < FIRST_UID:
        raise ProvisionError(f"{login} is a system account (uid {acct.uid}) in {name}")
    return acct, created


async def provision(lxd: LXD, name: str, *, login: str, keys: Sequence[str],
                    hostname: str) -> Account:
    """Make the container ready for ``login``: account, passwordless sudo,
    exactly ``keys`` in ``~/.ssh/authorized_keys``, and ``hostname``.

    Idempotent; invalid keys raise ValueError before anything is written."""
    keys_text = authorized_keys_text(keys)
    if not naming.is_valid_lxd_name(hostname):
        raise ValueError(f"invalid hostname {hostname!r}")

    acct, _ = await ensure_account(lxd, name, login)

    sudoers = f"# managed by lxcgpu\n{login} ALL=(ALL:ALL) NOPASSWD: ALL\n"
    if await _read(lxd, name, SUDOERS_PATH) != sudoers:
        await lxd.put_file(name, SUDOERS_PATH, sudoers, mode=0o440)

    ssh_dir = f"{acct.home}/.ssh"
    ak_path = f"{ssh_dir}/authorized_keys"
    if await _read(lxd, name, ak_path) != keys_text:
        await lxd.make_dir(name, ssh_dir, mode=0o700, uid=acct.uid, gid=acct.gid)
        await lxd.put_file(name, ak_path, keys_text, mode=0o600, uid=acct.uid, gid=acct.gid)

    if (await _read(lxd, name, "/etc/hostname") or "").strip() != hostname:
        await lxd.put_file(name, "/etc/hostname", f"{hostname}\n")
        hosts = await _read(lxd, name, "/etc/hosts") or ""
        await lxd.put_file(name, "/etc/hosts", hosts_text(hosts, hostname))
        argv = ["hostname", "--", hostname]
        (await lxd.execute(name, argv)).check(argv)
    return acct
