"""jupyterhub-singleuser inside a container, as a transient systemd unit.

The server runs as the user, started with ``systemd-run`` by the container's
own systemd, so it outlives the exec that started it and the hub, and is
stopped with ``systemctl stop`` without touching anything else the user runs
(training jobs started over SSH live in other units).

Its environment, with the hub API token, goes into a root-only file inside
the container that systemd reads (``EnvironmentFile=``): the token is never
on a command line, on the host or in the container, and never in the
container's ``user.*`` config (which the container can read).
"""

from __future__ import annotations

import asyncio
import re
from typing import Awaitable, Callable, Mapping, Sequence

from . import naming
from .lxd import LXD
from .portmap import JUPYTER_CONTAINER_PORTS

UNIT = "lxcgpu-jupyter"
# The hub's CA, where the container's system trust store takes it in (on a
# GPU server elsewhere, Jupyter reaches the hub API over HTTPS).
HUB_CA = "/usr/local/share/ca-certificates/lxcgpu-hub.crt"
CA_MAX = 64 * 1024
ENV_DIR = "/run/lxcgpu"
# How long a container's systemd may take to listen after its start.
BUS_WAIT = 30
PATH = "/opt/jupyter/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def unit_name(server_name: str) -> str:
    """The unit of a JupyterHub server: one for the default server, one per
    named server (named after its GPU server, a lower-case DNS label)."""
    if not server_name:
        return UNIT
    return f"{UNIT}-{naming.check_server_name(server_name)}"


def container_port(server_name: str) -> int:
    """The port Jupyter listens on in the container: the default server's,
    or a named server's (both may run in one container)."""
    return JUPYTER_CONTAINER_PORTS[1 if server_name else 0]


def env_file(env: Mapping[str, str]) -> str:
    """A systemd EnvironmentFile: ``KEY="value"`` lines, quoted and escaped
    (systemd expands nothing in these files)."""
    lines = []
    for key, value in sorted({"PATH": PATH, **env}.items()):
        value = str(value)
        if not _KEY.match(key):
            raise ValueError(f"not an environment variable name: {key!r}")
        if "\n" in value or "\r" in value or "\0" in value:
            raise ValueError(f"environment variable {key} holds a line break or NUL")
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        lines.append(f'{key}="{escaped}"')
    return "\n".join(lines) + "\n"


async def start(lxd: LXD, name: str, *, unit: str, login: str, argv: Sequence[str],
                env: Mapping[str, str], booted_now: bool = False) -> None:
    """(Re)start ``argv`` as ``login`` in the unit, with ``env``.
    ``booted_now``: the container was started just now, so no unit of an
    earlier start can be there."""
    path = f"{ENV_DIR}/{unit}.env"

    async def write_env():
        await lxd.put_file(name, path, env_file(env), mode=0o600, dir_mode=0o700)

    if booted_now:
        await write_env()
    else:
        # A unit left from an earlier start (the hub lost track of it); a
        # failed one is gone already (--collect).  The file is read when
        # the new unit starts, so it is written meanwhile.
        await asyncio.gather(write_env(),
                             lxd.execute(name, ["systemctl", "stop", unit], timeout=60))
    cmd = ["systemd-run", f"--unit={unit}", "--collect", f"--uid={login}", f"--gid={login}",
           "--property=WorkingDirectory=~", f"--property=EnvironmentFile={path}",
           "--property=KillMode=mixed", "--property=TimeoutStopSec=10",
           # Not after basic.target: in a container just started, Jupyter's
           # imports run while systemd boots and the network comes up.
           "--property=DefaultDependencies=no", "--property=Conflicts=shutdown.target",
           "--property=Before=shutdown.target",
           "--description=Jupyter for the hub", "--", *argv]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + BUS_WAIT
    while True:
        res = await lxd.execute(name, cmd, timeout=60)
        # In a container started a moment ago systemd may not listen yet.
        if res.returncode == 0 or "Failed to connect to bus" not in res.stderr \
                or loop.time() > deadline:
            break
        await asyncio.sleep(0.05)
    res.check(cmd[:2])


async def trust_hub_ca(lxd: LXD, name: str, pem: str) -> bool:
    """Make the container's system trust store hold the hub's CA
    (``update-ca-certificates``); True if it had to change."""
    if "-----BEGIN CERTIFICATE-----" not in pem or len(pem) > CA_MAX:
        raise ValueError("the hub's CA file is not a PEM certificate")
    entry = await lxd.file_entry(name, HUB_CA)
    if entry is not None and entry.type == "file" and entry.data == pem.encode():
        return False
    await lxd.make_dir(name, "/usr/local/share/ca-certificates", mode=0o755)
    await lxd.put_file(name, HUB_CA, pem, mode=0o644)
    cmd = ["update-ca-certificates"]
    (await lxd.execute(name, cmd, timeout=60)).check(cmd)
    return True


async def answers(address: str, port: int, *, timeout: float = 3) -> bool:
    """Whether something accepts a TCP connection at address:port (the
    address lxcgpu pinned on the container's NIC): how the hub checks a
    server without running anything the container's root could replace."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(address, port), timeout)
    except (OSError, asyncio.TimeoutError):
        return False
    writer.close()
    return True


async def wait_listening(address: str, port: int, *, timeout: float, unit: str,
                         alive: Callable[[], Awaitable[bool]]) -> None:
    """Wait until something accepts connections at address:port (every 20 ms
    for the first seconds, when Jupyter usually comes: a connect is cheap and
    the hub learns of it at once; then less often, up to every 250 ms); fail
    early, with a clear error, if the unit has died."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    deadline = start + timeout
    delay, checked = 0.02, start
    while True:
        if await answers(address, port, timeout=2):
            return
        now = loop.time()
        if now > deadline:
            raise TimeoutError(f"Jupyter did not listen on {address}:{port} in {timeout:.0f} s")
        if now - checked > 2:
            checked = now
            if not await alive():
                raise RuntimeError(f"Jupyter exited while starting; see `journalctl -u "
                                   f"{unit}` in the container")
        await asyncio.sleep(delay)
        if now - start > 3:
            delay = min(delay * 1.3, 0.25)


async def active(lxd: LXD, name: str, unit: str) -> bool:
    """Whether the unit runs (or is starting)."""
    res = await lxd.execute(name, ["systemctl", "is-active", unit], timeout=30)
    return res.stdout.strip() in ("active", "activating", "reloading")


async def stop(lxd: LXD, name: str, unit: str) -> None:
    """Stop the unit (nothing else) and remove its environment file."""
    await lxd.execute(name, ["systemctl", "stop", unit], timeout=60)
    await lxd.execute(name, ["rm", "-f", "--", f"{ENV_DIR}/{unit}.env"], timeout=30)
