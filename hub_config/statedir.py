"""The hub's state directory and the secrets kept in it.

Everything the hub writes lives in one root-only directory (``$LXCGPU_HUB_DIR``,
default ``/var/lib/lxcgpu/hub``): its database, cookie secret, pid files and the
proxy's auth token.  Secrets are generated once, into 0600 files, so a restarted
hub and its proxy agree on them; they never appear on a command line.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
import tempfile
from pathlib import Path

DEFAULT_DIR = "/var/lib/lxcgpu/hub"
ENV_VAR = "LXCGPU_HUB_DIR"


def hub_dir(environ=os.environ) -> Path:
    """The state directory (``$LXCGPU_HUB_DIR`` or the default), created 0700."""
    path = Path(environ.get(ENV_VAR) or DEFAULT_DIR).absolute()
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def secret_file(path: Path, nbytes: int = 32) -> str:
    """The secret in ``path``; generated into a new 0600 file if there is none.

    A new secret is written to a temporary file and linked into place, so a
    concurrent reader sees either no file or the whole secret.  A file that
    others can read is refused rather than trusted.
    """
    if not path.exists():
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # 0600
        try:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(nbytes) + "\n")
            with contextlib.suppress(FileExistsError):  # another process was first
                os.link(tmp, path)
        finally:
            os.unlink(tmp)
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise PermissionError(
            f"{path} is readable by others (mode {stat.S_IMODE(mode):o}): run `chmod 600 {path}`"
        )
    value = path.read_text().strip()
    if not value:
        raise ValueError(f"{path} is empty: delete it and restart the hub")
    return value
