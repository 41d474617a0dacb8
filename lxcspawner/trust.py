"""A GPU server's LXD trusts the hub: an LXD trust token, never a password.

The two halves of ``setup/gpu-server`` and ``lxcgpu-admin server trust``:

- on the GPU server, :func:`issue_token` asks the local LXD for a one-time
  token for the hub's client certificate (LXD's own ``lxc config trust add``
  token: base64 of JSON with the server certificate's fingerprint, its
  addresses and a secret).  It is shown to the admin, never put on a
  command line or in a file.
- on the hub, :func:`join` reads it (from stdin), fetches the server's
  certificate from the site's ``lxd = "https://..."`` endpoint, accepts it
  only if its SHA-256 fingerprint is the token's (so the first contact is
  pinned too), stores it as the site's ``server_cert``, makes the hub's
  client certificate where the site names one that does not exist yet
  (key 0600), and presents the token to LXD over that pinned connection.

Nothing here changes the site file: the ``[servers.<name>]`` table names
the paths, and :func:`server_table` prints the table to add.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from .lxd import LXD, LXDError, parse_time

#: The name the hub's certificate gets in each GPU server's trust store.
HUB_CLIENT_NAME = "lxcgpu-hub"
#: Where ``[servers.<name>]`` keeps its files unless the site says otherwise.
DEFAULT_CLIENT_CERT = "/etc/lxcgpu/lxd-client.crt"
DEFAULT_CLIENT_KEY = "/etc/lxcgpu/lxd-client.key"
SERVER_CERT_DIR = "/etc/lxcgpu/servers"
CONNECT_TIMEOUT = 15  # seconds, for fetching a server's certificate


class TrustError(ValueError):
    """A step of joining a server failed; the message says what to do."""


@dataclass(frozen=True)
class TrustToken:
    """An LXD certificate-add token, as ``lxc config trust add`` prints it."""

    client_name: str
    fingerprint: str            # SHA-256 of the server certificate, hex
    addresses: tuple[str, ...]  # host:port where the server listens
    secret: str
    expires_at: str | None
    text: str                   # the token itself, as LXD wants it back

    @classmethod
    def parse(cls, text: str) -> "TrustToken":
        text = "".join(text.split())
        if not text:
            raise TrustError("no token given: paste the trust token that setup/gpu-server "
                             "printed on the GPU server")
        try:
            data = json.loads(base64.b64decode(text + "=" * (-len(text) % 4), validate=True))
        except (binascii.Error, ValueError, UnicodeDecodeError):
            raise TrustError("that is not an LXD trust token (it should be one line of "
                             "base64, as setup/gpu-server printed it)") from None
        if not isinstance(data, dict):
            raise TrustError("that is not an LXD trust token")
        fingerprint = data.get("fingerprint")
        secret = data.get("secret")
        addresses = data.get("addresses") or []
        if not (isinstance(fingerprint, str) and len(fingerprint) == 64
                and all(c in "0123456789abcdef" for c in fingerprint.lower())
                and isinstance(secret, str) and secret
                and isinstance(addresses, list) and all(isinstance(a, str) for a in addresses)):
            raise TrustError("that token lacks the server's fingerprint or its secret: "
                             "copy the whole token")
        expires = data.get("expires_at")
        return cls(str(data.get("client_name") or ""), fingerprint.lower(), tuple(addresses),
                   secret, expires if isinstance(expires, str) else None, text)

    def expired(self, now: dt.datetime | None = None) -> bool:
        """True when the token names an expiry that has passed (LXD writes
        the zero time, year 1, for tokens that do not expire)."""
        if not self.expires_at or self.expires_at.startswith("0001-"):
            return False
        try:
            when = parse_time(self.expires_at)
        except ValueError:
            return False
        return when < (now or dt.datetime.now(dt.timezone.utc))


def encode_token(metadata: dict, client_name: str) -> str:
    """The token text for an LXD certificate-add operation's metadata
    (``fingerprint``, ``addresses``, ``secret``; ``expiresAt`` where LXD
    sets one): the same JSON and base64 as ``lxc config trust add``."""
    data = {
        "client_name": client_name,
        "fingerprint": metadata["fingerprint"],
        "addresses": list(metadata.get("addresses") or []),
        "secret": metadata["secret"],
        "expires_at": metadata.get("expiresAt") or "0001-01-01T00:00:00Z",
    }
    return base64.b64encode(json.dumps(data, separators=(",", ":")).encode()).decode()


# ------------------------------------------------------------ the GPU server

async def hub_trusted(lxd: LXD, client_name: str = HUB_CLIENT_NAME) -> bool:
    """Whether a certificate of that name is in the server's trust store."""
    return any(c.get("name") == client_name for c in await lxd.certificates())


async def issue_token(lxd: LXD, client_name: str = HUB_CLIENT_NAME) -> str:
    """A new one-time token for ``client_name``; an unused older one for the
    same name is cancelled, so running the setup again leaves one."""
    await lxd.cancel_trust_tokens(client_name)
    return encode_token(await lxd.issue_trust_token(client_name), client_name)


# ------------------------------------------------------------ the hub

def fetch_certificate(endpoint: str, timeout: float = CONNECT_TIMEOUT) -> str:
    """The PEM certificate an ``https://host:port`` endpoint presents
    (unverified: the caller compares its fingerprint)."""
    parts = urlsplit(endpoint)
    if parts.scheme != "https" or not parts.hostname:
        raise TrustError(f"{endpoint!r} is not an https:// LXD endpoint")
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((parts.hostname, parts.port or 8443), timeout) as raw, \
                ctx.wrap_socket(raw, server_hostname=parts.hostname) as tls:
            der = tls.getpeercert(binary_form=True)
    except OSError as e:
        raise TrustError(f"cannot reach {endpoint}: {e.strerror or e}; check that "
                         "setup/gpu-server ran there (core.https_address) and that this "
                         "host can reach it") from None
    return ssl.DER_cert_to_PEM_cert(der)


def fingerprint_of(pem: str) -> str:
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).hexdigest()


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Write ``path`` atomically with ``mode`` (never through a link there)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def ensure_client_certificate(cert: str, key: str, name: str = HUB_CLIENT_NAME) -> bool:
    """Make the hub's LXD client certificate and key (EC P-256, ten years,
    key 0600) unless both exist; True if made.  One without the other is
    refused: replacing a key would untrust the hub on every server."""
    cert_p, key_p = Path(cert), Path(key)
    if cert_p.exists() and key_p.exists():
        return False
    if cert_p.exists() or key_p.exists():
        have, lack = (cert_p, key_p) if cert_p.exists() else (key_p, cert_p)
        raise TrustError(f"{have} exists but {lack} does not: restore it, or remove both to "
                         "make a new pair (every GPU server must then trust the new one)")
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    private = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                   .public_key(private.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=5))
                   .not_valid_after(now + dt.timedelta(days=3650))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
                   .add_extension(x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.CLIENT_AUTH]),
                                  False)
                   .sign(private, hashes.SHA256()))
    _write_new(key_p, private.private_bytes(serialization.Encoding.PEM,
                                            serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()), 0o600)
    _write_new(cert_p, certificate.public_bytes(serialization.Encoding.PEM), 0o644)
    return True


@dataclass
class JoinResult:
    server: str
    endpoint: str
    fingerprint: str
    server_cert: str
    client_cert_made: bool
    already_trusted: bool


async def join(server, token: TrustToken) -> JoinResult:
    """Trust the hub on ``server`` (a :class:`~lxcspawner.settings.GPUServer`
    reached over HTTPS) with ``token``; see the module docstring."""
    if not server.remote:
        raise TrustError(f"GPU server {server.name} is this machine's local LXD: it needs no "
                         "trust; give its table lxd = \"https://HOST:8443\" for one elsewhere")
    if token.expired():
        raise TrustError(f"the token expired at {token.expires_at}: run setup/gpu-server "
                         "there again for a new one")
    pem = fetch_certificate(server.lxd)
    seen = fingerprint_of(pem)
    if seen != token.fingerprint:
        raise TrustError(
            f"{server.lxd} presented a certificate with SHA-256 fingerprint {seen}, not the "
            f"token's {token.fingerprint}: the token is for another server, or something "
            "between the hub and the server answers in its place. Nothing was trusted.")
    made = ensure_client_certificate(server.client_cert, server.client_key)
    _write_new(Path(server.server_cert), pem.encode(), 0o644)
    lxd = server.open_lxd(timeout=30, retries=1)
    try:
        if (await lxd.server_info()).get("auth") == "trusted":
            return JoinResult(server.name, server.lxd, seen, server.server_cert, made, True)
        try:
            await lxd.add_trust(token.text, HUB_CLIENT_NAME)
        except LXDError as e:
            raise TrustError(f"{server.name} refused the token ({e}): it was used or "
                             "cancelled already; run setup/gpu-server there again for a new "
                             "one") from None
        # LXD decides trust per request, from the certificate: ask again.
        if (await lxd.server_info()).get("auth") != "trusted":
            raise TrustError(f"{server.name} accepted the token but does not trust this "
                             "hub's certificate; see its LXD log")
    finally:
        lxd.close()
    return JoinResult(server.name, server.lxd, seen, server.server_cert, made, False)


def server_table(name: str, endpoint: str, address: str) -> str:
    """The ``[servers.<name>]`` table for a server set up with the default
    file locations."""
    return (f"[servers.{name}]\n"
            f'lxd = "{endpoint}"\n'
            f'client_cert = "{DEFAULT_CLIENT_CERT}"\n'
            f'client_key = "{DEFAULT_CLIENT_KEY}"\n'
            f'server_cert = "{SERVER_CERT_DIR}/{name}.crt"\n'
            f'address = "{address}"\n')
