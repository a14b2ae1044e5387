"""What is published next to each artifact: checksum, SLSA provenance and CycloneDX SBOM documents."""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import uuid
from importlib import metadata
from typing import Any, Protocol

from kiln.gomod.buildinfo import BuildInfo, GoModule
from kiln.request.spec import BuildSpec


class BuildOutput(Protocol):
    """What provenance records of a build's output (kiln/worker/builder.py makes it)."""

    go_mod: str
    go_sum: str

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
    sandbox: str,
    go_version: str,
    builder_id: str,
    worker_id: str,
    invocation: str,
    started_at: dt.datetime,
    finished_at: dt.datetime,
    byproducts: list[dict[str, Any]],
) -> dict[str, Any]:
    """Return an in-toto Statement v1 with a SLSA provenance v1 predicate for one artifact.

    ``sandbox`` and ``go_version`` are those the build ran with (the worker's sandbox, the
    binary's own record), not those the spec asks for.
    """
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
                    "goVersion": go_version,
                    "sandbox": sandbox,
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
