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

import datetime as dt
import hashlib
import json
import logging
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.artifacts.provenance import (
    DEFAULT_BUILDER_ID,
    PROVENANCE_NAME,
    SBOM_MEDIA_TYPE,
    SBOM_NAME,
    checksum_line,
    checksum_name,
    cyclonedx_sbom,
    provenance_statement,
    signature_name,
    utc_now,
)
from kiln.artifacts.signing import Signer, canonical_json, unsigned_envelope
from kiln.artifacts.store import ArtifactStore, artifact_prefix
from kiln.db.attestations import AttestManager
from kiln.gomod.buildinfo import BuildInfo, parse_go_version_m
from kiln.request.spec import BuildSpec
from kiln.worker.builder import BuildFailure, BuildOutput, LogSink
from kiln.worker.sandbox.base import Sandbox, Step

log = logging.getLogger(__name__)

#: the sandbox step that reads the binary's build information (no network)
INSPECT = "inspect"
INSPECT_TIMEOUT_SECONDS = 120.0


# -- Go modules (kiln/gomod/buildinfo.py parses go version -m) ---------------------------------


# -- provenance ----------------------------------------------------------------------------


# -- SBOM ----------------------------------------------------------------------------------


# -- the database side ---------------------------------------------------------------------


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
        ran = (sandbox.identity, info.go_version)
        if ran != (spec.sandbox, spec.go_version):
            # the key and the provenance name the spec's sandbox and Go: signing a binary
            # made with others would attest what did not run (workers claim only builds of
            # their own toolchain, so this is a bug or a changed sandbox)
            raise BuildFailure(
                f"built in sandbox {ran[0]} with {ran[1]}, but the build is keyed for "
                f"sandbox {spec.sandbox} with {spec.go_version}: not published",
                retryable=True, step=INSPECT)
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
            sandbox=sandbox.identity, go_version=info.go_version,
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
