#!/usr/bin/env python3
"""lxcgpu's spawns side by side with JupyterHub's DockerSpawner, on this machine.

    .venv/bin/python bench/versus_docker.py [-n 5]
    .venv/bin/python bench/spawn.py --versus-docker [-n 5]

Issue 14's comparison as code.  Run as root with LXD up and the template
image built, as for bench/spawn.py, whose hub, users and measurement it
uses.  What it brings up lives for the run only and is gone at the end, also
on a failure, SIGINT or SIGTERM (a signal during the cleanup waits for it):

- Debian's ``docker.io`` (dockerd, containerd, runc; the docker CLI, which
  Debian 13 ships as ``docker-cli``) and ``zstd``, installed with apt-get
  where missing: the packages stay.  Their own service is never started
  (while apt-get runs, a policy-rc.d refuses every start, unless the machine
  has one already): Docker's defaults would switch on IP forwarding and
  write iptables rules.
- DockerSpawner 14 and its two dependencies (docker, escapism), installed by
  pip (no cache) into a folder of the run that only the DockerSpawner hub
  has on its PYTHONPATH: nothing goes into the project's virtualenv.
- containerd and dockerd started by the bench, every state, socket and pid
  file in a temporary folder, with no change to the host's network (no
  bridge, no iptables rules, no IP forwarding, no masquerading): checked at
  the end against the forwarding sysctls, iptables' legacy and nft rules
  (IPv4 and IPv6) and the interfaces from before the run.
- lxcgpu's template (``lxc image export``), its rootfs imported with ``docker
  import``: nothing is pulled from any registry.
- lxcgpu's hub with its site's node agent, as bench/spawn.py runs them (the
  agent's chains LXCGPUSPAWN-*, removed at the end).
- A second hub: the same shipped config, JupyterHub, proxy and TLS as the
  lxcgpu hub's (bench/spawn.py's), with DockerSpawner instead, containers on
  the host's network, each user's server at a fixed port on 127.0.0.1,
  Jupyter as root in its container (the rootfs has no user of the hub's).

Measured as bench/spawn.py measures, from ``POST /hub/api/users/U/server``
until ``GET /user/U/lab`` answers 200 through the proxy; p50 of N, rounds
alternating between the two systems (which one goes first alternates too):

- a new user's first server: lxcgpu takes over a prebuilt container (the
  hub keeps one, ``[containers] pool = 1``; the bench waits, untimed, for it
  and for its refill after), and, for users whose id blocks are fixed,
  creates the container (its first start shifts the rootfs into the user's
  id map); DockerSpawner creates and starts one;
- the same user again, container stopped: lxcgpu starts it; DockerSpawner
  restarts the container it kept when the server stopped;
- lxcgpu only: the container running, Jupyter stopped, against its floor
  (bench/spawn.py's: the spawner's own unit started without hub or proxy).

Targets (issue 14): first <= 1.0x DockerSpawner's, stopped <= 1.1x its
restart, hot <= 1.1x the floor.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from spawn import (  # noqa: E402
    BLOCK_FIRST, BLOCK_LAST, SERVER, NodeAgent, delete_containers, floor, med, mark, parts,
    prepare_hub, report, reserve_users, spawn_until_lab, spawner_unit, stop_server,
)
from lxcspawner import jupyter, naming  # noqa: E402
from lxcspawner.lxd import LXD, LXDError, local_socket  # noqa: E402
from lxcspawner.settings import Settings  # noqa: E402
from tests.fixtures.hub import VENV_BIN  # noqa: E402

TARGETS = {"first": 1.0, "stopped": 1.1, "hot": 1.1}
# Debian packages of the commands the bench runs (the docker CLI: docker-cli
# where the release has that package, Debian 13; docker.io before).
TOOLS = {"dockerd": "docker.io", "docker": "docker.io", "containerd": "containerd",
         "runc": "runc", "zstd": "zstd"}
DOCKERSPAWNER = ["dockerspawner==14.*", "docker==7.*", "escapism==1.*"]
# Loopback ports for the DockerSpawner users' servers, apart from the ranges
# of the tests and the other benches (the Jupyter range is 20000-21999).
DOCKER_PORTS = range(20900, 21000)
SINGLEUSER = "/opt/jupyter/bin/jupyterhub-singleuser"
POLICY_RC = Path("/usr/sbin/policy-rc.d")
DAEMON_TIMEOUT = 60  # seconds for containerd's socket and dockerd's API
STOP_TIMEOUT = 30  # seconds after SIGTERM before SIGKILL
TERMINATED = False  # a SIGTERM ended the run
# Where the daemons write outside their folders: dockerd < 23 its trust key
# (redirected where it can be), dockerd its plugin folder, the runc shims
# their sockets (containerd hardcodes /run/containerd/s).  What the run
# made here is removed at the end, if empty.
OUTSIDE = [Path("/etc/docker/key.json"), Path("/run/docker/plugins"), Path("/run/docker"),
           Path("/run/containerd/s"), Path("/run/containerd")]
FORWARDING = ["net/ipv4/ip_forward", "net/ipv4/conf/all/forwarding",
              "net/ipv6/conf/all/forwarding", "net/ipv6/conf/default/forwarding",
              "net/ipv4/conf/all/route_localnet", "net/bridge/bridge-nf-call-iptables",
              "net/bridge/bridge-nf-call-ip6tables"]
IPTABLES_SAVE = ["iptables-legacy-save", "iptables-nft-save", "ip6tables-legacy-save",
                 "ip6tables-nft-save"]

CONTAINERD_TOML = """\
# bench/versus_docker.py: a containerd of the bench's own, all under {root}.
version = 2
root = "{root}/containerd/root"
state = "{root}/containerd/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{sock}"
[plugins."io.containerd.internal.v1.opt"]
  path = "{root}/containerd/opt"
"""

SITE_DOCKER = '''\
# bench/versus_docker.py: the same hub with JupyterHub's DockerSpawner
# (installed for the run, on this hub's PYTHONPATH only) instead of lxcgpu's.
from dockerspawner import DockerSpawner
from traitlets import default

_PORTS = {ports!r}


class HostNetworkDockerSpawner(DockerSpawner):
    """DockerSpawner on the host's network, as its documentation says to do
    it: each user's server at a fixed port on loopback."""

    @default("port")
    def _bench_port(self):
        return _PORTS[self.user.name]

    async def get_ip_and_port(self):
        return self.host_ip, self.port


c.JupyterHub.spawner_class = HostNetworkDockerSpawner
c.DockerSpawner.client_kwargs = {{"base_url": "unix://{sock}"}}
c.DockerSpawner.image = {image!r}
c.DockerSpawner.pull_policy = "never"  # the imported image only: nothing from a registry
c.DockerSpawner.network_name = "host"
# No port bindings (docker refuses them on the host's network): the server's
# address is get_ip_and_port's above.
c.DockerSpawner.use_internal_ip = True
c.DockerSpawner.host_ip = "127.0.0.1"
c.DockerSpawner.ip = "127.0.0.1"  # Jupyter listens on loopback only
c.DockerSpawner.cmd = [{singleuser!r}]
c.DockerSpawner.args = ["--allow-root"]  # root in the container: the rootfs has no hub users
c.DockerSpawner.extra_create_kwargs = {{"working_dir": "/root"}}
c.DockerSpawner.remove = False  # a stopped server keeps its container; a spawn restarts it
'''


# ------------------------------------------------------------------ installs

def ensure_packages() -> None:
    """docker.io and zstd from Debian, where a command is missing.  The
    package's dockerd must not start (Docker's defaults switch on IP
    forwarding and add iptables rules): a policy-rc.d refuses every service
    start while apt-get runs, unless the machine has its own."""
    missing = sorted({pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None})
    if not missing:
        return
    if shutil.which("docker") is None and subprocess.run(
            ["apt-cache", "show", "--no-all-versions", "docker-cli"], capture_output=True,
            timeout=60).returncode == 0:
        missing.append("docker-cli")
    print(f"installing {' '.join(missing)} (apt-get)", flush=True)
    ours = not POLICY_RC.exists()
    if ours:
        POLICY_RC.write_text("#!/bin/sh\n# bench/versus_docker.py, while it installs docker.io: "
                             "no service starts.\nexit 101\n")
        POLICY_RC.chmod(0o755)
    try:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
        res = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
        if res.returncode:  # stale package lists: once more after an update
            subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=600)
            res = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
        if res.returncode:
            raise RuntimeError(f"{' '.join(install)} failed:\n{res.stdout[-2000:]}"
                               f"{res.stderr[-2000:]}")
    finally:
        if ours:
            POLICY_RC.unlink(missing_ok=True)
    still = [tool for tool in TOOLS if shutil.which(tool) is None]
    if still:
        raise RuntimeError(f"still missing after installing {' '.join(missing)}: "
                           f"{' '.join(still)}")


def install_dockerspawner(dest: Path) -> None:
    """DockerSpawner and its own dependencies into ``dest`` (pip --target):
    JupyterHub, requests and urllib3 come from the project's virtualenv,
    which stays as it is."""
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
           "--no-cache-dir", "--no-deps", "--target", str(dest), *DOCKERSPAWNER]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if res.returncode:
        raise RuntimeError(f"pip install of {' '.join(DOCKERSPAWNER)} failed:\n"
                           f"{res.stdout[-2000:]}{res.stderr[-2000:]}")


# ------------------------------------------------------------------ the daemons

def _alive(proc: subprocess.Popen | None) -> bool:
    return proc is not None and proc.poll() is None


def _end(proc: subprocess.Popen | None) -> None:
    """SIGTERM, then SIGKILL after STOP_TIMEOUT seconds."""
    if not _alive(proc):
        return
    proc.terminate()
    try:
        proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(STOP_TIMEOUT)


class DockerDaemon:
    """containerd and dockerd of the bench's own: every state, socket and pid
    file under ``root``, containers in cgroups under ``root``'s name; no
    bridge, no iptables rules, no IP forwarding or masquerading."""

    def __init__(self, root: Path):
        self.root = root
        self.sock = root / "docker.sock"
        self.containerd_sock = root / "containerd.sock"
        self.cgroup_parent = root.name
        self.cli = shutil.which("docker", path="/usr/bin:/bin") or shutil.which("docker")
        self.version = ""
        self.containerd: subprocess.Popen | None = None
        self.dockerd: subprocess.Popen | None = None
        self._existed = {path: path.exists() for path in OUTSIDE}

    def _spawn(self, argv: list[str], log: str) -> subprocess.Popen:
        with open(self.root / log, "ab") as out:
            # A session of its own: a Ctrl-C reaches the bench, which stops
            # the daemons in order, not the daemons themselves.
            return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)

    def _wait(self, proc: subprocess.Popen, ready, what: str) -> None:
        deadline = time.monotonic() + DAEMON_TIMEOUT
        while not ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not come up:\n{self.log_tail()}")
            time.sleep(0.1)

    def start(self) -> None:
        toml = self.root / "containerd.toml"
        toml.write_text(CONTAINERD_TOML.format(root=self.root, sock=self.containerd_sock))
        self.containerd = self._spawn(["containerd", "--config", str(toml), "--log-level",
                                        "warn"], "containerd.log")
        self._wait(self.containerd, self.containerd_sock.exists, "containerd")
        version = subprocess.run(["dockerd", "--version"], capture_output=True, text=True,
                                 timeout=30).stdout
        self.version = version.split()[2].rstrip(",") if len(version.split()) > 2 else "?"
        config = {}
        if self.version.split(".")[0].isdigit() and int(self.version.split(".")[0]) < 23:
            # dockerd < 23 writes a trust key, by default to /etc/docker.
            config["deprecated-key-path"] = str(self.root / "key.json")
        (self.root / "daemon.json").write_text(json.dumps(config))
        self.dockerd = self._spawn([
            "dockerd", "--config-file", str(self.root / "daemon.json"), "--log-level", "warn",
            "--host", f"unix://{self.sock}", "--data-root", str(self.root / "data"),
            "--exec-root", str(self.root / "exec"), "--pidfile", str(self.root / "dockerd.pid"),
            "--containerd", str(self.containerd_sock), "--cgroup-parent", self.cgroup_parent,
            # cgroupfs: a plain folder as the parent, also where systemd runs.
            "--exec-opt", "native.cgroupdriver=cgroupfs",
            "--iptables=false", "--ip6tables=false", "--ip-forward=false", "--ip-masq=false",
            "--bridge=none"], "dockerd.log")
        self._wait(self.dockerd, lambda: self.run("version", check=False).returncode == 0,
                   "dockerd")

    def run(self, *args: str, check: bool = True, timeout: float = 120,
            stdin=None) -> subprocess.CompletedProcess:
        """The docker CLI against this daemon."""
        env = {**os.environ, "DOCKER_CONFIG": str(self.root / "cli")}
        env.pop("DOCKER_HOST", None)
        res = subprocess.run([self.cli, "--host", f"unix://{self.sock}", *args], env=env,
                             stdin=stdin, capture_output=True, text=True, timeout=timeout)
        if check and res.returncode:
            raise RuntimeError(f"docker {' '.join(args)}: {res.stderr.strip()}")
        return res

    def log_tail(self, limit: int = 3000) -> str:
        return "\n".join(f"--- {log} ---\n{(self.root / log).read_text(errors='replace')[-limit:]}"
                         for log in ("containerd.log", "dockerd.log")
                         if (self.root / log).exists())

    def stop(self) -> list[str]:
        """Remove the containers, stop both daemons, remove everything they
        made; what could not be removed."""
        if _alive(self.dockerd):
            try:
                ids = self.run("ps", "--all", "--quiet", check=False).stdout.split()
                if ids:
                    self.run("rm", "--force", *ids, check=False)
            except subprocess.TimeoutExpired:
                pass  # a daemon that hangs: its containers' shims are killed below
        _end(self.dockerd)
        _end(self.containerd)
        shims = Path("/run/containerd/s")
        if self._kill_shims() and not self._existed[shims] and shims.is_dir():
            for sock in shims.iterdir():  # killed shims leave their sockets
                if sock.is_socket():
                    sock.unlink()
        left = self._remove_cgroups()
        left += self._unmount()
        shutil.rmtree(self.root, ignore_errors=True)
        if self.root.exists():
            left.append(str(self.root))
        for path in OUTSIDE:  # in order: files and inner folders first
            if not self._existed[path] and path.exists():
                try:
                    path.rmdir() if path.is_dir() else path.unlink()
                except OSError:
                    left.append(str(path))
        return left

    def _kill_shims(self) -> int:
        """Shims of this containerd that outlived it (a container that was
        not removed): they name its socket on their command line; how many."""
        mine, killed = str(self.containerd_sock).encode(), 0
        for pid in (p for p in os.listdir("/proc") if p.isdigit()):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and b"containerd-shim" in argv[0] and mine in argv:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                    killed += 1
                except ProcessLookupError:
                    pass
        return killed

    def _unmount(self) -> list[str]:
        """Unmount what is still mounted under root (dockerd leaves its bind
        mount of the host's network namespace, exec/netns/default), deepest
        first."""
        prefix = f"{self.root}/"
        points = []
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = line.split()[4].encode().decode("unicode_escape")
            if point.startswith(prefix):
                points.append(point)
        left = []
        for point in sorted(points, key=len, reverse=True):
            if subprocess.run(["umount", point], capture_output=True).returncode:
                if subprocess.run(["umount", "--lazy", point], capture_output=True).returncode:
                    left.append(point)
        return left

    def _remove_cgroups(self) -> list[str]:
        """The containers' cgroups under the bench's parent, in each
        hierarchy: what still runs there (a container whose shim was
        killed) is killed, then the folders go, deepest first."""
        base = Path("/sys/fs/cgroup")
        folders = []
        for parent in [base / self.cgroup_parent, *base.glob(f"*/{self.cgroup_parent}")]:
            if parent.is_dir():
                folders += [p for p in parent.rglob("*") if p.is_dir()] + [parent]
        folders.sort(key=lambda p: len(p.parts), reverse=True)
        for folder in folders:
            try:
                pids = (folder / "cgroup.procs").read_text().split()
            except OSError:
                continue
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 10
        left = folders
        while left and time.monotonic() < deadline:
            busy = []
            for folder in left:
                try:
                    folder.rmdir()
                except FileNotFoundError:
                    pass
                except OSError:
                    busy.append(folder)
            if busy:
                time.sleep(0.2)
            left = busy
        return [str(p) for p in left]


def import_template(daemon: DockerDaemon, workdir: Path, alias: str) -> str:
    """lxcgpu's template image as a docker image: ``lxc image export``, then
    the rootfs/ folder's contents streamed into ``docker import``; its tag."""
    export = workdir / "export"
    export.mkdir()
    env = {**os.environ, "LXD_DIR": os.path.dirname(local_socket())}
    res = subprocess.run(["lxc", "image", "export", alias, f"{export}/"], env=env,
                         capture_output=True, text=True, timeout=600)
    files = list(export.iterdir())
    if res.returncode or len(files) != 1:
        raise RuntimeError(f"lxc image export {alias}: {res.stderr.strip() or res.stdout[-500:]}"
                           + ("" if len(files) < 2 else " (a split image: needs a unified one)"))
    tarball = files[0]
    tag = f"lxcgpu-bench/{alias.replace('/', '-')}:{tarball.name[:12]}"
    with open(tarball, "rb") as f:
        zstd = f.read(4) == b"\x28\xb5\x2f\xfd"
    unpack = subprocess.Popen(["zstd", "-dc", "--", str(tarball)], stdout=subprocess.PIPE) \
        if zstd else None
    env = {**os.environ, "DOCKER_CONFIG": str(daemon.root / "cli")}
    load = subprocess.Popen([daemon.cli, "--host", f"unix://{daemon.sock}", "import", "-", tag],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    try:
        source = unpack.stdout if unpack else open(tarball, "rb")
        with source, tarfile.open(fileobj=source, mode="r|*") as tin, \
                tarfile.open(fileobj=load.stdin, mode="w|", format=tarfile.PAX_FORMAT) as tout:
            for member in tin:
                if not member.name.startswith("rootfs/"):
                    continue  # metadata.yaml, templates/, the rootfs folder itself
                # A long name lives in the pax header, which would win over
                # the shortened name.
                member.pax_headers = {k: v for k, v in member.pax_headers.items()
                                      if k not in ("path", "linkpath")}
                member.name = member.name.removeprefix("rootfs/")
                if member.islnk():
                    member.linkname = member.linkname.removeprefix("rootfs/")
                tout.addfile(member, tin.extractfile(member) if member.isreg() else None)
    except BrokenPipeError:
        pass  # docker import ended early: its error follows
    except BaseException:
        for proc in (unpack, load):
            if proc is not None:
                proc.kill()
        raise
    err = load.communicate(timeout=600)[1]  # closes its stdin: the end of the tar
    if unpack is not None:
        unpack.wait(60)
    if load.returncode:
        raise RuntimeError(f"docker import: {err.decode(errors='replace').strip()}")
    tarball.unlink()
    return tag


# ------------------------------------------------------------------ host network

def host_network() -> dict:
    """What a dockerd could change in the host's network: the forwarding
    sysctls, iptables' chains and rules that name docker (legacy and nft,
    IPv4 and IPv6), docker's interfaces."""
    state: dict = {}
    for key in FORWARDING:
        path = Path("/proc/sys") / key
        state[key.replace("/", ".")] = path.read_text().strip() if path.exists() else "-"
    for tool in IPTABLES_SAVE:
        if shutil.which(tool):
            out = subprocess.run([tool], capture_output=True, text=True, timeout=60).stdout
            state[tool] = [line for line in out.splitlines() if "docker" in line.lower()]
    state["interfaces"] = sorted(n for n in os.listdir("/sys/class/net")
                                 if n.startswith(("docker", "br-")))
    return state


def compare_network(before: dict, after: dict) -> str:
    changed = [f"{key}: {before.get(key)!r} -> {after.get(key)!r}"
               for key in sorted(set(before) | set(after)) if before.get(key) != after.get(key)]
    if changed:
        return "host network CHANGED:\n    " + "\n    ".join(changed)
    sysctls = ", ".join(f"{k}={v}" for k, v in before.items() if isinstance(v, str) and v != "-")
    tools = [t for t in IPTABLES_SAVE if t in before]
    return (f"host network unchanged: {sysctls}; no docker chains or rules "
            f"({', '.join(tools)}), no docker interfaces")


# ------------------------------------------------------------------ the bench

def free_ports(count: int) -> list[int]:
    """``count`` ports of DOCKER_PORTS that nothing listens on at 127.0.0.1."""
    found = []
    for port in DOCKER_PORTS:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        found.append(port)
        if len(found) == count:
            return found
    raise RuntimeError(f"fewer than {count} free ports in {DOCKER_PORTS}")


def spawn_steps(log: str, users: list[str]) -> dict[str, list[float]]:
    """Each step's seconds in the spawner's "Jupyter in ... (seconds: ...)"
    lines of these users, in the order they come."""
    out: dict[str, list[float]] = {}
    for line in log.splitlines():
        user = line.split("] ", 1)[-1].split(":", 1)[0]
        if user in users and "(seconds: " in line:
            for part in line.rsplit("(seconds: ", 1)[1].rstrip(")").split(", "):
                step, _, secs = part.rpartition(" ")
                out.setdefault(step, []).append(float(secs))
    return out


def make_users(hub, users: list[str]) -> None:
    r = hub.api("POST", "/users", json={"usernames": users})
    if r.status_code != 201:
        raise RuntimeError(f"creating users: {r.status_code} {r.text}")


def ratio_line(what: str, ours: list[dict], theirs: list[dict], target: float,
               their_label: str = "") -> None:
    a, b = med([r["total"] for r in ours]), med([r["total"] for r in theirs])
    print(f"{what:<44} {a:7.2f} {b:8.2f}{their_label:<7} {a / b:6.2f}x   "
          f"target <= {target:.1f}x: {mark(a / b <= target)}")


def attempt(what: str, fn, *args):
    """``fn(*args)`` in the cleanup: a failure is told, and the cleanup goes on."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - every other step must still run
        print(f"cleanup: {what} failed: {e!r}", file=sys.stderr)
        return None


async def run_versus_docker(args, lxd: LXD, prefix: str, root: Path) -> None:
    """Issue 14's side-by-side comparison (see the module's docstring):
    ``args.n`` rounds of each kind; lxcgpu's containers are tagged with
    ``prefix`` and deleted at the end (unless ``args.keep``); the hubs' state
    goes in ``root``.

    What starts processes (the daemons, the hubs) runs on the event loop's
    thread, not in a worker: a SIGTERM or SIGINT cancels this task at its
    next await, so the cleanup never races a start that is still going on."""
    n = args.n
    if not 1 <= n <= BLOCK_LAST - BLOCK_FIRST + 1:
        raise ValueError(f"need 1 <= n <= {BLOCK_LAST - BLOCK_FIRST + 1} (the benches' id blocks)")
    loop, task = asyncio.get_running_loop(), asyncio.current_task()
    previous_sigint = signal.getsignal(signal.SIGINT)

    def on_signal(sig: signal.Signals) -> None:
        global TERMINATED
        TERMINATED = sig == signal.SIGTERM
        print(f"{sig.name}: stopping, then cleaning up", file=sys.stderr, flush=True)
        task.cancel()
    # SIGINT too: also where a shell ran the bench in the background with
    # SIGINT ignored, which its hubs' services would inherit (JupyterHub
    # stops them with SIGINT, then waits).
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    users = [f"first{i}" for i in range(n)]
    hubs, daemon, workdir, before, agent = [], None, None, None, None
    t_run = time.perf_counter()
    try:
        ensure_packages()
        before = host_network()
        workdir = Path(tempfile.mkdtemp(prefix="lxcgpu-bench-docker-"))
        t = time.perf_counter()
        install_dockerspawner(workdir / "site")
        t_pip = time.perf_counter() - t
        await asyncio.sleep(0.01)  # where a signal during the setup takes effect
        daemon = DockerDaemon(workdir)
        t = time.perf_counter()
        daemon.start()
        t_daemons = time.perf_counter() - t
        await asyncio.sleep(0.01)
        t = time.perf_counter()
        image = import_template(daemon, workdir, Settings().image)
        t_import = time.perf_counter() - t
        await asyncio.sleep(0.01)
        size = daemon.run("image", "inspect", "--format", "{{.Size}}", image).stdout.strip()
        print(f"\ndocker {daemon.version} (containerd and dockerd of the bench's own in "
              f"{workdir}): DockerSpawner from PyPI {t_pip:.1f} s, daemons up {t_daemons:.1f} s, "
              f"the template imported as {image} ({int(size or 0) / 2**20:.0f} MiB) "
              f"{t_import:.1f} s", flush=True)

        for system in ("lxcgpu", "docker"):
            (root / system).mkdir()
        ours = prepare_hub(root / "lxcgpu", prefix)
        # One prebuilt container kept ready (the shipped default keeps 2):
        # the users of "prebuilt" take it over; those of "first" have their
        # blocks fixed by reserve_users, so theirs are made.
        config = root / "lxcgpu" / "lxcgpu.toml"
        config.write_text(config.read_text().replace("pool = 0", "pool = 1"))
        hubs.append(ours)
        site = SITE_DOCKER.format(ports=dict(zip(users, free_ports(n))), sock=daemon.sock,
                                  image=image, singleuser=SINGLEUSER)
        path = os.pathsep.join(filter(None, [str(workdir / "site"), os.environ.get("PYTHONPATH")]))
        # A prefix of its own: its keyportal would take the lxcgpu hub's
        # prebuilt containers for strays of its own site and delete them.
        theirs = prepare_hub(root / "docker", f"{prefix}d", site_extra=site,
                             env={"PYTHONPATH": path})
        hubs.append(theirs)
        ours.start()
        await asyncio.sleep(0.01)
        agent = NodeAgent(root / "lxcgpu")
        agent.start()
        await asyncio.sleep(0.01)
        theirs.start()
        reserve_users(root / "lxcgpu" / "lxcgpu.toml", users)
        make_users(ours, users + [f"new{i}" for i in range(n)])
        make_users(theirs, users)
        systems = {"lxcgpu": ours, "docker": theirs}
        name = naming.instance_name(users[0], SERVER, prefix)
        t_setup, t = time.perf_counter() - t_run, time.perf_counter()

        def order(i: int) -> tuple[str, str]:
            return ("lxcgpu", "docker") if i % 2 == 0 else ("docker", "lxcgpu")

        pool_store = Settings.load(config).open_store(upgrade=False)

        async def prebuilt_ready(timeout: float = 180) -> None:
            """Until the hub's keeper has a prebuilt container ready (not timed)."""
            deadline = time.monotonic() + timeout
            while not any(m.ready and m.claimed_by is None
                          for m in await asyncio.to_thread(pool_store.pool_members, SERVER)):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no prebuilt container ready in {timeout:.0f} s")
                await asyncio.sleep(0.5)

        async def spawn(system: str, user: str, stop_container: bool = True) -> dict:
            """One measured spawn, then the server stopped, and lxcgpu's
            container too unless told (DockerSpawner's stop stops its own)."""
            row = await asyncio.to_thread(spawn_until_lab, systems[system], user)
            await asyncio.to_thread(stop_server, systems[system], user)
            if system == "lxcgpu" and stop_container:
                await lxd.stop(naming.instance_name(user, SERVER, prefix))
            return row

        first: dict[str, list] = {s: [] for s in systems}
        prebuilt: list[dict] = []
        for i, user in enumerate(users):
            for system in order(i):
                first[system].append(await spawn(system, user))
                if system == "lxcgpu":
                    await prebuilt_ready()
                    prebuilt.append(await spawn(system, f"new{i}"))
                    # The keeper's refill done before the next timed spawn:
                    # making a container would load the machine beside it.
                    await prebuilt_ready()
        stopped: dict[str, list] = {s: [] for s in systems}
        for i in range(n):
            for system in order(i):
                stopped[system].append(await spawn(system, users[0]))

        # Hot: a spawn first (not counted) starts the container and gives the
        # floor the spawner's own command and environment.
        await asyncio.to_thread(spawn_until_lab, ours, users[0])
        argv, env = await spawner_unit(lxd, name, jupyter.UNIT)
        await asyncio.to_thread(stop_server, ours, users[0])
        token = ours.api("POST", f"/users/{users[0]}/tokens",
                         json={"note": "bench floor", "expires_in": 3600}).json()["token"]
        env.update(JUPYTERHUB_API_TOKEN=token, JPY_API_TOKEN=token)
        hot, floor_hot = [], []
        for i in range(n):
            for system in order(i):
                if system == "lxcgpu":
                    hot.append(await spawn("lxcgpu", users[0], stop_container=False))
                else:
                    floor_hot.append(await floor(lxd, name, users[0], naming.posix_name(users[0]),
                                                 argv, env, warm=False))

        print(f"\n## lxcgpu and DockerSpawner side by side: seconds from POST .../server to "
              f"/user/U/lab = 200,\n## p50 of {n}, rounds alternating between the two "
              f"(setup {t_setup:.0f} s, measuring {time.perf_counter() - t:.0f} s)")
        print(f"{'':<44} {'lxcgpu':>7} {'docker':>8}{'':<7} {'ratio':>6}")
        ratio_line("a new user's first server (prebuilt)", prebuilt, first["docker"],
                   TARGETS["first"])
        ratio_line("a new user's first server (made)", first["lxcgpu"], first["docker"],
                   TARGETS["first"])
        ratio_line("container stopped (docker: kept, restarted)", stopped["lxcgpu"],
                   stopped["docker"], TARGETS["stopped"])
        ratio_line("container running, Jupyter stopped", hot, floor_hot, TARGETS["hot"],
                   " floor")
        print("\neach, p50 / p95 / max:")
        report("first prebuilt lxcgpu", prebuilt)
        parts(prebuilt, [("start", "spawner.start()"),
                         ("up", "then until the hub saw Jupyter answer"),
                         ("proxy", "then until /lab answered through the proxy")])
        steps = spawn_steps(ours.log_text(), [f"new{i}" for i in range(n)])
        print("    spawner.start()'s steps, p50: " + ", ".join(
            f"{k} {med(v):.2f}" for k, v in steps.items()))
        for line in ours.log_text().splitlines():
            if "making a container instead" in line:
                print(f"    a takeover failed: {line.split('] ', 1)[-1]}")
        for kind, rows in (("first", first), ("stopped", stopped)):
            for system in systems:
                report(f"{kind} {system}", rows[system])
                if system == "lxcgpu":
                    parts(rows[system], [("start", "spawner.start()"),
                                         ("up", "then until the hub saw Jupyter answer"),
                                         ("proxy", "then until /lab answered through the proxy")])
        report("hot lxcgpu", hot)
        report("floor hot (no hub, no proxy)", floor_hot)
        pool_store.close()
    except Exception:
        for hub in hubs:
            print(f"--- {hub.log_file} (tail) ---\n{hub.log_tail()}", file=sys.stderr)
        if agent is not None:
            print(f"--- the node agent's log (tail) ---\n{agent.said()}", file=sys.stderr)
        if daemon is not None:
            print(daemon.log_tail(), file=sys.stderr)
        raise
    finally:
        # The cleanup runs to its end: a SIGTERM or SIGINT meanwhile is told
        # to wait (SIGKILL would leave the daemons and hubs behind).
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: print("cleaning up, a moment", file=sys.stderr,
                                                       flush=True))
        steps = [time.perf_counter()]
        for hub in hubs:
            attempt(f"stopping {hub}", hub.stop)
            shutil.rmtree(hub.proxy_dir, ignore_errors=True)
        if agent is not None:
            attempt("stopping the node agent", agent.stop)
            print(agent.figure())
        steps.append(time.perf_counter())
        left = (attempt("stopping docker", daemon.stop) if daemon is not None else None) or []
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
        steps.append(time.perf_counter())
        if not getattr(args, "keep", False):
            try:
                print(f"\ndeleted {await delete_containers(lxd, prefix)} lxcgpu containers; "
                      "docker's went with its daemon")
            except LXDError as e:
                print(f"(could not delete the lxcgpu containers of {prefix}: {e})")
        if left:
            print(f"NOT removed: {', '.join(left)}")
        if before is not None and (after := attempt("reading the network", host_network)):
            print(compare_network(before, after))
        steps.append(time.perf_counter())
        print(f"cleaned up in {steps[-1] - steps[0]:.0f} s (hubs {steps[1] - steps[0]:.0f} s, "
              f"docker {steps[2] - steps[1]:.0f} s, lxcgpu's containers "
              f"{steps[3] - steps[2]:.0f} s)")
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        signal.signal(signal.SIGINT, previous_sigint)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=5, help="rounds of each kind (default 5)")
    args = ap.parse_args()
    if not 1 <= args.n <= BLOCK_LAST - BLOCK_FIRST + 1:
        ap.error(f"need 1 <= -n <= {BLOCK_LAST - BLOCK_FIRST + 1}")
    if shutil.which("configurable-http-proxy", path=f"{VENV_BIN}:{os.environ['PATH']}") is None:
        sys.exit("configurable-http-proxy is missing: run setup/install-deps")
    prefix = "b" + secrets.token_hex(3)
    lxd = LXD(timeout=300, retries=1)
    info = await lxd.server_info()
    print(f"# {time.strftime('%Y-%m-%d %H:%M %Z')} on {platform.node()}: {platform.machine()}, "
          f"{os.cpu_count()} cores, kernel {platform.release()}, "
          f"LXD {info['environment']['server_version']}, N={args.n}, containers {prefix}-*, "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    root = Path(tempfile.mkdtemp(prefix="lxcgpu-bench-spawn-"))
    t = time.perf_counter()
    cancelled = False
    try:
        await run_versus_docker(args, lxd, prefix, root)
    except asyncio.CancelledError:  # SIGINT or SIGTERM, after run_versus_docker's cleanup
        cancelled = True
    finally:
        print(f"load average at the end: {os.getloadavg()[0]:.2f}; the run took "
              f"{time.perf_counter() - t:.0f} s", flush=True)
        shutil.rmtree(root, ignore_errors=True)
        lxd.close()
    if cancelled:
        # A spawn's poll may still run in a worker thread until its
        # timeout: do not wait for it.
        print("interrupted; cleaned up", file=sys.stderr, flush=True)
        os._exit(128 + (signal.SIGTERM if TERMINATED else signal.SIGINT))


if __name__ == "__main__":
    asyncio.run(main())
