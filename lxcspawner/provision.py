"""Provisioning inside a user's container: the login, sudo, SSH keys, hostname.

System files (sudoers, hostname, hosts) are written through LXD's file API,
which resolves paths inside the container; it follows links, so lxd.put_file
refuses a link at a parent and replaces one at the file itself.  The user's
``~/.ssh/authorized_keys`` is written by a process running as the user
(KEYS_WRITER): the kernel itself refuses whatever the user could not write,
and it follows no link the user planted.  Each step reads first and writes
only what differs, so provisioning a container that is already right costs a
handful of file reads and no exec.  It runs at every start and every sync,
so a push that failed is made again then.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Iterable, Sequence

from . import naming
from .lxd import LXD, LXDError
from .sshkeys import WeakKeyError, normalize_public_key

log = logging.getLogger("lxcspawner.provision")

SUDOERS_PATH = "/etc/sudoers.d/lxcgpu"
# How every login is made (the login follows, after "--").
USERADD = ["useradd", "--create-home", "--shell", "/bin/bash", "--user-group",
           "--comment", "lxcgpu user"]
FIRST_UID = 1000

# The container's Python (the template's Jupyter needs it too).  The key
# lines travel to KEYS_WRITER one argument each (public, and the kernel caps
# one argument at 128 KiB).
PYTHON = "/usr/bin/python3"

# Run inside the container as the user (uid and gid), with the home and the
# key lines as arguments.  Runs with -I: no environment, no user site.  It
# follows no link under the home: a non-directory at ~/.ssh (a link, to /etc
# or nowhere) is moved aside, and the new file is renamed over
# authorized_keys, which replaces a link there instead of writing through it.
# Being the user, it cannot write anything the user could not.
KEYS_WRITER = r"""
import os, stat, sys, time
home, text = sys.argv[1], "".join(k + "\n" for k in sys.argv[2:])
os.umask(0o077)
try:
    h = os.open(home, os.O_RDONLY | os.O_DIRECTORY)
    try:
        st = os.stat(".ssh", dir_fd=h, follow_symlinks=False)
    except FileNotFoundError:
        st = None
    if st is not None and not stat.S_ISDIR(st.st_mode):
        aside = ".ssh.moved-by-lxcgpu-%d" % time.time()
        os.rename(".ssh", aside, src_dir_fd=h, dst_dir_fd=h)
        print("moved ~/.ssh (not a directory) aside to ~/" + aside)
        st = None
    if st is None:
        os.mkdir(".ssh", 0o700, dir_fd=h)
    d = os.open(".ssh", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=h)
    os.fchmod(d, 0o700)
    tmp = ".authorized_keys.lxcgpu-%d" % os.getpid()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=d)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, "authorized_keys", src_dir_fd=d, dst_dir_fd=d)
except OSError as e:
    where = (" (" + e.filename + ")") if e.filename else ""
    sys.stderr.write(e.strerror + where + "\n")
    sys.exit(3)
"""


# Run inside the container as root, for a login that has neither an account
# nor a home there yet (a new user's first start): the whole provisioning in
# one exec instead of a dozen calls.  Arguments: the login, the hostname,
# the number of files, then path, octal mode and text of each (written to a
# new file renamed over the old one: a link there is replaced, never
# followed), then the key lines.  useradd makes the account; the keys are
# written by a child that has become the user, running KEYS_WRITER as such.
# Prints the account as "uid gid home".
NEW_ACCOUNT = (f"KEYS_WRITER_CODE = {KEYS_WRITER!r}\nUSERADD = {USERADD!r}\n"
               f"FIRST_UID = {FIRST_UID!r}\n") + r"""
import os, pwd, socket, subprocess, sys
login, hostname, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
files = [sys.argv[4 + 3 * i: 7 + 3 * i] for i in range(n)]
keys = sys.argv[4 + 3 * n:]
res = subprocess.run([*USERADD, "--", login],
                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
if res.returncode != 0:
    sys.stderr.write("useradd: " + res.stdout.strip()[-300:] + "\n")
    sys.exit(4)
pw = pwd.getpwnam(login)
if pw.pw_uid < FIRST_UID:
    sys.stderr.write("%s got the system uid %d\n" % (login, pw.pw_uid))
    sys.exit(5)
for path, mode, text in files:
    tmp = path + ".lxcgpu-new"
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, int(mode, 8))
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), int(mode, 8))
        f.write(text)
    os.rename(tmp, path)
socket.sethostname(hostname)
sys.stdout.flush()
pid = os.fork()
if pid == 0:
    try:
        os.setgroups([])
        os.setgid(pw.pw_gid)
        os.setuid(pw.pw_uid)
        sys.argv = ["-", pw.pw_dir, *keys]
        code = 0
        exec(KEYS_WRITER_CODE)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException as e:
        sys.stderr.write("%s\n" % e)
        code = 3
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
status = os.waitpid(pid, 0)[1]
if status != 0:
    sys.exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 3)
print(pw.pw_uid, pw.pw_gid, pw.pw_dir)
"""


class ProvisionError(LXDError):
    """The container cannot be provisioned as asked."""


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int
    home: str


def authorized_keys_text(keys: Iterable[str]) -> str:
    """The authorized_keys text for ``keys``.  Keys refused as too weak
    (stored before they were refused) are left out with a warning; any other
    invalid key raises ValueError."""
    lines = []
    for k in keys:
        try:
            n = normalize_public_key(k)
        except WeakKeyError as e:
            log.warning("leaving a key out of authorized_keys: %s", e)
            continue
        if n not in lines:
            lines.append(n)
    return "".join(f"{line}\n" for line in lines)


def parse_passwd(text: str) -> dict[str, Account]:
    out = {}
    for line in text.splitlines():
        f = line.split(":")
        if len(f) >= 7 and f[2].isdigit() and f[3].isdigit():
            out[f[0]] = Account(f[0], int(f[2]), int(f[3]), f[5])
    return out


def hosts_text(current: str, hostname: str) -> str:
    """``/etc/hosts`` with the 127.0.1.1 line naming ``hostname``."""
    lines = [ln for ln in current.splitlines() if not ln.startswith("127.0.1.1")]
    if not any(ln.startswith("127.0.0.1") for ln in lines):
        lines.insert(0, "127.0.0.1\tlocalhost")
    idx = next(i for i, ln in enumerate(lines) if ln.startswith("127.0.0.1")) + 1
    lines.insert(idx, f"127.0.1.1\t{hostname}")
    return "\n".join(lines) + "\n"


async def _read(lxd: LXD, name: str, path: str) -> str | None:
    """A file's text; None if it is missing or not a regular file (a link is
    replaced when written, never read through)."""
    entry = await lxd.file_entry(name, path)
    if entry is None or entry.type != "file":
        return None
    return entry.data.decode("utf-8", "replace")


async def _keys_in_place(lxd: LXD, name: str, acct: Account, keys_text: str) -> bool:
    """Whether ~/.ssh is a directory of the user's and authorized_keys a file
    of the user's, not writable by others, holding exactly ``keys_text``."""
    ssh = await lxd.file_entry(name, f"{acct.home}/.ssh")
    if ssh is None or ssh.type != "directory" or ssh.uid != acct.uid or ssh.mode & 0o022:
        return False
    ak = await lxd.file_entry(name, f"{acct.home}/.ssh/authorized_keys")
    return (ak is not None and ak.type == "file" and ak.uid == acct.uid
            and not ak.mode & 0o022 and ak.data == keys_text.encode())


async def _run_python(lxd: LXD, name: str, code: str, args: Sequence[str], *, what: str,
                      then: str, uid: int = 0, gid: int = 0) -> str:
    """Run ``code`` with the container's Python (isolated mode) as uid/gid;
    its output.  A failure is a ProvisionError: ``what`` failed, why (the
    code's last line of error, LXD's words, or a missing Python), ``then``."""
    argv = [PYTHON, "-I", "-c", code, *args]
    try:
        res = await lxd.execute(name, argv, user=uid, group=gid, timeout=60)
    except LXDError as e:
        # LXD reports an exit status of 127 as the failure "Command not found".
        if "Command not found" not in str(e):
            raise ProvisionError(f"{what}: {e}. {then}") from e
        res = None
    if res is None or res.returncode in (126, 127):
        raise ProvisionError(f"{what}: {PYTHON} is missing or broken there (reinstall it "
                             f"with `sudo apt-get install python3` in the container). {then}")
    if res.returncode != 0:
        reason = (res.stderr or res.stdout).strip().splitlines()
        raise ProvisionError(f"{what}: {reason[-1][:300] if reason else f'exit {res.returncode}'}"
                             f". {then}")
    return res.stdout


async def write_keys(lxd: LXD, name: str, acct: Account, keys_text: str) -> None:
    """Write ``~/.ssh/authorized_keys`` as the user (KEYS_WRITER); a failure
    is a ProvisionError that names the container and says why."""
    out = await _run_python(
        lxd, name, KEYS_WRITER, [acct.home, *keys_text.splitlines()], uid=acct.uid,
        gid=acct.gid, what=f"The SSH keys of {acct.name} could not be written in container {name}",
        then="They stay in lxcgpu's store and are pushed again at the next start.")
    if out.strip():
        log.warning("%s: %s", name, out.strip()[:300])


async def _own_fresh_home(lxd: LXD, name: str, acct: Account) -> None:
    """Give an empty home that root owns (a new volume) to the user, then
    copy /etc/skel into it as the user (nothing of theirs is there yet)."""
    argv = ["chown", "--no-dereference", f"{acct.uid}:{acct.gid}", "--", acct.home]
    (await lxd.execute(name, argv)).check(argv)
    argv = ["chmod", "0750", "--", acct.home]
    (await lxd.execute(name, argv)).check(argv)
    argv = ["cp", "-r", "--no-clobber", "--", "/etc/skel/.", f"{acct.home}/"]
    (await lxd.execute(name, argv, user=acct.uid, group=acct.gid)).check(argv)


async def ensure_account(lxd: LXD, name: str, login: str, *,
                         passwd: str | None = None) -> tuple[Account, bool]:
    """The login account inside (checked by :func:`provision`), created if
    missing; (account, created).  ``passwd``: the container's /etc/passwd,
    read just now."""
    if passwd is None:
        passwd = await _read(lxd, name, "/etc/passwd")
    accounts = parse_passwd(passwd or "")
    acct = accounts.get(login)
    if acct is None:
        argv = list(USERADD)
        # A home that is already there (its own volume, kept through a
        # rebuild) keeps its owner: the account takes that uid.
        home = await lxd.file_entry(name, f"/home/{login}")
        fresh_home = home is not None and home.type == "directory" and home.uid == 0
        if home is not None and home.type == "directory" and home.uid >= FIRST_UID \
                and str(home.uid) not in {str(a.uid) for a in accounts.values()}:
            argv += ["--uid", str(home.uid)]
        argv += ["--", login]
        (await lxd.execute(name, argv)).check(argv)
        accounts = parse_passwd(await _read(lxd, name, "/etc/passwd") or "")
        acct = accounts.get(login)
        if acct is None:
            raise ProvisionError(f"useradd {login} succeeded but the account is missing")
        if fresh_home:
            # A new, empty home volume (root's 0711): the user's, with the skeleton.
            await _own_fresh_home(lxd, name, acct)
        created = True
    else:
        created = False
    if acct.uid < FIRST_UID:
        raise ProvisionError(f"{login} is a system account (uid {acct.uid}) in {name}")
    return acct, created


def _sudoers(login: str) -> str:
    return f"# managed by lxcgpu\n{login} ALL=(ALL:ALL) NOPASSWD: ALL\n"


async def _new_account(lxd: LXD, name: str, login: str, keys_text: str, hostname: str,
                       hosts: str) -> Account:
    """Provision a login that has neither account nor home in the container
    yet, in one exec (NEW_ACCOUNT); a failure is a ProvisionError that says
    what failed."""
    files = [(SUDOERS_PATH, "440", _sudoers(login)), ("/etc/hostname", "644", f"{hostname}\n"),
             ("/etc/hosts", "644", hosts_text(hosts, hostname))]
    what = f"The account of {login} could not be made in container {name}"
    said = await _run_python(
        lxd, name, NEW_ACCOUNT, [login, hostname, str(len(files)),
                                 *(x for f in files for x in f), *keys_text.splitlines()],
        what=what, then="It is tried again at the next start.")
    out = said.strip().splitlines()
    for line in out[:-1]:
        log.warning("%s: %s", name, line[:300])
    try:
        uid, gid, home = out[-1].split(" ", 2)
        return Account(login, int(uid), int(gid), home)
    except (IndexError, ValueError):
        raise ProvisionError(f"{what}: it said {said.strip()[-200:]!r}") from None


async def provision(lxd: LXD, name: str, *, login: str, keys: Sequence[str],
                    hostname: str) -> Account:
    """Make the container ready for ``login``: account, passwordless sudo,
    exactly ``keys`` in ``~/.ssh/authorized_keys``, and ``hostname``.

    A login with neither account nor home there yet (a new user's first
    start) is provisioned in one exec; otherwise each part is read first
    (concurrently) and written only where it differs.  Idempotent; invalid
    keys raise ValueError before anything is written."""
    keys_text = authorized_keys_text(keys)
    if not naming.is_valid_lxd_name(hostname):
        raise ValueError(f"invalid hostname {hostname!r}")
    if not naming.is_valid_posix_name(login) or login in naming.RESERVED_POSIX:
        raise ProvisionError(f"refusing to provision login {login!r}")
    passwd, home, hosts, current_hostname, sudoers = await asyncio.gather(
        _read(lxd, name, "/etc/passwd"), lxd.file_entry(name, f"/home/{login}"),
        _read(lxd, name, "/etc/hosts"), _read(lxd, name, "/etc/hostname"),
        _read(lxd, name, SUDOERS_PATH))
    if login not in parse_passwd(passwd or "") and home is None:
        return await _new_account(lxd, name, login, keys_text, hostname, hosts or "")

    acct, _ = await ensure_account(lxd, name, login, passwd=passwd)

    if sudoers != _sudoers(login):
        await lxd.put_file(name, SUDOERS_PATH, _sudoers(login), mode=0o440)

    if not await _keys_in_place(lxd, name, acct, keys_text):
        await write_keys(lxd, name, acct, keys_text)

    if (current_hostname or "").strip() != hostname:
        await lxd.put_file(name, "/etc/hostname", f"{hostname}\n")
        await lxd.put_file(name, "/etc/hosts", hosts_text(hosts or "", hostname))
        argv = ["hostname", "--", hostname]
        (await lxd.execute(name, argv)).check(argv)
    return acct
