"""A GPU server's DNAT rules, in nat-table chains of our own (python-iptables).

``LXCGPU-DNAT`` holds one rule per port map::

    -p tcp --dport 22031 -m comment --comment lxcgpu:alice--gpu17 -j DNAT --to-destination 10.213.87.5:22
    -s 192.0.2.10/32 -p tcp --dport 20040 -m comment --comment lxcgpu:alice--gpu17 -j DNAT --to-destination 10.213.87.5:8888

(the second a Jupyter port, for the hub's address only)

and is jumped to from ``PREROUTING`` (clients elsewhere) and ``OUTPUT``
(clients on the server itself), both for local destinations only.
``LXCGPU-POSTROUTING`` masquerades loopback-sourced connections leaving
through the LXD bridge, which together with the bridge's ``route_localnet``
makes ``ssh -p PORT localhost`` work on the server.

The host guard, in the filter tables (IPv4 and IPv6), keeps containers away
from the host: ``LXCGPU-INPUT`` (jumped to first from ``INPUT``) refuses every
new connection from a bridge except DHCP and DNS to the bridge's address and
the hub API there; ``LXCGPU-FORWARD`` (from ``FORWARD``) refuses what one
container routes through the host to another on the same bridge, unless it
came through a DNAT port map, the way anyone in the lab reaches it (LXD's
port isolation stops the direct path, see lxcspawner.network).

Nothing outside our chains and their jumps is ever changed.

python-iptables writes legacy x_tables (``iptables-legacy -t nat -S``).
Every change is one ``commit`` (one atomic table replace) under the
``/run/xtables.lock`` that the iptables tools take, so it never races with
them.  Building a python-iptables ``Rule`` costs ~0.7 ms in Python, so a
thousand users would take most of a second: rule entries are built once by
python-iptables as a template, then copied with the port, address and comment
patched in (checked against python-iptables at start, which is used instead
if the layout ever differs).
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import fcntl
import functools
import ipaddress
import logging
import os
import re
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from . import xtables_compat
from .network import HUB_API_PORT, Bridge
from .portmap import PortMap

log = logging.getLogger("lxcspawner.dnat")

CHAIN = "LXCGPU-DNAT"
POST_CHAIN = "LXCGPU-POSTROUTING"
INPUT_CHAIN = "LXCGPU-INPUT"
FORWARD_CHAIN = "LXCGPU-FORWARD"
XTABLES_LOCK = "/run/xtables.lock"
COMMENT_PREFIX = "lxcgpu:"
_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
_IPT_ENTRY_SIZE = 112
# struct ipt_ip starts the entry: source address, destination, source mask.
_SRC_AT, _SMSK_AT = 0, 8
_HOST_MASK = b"\xff\xff\xff\xff"


class XtablesUnavailable(RuntimeError):
    """Legacy x_tables cannot be used on this host."""


@dataclass(frozen=True)
class SyncResult:
    added: int = 0
    removed: int = 0
    rebuilt: bool = False

    @property
    def changed(self) -> bool:
        return bool(self.added or self.removed or self.rebuilt)


def _import_iptc():
    """``import iptc``, without setuptools' distutils, fitted to this libxtables.

    python-iptables imports ``distutils.sysconfig`` only to find
    site-packages and falls back to ``sysconfig`` without it; in a virtualenv
    that import pulls in setuptools' copy of distutils, 15 MB of the node
    agent's 55.  Hide distutils for the duration of the import.
    """
    if "iptc" in sys.modules or "distutils" in sys.modules:
        import iptc
    else:
        sys.modules["distutils"] = None  # makes the import raise ModuleNotFoundError
        try:
            import iptc
        finally:
            if sys.modules.get("distutils", 0) is None:
                del sys.modules["distutils"]
    # libxtables 1.8.11+ (Debian 13) lays option tables out differently.
    xtables_compat.apply(iptc.xtables)
    return iptc


def _iptc():
    """Import python-iptables, turning a host without x_tables into one clear error."""
    try:
        iptc = _import_iptc()
        table = iptc.Table(iptc.Table.NAT)
        table.refresh()
        return iptc
    except Exception as e:  # noqa: BLE001 - any failure here means the same thing
        raise XtablesUnavailable(
            "legacy iptables (x_tables) is not usable on this host: "
            f"{type(e).__name__}: {e}. The node agent writes its DNAT rules with "
            "python-iptables, which needs the ip_tables and iptable_nat kernel modules "
            "(`modprobe iptable_nat`), the libip4tc2 and libxtables12 libraries, and root "
            "(CAP_NET_ADMIN). Hosts whose kernel lacks legacy x_tables are not supported "
            "yet (docs/admin.md, 'SSH ports').") from e


def _volatile_regions(raw: bytes) -> list[tuple[int, int]]:
    """Byte ranges of an entry that say nothing about the rule: the fields the
    kernel owns (nfcache, comefrom, counters) and what follows the NUL of each
    match and target name (python-iptables and the kernel leave stray bytes
    there)."""
    regions = [(84, 88), (92, _IPT_ENTRY_SIZE)]
    target_offset, next_offset = struct.unpack_from("=HH", raw, 88)
    at = _IPT_ENTRY_SIZE
    while at < next_offset:
        size = struct.unpack_from("=H", raw, at)[0]
        end = raw[at + 2:at + 31].find(0)
        if end >= 0:
            regions.append((at + 2 + end, at + 31))
        if size <= 0 or at >= target_offset:
            break
        at += size
    return regions


def _clean(raw: bytes, regions: list[tuple[int, int]] | None = None) -> bytes:
    """``raw`` with its volatile regions zeroed: equal rules, equal bytes."""
    buf = bytearray(raw)
    for a, b in regions if regions is not None else _volatile_regions(raw):
        buf[a:b] = bytes(b - a)
    return bytes(buf)


class _EntryCodec:
    """Rule entries for port maps, as bytes, built from one python-iptables template."""

    def __init__(self, iptc):
        self.iptc = iptc
        marker = "lxcgpu-template-0123456789abcdef"
        tpl = self._rule(54321, "10.99.88.77", 12345, marker)
        raw = _clean(bytes(tpl.rule))
        self.regions = _volatile_regions(raw)
        # What key() keeps: everything but the volatile regions, as slices.
        self._keep, at = [], 0
        for a, b in sorted(self.regions):
            self._keep.append((at, a))
            at = b
        self._keep.append((at, len(raw)))
        self._cache: dict[PortMap, tuple[bytes, bytes]] = {}
        self.size = len(raw)
        self.template = raw
        self.mask = bytes(tpl.mask)

        def find_all(needle: bytes) -> list[int]:
            out, i = [], raw.find(needle)
            while i >= 0:
                out.append(i)
                i = raw.find(needle, i + 1)
            return out

        self.dport_at = find_all(struct.pack("=H", 54321))     # tcp match: host order
        self.addr_at = find_all(ipaddress.IPv4Address("10.99.88.77").packed)
        self.port_at = find_all(struct.pack("!H", 12345))       # nat range: network order
        comment_at = find_all(marker.encode())
        self.comment_at = comment_at[0] if len(comment_at) == 1 else -1
        self.comment_len = 256  # XT_MAX_COMMENT_LEN
        self.fast = self._layout_ok()
        if not self.fast:
            log.warning("python-iptables rule layout not recognised; building every "
                        "rule through python-iptables (slower, same rules)")

    def _rule(self, host_port: int, address: str, port: int, comment: str, source: str = ""):
        iptc = self.iptc
        rule = iptc.Rule()
        if source:
            rule.src = f"{source}/32"
        rule.protocol = "tcp"
        match = rule.create_match("tcp")
        match.dport = str(host_port)
        cm = rule.create_match("comment")
        cm.comment = comment
        target = rule.create_target("DNAT")
        target.to_destination = f"{address}:{port}"
        rule.final_check()
        return rule

    def _layout_ok(self) -> bool:
        if not (len(self.dport_at) == 2 and len(self.addr_at) >= 1 and len(self.port_at) == 2
                and self.comment_at > _IPT_ENTRY_SIZE):
            return False
        for sample in (PortMap(22031, "10.213.87.5", 22, "alice--gpu17"),
                       PortMap(1, "192.168.255.254", 65535, "x" * 63),
                       PortMap(20040, "10.213.87.5", 8888, "alice--gpu18", "192.0.2.10")):
            built = _clean(bytes(self._rule(sample.host_port, sample.address, sample.port,
                                            COMMENT_PREFIX + sample.instance,
                                            sample.source).rule))
            if self._patch(sample) != built:
                return False
        return True

    def _patch(self, m: PortMap) -> bytes:
        buf = bytearray(self.template)
        for at in self.dport_at:
            struct.pack_into("=H", buf, at, m.host_port)
        addr = ipaddress.IPv4Address(m.address).packed
        for at in self.addr_at:
            buf[at:at + 4] = addr
        for at in self.port_at:
            struct.pack_into("!H", buf, at, m.port)
        comment = (COMMENT_PREFIX + m.instance).encode()[:self.comment_len - 1]
        buf[self.comment_at:self.comment_at + self.comment_len] = comment.ljust(self.comment_len, b"\0")
        if m.source:
            buf[_SRC_AT:_SRC_AT + 4] = ipaddress.IPv4Address(m.source).packed
            buf[_SMSK_AT:_SMSK_AT + 4] = _HOST_MASK
        return bytes(buf)

    def key(self, raw: bytes) -> bytes:
        """What identifies a rule in an entry (read back from the kernel or ours)."""
        if len(raw) != self.size:
            return raw
        return b"".join([raw[a:b] for a, b in self._keep])

    def encode(self, m: PortMap) -> bytes:
        """The entry for ``m``."""
        return self.encoded(m)[0]

    def encoded(self, m: PortMap) -> tuple[bytes, bytes]:
        """The entry for ``m`` and its key; remembered, as the same maps come
        back at every sync."""
        hit = self._cache.get(m)
        if hit is None:
            if len(self._cache) > 65536:
                self._cache.clear()
            raw = self._encode(m)
            hit = self._cache[m] = (raw, self.key(raw))
        return hit

    def _encode(self, m: PortMap) -> bytes:
        if self.fast:
            return self._patch(m)
        return _clean(bytes(self._rule(m.host_port, m.address, m.port,
                                       COMMENT_PREFIX + m.instance, m.source).rule))

    def decode(self, raw: bytes, rule: Callable[[], Any] | None = None) -> PortMap | None:
        """The port map an entry read back from the kernel holds, or None if
        it is not one of ours (anything else found in our chain is removed).
        ``rule`` makes the python-iptables Rule of that very entry, read in
        its table (the slow path, where the fast layout does not apply)."""
        if len(raw) != self.size or not self.fast:
            return self._decode_slow(raw, rule)
        raw = _clean(raw, self.regions)
        try:
            host_port = struct.unpack_from("=H", raw, self.dport_at[0])[0]
            address = str(ipaddress.IPv4Address(raw[self.addr_at[0]:self.addr_at[0] + 4]))
            port = struct.unpack_from("!H", raw, self.port_at[0])[0]
            comment = raw[self.comment_at:self.comment_at + self.comment_len].split(b"\0", 1)[0]
            instance = comment.decode()
            source = (str(ipaddress.IPv4Address(raw[_SRC_AT:_SRC_AT + 4]))
                      if raw[_SMSK_AT:_SMSK_AT + 4] == _HOST_MASK else "")
        except (ValueError, UnicodeDecodeError):
            return None
        if not instance.startswith(COMMENT_PREFIX):
            return None
        m = PortMap(host_port, address, port, instance[len(COMMENT_PREFIX):], source)
        # Compare all but the fields the kernel owns (nfcache, comefrom, counters).
        return m if self.encode(m) == raw else None

    def _decode_slow(self, raw: bytes, make_rule: Callable[[], Any] | None) -> PortMap | None:
        # libiptc reads an entry's target through the table that holds it (it
        # aborts the process on an entry that is not in its table): only the
        # live entry can be decoded, never a copy of its bytes.
        if make_rule is None:
            return None
        try:
            rule = make_rule()
            params = {m.name: m.get_all_parameters() for m in rule.matches}
            dest = rule.target.get_all_parameters()["to-destination"][0]
            address, port = dest.rsplit(":", 1)
            comment = params["comment"]["comment"][0]
            if (rule.protocol != "tcp" or rule.target.name != "DNAT"
                    or not comment.startswith(COMMENT_PREFIX)):
                return None
            src, _, mask = rule.src.partition("/")
            m = PortMap(int(params["tcp"]["dport"][0]), address, int(port),
                        comment[len(COMMENT_PREFIX):],
                        src if mask == "255.255.255.255" else "")
        except Exception:  # noqa: BLE001 - unreadable means "not ours"
            return None
        return m if self.encode(m)[_IPT_ENTRY_SIZE:] == _clean(raw)[_IPT_ENTRY_SIZE:] else None


class DNATTable:
    """Our chains in the host's legacy nat table.

    Blocking (python-iptables and a file lock): call it from one worker
    thread, never from an event loop.
    """

    def __init__(self, *, chain: str = CHAIN, post_chain: str = POST_CHAIN,
                 input_chain: str = INPUT_CHAIN, forward_chain: str = FORWARD_CHAIN,
                 lock_path: str = XTABLES_LOCK,
                 sysctl_root: str = "/proc/sys/net/ipv4/conf"):
        self.iptc = _iptc()
        self.chain = chain
        self.post_chain = post_chain
        self.input_chain = input_chain
        self.forward_chain = forward_chain
        self.lock_path = lock_path
        self.sysctl_root = Path(sysctl_root)
        self.codec = _EntryCodec(self.iptc)
        self._tables = {}
        for name in (self.iptc.Table.NAT, self.iptc.Table.FILTER):
            self._tables[name] = self.iptc.Table(name)
            self._tables[name].autocommit = False
        self._tables["filter6"] = self.iptc.Table6(self.iptc.Table6.FILTER)
        self._tables["filter6"].autocommit = False

    # ------------------------------------------------------------ plumbing

    @contextlib.contextmanager
    def _transaction(self, which: str = "nat") -> Iterator:
        """Lock, read the table, yield it, commit once (if anything changed)."""
        fd = os.open(self.lock_path, os.O_RDONLY | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            table = self._tables[which]
            table.refresh()
            self._dirty = False
            yield table
            if self._dirty:
                table.commit()
        finally:
            os.close(fd)

    def _entries(self, table, chain: str) -> list[bytes]:
        return [raw for raw, _ in self._live_entries(table, chain)]

    def _live_entries(self, table, chain: str) -> list[tuple[bytes, Any]]:
        """Each entry of ``chain`` as bytes, with the entry itself (valid until
        the table changes)."""
        out = []
        entry = table.first_rule(chain)
        while entry:
            out.append((ct.string_at(ct.addressof(entry), entry.next_offset), entry))
            entry = table.next_rule(entry)
        return out

    def _append(self, table, chain: str, raw: bytes) -> None:
        table.append_entry(chain, (ct.c_ubyte * len(raw)).from_buffer_copy(raw))
        self._dirty = True

    def _ensure_chain(self, table, chain: str) -> None:
        if not table.is_chain(chain):
            table.create_chain(chain)
            self._dirty = True

    def _jump_rule(self, target: str):
        rule = self.iptc.Rule()
        match = rule.create_match("addrtype")
        match.dst_type = "LOCAL"
        rule.create_target(target)
        return rule

    def _masquerade_rule(self, bridge: str):
        rule = self.iptc.Rule()
        rule.src = "127.0.0.0/8"
        rule.out_interface = bridge
        rule.create_target("MASQUERADE")
        return rule

    def _ensure_jump(self, table, builtin: str, rule) -> None:
        """Our jump in a built-in chain, exactly once (inserted first when missing)."""
        chain = self.iptc.Chain(table, builtin)
        target = rule.target.name
        ours = [r for r in chain.rules if r.target and r.target.name == target]
        if len(ours) == 1 and ours[0] == rule:
            return
        for r in ours:
            chain.delete_rule(r)
        chain.insert_rule(rule)
        self._dirty = True

    # ------------------------------------------------------------ public

    def _rule(self, v6: bool = False, *, src=None, dst=None, proto=None, iface=None,
              oface=None, dport=None, ctstate=None, target="RETURN", reject_with=None):
        rule = self.iptc.Rule6() if v6 else self.iptc.Rule()
        if src:
            rule.src = src
        if dst:
            rule.dst = dst
        if iface:
            rule.in_interface = iface
        if oface:
            rule.out_interface = oface
        if proto:
            rule.protocol = proto
        if dport is not None:
            rule.create_match(proto).dport = str(dport)
        if ctstate:
            rule.create_match("conntrack").ctstate = ctstate
        t = rule.create_target(target)
        if reject_with:
            t.reject_with = reject_with
        return rule

    def _guard_rules(self, bridges: list[Bridge], hub_api_ports: Sequence[int],
                     v6: bool) -> list:
        """LXCGPU-INPUT: from each bridge, only replies, DHCP, DNS and the hub API."""
        R = functools.partial(self._rule, v6)
        out = []
        for b in bridges:
            out.append(R(iface=b.name, ctstate="RELATED,ESTABLISHED"))
            if v6:
                # Neighbour discovery (and errors) keep the link working.
                out.append(R(iface=b.name, proto="58"))  # ICMPv6
            else:
                gw = str(b.gateway.ip)
                for dst in (gw, "255.255.255.255"):
                    out.append(R(iface=b.name, dst=dst, proto="udp", dport=67))
                out.append(R(iface=b.name, dst=gw, proto="udp", dport=53))
                out.append(R(iface=b.name, dst=gw, proto="tcp", dport=53))
                for port in hub_api_ports:
                    out.append(R(iface=b.name, dst=gw, proto="tcp", dport=port))
            out.append(R(iface=b.name, proto="tcp", target="REJECT", reject_with="tcp-reset"))
            out.append(R(iface=b.name, target="REJECT"))
        return out

    def _forward_rules(self, bridges: list[Bridge], v6: bool) -> list:
        """LXCGPU-FORWARD: nothing routed from a container back onto its own
        bridge but what a DNAT port map sent there."""
        R = functools.partial(self._rule, v6)
        out = []
        for b in bridges:
            if not v6:
                out.append(R(iface=b.name, oface=b.name, ctstate="DNAT"))
            out.append(R(iface=b.name, oface=b.name, target="REJECT"))
        return out

    def _ensure_rules(self, table, name: str, want: list) -> None:
        chain = self.iptc.Chain(table, name)
        if chain.rules != want:
            chain.flush()
            for r in want:
                chain.append_rule(r)
            self._dirty = True

    def _ensure_filter(self, which: str, guard: list, forward: list) -> None:
        with self._transaction(which) as table:
            for name, builtin, want in ((self.input_chain, "INPUT", guard),
                                        (self.forward_chain, "FORWARD", forward)):
                self._ensure_chain(table, name)
                jump = self.iptc.Rule6() if which == "filter6" else self.iptc.Rule()
                jump.create_target(name)
                self._ensure_jump(table, builtin, jump)
                self._ensure_rules(table, name, want)

    def setup(self, bridges: Iterable[Bridge] = (), *,
              hub_api_ports: Sequence[int] = (HUB_API_PORT,), isolate: bool = True) -> None:
        """Create our chains and jumps, the host guard for ``bridges`` (see
        the module docstring; ``isolate``: LXCGPU-FORWARD keeps containers on
        one bridge apart), and loopback access through them
        (``route_localnet`` on each, and the MASQUERADE that goes with it).

        ``route_localnet`` would also let a container that routes 127.0.0.0/8
        to its gateway reach the server's loopback services (the proxy's API,
        the hub's database, slapd): the guard refuses those connections like
        every other new one.  Replies to the masqueraded loopback connections
        are not new and pass."""
        bridges = sorted({b.name: b for b in bridges}.values(), key=lambda b: b.name)
        for b in bridges:
            if not _IFNAME.match(b.name):
                raise ValueError(f"not an interface name: {b.name!r}")
        hub_api_ports = sorted(set(hub_api_ports))
        if not all(isinstance(p, int) and 1 <= p <= 65535 for p in hub_api_ports):
            raise ValueError(f"not ports: {hub_api_ports!r}")
        names = [b.name for b in bridges]
        with self._transaction() as table:
            self._ensure_chain(table, self.chain)
            self._ensure_chain(table, self.post_chain)
            jump = self._jump_rule(self.chain)
            self._ensure_jump(table, "PREROUTING", jump)
            self._ensure_jump(table, "OUTPUT", jump)
            post = self.iptc.Rule()
            post.create_target(self.post_chain)
            self._ensure_jump(table, "POSTROUTING", post)
            self._ensure_rules(table, self.post_chain, [self._masquerade_rule(b) for b in names])
        for which, v6 in (("filter", False), ("filter6", True)):
            self._ensure_filter(which, self._guard_rules(bridges, hub_api_ports, v6),
                                self._forward_rules(bridges, v6) if isolate else [])
        for b in names:
            self._set_route_localnet(b, True)

    def _set_route_localnet(self, bridge: str, on: bool) -> None:
        path = self.sysctl_root / bridge / "route_localnet"
        want = "1" if on else "0"
        if path.exists() and path.read_text().strip() != want:
            path.write_text(want + "\n")

    def current(self) -> list[PortMap | None]:
        """The maps in our chain, in order (``None`` for an entry not ours)."""
        with self._transaction() as table:
            if not table.is_chain(self.chain):
                return []
            chain = self.iptc.Chain(table, self.chain)
            return [self.codec.decode(raw, lambda e=entry: self.iptc.Rule(entry=e, chain=chain))
                    for raw, entry in self._live_entries(table, self.chain)]

    def sync(self, maps: Iterable[PortMap]) -> SyncResult:
        """Make our chain hold exactly ``maps``, in one commit; nothing when it
        already does.  One rule per host port: a later duplicate is dropped."""
        wanted: dict[int, PortMap] = {}
        for m in sorted(maps):
            wanted.setdefault(m.host_port, m)
        codec = self.codec
        by_key = {codec.encoded(m)[1]: m.host_port for m in wanted.values()}
        with self._transaction() as table:
            self._ensure_chain(table, self.chain)
            raws = self._entries(table, self.chain)
            kept: set[int] = set()
            stale: list[bytes] = []
            for raw in raws:
                port = by_key.get(codec.key(raw))
                if port is None or port in kept:
                    stale.append(raw)
                else:
                    kept.add(port)
            new = [m for p, m in wanted.items() if p not in kept]
            if not stale and not new:
                return SyncResult()
            if any(len(raw) != codec.size for raw in stale) or len(stale) > len(kept) + 16:
                # Something that is not ours, or mostly changed (a start from an
                # empty chain): rewriting the chain is simpler and cheaper.
                table.flush_entries(self.chain)
                self._dirty = True
                for m in wanted.values():
                    self._append(table, self.chain, codec.encode(m))
                return SyncResult(added=len(wanted), removed=len(raws), rebuilt=True)
            mask = (ct.c_ubyte * codec.size).from_buffer_copy(codec.mask)
            for raw in stale:
                table.delete_entry(self.chain, (ct.c_ubyte * len(raw)).from_buffer_copy(raw), mask)
                self._dirty = True
            for m in new:
                self._append(table, self.chain, codec.encode(m))
            return SyncResult(added=len(new), removed=len(stale))

    def guarded_bridges(self) -> list[str]:
        """The bridges our chains name (loopback access, the host guard)."""
        names: set[str] = set()
        with self._transaction() as table:
            if table.is_chain(self.post_chain):
                names |= {r.out_interface for r in self.iptc.Chain(table, self.post_chain).rules}
        with self._transaction("filter") as table:
            if table.is_chain(self.input_chain):
                names |= {r.in_interface for r in self.iptc.Chain(table, self.input_chain).rules}
        return sorted(n for n in names if n and _IFNAME.match(n))

    def teardown(self) -> None:
        """Remove our jumps and chains (``lxcgpu-node --remove-rules``).
        ``route_localnet`` goes back to 0 on our bridges first, so the host's
        loopback is never reachable from them without the guard."""
        for b in self.guarded_bridges():
            self._set_route_localnet(b, False)
        with self._transaction() as table:
            for builtin, target in (("PREROUTING", self.chain), ("OUTPUT", self.chain),
                                    ("POSTROUTING", self.post_chain)):
                self._remove_jumps(table, builtin, target)
            for name in (self.chain, self.post_chain):
                self._remove_chain(table, name)
        for which in ("filter", "filter6"):
            with self._transaction(which) as table:
                for builtin, name in (("INPUT", self.input_chain),
                                      ("FORWARD", self.forward_chain)):
                    self._remove_jumps(table, builtin, name)
                    self._remove_chain(table, name)

    def _remove_jumps(self, table, builtin: str, target: str) -> None:
        chain = self.iptc.Chain(table, builtin)
        for r in chain.rules:
            if r.target and r.target.name == target:
                chain.delete_rule(r)
                self._dirty = True

    def _remove_chain(self, table, name: str) -> None:
        if table.is_chain(name):
            table.flush_entries(name)
            table.delete_chain(name)
            self._dirty = True
