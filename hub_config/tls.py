"""Certificates: the private CA of the demo directory and of the hub's HTTPS.

Standard library and the ``openssl`` command only, so ``setup/demo_ldap.py``
(run with the system ``python3``) shares :func:`make_certificates` with the hub.

Where the site gives no certificate of its own (``c.JupyterHub.ssl_cert`` and
``ssl_key``), :func:`ensure_hub_certificate` keeps a generated one in the hub's
TLS directory (``$LXCGPU_TLS_DIR``, default ``/var/lib/lxcgpu/tls``):

``ca.crt``   the private CA that signed it: what users' browsers are told to
             trust (world-readable; its key is thrown away once it has signed)
``hub.crt``  the server certificate: the hub's origin, a wildcard under it for
             the users' own origins, ``localhost``, this machine's name and its
             addresses
``hub.key``  its key (root, 0600)

The proxy runs as an unprivileged user and reads its own copies
(:func:`install_for_proxy`): the certificate and a key only that user can read.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Callable, Iterable

DEFAULT_DIR = "/var/lib/lxcgpu/tls"
CA_FILE, CERT_FILE, KEY_FILE = "ca.crt", "hub.crt", "hub.key"
DAYS = 825  # the server certificate's (and its private CA's) lifetime
RENEW_DAYS = 30  # a generated certificate is replaced this long before it expires
TOOL_TIMEOUT = 30  # seconds, for each openssl or ip call

OPENSSL_CONFIG = """\
[req]
distinguished_name = req_dn
[req_dn]
[v3_ca]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[v3_server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = {san}
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
"""


class CertificateError(RuntimeError):
    """A certificate could not be made, read or installed; the message says why."""


def _run(argv: list[str]) -> str:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=TOOL_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise CertificateError(f"{Path(argv[0]).name} failed: {e}") from None
    if result.returncode != 0:
        raise CertificateError(
            f"`{' '.join(argv[:3])} ...` failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout


def find_openssl() -> str:
    found = shutil.which("openssl") or shutil.which("openssl", path="/usr/bin:/bin")
    if found is None:
        raise CertificateError("openssl not found: apt-get install openssl (setup/install-deps)")
    return found


def make_certificates(*, openssl: str, workdir: Path, ca_file: Path, cert_file: Path,
                      key_file: Path, ca_subject: str, subject: str, san: str,
                      run: Callable[[list[str]], object] = _run, days: int = 3650) -> None:
    """A new private CA (``ca_file``) and a server certificate signed by it
    (``cert_file``, ``key_file``; EC P-256, serverAuth, the given
    subjectAltName).  The CA signs this one certificate and its key is then
    thrown away, so nothing can be signed with it again."""
    cnf = workdir / f".openssl.{secrets.token_hex(4)}.cnf"
    ca_key = workdir / f".ca.{secrets.token_hex(4)}.key"
    csr = workdir / f".server.{secrets.token_hex(4)}.csr"
    cnf.write_text(OPENSSL_CONFIG.format(san=san))
    genkey = [openssl, "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"]
    old_umask = os.umask(0o077)  # keys are born private
    try:
        run(genkey + ["-out", str(ca_key)])
        run([
            openssl, "req", "-new", "-x509", "-config", str(cnf), "-extensions", "v3_ca",
            "-key", str(ca_key), "-subj", ca_subject,
            "-days", str(days), "-out", str(ca_file),
        ])  # fmt: skip
        run(genkey + ["-out", str(key_file)])
        run([
            openssl, "req", "-new", "-config", str(cnf), "-key", str(key_file),
            "-subj", subject, "-out", str(csr),
        ])  # fmt: skip
        run([
            openssl, "x509", "-req", "-in", str(csr), "-CA", str(ca_file),
            "-CAkey", str(ca_key), "-set_serial", str(secrets.randbits(63)),
            "-days", str(days), "-extfile", str(cnf), "-extensions", "v3_server",
            "-out", str(cert_file),
        ])  # fmt: skip
    finally:
        os.umask(old_umask)
        for path in (cnf, ca_key, csr):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


# --- reading certificates ----------------------------------------------------

def fingerprint(cert: Path, openssl: str | None = None) -> str:
    """The SHA-256 fingerprint, as browsers show it (``AB:CD:...``)."""
    out = _run([openssl or find_openssl(), "x509", "-in", str(cert), "-noout",
                "-fingerprint", "-sha256"])
    return out.strip().partition("=")[2]


def subject_alt_names(cert: Path, openssl: str | None = None) -> set[str]:
    """``{"DNS:name", "IP:addr"}`` of a certificate (addresses normalised)."""
    out = _run([openssl or find_openssl(), "x509", "-in", str(cert), "-noout",
                "-ext", "subjectAltName"])
    names = set()
    for item in re.split(r"[,\n]", out):
        kind, _, value = item.strip().partition(":")
        if kind == "DNS":
            names.add(f"DNS:{value.lower()}")
        elif kind == "IP Address":
            with contextlib.suppress(ValueError):
                names.add(f"IP:{ipaddress.ip_address(value)}")
    return names


def expires_within(cert: Path, days: int, openssl: str | None = None) -> bool:
    result = subprocess.run(
        [openssl or find_openssl(), "x509", "-in", str(cert), "-noout", "-checkend",
         str(days * 86400)], capture_output=True, timeout=TOOL_TIMEOUT)
    return result.returncode != 0


# --- the hub's names -----------------------------------------------------------

def wanted_names(hub_host: str | None, *, hostname: str | None = None,
                 addresses: Iterable[str] = ()) -> set[str]:
    """What a generated hub certificate must cover: the hub's host and a
    wildcard under it (each user's origin), ``localhost``, this machine's
    name, loopback and the given addresses."""
    names = {"DNS:localhost", "IP:127.0.0.1", "IP:::1"}
    if hub_host:
        try:
            names.add(f"IP:{ipaddress.ip_address(hub_host)}")
        except ValueError:
            names |= {f"DNS:{hub_host.lower()}", f"DNS:*.{hub_host.lower()}"}
    if hostname:
        names.add(f"DNS:{hostname.lower()}")
    names |= {f"IP:{ipaddress.ip_address(a)}" for a in addresses}
    return names


def machine_addresses() -> list[str]:
    """This machine's global unicast addresses (``ip -j addr``), as strings."""
    ip = shutil.which("ip") or shutil.which("ip", path="/usr/sbin:/sbin:/usr/bin:/bin")
    if ip is None:
        return []
    try:
        links = json.loads(_run([ip, "-j", "addr", "show"]) or "[]")
    except (CertificateError, json.JSONDecodeError):
        return []
    return sorted({
        a["local"] for link in links for a in link.get("addr_info", [])
        if a.get("scope") == "global" and a.get("local")
    })


def machine_hostname() -> str | None:
    """This machine's name, if it is a valid DNS name (no lookup is made)."""
    name = socket.gethostname()
    return name if re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?", name) else None


def ensure_hub_certificate(tls_dir: Path, names: set[str], log=None,
                           optional: Iterable[str] = ()) -> bool:
    """Keep a generated certificate in ``tls_dir`` that covers ``names``
    (:func:`wanted_names`); make a new CA and certificate when there is none,
    when it misses one of ``names``, or when it expires within RENEW_DAYS
    days.  ``optional`` names (the machine's addresses) go into a new
    certificate but a missing one alone does not replace it, so that an
    interface coming and going does not make users trust a new CA.
    Returns True when it made new ones (users must then trust the new CA)."""
    openssl = find_openssl()
    tls_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    ca, cert, key = tls_dir / CA_FILE, tls_dir / CERT_FILE, tls_dir / KEY_FILE
    optional = set(optional) - names
    if ca.exists() and cert.exists() and key.exists():
        have = subject_alt_names(cert, openssl)
        missing = names - have
        if not missing and not expires_within(cert, RENEW_DAYS, openssl):
            if log and optional - have:
                log.info("lxcgpu: the HTTPS certificate %s does not name %s; delete it "
                         "to have one made that does", cert, ", ".join(sorted(optional - have)))
            return False
        why = f"it does not cover {', '.join(sorted(missing))}" if missing else "it expires soon"
        if log:
            log.warning("lxcgpu: replacing the generated HTTPS certificate %s: %s", cert, why)
    names = names | optional
    dns = sorted(n for n in names if n.startswith("DNS:"))
    host = next((n[4:] for n in dns if not n.startswith("DNS:*.") and n != "DNS:localhost"),
                "localhost")
    # Made beside the old files, then moved into place together.
    work = Path(tempfile.mkdtemp(dir=tls_dir, prefix=".new."))
    try:
        make_certificates(
            openssl=openssl, workdir=work, ca_file=work / CA_FILE, cert_file=work / CERT_FILE,
            key_file=work / KEY_FILE,
            ca_subject=f"/O=lxcgpu/CN=lxcgpu hub CA {socket.gethostname()[:40]} "
                       f"{secrets.token_hex(4)}",
            subject=f"/O=lxcgpu/CN={host}", san=", ".join(dns + sorted(names - set(dns))),
            days=DAYS)
        os.chmod(work / CA_FILE, 0o644)
        os.chmod(work / CERT_FILE, 0o644)
        os.chmod(work / KEY_FILE, 0o600)
        for name in (KEY_FILE, CERT_FILE, CA_FILE):
            os.replace(work / name, tls_dir / name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if log:
        log.warning("lxcgpu: made a new HTTPS certificate %s; users trust its CA %s "
                    "(SHA-256 %s)", cert, ca, fingerprint(ca, openssl))
    return True


# --- the proxy's copies ----------------------------------------------------------

def _write_owned(path: Path, data: bytes, mode: int, uid: int, gid: int) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chown(tmp, uid, gid)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def install_for_proxy(cert: Path, key: Path, proxy_dir: Path, uid: int,
                      gid: int) -> tuple[Path, Path]:
    """Copy the certificate and its key into ``proxy_dir`` (made 0700, owned
    by the proxy's user), the key readable by that user only (0400).  Done at
    every start, so a renewed certificate is picked up by a restart."""
    try:
        cert_data, key_data = Path(cert).read_bytes(), Path(key).read_bytes()
    except OSError as e:
        raise CertificateError(f"cannot read the hub's certificate or key: {e}") from None
    proxy_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    if proxy_dir.is_symlink() or not proxy_dir.is_dir():
        raise CertificateError(f"{proxy_dir} is not a directory")
    os.chown(proxy_dir, uid, gid)
    os.chmod(proxy_dir, 0o700)
    out_cert, out_key = proxy_dir / CERT_FILE, proxy_dir / KEY_FILE
    _write_owned(out_cert, cert_data, 0o444, uid, gid)
    _write_owned(out_key, key_data, 0o400, uid, gid)
    return out_cert, out_key
