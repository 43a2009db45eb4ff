"""The self-signed certificate behind ``dicomlake serve --tls auto``.

The Java trino CLI and JDBC (so DBeaver, Tableau, ...) refuse to send a password over plain
HTTP, so a server that only ever listened on loopback over HTTP could not be used by them at
all. ``--tls auto`` removes the set-up step: the first start makes a key and a self-signed
certificate under ``<home>/tls/``, later starts reuse them, so the fingerprint a user checked
(or the file a BI tool was told to trust) stays valid until the certificate expires or stops
naming the address the server is bound to. Only then is a new one made.

The certificate is an end-entity certificate (not a CA) that is its own trust anchor: clients
either skip verification (``--insecure``, ``SSLVerification=NONE``) or trust this very PEM
file (``--truststore-path``, ``SSLTrustStorePath``, ``verify=``).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["ServerCertificate", "ensure_certificate", "fingerprint_sha256", "read_fingerprint",
           "required_names"]

VALIDITY = dt.timedelta(days=825)
"""Lifetime of a new certificate: the longest that Apple platforms accept for a TLS server
certificate, so the same file works for every client."""

RENEW_BEFORE = dt.timedelta(days=7)
"""A certificate this close to its end is replaced at start, so a server started today does
not begin refusing clients in the middle of a week of uptime."""

CERT_NAME = "server.pem"
KEY_NAME = "server.key"

_WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})

GeneralName = x509.DNSName | x509.IPAddress


@dataclass(frozen=True)
class ServerCertificate:
    """A certificate and key on disk, with what ``serve`` tells its users about them."""

    cert_path: Path
    key_path: Path
    fingerprint: str
    """SHA-256 of the DER certificate, colon-separated upper-case hex (openssl's format)."""
    names: tuple[str, ...]
    """Subject alternative names, as ``DNS:x`` / ``IP:x``."""
    not_after: dt.datetime
    created: bool
    """True when this call made the certificate (first start, or a renewal)."""
    reason: str
    """Why it was made or reused, for the start-up message."""


def fingerprint_sha256(cert: x509.Certificate) -> str:
    """``AB:CD:...``: the form ``openssl x509 -fingerprint -sha256`` prints and Java's
    keytool shows, so a user can compare it with what a client reports."""
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def read_fingerprint(cert_path: Path) -> str:
    """The fingerprint of the first (the server's own) certificate of a PEM chain file."""
    return fingerprint_sha256(x509.load_pem_x509_certificate(cert_path.read_bytes()))


def required_names(*hosts: str) -> list[GeneralName]:
    """The names a certificate for a server reached as ``hosts`` must carry.

    Always ``localhost`` and ``127.0.0.1`` (clients on the same machine); each host that is
    another name or address; for a wildcard bind (``0.0.0.0``, ``::``) the machine's host
    name, which is what remote clients will most likely type.
    """
    names: list[GeneralName] = [x509.DNSName("localhost"),
                                x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    for host in hosts:
        if host in _WILDCARD_HOSTS:
            candidates = {socket.gethostname(), socket.getfqdn()}
            names.extend(x509.DNSName(n) for n in sorted(candidates) if n and n != "localhost")
            continue
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host.strip("[]"))))
        except ValueError:
            names.append(x509.DNSName(host.lower()))
    return _unique(names)


def ensure_certificate(home: Path, host: str, *, also: Sequence[str] = (),
                       now: dt.datetime | None = None) -> ServerCertificate:
    """The certificate under ``<home>/tls`` for a server bound to ``host`` (and reached by
    the names in ``also``, e.g. ``--public-url``'s host): reused when it is valid, covers
    them and matches its key; otherwise a new key and certificate replace it (keeping the
    names the old one had, so alternating binds do not churn it).

    The key is written with mode 0600 from its first byte; both files are replaced
    atomically, so a crash never leaves a certificate beside a key it does not belong to.
    """
    now = now or dt.datetime.now(dt.UTC)
    directory = home / "tls"
    cert_path, key_path = directory / CERT_NAME, directory / KEY_NAME
    wanted = required_names(host, *also)
    old = _load(cert_path, key_path)
    if isinstance(old, x509.Certificate):
        reason = _renewal_reason(old, key_path, wanted, now)
        if reason is None:
            return _describe(old, cert_path, key_path, created=False,
                             reason=f"reused {cert_path}")
        wanted = _unique(wanted + _san(old))
    else:
        reason = old
    cert = _write_new(directory, cert_path, key_path, wanted, now)
    return _describe(cert, cert_path, key_path, created=True,
                     reason=f"made {cert_path} ({reason})")


def _load(cert_path: Path, key_path: Path) -> x509.Certificate | str:
    """The stored certificate if it and its key are readable and belong together, else why
    a new one is needed."""
    if not cert_path.exists() and not key_path.exists():
        return "none yet"
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        return f"the old one was unreadable: {exc}"
    if key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) != \
            cert.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo):
        return "the old key did not match the certificate"
    return cert


def _renewal_reason(cert: x509.Certificate, key_path: Path, wanted: list[GeneralName],
                    now: dt.datetime) -> str | None:
    if cert.not_valid_after_utc - RENEW_BEFORE <= now:
        return f"the old one expired or expires soon ({cert.not_valid_after_utc:%Y-%m-%d})"
    if cert.not_valid_before_utc > now:
        return f"the old one is not valid before {cert.not_valid_before_utc:%Y-%m-%d}"
    have = {_label(n) for n in _san(cert)}
    missing = [_label(n) for n in wanted if _label(n) not in have]
    if missing:
        return f"the old one did not name {', '.join(missing)}"
    if key_path.stat().st_mode & 0o077:
        return f"the old key {key_path} was readable by other users"
    return None


def _write_new(directory: Path, cert_path: Path, key_path: Path, names: list[GeneralName],
               now: dt.datetime) -> x509.Certificate:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "dicomlake"),
                         x509.NameAttribute(NameOID.COMMON_NAME, _common_name(names))])
    public = key.public_key()
    cert = (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject)
            .public_key(public).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))  # clients with a slow clock
            .not_valid_after(now + VALIDITY)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            # not a CA: trusting this file trusts this one certificate, never others
            # signed with its key (OpenSSL and Java take a self-signed leaf as its own anchor)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, key_encipherment=True, key_cert_sign=False,
                content_commitment=False, data_encipherment=False, key_agreement=False,
                crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public),
                           critical=False)
            .sign(key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    _write_atomic(key_path, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()), mode=0o600)
    _write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    return cert


def _write_atomic(path: Path, data: bytes, *, mode: int) -> None:
    """Write beside ``path`` with ``mode`` set at creation (a key is never briefly world
    readable), then rename over it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have taken bits off; an old file kept its own
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _describe(cert: x509.Certificate, cert_path: Path, key_path: Path, *, created: bool,
              reason: str) -> ServerCertificate:
    return ServerCertificate(cert_path=cert_path, key_path=key_path,
                             fingerprint=fingerprint_sha256(cert),
                             names=tuple(_label(n) for n in _san(cert)),
                             not_after=cert.not_valid_after_utc, created=created,
                             reason=reason)


def _san(cert: x509.Certificate) -> list[GeneralName]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return [n for n in ext.value if isinstance(n, (x509.DNSName, x509.IPAddress))]


def _label(name: GeneralName) -> str:
    if isinstance(name, x509.IPAddress):
        return f"IP:{name.value}"
    return f"DNS:{name.value}"


def _unique(names: list[GeneralName]) -> list[GeneralName]:
    seen: dict[str, GeneralName] = {}
    for name in names:
        seen.setdefault(_label(name), name)
    return list(seen.values())


def _common_name(names: list[GeneralName]) -> str:
    """The last name added (the bound host, when it is not loopback), else ``localhost``:
    clients match on the alternative names; the CN is only what people read."""
    for name in reversed(names):
        if isinstance(name, x509.DNSName) and name.value != "localhost":
            return name.value
    return "localhost"
