"""The caddy-proxy's own CA and caddyserver.com certificate."""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kiln.errors import KilnError

log = logging.getLogger("kiln.caddyproxy")


#: the host and port the caddy binary's requests go to, the only CONNECT target allowed
TARGET_HOST = "caddyserver.com"
CA_DAYS = 3650
LEAF_DAYS = 365
#: the leaf is issued again at start when it has fewer days left than this
RENEW_DAYS = 30


class CaddyProxyError(KilnError):
    """The proxy cannot start; the message says why."""


@dataclass(frozen=True)
class CertificateFiles:
    """The files of ``--ca-dir``."""

    #: the CA's certificate: what clients get as SSL_CERT_FILE
    ca_cert: Path
    ca_key: Path
    #: the caddyserver.com certificate the proxy serves, and its key
    cert: Path
    key: Path

    @classmethod
    def in_dir(cls, ca_dir: Path, host: str = TARGET_HOST) -> CertificateFiles:
        """Return the file names under ``ca_dir``."""
        ca_dir = ca_dir.resolve()
        return cls(ca_cert=ca_dir / "ca.pem", ca_key=ca_dir / "ca-key.pem",
                   cert=ca_dir / f"{host}.pem", key=ca_dir / f"{host}-key.pem")


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write a file atomically with ``mode`` (keys never exist world-readable, even briefly)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _new_ca(files: CertificateFiles, now: dt.datetime) -> tuple[x509.Certificate,
                                                                 ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Kiln"),
        x509.NameAttribute(NameOID.COMMON_NAME, f"Kiln caddy-proxy CA ({socket.gethostname()})"),
    ])
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        # path length 0: this CA signs the proxy's leaf certificates, never another CA
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(files.ca_key, _key_pem(key), 0o600)
    _write(files.ca_cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert, key


def _same_key(key: Any, cert: x509.Certificate) -> bool:
    """Report whether ``key`` is an EC private key whose public half ``cert`` certifies."""
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return (isinstance(key, ec.EllipticCurvePrivateKey)
            and key.public_key().public_bytes(*spki) == cert.public_key().public_bytes(*spki))


def _load_ca(files: CertificateFiles) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
        key = serialization.load_pem_private_key(files.ca_key.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise CaddyProxyError(f"cannot read the CA in {files.ca_cert.parent}: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not _same_key(key, cert):
        raise CaddyProxyError(f"{files.ca_key} is not the key of {files.ca_cert}")
    return cert, key


def _leaf_usable(files: CertificateFiles, ca: x509.Certificate, host: str,
                 now: dt.datetime) -> bool:
    """Report whether the kept leaf is for ``host``, issued by ``ca`` and not near expiry."""
    try:
        cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
        key = serialization.load_pem_private_key(files.key.read_bytes(), password=None)
        cert.verify_directly_issued_by(ca)
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, TypeError, x509.ExtensionNotFound, InvalidSignature):
        return False
    return (host in names.get_values_for_type(x509.DNSName) and _same_key(key, cert)
            and cert.not_valid_after_utc - now > dt.timedelta(days=RENEW_DAYS))


def _new_leaf(files: CertificateFiles, ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
              host: str, now: dt.datetime) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(ca.subject).public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(min(now + dt.timedelta(days=LEAF_DAYS), ca.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write(files.key, _key_pem(key), 0o600)
    _write(files.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def ensure_certificates(ca_dir: Path, *, host: str = TARGET_HOST,
                        now: Callable[[], dt.datetime] = _utcnow) -> CertificateFiles:
    """Create (or keep) the CA and ``host``'s certificate in ``ca_dir``; return their files.

    The CA is made once and kept: clients trust it through SSL_CERT_FILE. The leaf is
    issued again when it is missing, not the CA's, or within RENEW_DAYS of expiry.
    """
    files = CertificateFiles.in_dir(ca_dir, host)
    try:
        files.ca_cert.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise CaddyProxyError(f"cannot create {files.ca_cert.parent}: {exc}") from None
    at = now()
    have = (files.ca_cert.exists(), files.ca_key.exists())
    if have == (False, False):
        ca, ca_key = _new_ca(files, at)
        log.info("created a CA in %s", files.ca_cert)
    elif have == (True, True):
        ca, ca_key = _load_ca(files)
    else:
        present = files.ca_cert if have[0] else files.ca_key
        raise CaddyProxyError(f"{present} is there without its pair; restore it or empty "
                              f"{files.ca_cert.parent} to make a new CA (clients must then "
                              "get the new ca.pem)")
    if ca.not_valid_after_utc - at < dt.timedelta(days=RENEW_DAYS):
        raise CaddyProxyError(f"the CA {files.ca_cert} expires on {ca.not_valid_after_utc:%Y-%m-%d};"
                              f" empty {files.ca_cert.parent} to make a new one")
    if not _leaf_usable(files, ca, host, at):
        _new_leaf(files, ca, ca_key, host, at)
        log.info("issued a certificate for %s in %s", host, files.cert)
    return files


def server_context(files: CertificateFiles) -> ssl.SSLContext:
    """Return the TLS context the proxy serves caddyserver.com with."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(files.cert, files.key)
    # HTTP/1.1 only: Go's client offers h2 too, and would take it if we named it
    context.set_alpn_protocols(["http/1.1"])
    return context
