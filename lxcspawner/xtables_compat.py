"""python-iptables on libxtables 1.8.11 and later (Debian 13).

iptables 1.8.11 appended a field (``base``) to ``struct xt_option_entry``
while keeping libxtables' soname (``libxtables.so.12``).  python-iptables 1.2.0
(the latest release; upstream issue ldx/python-iptables#353 is open) keeps a
ctypes copy of the old struct and steps through an extension's option table
with the old size, so every option after the first is read from the wrong
place: ``match.dst_type = "LOCAL"`` fails with "addrtype: no such parameter
dst-type".

Every field python-iptables reads precedes the new one, so reading each entry
at the library's true stride is enough: the two methods that walk an option
table are given the entries at their real addresses.  Pointers handed back to
libxtables (``xt_option_call.entry``) then point at the real entries, whose
``base`` the C code reads itself.
"""

from __future__ import annotations

import ctypes as ct
from collections.abc import Iterator

#: Added to libxtables in the same release as ``xt_option_entry.base``.
MARKER_SYMBOL = "xtables_strtoul_base"


def has_base_field(lib) -> bool:
    """Whether this libxtables' ``xt_option_entry`` has the ``base`` field."""
    return hasattr(lib, MARKER_SYMBOL)


def entry_with_base(entry_type: type[ct.Structure]) -> type[ct.Structure]:
    """``struct xt_option_entry`` as libxtables 1.8.11 lays it out."""

    class EntryWithBase(ct.Structure):
        _fields_ = [*entry_type._fields_, ("base", ct.c_uint)]

    return EntryWithBase


def entries(table, entry_type: type[ct.Structure], stride: int) -> Iterator[ct.Structure]:
    """The entries of a NULL-name-terminated option table, ``stride`` apart."""
    addr = ct.cast(table, ct.c_void_p).value
    if not addr:
        return
    while True:
        entry = entry_type.from_address(addr)
        if not entry.name:
            return
        yield entry
        addr += stride


def apply(xtables_module, *, base_field: bool | None = None) -> bool:
    """Make ``iptc.xtables`` walk option tables at the library's stride.

    ``base_field`` None asks the loaded library.  Returns whether the layout
    needed it; calling it again changes nothing.  The replaced methods stay in
    the class's ``_lxcgpu_unpatched``.
    """
    cls = xtables_module.xtables
    if base_field is None:
        base_field = has_base_field(xtables_module._lib_xtables)
    if not base_field:
        return False
    if "_lxcgpu_unpatched" in cls.__dict__:
        return True
    entry_type = xtables_module.xt_option_entry
    stride = ct.sizeof(entry_with_base(entry_type))
    lookup, fcheck = cls._option_lookup, cls._options_fcheck

    def _option_lookup(self, table, name):
        return lookup(self, list(entries(table, entry_type, stride)), name)

    def _options_fcheck(self, name, xflags, table):
        return fcheck(self, name, xflags, list(entries(table, entry_type, stride)))

    cls._lxcgpu_unpatched = {"_option_lookup": lookup, "_options_fcheck": fcheck}
    cls._option_lookup = _option_lookup
    cls._options_fcheck = _options_fcheck
    return True
