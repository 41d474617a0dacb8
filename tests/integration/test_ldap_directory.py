"""The demo directory against a real slapd: StartTLS, ACLs, lifecycle, changes.

Clients connect to "localhost" (the certificate's DNS name, as the hub will)
over IPv4 only: slapd listens on 127.0.0.1 and nothing may go elsewhere.
"""

import contextlib
import ctypes
import os
import secrets
import shutil
import ssl
import subprocess
import sys
from pathlib import Path

import ldap3
import pytest
from ldap3.core.exceptions import LDAPBindError, LDAPException, LDAPSocketOpenError

import demo_ldap
from tests.fixtures.ldap import free_loopback_port

pytestmark = pytest.mark.ldap

REPO = Path(__file__).resolve().parents[2]
DEMO_USERS = ("alice", "bob", "carol")


def server(directory, ca_file=None):
    tls = ldap3.Tls(ca_certs_file=str(ca_file or directory.ca_file), validate=ssl.CERT_REQUIRED)
    return ldap3.Server(
        "localhost",
        port=directory.port,
        tls=tls,
        mode=ldap3.IP_V4_ONLY,
        connect_timeout=5,
        get_info=ldap3.NONE,
    )


def tls_bind(directory, dn, password, ca_file=None):
    """A connection bound as ``dn`` after StartTLS; raises if the bind fails."""
    return ldap3.Connection(
        server(directory, ca_file),
        user=dn,
        password=password,
        auto_bind=ldap3.AUTO_BIND_TLS_BEFORE_BIND,
        receive_timeout=5,
    )


def login(directory, name):
    """Bound as a user, with the password the passwords file records."""
    return tls_bind(directory, directory.user_dn(name), directory.passwords[name])


def admin(directory):
    return tls_bind(directory, directory.admin_dn, directory.admin_password)


def people(directory):
    conn = admin(directory)
    conn.search(directory.people_dn, "(objectClass=*)", attributes=ldap3.ALL_ATTRIBUTES)
    entries = {e.entry_dn: e.entry_attributes_as_dict for e in conn.entries}
    conn.unbind()
    return entries


def members(directory, group):
    conn = admin(directory)
    conn.search(directory.group_dn(group), "(objectClass=*)", ldap3.BASE, attributes=["member"])
    values = set(conn.entries[0].entry_attributes_as_dict["member"])
    conn.unbind()
    return values


def unique_name(prefix="t"):
    return f"{prefix}{secrets.token_hex(3)}"


@pytest.mark.parametrize("name", DEMO_USERS)
def test_demo_user_binds_over_starttls(ldap_directory, name):
    password = ldap_directory.passwords[name]
    conn = tls_bind(ldap_directory, ldap_directory.user_dn(name), password)
    assert conn.tls_started
    assert conn.extend.standard.who_am_i() == f"dn:uid={name},ou=people,dc=lxcgpu,dc=lab"
    conn.unbind()


def test_wrong_password_fails(ldap_directory):
    with pytest.raises(LDAPBindError):
        tls_bind(ldap_directory, ldap_directory.user_dn("alice"), "not-" + secrets.token_hex(8))


def test_plain_bind_is_refused(ldap_directory):
    password = ldap_directory.passwords["alice"]
    conn = ldap3.Connection(
        server(ldap_directory), user=ldap_directory.user_dn("alice"), password=password
    )
    conn.open()
    assert not conn.bind()
    assert conn.result["description"] == "confidentialityRequired"
    conn.unbind()


def test_wrong_ca_fails_the_handshake(ldap_directory, tmp_path):
    other_ca = tmp_path / "other-ca.crt"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", str(tmp_path / "other-ca.key"), "-out", str(other_ca),
         "-days", "1", "-subj", "/CN=not the lxcgpu demo CA"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    password = ldap_directory.passwords["alice"]
    with pytest.raises(LDAPException, match="(?i)certificate verify failed"):
        tls_bind(ldap_directory, ldap_directory.user_dn("alice"), password, ca_file=other_ca)


def test_group_membership_as_a_user_sees_it(ldap_directory):
    conn = login(ldap_directory, "bob")
    conn.search(ldap_directory.groups_dn, "(objectClass=groupOfNames)", attributes=["cn", "member"])
    groups = {e.cn.value: set(e.member.values) for e in conn.entries}
    conn.unbind()
    demo = {ldap_directory.user_dn(n) for n in DEMO_USERS}
    assert demo <= groups["gpu-users"]
    assert ldap_directory.user_dn("carol") in groups["gpu-admins"]
    assert not (demo - {ldap_directory.user_dn("carol")}) & groups["gpu-admins"]
    # The filter ldapauthenticator runs, bound as the user, finds the group.
    conn = login(ldap_directory, "carol")
    assert conn.search(
        ldap_directory.admins_group_dn,
        f"(member={ldap_directory.user_dn('carol')})",
        ldap3.BASE,
    )
    conn.unbind()


def test_passwords_are_hidden(ldap_directory):
    anonymous = ldap3.Connection(server(ldap_directory))
    anonymous.open()
    anonymous.start_tls()
    anonymous.bind()
    anonymous.search(ldap_directory.base_dn, "(uid=*)", attributes=["userPassword", "uid"])
    assert anonymous.entries == []
    anonymous.unbind()

    alice = login(ldap_directory, "alice")
    alice.search(ldap_directory.people_dn, "(uid=*)", attributes=["userPassword", "uid"])
    seen = {e.uid.value: e.entry_attributes_as_dict.get("userPassword") for e in alice.entries}
    alice.unbind()
    assert set(DEMO_USERS) <= set(seen)
    assert seen["alice"]  # her own, by self write
    assert not seen["bob"] and not seen["carol"]
    # Without schema (get_info=NONE) ldap3 returns every value as str.
    assert all(p.startswith("{SSHA}") for p in seen["alice"])


def test_secret_files_are_root_only(ldap_directory):
    for path in (
        ldap_directory.passwords_file,
        ldap_directory.admin_password_file,
        ldap_directory.key_file,
    ):
        assert path.stat().st_mode & 0o777 == 0o600, path
    for path in (ldap_directory.slapd_d, ldap_directory.data_dir):
        assert path.stat().st_mode & 0o777 == 0o700, path
    assert ldap_directory.ca_file.stat().st_mode & 0o777 == 0o644
    assert not (ldap_directory.state_dir / "ca.key").exists()
    assert set(ldap_directory.passwords) >= set(DEMO_USERS)


def test_start_is_idempotent(ldap_directory):
    pid = ldap_directory.pid
    assert ldap_directory.start(owned=True) is False
    assert ldap_directory.pid == pid
    status = ldap_directory.status()
    assert status["running"] and status["answering"] and status["pid"] == pid


def test_stop_and_start_keep_data_and_passwords(ldap_directory):
    name = unique_name()
    ldap_directory.add_user(name, "kept across restarts")
    passwords = ldap_directory.passwords
    old_pid = ldap_directory.pid

    assert ldap_directory.stop() is True
    assert ldap_directory.stop() is False  # already stopped is fine
    assert ldap_directory.status()["running"] is False
    assert not ldap_directory.pid_file.exists()
    with pytest.raises(LDAPSocketOpenError):
        tls_bind(ldap_directory, ldap_directory.user_dn("alice"), passwords["alice"])

    assert ldap_directory.start(owned=True) is True
    assert ldap_directory.pid not in (None, old_pid)
    assert ldap_directory.passwords == passwords
    for user in ("alice", name):
        tls_bind(ldap_directory, ldap_directory.user_dn(user), passwords[user]).unbind()


def test_add_user(ldap_directory):
    first, second = unique_name(), unique_name()
    before = people(ldap_directory)
    one = ldap_directory.add_user(first, "first pw", given_name="Zoë", surname="O'Neil, Jr")
    two = ldap_directory.add_user(second, "second pw", groups=("gpu-users", "gpu-admins"))
    numbers = [int(e["uidNumber"][0]) for e in before.values() if "uidNumber" in e]
    assert one["uidNumber"] == max(numbers) + 1
    assert two["uidNumber"] == one["uidNumber"] + 1

    conn = tls_bind(ldap_directory, ldap_directory.user_dn(first), "first pw")
    conn.search(
        one["dn"], "(objectClass=*)", ldap3.BASE, attributes=["cn", "gidNumber", "homeDirectory"]
    )
    entry = conn.entries[0]
    assert entry.cn.value == "Zoë O'Neil, Jr"
    assert entry.homeDirectory.value == f"/home/{first}"
    assert int(entry.gidNumber.value) == one["uidNumber"]
    conn.unbind()
    tls_bind(ldap_directory, ldap_directory.user_dn(second), "second pw").unbind()

    assert {one["dn"], two["dn"]} <= members(ldap_directory, "gpu-users")
    admins = members(ldap_directory, "gpu-admins")
    assert two["dn"] in admins and one["dn"] not in admins
    assert ldap_directory.passwords[first] == "first pw"


@pytest.mark.parametrize(
    "name, password, groups",
    [
        ("Mallory", "pw", ("gpu-users",)),
        ("m,allory", "pw", ("gpu-users",)),
        ("mallory)(uid=*", "pw", ("gpu-users",)),
        ("*", "pw", ("gpu-users",)),
        ("", "pw", ("gpu-users",)),
        ("x" * 33, "pw", ("gpu-users",)),
        ("alice", "pw", ("gpu-users",)),  # exists
        ("mallory", "", ("gpu-users",)),
        ("mallory", "two\nlines", ("gpu-users",)),
        ("mallory", "pw", ("no-such-group",)),
        ("mallory", "pw", ("gpu-users", "Bad,Group")),
        ("mallory", "pw", "gpu-users"),  # a string, not a list
    ],
)
def test_bad_input_changes_nothing(ldap_directory, name, password, groups):
    before_people = people(ldap_directory)
    before_members = members(ldap_directory, "gpu-users")
    before_passwords = ldap_directory.passwords
    with pytest.raises(ValueError):
        ldap_directory.add_user(name, password, groups)
    assert people(ldap_directory) == before_people
    assert members(ldap_directory, "gpu-users") == before_members
    assert ldap_directory.passwords == before_passwords


def test_set_password(ldap_directory):
    name = unique_name()
    ldap_directory.add_user(name, "old password")
    ldap_directory.set_password(name, "new password")
    tls_bind(ldap_directory, ldap_directory.user_dn(name), "new password").unbind()
    with pytest.raises(LDAPBindError):
        tls_bind(ldap_directory, ldap_directory.user_dn(name), "old password")
    assert ldap_directory.passwords[name] == "new password"
    with pytest.raises(ValueError, match="no such user"):
        ldap_directory.set_password(unique_name(), "whatever")


async def test_ldap_authenticator_with_the_demo_settings(ldap_directory):
    from ldapauthenticator import LDAPAuthenticator

    outsider = unique_name()
    ldap_directory.add_user(outsider, "outsider pw", groups=())
    auth = LDAPAuthenticator(**ldap_directory.ldap_authenticator_config())
    password = ldap_directory.passwords["carol"]

    async def login_as(username, password):
        return await auth.get_authenticated_user(
            None, {"username": username, "password": password}
        )

    user = await login_as("carol", password)
    assert user["name"] == "carol"
    assert set(user["auth_state"]["ldap_groups"]) == {
        ldap_directory.users_group_dn,
        ldap_directory.admins_group_dn,
    }
    assert await login_as("carol", "wrong") is None
    # A valid LDAP account outside the allowed groups is refused.
    assert await login_as(outsider, "outsider pw") is None


@contextlib.contextmanager
def adopting_orphans():
    """Make this process the reaper of orphaned descendants meanwhile.

    The CLI detaches slapd and exits; without this, a stopped slapd would be
    reaped by PID 1, which some containers' init never does.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_child_subreaper = 36
    libc.prctl(pr_set_child_subreaper, 1, 0, 0, 0)
    try:
        yield
    finally:
        libc.prctl(pr_set_child_subreaper, 0, 0, 0, 0)


def test_command_line(tmp_path):
    # The system python, without the virtualenv: the script is stdlib only.
    python = shutil.which("python3", path="/usr/bin:/bin") or sys.executable
    port = free_loopback_port()
    state = tmp_path / "ldap"

    def cli(*args, stdin=None):
        return subprocess.run(
            [python, "-I", str(REPO / "setup" / "demo_ldap.py"), *args, "--dir", str(state)],
            input=stdin, capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    pids = set()
    with adopting_orphans():
        try:
            first = cli("start", "--port", str(port))
            assert first.returncode == 0, first.stderr
            passwords = demo_ldap.DemoDirectory(state).passwords
            for name in DEMO_USERS:
                assert f"  {name} {passwords[name]}" in first.stdout

            second = cli("start")  # the port is remembered
            assert second.returncode == 0 and "already running" in second.stdout
            assert passwords["alice"] not in second.stdout
            assert str(state / "passwords") in second.stdout

            status = cli("status")
            assert status.returncode == 0 and f"127.0.0.1:{port}" in status.stdout
            pids.add(demo_ldap.DemoDirectory(state).pid)

            added = cli("add-user", "dave", "--groups", "gpu-users,gpu-admins", stdin="dave's pw\n")
            assert added.returncode == 0, added.stderr
            refused = cli("add-user", "Dave", stdin="pw\n")
            assert refused.returncode == 1 and "invalid user name" in refused.stderr

            assert cli("stop").returncode == 0
            assert cli("status").returncode == 3
            assert "not running" in cli("stop").stdout

            assert cli("start").returncode == 0
            directory = demo_ldap.DemoDirectory(state)
            pids.add(directory.pid)
            assert directory.passwords == {**passwords, "dave": "dave's pw"}
            tls_bind(directory, directory.user_dn("dave"), "dave's pw").unbind()
        finally:
            cli("stop")
            for pid in pids - {None}:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
    assert demo_ldap.DemoDirectory(state).pid is None
    shutil.rmtree(state)
