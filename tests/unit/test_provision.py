"""Pure parts of provisioning: key validation, passwd and hosts parsing."""

import base64
import struct

import pytest

from lxcspawner.provision import authorized_keys_text, hosts_text, parse_passwd
from lxcspawner.sshkeys import normalize_public_key


def fake_key(kind="ssh-ed25519"):
    blob = struct.pack(">I", len(kind)) + kind.encode() + struct.pack(">I", 32) + b"k" * 32
    if kind == "ssh-rsa":  # and a 2048-bit modulus
        blob += struct.pack(">I", 257) + b"\0\xc1" + b"k" * 255
    return f"{kind} {base64.b64encode(blob).decode()}"


def test_valid_key_is_normalized():
    k = fake_key()
    assert normalize_public_key(f"  {k}   alice@laptop  ") == f"{k} alice@laptop"
    assert normalize_public_key(k) == k


@pytest.mark.parametrize("bad", [
    "", "ssh-ed25519", "garbage AAAA", f'command="rm -rf /" {fake_key()}',
    f"{fake_key()}\n{fake_key()}", "ssh-ed25519 !!!notbase64", fake_key("ssh-rsa").replace(
        "ssh-rsa", "ssh-ed25519", 1), f"{fake_key()} com\x1bment", f"{fake_key()}\r",
])
def test_invalid_keys_are_refused(bad):
    with pytest.raises(ValueError):
        normalize_public_key(bad)


def test_authorized_keys_dedupes_in_order():
    a, b = fake_key(), fake_key("ssh-rsa")
    assert authorized_keys_text([a, b, a]) == f"{a}\n{b}\n"
    assert authorized_keys_text([]) == ""


def test_parse_passwd():
    accts = parse_passwd("root:x:0:0:root:/root:/bin/bash\nalice:x:1000:1000::/home/alice:/bin/bash\nbroken\n")
    assert accts["alice"].uid == 1000 and accts["alice"].home == "/home/alice"
    assert "broken" not in accts


def test_hosts_text_replaces_the_hostname_line():
    cur = "127.0.0.1\tlocalhost\n127.0.1.1\told\n::1\tlocalhost ip6-localhost\n"
    assert hosts_text(cur, "gpu17-alice") == \
        "127.0.0.1\tlocalhost\n127.0.1.1\tgpu17-alice\n::1\tlocalhost ip6-localhost\n"
    assert hosts_text("", "h").startswith("127.0.0.1\tlocalhost\n127.0.1.1\th\n")
