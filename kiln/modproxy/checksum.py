"""What the go command checks before it trusts a module: go.sum hashes and the checksum database.

``h1:`` hashes follow golang.org/x/mod/sumdb/dirhash ``Hash1``: SHA-256 over the sorted lines
``"<hex sha256 of the file>  <name>\\n"``, one per file of the module zip (named as in the zip,
``module@version/path``), base64 encoded. A go.mod is hashed as one file named ``go.mod``.

A lookup of the checksum database (``/lookup/<module>@<version>``, asked through the module
proxy's ``/sumdb/<name>/`` endpoint as the go command asks it) answers the record (the two go.sum
lines of that version) and a signed note of the log's tree head. ``SumDB.lookup`` checks that
note's Ed25519 signature against the database's public key (golang.org/x/mod/sumdb/note) and that
the record names the module and version asked for. It does not check the record's inclusion in
the signed tree (the tiles' Merkle proof): the go command of the fetch step, which asks the same
database through the same proxy, does that, with its own persistent view of the tree.
"""

from __future__ import annotations

import base64
import hashlib
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from kiln.errors import KilnError

#: the verifier keys the go command knows by name (cmd/go/internal/modfetch/key.go)
KNOWN_SUMDBS = {
    "sum.golang.org": "sum.golang.org+033de0ae+Ac4zctda0e5eza+HJyk9SxEdh+s3Ux18htTTAD8OuAn8",
    "sum.golang.google.cn":
        "sum.golang.org+033de0ae+Ac4zctda0e5eza+HJyk9SxEdh+s3Ux18htTTAD8OuAn8",
}
_ALG_ED25519 = 1
_CHUNK = 1 << 20
#: what a signature line of a note starts with (an em dash and a space)
_SIG_PREFIX = "\u2014 "


class ChecksumMismatch(KilnError):
    """A download does not match the hash the checksum database (or go.sum) has for it."""


class SumDBError(KilnError):
    """The checksum database's answer cannot be trusted or read."""


def _hash1(lines: list[tuple[str, str]]) -> str:
    summary = hashlib.sha256()
    for name, digest in sorted(lines):
        if "\n" in name:
            raise ChecksumMismatch("dirhash: filenames with newlines are not supported")
        summary.update(f"{digest}  {name}\n".encode())
    return "h1:" + base64.b64encode(summary.digest()).decode()


def hash_zip(path: Path | IO[bytes]) -> str:
    """Return the h1: hash of a module zip, as dirhash.HashZip computes it."""
    with zipfile.ZipFile(path) as zf:
        by_name = {info.filename: info for info in zf.infolist()}
        names = [info.filename for info in zf.infolist()]
        lines = []
        for name in names:
            digest = hashlib.sha256()
            with zf.open(by_name[name]) as member:
                while chunk := member.read(_CHUNK):
                    digest.update(chunk)
            lines.append((name, digest.hexdigest()))
    return _hash1(lines)


def hash_go_mod(data: bytes) -> str:
    """Return the h1: hash of a go.mod file, as dirhash hashes it for go.sum."""
    return _hash1([("go.mod", hashlib.sha256(data).hexdigest())])


@dataclass(frozen=True)
class Verifier:
    """A note verifier key: ``<name>+<hash>+<base64 of algorithm byte and Ed25519 key>``."""

    name: str
    key_hash: int
    key: Ed25519PublicKey

    @classmethod
    def parse(cls, text: str) -> Verifier:
        """Parse a verifier key; raise SumDBError saying what is wrong with it."""
        name, _, rest = text.partition("+")
        hash_hex, _, key64 = rest.partition("+")
        try:
            raw = base64.b64decode(key64, validate=True)
            key_hash = int(hash_hex, 16)
        except ValueError:
            raise SumDBError(f"{text!r} is not a checksum database key "
                             "(name+hash+base64 key)") from None
        if not name or len(hash_hex) != 8 or len(raw) != 33 or raw[0] != _ALG_ED25519:
            raise SumDBError(f"{text!r} is not an Ed25519 checksum database key")
        if _key_hash(name, raw) != key_hash:
            raise SumDBError(f"{text!r}: the key hash does not match the key")
        return cls(name=name, key_hash=key_hash, key=Ed25519PublicKey.from_public_bytes(raw[1:]))


def _key_hash(name: str, raw: bytes) -> int:
    return int(struct.unpack(">I", hashlib.sha256(name.encode() + b"\n" + raw).digest()[:4])[0])


def parse_gosumdb(value: str) -> Verifier | None:
    """Return the verifier a GOSUMDB value names (None for ``off``).

    A known name (sum.golang.org) or ``name+hash+key``, optionally followed by a URL,
    which is ignored: the database is always asked through the upstream proxy.
    """
    value = value.strip().split()[0] if value.strip() else "off"
    if value == "off":
        return None
    return Verifier.parse(KNOWN_SUMDBS.get(value, value))


def verify_note(message: bytes, verifier: Verifier) -> str:
    """Check a signed note's signature by ``verifier``; return its text."""
    try:
        text = message.decode("utf-8")
    except UnicodeDecodeError:
        raise SumDBError("the signed tree note is not UTF-8") from None
    body, sep, signatures = text.rpartition("\n\n")
    if not sep:
        raise SumDBError("the tree note has no signatures")
    body += "\n"
    for line in signatures.splitlines():
        if not line.startswith(_SIG_PREFIX):
            raise SumDBError(f"malformed signature line in the tree note: {line!r}")
        name, _, sig64 = line[len(_SIG_PREFIX):].partition(" ")
        if name != verifier.name:
            continue
        try:
            raw = base64.b64decode(sig64, validate=True)
        except ValueError:
            raise SumDBError("a signature of the tree note is not base64") from None
        if len(raw) < 5 or struct.unpack(">I", raw[:4])[0] != verifier.key_hash:
            continue
        try:
            verifier.key.verify(raw[4:], body.encode())
        except InvalidSignature:
            raise SumDBError(f"the tree note's signature by {name} is invalid") from None
        return body
    raise SumDBError(f"the tree note is not signed by {verifier.name}")


@dataclass(frozen=True)
class Sums:
    """The go.sum hashes of one module version: of its zip and of its go.mod."""

    zip: str
    mod: str


def parse_lookup(answer: bytes, module: str, version: str, verifier: Verifier) -> Sums:
    """Return the hashes of a checksum database lookup answer, after checking its note."""
    record, sep, note = answer.partition(b"\n\n")
    if not sep:
        raise SumDBError(f"{verifier.name} answered a lookup of {module}@{version} "
                         "without a signed tree note")
    verify_note(note, verifier)
    lines = record.decode("utf-8", "replace").splitlines()[1:]  # the first is the record id
    found: dict[str, str] = {}
    for line in lines:
        fields = line.split()
        if len(fields) != 3 or fields[0] != module:
            raise SumDBError(f"{verifier.name}'s record for {module}@{version} has a "
                             f"line about something else: {line!r}")
        found[fields[1]] = fields[2]
    zip_hash, mod_hash = found.get(version), found.get(f"{version}/go.mod")
    if zip_hash is None or mod_hash is None:
        raise SumDBError(f"{verifier.name}'s record for {module}@{version} lacks its hashes")
    return Sums(zip=zip_hash, mod=mod_hash)


def mismatch_message(module: str, version: str, *, kind: str, downloaded: str, expected: str,
                     source: str) -> str:
    """Return the go command's message for a download that does not match its checksum."""
    what = f"{module}@{version}" + ("/go.mod" if kind == "mod" else "")
    # no blank line, unlike go's: go quotes a proxy's answer only up to its first blank line
    return (f"verifying {what}: checksum mismatch\n"
            f"\tdownloaded: {downloaded}\n"
            f"\t{source}: {expected}\n"
            "SECURITY ERROR\n"
            "This download does NOT match the one reported by the checksum server.\n")


class Checksums(Protocol):
    """Where the expected hashes of a module version come from."""

    name: str

    def sums(self, module: str, version: str) -> Sums | None:
        """Return the expected hashes, or None when the source does not know the version."""
        ...
