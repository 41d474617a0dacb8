"""Pure parts of the template image builder (imagebuilder.image)."""

import ast
import dataclasses
import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from imagebuilder import image


def opts(*args):
    return image.parse_args(["--hooks-dir", "/nonexistent", *args])


@pytest.fixture
def recipe():
    return image.make_recipe(opts(), hooks=[])


# --------------------------------------------------------------------------
# Recipe hash


def test_recipe_is_stable_for_the_same_inputs(recipe):
    again = image.make_recipe(opts(), hooks=[])
    assert again == recipe
    assert again.digest() == recipe.digest()
    assert len(recipe.digest()) == 64


def test_recipe_pins_the_hubs_jupyterhub(recipe):
    hub = importlib.metadata.version("jupyterhub")
    assert recipe.jupyterhub == hub
    assert recipe.pip[0] == f"jupyterhub=={hub}"


def test_recipe_changes_with_the_jupyterhub_version(recipe):
    other = dataclasses.replace(
        recipe,
        jupyterhub="0.0.1",
        pip=image.pip_specs("0.0.1", "jupyterlab", []),
    )
    assert other.digest() != recipe.digest()


@pytest.mark.parametrize(
    "args",
    [
        ["--extra-packages", "git"],
        ["--extra-pip", "ipywidgets"],
        ["--jupyterlab", "jupyterlab<4"],
        ["--mirror", "http://mirror.example/debian"],
        ["--security-mirror", "none"],
        ["--distro", "ubuntu"],
    ],
)
def test_recipe_changes_with_the_options(recipe, args):
    assert image.make_recipe(opts(*args), hooks=[]).digest() != recipe.digest()


def test_recipe_changes_with_the_package_list(recipe):
    fewer = dataclasses.replace(recipe, packages=recipe.packages[1:])
    assert fewer.digest() != recipe.digest()


def test_recipe_ignores_the_order_of_extra_packages():
    a = image.make_recipe(opts("--extra-packages", "git,htop"), hooks=[])
    b = image.make_recipe(opts("--extra-packages", "htop", "--extra-packages", "git"), [])
    assert a.digest() == b.digest()


def test_recipe_changes_with_the_format_version(recipe):
    assert dataclasses.replace(recipe, format=0).digest() != recipe.digest()


def test_recipe_follows_hook_files(tmp_path, recipe):
    (tmp_path / "10-cuda.sh").write_text("apt-get install -y cuda-toolkit\n")
    (tmp_path / "README").write_text("not a hook\n")
    hooks = image.find_hooks(tmp_path)
    assert [h.name for h in hooks] == ["10-cuda.sh"]
    with_hook = image.make_recipe(opts(), hooks)
    assert with_hook.digest() != recipe.digest()

    (tmp_path / "README").write_text("edited, still not a hook\n")
    assert image.make_recipe(opts(), image.find_hooks(tmp_path)) == with_hook

    (tmp_path / "10-cuda.sh").write_text("apt-get install -y cuda-toolkit-12-6\n")
    edited = image.make_recipe(opts(), image.find_hooks(tmp_path))
    assert edited.digest() != with_hook.digest()


def test_hooks_run_in_name_order(tmp_path):
    for name in ("20-b.sh", "10-a.sh", "30-c.sh"):
        (tmp_path / name).write_text("true\n")
    assert [h.name for h in image.find_hooks(tmp_path)] == [
        "10-a.sh",
        "20-b.sh",
        "30-c.sh",
    ]
    assert image.find_hooks(tmp_path / "missing") == []


def test_file_digests_follow_content_and_mode(tmp_path):
    f = tmp_path / "etc" / "x.conf"
    f.parent.mkdir()
    f.write_text("a\n")
    f.chmod(0o644)
    first = image.file_digests(tmp_path)
    assert [p for p, _ in first] == ["etc/x.conf"]
    f.chmod(0o755)
    assert image.file_digests(tmp_path) != first
    f.chmod(0o644)
    f.write_text("b\n")
    assert image.file_digests(tmp_path) != first


def test_recipe_covers_every_laid_in_file(recipe):
    paths = {p for p, _ in recipe.files}
    assert "rootfs/etc/ssh/sshd_config.d/lxcgpu.conf" in paths
    assert "templates/hostname.tpl" in paths
    assert len(paths) == sum(1 for p in image.FILES_DIR.rglob("*") if p.is_file())


# --------------------------------------------------------------------------
# Image contents


def test_debootstrap_installs_what_boots_in_lxd(recipe):
    for pkg in ("udev", "systemd-sysv", "dbus", "openssh-server", "python3-venv"):
        assert pkg in recipe.packages
    assert "systemd-resolved" in recipe.packages  # its own package in bookworm


def test_metadata_yaml():
    props = {"lxcgpu.recipe": "abc", "os": "Debian"}
    meta = image.metadata("x86_64", 1764417600, props)
    text = yaml.safe_dump(meta)
    assert yaml.safe_load(text) == {
        "architecture": "x86_64",
        "creation_date": 1764417600,
        "properties": props,
        "templates": {
            "/etc/hostname": {"when": ["create", "copy"], "template": "hostname.tpl"},
            "/etc/hosts": {"when": ["create", "copy"], "template": "hosts.tpl"},
        },
    }
    for tpl in meta["templates"].values():
        content = (image.FILES_DIR / "templates" / tpl["template"]).read_text()
        assert "{{ container.name }}" in content


def test_image_properties(recipe):
    versions = {"python": "3.11.2", "jupyterhub": "6.1.1", "jupyterlab": "4.4.0"}
    props = image.image_properties(recipe, image.DISTROS["debian"], versions, "20261129_1200")
    assert props["lxcgpu.recipe"] == recipe.digest()
    assert props["lxcgpu.jupyterhub"] == "6.1.1"
    assert props["lxcgpu.jupyterlab"] == "4.4.0"
    assert props["lxcgpu.python"] == "3.11.2"
    assert props["os"] == "Debian"
    assert props["release"] == "bookworm"
    assert "jupyterhub 6.1.1" in props["description"]
    assert all(isinstance(v, str) for v in props.values())


def test_laid_in_files_fix_the_known_pitfalls():
    root = image.FILES_DIR / "rootfs"
    network = (root / "etc/systemd/network/eth0.network").read_text()
    assert "Name=eth0" in network
    assert "[DHCPv4]" in network and "ClientIdentifier=mac" in network

    sshd = (root / "etc/ssh/sshd_config.d/lxcgpu.conf").read_text().split("\n")
    for line in (
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PermitRootLogin prohibit-password",
    ):
        assert line in sshd

    # ssh.service already runs `sshd -t`, which fails without host keys: the
    # drop-in must reset the list and make the keys first.
    dropin = (root / "etc/systemd/system/ssh.service.d/lxcgpu-hostkeys.conf").read_text()
    pre = [ln for ln in dropin.splitlines() if ln.startswith("ExecStartPre")]
    assert pre == [
        "ExecStartPre=",
        "ExecStartPre=/usr/bin/ssh-keygen -A",
        "ExecStartPre=/usr/sbin/sshd -t",
    ]


def test_sources_list():
    debian = image.DISTROS["debian"]
    text = image.sources_list(debian, "bookworm", debian.mirror, debian.security_mirror)
    assert text.splitlines() == [
        "deb http://deb.debian.org/debian bookworm main",
        "deb http://deb.debian.org/debian bookworm-updates main",
        "deb http://deb.debian.org/debian-security bookworm-security main",
    ]
    assert "security" not in image.sources_list(debian, "bookworm", debian.mirror, "none")


@pytest.mark.skipif(os.geteuid() != 0, reason="lays files owned by root")
def test_lay_files(tmp_path):
    image.lay_files(image.FILES_DIR / "rootfs", tmp_path)
    conf = tmp_path / "etc/ssh/sshd_config.d/lxcgpu.conf"
    assert conf.read_text().startswith("# lxcgpu")
    assert conf.stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "etc/ssh").stat().st_mode & 0o777 == 0o755


# --------------------------------------------------------------------------
# Commands


IMAGE_MARKERS = {"python_version": "3.11", "python_full_version": "3.11.2"}


def test_pip_download_targets_the_image_not_the_host(tmp_path):
    argv = image.pip_download_argv(
        "3.11.2", "2.36", "x86_64", tmp_path, ("jupyterhub==6.1.1", "jupyterlab"),
        IMAGE_MARKERS,
    )
    assert argv[:5] == [sys.executable, "-c", image.PIP_FOR_IMAGE,
                        json.dumps(IMAGE_MARKERS, sort_keys=True), "download"]
    assert "--only-binary=:all:" in argv
    assert argv[argv.index("--python-version") + 1] == "3.11"
    assert argv[argv.index("--implementation") + 1] == "cp"
    platforms = [argv[i + 1] for i, a in enumerate(argv) if a == "--platform"]
    for tag in (
        "manylinux_2_36_x86_64",
        "manylinux_2_28_x86_64",
        "manylinux_2_17_x86_64",
        "manylinux2014_x86_64",
        "any",
    ):
        assert tag in platforms
    # Nothing newer than the image's glibc.
    assert "manylinux_2_37_x86_64" not in platforms
    assert argv[argv.index("-d") + 1] == str(tmp_path)
    # No index or certificate options: the host's pip configuration applies.
    assert not [a for a in argv if a.startswith(("--index", "--extra-index", "--cert"))]
    assert argv[-3:] == ["--", "jupyterhub==6.1.1", "jupyterlab"]


def write_wheel(folder: Path, name: str, requires: list[str]) -> None:
    """A minimal pure-Python wheel whose metadata lists ``requires``."""
    import zipfile

    dist = f"{name}-1.0.dist-info"
    meta = "".join(f"Requires-Dist: {r}\n" for r in requires)
    files = {
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n{meta}",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                         "Tag: py3-none-any\n",
        f"{dist}/RECORD": "",
    }
    with zipfile.ZipFile(folder / f"{name}-1.0-py3-none-any.whl", "w") as z:
        for path, text in files.items():
            z.writestr(path, text)


@pytest.mark.parametrize("image_python, wanted", [
    # A dependency only older Pythons need, for an image older than the host
    # (the Debian 13 host building a bookworm image) ...
    ("3.9", {"needs-old", "only-old"}),
    # ... and not for an image as new as the host's or newer.
    ("3.99", {"needs-old"}),
])
def test_pip_download_evaluates_markers_for_the_image(tmp_path, image_python, wanted):
    """Real pip, offline: markers follow the image's Python, not the host's."""
    index = tmp_path / "index"
    index.mkdir()
    write_wheel(index, "needs_old", ['only_old; python_version < "3.10"'])
    write_wheel(index, "only_old", [])
    probe = subprocess.run([sys.executable, "-c", image.MARKERS_PROBE],
                           capture_output=True, text=True, check=True)
    markers = json.loads(probe.stdout)["markers"]
    markers.update(python_version=image_python, python_full_version=f"{image_python}.0")
    dest = tmp_path / "wheels"
    argv = image.pip_download_argv(f"{image_python}.0", "2.36", "x86_64", dest,
                                   ("needs-old",), markers)
    env = dict(os.environ, PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1",
               PIP_FIND_LINKS=str(index))
    env.pop("PIP_CONSTRAINT", None)
    p = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    got = {w.name.split("-")[0].replace("_", "-") for w in dest.iterdir()}
    assert got == wanted


def test_markers_probe_matches_packaging():
    """The probe run in the chroot gives what packaging itself computes."""
    from packaging.markers import default_environment

    probe = subprocess.run([sys.executable, "-c", image.MARKERS_PROBE],
                           capture_output=True, text=True, check=True)
    markers = json.loads(probe.stdout)["markers"]
    assert markers == {k: v for k, v in default_environment().items() if k in markers}
    assert set(markers) >= {"python_version", "python_full_version", "sys_platform",
                            "platform_machine", "implementation_name"}


def test_manylinux_platforms_per_architecture():
    arm = image.manylinux_platforms("2.39", "aarch64")
    assert arm[0] == "manylinux_2_39_aarch64"
    assert "manylinux_2_17_aarch64" in arm and "manylinux2014_aarch64" in arm
    assert "manylinux_2_16_aarch64" not in arm and "manylinux1_aarch64" not in arm
    x86 = image.manylinux_platforms("2.35", "x86_64")
    assert "manylinux_2_5_x86_64" in x86 and "manylinux1_x86_64" in x86
    with pytest.raises(image.BuildError):
        image.manylinux_platforms("3.0", "x86_64")


def test_pip_install_is_offline(tmp_path):
    argv = image.pip_install_argv(tmp_path, "/tmp/w", ("jupyterhub==6.1.1",))
    assert argv[:3] == ["chroot", str(tmp_path), "/opt/jupyter/bin/pip"]
    assert "--no-index" in argv
    assert argv[argv.index("--find-links") + 1] == "/tmp/w"


def test_debootstrap_argv(tmp_path, recipe):
    argv = image.debootstrap_argv("bookworm", tmp_path, "http://m/debian", recipe.packages)
    assert argv[:2] == ["debootstrap", "--variant=minbase"]
    assert argv[2] == "--include=" + ",".join(recipe.packages)
    assert argv[-3:] == ["bookworm", str(tmp_path), "http://m/debian"]


def test_tar_argv(tmp_path):
    argv = image.tar_argv(tmp_path / "i.tar.zst", tmp_path)
    for flag in ("--zstd", "--numeric-owner", "--xattrs"):
        assert flag in argv
    assert argv[-3:] == ["metadata.yaml", "templates", "rootfs"]


def test_no_shell_anywhere():
    """Every subprocess gets an argv list; nothing goes through a shell."""
    tree = ast.parse(Path(image.__file__).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            assert not any(k.arg == "shell" for k in node.keywords), ast.unparse(node)
            assert ast.unparse(node.func) not in ("os.system", "os.popen")
            if ast.unparse(node.func) in ("subprocess.run", "subprocess.Popen"):
                assert not isinstance(node.args[0], ast.Constant | ast.JoinedStr)
    argvs = [
        image.debootstrap_argv("bookworm", Path("/r"), "http://m", ("a", "b")),
        image.pip_download_argv("3.11.2", "2.36", "x86_64", Path("/w"), ("x",), IMAGE_MARKERS),
        image.pip_install_argv(Path("/r"), "/w", ("x",)),
        image.tar_argv(Path("/t"), Path("/b")),
    ]
    for argv in argvs:
        assert isinstance(argv, list) and all(isinstance(a, str) for a in argv)


# --------------------------------------------------------------------------
# Command line


def test_defaults():
    o = opts()
    assert o.alias == "lxcgpu/default"
    assert (o.distro, o.suite, o.mirror) == (
        "debian",
        "bookworm",
        "http://deb.debian.org/debian",
    )
    assert o.work_dir == Path("/var/cache/lxcgpu/image")
    assert image.parse_args([]).hooks_dir == Path("/etc/lxcgpu/image.d")


def test_ubuntu_defaults():
    o = opts("--distro", "ubuntu")
    assert (o.suite, o.mirror) == ("jammy", "http://archive.ubuntu.com/ubuntu")
    assert opts("--distro", "ubuntu", "--suite", "noble").suite == "noble"


@pytest.mark.parametrize(
    "args",
    [
        ["--suite", "jammy"],  # a debian suite is expected
        ["--distro", "ubuntu", "--suite", "bookworm"],
        ["--extra-packages", "-oDebug::x=1"],
        ["--extra-packages", "foo;rm"],
        ["--extra-pip", "--index-url=http://evil"],
        ["--no-import"],
    ],
)
def test_bad_options_are_refused(args):
    with pytest.raises(SystemExit):
        opts(*args)


def test_extra_lists_split_on_commas_and_spaces():
    o = opts(
        "--extra-packages",
        "git, htop",
        "--extra-packages",
        "tmux",
        "--extra-pip",
        "a b",
    )
    assert o.extra_packages == ["git", "htop", "tmux"]
    assert o.extra_pip == ["a", "b"]


def test_print_recipe(capsys, recipe):
    assert image.main(["--hooks-dir", "/nonexistent", "--print-recipe"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["recipe"] == recipe.digest()
    assert printed["jupyterhub"] == recipe.jupyterhub


def test_preflight_says_what_to_install():
    if os.geteuid() != 0:
        pytest.skip("the root check comes first")
    o = opts("--distro", "ubuntu", "--suite", "noble")
    # A release no debootstrap knows, whatever this host's knows (Debian 13's
    # knows noble).
    o.suite = "lxcgpu-unknown-release"
    expected = "apt-get install debootstrap"
    if image.shutil.which("debootstrap"):
        expected = "newer debootstrap"
    with pytest.raises(image.BuildError, match=expected):
        image.preflight(image.DISTROS["ubuntu"], o)


def test_slow_optional_imports_are_removed_unless_the_site_asks_for_them(recipe):
    assert recipe.pip_remove == image.PIP_REMOVE
    kept = image.make_recipe(opts("--extra-pip", "rfc3987-syntax>=1.1"), hooks=[])
    assert kept.pip_remove == ()
    assert kept.digest() != recipe.digest()
