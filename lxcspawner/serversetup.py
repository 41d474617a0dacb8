"""The GPU server's half of ``setup/gpu-server`` (after LXD, its pool,
bridge and profile are up): the checks against the site file, LXD on the
network for the hub, and the trust token the hub needs.

    python -m lxcspawner.serversetup site --name gpu18
    python -m lxcspawner.serversetup ids --name gpu18
    python -m lxcspawner.serversetup listen --name gpu18 [--listen ADDR]
    python -m lxcspawner.serversetup token --name gpu18 [--new-token]

Each step is idempotent and says what it did; a problem is one sentence on
stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import sys
from urllib.parse import urlsplit

from . import idmap, trust
from .lxd import LXD, LXDError
from .settings import Settings, SettingsError

PROG = "setup/gpu-server"


class SetupError(RuntimeError):
    pass


def site_server(settings: Settings, name: str):
    """This server's table in the site file; it must reach LXD over HTTPS."""
    try:
        server = settings.gpu_server(name)
    except (SettingsError, ValueError, KeyError) as e:
        raise SetupError(f"{e}. Add a [servers.{name}] table to the site file on the hub "
                         "(docs/admin.md section 6) and copy the same file here "
                         f"(--site FILE).") from None
    if not server.remote:
        raise SetupError(
            f"[servers.{name}] has no lxd = \"https://HOST:8443\": the hub reaches a GPU server "
            "elsewhere over HTTPS. Add it (and client_cert, client_key, server_cert) as "
            "docs/admin.md section 6 shows; the hub's own machine needs no setup/gpu-server.")
    return server


def id_range_problem(settings: Settings, files=("/etc/subuid", "/etc/subgid")) -> str | None:
    """Whether root's grants here hold every id block the site may hand out."""
    first = idmap.IDMAP_USER_FIRST + settings.first_id_block * idmap.IDMAP_BLOCK
    wanted = idmap.block_bases(first, idmap.IDMAP_USER_LAST, None)
    for path in files:
        grant = idmap.subuid_range("root", path)
        have = idmap.block_bases(first, idmap.IDMAP_USER_LAST, grant) if grant else range(0)
        if len(have) < len(wanted):
            shown = f"{grant[0]}:{grant[1]}" if grant else "nothing"
            return (f"{path} grants root {shown}, which holds {len(have)} of the site's "
                    f"{len(wanted)} user id blocks (host ids {first}.."
                    f"{idmap.IDMAP_USER_LAST + idmap.IDMAP_BLOCK - 1}): users' containers "
                    "would not start here. Let setup/lxdhost.py up size it (docs/admin.md "
                    "section 2.3), then restart LXD.")
    return None


def https_address(server, listen: str | None) -> str:
    """``core.https_address`` for this server: ``--listen`` or every address,
    on the port of the site's ``lxd`` URL."""
    port = urlsplit(server.lxd).port or 8443
    if not listen:
        return f":{port}"
    try:
        ip = ipaddress.ip_address(listen)
    except ValueError:
        raise SetupError(f"--listen {listen!r} is not an IP address of this server") from None
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


async def _listen(lxd: LXD, address: str) -> str:
    current = (await lxd.server_info()).get("config", {}).get("core.https_address", "")
    if current == address:
        return f"LXD listens on {address} already"
    await lxd.set_server_config({"core.https_address": address})
    return f"LXD now listens on {address} (was: {current or 'the local socket only'})"


async def _token(lxd: LXD, new: bool) -> str | None:
    if not new and await trust.hub_trusted(lxd):
        return None
    return await trust.issue_token(lxd)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    ap.add_argument("step", choices=("site", "ids", "listen", "token"))
    ap.add_argument("--name", required=True, help="this server's [servers.<name>]")
    ap.add_argument("--config", metavar="FILE", help="the site file (default: "
                    "$LXCGPU_CONFIG, else /etc/lxcgpu/lxcgpu.toml)")
    ap.add_argument("--listen", metavar="ADDR", help="the address LXD listens on for the "
                    "hub (default: all, on the port of the site's lxd URL)")
    ap.add_argument("--new-token", action="store_true",
                    help="a new token even if the hub is trusted already")
    args = ap.parse_args(argv)
    try:
        settings = Settings.load(args.config)
        server = site_server(settings, args.name)
        if args.step == "site":
            print(f"{PROG}: the site file names this server {server.name}: the hub reaches "
                  f"its LXD at {server.lxd}, users SSH to {server.ssh_host}")
            return 0
        if args.step == "ids":
            problem = id_range_problem(settings)
            if problem:
                raise SetupError(problem)
            print(f"{PROG}: root's sub-ids here hold every user id block of the site")
            return 0
        lxd = LXD(timeout=30, retries=1)
        try:
            if args.step == "listen":
                print(f"{PROG}: " + asyncio.run(_listen(lxd, https_address(server, args.listen))))
                return 0
            token = asyncio.run(_token(lxd, args.new_token))
        finally:
            lxd.close()
        if token is None:
            print(f"{PROG}: the hub's certificate ({trust.HUB_CLIENT_NAME}) is trusted here "
                  "already (--new-token makes a token anyway)")
        else:
            print(f"{PROG}: the hub is not trusted here yet. On the hub, as root, run\n\n"
                  f"    lxcgpu-admin server trust {server.name}\n\n"
                  "(.venv/bin/lxcgpu-admin in the hub's checkout) "
                  "and paste this one-time token when it asks (it is a secret until used; "
                  "running this again cancels it and makes a new one):\n\n"
                  f"{token}\n")
        return 0
    except (SetupError, SettingsError, LXDError, ValueError, OSError) as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
