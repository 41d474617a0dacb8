#!/usr/bin/env python3
"""A throwaway OpenLDAP directory for the lxcgpu quickstart and test suite.

Built from nothing in one state directory: a private CA and a server
certificate, a ``cn=config`` loaded offline with ``slapadd``, and a small
directory under ``dc=lxcgpu,dc=lab`` with three users (alice, bob, carol) and
two groups (``gpu-users``: all three, ``gpu-admins``: carol).  slapd listens on
loopback only and requires StartTLS (``olcSecurity: tls=1``).

Standard library only, so it runs with the system ``python3`` as well as from
the project's virtualenv; the test suite imports it as ``demo_ldap``.

Command line::

    python3 setup/demo_ldap.py start|stop|status [--dir DIR] [--port PORT]
    python3 setup/demo_ldap.py add-user NAME [--groups gpu-users,gpu-admins]
    python3 setup/demo_ldap.py set-password NAME

Passwords are read from a prompt or from standard input, never from argv, and
never handed to an LDAP tool on its command line (``-y``/``-T`` files only).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import getpass
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The CA and certificate recipe is shared with the hub's HTTPS (hub_config/tls.py,
# standard library only too).
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))
from hub_config.tls import make_certificates  # noqa: E402

DEFAULT_DIR = "/var/lib/lxcgpu/ldap"
DEFAULT_PORT = 10389
BASE_DN = "dc=lxcgpu,dc=lab"
PEOPLE_DN = "ou=people," + BASE_DN
GROUPS_DN = "ou=groups," + BASE_DN
ADMIN_DN = "cn=admin," + BASE_DN
MAIL_DOMAIN = "lxcgpu.lab"
USERS_GROUP = "gpu-users"
ADMINS_GROUP = "gpu-admins"
GROUP_DESCRIPTIONS = {
    USERS_GROUP: "May log in to lxcgpu",
    ADMINS_GROUP: "lxcgpu administrators",
}
# (name, given name, surname, uidNumber, groups)
DEMO_USERS = (
    ("alice", "Alice", "Demo", 10001, (USERS_GROUP,)),
    ("bob", "Bob", "Demo", 10002, (USERS_GROUP,)),
    ("carol", "Carol", "Demo", 10003, (USERS_GROUP, ADMINS_GROUP)),
)
FIRST_UID_NUMBER = 10001
USERNAME_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")

MODULE_PATH = "/usr/lib/ldap"
SCHEMA_DIR = "/etc/ldap/schema"
SCHEMAS = ("core", "cosine", "nis", "inetorgperson")
# sbin is not on every user's PATH, but slapd and slapadd live there.
TOOL_PATH = os.pathsep.join(
    [os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"]
)
TOOL_PACKAGES = {
    "slapd": "slapd",
    "slapadd": "slapd",
    "slappasswd": "slapd",
    "ldapwhoami": "ldap-utils",
    "ldapsearch": "ldap-utils",
    "ldapmodify": "ldap-utils",
    "ldapdelete": "ldap-utils",
    "openssl": "openssl",
}
TOOL_TIMEOUT = 30  # seconds, for every external command
PASSWORD_ALPHABET = string.ascii_letters + string.digits

class DemoLDAPError(RuntimeError):
    """The demo directory could not be built, started, stopped or changed."""


class MissingToolError(DemoLDAPError):
    """slapd, ldap-utils or openssl is not installed."""


# --- pure helpers --------------------------------------------------------


def find_tool(name: str, path: str = TOOL_PATH) -> str:
    """Return the absolute path of an external tool, or raise MissingToolError."""
    found = shutil.which(name, path=path)
    if found is None:
        package = TOOL_PACKAGES.get(name, name)
        raise MissingToolError(
            f"{name} not found: run setup/quickstart, or install it with "
            f"`apt-get install slapd ldap-utils openssl` (it comes in {package})"
        )
    return found


def validate_username(name: object) -> str:
    """Return ``name`` if it is a POSIX-ish user name, else raise ValueError."""
    if not isinstance(name, str) or not USERNAME_RE.fullmatch(name):
        raise ValueError(
            f"invalid user name {name!r}: use 1-32 characters, lower-case letters, "
            "digits, '_' or '-', starting with a letter or '_'"
        )
    return name


def validate_group_name(name: object) -> str:
    """Return ``name`` if it is a valid group name (same rule as user names)."""
    if not isinstance(name, str) or not USERNAME_RE.fullmatch(name):
        raise ValueError(f"invalid group name {name!r}")
    return name


def validate_password(password: object) -> str:
    """Return ``password`` if it can be stored, else raise ValueError.

    Blank passwords are refused (LDAP treats an empty simple bind as
    anonymous), and so are line breaks and NUL, which the one-line-per-user
    passwords file cannot hold.
    """
    if not isinstance(password, str) or not password.strip():
        raise ValueError("password must not be blank")
    if any(c in password for c in "\r\n\0"):
        raise ValueError("password must not contain line breaks or NUL")
    return password


def escape_dn_value(value: str) -> str:
    """Escape an attribute value for use in a DN string (RFC 4514, 2.4)."""
    out = []
    for i, char in enumerate(value):
        if char in '\\,+"<>;=':
            out.append("\\" + char)
        elif char == "\0":
            out.append("\\00")
        elif char == " " and (i == 0 or i == len(value) - 1):
            out.append("\\ ")
        elif char == "#" and i == 0:
            out.append("\\#")
        else:
            out.append(char)
    return "".join(out)


def user_dn(name: str) -> str:
    """DN of a user entry (the name must already be valid)."""
    return f"uid={escape_dn_value(name)},{PEOPLE_DN}"


def group_dn(name: str) -> str:
    """DN of a group entry."""
    return f"cn={escape_dn_value(name)},{GROUPS_DN}"


def _is_safe_ldif_string(value: str) -> bool:
    # RFC 2849 SAFE-STRING; values ending in a space are base64 too, as the
    # RFC recommends, so no tool strips them.
    if not value:
        return True
    if value[0] in " :<" or value[-1] == " ":
        return False
    return all(0 < ord(c) < 128 and c not in "\r\n" for c in value)


def ldif_line(attribute: str, value: str) -> str:
    """One ``attribute: value`` LDIF line, base64-encoded when it must be."""
    if _is_safe_ldif_string(value):
        return f"{attribute}: {value}"
    encoded = base64.b64encode(value.encode("utf-8")).decode("ascii")
    return f"{attribute}:: {encoded}"


def ldif_record(dn: str, lines: list[tuple[str, str]]) -> str:
    """An LDIF record: the dn line, then one line per (attribute, value)."""
    return "\n".join([ldif_line("dn", dn)] + [ldif_line(a, v) for a, v in lines]) + "\n"


def user_attributes(
    name: str,
    uid_number: int,
    password_hash: str,
    given_name: str,
    surname: str,
    mail: str,
) -> list[tuple[str, str]]:
    """The attributes of an inetOrgPerson + posixAccount user entry."""
    return [
        ("objectClass", "inetOrgPerson"),
        ("objectClass", "posixAccount"),
        ("uid", name),
        ("cn", f"{given_name} {surname}"),
        ("givenName", given_name),
        ("sn", surname),
        ("mail", mail),
        ("uidNumber", str(uid_number)),
        # User-private group convention: the primary gid equals the uid.
        ("gidNumber", str(uid_number)),
        ("homeDirectory", f"/home/{name}"),
        ("loginShell", "/bin/bash"),
        ("userPassword", password_hash),
    ]


def config_ldif(
    *,
    data_dir: str,
    ca_file: str,
    cert_file: str,
    key_file: str,
    root_pw_hash: str,
) -> str:
    """The ``cn=config`` LDIF for ``slapadd -n0``."""
    includes = "".join(
        f"include: file://{SCHEMA_DIR}/{schema}.ldif\n\n" for schema in SCHEMAS
    )
    return f"""\
dn: cn=config
objectClass: olcGlobal
cn: config
olcLogLevel: none
olcTLSCACertificateFile: {ca_file}
olcTLSCertificateFile: {cert_file}
olcTLSCertificateKeyFile: {key_file}
olcSecurity: tls=1

dn: cn=module{{0}},cn=config
objectClass: olcModuleList
cn: module{{0}}
olcModulePath: {MODULE_PATH}
olcModuleLoad: back_mdb

dn: cn=schema,cn=config
objectClass: olcSchemaConfig
cn: schema

{includes}dn: olcDatabase={{-1}}frontend,cn=config
objectClass: olcDatabaseConfig
objectClass: olcFrontendConfig
olcDatabase: {{-1}}frontend
olcAccess: {{0}}to dn.base="" by * read
olcAccess: {{1}}to dn.base="cn=Subschema" by * read

dn: olcDatabase={{0}}config,cn=config
objectClass: olcDatabaseConfig
olcDatabase: {{0}}config
olcAccess: {{0}}to * by * none

dn: olcDatabase={{1}}mdb,cn=config
objectClass: olcDatabaseConfig
objectClass: olcMdbConfig
olcDatabase: {{1}}mdb
olcDbDirectory: {data_dir}
olcDbMaxSize: 268435456
olcSuffix: {BASE_DN}
olcRootDN: {ADMIN_DN}
olcRootPW: {root_pw_hash}
olcDbIndex: objectClass eq
olcDbIndex: uid,uidNumber eq
olcDbIndex: member eq
olcAccess: {{0}}to attrs=userPassword by self write by anonymous auth by * none
olcAccess: {{1}}to * by users read
"""


def data_ldif(password_hashes: dict[str, str]) -> str:
    """The demo directory's entries for ``slapadd -n1``.

    ``password_hashes`` maps each demo user to an ``{SSHA}`` hash.
    """
    records = [
        ldif_record(
            BASE_DN,
            [
                ("objectClass", "dcObject"),
                ("objectClass", "organization"),
                ("dc", "lxcgpu"),
                ("o", "lxcgpu demo lab"),
            ],
        ),
        ldif_record(PEOPLE_DN, [("objectClass", "organizationalUnit"), ("ou", "people")]),
        ldif_record(GROUPS_DN, [("objectClass", "organizationalUnit"), ("ou", "groups")]),
    ]
    for name, given, surname, uid_number, _groups in DEMO_USERS:
        records.append(
            ldif_record(
                user_dn(name),
                user_attributes(
                    name,
                    uid_number,
                    password_hashes[name],
                    given,
                    surname,
                    f"{name}@{MAIL_DOMAIN}",
                ),
            )
        )
    for group, description in GROUP_DESCRIPTIONS.items():
        members = [user_dn(u[0]) for u in DEMO_USERS if group in u[4]]
        records.append(
            ldif_record(
                group_dn(group),
                [("objectClass", "groupOfNames"), ("cn", group), ("description", description)]
                + [("member", m) for m in members],
            )
        )
    return "\n".join(records)


def parse_passwords(text: str) -> dict[str, str]:
    """Parse the passwords file: one ``user password`` line per user."""
    passwords = {}
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, _, password = line.partition(" ")
        passwords[name] = password
    return passwords


def format_passwords(passwords: dict[str, str]) -> str:
    """The passwords file's text for a users -> passwords mapping."""
    return "".join(f"{name} {password}\n" for name, password in passwords.items())


def parse_ldif_entries(text: str) -> list[dict[str, list[str]]]:
    """Parse unwrapped ``ldapsearch -LLL`` output into attribute dicts.

    Attribute names are lower-cased; the DN is under ``"dn"``.
    """
    entries: list[dict[str, list[str]]] = []
    current: dict[str, list[str]] = {}
    for line in text.splitlines() + [""]:
        if not line:
            if current:
                entries.append(current)
            current = {}
            continue
        if line.startswith("#"):
            continue
        attribute, _, value = line.partition(":")
        if value.startswith(":"):
            value = base64.b64decode(value[1:].strip()).decode("utf-8")
        else:
            value = value[1:] if value.startswith(" ") else value
        current.setdefault(attribute.lower(), []).append(value)
    return entries


def generate_password(length: int = 16) -> str:
    """A random password of letters and digits."""
    return "".join(secrets.choice(PASSWORD_ALPHABET) for _ in range(length))


def _write_private(path: Path, text: str) -> None:
    """Write a root-only (0600) file atomically."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _process_argv(pid: int) -> list[str] | None:
    """argv of a live (non-zombie) process, or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The state is the first field after the parenthesised command name.
    if stat.rpartition(")")[2].split()[0] in ("Z", "X"):
        return None
    return [a.decode(errors="replace") for a in cmdline.split(b"\0") if a]


# --- the directory -------------------------------------------------------


class DemoDirectory:
    """A demo OpenLDAP directory kept in ``state_dir`` and served on loopback.

    ``port=None`` means the port last used in this state directory, or
    10389.  Nothing happens until :meth:`start` (or :meth:`build`).
    """

    base_dn = BASE_DN
    people_dn = PEOPLE_DN
    groups_dn = GROUPS_DN
    admin_dn = ADMIN_DN
    users_group_dn = group_dn(USERS_GROUP)
    admins_group_dn = group_dn(ADMINS_GROUP)
    bind_dn_template = "uid={username}," + PEOPLE_DN

    def __init__(self, state_dir=DEFAULT_DIR, port: int | None = None, host: str = "127.0.0.1"):
        if not ipaddress.ip_address(host).is_loopback:
            raise ValueError(f"host must be a loopback address, not {host!r}")
        self.state_dir = Path(os.path.abspath(state_dir))
        self.host = host
        self.ca_file = self.state_dir / "ca.crt"
        self.cert_file = self.state_dir / "server.crt"
        self.key_file = self.state_dir / "server.key"
        self.slapd_d = self.state_dir / "slapd.d"
        self.data_dir = self.state_dir / "data"
        self.passwords_file = self.state_dir / "passwords"
        self.admin_password_file = self.state_dir / "admin-password"
        self.pid_file = self.state_dir / "slapd.pid"
        self.log_file = self.state_dir / "slapd.log"
        self._port_file = self.state_dir / "port"
        self._built_marker = self.state_dir / "built"
        self._lock_file = self.state_dir / ".lock"
        if port is None:
            try:
                port = int(self._port_file.read_text())
            except (FileNotFoundError, ValueError):
                port = DEFAULT_PORT
        if not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError(f"invalid port {port!r}")
        self.port = port
        self.uri = f"ldap://{host}:{port}"
        self._proc: subprocess.Popen | None = None
        self._lock_depth = 0
        self._lock_fd: int | None = None

    def __repr__(self):
        return f"DemoDirectory({str(self.state_dir)!r}, port={self.port})"

    # -- what a client needs --

    @property
    def passwords(self) -> dict[str, str]:
        """Users -> passwords, from the root-only passwords file."""
        return parse_passwords(self.passwords_file.read_text())

    @property
    def admin_password(self) -> str:
        """The rootDN's password."""
        return self.admin_password_file.read_text()

    @staticmethod
    def user_dn(name: str) -> str:
        """DN of a user of this directory."""
        return user_dn(validate_username(name))

    @staticmethod
    def group_dn(name: str) -> str:
        """DN of a group of this directory."""
        return group_dn(validate_group_name(name))

    def ldap_authenticator_config(self) -> dict:
        """Settings for ``LDAPAuthenticator`` (jupyterhub-ldapauthenticator 2.x).

        ``localhost`` rather than the IP: ldap3 checks the certificate's DNS
        name, and on Python >= 3.12 an IP address fails its hostname check.
        """
        return {
            "server_address": "localhost",
            "server_port": self.port,
            "tls_strategy": "before_bind",
            "tls_kwargs": {"ca_certs_file": str(self.ca_file), "validate": 2},  # ssl.CERT_REQUIRED
            "bind_dn_template": [self.bind_dn_template],
            "allowed_groups": [self.users_group_dn, self.admins_group_dn],
        }

    # -- locking --

    @contextlib.contextmanager
    def _locked(self):
        """Serialise build/start/stop/changes across processes (re-entrant)."""
        if self._lock_depth == 0:
            self.state_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
            self._lock_fd = os.open(self._lock_file, os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        self._lock_depth += 1
        try:
            yield
        finally:
            self._lock_depth -= 1
            if self._lock_depth == 0:
                os.close(self._lock_fd)
                self._lock_fd = None

    # -- external commands --

    def _run(self, argv: list[str], *, input: str | None = None, env=None) -> str:
        """Run a command (argv list, never a shell); return stdout or raise."""
        try:
            result = subprocess.run(
                argv,
                input=input,
                capture_output=True,
                text=True,
                cwd=self.state_dir,
                env=env,
                umask=0o077,
                timeout=TOOL_TIMEOUT,
            )
        except subprocess.TimeoutExpired as e:
            raise DemoLDAPError(f"{Path(argv[0]).name} timed out after {e.timeout} s") from None
        if result.returncode != 0:
            detail = (result.stderr or result.stdout).strip()
            raise DemoLDAPError(
                f"{Path(argv[0]).name} failed (exit {result.returncode}): {detail}"
            )
        return result.stdout

    def _ldap_env(self) -> dict[str, str]:
        # Drop inherited LDAP* settings (an LDAPURI or LDAPBINDDN from the
        # caller's environment must not redirect us) and trust only our CA.
        env = {k: v for k, v in os.environ.items() if not k.startswith("LDAP")}
        # HOME too: ~/.ldaprc could set a BINDDN for our anonymous checks.
        env["HOME"] = str(self.state_dir)
        env["LDAPTLS_CACERT"] = str(self.ca_file)
        env["LDAPTLS_REQCERT"] = "demand"
        return env

    def _ldap(self, tool: str, args: list[str], *, input: str | None = None) -> str:
        """Run an ldap-utils tool over StartTLS, bound as the rootDN."""
        argv = [
            find_tool(tool), "-x", "-ZZ", "-H", self.uri, "-o", "nettimeout=5",
            "-D", self.admin_dn, "-y", str(self.admin_password_file), *args,
        ]  # fmt: skip
        return self._run(argv, input=input, env=self._ldap_env())

    def _search(self, base: str, filter: str, *attributes: str, scope: str = "sub"):
        out = self._ldap(
            "ldapsearch",
            ["-LLL", "-o", "ldif-wrap=no", "-s", scope, "-b", base, "--", filter, *attributes],
        )
        return parse_ldif_entries(out)

    def _hash_password(self, password: str) -> str:
        """``{SSHA}`` hash from slappasswd, the secret passed in a 0600 file."""
        fd, tmp = tempfile.mkstemp(dir=self.state_dir, prefix=".secret.")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(password)  # -T hashes the file's exact contents
            out = self._run([find_tool("slappasswd"), "-h", "{SSHA}", "-T", tmp])
        finally:
            os.unlink(tmp)
        return out.strip()

    # -- build --

    def is_built(self) -> bool:
        """True once the certificates, config and data are complete."""
        return self._built_marker.exists()

    def build(self) -> bool:
        """Create everything in the state directory unless it is complete.

        Returns True if the passwords file was created now (so the caller can
        show the passwords once), False if it already existed.
        """
        with self._locked():
            if self.is_built():
                return False
            for tool in ("openssl", "slapadd", "slappasswd", "slapd"):
                find_tool(tool)
            # World-readable directory so a hub not running as root can read
            # ca.crt; every secret is its own 0600 file or in a 0700 folder.
            os.chmod(self.state_dir, 0o755)
            # A build that was interrupted is redone from scratch; existing
            # passwords are kept, since they may have been shown already.
            for path in (self.slapd_d, self.data_dir):
                shutil.rmtree(path, ignore_errors=True)

            created = False
            passwords = parse_passwords(
                self.passwords_file.read_text() if self.passwords_file.exists() else ""
            )
            for name, *_ in DEMO_USERS:
                if name not in passwords:
                    passwords[name] = generate_password()
                    created = True
            if created:
                _write_private(self.passwords_file, format_passwords(passwords))
            if not self.admin_password_file.exists():
                # No trailing newline: ldap tools' -y reads the whole file.
                _write_private(self.admin_password_file, generate_password(24))

            self._make_certificates()
            self.slapd_d.mkdir(mode=0o700)
            self.data_dir.mkdir(mode=0o700)
            config = config_ldif(
                data_dir=str(self.data_dir),
                ca_file=str(self.ca_file),
                cert_file=str(self.cert_file),
                key_file=str(self.key_file),
                root_pw_hash=self._hash_password(self.admin_password),
            )
            slapadd = find_tool("slapadd")
            self._run([slapadd, "-n0", "-F", str(self.slapd_d)], input=config)
            hashes = {name: self._hash_password(passwords[name]) for name, *_ in DEMO_USERS}
            self._run([slapadd, "-n1", "-q", "-F", str(self.slapd_d)], input=data_ldif(hashes))
            self._built_marker.write_text("")
            return created

    def _make_certificates(self) -> None:
        san = "DNS:localhost, IP:127.0.0.1"
        if self.host != "127.0.0.1":
            san += f", IP:{self.host}"
        make_certificates(
            openssl=find_tool("openssl"), workdir=self.state_dir, ca_file=self.ca_file,
            cert_file=self.cert_file, key_file=self.key_file,
            ca_subject="/O=lxcgpu demo/CN=lxcgpu demo CA", subject="/O=lxcgpu demo/CN=localhost",
            san=san, run=self._run)
        os.chmod(self.ca_file, 0o644)
        os.chmod(self.cert_file, 0o644)

    # -- process --

    def _slapd_argv(self) -> list[str]:
        # -d keeps slapd in the foreground; level "none" (not 0) still logs
        # start, stop and fatal errors such as a port in use, but no traffic.
        return [find_tool("slapd"), "-h", self.uri + "/", "-F", str(self.slapd_d), "-d", "none"]

    def _find_slapd(self) -> tuple[int, list[str]] | None:
        """(pid, argv) of the slapd serving this state directory, if any."""

        def ours(argv):
            return (
                argv
                and Path(argv[0]).name == "slapd"
                and "-F" in argv
                and str(self.slapd_d) in argv
            )

        with contextlib.suppress(FileNotFoundError, ValueError):
            pid = int(self.pid_file.read_text())
            argv = _process_argv(pid)
            if ours(argv):
                return pid, argv
        # The pid file can be stale or gone while slapd still runs.
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                argv = _process_argv(int(entry.name))
                if ours(argv):
                    return int(entry.name), argv
        return None

    @property
    def pid(self) -> int | None:
        """pid of the running slapd, or None."""
        found = self._find_slapd()
        return found[0] if found else None

    def answers(self, timeout: float = 3.0) -> bool:
        """True if slapd answers an anonymous whoami over StartTLS."""
        argv = [find_tool("ldapwhoami"), "-x", "-ZZ", "-H", self.uri, "-o", "nettimeout=2"]
        try:
            result = subprocess.run(
                argv, capture_output=True, env=self._ldap_env(), timeout=timeout, cwd="/"
            )
        except subprocess.TimeoutExpired:
            return False
        return result.returncode == 0

    def _log_tail(self, offset: int = 0, limit: int = 3000) -> str:
        try:
            with open(self.log_file, "rb") as f:
                f.seek(max(offset, f.seek(0, os.SEEK_END) - limit))
                return f.read().decode(errors="replace").strip()
        except FileNotFoundError:
            return ""

    def wait_ready(self, timeout: float = 15.0, proc: subprocess.Popen | None = None) -> float:
        """Wait until slapd answers; return the seconds it took.

        Retries ``ldapwhoami -ZZ`` with exponential backoff; gives up early if
        ``proc`` exits.
        """
        started = time.monotonic()
        delay = 0.01
        while True:
            if proc is not None and proc.poll() is not None:
                raise DemoLDAPError(f"slapd exited with status {proc.returncode}")
            # Short tries: a port taken by something else may accept and
            # never answer, and slapd's exit must be noticed promptly.
            if self.answers(timeout=1.0):
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                raise DemoLDAPError(f"slapd did not answer on {self.uri} within {timeout} s")
            time.sleep(delay)
            delay = min(delay * 2, 0.5)

    def start(self, owned: bool = False, timeout: float = 15.0) -> bool:
        """Build if needed and start slapd; do nothing if it already answers.

        ``owned=False`` detaches slapd into its own session (it outlives the
        caller, as a service); ``owned=True`` keeps it in the caller's process
        group, for a test fixture that stops it at teardown.  Either way this
        object keeps the process handle and :meth:`stop` reaps it.

        Returns True if slapd was started now, False if it was already running.
        """
        with self._locked():
            self.build()
            found = self._find_slapd()
            if found:
                pid, argv = found
                if self.uri + "/" not in argv:
                    raise DemoLDAPError(
                        f"slapd for {self.state_dir} already runs as pid {pid} on another "
                        f"address ({' '.join(argv)}); stop it first"
                    )
                self.wait_ready(timeout)
                return False

            log_offset = self.log_file.stat().st_size if self.log_file.exists() else 0
            with open(self.log_file, "ab") as log:
                os.chmod(self.log_file, 0o600)
                proc = subprocess.Popen(
                    self._slapd_argv(),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.state_dir,
                    start_new_session=not owned,
                )
            self._proc = proc
            _write_private(self.pid_file, f"{proc.pid}\n")
            try:
                self.wait_ready(timeout, proc)
            except DemoLDAPError as e:
                self._stop()
                tail = self._log_tail(log_offset) or "(empty)"
                if "errno=98" in tail:
                    e = DemoLDAPError(f"{e}: port {self.port} is in use, choose another (--port)")
                raise DemoLDAPError(f"{e}\n--- {self.log_file} ---\n{tail}") from None
            _write_private(self._port_file, f"{self.port}\n")
            return True

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop slapd: SIGTERM, then SIGKILL after ``timeout`` seconds.

        Returns True if a running slapd was stopped, False if none was running.
        """
        with self._locked():
            return self._stop(timeout)

    def _stop(self, timeout: float = 10.0) -> bool:
        found = self._find_slapd()
        proc, self._proc = self._proc, None
        stopped = False
        if proc is not None and found is not None and found[0] == proc.pid:
            stopped = True
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        elif found is not None:
            # Started by another process (the CLI): not our child to wait for.
            stopped = True
            pid = found[0]
            for sig in (signal.SIGTERM, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
                deadline = time.monotonic() + timeout
                while _process_argv(pid) is not None and time.monotonic() < deadline:
                    time.sleep(0.02)
                if _process_argv(pid) is None:
                    break
            else:
                raise DemoLDAPError(f"slapd (pid {pid}) survived SIGKILL")
        if proc is not None:
            proc.poll()  # reap it if it had already exited
        with contextlib.suppress(FileNotFoundError):
            self.pid_file.unlink()
        return stopped

    def status(self) -> dict:
        """Whether slapd runs (and answers), its pid, port and URI."""
        found = self._find_slapd()
        running = found is not None
        return {
            "running": running,
            "answering": running and self.answers(),
            "pid": found[0] if found else None,
            "port": self.port,
            "uri": self.uri,
            "state_dir": str(self.state_dir),
            "built": self.is_built(),
        }

    def __enter__(self):
        self.start(owned=True)
        return self

    def __exit__(self, *exc_info):
        self.stop()

    # -- changes to a running directory --

    def _require_running(self) -> None:
        if not self.answers():
            raise DemoLDAPError(
                f"the demo directory is not answering on {self.uri}: start it first"
            )

    def _record_password(self, name: str, password: str) -> None:
        passwords = self.passwords
        passwords[name] = password
        _write_private(self.passwords_file, format_passwords(passwords))

    def add_user(
        self,
        name: str,
        password: str,
        groups=(USERS_GROUP,),
        *,
        given_name: str | None = None,
        surname: str | None = None,
        mail: str | None = None,
    ) -> dict:
        """Add a user (and add them to ``groups``) in the running directory.

        The password is also recorded in the passwords file.  Bad input raises
        ValueError before anything changes.  Returns the new entry's ``dn``
        and ``uidNumber``.
        """
        validate_username(name)
        validate_password(password)
        if isinstance(groups, str):
            raise ValueError("groups must be a list of group names, not a string")
        groups = list(dict.fromkeys(validate_group_name(g) for g in groups))
        given_name = name if given_name is None else given_name
        surname = name if surname is None else surname
        mail = f"{name}@{MAIL_DOMAIN}" if mail is None else mail
        for label, value in (("given name", given_name), ("surname", surname)):
            if not value.strip() or any(ord(c) < 32 for c in value):
                raise ValueError(f"invalid {label} {value!r}")
        if not re.fullmatch(r"[\x21-\x7e]+@[\x21-\x7e]+", mail):
            raise ValueError(f"invalid mail address {mail!r}")

        with self._locked():
            self._require_running()
            users = self._search(self.base_dn, "(objectClass=posixAccount)", "uid", "uidNumber")
            if any(name in entry.get("uid", []) for entry in users):
                raise ValueError(f"user {name!r} already exists")
            existing = {
                entry["cn"][0]: {m.lower() for m in entry.get("member", [])}
                for entry in self._search(
                    self.groups_dn, "(objectClass=groupOfNames)", "cn", "member"
                )
            }
            unknown = [g for g in groups if g not in existing]
            if unknown:
                raise ValueError(
                    f"unknown group(s) {', '.join(unknown)}; "
                    f"existing: {', '.join(sorted(existing))}"
                )
            numbers = [int(n) for entry in users for n in entry.get("uidnumber", [])]
            uid_number = max([FIRST_UID_NUMBER - 1] + numbers) + 1

            dn = user_dn(name)
            # A group may still list this DN from a user deleted by hand.
            groups = [g for g in groups if dn.lower() not in existing[g]]
            attributes = user_attributes(
                name, uid_number, self._hash_password(password), given_name, surname, mail
            )
            changes = [ldif_record(dn, [("changetype", "add")] + attributes)] + [
                self._member_change(group, "add", dn) for group in groups
            ]
            try:
                self._ldap("ldapmodify", [], input="\n".join(changes))
            except DemoLDAPError:
                # ldapmodify stops at the first failure: undo what it did.
                for group in groups:
                    with contextlib.suppress(DemoLDAPError):
                        self._ldap("ldapmodify", [], input=self._member_change(group, "delete", dn))
                with contextlib.suppress(DemoLDAPError):
                    self._ldap("ldapdelete", ["--", dn])
                raise
            self._record_password(name, password)
            return {"dn": dn, "uidNumber": uid_number}

    @staticmethod
    def _member_change(group: str, operation: str, member: str) -> str:
        return (
            ldif_record(
                group_dn(group),
                [("changetype", "modify"), (operation, "member"), ("member", member)],
            )
            + "-\n"
        )

    def set_password(self, name: str, password: str) -> None:
        """Replace an existing user's password (and record it)."""
        validate_username(name)
        validate_password(password)
        with self._locked():
            self._require_running()
            dn = user_dn(name)
            if not self._search(self.people_dn, f"(uid={name})", "uid", scope="one"):
                raise ValueError(f"no such user {name!r}")
            change = ldif_record(
                dn,
                [
                    ("changetype", "modify"),
                    ("replace", "userPassword"),
                    ("userPassword", self._hash_password(password)),
                ],
            )
            self._ldap("ldapmodify", [], input=change + "-\n")
            self._record_password(name, password)


# --- command line --------------------------------------------------------


def _read_new_password(name: str) -> str:
    """From a prompt (asked twice) on a terminal, else one line of stdin."""
    if sys.stdin.isatty():
        first = getpass.getpass(f"New password for {name}: ")
        if getpass.getpass("Again: ") != first:
            raise ValueError("the passwords do not match")
        return first
    return sys.stdin.readline().rstrip("\r\n")


def main(argv: list[str] | None = None) -> int:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--dir", default=DEFAULT_DIR, help=f"state directory (default {DEFAULT_DIR})"
    )
    common.add_argument(
        "--port",
        type=int,
        default=None,
        help=f"port on 127.0.0.1 (default: the last one used, else {DEFAULT_PORT})",
    )
    parser = argparse.ArgumentParser(
        description="The lxcgpu demo LDAP directory (OpenLDAP on loopback, StartTLS required)."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("start", parents=[common], help="build if needed and start slapd")
    sub.add_parser("stop", parents=[common], help="stop slapd")
    status_parser = sub.add_parser("status", parents=[common], help="is slapd running?")
    status_parser.add_argument("--json", action="store_true", help="print JSON")
    add = sub.add_parser(
        "add-user",
        parents=[common],
        help="add a user; the password is read from a prompt or from stdin",
    )
    add.add_argument("name")
    add.add_argument(
        "--groups",
        default=USERS_GROUP,
        help=f"comma-separated groups (default {USERS_GROUP}; '' for none)",
    )
    add.add_argument("--given-name")
    add.add_argument("--surname")
    add.add_argument("--mail")
    setpw = sub.add_parser(
        "set-password",
        parents=[common],
        help="change a user's password, read from a prompt or from stdin",
    )
    setpw.add_argument("name")
    args = parser.parse_args(argv)

    try:
        directory = DemoDirectory(args.dir, port=args.port)
        if args.command == "start":
            created = directory.build()
            started = directory.start()
            pid = directory.pid
            if started:
                print(f"slapd started on {directory.uri} (pid {pid}, StartTLS required)")
            else:
                print(f"slapd already running on {directory.uri} (pid {pid})")
            print(f"CA certificate: {directory.ca_file}")
            if created:
                print("Demo users and their passwords (shown once):")
                for name, password in directory.passwords.items():
                    print(f"  {name} {password}")
            print(f"Passwords (root only): {directory.passwords_file}")
        elif args.command == "stop":
            if directory.stop():
                print("slapd stopped")
            else:
                print("slapd was not running")
        elif args.command == "status":
            status = directory.status()
            if args.json:
                print(json.dumps(status))
            elif status["running"]:
                state = "answering" if status["answering"] else "NOT answering"
                print(f"running, pid {status['pid']}, {status['uri']} ({state})")
            else:
                print(f"stopped ({status['uri']}, {status['state_dir']})")
            return 0 if status["running"] else 3
        elif args.command == "add-user":
            validate_username(args.name)
            groups = [g for g in args.groups.split(",") if g]
            result = directory.add_user(
                args.name,
                _read_new_password(args.name),
                groups,
                given_name=args.given_name,
                surname=args.surname,
                mail=args.mail,
            )
            print(f"added {result['dn']} (uidNumber {result['uidNumber']})")
        elif args.command == "set-password":
            validate_username(args.name)
            directory.set_password(args.name, _read_new_password(args.name))
            print(f"password of {args.name} changed")
    except (ValueError, DemoLDAPError, PermissionError) as e:
        print(f"demo_ldap: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
