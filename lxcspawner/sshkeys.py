"""OpenSSH public keys: which are accepted, and their one normal form.

Pure parsing, no I/O: the store checks keys with it before recording them,
and provisioning writes only keys it accepts.
"""

from __future__ import annotations

import base64
import binascii
import struct

KEY_TYPES = frozenset({
    "ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521", "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
})
RSA_MIN_BITS = 2048


class WeakKeyError(ValueError):
    """A well-formed key of a kind or size that is no longer accepted."""


def normalize_public_key(line: str) -> str:
    """Validate one OpenSSH public key line and return it as ``type base64 [comment]``.

    Options (``command=...``), several keys in one string, and anything that
    is not a known key type with a well-formed body raise ValueError."""
    if not isinstance(line, str) or "\n" in line.strip() or "\r" in line or "\0" in line:
        raise ValueError("a public key is a single line")
    parts = line.strip().split(None, 2)
    if len(parts) < 2:
        raise ValueError("a public key looks like 'ssh-ed25519 AAAA... comment'")
    kind, body = parts[0], parts[1]
    if kind == "ssh-dss":
        raise WeakKeyError("DSA keys (ssh-dss) are too weak and OpenSSH no longer accepts "
                           "them; make a new key with `ssh-keygen -t ed25519`")
    if kind not in KEY_TYPES:
        raise ValueError(f"unsupported key type {kind[:40]!r} (options before the key "
                         "are not allowed)")
    try:
        blob = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the key's body is not valid base64") from None
    # The blob starts with the key type as an SSH string.
    if len(blob) < 4 + len(kind) or blob[4:4 + len(kind)].decode("latin-1") != kind:
        raise ValueError("the key's body does not match its type")
    if kind == "ssh-rsa":
        bits = rsa_bits(blob)
        if bits < RSA_MIN_BITS:
            raise WeakKeyError(f"this RSA key has {bits} bits, fewer than the "
                               f"{RSA_MIN_BITS} required; make a new key with "
                               "`ssh-keygen -t ed25519`")
    comment = parts[2].strip() if len(parts) == 3 else ""
    if any(ord(c) < 32 for c in comment):
        raise ValueError("the key's comment contains control characters")
    return f"{kind} {body}" + (f" {comment}" if comment else "")


def rsa_bits(blob: bytes) -> int:
    """The modulus size of an ``ssh-rsa`` key blob (string type, mpint e, mpint n)."""
    fields, pos = [], 0
    for _ in range(3):
        if pos + 4 > len(blob):
            raise ValueError("the RSA key's body is truncated")
        (n,) = struct.unpack(">I", blob[pos:pos + 4])
        if pos + 4 + n > len(blob):
            raise ValueError("the RSA key's body is truncated")
        fields.append(blob[pos + 4:pos + 4 + n])
        pos += 4 + n
    return int.from_bytes(fields[2], "big").bit_length()
