#!/usr/bin/env python3
"""Bring up LXD on this machine for lxcgpu, without systemd.

Standard library only: it runs before the project's virtualenv exists.

    python3 setup/lxdhost.py up        # size sub-ids, start LXD, apply the preseed
    python3 setup/lxdhost.py status
    python3 setup/lxdhost.py stop      # `lxd shutdown`: stops containers cleanly

Every step is idempotent: what exists already is left as it is.

The pieces, all named here and nowhere else in setup/:
- a btrfs storage pool on a loop file (``lxcgpu``),
- a managed bridge on an IPv4 /24 that clashes with no route of this host
  (``lxcgpubr0``),
- a profile (``lxcgpu``) with eth0 on that bridge and the root disk on the pool.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

# lxcspawner.network is stdlib-only: the one rule for the bridge's DHCP range.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lxcspawner.network import dynamic_range  # noqa: E402

POOL = os.environ.get("LXCGPU_POOL", "lxcgpu")
POOL_SIZE = os.environ.get("LXCGPU_POOL_SIZE", "30GiB")
BRIDGE = os.environ.get("LXCGPU_BRIDGE", "lxcgpubr0")
PROFILE = os.environ.get("LXCGPU_PROFILE", "lxcgpu")
LOG_DIR = Path(os.environ.get("LXCGPU_LOG_DIR", "/var/log/lxcgpu"))
LXD_SOCKETS = tuple(Path(d) / "unix.socket" for d in (
    os.environ.get("LXD_DIR", "/var/lib/lxd"), "/var/snap/lxd/common/lxd"))

# Candidate bridge subnets, tried in order; the first that overlaps no route
# and no address of this host wins.  LXCGPU_BRIDGE_SUBNET overrides them.
SUBNET_CANDIDATES = (
    "10.213.87.1/24",
    "10.231.40.1/24",
    "172.29.83.1/24",
    "192.168.213.1/24",
    "10.97.61.1/24",
)

# Sub-ids for root (and Debian's _lxd user, which LXD also reads): one block of
# 65536 host ids per user and a reserve for LXD's own allocations.  1e9 ids hold
# ~15,000 users; lxcspawner pins user blocks from IDMAP_USER_FIRST upwards.
SUBID_START = 100000
SUBID_COUNT = 1_000_000_000
SUBID_OWNERS = ("root", "_lxd")


class SetupError(RuntimeError):
    """A step failed; the message says what to do."""


def run(argv: list[str], *, input: str | None = None, check: bool = True,
        timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, input=input, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise SetupError(f"{' '.join(argv)} failed ({proc.returncode}): "
                         f"{(proc.stderr or proc.stdout).strip()}")
    return proc


# ---------------------------------------------------------------- sub-ids

def subid_lines(text: str, owners=SUBID_OWNERS, start=SUBID_START,
                count=SUBID_COUNT) -> tuple[str, bool]:
    """Return /etc/subuid-style text where each owner's range covers
    [start, start+count), and whether anything changed.

    Ranges of other users are kept; an owner's existing ranges are replaced by
    the one wide range (a narrower one would leave users without ids)."""
    wanted = {o: f"{o}:{start}:{count}" for o in owners}
    out, seen, changed = [], set(), False
    for line in text.splitlines():
        name = line.split(":", 1)[0]
        if name in wanted:
            if name in seen:
                changed = True
                continue
            seen.add(name)
            if line.strip() != wanted[name]:
                changed = True
            out.append(wanted[name])
        elif line.strip():
            out.append(line)
    for o in owners:
        if o not in seen:
            out.append(wanted[o])
            changed = True
    return "\n".join(out) + "\n", changed


def size_subids() -> bool:
    """Make root's sub-uid/gid ranges wide enough; True if a file changed."""
    changed_any = False
    for path in (Path("/etc/subuid"), Path("/etc/subgid")):
        text = path.read_text() if path.exists() else ""
        new, changed = subid_lines(text)
        if changed:
            tmp = path.with_suffix(".lxcgpu-tmp")
            tmp.write_text(new)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
            changed_any = True
    return changed_any


# ---------------------------------------------------------------- subnet

# Kernel limits for many containers, from LXD's production setup guide.  The
# defaults (128 inotify instances, 200 keys per user) run out at about eight
# systemd containers: a ninth boots without networkd and never gets an address.
SYSCTLS = {
    "fs.inotify.max_queued_events": 1048576,
    "fs.inotify.max_user_instances": 1048576,
    "fs.inotify.max_user_watches": 1048576,
    "kernel.keys.maxkeys": 2000,
    "kernel.keys.maxbytes": 2000000,
    "vm.max_map_count": 262144,
}
SYSCTL_FILE = Path("/etc/sysctl.d/60-lxcgpu.conf")


def sysctl_raises(current: dict[str, int], wanted=SYSCTLS) -> dict[str, int]:
    """The limits to raise: only those now below what LXD recommends."""
    return {k: v for k, v in wanted.items() if k in current and current[k] < v}


def tune_sysctls(proc=Path("/proc/sys")) -> dict[str, int]:
    """Raise the kernel limits that many containers need, now and at boot."""
    current = {}
    for key in SYSCTLS:
        path = proc / key.replace(".", "/")
        if path.exists():
            current[key] = int(path.read_text().split()[0])
    raised = sysctl_raises(current)
    for key, value in raised.items():
        (proc / key.replace(".", "/")).write_text(f"{value}\n")
    if raised or not SYSCTL_FILE.exists():
        SYSCTL_FILE.parent.mkdir(parents=True, exist_ok=True)
        SYSCTL_FILE.write_text("# lxcgpu: limits for many containers (LXD's production setup)\n"
                               + "".join(f"{k} = {max(v, current.get(k, 0))}\n"
                                         for k, v in SYSCTLS.items()))
    return raised


def host_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network this host routes to or has an address in."""
    nets = []
    routes = json.loads(run(["ip", "-j", "-4", "route", "show", "table", "all"]).stdout or "[]")
    for r in routes:
        dst = r.get("dst")
        if not dst or dst == "default":
            continue
        try:
            nets.append(ipaddress.ip_network(dst, strict=False))
        except ValueError:
            continue
    addrs = json.loads(run(["ip", "-j", "-4", "addr"]).stdout or "[]")
    for link in addrs:
        for a in link.get("addr_info", []):
            nets.append(ipaddress.ip_network(f"{a['local']}/{a['prefixlen']}", strict=False))
    return [n for n in nets if n.version == 4 and not n.is_loopback]


def choose_subnet(taken: list[ipaddress.IPv4Network],
                  candidates=SUBNET_CANDIDATES) -> str:
    """First candidate gateway/prefix whose network overlaps nothing taken."""
    for cand in candidates:
        net = ipaddress.ip_interface(cand).network
        if not any(net.overlaps(t) for t in taken):
            return cand
    raise SetupError("every candidate bridge subnet clashes with a route here; "
                     "set LXCGPU_BRIDGE_SUBNET=a.b.c.1/24 to a free one")


# ---------------------------------------------------------------- daemon

def systemd_unit() -> str | None:
    """LXD's systemd unit where systemd is PID 1 (then LXD is its service,
    not our process); None where there is no systemd."""
    if not Path("/run/systemd/system").is_dir():
        return None
    return "snap.lxd.daemon" if Path("/snap/bin/lxd").exists() else "lxd"


def lxd_running() -> bool:
    if not any(p.exists() for p in LXD_SOCKETS):
        return False
    return run(["lxd", "waitready", "--timeout", "2"], check=False, timeout=10).returncode == 0


def start_lxd() -> None:
    if shutil.which("lxd") is None:
        raise SetupError("lxd is not installed: run setup/quickstart "
                         "(or apt-get install lxd lxd-client)")
    unit = systemd_unit()
    if unit:
        run(["systemctl", "start", unit], timeout=120)
        run(["lxd", "waitready", "--timeout", "90"], timeout=120)
        return
    # Logs are root's: a 0750 folder, 0640 files (older ones fixed).
    LOG_DIR.mkdir(mode=0o750, parents=True, exist_ok=True)
    os.chmod(LOG_DIR, 0o750)
    log = os.fdopen(os.open(LOG_DIR / "lxd.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                            0o640), "ab")
    os.fchmod(log.fileno(), 0o640)
    # Without systemd LXD runs as a plain daemon of ours; it keeps its own
    # containers running across our restarts.
    # lxcgpu uses local images only.  LXD still fetches instance types (and
    # would refresh remote images) over HTTPS; point its proxy at a closed
    # loopback port so it never sends traffic off this machine.
    env = dict(os.environ)
    if os.environ.get("LXCGPU_LXD_OFFLINE", "1") == "1":
        env.update({k: "http://127.0.0.1:9" for k in
                    ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")})
        env.pop("no_proxy", None)
        env.pop("NO_PROXY", None)
    subprocess.Popen(["lxd", "--group", "root", "--logfile", str(LOG_DIR / "lxd-daemon.log")],
                     stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                     start_new_session=True, close_fds=True)
    proc = run(["lxd", "waitready", "--timeout", "90"], check=False, timeout=120)
    if proc.returncode != 0:
        tail = (LOG_DIR / "lxd.log").read_text(errors="replace")[-2000:]
        raise SetupError(f"LXD did not become ready: {proc.stderr.strip()}\n{tail}")


def stop_lxd() -> None:
    if not lxd_running():
        return
    unit = systemd_unit()
    if unit:
        run(["systemctl", "stop", unit, f"{unit}.socket"], check=False, timeout=180)
    run(["lxd", "shutdown", "--timeout", "120"], check=False, timeout=180)


# ---------------------------------------------------------------- preseed

def exists(kind: str, name: str) -> bool:
    return run(["lxc", kind, "show", name], check=False, timeout=30).returncode == 0


def preseed(pool_exists: bool, net_exists: bool, profile_exists: bool,
            subnet: str) -> dict:
    """The parts of an `lxd init` preseed that are still missing."""
    seed: dict = {}
    if not pool_exists:
        seed["storage_pools"] = [{
            "name": POOL, "driver": "btrfs",
            "config": {"size": POOL_SIZE},
            "description": "lxcgpu containers (btrfs on a loop file)",
        }]
    if not net_exists:
        seed["networks"] = [{
            "name": BRIDGE, "type": "bridge",
            "config": {"ipv4.address": subnet, "ipv4.nat": "true",
                       "ipv4.dhcp.ranges": dynamic_range(
                           ipaddress.IPv4Interface(subnet).network),
                       "ipv6.address": "none"},
            "description": "lxcgpu containers",
        }]
    if not profile_exists:
        seed["profiles"] = [{
            "name": PROFILE,
            "description": "lxcgpu user containers",
            "config": {},
            "devices": {
                "eth0": {"type": "nic", "name": "eth0", "network": BRIDGE},
                "root": {"type": "disk", "path": "/", "pool": POOL},
            },
        }]
    return seed


def up() -> dict:
    raised = tune_sysctls()
    if raised:
        print(f"lxdhost: raised {', '.join(f'{k}={v}' for k, v in raised.items())}")
    changed = size_subids()
    if changed and lxd_running():
        print("lxdhost: /etc/subuid and /etc/subgid widened; restarting LXD so it sees them")
        stop_lxd()
    if not lxd_running():
        t = time.monotonic()
        start_lxd()
        print(f"lxdhost: LXD started in {time.monotonic() - t:.1f}s")
    have = (exists("storage", POOL), exists("network", BRIDGE), exists("profile", PROFILE))
    subnet = None
    if not have[1]:
        subnet = os.environ.get("LXCGPU_BRIDGE_SUBNET") or choose_subnet(host_networks())
    # Our images are local; never poll remote image servers.
    if run(["lxc", "config", "get", "images.auto_update_interval"]).stdout.strip() != "0":
        run(["lxc", "config", "set", "images.auto_update_interval", "0"])
    seed = preseed(*have, subnet=subnet or "")
    if seed:
        # JSON is YAML: no YAML library needed before the virtualenv exists.
        run(["lxd", "init", "--preseed"], input=json.dumps(seed), timeout=300)
        print(f"lxdhost: created {', '.join(k for k in seed)}")
    if have[1]:
        ensure_dhcp_range()
    return status()


def ensure_dhcp_range() -> None:
    """Containers' addresses are pinned by lxcgpu (lxcspawner.network) from
    the part of the bridge's subnet LXD does not hand out by DHCP: a bridge
    made before that (whole subnet dynamic) gets the top quarter as its range."""
    get = run(["lxc", "network", "get", BRIDGE, "ipv4.dhcp.ranges"], check=False)
    if get.returncode != 0 or get.stdout.strip():
        return
    cidr = run(["lxc", "network", "get", BRIDGE, "ipv4.address"]).stdout.strip()
    try:
        net = ipaddress.IPv4Interface(cidr).network
    except ValueError:
        raise SetupError(f"the bridge {BRIDGE} has no IPv4 subnet ({cidr or 'none'})") from None
    rng = dynamic_range(net)
    run(["lxc", "network", "set", BRIDGE, "ipv4.dhcp.ranges", rng])
    print(f"lxdhost: {BRIDGE} hands out {rng} by DHCP; the rest of {net} is for "
          "containers' fixed addresses")


def status() -> dict:
    info = {"running": lxd_running(), "pool": POOL, "bridge": BRIDGE, "profile": PROFILE}
    if info["running"]:
        net = run(["lxc", "network", "get", BRIDGE, "ipv4.address"], check=False)
        info["subnet"] = net.stdout.strip() or None
        info["version"] = run(["lxd", "--version"], check=False).stdout.strip()
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=("up", "status", "stop"))
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("lxdhost: run as root", file=sys.stderr)
        return 2
    try:
        if args.command == "up":
            info = up()
        elif args.command == "stop":
            stop_lxd()
            info = status()
        else:
            info = status()
    except SetupError as e:
        print(f"lxdhost: {e}", file=sys.stderr)
        return 1
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
