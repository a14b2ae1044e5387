"""kiln caddy-proxy's certificates and arguments (the proxy itself: tests/e2e/test_caddy_client.py)."""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import pytest
from cryptography import x509

from kiln.client.caddyproxy import parse_listen
from kiln.client.certs import (
    LEAF_DAYS,
    RENEW_DAYS,
    TARGET_HOST,
    CaddyProxyError,
    ensure_certificates,
)

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_the_ca_and_leaf_are_made_once_and_kept(tmp_path: Path) -> None:
    files = ensure_certificates(tmp_path / "ca", now=lambda: NOW)
    ca, leaf = load(files.ca_cert), load(files.cert)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == [TARGET_HOST]
    leaf.verify_directly_issued_by(ca)
    for key in (files.ca_key, files.key):
        assert key.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "ca").stat().st_mode & 0o777 == 0o700
    before = {p: p.read_bytes() for p in (files.ca_cert, files.ca_key, files.cert, files.key)}
    again = ensure_certificates(tmp_path / "ca", now=lambda: NOW + dt.timedelta(days=100))
    assert again == files
    assert {p: p.read_bytes() for p in before} == before


def test_the_leaf_is_issued_again_near_its_expiry_by_the_same_ca(tmp_path: Path) -> None:
    files = ensure_certificates(tmp_path, now=lambda: NOW)
    ca, leaf = files.ca_cert.read_bytes(), files.cert.read_bytes()
    later = NOW + dt.timedelta(days=LEAF_DAYS - RENEW_DAYS + 1)
    ensure_certificates(tmp_path, now=lambda: later)
    assert files.ca_cert.read_bytes() == ca
    assert files.cert.read_bytes() != leaf
    renewed = load(files.cert)
    renewed.verify_directly_issued_by(load(files.ca_cert))
    assert renewed.not_valid_after_utc > later + dt.timedelta(days=RENEW_DAYS)


def test_a_leaf_of_another_ca_is_replaced(tmp_path: Path) -> None:
    mine = ensure_certificates(tmp_path / "mine", now=lambda: NOW)
    other = ensure_certificates(tmp_path / "other", now=lambda: NOW)
    shutil.copy(other.cert, mine.cert)
    shutil.copy(other.key, mine.key)
    ensure_certificates(tmp_path / "mine", now=lambda: NOW)
    load(mine.cert).verify_directly_issued_by(load(mine.ca_cert))


def test_a_ca_without_its_key_is_refused_not_replaced(tmp_path: Path) -> None:
    files = ensure_certificates(tmp_path, now=lambda: NOW)
    files.ca_key.unlink()
    ca = files.ca_cert.read_bytes()
    with pytest.raises(CaddyProxyError, match="without its pair"):
        ensure_certificates(tmp_path, now=lambda: NOW)
    assert files.ca_cert.read_bytes() == ca
    files.ca_key.write_text("not a key")
    with pytest.raises(CaddyProxyError, match="cannot read the CA"):
        ensure_certificates(tmp_path, now=lambda: NOW)


@pytest.mark.parametrize(("value", "expected"), [
    ("127.0.0.1:8443", ("127.0.0.1", 8443)),
    ("0.0.0.0:0", ("0.0.0.0", 0)),
    ("[::1]:8443", ("::1", 8443)),
    ("localhost:3128", ("localhost", 3128)),
])
def test_listen_addresses(value: str, expected: tuple[str, int]) -> None:
    assert parse_listen(value) == expected


@pytest.mark.parametrize("value", ["8443", ":8443", "host:", "host:http", "host:70000"])
def test_bad_listen_addresses(value: str) -> None:
    with pytest.raises(CaddyProxyError, match="HOST:PORT"):
        parse_listen(value)
