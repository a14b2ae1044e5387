"""Attestations of each artifact: checksum, signature, SLSA provenance and a CycloneDX SBOM.

The worker calls ``Attestor.publish`` after the build and before it marks the build
succeeded. Everything is written into the artifact store next to the binary:

* ``<filename>.sha256``      sha256sum format: ``<hex>  <filename>``
* ``<filename>.sig``         the raw 64-byte ed25519 signature of the binary
  (``openssl pkeyutl -verify -pubin -inkey key.pem -rawin -in FILE -sigfile FILE.sig``)
* ``provenance.intoto.json`` a DSSE envelope of an in-toto Statement v1 with a SLSA
  provenance v1 predicate, signed with the same key
* ``sbom.cdx.json``          CycloneDX 1.5 JSON made from ``go version -m`` of the binary
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
import logging
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from kiln.artifacts.signing import (
    Signer,
    SigningKeyError,
    canonical_json,
    signer_from_settings,
    unsigned_envelope,
)
from kiln.artifacts.store import ArtifactStore, artifact_prefix
from kiln.config import Config
from kiln.db.builds import queries as named_queries
from kiln.gomod.buildinfo import BuildInfo, GoModule, parse_go_version_m
from kiln.request.spec import BuildSpec
from kiln.worker.builder import BuildFailure, BuildOutput, LogSink
from kiln.worker.sandbox import Sandbox, Step

log = logging.getLogger(__name__)

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
SLSA_PROVENANCE_V1 = "https://slsa.dev/provenance/v1"
#: buildType of Kiln's provenance: xcaddy's procedure, as the module docs describe
BUILD_TYPE = "urn:kiln:build-type:caddy:v1"
DEFAULT_BUILDER_ID = "urn:kiln:builder"
CYCLONEDX_VERSION = "1.5"
SBOM_MEDIA_TYPE = "application/vnd.cyclonedx+json"
DSSE_MEDIA_TYPE = "application/vnd.dsse.envelope.v1+json"
PROVENANCE_NAME = "provenance.intoto.json"
SBOM_NAME = "sbom.cdx.json"
#: the sandbox step that reads the binary's build information (no network)
INSPECT = "inspect"
INSPECT_TIMEOUT_SECONDS = 120.0


def checksum_name(filename: str) -> str:
    """Return the store name of an artifact's checksum file."""
    return f"{filename}.sha256"


def signature_name(filename: str) -> str:
    """Return the store name of an artifact's signature file."""
    return f"{filename}.sig"


def checksum_line(sha256: str, filename: str) -> str:
    """Return the sha256sum line of a file (two spaces: text mode, as sha256sum writes)."""
    return f"{sha256}  {filename}\n"


def utc_now() -> dt.datetime:
    """Return the current time in UTC."""
    return dt.datetime.now(dt.UTC)


def _iso(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def kiln_version() -> str:
    """Return the installed Kiln version."""
    try:
        return metadata.version("kiln")
    except metadata.PackageNotFoundError:
        return "0+unknown"


# -- Go modules (kiln/gomod/buildinfo.py parses go version -m) ---------------------------------


def h1_hex(h1: str) -> str | None:
    """Return Go's ``h1:<base64>`` module hash as lowercase hex (in-toto's dirHash)."""
    if not h1.startswith("h1:"):
        return None
    try:
        raw = base64.b64decode(h1[3:], validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw.hex() if len(raw) == 32 else None


def purl(path: str, version: str) -> str:
    """Return the package URL of a Go module."""
    return f"pkg:golang/{path}@{version}?type=module"


# -- provenance ----------------------------------------------------------------------------


def go_sum_dependencies(go_sum: str) -> list[dict[str, Any]]:
    """Return SLSA resolvedDependencies (module URI + dirHash) from go.sum's module lines."""
    out = []
    for line in go_sum.splitlines():
        parts = line.split()
        if len(parts) != 3 or parts[1].endswith("/go.mod"):
            continue
        digest = h1_hex(parts[2])
        if digest is None:
            continue
        out.append({"uri": purl(parts[0], parts[1]), "name": parts[0],
                    "digest": {"dirHash": digest}})
    return out


def provenance_statement(
    *,
    spec: BuildSpec,
    filename: str,
    sha256: str,
    output: BuildOutput,
    info: BuildInfo | None,
    builder_id: str,
    worker_id: str,
    invocation: str,
    started_at: dt.datetime,
    finished_at: dt.datetime,
    byproducts: list[dict[str, Any]],
) -> dict[str, Any]:
    """Return an in-toto Statement v1 with a SLSA provenance v1 predicate for one artifact."""
    settings = dict(info.settings) if info else {}
    # Go leaves -ldflags out of what a -trimpath binary records; they are the spec's
    settings.setdefault("-ldflags", spec.ldflags)
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": filename, "digest": {"sha256": sha256}}],
        "predicateType": SLSA_PROVENANCE_V1,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                # exactly the resolved spec: its canonical JSON's sha256 is the build key
                "externalParameters": spec.to_dict(),
                "internalParameters": {
                    "goVersion": info.go_version if info else spec.go_version,
                    "sandbox": spec.sandbox,
                    # the flags as the binary itself records them (go version -m)
                    "flags": settings,
                    "goMod": output.go_mod,
                    "goSum": output.go_sum,
                },
                "resolvedDependencies": go_sum_dependencies(output.go_sum),
            },
            "runDetails": {
                "builder": {
                    "id": builder_id,
                    "version": {"kiln": kiln_version(), "worker": worker_id},
                },
                "metadata": {
                    "invocationId": invocation,
                    "startedOn": _iso(started_at),
                    "finishedOn": _iso(finished_at),
                },
                "byproducts": byproducts,
            },
        },
    }


# -- SBOM ----------------------------------------------------------------------------------


def _component(module: GoModule) -> dict[str, Any]:
    used = module.replace or module
    ref = purl(used.path, used.version) if used.version else f"pkg:golang/{used.path}"
    component: dict[str, Any] = {
        "type": "library",
        "bom-ref": ref,
        "name": used.path,
        "version": used.version,
        "purl": ref,
        "scope": "required",
    }
    digest = h1_hex(used.sum)
    if digest:
        # as cyclonedx-gomod does: the module's h1 hash, in hex
        component["hashes"] = [{"alg": "SHA-256", "content": digest}]
    if module.replace is not None:
        component["properties"] = [
            {"name": "kiln:go:replaces", "value": f"{module.path}@{module.version}".rstrip("@")}
        ]
    return component


def cyclonedx_sbom(*, info: BuildInfo, filename: str, sha256: str, spec: BuildSpec, key: str,
                   timestamp: dt.datetime) -> dict[str, Any]:
    """Return a CycloneDX 1.5 JSON SBOM of a Go binary from its build information."""
    main_ref = f"kiln:artifact:{key}"
    components = [_component(m) for m in info.deps]
    components.append({
        "type": "library", "bom-ref": purl("std", info.go_version), "name": "std",
        "version": info.go_version, "purl": purl("std", info.go_version), "scope": "required",
    })
    properties = [{"name": "kiln:build-key", "value": key},
                  {"name": "kiln:go:version", "value": info.go_version}]
    properties += [{"name": f"kiln:go:build:{k}", "value": v} for k, v in info.settings]
    return {
        "bomFormat": "CycloneDX",
        "specVersion": CYCLONEDX_VERSION,
        # one serial number per artifact: the same bytes always get the same SBOM id
        "serialNumber": f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, f'kiln:{key}:{sha256}')}",
        "version": 1,
        "metadata": {
            "timestamp": _iso(timestamp),
            "tools": {"components": [
                {"type": "application", "name": "kiln", "version": kiln_version()},
                {"type": "application", "name": "go", "version": info.go_version},
            ]},
            "component": {
                "type": "application",
                "bom-ref": main_ref,
                "name": filename,
                "version": spec.caddy_version,
                "description": f"Caddy {spec.caddy_version} for {spec.os}/{spec.arch}"
                               + (f" (GOARM={spec.arm})" if spec.arm else ""),
                "hashes": [{"alg": "SHA-256", "content": sha256}],
                "properties": properties,
            },
        },
        "components": components,
        "dependencies": [
            {"ref": main_ref, "dependsOn": [c["bom-ref"] for c in components]},
            *({"ref": c["bom-ref"], "dependsOn": []} for c in components),
        ],
    }


# -- the database side ---------------------------------------------------------------------


class AttestManager:
    """Signing keys and attestation records in PostgreSQL (queries in sql/attest.sql)."""

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool

    def _rows(self, name: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        conn: psycopg.Connection
        with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            cur.execute(named_queries("attest.sql")[name], params)
            return cur.fetchall() if cur.description else []

    def register_key(self, key_id: str, public_key: str) -> None:
        """Record a public key a worker signs with (or note that it was used again)."""
        self._rows("register_signing_key", {"key_id": key_id, "public_key": public_key})

    def signing_keys(self) -> list[dict[str, Any]]:
        """Return every known public key, the most recently used first."""
        return self._rows("signing_keys", {})

    def put(self, build_key: str, *, sha256: str, key_id: str | None,
            files: dict[str, str]) -> None:
        """Record what was published next to a build's artifact."""
        self._rows("put_attestation", {"build_key": build_key, "sha256": sha256,
                                       "key_id": key_id, "files": Jsonb(files)})

    def get(self, build_key: str) -> dict[str, Any] | None:
        """Return a build's attestation record, or None."""
        rows = self._rows("get_attestation", {"build_key": build_key})
        return rows[0] if rows else None

    def builds_by_sha256(self, sha256: str, *, limit: int = 20) -> list[dict[str, Any]]:
        """Return succeeded builds whose artifact has this sha256, newest first."""
        return self._rows("builds_by_sha256", {"sha256": sha256, "limit": limit})


# -- publishing ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Published:
    """Store paths of what was published next to an artifact."""

    checksum: str
    signature: str | None
    provenance: str
    sbom: str
    key_id: str | None

    def files(self) -> dict[str, str]:
        """Return the paths by kind (no signature when unsigned)."""
        out = {"checksum": self.checksum, "provenance": self.provenance, "sbom": self.sbom}
        if self.signature:
            out["signature"] = self.signature
        return out


class Attestor:
    """Make, sign and store the attestations of a built artifact."""

    def __init__(
        self,
        *,
        store: ArtifactStore,
        signer: Signer | None,
        records: AttestManager | None = None,
        builder_id: str = DEFAULT_BUILDER_ID,
        clock: Callable[[], dt.datetime] = utc_now,
    ) -> None:
        self.store = store
        self.signer = signer
        self.records = records
        self.builder_id = builder_id or DEFAULT_BUILDER_ID
        self.clock = clock

    def register(self) -> None:
        """Record the public key so the API can serve it."""
        if self.signer is not None and self.records is not None:
            self.records.register_key(self.signer.key_id, self.signer.public.raw_b64)

    def inspect(self, sandbox: Sandbox, binary: Path, *, key: str,
                log: LogSink) -> BuildInfo:
        """Read the binary's build information with ``go version -m`` in a network-less step."""
        # GO_TELEMETRY_CHILD=2: no telemetry sidecar. The go command otherwise starts a
        # detached child that outlives this quick step and writes into its scratch HOME
        # while the process sandbox removes it.
        step = Step(INSPECT, ("go", "version", "-m", binary.name),
                    env={"GOTOOLCHAIN": "local", "GOFLAGS": "", "GO_TELEMETRY_CHILD": "2"},
                    network=False,
                    timeout=INSPECT_TIMEOUT_SECONDS, build_key=key)
        result = sandbox.run(step, workdir=binary.parent)
        if not result.ok:
            raise BuildFailure(f"go version -m failed on the built binary: {result.output[-500:]}",
                               retryable=True, step=INSPECT)
        try:
            info = parse_go_version_m(result.output)
        except ValueError as exc:
            raise BuildFailure(str(exc), retryable=True, step=INSPECT) from None
        log(INSPECT, f"{info.go_version}, {len(info.deps)} modules")
        return info

    def publish(
        self,
        *,
        key: str,
        spec: BuildSpec,
        output: BuildOutput,
        sha256: str,
        sandbox: Sandbox,
        worker_id: str,
        attempt: int,
        started_at: dt.datetime,
        log: LogSink,
    ) -> Published:
        """Write checksum, signature, provenance and SBOM next to the stored artifact."""
        filename = spec.filename
        info = self.inspect(sandbox, output.binary, key=key, log=log)
        finished_at = self.clock()
        sbom = canonical_json(cyclonedx_sbom(info=info, filename=filename, sha256=sha256,
                                             spec=spec, key=key, timestamp=finished_at))
        byproducts: list[dict[str, Any]] = [
            {"name": SBOM_NAME, "mediaType": SBOM_MEDIA_TYPE,
             "digest": {"sha256": hashlib.sha256(sbom).hexdigest()}},
            {"name": "step-seconds",
             "annotations": {k: round(v, 3) for k, v in sorted(output.timings.items())}},
        ]
        statement = provenance_statement(
            spec=spec, filename=filename, sha256=sha256, output=output, info=info,
            builder_id=self.builder_id, worker_id=worker_id,
            invocation=f"{key}/{attempt}", started_at=started_at, finished_at=finished_at,
            byproducts=byproducts,
        )
        payload = canonical_json(statement)
        if self.signer is not None:
            envelope = self.signer.envelope(payload)
            signature: bytes | None = self.signer.sign_file(output.binary)
        else:
            envelope = unsigned_envelope(payload)
            signature = None
        files: dict[str, bytes] = {
            checksum_name(filename): checksum_line(sha256, filename).encode(),
            PROVENANCE_NAME: json.dumps(envelope, indent=2).encode() + b"\n",
            SBOM_NAME: sbom,
        }
        if signature is not None:
            files[signature_name(filename)] = signature
        with self._staged(files) as staged:
            for name, path in staged.items():
                self.store.put(key, name, path, sha256=hashlib.sha256(files[name]).hexdigest())
        prefix = artifact_prefix(key)
        published = Published(
            checksum=prefix + checksum_name(filename),
            signature=prefix + signature_name(filename) if signature is not None else None,
            provenance=prefix + PROVENANCE_NAME,
            sbom=prefix + SBOM_NAME,
            key_id=self.signer.key_id if self.signer is not None else None,
        )
        if self.records is not None:
            self.register()
            self.records.put(key, sha256=sha256, key_id=published.key_id,
                             files=published.files())
        log("upload", "signed with key " + published.key_id[:16] if published.key_id
            else "not signed: the worker has no signing key (signing.key_file)")
        return published

    @contextmanager
    def _staged(self, files: dict[str, bytes]) -> Iterator[dict[str, Path]]:
        with tempfile.TemporaryDirectory(prefix="kiln-attest-") as tmp:
            paths = {}
            for name, data in files.items():
                path = Path(tmp) / name
                path.write_bytes(data)
                paths[name] = path
            yield paths


def builder_id_of(config: Config) -> str:
    """Return the provenance builder.id: signing.builder_id, api.public_url, or the default."""
    return config.signing.builder_id or config.api.public_url.rstrip("/") or DEFAULT_BUILDER_ID


def make_attestor(config: Config, *, pool: ConnectionPool, store: ArtifactStore) -> Attestor:
    """Return the worker's Attestor; exit with the field at fault if the key is unreadable."""
    try:
        signer = signer_from_settings(
            key=config.signing.key,
            key_file=Path(config.signing.key_file) if config.signing.key_file else None)
    except SigningKeyError as exc:
        raise SystemExit(f"kiln worker: {exc}") from None
    attestor = Attestor(store=store, signer=signer, records=AttestManager(pool),
                        builder_id=builder_id_of(config))
    if signer is None:
        log.warning("no signing key (signing.key or signing.key_file): artifacts get "
                    "checksums, provenance and SBOMs, but no signatures")
        return attestor
    log.info("signing artifacts with ed25519 key %s", signer.key_id)
    try:
        attestor.register()
    except psycopg.Error as exc:  # the schema may not be migrated yet: publish retries it
        log.warning("cannot record the signing key yet: %s", exc)
    return attestor
