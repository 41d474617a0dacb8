"""The trust token and the hub's client certificate (lxcspawner.trust), and
the GPU server's checks (lxcspawner.serversetup), without a server; the
join itself runs against a real second LXD in test_second_server.py."""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import stat

import pytest

from lxcspawner import idmap, serversetup, trust
from lxcspawner.settings import Settings

FP = "ab" * 32
MD = {"fingerprint": FP, "addresses": ["192.0.2.18:8443"], "secret": "s3cret"}


def test_a_token_made_like_lxcs_reads_back():
    text = trust.encode_token(MD, "lxcgpu-hub")
    tok = trust.TrustToken.parse(f"  {text[:30]}\n{text[30:]}\n")   # wrapped when pasted
    assert (tok.client_name, tok.fingerprint, tok.addresses, tok.secret) == (
        "lxcgpu-hub", FP, ("192.0.2.18:8443",), "s3cret")
    assert tok.text == text and not tok.expired()
    # LXD's own layout (lxc config trust add): the same keys.
    assert set(json.loads(base64.b64decode(text))) == {
        "client_name", "fingerprint", "addresses", "secret", "expires_at"}


@pytest.mark.parametrize("text, message", [
    ("", "no token given"),
    ("not base64 at all!", "not an LXD trust token"),
    (base64.b64encode(b"[1, 2]").decode(), "not an LXD trust token"),
    (base64.b64encode(json.dumps({"fingerprint": FP}).encode()).decode(), "copy the whole"),
    (base64.b64encode(json.dumps({**MD, "fingerprint": "xyz"}).encode()).decode(),
     "copy the whole"),
])
def test_what_is_not_a_token_is_refused_in_a_sentence(text, message):
    with pytest.raises(trust.TrustError, match=message):
        trust.TrustToken.parse(text)


def test_expiry():
    past = trust.TrustToken.parse(trust.encode_token(
        {**MD, "expiresAt": "2020-01-01T00:00:00Z"}, "x"))
    assert past.expired()
    # LXD writes nanoseconds, more than Python's own parser takes.
    past = trust.TrustToken.parse(trust.encode_token(
        {**MD, "expiresAt": "2020-01-01T00:00:00.123456789Z"}, "x"))
    assert past.expired()
    future = trust.TrustToken.parse(trust.encode_token(
        {**MD, "expiresAt": "2999-01-01T00:00:00Z"}, "x"))
    assert not future.expired(dt.datetime(2026, 12, 5, tzinfo=dt.timezone.utc))


def test_the_client_certificate_is_made_once_with_a_private_key(tmp_path):
    crt, key = tmp_path / "c" / "hub.crt", tmp_path / "c" / "hub.key"
    assert trust.ensure_client_certificate(str(crt), str(key))
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert b"BEGIN CERTIFICATE" in crt.read_bytes() and b"PRIVATE KEY" in key.read_bytes()
    before = crt.read_bytes()
    assert not trust.ensure_client_certificate(str(crt), str(key))   # kept
    assert crt.read_bytes() == before
    key.unlink()
    with pytest.raises(trust.TrustError, match="exists but .* does not"):
        trust.ensure_client_certificate(str(crt), str(key))
    assert not key.exists()


def test_a_link_planted_where_the_key_goes_is_replaced_not_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    crt, key = tmp_path / "hub.crt", tmp_path / "hub.key"
    # Links to paths that do not exist yet: the files are made in their place.
    crt.symlink_to(tmp_path / "nowhere")
    key.symlink_to(tmp_path / "nowhere2")
    assert trust.ensure_client_certificate(str(crt), str(key))
    assert not key.is_symlink() and not (tmp_path / "nowhere2").exists()
    # A link to an existing file counts as that file: refused, nothing written.
    key.unlink()
    key.symlink_to(victim)
    crt.unlink()
    with pytest.raises(trust.TrustError, match="exists but"):
        trust.ensure_client_certificate(str(crt), str(key))
    assert victim.read_text() == "precious\n"


def test_server_table_names_the_default_files():
    table = trust.server_table("gpu18", "https://gpu18.lab:8443", "gpu18.lab")
    s = Settings.from_dict(__import__("tomllib").loads(table))
    g = s.gpu_server("gpu18")
    assert (g.lxd, g.client_cert, g.server_cert, g.ssh_host) == (
        "https://gpu18.lab:8443", trust.DEFAULT_CLIENT_CERT, "/etc/lxcgpu/servers/gpu18.crt",
        "gpu18.lab")


# ------------------------------------------------------------ serversetup

def _site(first_id_block=0):
    return Settings.from_dict({
        "store": {"first_id_block": first_id_block},
        "servers": {"gpu17": {}, "gpu18": {
            "lxd": "https://gpu18.lab:8443", "client_cert": "/c", "client_key": "/k",
            "server_cert": "/s"}}})


def test_the_server_must_be_in_the_site_file_and_remote():
    with pytest.raises(serversetup.SetupError, match=r"unknown GPU server 'gpu19'.*\[servers.gpu19\]"):
        serversetup.site_server(_site(), "gpu19")
    with pytest.raises(serversetup.SetupError, match="no lxd = .https"):
        serversetup.site_server(_site(), "gpu17")
    assert serversetup.site_server(_site(), "gpu18").name == "gpu18"


def test_https_address():
    g = _site().gpu_server("gpu18")
    assert serversetup.https_address(g, None) == ":8443"
    assert serversetup.https_address(g, "192.0.2.18") == "192.0.2.18:8443"
    assert serversetup.https_address(g, "2001:db8::18") == "[2001:db8::18]:8443"
    with pytest.raises(serversetup.SetupError, match="not an IP address"):
        serversetup.https_address(g, "gpu18; rm -rf /")


def test_id_range_against_the_servers_subuid(tmp_path):
    sub, gid = tmp_path / "subuid", tmp_path / "subgid"
    wide = "root:100000:1000000000\n"
    sub.write_text(wide)
    gid.write_text(wide)
    assert serversetup.id_range_problem(_site(), (sub, gid)) is None
    gid.write_text("root:100000:65536\n")
    problem = serversetup.id_range_problem(_site(), (sub, gid))
    assert problem and str(gid) in problem and "holds 0 of the site's" in problem
    # Half the range: named with the counts.
    half = idmap.IDMAP_USER_FIRST + 1000 * idmap.IDMAP_BLOCK - 100000
    gid.write_text(f"root:100000:{half}\n")
    assert "holds 1000 of" in serversetup.id_range_problem(_site(), (sub, gid))
    sub.unlink()
    assert "grants root nothing" in serversetup.id_range_problem(_site(), (sub, gid))
