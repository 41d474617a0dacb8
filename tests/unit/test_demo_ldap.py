"""Pure parts of setup/demo_ldap.py: names, DN escaping, LDIF, files.  No slapd."""

import base64

import pytest

import demo_ldap


@pytest.mark.parametrize(
    "name", ["alice", "_svc", "a", "a-b_c9", "x" * 32, "carol-2"]
)
def test_valid_usernames(name):
    assert demo_ldap.validate_username(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "Alice",
        "1abc",
        "-abc",
        "x" * 33,
        "a b",
        "a,b",
        "a.b",
        "alice)(uid=*",
        "*",
        "üser",
        "alice\n",
        "a=b",
        None,
        42,
    ],
)
def test_invalid_usernames(name):
    with pytest.raises(ValueError, match="invalid user name"):
        demo_ldap.validate_username(name)


@pytest.mark.parametrize(
    "value, escaped",
    [
        ("alice", "alice"),
        ("a,b", r"a\,b"),
        ("a+b", r"a\+b"),
        ('say "hi"', r"say \"hi\""),
        ("<x>;y", r"\<x\>\;y"),
        ("back\\slash", r"back\\slash"),
        ("a=b", r"a\=b"),
        (" lead", r"\ lead"),
        ("trail ", r"trail\ "),
        ("in side", "in side"),
        ("#hash", r"\#hash"),
        ("mid#hash", "mid#hash"),
        ("nul\0", r"nul\00"),
        ("Zoë", "Zoë"),
        ("", ""),
    ],
)
def test_escape_dn_value(value, escaped):
    assert demo_ldap.escape_dn_value(value) == escaped


def test_user_and_group_dns():
    assert demo_ldap.user_dn("alice") == "uid=alice,ou=people,dc=lxcgpu,dc=lab"
    assert demo_ldap.group_dn("gpu-users") == "cn=gpu-users,ou=groups,dc=lxcgpu,dc=lab"
    assert demo_ldap.user_dn("a,b") == r"uid=a\,b,ou=people,dc=lxcgpu,dc=lab"


@pytest.mark.parametrize(
    "value, plain",
    [
        ("alice", True),
        ("{SSHA}abc+/=", True),
        ("", True),
        (" leading space", False),
        ("trailing space ", False),
        (":colon first", False),
        ("<less-than first", False),
        ("Zoë", False),
        ("two\nlines", False),
        ("cr\r", False),
    ],
)
def test_ldif_line_base64_when_needed(value, plain):
    line = demo_ldap.ldif_line("cn", value)
    if plain:
        assert line == f"cn: {value}"
    else:
        assert line.startswith("cn:: ")
        assert base64.b64decode(line[5:]).decode() == value


def test_ldif_record_round_trips_through_parser():
    record = demo_ldap.ldif_record(
        "uid=x,ou=people,dc=lxcgpu,dc=lab", [("cn", " Zoë, Jr"), ("sn", "X")]
    )
    [entry] = demo_ldap.parse_ldif_entries(record)
    assert entry == {
        "dn": ["uid=x,ou=people,dc=lxcgpu,dc=lab"],
        "cn": [" Zoë, Jr"],
        "sn": ["X"],
    }


def test_config_ldif():
    text = demo_ldap.config_ldif(
        data_dir="/s/data",
        ca_file="/s/ca.crt",
        cert_file="/s/server.crt",
        key_file="/s/server.key",
        root_pw_hash="{SSHA}hash",
    )
    lines = text.splitlines()
    for expected in [
        "olcSecurity: tls=1",
        "olcTLSCACertificateFile: /s/ca.crt",
        "olcTLSCertificateFile: /s/server.crt",
        "olcTLSCertificateKeyFile: /s/server.key",
        "olcModulePath: /usr/lib/ldap",
        "olcModuleLoad: back_mdb",
        "include: file:///etc/ldap/schema/core.ldif",
        "include: file:///etc/ldap/schema/cosine.ldif",
        "include: file:///etc/ldap/schema/nis.ldif",
        "include: file:///etc/ldap/schema/inetorgperson.ldif",
        "olcDbDirectory: /s/data",
        "olcSuffix: dc=lxcgpu,dc=lab",
        "olcRootDN: cn=admin,dc=lxcgpu,dc=lab",
        "olcRootPW: {SSHA}hash",
        "olcAccess: {0}to attrs=userPassword by self write by anonymous auth by * none",
        "olcAccess: {1}to * by users read",
    ]:
        assert expected in lines
    # Schemas load in dependency order.
    includes = [line for line in lines if line.startswith("include:")]
    assert [i.rsplit("/", 1)[1] for i in includes] == [
        "core.ldif", "cosine.ldif", "nis.ldif", "inetorgperson.ldif"
    ]  # fmt: skip


def test_data_ldif_users_and_groups():
    hashes = {"alice": "{SSHA}a", "bob": "{SSHA}b", "carol": "{SSHA}c"}
    entries = demo_ldap.parse_ldif_entries(demo_ldap.data_ldif(hashes))
    by_dn = {e["dn"][0]: e for e in entries}
    assert list(by_dn)[:3] == [
        "dc=lxcgpu,dc=lab", "ou=people,dc=lxcgpu,dc=lab", "ou=groups,dc=lxcgpu,dc=lab"
    ]  # fmt: skip
    uid_numbers = set()
    for name in ("alice", "bob", "carol"):
        user = by_dn[f"uid={name},ou=people,dc=lxcgpu,dc=lab"]
        assert user["objectclass"] == ["inetOrgPerson", "posixAccount"]
        assert user["uid"] == [name]
        assert user["userpassword"] == [hashes[name]]
        assert user["homedirectory"] == [f"/home/{name}"]
        assert user["loginshell"] == ["/bin/bash"]
        assert user["mail"] == [f"{name}@lxcgpu.lab"]
        for attribute in ("cn", "sn", "uidnumber", "gidnumber"):
            assert len(user[attribute]) == 1
        uid_numbers.add(int(user["uidnumber"][0]))
    assert len(uid_numbers) == 3 and min(uid_numbers) >= demo_ldap.FIRST_UID_NUMBER
    users = by_dn["cn=gpu-users,ou=groups,dc=lxcgpu,dc=lab"]
    admins = by_dn["cn=gpu-admins,ou=groups,dc=lxcgpu,dc=lab"]
    assert users["objectclass"] == admins["objectclass"] == ["groupOfNames"]
    assert sorted(users["member"]) == [
        f"uid={n},ou=people,dc=lxcgpu,dc=lab" for n in ("alice", "bob", "carol")
    ]
    assert admins["member"] == ["uid=carol,ou=people,dc=lxcgpu,dc=lab"]


def test_passwords_file_round_trip():
    passwords = {"alice": "s3cret", "dave": "with spaces  inside"}
    text = demo_ldap.format_passwords(passwords)
    assert text == "alice s3cret\ndave with spaces  inside\n"
    assert demo_ldap.parse_passwords(text) == passwords


@pytest.mark.parametrize("password", ["", "   ", "a\nb", "a\rb", "nul\0", None])
def test_unstorable_passwords_refused(password):
    with pytest.raises(ValueError):
        demo_ldap.validate_password(password)


def test_generated_passwords_are_random_alphanumeric():
    first, second = demo_ldap.generate_password(), demo_ldap.generate_password()
    assert first != second
    assert len(first) == 16 and first.isalnum()


def test_directory_attributes(tmp_path):
    d = demo_ldap.DemoDirectory(tmp_path, port=12345)
    assert d.uri == "ldap://127.0.0.1:12345"
    assert d.ca_file == tmp_path / "ca.crt"
    assert d.base_dn == "dc=lxcgpu,dc=lab"
    assert d.people_dn == "ou=people,dc=lxcgpu,dc=lab"
    assert d.groups_dn == "ou=groups,dc=lxcgpu,dc=lab"
    assert d.users_group_dn == "cn=gpu-users,ou=groups,dc=lxcgpu,dc=lab"
    assert d.admins_group_dn == "cn=gpu-admins,ou=groups,dc=lxcgpu,dc=lab"
    assert d.bind_dn_template.format(username="bob") == d.user_dn("bob")
    config = d.ldap_authenticator_config()
    assert config["server_port"] == 12345
    assert config["tls_strategy"] == "before_bind"
    assert config["tls_kwargs"]["ca_certs_file"] == str(d.ca_file)
    assert not d.is_built()
    assert not list(tmp_path.iterdir())  # constructing changes nothing


def test_port_defaults_to_the_last_one_used(tmp_path):
    assert demo_ldap.DemoDirectory(tmp_path).port == demo_ldap.DEFAULT_PORT
    (tmp_path / "port").write_text("10777\n")
    assert demo_ldap.DemoDirectory(tmp_path).port == 10777
    assert demo_ldap.DemoDirectory(tmp_path, port=10888).port == 10888


@pytest.mark.parametrize("kwargs", [{"port": 0}, {"port": 70000}, {"host": "10.0.0.1"}])
def test_bad_port_or_host(tmp_path, kwargs):
    with pytest.raises(ValueError):
        demo_ldap.DemoDirectory(tmp_path, **kwargs)


def test_missing_tool_names_the_fix():
    with pytest.raises(demo_ldap.MissingToolError) as info:
        demo_ldap.find_tool("slapd", path="/nonexistent")
    assert "apt-get install slapd ldap-utils" in str(info.value)
    assert "setup/quickstart" in str(info.value)
