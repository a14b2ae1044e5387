"""Ed25519 signing: the worker's key, DSSE envelopes, and the public key users verify with.

The private key lives only in the worker process (read from ``signing.key`` or
``signing.key_file``); build steps never see it: they get only Go variables, and the
docker sandbox mounts nothing but the work and cache directories.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from kiln.errors import KilnError

ALGORITHM = "ed25519"
#: DSSE payload type of an in-toto statement
INTOTO_PAYLOAD_TYPE = "application/vnd.in-toto+json"
#: bytes of a raw ed25519 private key (seed) and public key
RAW_KEY_BYTES = 32
SIGNATURE_BYTES = 64


class SigningKeyError(KilnError, ValueError):
    """A key cannot be read; the message says which formats are accepted."""


def _b64decode(text: str) -> bytes | None:
    cleaned = "".join(text.split())
    try:
        return base64.b64decode(cleaned, validate=True)
    except (binascii.Error, ValueError):
        try:
            return base64.urlsafe_b64decode(cleaned + "=" * (-len(cleaned) % 4))
        except (binascii.Error, ValueError):
            return None


def load_private_key(data: str | bytes) -> Ed25519PrivateKey:
    """Read an ed25519 private key: PKCS#8 PEM, OpenSSH PEM, or base64 of the raw 32-byte seed."""
    raw = data.encode() if isinstance(data, str) else data
    stripped = raw.strip()
    if len(raw) == RAW_KEY_BYTES and not stripped.startswith(b"-----"):
        return Ed25519PrivateKey.from_private_bytes(raw)
    try:
        if stripped.startswith(b"-----BEGIN OPENSSH PRIVATE KEY"):
            key: Any = serialization.load_ssh_private_key(stripped, password=None)
        elif stripped.startswith(b"-----BEGIN"):
            key = serialization.load_pem_private_key(stripped, password=None)
        else:
            decoded = _b64decode(stripped.decode("ascii", "replace"))
            # 64 bytes: NaCl/libsodium's seed || public key
            if decoded is None or len(decoded) not in (RAW_KEY_BYTES, 2 * RAW_KEY_BYTES):
                raise SigningKeyError(
                    "not an ed25519 private key: give a PEM (-----BEGIN PRIVATE KEY-----) "
                    "or the base64 of the raw 32-byte key"
                )
            key = Ed25519PrivateKey.from_private_bytes(decoded[:RAW_KEY_BYTES])
            if len(decoded) == 2 * RAW_KEY_BYTES and public_raw(key.public_key()) != decoded[32:]:
                raise SigningKeyError("the 64-byte key's second half is not its public key")
    except (ValueError, TypeError) as exc:
        if isinstance(exc, SigningKeyError):
            raise
        raise SigningKeyError(f"not a readable private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"the key is {type(key).__name__.lstrip('_')}, not ed25519")
    return key


def load_public_key(data: str | bytes) -> Ed25519PublicKey:
    """Read an ed25519 public key: PEM, an OpenSSH line, or base64 of the raw 32 bytes."""
    raw = data.encode() if isinstance(data, str) else data
    stripped = raw.strip()
    if len(raw) == RAW_KEY_BYTES and not stripped.startswith((b"-----", b"ssh-")):
        return Ed25519PublicKey.from_public_bytes(raw)
    try:
        if stripped.startswith(b"-----BEGIN"):
            key: Any = serialization.load_pem_public_key(stripped)
        elif stripped.startswith(b"ssh-ed25519 "):
            key = serialization.load_ssh_public_key(stripped)
        else:
            decoded = _b64decode(stripped.decode("ascii", "replace"))
            if decoded is None or len(decoded) != RAW_KEY_BYTES:
                raise SigningKeyError(
                    "not an ed25519 public key: give a PEM (-----BEGIN PUBLIC KEY-----), "
                    "an ssh-ed25519 line, or the base64 of the raw 32-byte key"
                )
            key = Ed25519PublicKey.from_public_bytes(decoded)
    except (ValueError, TypeError) as exc:
        if isinstance(exc, SigningKeyError):
            raise
        raise SigningKeyError(f"not a readable public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SigningKeyError(f"the key is {type(key).__name__.lstrip('_')}, not ed25519")
    return key


def public_raw(key: Ed25519PublicKey) -> bytes:
    """Return the 32 raw bytes of a public key."""
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_pem(key: Ed25519PublicKey) -> str:
    """Return a public key as SubjectPublicKeyInfo PEM (what openssl reads)."""
    return key.public_bytes(serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def key_id(key: Ed25519PublicKey) -> str:
    """Return the key's id: the hex sha256 of its raw public bytes."""
    return hashlib.sha256(public_raw(key)).hexdigest()


def private_pem(key: Ed25519PrivateKey) -> bytes:
    """Return a private key as unencrypted PKCS#8 PEM."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@dataclass(frozen=True)
class PublicKey:
    """A verification key with its id."""

    key: Ed25519PublicKey

    @property
    def id(self) -> str:
        return key_id(self.key)

    @property
    def pem(self) -> str:
        return public_pem(self.key)

    @property
    def raw_b64(self) -> str:
        return base64.b64encode(public_raw(self.key)).decode()

    def verify(self, signature: bytes, data: bytes) -> bool:
        """Tell whether ``signature`` is this key's signature of ``data``."""
        try:
            self.key.verify(signature, data)
        except InvalidSignature:
            return False
        return True


class Signer:
    """Holds the private key; signs artifacts and DSSE payloads."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self.public = PublicKey(key.public_key())

    @property
    def key_id(self) -> str:
        return self.public.id

    def __repr__(self) -> str:  # never the key itself
        return f"Signer(key_id={self.key_id[:16]}…)"

    def sign(self, data: bytes) -> bytes:
        """Return the 64-byte ed25519 signature of ``data``."""
        return self._key.sign(data)

    def sign_file(self, path: Path) -> bytes:
        """Sign a file's bytes (ed25519 signs the whole message, as openssl -rawin does)."""
        return self.sign(path.read_bytes())

    def envelope(self, payload: bytes, payload_type: str = INTOTO_PAYLOAD_TYPE) -> dict[str, Any]:
        """Return a DSSE envelope of ``payload`` signed by this key."""
        return {
            "payloadType": payload_type,
            "payload": base64.b64encode(payload).decode(),
            "signatures": [{
                "keyid": self.key_id,
                "sig": base64.b64encode(self.sign(pae(payload_type, payload))).decode(),
            }],
        }


def unsigned_envelope(payload: bytes, payload_type: str = INTOTO_PAYLOAD_TYPE) -> dict[str, Any]:
    """Return a DSSE envelope with no signatures (a worker without a key)."""
    return {"payloadType": payload_type, "payload": base64.b64encode(payload).decode(),
            "signatures": []}


def pae(payload_type: str, payload: bytes) -> bytes:
    """Return DSSE's pre-authentication encoding: the bytes a DSSE signature covers."""
    kind = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


class EnvelopeError(KilnError, ValueError):
    """A DSSE envelope is malformed or not signed by the expected key."""


def open_envelope(envelope: dict[str, Any], key: PublicKey | None) -> tuple[str, bytes]:
    """Return (payload type, payload) of an envelope; with ``key``, require its valid signature."""
    try:
        payload_type = str(envelope["payloadType"])
        payload = base64.b64decode(envelope["payload"], validate=True)
        signatures = list(envelope.get("signatures") or [])
    except (KeyError, TypeError, ValueError, binascii.Error) as exc:
        raise EnvelopeError(f"not a DSSE envelope: {exc}") from None
    if key is None:
        return payload_type, payload
    if not signatures:
        raise EnvelopeError("the envelope has no signature")
    message = pae(payload_type, payload)
    for entry in signatures:
        try:
            sig = base64.b64decode(entry["sig"], validate=True)
        except (KeyError, TypeError, ValueError, binascii.Error):
            continue
        if key.verify(sig, message):
            return payload_type, payload
    ids = ", ".join(str(s.get("keyid", "?"))[:16] for s in signatures if isinstance(s, dict))
    raise EnvelopeError(f"no signature in the envelope verifies with key {key.id[:16]} "
                        f"(signed by: {ids or 'unknown'})")


def canonical_json(data: Any) -> bytes:
    """Return JSON with sorted keys and no whitespace (stable bytes to sign)."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def generate_key_file(path: Path) -> Ed25519PrivateKey:
    """Create a new private key as PEM at ``path`` (mode 0600), or read the one there."""
    if path.exists():
        return load_private_key(path.read_bytes())
    path.parent.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    # O_EXCL: two processes starting at once must not each write a different key
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return load_private_key(path.read_bytes())
    with os.fdopen(fd, "wb") as f:
        f.write(private_pem(key))
    return key


def signer_from_settings(*, key: str, key_file: Path | None) -> Signer | None:
    """Return the Signer the settings name (inline key first, then the file), or None."""
    if key.strip():
        try:
            return Signer(load_private_key(key))
        except SigningKeyError as exc:
            raise SigningKeyError(f"signing.key: {exc}") from None
    if key_file is not None and str(key_file):
        try:
            data = key_file.read_bytes()
        except OSError as exc:
            raise SigningKeyError(f"signing.key_file: cannot read {key_file}: {exc.strerror}") from None
        try:
            return Signer(load_private_key(data))
        except SigningKeyError as exc:
            raise SigningKeyError(f"signing.key_file {key_file}: {exc}") from None
    return None
