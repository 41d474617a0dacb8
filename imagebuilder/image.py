"""Build the lxcgpu template image and import it into LXD (``lxcgpu-image``).

The image is a minimal Debian (or Ubuntu) system container made with
``debootstrap --variant=minbase``: systemd with networkd and resolved, an SSH
server that accepts keys only and makes its host keys on first boot, and a
Jupyter virtualenv at ``/opt/jupyter`` holding exactly the hub's JupyterHub
version plus JupyterLab. The wheels for that virtualenv are downloaded on the
host (so the host's pip settings apply) and installed offline in the chroot.

Everything that determines the image is hashed into a *recipe*; the imported
image carries it as the ``lxcgpu.recipe`` property, and a run whose recipe
matches the image behind the alias does nothing. See ``docs/image.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

#: Bump whenever the builder changes what it puts into the image, so that
#: existing images no longer match and the next run rebuilds.
FORMAT_VERSION = 1
#: Optional dependencies removed from /opt/jupyter.  rfc3987-syntax (pulled in
#: by jsonschema[format-nongpl] through jupyter_events) compiles a grammar at
#: import: 2 of the 3.4 s jupyterhub-singleuser takes to start on 2 cores.
#: jsonschema treats it as optional (IRI formats then go unchecked).
PIP_REMOVE = ("rfc3987-syntax",)

DEFAULT_ALIAS = "lxcgpu/default"
DEFAULT_WORK_DIR = "/var/cache/lxcgpu/image"
DEFAULT_HOOKS_DIR = "/etc/lxcgpu/image.d"
JUPYTER_VENV = "/opt/jupyter"
IMAGE_INFO = "/etc/lxcgpu/image.json"

#: Files laid into the rootfs (``rootfs/``) and LXD templates (``templates/``).
FILES_DIR = Path(__file__).with_name("image_files")

#: LXD templates: rendered when a container is created or copied, so every
#: container gets its own name.
TEMPLATES = {
    "/etc/hostname": "hostname.tpl",
    "/etc/hosts": "hosts.tpl",
}

#: Installed by debootstrap on every release.
BASE_PACKAGES = (
    "ca-certificates",
    "curl",
    "dbus",
    "iproute2",
    "less",
    "libpam-systemd",
    "netbase",
    "openssh-server",
    "procps",
    "python3",
    "python3-venv",
    "sudo",
    "systemd",
    "systemd-sysv",
    # Without udev, systemd-networkd never configures eth0.
    "udev",
    "vim-tiny",
)

# Seconds; a hook may install something as large as a CUDA toolkit.
TIMEOUTS = {
    "debootstrap": 1800,
    "apt": 1800,
    "pip": 900,
    "hook": 7200,
    "tar": 900,
    "query": 120,
    "lxd": 600,
}

# Clean environment for everything run in the chroot: the host's variables
# (PIP_*, proxies, CA bundle paths) mean nothing there.
CHROOT_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "DEBIAN_FRONTEND": "noninteractive",
}

APT_GET = [
    "apt-get",
    "-y",
    "-q",
    "-o",
    "Dpkg::Options::=--force-confdef",
    "-o",
    "Dpkg::Options::=--force-confold",
]

_PACKAGE_RE = re.compile(r"^[a-z0-9][a-z0-9+.\-]*(:[a-z0-9]+)?(=[A-Za-z0-9.+~:\-]+)?$")


class BuildError(Exception):
    """A build step failed; the message says what to do."""


@dataclass(frozen=True)
class Distro:
    """Where a distribution comes from and what each supported release adds."""

    name: str
    os_name: str
    mirror: str
    security_mirror: str
    #: components in the image's apt sources (debootstrap needs only main)
    components: str
    keyring: str
    keyring_package: str
    default_suite: str
    #: suite -> packages on top of BASE_PACKAGES
    suites: dict[str, tuple[str, ...]]


DISTROS = {
    "debian": Distro(
        name="debian",
        os_name="Debian",
        mirror="http://deb.debian.org/debian",
        security_mirror="http://deb.debian.org/debian-security",
        components="main",
        keyring="/usr/share/keyrings/debian-archive-keyring.gpg",
        keyring_package="debian-archive-keyring",
        default_suite="bookworm",
        # systemd-resolved is its own package since bookworm.
        suites={"bookworm": ("systemd-resolved",)},
    ),
    "ubuntu": Distro(
        name="ubuntu",
        os_name="Ubuntu",
        mirror="http://archive.ubuntu.com/ubuntu",
        security_mirror="http://security.ubuntu.com/ubuntu",
        components="main universe",
        keyring="/usr/share/keyrings/ubuntu-archive-keyring.gpg",
        keyring_package="ubuntu-keyring",
        default_suite="jammy",
        suites={"jammy": (), "noble": ("systemd-resolved",)},
    ),
}


# --------------------------------------------------------------------------
# The recipe: everything that determines the image, hashed.


@dataclass(frozen=True)
class Recipe:
    """The inputs of a build; :meth:`digest` identifies the resulting image."""

    distro: str
    suite: str
    #: the image's apt sources point at them
    mirror: str
    security_mirror: str
    #: installed by debootstrap
    packages: tuple[str, ...]
    #: the site's, installed with apt-get afterwards
    extra_packages: tuple[str, ...]
    jupyterhub: str
    pip: tuple[str, ...]
    #: (path relative to image_files, sha256 of mode and content)
    files: tuple[tuple[str, str], ...]
    #: (hook file name, sha256 of content), in run order
    hooks: tuple[tuple[str, str], ...]
    #: removed from /opt/jupyter after the install (see PIP_REMOVE)
    pip_remove: tuple[str, ...] = ()
    format: int = FORMAT_VERSION

    def digest(self) -> str:
        canonical = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def package_list(distro: Distro, suite: str) -> tuple[str, ...]:
    """The packages debootstrap installs, sorted."""
    return tuple(sorted({*BASE_PACKAGES, *distro.suites[suite]}))


def pip_specs(jupyterhub: str, jupyterlab: str, extra: list[str]) -> tuple[str, ...]:
    """Requirements of the Jupyter virtualenv; the hub's version is pinned."""
    return (f"jupyterhub=={jupyterhub}", jupyterlab, *extra)


def file_digests(root: Path) -> tuple[tuple[str, str], ...]:
    """Digest of every file under ``root`` (mode and content), by relative path."""
    out = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h = hashlib.sha256(b"%o\0" % (path.stat().st_mode & 0o777))
        h.update(path.read_bytes())
        out.append((path.relative_to(root).as_posix(), h.hexdigest()))
    return tuple(out)


def find_hooks(hooks_dir: Path) -> list[Path]:
    """The hook scripts (``*.sh``) in ``hooks_dir``, in name order; none if absent."""
    if not hooks_dir.is_dir():
        return []
    return sorted(p for p in hooks_dir.glob("*.sh") if p.is_file())


def hook_digests(hooks: list[Path]) -> tuple[tuple[str, str], ...]:
    return tuple((p.name, hashlib.sha256(p.read_bytes()).hexdigest()) for p in hooks)


# --------------------------------------------------------------------------
# Pure builders of argv lists and file contents.


def debootstrap_argv(suite: str, rootfs: Path, mirror: str, packages: tuple[str, ...]) -> list[str]:
    return [
        "debootstrap",
        "--variant=minbase",
        "--include=" + ",".join(packages),
        "--components=main",
        suite,
        str(rootfs),
        mirror,
    ]


def manylinux_platforms(glibc: str, machine: str) -> list[str]:
    """The platform tags pip would accept on a system with this glibc.

    ``pip download --platform manylinux_2_36_x86_64`` accepts only that exact
    tag, so every older manylinux tag is listed too, the way pip itself does
    on a real system (down to glibc 2.5 on x86, 2.17 elsewhere).
    """
    major, minor = (int(x) for x in glibc.split(".")[:2])
    if major != 2:
        raise BuildError(f"unexpected glibc version {glibc!r} in the image")
    lowest = 5 if machine in ("x86_64", "i686") else 17
    tags = [f"manylinux_2_{m}_{machine}" for m in range(minor, lowest - 1, -1)]
    legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
    tags += [f"{name}_{machine}" for m, name in legacy.items() if lowest <= m <= minor]
    return tags + ["any"]


#: The image's values for the names of dependency markers (PEP 508), read
#: inside the chroot with the standard library alone (packaging's
#: ``default_environment``).
MARKERS_PROBE = """\
import json, os, platform, sys
v = sys.implementation.version
impl = f"{v.major}.{v.minor}.{v.micro}"
if v.releaselevel != "final":
    impl += v.releaselevel[0] + str(v.serial)
print(json.dumps({
    "python": platform.python_version(),
    "glibc": platform.libc_ver()[1],
    "markers": {
        "implementation_name": sys.implementation.name,
        "implementation_version": impl,
        "os_name": os.name,
        "platform_machine": platform.machine(),
        "platform_release": platform.release(),
        "platform_system": platform.system(),
        "platform_version": platform.version(),
        "python_full_version": platform.python_version(),
        "platform_python_implementation": platform.python_implementation(),
        "python_version": ".".join(platform.python_version_tuple()[:2]),
        "sys_platform": sys.platform,
    },
}))
"""

#: pip with dependency markers evaluated for the image.  ``pip download
#: --python-version 3.11`` picks wheels for 3.11 but still evaluates markers
#: such as ``python_version < "3.12"`` for the Python that runs it: on a
#: Debian 13 host (3.13) it leaves out what the image's 3.11 needs.  Run as
#: ``python -c PIP_FOR_IMAGE MARKERS_JSON download ...``.
PIP_FOR_IMAGE = """\
import json, sys
import pip._vendor.packaging.markers as markers
image = json.loads(sys.argv.pop(1))
markers.default_environment = lambda: dict(image)
from pip._internal.cli.main import main
sys.exit(main())
"""


def pip_download_argv(
    python: str,
    glibc: str,
    machine: str,
    dest: Path,
    specs: tuple[str, ...],
    markers: dict[str, str],
) -> list[str]:
    """``pip download`` on the host for the image's Python, glibc and markers.

    Runs with the host's pip configuration (index, find-links, certificates),
    which pip inside the chroot would not see.
    """
    py = ".".join(python.split(".")[:2])
    argv = [
        sys.executable,
        "-c",
        PIP_FOR_IMAGE,
        json.dumps(markers, sort_keys=True),
        "download",
        "--only-binary=:all:",
        "--python-version",
        py,
        "--implementation",
        "cp",
    ]
    for tag in manylinux_platforms(glibc, machine):
        argv += ["--platform", tag]
    return argv + ["-d", str(dest), "--", *specs]


def pip_install_argv(rootfs: Path, wheels: str, specs: tuple[str, ...]) -> list[str]:
    return [
        "chroot",
        str(rootfs),
        f"{JUPYTER_VENV}/bin/pip",
        "install",
        "--no-index",
        "--find-links",
        wheels,
        "--no-cache-dir",
        "--disable-pip-version-check",
        "--",
        *specs,
    ]


def tar_argv(tarball: Path, build_dir: Path) -> list[str]:
    return [
        "tar",
        "--create",
        "--file",
        str(tarball),
        "--zstd",
        "--numeric-owner",
        "--xattrs",
        "--xattrs-include=*",
        "-C",
        str(build_dir),
        "--",
        "metadata.yaml",
        "templates",
        "rootfs",
    ]


def sources_list(distro: Distro, suite: str, mirror: str, security_mirror: str) -> str:
    """The image's /etc/apt/sources.list: the release, its updates and security."""
    c = distro.components
    lines = [f"deb {mirror} {suite} {c}", f"deb {mirror} {suite}-updates {c}"]
    if security_mirror != "none":
        lines.append(f"deb {security_mirror} {suite}-security {c}")
    return "\n".join(lines) + "\n"


def lxd_architecture(machine: str) -> str:
    """LXD's name for the architecture ``platform.machine()`` reports."""
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def image_properties(
    recipe: Recipe, distro: Distro, versions: dict[str, str], serial: str
) -> dict[str, str]:
    """The LXD image properties; ``versions`` has python, jupyterhub, jupyterlab."""
    return {
        "os": distro.os_name,
        "release": recipe.suite,
        "variant": "lxcgpu",
        "serial": serial,
        "description": (
            f"lxcgpu {distro.os_name} {recipe.suite} (jupyterhub "
            f"{versions['jupyterhub']}, jupyterlab {versions['jupyterlab']}) {serial}"
        ),
        "lxcgpu.recipe": recipe.digest(),
        "lxcgpu.python": versions["python"],
        "lxcgpu.jupyterhub": versions["jupyterhub"],
        "lxcgpu.jupyterlab": versions["jupyterlab"],
    }


def metadata(architecture: str, created: int, properties: dict[str, str]) -> dict:
    """The image's ``metadata.yaml``."""
    return {
        "architecture": architecture,
        "creation_date": created,
        "properties": properties,
        "templates": {
            path: {"when": ["create", "copy"], "template": tpl} for path, tpl in TEMPLATES.items()
        },
    }


# --------------------------------------------------------------------------
# Running things.


@dataclass
class Runner:
    """Runs build commands with their output in a log file, and times steps.

    A failing command raises :class:`BuildError` with the end of the log.
    """

    path: Path
    verbose: bool = False
    timings: dict[str, float] = field(default_factory=dict)

    def run(self, argv: list[str], *, timeout: int, env: dict | None = None) -> None:
        with open(self.path, "a") as log:
            log.write(f"\n$ {subprocess.list2cmdline(argv)}\n")
            log.flush()
            out = None if self.verbose else log
            try:
                proc = subprocess.run(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT if out else None,
                    env=env,
                    timeout=timeout,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                raise BuildError(f"{argv[0]} took longer than {timeout} s") from None
        if proc.returncode != 0:
            raise BuildError(
                f"`{subprocess.list2cmdline(argv[:4])} ...` failed (exit "
                f"{proc.returncode}); end of {self.path}:\n{self.tail()}"
            )

    def tail(self, lines: int = 25) -> str:
        text = self.path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        print(f"==> {name}", flush=True)
        start = time.monotonic()
        yield
        self.timings[name] = time.monotonic() - start
        print(f"    {name}: {self.timings[name]:.1f} s", flush=True)


def chroot_output(rootfs: Path, argv: list[str]) -> str:
    """Run a short command in the chroot; return its standard output."""
    proc = subprocess.run(
        ["chroot", str(rootfs), *argv],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=CHROOT_ENV,
        timeout=TIMEOUTS["query"],
        check=False,
    )
    if proc.returncode != 0:
        raise BuildError(f"{argv[0]} in the image failed: {proc.stderr.strip()}")
    return proc.stdout


# --------------------------------------------------------------------------
# Mounts and the work directory.


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path``, deepest first."""
    root = str(path.resolve())
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4]
            # mountinfo escapes space, tab, newline and backslash as \ooo.
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), point)
            if point == root or point.startswith(root + "/"):
                found.append(point)
    return sorted(found, key=lambda p: p.count("/"), reverse=True)


def unmount_all(path: Path) -> None:
    """Unmount everything below ``path`` (ours, or left by a failed debootstrap)."""
    for point in mounts_under(path):
        if subprocess.run(["umount", "--", point], check=False).returncode != 0:
            subprocess.run(["umount", "--lazy", "--", point], check=False)
    left = mounts_under(path)
    if left:
        raise BuildError(f"could not unmount {', '.join(left)}")


def remove_tree(path: Path) -> None:
    """Delete a build tree, never through a mount (a bound /dev is the host's)."""
    unmount_all(path)
    shutil.rmtree(path)


@contextlib.contextmanager
def chroot_session(rootfs: Path) -> Iterator[None]:
    """Kernel file systems, a working resolv.conf and no service starts.

    Everything is undone in ``finally``, whatever fails.
    """
    resolv = rootfs / "etc/resolv.conf"
    saved = rootfs / "etc/resolv.conf.lxcgpu-saved"
    policy = rootfs / "usr/sbin/policy-rc.d"
    mounts = [
        ["mount", "-t", "proc", "proc", str(rootfs / "proc")],
        ["mount", "-t", "sysfs", "-o", "ro", "sysfs", str(rootfs / "sys")],
        ["mount", "--bind", "/dev", str(rootfs / "dev")],
        ["mount", "--bind", "/dev/pts", str(rootfs / "dev/pts")],
    ]
    try:
        for argv in mounts:
            proc = subprocess.run(argv, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise BuildError(f"{' '.join(argv)}: {proc.stderr.strip()}")
        # The image's resolv.conf is a link into /run, dangling in a chroot.
        if resolv.exists() or resolv.is_symlink():
            os.rename(resolv, saved)
        shutil.copyfile("/etc/resolv.conf", resolv)
        # Maintainer scripts must not start daemons in the chroot.
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
        yield
    finally:
        policy.unlink(missing_ok=True)
        if saved.exists() or saved.is_symlink():
            resolv.unlink(missing_ok=True)
            os.rename(saved, resolv)
        unmount_all(rootfs)


@contextlib.contextmanager
def workspace(work_dir: Path) -> Iterator[Path]:
    """A fresh build directory under ``work_dir``, removed after success.

    A lock keeps two builds apart; directories left by failed builds are
    removed at the start of the next one.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    with open(work_dir / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BuildError(f"another lxcgpu-image is building in {work_dir}") from None
        for stale in work_dir.glob("build-*"):
            remove_tree(stale)
        build_dir = Path(tempfile.mkdtemp(prefix="build-", dir=work_dir))
        try:
            yield build_dir
        except BaseException:
            print(
                f"lxcgpu-image: build directory left for inspection: {build_dir}",
                file=sys.stderr,
            )
            raise
        remove_tree(build_dir)


# --------------------------------------------------------------------------
# Build steps.


def lay_files(src: Path, rootfs: Path) -> None:
    """Copy ``src`` into ``rootfs``: root-owned, 0755 dirs, 0644 (or 0755) files."""
    for path in sorted(src.rglob("*")):
        dest = rootfs / path.relative_to(src)
        if path.is_dir():
            dest.mkdir(mode=0o755, exist_ok=True)
            continue
        dest.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        shutil.copyfile(path, dest)
        dest.chmod(0o755 if path.stat().st_mode & 0o100 else 0o644)
        os.chown(dest, 0, 0)


def configure(rootfs: Path, distro: Distro, opts: argparse.Namespace) -> None:
    """Lay in lxcgpu's files and settings (before the chroot session)."""
    lay_files(FILES_DIR / "rootfs", rootfs)
    (rootfs / "etc/apt/sources.list").write_text(
        sources_list(distro, opts.suite, opts.mirror, opts.security_mirror)
    )
    # debootstrap copied the host's name; LXD's templates set the container's.
    (rootfs / "etc/hostname").write_text("localhost\n")
    (rootfs / "etc/hosts").write_text(
        (FILES_DIR / "templates/hosts.tpl").read_text().replace("{{ container.name }}", "localhost")
    )
    # Point resolv.conf at systemd-resolved's stub; networkd feeds it DHCP's DNS.
    resolv = rootfs / "etc/resolv.conf"
    resolv.unlink(missing_ok=True)
    resolv.symlink_to("../run/systemd/resolve/stub-resolv.conf")


def enable_units(rootfs: Path, runner: Runner) -> None:
    """Enable networkd and resolved; mask what cannot work unprivileged."""
    chroot = ["chroot", str(rootfs), "systemctl"]
    runner.run(
        [*chroot, "enable", "systemd-networkd.service", "systemd-resolved.service"],
        timeout=TIMEOUTS["query"],
        env=CHROOT_ENV,
    )
    # binfmt_misc cannot be set up unprivileged: the unit fails and leaves the
    # system degraded.
    runner.run(
        [*chroot, "mask", "systemd-binfmt.service"],
        timeout=TIMEOUTS["query"],
        env=CHROOT_ENV,
    )


def install_jupyter(rootfs: Path, recipe: Recipe, runner: Runner) -> dict[str, str]:
    """Make /opt/jupyter from wheels downloaded on the host; return versions."""
    info = json.loads(chroot_output(rootfs, ["/usr/bin/python3", "-c", MARKERS_PROBE]))
    wheels = "/tmp/lxcgpu-wheels"
    with runner.step("wheels"):
        runner.run(
            pip_download_argv(
                info["python"],
                info["glibc"],
                platform.machine(),
                rootfs / wheels.lstrip("/"),
                recipe.pip,
                info["markers"],
            ),
            timeout=TIMEOUTS["pip"],
        )
    with runner.step("pip install"):
        runner.run(
            ["chroot", str(rootfs), "/usr/bin/python3", "-m", "venv", JUPYTER_VENV],
            timeout=TIMEOUTS["pip"],
            env=CHROOT_ENV,
        )
        runner.run(
            pip_install_argv(rootfs, wheels, recipe.pip),
            timeout=TIMEOUTS["pip"],
            env=CHROOT_ENV,
        )
        if recipe.pip_remove:
            runner.run(
                ["chroot", str(rootfs), f"{JUPYTER_VENV}/bin/python", "-m", "pip", "uninstall",
                 "--yes", "--disable-pip-version-check", *recipe.pip_remove],
                timeout=TIMEOUTS["pip"],
                env=CHROOT_ENV,
            )
    shutil.rmtree(rootfs / wheels.lstrip("/"))
    listing = chroot_output(
        rootfs,
        [
            f"{JUPYTER_VENV}/bin/python",
            "-m",
            "pip",
            "list",
            "--format=json",
            "--disable-pip-version-check",
        ],
    )
    packages = {p["name"].lower(): p["version"] for p in json.loads(listing)}
    if packages.get("jupyterhub") != recipe.jupyterhub:
        raise BuildError(
            f"/opt/jupyter got jupyterhub {packages.get('jupyterhub')}, "
            f"not the hub's {recipe.jupyterhub}"
        )
    return {
        "python": info["python"],
        "jupyterhub": packages["jupyterhub"],
        "jupyterlab": packages.get("jupyterlab", ""),
        "packages": packages,
    }


def run_hooks(rootfs: Path, hooks: list[Path], opts: argparse.Namespace, runner: Runner) -> None:
    """Run the site's hook scripts with bash inside the chroot, in name order."""
    inside = rootfs / "tmp/lxcgpu-hooks"
    inside.mkdir(mode=0o700)
    env = {
        **CHROOT_ENV,
        "LXCGPU_DISTRO": opts.distro,
        "LXCGPU_SUITE": opts.suite,
        "LXCGPU_JUPYTER_VENV": JUPYTER_VENV,
    }
    try:
        for hook in hooks:
            shutil.copyfile(hook, inside / hook.name)
            with runner.step(f"hook {hook.name}"):
                runner.run(
                    [
                        "chroot",
                        str(rootfs),
                        "/bin/bash",
                        f"/tmp/lxcgpu-hooks/{hook.name}",
                    ],
                    timeout=TIMEOUTS["hook"],
                    env=env,
                )
    finally:
        shutil.rmtree(inside)


def _clear(directory: Path, keep=lambda p: False) -> None:
    """Delete what is inside ``directory`` except what ``keep`` accepts."""
    if not directory.is_dir():
        return
    for p in directory.iterdir():
        if keep(p):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def finalise(rootfs: Path) -> None:
    """Strip caches and documentation; remove the build's machine identity.

    Runs after every package install, since maintainer scripts recreate
    host keys and the machine id.
    """
    _clear(rootfs / "var/lib/apt/lists", keep=lambda p: p.name in ("partial", "lock"))
    _clear(rootfs / "var/cache/apt", keep=lambda p: p.name == "archives")
    _clear(rootfs / "var/cache/apt/archives", keep=lambda p: p.name in ("partial", "lock"))
    _clear(rootfs / "var/cache/debconf", keep=lambda p: not p.name.endswith("-old"))
    for old in (rootfs / "var/lib/dpkg").glob("*-old"):
        old.unlink()
    # Documentation except licences, manuals and translations.
    for doc in (rootfs / "usr/share/doc").glob("*"):
        if doc.is_dir() and not doc.is_symlink():
            _clear(doc, keep=lambda p: p.name == "copyright")
    for d in ("usr/share/man", "usr/share/info", "usr/share/lintian"):
        _clear(rootfs / d)
    _clear(rootfs / "usr/share/locale", keep=lambda p: p.is_file())
    for d in ("tmp", "var/tmp", "root/.cache"):
        _clear(rootfs / d)
    for logfile in (rootfs / "var/log").rglob("*"):
        if logfile.is_file():
            logfile.unlink()
    # Identity: every container makes its own at first boot.
    (rootfs / "etc/machine-id").write_text("")
    dbus_id = rootfs / "var/lib/dbus/machine-id"
    if dbus_id.exists() and not dbus_id.is_symlink():
        dbus_id.unlink()
        dbus_id.symlink_to("/etc/machine-id")
    for key in (rootfs / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    (rootfs / "var/lib/systemd/random-seed").unlink(missing_ok=True)


def build_image(
    build_dir: Path,
    recipe: Recipe,
    distro: Distro,
    hooks: list[Path],
    opts: argparse.Namespace,
    runner: Runner,
) -> tuple[Path, dict[str, str]]:
    """Build the image tarball in ``build_dir``; return it and its properties."""
    rootfs = build_dir / "rootfs"
    try:
        with runner.step("debootstrap"):
            runner.run(
                debootstrap_argv(opts.suite, rootfs, opts.mirror, recipe.packages),
                timeout=TIMEOUTS["debootstrap"],
            )
    finally:
        unmount_all(rootfs)  # a failing debootstrap leaves /proc and /sys mounted
    configure(rootfs, distro, opts)
    with chroot_session(rootfs):
        enable_units(rootfs, runner)
        with runner.step("apt"):
            runner.run(
                ["chroot", str(rootfs), *APT_GET, "update"],
                timeout=TIMEOUTS["apt"],
                env=CHROOT_ENV,
            )
            # debootstrap takes the release as published; add its updates.
            runner.run(
                ["chroot", str(rootfs), *APT_GET, "dist-upgrade"],
                timeout=TIMEOUTS["apt"],
                env=CHROOT_ENV,
            )
            if recipe.extra_packages:
                runner.run(
                    [
                        "chroot",
                        str(rootfs),
                        *APT_GET,
                        "install",
                        "--no-install-recommends",
                        *recipe.extra_packages,
                    ],
                    timeout=TIMEOUTS["apt"],
                    env=CHROOT_ENV,
                )
        versions = install_jupyter(rootfs, recipe, runner)
        run_hooks(rootfs, hooks, opts, runner)
        runner.run(
            ["chroot", str(rootfs), "apt-get", "clean"],
            timeout=TIMEOUTS["apt"],
            env=CHROOT_ENV,
        )
    finalise(rootfs)

    now = time.time()
    serial = time.strftime("%Y%m%d_%H%M", time.gmtime(now))
    properties = image_properties(recipe, distro, versions, serial)
    info = {
        "recipe": recipe.digest(),
        "serial": serial,
        "recipe_inputs": asdict(recipe),
        **versions,
    }
    (rootfs / IMAGE_INFO.lstrip("/")).parent.mkdir(mode=0o755, exist_ok=True)
    (rootfs / IMAGE_INFO.lstrip("/")).write_text(json.dumps(info, indent=2) + "\n")
    (build_dir / "metadata.yaml").write_text(
        yaml.safe_dump(
            metadata(lxd_architecture(platform.machine()), int(now), properties),
            sort_keys=False,
        )
    )
    shutil.copytree(FILES_DIR / "templates", build_dir / "templates")

    tarball = build_dir / "image.tar.zst"
    with runner.step("compress"):
        runner.run(tar_argv(tarball, build_dir), timeout=TIMEOUTS["tar"])
    rootfs_mib = _du(rootfs) / 2**20
    tarball_mib = tarball.stat().st_size / 2**20
    print(f"    rootfs {rootfs_mib:.0f} MiB, tarball {tarball_mib:.0f} MiB")
    return tarball, properties


def _du(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            total += st.st_blocks * 512
    return total


# --------------------------------------------------------------------------
# LXD.


def connect():
    """A pylxd client, or a BuildError that says how to bring LXD up."""
    import pylxd
    from pylxd.exceptions import ClientConnectionFailed

    try:
        # The constructor asks the daemon once; the timeout bounds every request.
        return pylxd.Client(timeout=TIMEOUTS["lxd"])
    except ClientConnectionFailed as e:
        raise BuildError(
            f"LXD is not reachable ({e}). Run setup/quickstart, or start LXD "
            "(`lxd --group root &` then `lxd waitready`), and try again."
        ) from None


def image_by_alias(client, alias: str):
    from pylxd.exceptions import NotFound

    try:
        return client.images.get_by_alias(alias)
    except NotFound:
        return None


def import_image(client, tarball: Path, properties: dict[str, str], alias: str):
    """Import the tarball, point ``alias`` at it and delete the image it replaces."""
    old = image_by_alias(client, alias)
    with open(tarball, "rb") as f:
        image = client.images.create(f, public=False)
    # The properties come with it: LXD copies them from metadata.yaml.
    description = properties["description"]
    if old is None:
        image.add_alias(alias, description)
        return image
    client.api.images.aliases[alias].put(
        json={"target": image.fingerprint, "description": description}
    )
    if old.fingerprint != image.fingerprint:
        if any(a["name"] != alias for a in old.aliases):
            print(f"    kept the old image {old.fingerprint[:12]}: it has other aliases")
        else:
            # Containers made from it keep their own copy of the rootfs.
            old.delete(wait=True)
            print(f"    deleted the previous image {old.fingerprint[:12]}")
    return image


# --------------------------------------------------------------------------
# Command line.


def _split(values: list[str] | None) -> list[str]:
    return [v for item in values or [] for v in re.split(r"[,\s]+", item) if v]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="lxcgpu-image",
        description="Build the lxcgpu template image (debootstrap + Jupyter) and "
        "import it into LXD. Does nothing when the image behind the alias was "
        "built from the same recipe, unless --force.",
    )
    p.add_argument(
        "--alias",
        default=DEFAULT_ALIAS,
        help="LXD image alias to create or move (default: %(default)s)",
    )
    p.add_argument(
        "--distro",
        choices=sorted(DISTROS),
        default="debian",
        help="distribution (default: %(default)s)",
    )
    p.add_argument(
        "--suite",
        help="release: bookworm for debian (default); "
        "jammy (default) or noble for ubuntu, if this host's debootstrap knows it",
    )
    p.add_argument("--mirror", help="package mirror (default: the distribution's main archive)")
    p.add_argument(
        "--security-mirror",
        help="security archive, or 'none' (default: the distribution's)",
    )
    p.add_argument(
        "--extra-packages",
        action="append",
        metavar="PKGS",
        help="more apt packages (comma- or space-separated; repeatable)",
    )
    p.add_argument(
        "--extra-pip",
        action="append",
        metavar="SPECS",
        help="more pip requirements for /opt/jupyter (comma- or "
        "space-separated; repeatable); they must exist as wheels",
    )
    p.add_argument(
        "--jupyterlab",
        default="jupyterlab",
        metavar="SPEC",
        help="JupyterLab requirement (default: %(default)s, the newest)",
    )
    p.add_argument(
        "--hooks-dir",
        default=DEFAULT_HOOKS_DIR,
        type=Path,
        help="run its *.sh with bash inside the image, in name order (default: %(default)s)",
    )
    p.add_argument(
        "--work-dir",
        default=DEFAULT_WORK_DIR,
        type=Path,
        help="build directory, emptied after success (default: %(default)s)",
    )
    p.add_argument(
        "--output",
        type=Path,
        metavar="FILE",
        help="also keep the image tarball (unified, zstd) at FILE",
    )
    p.add_argument("--no-import", action="store_true", help="build without LXD (use with --output)")
    p.add_argument("--force", action="store_true", help="rebuild even if the image is up to date")
    p.add_argument(
        "--print-recipe",
        action="store_true",
        help="print the recipe and its hash, then exit",
    )
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show the output of every command instead of logging it",
    )
    opts = p.parse_args(argv)
    if opts.no_import and not opts.output:
        p.error("--no-import needs --output, or the image is thrown away")

    distro = DISTROS[opts.distro]
    opts.suite = opts.suite or distro.default_suite
    if opts.suite not in distro.suites:
        p.error(f"--suite for {opts.distro}: one of {', '.join(distro.suites)}")
    opts.mirror = opts.mirror or distro.mirror
    opts.security_mirror = opts.security_mirror or distro.security_mirror
    opts.extra_packages = _split(opts.extra_packages)
    opts.extra_pip = _split(opts.extra_pip)
    for pkg in opts.extra_packages:
        if not _PACKAGE_RE.match(pkg):
            p.error(f"not an apt package name: {pkg!r}")
    for spec in [*opts.extra_pip, opts.jupyterlab]:
        if spec.startswith("-"):
            p.error(f"not a pip requirement: {spec!r}")
    return opts


def make_recipe(opts: argparse.Namespace, hooks: list[Path]) -> Recipe:
    distro = DISTROS[opts.distro]
    jupyterhub = importlib.metadata.version("jupyterhub")
    return Recipe(
        distro=opts.distro,
        suite=opts.suite,
        mirror=opts.mirror,
        security_mirror=opts.security_mirror,
        packages=package_list(distro, opts.suite),
        extra_packages=tuple(sorted(set(opts.extra_packages))),
        jupyterhub=jupyterhub,
        pip=pip_specs(jupyterhub, opts.jupyterlab, opts.extra_pip),
        files=file_digests(FILES_DIR),
        hooks=hook_digests(hooks),
        pip_remove=tuple(p for p in PIP_REMOVE
                         if p not in {_requirement_name(x) for x in opts.extra_pip}),
    )


def _requirement_name(spec: str) -> str:
    return re.split(r"[<>=!~\[;@ ]", spec, maxsplit=1)[0].lower()


def preflight(distro: Distro, opts: argparse.Namespace) -> None:
    """Check what the build needs before it starts."""
    if os.geteuid() != 0:
        raise BuildError("building an image needs root (debootstrap, chroot, mount)")
    if shutil.which("debootstrap") is None:
        raise BuildError("debootstrap is not installed: apt-get install debootstrap")
    if shutil.which("zstd") is None:
        raise BuildError("zstd is not installed: apt-get install zstd")
    script = Path("/usr/share/debootstrap/scripts") / opts.suite
    if not script.exists():
        raise BuildError(
            f"this host's debootstrap does not know {opts.suite} "
            f"(no {script}): install a newer debootstrap"
        )
    if not Path(distro.keyring).exists():
        raise BuildError(f"no {distro.keyring}: apt-get install {distro.keyring_package}")


def build_and_import(opts: argparse.Namespace) -> int:
    distro = DISTROS[opts.distro]
    hooks = find_hooks(opts.hooks_dir)
    recipe = make_recipe(opts, hooks)
    digest = recipe.digest()
    if opts.print_recipe:
        print(json.dumps({"recipe": digest, **asdict(recipe)}, indent=2))
        return 0

    client = None if opts.no_import else connect()
    if client is not None:
        current = image_by_alias(client, opts.alias)
        up_to_date = current is not None and current.properties.get("lxcgpu.recipe") == digest
        if up_to_date and not opts.force:
            print(
                f"{opts.alias} is up to date ({current.fingerprint[:12]}, "
                f"recipe {digest[:12]}); --force rebuilds it"
            )
            return 0
    preflight(distro, opts)

    started = time.monotonic()
    print(
        f"building {opts.alias}: {distro.os_name} {opts.suite}, jupyterhub "
        f"{recipe.jupyterhub}, recipe {digest[:12]}, hooks: "
        f"{', '.join(h.name for h in hooks) or 'none'}"
    )
    with workspace(opts.work_dir) as build_dir:
        runner = Runner(build_dir / "build.log", verbose=opts.verbose)
        tarball, properties = build_image(build_dir, recipe, distro, hooks, opts, runner)
        if opts.output:
            shutil.copyfile(tarball, opts.output)
            print(f"    wrote {opts.output}")
        if client is not None:
            with runner.step("import"):
                image = import_image(client, tarball, properties, opts.alias)
            print(f"    {opts.alias} -> {image.fingerprint[:12]}")
    steps = ", ".join(f"{k} {v:.1f} s" for k, v in runner.timings.items())
    print(f"done in {time.monotonic() - started:.0f} s ({steps})")
    return 0


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    try:
        return build_and_import(opts)
    except BuildError as e:
        print(f"lxcgpu-image: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("lxcgpu-image: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
