"""The hub's proxy (configurable-http-proxy) as an unprivileged system user.

A hub run as root starts its proxy through ``setpriv``: the proxy gets the
ids of ``lxcgpu-proxy`` (made by ``setup/install-deps``), no supplementary
groups, no capabilities and ``no_new_privs``.  It keeps the environment the
hub gives it (its API token comes that way, never on a command line), the log
file the hub opened, and reads only files that user may read: its own copy of
the HTTPS key (see :func:`hub_config.tls.install_for_proxy`).
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
from pathlib import Path

DEFAULT_USER = "lxcgpu-proxy"
DEFAULT_DIR = "/var/lib/lxcgpu/proxy"


class ProxyUserError(RuntimeError):
    """The proxy cannot run as its user; the message says what to do."""


def proxy_user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        raise ProxyUserError(
            f"the proxy's user {name} does not exist: run setup/install-deps "
            f"(or `useradd --system --user-group --no-create-home --home-dir /nonexistent "
            f"--shell /usr/sbin/nologin {name}`)"
        ) from None


def _allowed(st: os.stat_result, uid: int, gid: int, bits: int) -> bool:
    """Whether ``uid`` (primary group ``gid``, no others) has ``bits`` (r=4, x=1)."""
    if st.st_uid == uid:
        return st.st_mode & (bits << 6) == bits << 6
    if st.st_gid == gid:
        return st.st_mode & (bits << 3) == bits << 3
    return st.st_mode & bits == bits


def unreachable(path: Path, uid: int, gid: int, *, bits: int = 5) -> Path | None:
    """The first directory on the way to ``path`` (links followed) that
    ``uid`` cannot enter, or ``path`` itself if it lacks ``bits``; None if fine."""
    path = Path(path).resolve()
    for parent in reversed(path.parents):
        if not _allowed(parent.stat(), uid, gid, 1):
            return parent
    return None if _allowed(path.stat(), uid, gid, bits) else path


def unprivileged_command(command: list[str], user: str = DEFAULT_USER,
                         needs: tuple[Path, ...] = (), *, low_port: bool = False) -> list[str]:
    """``command`` run as ``user`` through setpriv.  ``needs``: files the
    user must be able to read and run (the proxy's script, Node).
    ``low_port``: it listens below 1024 (e.g. 443), so it keeps that one
    capability, CAP_NET_BIND_SERVICE, and nothing else."""
    pw = proxy_user(user)
    setpriv = shutil.which("setpriv") or shutil.which("setpriv", path="/usr/bin:/bin")
    if setpriv is None:
        raise ProxyUserError("setpriv not found: it comes with util-linux")
    for path in (Path(command[0]), *needs):
        blocked = unreachable(path, pw.pw_uid, pw.pw_gid)
        if blocked is not None:
            mode = stat.filemode(blocked.stat().st_mode)
            raise ProxyUserError(
                f"the proxy runs as {user}, who cannot reach {path}: {blocked} is {mode}. "
                f"Keep lxcgpu where every user may read it (e.g. /opt/lxcgpu), "
                f"or `chmod o+x {blocked}`"
            )
    caps = ["--inh-caps=-all", "--bounding-set=-all"]
    if low_port:
        caps = ["--inh-caps=-all,+net_bind_service", "--ambient-caps=+net_bind_service",
                "--bounding-set=-all,+net_bind_service"]
    return [
        setpriv, f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups",
        "--no-new-privs", *caps, "--", *command,
    ]
