"""What lxcgpu writes into a container follows no link its user planted, and
what it reads back or runs there is bounded: each attack run for real, in a
real container from the template image, as the user (uid 1000+) would."""

from __future__ import annotations

import time

import pytest

from lxcspawner import jupyter
from lxcspawner.container import start_container
from lxcspawner.lxd import LXD, LXDError, LXDTimeout, LXDTooLarge, MAX_READ_BYTES
from lxcspawner.provision import ProvisionError, provision
from tests.fixtures.sshkeys import keypair

pytestmark = pytest.mark.lxd

# What must never change, whatever the user puts under ~/.ssh.
SYSTEM_FILES = ("/etc/shadow", "/etc/passwd", "/etc/sudoers", "/etc/sudoers.d/lxcgpu",
                "/root/.ssh/authorized_keys", "/etc/ssh/sshd_config")


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("keys")
    return [keypair(tmp, n)[1] for n in ("old", "new")]


@pytest.fixture(scope="module")
async def mallory(lxd, user_containers, keys):
    spec = await user_containers("mallory")
    await start_container(lxd, spec.name)
    acct = await provision(lxd, spec.name, login=spec.posix_user, keys=keys[:1],
                           hostname=spec.hostname)
    # Root's own key file, which a link from the user's ~/.ssh may point at.
    await sh(lxd, spec.name, "install -d -m 0700 /root/.ssh && "
             "echo 'ssh-ed25519 AAAAroot root@lab' > /root/.ssh/authorized_keys")
    return spec, acct


async def sh(lxd: LXD, name: str, script: str, *, uid: int = 0) -> str:
    """Run a fixed test script in the container as ``uid``."""
    argv = ["sh", "-c", script]
    return (await lxd.execute(name, argv, user=uid, group=uid)).check(argv).stdout


async def hashes(lxd: LXD, name: str) -> str:
    return await sh(lxd, name, "sha256sum " + " ".join(SYSTEM_FILES))


@pytest.fixture
async def fresh_ssh(lxd, mallory, keys, logs_on_failure):
    """mallory's ~/.ssh as provisioning leaves it, with the old key."""
    spec, acct = mallory
    logs_on_failure.append(spec.name)
    await sh(lxd, spec.name, f"rm -rf {acct.home}/.ssh {acct.home}/.ssh.moved-by-lxcgpu-*")
    await provision(lxd, spec.name, login=acct.name, keys=keys[:1], hostname=spec.hostname)
    return spec, acct


@pytest.mark.parametrize("attack", [
    # (what the user runs in their home, as themselves)
    "rm -rf .ssh && ln -s /etc .ssh",
    "rm -f .ssh/authorized_keys && ln -s /etc/shadow .ssh/authorized_keys",
    "rm -f .ssh/authorized_keys && ln -s /nonexistent/keys .ssh/authorized_keys",
    "rm -f .ssh/authorized_keys && ln -s /root/.ssh/authorized_keys .ssh/authorized_keys",
    "rm -rf .ssh && ln -s /root/.ssh .ssh",
    "rm -rf .ssh && ln -s /nonexistent .ssh",
    "rm -rf .ssh && echo not-a-dir > .ssh",
], ids=["ssh-to-etc", "keys-to-shadow", "keys-dangling", "keys-to-roots-keys",
        "ssh-to-roots-ssh", "ssh-dangling", "ssh-is-a-file"])
async def test_a_key_change_follows_no_link_the_user_planted(lxd, fresh_ssh, keys, attack):
    spec, acct = fresh_ssh
    before = await hashes(lxd, spec.name)
    await sh(lxd, spec.name, f"cd {acct.home} && {attack}", uid=acct.uid)

    await provision(lxd, spec.name, login=acct.name, keys=keys, hostname=spec.hostname)

    assert await hashes(lxd, spec.name) == before
    # The keys landed in a real directory and a real file of the user's.
    listing = await sh(lxd, spec.name, f"stat -c '%F %U %a %n' {acct.home}/.ssh "
                       f"{acct.home}/.ssh/authorized_keys")
    assert listing.splitlines() == [f"directory {acct.name} 700 {acct.home}/.ssh",
                                    f"regular file {acct.name} 600 {acct.home}/.ssh/authorized_keys"]
    assert await sh(lxd, spec.name, f"cat {acct.home}/.ssh/authorized_keys") == \
        "".join(k + "\n" for k in keys)
    assert "No such file" in (await lxd.execute(spec.name, ["ls", "/nonexistent"])).stderr


async def test_a_write_the_user_cannot_make_fails_naming_the_container(lxd, fresh_ssh, keys):
    """~/.ssh made root's (only root can): the push fails in a sentence that
    names the container and says why, and a later push works."""
    spec, acct = fresh_ssh
    before = await hashes(lxd, spec.name)
    await sh(lxd, spec.name, f"chown root:root {acct.home}/.ssh")
    with pytest.raises(ProvisionError) as e:
        await provision(lxd, spec.name, login=acct.name, keys=keys, hostname=spec.hostname)
    msg = str(e.value)
    assert spec.name in msg and "Permission denied" in msg and "next start" in msg
    assert await hashes(lxd, spec.name) == before
    await sh(lxd, spec.name, f"chown {acct.uid}:{acct.gid} {acct.home}/.ssh")
    await provision(lxd, spec.name, login=acct.name, keys=keys, hostname=spec.hostname)
    assert (await sh(lxd, spec.name, f"cat {acct.home}/.ssh/authorized_keys")).count("\n") == 2


async def test_system_files_written_through_lxd_replace_links(lxd, fresh_ssh, keys):
    """Root inside linked /etc/hostname to /etc/shadow: the hostname is
    written into a real /etc/hostname, /etc/shadow is untouched."""
    spec, acct = fresh_ssh
    shadow = await sh(lxd, spec.name, "sha256sum /etc/shadow")
    await sh(lxd, spec.name, "rm /etc/hostname && ln -s /etc/shadow /etc/hostname && "
             "rm /etc/hosts && ln -s /etc/shadow /etc/hosts")
    await provision(lxd, spec.name, login=acct.name, keys=keys[:1], hostname=spec.hostname)
    assert await sh(lxd, spec.name, "sha256sum /etc/shadow") == shadow
    assert await sh(lxd, spec.name, "stat -c %F /etc/hostname /etc/hosts") == \
        "regular file\nregular file\n"
    assert await sh(lxd, spec.name, "cat /etc/hostname") == f"{spec.hostname}\n"


async def test_a_container_without_python_gets_a_sentence_and_no_change(lxd, fresh_ssh, keys):
    """Root inside removed python3, which provisioning runs: a key push and
    a new account each fail in a sentence that names the container, the
    missing Python and its fix, and what happens next; nothing changes."""
    spec, acct = fresh_ssh
    before = await hashes(lxd, spec.name)
    await sh(lxd, spec.name, "mv /usr/bin/python3 /usr/bin/python3.lxcgpu-test")
    try:
        for login, then in ((acct.name, "pushed again at the next start"),
                            ("newcomer", "tried again at the next start")):
            with pytest.raises(ProvisionError) as e:
                await provision(lxd, spec.name, login=login, keys=keys,
                                hostname=spec.hostname)
            msg = str(e.value)
            assert spec.name in msg and "python3 is missing or broken" in msg, msg
            assert "apt-get install python3" in msg and then in msg, msg
        assert await hashes(lxd, spec.name) == before
        assert "newcomer" not in await sh(lxd, spec.name, "cat /etc/passwd")
    finally:
        await sh(lxd, spec.name, "mv /usr/bin/python3.lxcgpu-test /usr/bin/python3")
    await provision(lxd, spec.name, login=acct.name, keys=keys, hostname=spec.hostname)


async def test_a_new_account_is_made_without_following_planted_links(lxd, fresh_ssh, keys):
    """A login with no account there yet is provisioned in one exec
    (provision.NEW_ACCOUNT): root inside linked the files it writes, and the
    names of its temporary files, to a file of theirs; every write lands in
    a real file and the linked-to file is untouched."""
    spec, acct = fresh_ssh
    target = "/root/linked-to"
    await sh(lxd, spec.name, f"echo precious > {target} && "
             f"rm /etc/hostname && ln -s {target} /etc/hostname && "
             f"rm /etc/hosts && ln -s {target} /etc/hosts && "
             f"ln -s {target} /etc/sudoers.d/lxcgpu.lxcgpu-new && "
             f"ln -s {target} /etc/hostname.lxcgpu-new")
    try:
        made = await provision(lxd, spec.name, login="newcomer", keys=keys[:1],
                               hostname=spec.hostname)
        assert made.name == "newcomer" and made.uid >= 1000 and made.home == "/home/newcomer"
        assert await sh(lxd, spec.name, f"cat {target}") == "precious\n"
        assert await sh(lxd, spec.name, "stat -c '%F %U %a' /etc/hostname /etc/hosts "
                        "/etc/sudoers.d/lxcgpu") == \
            "regular file root 644\nregular file root 644\nregular file root 440\n"
        assert await sh(lxd, spec.name, "cat /etc/hostname; hostname") == \
            f"{spec.hostname}\n{spec.hostname}\n"
        assert f"127.0.1.1\t{spec.hostname}" in await sh(lxd, spec.name, "cat /etc/hosts")
        assert "newcomer ALL=(ALL:ALL) NOPASSWD: ALL" in \
            await sh(lxd, spec.name, "cat /etc/sudoers.d/lxcgpu")
        assert await sh(lxd, spec.name, "stat -c '%F %U %a' /home/newcomer/.ssh "
                        "/home/newcomer/.ssh/authorized_keys; "
                        "cat /home/newcomer/.ssh/authorized_keys") == \
            f"directory newcomer 700\nregular file newcomer 600\n{keys[0]}\n"
        # Provisioned again, nothing differs: the account is the same.
        assert await provision(lxd, spec.name, login="newcomer", keys=keys[:1],
                               hostname=spec.hostname) == made
    finally:
        await sh(lxd, spec.name, f"userdel -r newcomer 2>/dev/null; rm -f {target} "
                 "/etc/hostname.lxcgpu-new /etc/sudoers.d/lxcgpu.lxcgpu-new")
        await provision(lxd, spec.name, login=acct.name, keys=keys[:1], hostname=spec.hostname)


async def test_a_link_at_a_parent_directory_is_refused(lxd, fresh_ssh):
    """Jupyter's token file goes to /run/lxcgpu (made root's 0700 where it is
    missing, as jupyter.start writes it): a link there (to the user's home)
    is refused with the container's name, nothing is written."""
    spec, acct = fresh_ssh
    await sh(lxd, spec.name, f"rm -rf {jupyter.ENV_DIR} && ln -s {acct.home} {jupyter.ENV_DIR}")
    try:
        for dir_mode in (None, 0o700):
            with pytest.raises(LXDError, match=f"container {spec.name}: {jupyter.ENV_DIR} is "
                                               "a symbolic link"):
                await lxd.put_file(spec.name, f"{jupyter.ENV_DIR}/x.env", "TOKEN=secret\n",
                                   mode=0o600, dir_mode=dir_mode)
        assert "x.env" not in await sh(lxd, spec.name, f"ls {acct.home}")
    finally:
        await sh(lxd, spec.name, f"rm -f {jupyter.ENV_DIR}")
    await lxd.put_file(spec.name, f"{jupyter.ENV_DIR}/x.env", "TOKEN=secret\n", mode=0o600,
                       dir_mode=0o700)
    try:
        assert (await sh(lxd, spec.name, f"stat -c '%a %U %F' {jupyter.ENV_DIR} "
                         f"{jupyter.ENV_DIR}/x.env")).split("\n")[:2] == [
            "700 root directory", "600 root regular file"]
    finally:
        await sh(lxd, spec.name, f"rm -rf {jupyter.ENV_DIR}")


async def test_reads_and_output_from_inside_are_capped(lxd, fresh_ssh):
    spec, acct = fresh_ssh
    size = MAX_READ_BYTES + 1
    await sh(lxd, spec.name, f"head -c {size} /dev/zero > /tmp/big", uid=acct.uid)
    with pytest.raises(LXDTooLarge, match=f"/tmp/big in {spec.name} is larger than 1024 KiB"):
        await lxd.get_file(spec.name, "/tmp/big")
    with pytest.raises(LXDTooLarge, match=f"output of head in {spec.name}"):
        await lxd.execute(spec.name, ["head", "-c", str(size), "/dev/zero"])
    assert len(await lxd.get_file(spec.name, "/etc/passwd")) < MAX_READ_BYTES


async def test_a_command_that_overruns_its_timeout_is_stopped(lxd, fresh_ssh):
    spec, _ = fresh_ssh
    t = time.monotonic()
    with pytest.raises(LXDTimeout, match=f"sleep in {spec.name} did not finish in 2 s"):
        await lxd.execute(spec.name, ["sleep", "600"], timeout=2)
    assert time.monotonic() - t < 15
    assert (await lxd.execute(spec.name, ["pgrep", "-x", "sleep"])).returncode == 1
