"""Users' host id blocks: the arithmetic, no I/O but reading a subuid file.

Each user gets one block of IDMAP_BLOCK host ids, the same on every GPU
server (``security.idmap.base``), so files keep their owners when a
container moves.  The site's id range (``[store] first_id_block`` up to
IDMAP_USER_LAST) decides which blocks exist; each GPU server's setup
(setup/lxdhost.py) grants root those ids in /etc/subuid and /etc/subgid.
"""

from __future__ import annotations

import re
from pathlib import Path

IDMAP_BLOCK = 65536
# Host ids below this stay free for LXD's own allocations (non-isolated
# containers, isolated ones without a pinned base).  setup/lxdhost.py grants
# root ids 100000 .. 100000 + 1e9; users' blocks are pinned from here upwards.
IDMAP_USER_FIRST = 10_000_000
IDMAP_USER_LAST = 100_000 + 1_000_000_000 - IDMAP_BLOCK


def subuid_range(user: str = "root", path: str = "/etc/subuid") -> tuple[int, int] | None:
    """``(first, count)`` of the largest range ``user`` is granted in ``path``
    (the first of equal ones), or None if the file or a grant is missing."""
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return None
    names = {user, "0"} if user == "root" else {user}
    best = None
    for line in lines:
        m = re.fullmatch(r"\s*([^:#\s]+):([0-9]+):([0-9]+)\s*", line)
        if m and m[1] in names and (best is None or int(m[3]) > best[1]):
            best = (int(m[2]), int(m[3]))
    return best


def block_bases(first: int, last: int, grant: tuple[int, int] | None) -> range:
    """The block bases users may get: aligned on blocks from
    IDMAP_USER_FIRST, inside ``first..last``, and each whole block inside
    ``grant`` (root's subuid range) when one is given.  ValueError if
    ``first..last`` is not such a range."""
    block = IDMAP_BLOCK
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (first, last)) \
            or not IDMAP_USER_FIRST <= first <= last <= IDMAP_USER_LAST \
            or (first - IDMAP_USER_FIRST) % block:
        raise ValueError(
            f"The id map range {first!r}..{last!r} must lie within "
            f"{IDMAP_USER_FIRST}..{IDMAP_USER_LAST} and start on a "
            f"{block}-id block from {IDMAP_USER_FIRST}.")
    lo, hi = first, last
    if grant is not None:
        lo, hi = max(lo, grant[0]), min(hi, grant[0] + grant[1] - block)
    start = first + -(-(lo - first) // block) * block
    return range(start, max(hi + 1, start), block)
