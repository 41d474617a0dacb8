"""python-iptables walking libxtables 1.8.11's option tables (lxcspawner.xtables_compat).

The tables are laid out in memory exactly as libxtables 1.8.11 lays them out
(``struct xt_option_entry`` with ``base``); python-iptables' own lookup and
final-check code runs on them, as released and as fitted.  The methods run on
a subclass, so the real class (fitted or not on this host) stays as it is.
"""

import ctypes as ct
from types import SimpleNamespace

import pytest

from lxcspawner import dnat, xtables_compat


@pytest.fixture
def xt():
    """``iptc.xtables`` with a subclass holding python-iptables' own methods."""
    real = dnat._import_iptc().xtables
    released = real.xtables.__dict__.get("_lxcgpu_unpatched", {})
    probe = type("Probe", (real.xtables,), dict(released))
    return SimpleNamespace(xtables=probe, xt_option_entry=real.xt_option_entry,
                           _lib_xtables=real._lib_xtables, XTOPT_MAND=real.XTOPT_MAND,
                           XTablesError=real.XTablesError)


def table_1811(xt, names, mandatory=(), base=10):
    """An option table as libxtables 1.8.11 lays it out, NULL-terminated."""
    entry = xtables_compat.entry_with_base(xt.xt_option_entry)
    table = (entry * (len(names) + 1))()
    keep = [table]
    for i, name in enumerate(names):
        keep.append(ct.c_char_p(name.encode()))
        table[i].name = keep[-1].value
        table[i].id = i
        table[i].base = base
        table[i].flags = xt.XTOPT_MAND if name in mandatory else 0
    return ct.cast(table, ct.POINTER(xt.xt_option_entry)), keep


NAMES = ["src-type", "dst-type", "limit-iface-in"]


def test_the_1811_entry_is_larger(xt):
    assert ct.sizeof(xtables_compat.entry_with_base(xt.xt_option_entry)) > ct.sizeof(
        xt.xt_option_entry)


def test_released_python_iptables_misses_later_options(xt):
    """The bug: the second and later options are read at the wrong place.

    With ``base`` 0, as most options have it, the released code reads the
    first entry's base and padding as the second entry's name, finds NULL and
    stops; any other base would be followed as a pointer.
    """
    table, _keep = table_1811(xt, NAMES, base=0)
    assert xt.xtables._option_lookup(None, table, b"src-type") is not None
    assert xt.xtables._option_lookup(None, table, b"dst-type") is None


def test_fitted_lookup_finds_every_option_at_its_real_address(xt):
    assert xtables_compat.apply(xt, base_field=True)
    table, keep = table_1811(xt, NAMES)
    for i, name in enumerate(NAMES):
        found = xt.xtables._option_lookup(None, table, name.encode())
        assert found is not None and found.name == name.encode() and found.id == i
        # What goes back to libxtables is the real entry, base and all.
        assert ct.addressof(found) == ct.addressof(keep[0][i])
    assert xt.xtables._option_lookup(None, table, b"nonexistent") is None


def test_fitted_final_check_sees_a_later_mandatory_option(xt):
    xtables_compat.apply(xt, base_field=True)
    table, _keep = table_1811(xt, ["a", "b", "to-destination"], mandatory={"to-destination"})
    with pytest.raises(xt.XTablesError, match=r"to-destination.? must be specified"):
        xt.xtables._options_fcheck(None, b"DNAT", 0, table)
    xt.xtables._options_fcheck(None, b"DNAT", 1 << 2, table)  # given: no error


def test_apply_is_idempotent_and_follows_the_library(xt):
    assert not xtables_compat.apply(xt, base_field=False)
    assert "_lxcgpu_unpatched" not in xt.xtables.__dict__
    assert xtables_compat.apply(xt, base_field=True)
    lookup = xt.xtables._option_lookup
    assert xtables_compat.apply(xt, base_field=True)
    assert xt.xtables._option_lookup is lookup
    # Unasked, the loaded library's symbols decide.
    other = SimpleNamespace(**{**vars(xt), "xtables": type("Other", (xt.xtables,), {})})
    assert xtables_compat.apply(other) == xtables_compat.has_base_field(xt._lib_xtables)


def test_the_real_class_is_fitted_exactly_where_the_library_needs_it():
    iptc = dnat._import_iptc()
    fitted = "_lxcgpu_unpatched" in iptc.xtables.xtables.__dict__
    assert fitted == xtables_compat.has_base_field(iptc.xtables._lib_xtables)
