"""What lets a user prove where a binary came from: public key, signature, checksum,
provenance and SBOM of each build, and the builds that produced a given sha256.

| route | answer |
|---|---|
| ``GET /api/signing-key`` | the current public key (PEM and raw base64) and every earlier one; ``?format=pem``: the PEM alone |
| ``GET /api/builds/{key}/artifact.sig`` | the raw 64-byte ed25519 signature of the binary |
| ``GET /api/builds/{key}/artifact.sha256`` | ``<hex>  <filename>`` (sha256sum format) |
| ``GET /api/builds/{key}/provenance`` | DSSE envelope of the in-toto SLSA provenance statement |
| ``GET /api/builds/{key}/sbom`` | CycloneDX 1.5 JSON |
| ``GET /api/artifacts/{sha256}`` | the succeeded builds whose binary has that sha256 |
| ``GET /api/groups/{id}`` | a multi-platform request's builds (kiln/api/groups.py) |
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

import falcon

from kiln.api.documents import build_links, load_build
from kiln.api.errors import not_found, unavailable
from kiln.artifacts.provenance import (
    DSSE_MEDIA_TYPE,
    PROVENANCE_NAME,
    SBOM_MEDIA_TYPE,
    SBOM_NAME,
    checksum_line,
)
from kiln.artifacts.signing import PublicKey, load_public_key
from kiln.artifacts.store import ArtifactStore, StorageError
from kiln.db.attestations import AttestManager
from kiln.db.builds import Build, QueueManager
from kiln.errors import SpecError
from kiln.request.spec import BuildSpec

SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")
KEY_ID_HEADER = "X-Kiln-Key-Id"
#: attestations of a key can be replaced by a rebuild: cache briefly, not forever
CACHE_CONTROL = "public, max-age=300"


def key_document(row: dict[str, Any]) -> dict[str, Any]:
    """Return the public JSON form of a signing key row."""
    key = PublicKey(load_public_key(row["public_key"]))
    return {
        "algorithm": row["algorithm"],
        "key_id": row["key_id"],
        "public_key": row["public_key"],
        "public_key_pem": key.pem,
        "created_at": row["created_at"].isoformat(),
        "last_used_at": row["last_used_at"].isoformat(),
    }


class SigningKeyResource:
    """``/api/signing-key``: the public key artifacts are signed with."""

    def __init__(self, *, records: AttestManager) -> None:
        self.records = records

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        rows = self.records.signing_keys()
        wanted = req.get_param("key_id") or ""
        if wanted:
            rows = [r for r in rows if r["key_id"].startswith(wanted.lower())]
            if not rows:
                raise not_found(f"no signing key with id {wanted}")
        if not rows:
            raise not_found("no worker has registered a signing key: set signing.key or "
                            "signing.key_file on the workers")
        keys = [key_document(r) for r in rows]
        current = keys[0]
        if req.get_param("format") == "pem":
            resp.content_type = "application/x-pem-file"
            resp.text = current["public_key_pem"]
            resp.set_header(KEY_ID_HEADER, current["key_id"])
            return
        resp.media = {**current, "keys": keys}
        resp.set_header(KEY_ID_HEADER, current["key_id"])


class _BuildFile:
    """Shared reading of one attestation file of a succeeded build."""

    kind = ""

    def __init__(self, *, queue: QueueManager, store: ArtifactStore,
                 records: AttestManager) -> None:
        self.queue = queue
        self.store = store
        self.records = records

    def _succeeded(self, key: str) -> tuple[Build, str]:
        row = load_build(self.queue, key)
        if row.state != "succeeded":
            raise not_found(f"build {key} is {row.state}; its {self.kind} exists once it "
                            "has succeeded")
        if not row.artifact_path:
            raise not_found(f"the artifact of build {key} was removed from the store; ask "
                            "for the build again to rebuild it")
        try:
            filename = BuildSpec.from_dict(row.spec).filename
        except SpecError as exc:
            raise not_found(f"build {key} has an unreadable spec: {exc}") from None
        return row, filename

    def _attestation(self, row: Build) -> dict[str, Any] | None:
        record = self.records.get(row.key)
        # a rebuild may be replacing the files: never pair them with another binary
        if record is None or record["artifact_sha256"] != row.artifact_sha256:
            return None
        return record

    def _read(self, path: str) -> bytes:
        try:
            with self.store.open(path) as f:
                return f.read()
        except StorageError as exc:
            raise unavailable(f"the {self.kind} cannot be read now: {exc}") from None

    def _file(self, key: str, kind: str, missing: str) -> tuple[Build, str,
                                                                 dict[str, Any], bytes]:
        row, filename = self._succeeded(key)
        record = self._attestation(row)
        path = record["files"].get(kind) if record else None
        if not path:
            raise not_found(missing.format(key=key))
        assert record is not None
        return row, filename, record, self._read(path)


class SignatureResource(_BuildFile):
    """``/api/builds/{key}/artifact.sig``: the raw ed25519 signature of the binary."""

    kind = "signature"

    def on_get(self, req: falcon.Request, resp: falcon.Response, key: str) -> None:
        _row, filename, record, data = self._file(
            key, "signature", "build {key} was not signed: its worker had no signing key")
        resp.content_type = "application/octet-stream"
        resp.downloadable_as = filename + ".sig"
        resp.set_header(KEY_ID_HEADER, record["key_id"] or "")
        resp.set_header("Cache-Control", CACHE_CONTROL)
        resp.data = data

    on_head = on_get


class ChecksumResource(_BuildFile):
    """``/api/builds/{key}/artifact.sha256``: ``<hex>  <filename>``."""

    kind = "checksum"

    def on_get(self, req: falcon.Request, resp: falcon.Response, key: str) -> None:
        row, filename = self._succeeded(key)
        record = self._attestation(row)
        path = record["files"].get("checksum") if record else None
        # builds stored before attestations existed still have a recorded sha256
        data = self._read(path) if path else checksum_line(str(row.artifact_sha256),
                                                           filename).encode()
        resp.content_type = "text/plain; charset=utf-8"
        resp.downloadable_as = filename + ".sha256"
        resp.set_header("Cache-Control", CACHE_CONTROL)
        resp.data = data

    on_head = on_get


class ProvenanceResource(_BuildFile):
    """``/api/builds/{key}/provenance``: the signed SLSA provenance (a DSSE envelope)."""

    kind = "provenance"

    def on_get(self, req: falcon.Request, resp: falcon.Response, key: str) -> None:
        _row, _filename, record, data = self._file(
            key, "provenance", "build {key} has no provenance: it was built before Kiln "
            "recorded provenance; ask for a rebuild")
        resp.content_type = DSSE_MEDIA_TYPE
        resp.downloadable_as = PROVENANCE_NAME
        if record["key_id"]:
            resp.set_header(KEY_ID_HEADER, record["key_id"])
        resp.set_header("Cache-Control", CACHE_CONTROL)
        resp.data = data


class SbomResource(_BuildFile):
    """``/api/builds/{key}/sbom``: CycloneDX JSON of the modules linked into the binary."""

    kind = "SBOM"

    def on_get(self, req: falcon.Request, resp: falcon.Response, key: str) -> None:
        _row, _filename, _record, data = self._file(
            key, "sbom", "build {key} has no SBOM: it was built before Kiln made SBOMs; "
            "ask for a rebuild")
        resp.content_type = SBOM_MEDIA_TYPE + "; version=1.5"
        resp.downloadable_as = SBOM_NAME
        resp.set_header("Cache-Control", CACHE_CONTROL)
        resp.data = data


class ArtifactLookupResource:
    """``/api/artifacts/{sha256}``: which builds produced a file with this sha256."""

    def __init__(self, *, records: AttestManager) -> None:
        self.records = records

    def on_get(self, req: falcon.Request, resp: falcon.Response, sha256: str) -> None:
        digest = sha256.lower()
        if not SHA256_PATTERN.match(digest):
            try:  # also accept the base64 form some tools print
                digest = base64.b64decode(sha256, validate=True).hex()
            except (binascii.Error, ValueError):
                digest = ""
            if not SHA256_PATTERN.match(digest):
                raise not_found(f"{sha256!r} is not a sha256 (64 hex characters)")
        rows = self.records.builds_by_sha256(digest)
        if not rows:
            raise not_found(f"no succeeded build produced a file with sha256 {digest}")
        builds = []
        for row in rows:
            try:
                filename: str | None = BuildSpec.from_dict(row["spec"]).filename
            except SpecError:
                filename = None
            builds.append({"key": row["key"], "filename": filename, "key_id": row["key_id"],
                           "finished_at": row["finished_at"].isoformat()
                           if row["finished_at"] else None,
                           "links": build_links(row["key"])})
        resp.media = {"sha256": digest, "builds": builds}
