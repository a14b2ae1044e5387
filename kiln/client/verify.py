"""``kiln verify FILE --key KEY_OR_URL``: prove a binary is the one a Kiln server built.

Three checks, each printed with its outcome; the exit code is 0 only if all pass:

1. checksum: the file's sha256 is the one in the build's ``artifact.sha256``;
2. signature: ``artifact.sig`` is a valid ed25519 signature of the file by the key;
3. provenance: the DSSE envelope is signed by the key, holds an in-toto SLSA provenance
   statement, and its subject is this file's sha256 (with ``--build``, its resolved spec
   must also hash to that build key).

The build is found on the server by the file's sha256 (``GET /api/artifacts/{sha256}``)
or named with ``--build KEY``; ``--sig``, ``--checksum`` and ``--provenance`` take local
files instead, so a binary can be verified offline.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.artifacts.provenance import SLSA_PROVENANCE_V1, STATEMENT_TYPE
from kiln.artifacts.signing import (
    INTOTO_PAYLOAD_TYPE,
    EnvelopeError,
    PublicKey,
    SigningKeyError,
    load_public_key,
    open_envelope,
)
from kiln.errors import KilnError, SpecError
from kiln.request.spec import BuildSpec

EXIT_OK = 0
EXIT_FAILED = 1
HTTP_TIMEOUT_SECONDS = 30.0
KEY_PATH = "/api/signing-key"


class VerifyError(KilnError):
    """Verification cannot proceed (bad key, unreachable server, missing file)."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Report:
    """The outcome of each check, in order."""

    lines: list[tuple[bool, str, str]] = field(default_factory=list)

    def add(self, ok: bool, check: str, detail: str) -> bool:
        self.lines.append((ok, check, detail))
        return ok

    @property
    def ok(self) -> bool:
        return bool(self.lines) and all(ok for ok, _, _ in self.lines)

    def render(self) -> str:
        """Return one line per check, then the verdict."""
        out = [f"{'OK' if ok else 'FAILED':6} {check}: {detail}" for ok, check, detail in
               self.lines]
        out.append("verified" if self.ok else "NOT verified")
        return "\n".join(out)


def _get(url: str) -> tuple[bytes, dict[str, str]]:
    request = urllib.request.Request(url, headers={"User-Agent": "kiln-verify"})
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_SECONDS) as resp:
            return resp.read(), {k.lower(): v for k, v in resp.headers.items()}
    except urllib.error.HTTPError as exc:
        message = exc.reason
        with contextlib.suppress(ValueError, KeyError, TypeError):
            message = json.loads(exc.read())["error"]["message"]
        raise VerifyError(f"GET {url}: {exc.code} {message}", status=exc.code) from None
    except (urllib.error.URLError, OSError) as exc:
        raise VerifyError(f"GET {url}: {getattr(exc, 'reason', exc)}") from None


def _server_of(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    path = parts.path
    if KEY_PATH in path:
        path = path[: path.index(KEY_PATH)]
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path.rstrip("/"), "", ""))


def load_keys(source: str) -> list[PublicKey]:
    """Return the public keys ``source`` names: a server URL, a file, or the key itself."""
    if source.startswith(("http://", "https://")):
        url = source if KEY_PATH in source else source.rstrip("/") + KEY_PATH
        body, headers = _get(url)
        if "json" in headers.get("content-type", ""):
            doc = json.loads(body)
            entries = doc.get("keys") or [doc]
            return [PublicKey(load_public_key(e["public_key"])) for e in entries]
        return [PublicKey(load_public_key(body))]
    path = Path(source)
    data: str | bytes = path.read_bytes() if path.is_file() else source
    return [PublicKey(load_public_key(data))]


@dataclass
class Evidence:
    checksum: bytes | None = None
    signature: bytes | None = None
    signature_key_id: str = ""
    provenance: bytes | None = None
    build: str = ""


def fetch_evidence(server: str, *, sha256: str, build: str) -> Evidence:
    """Download the checksum, signature and provenance of the build that made the file."""
    if not build:
        try:
            body, _ = _get(f"{server}/api/artifacts/{sha256}")
        except VerifyError as exc:
            if exc.status != 404:
                raise
            body = b"{}"
        builds = json.loads(body).get("builds") or []
        if not builds:
            raise VerifyError(f"{server} has no build of a file with sha256 {sha256}: the "
                              "file was changed, or another server built it (--build KEY "
                              "checks it against one build)")
        build = builds[0]["key"]
    base = f"{server}/api/builds/{build}"
    checksum, _ = _get(f"{base}/artifact.sha256")
    signature, headers = _get(f"{base}/artifact.sig")
    provenance, _ = _get(f"{base}/provenance")
    return Evidence(checksum=checksum, signature=signature,
                    signature_key_id=headers.get("x-kiln-key-id", ""),
                    provenance=provenance, build=build)


def check_checksum(report: Report, text: bytes, sha256: str, name: str) -> None:
    """Compare the file's sha256 with a sha256sum line."""
    fields = text.decode("utf-8", "replace").split()
    if not fields:
        report.add(False, "checksum", "the checksum file is empty")
        return
    expected = fields[0].lower()
    listed = fields[1].lstrip("*") if len(fields) > 1 else "?"
    if expected == sha256:
        report.add(True, "checksum", f"sha256 {sha256} matches {listed}")
    else:
        report.add(False, "checksum", f"{name} has sha256 {sha256}, but {listed} was "
                   f"published with {expected}: the file was changed or is another build")


def check_signature(report: Report, data: bytes, signature: bytes,
                    keys: list[PublicKey], signed_by: str = "") -> None:
    """Verify the raw ed25519 signature of the file with any of the keys."""
    for key in keys:
        if key.verify(signature, data):
            report.add(True, "signature", f"ed25519, key {key.id}")
            return
    hint = ""
    if signed_by and not any(k.id == signed_by for k in keys):
        hint = f" (the server says key {signed_by[:16]} signed it, not the key given)"
    report.add(False, "signature", "does not verify with the key given" + hint)


def check_provenance(report: Report, envelope_bytes: bytes, sha256: str,
                     keys: list[PublicKey], build: str = "") -> None:
    """Verify the provenance envelope's signature, then its subject (and build key)."""
    try:
        envelope = json.loads(envelope_bytes)
    except ValueError as exc:
        report.add(False, "provenance", f"not JSON: {exc}")
        return
    payload = None
    error = "no key given"
    for key in keys:
        try:
            payload_type, payload = open_envelope(envelope, key)
        except EnvelopeError as exc:
            error = str(exc)
            continue
        break
    if payload is None:
        report.add(False, "provenance", f"signature: {error}")
        return
    if payload_type != INTOTO_PAYLOAD_TYPE:
        report.add(False, "provenance", f"payload type {payload_type}, not an in-toto statement")
        return
    try:
        statement: dict[str, Any] = json.loads(payload)
    except ValueError as exc:
        report.add(False, "provenance", f"the statement is not JSON: {exc}")
        return
    if statement.get("_type") != STATEMENT_TYPE or \
            statement.get("predicateType") != SLSA_PROVENANCE_V1:
        report.add(False, "provenance", "not an in-toto v1 statement of SLSA provenance v1")
        return
    subjects = statement.get("subject") or []
    match = [s for s in subjects if (s.get("digest") or {}).get("sha256") == sha256]
    if not match:
        names = ", ".join(f"{s.get('name')} {(s.get('digest') or {}).get('sha256', '')[:16]}"
                          for s in subjects)
        report.add(False, "provenance", f"its subject ({names}) is not this file's sha256 "
                   f"{sha256[:16]}…")
        return
    predicate = statement.get("predicate") or {}
    definition = predicate.get("buildDefinition") or {}
    run = predicate.get("runDetails") or {}
    if build:
        try:
            spec_key = BuildSpec.from_dict(definition.get("externalParameters") or {}).key()
        except SpecError as exc:
            report.add(False, "provenance", f"its build parameters are not a Kiln spec: {exc}")
            return
        if spec_key != build:
            report.add(False, "provenance", f"its parameters are build {spec_key}, not {build}")
            return
    params = definition.get("externalParameters") or {}
    plugins = ", ".join(f"{p.get('module')} {p.get('version')}"
                        for p in params.get("plugins") or []) or "no plugins"
    builder = (run.get("builder") or {}).get("id", "?")
    finished = (run.get("metadata") or {}).get("finishedOn", "?")
    report.add(True, "provenance",
               f"subject {match[0].get('name')}: Caddy {params.get('caddy_version')} for "
               f"{params.get('os')}/{params.get('arch')} with {plugins}; built by {builder} "
               f"at {finished}")


def verify(args: argparse.Namespace) -> int:
    """Run the checks and print the report; return the exit code."""
    file = Path(args.file)
    try:
        data = file.read_bytes()
    except OSError as exc:
        print(f"kiln verify: cannot read {file}: {exc.strerror}", file=sys.stderr)
        return EXIT_FAILED
    sha256 = hashlib.sha256(data).hexdigest()
    report = Report()
    try:
        keys = load_keys(args.key)
        if args.key_id:
            wanted = args.key_id.lower()
            keys = [k for k in keys if k.id.startswith(wanted)]
            if not keys:
                raise VerifyError(f"no key with id {args.key_id} in {args.key}")
        evidence = Evidence(build=args.build or "")
        local = {name: getattr(args, name) for name in ("checksum", "sig", "provenance")}
        if not all(local.values()):
            server = args.server or (_server_of(args.key)
                                     if args.key.startswith(("http://", "https://")) else "")
            if not server:
                raise VerifyError("give --server URL (or --key as the server's URL), or "
                                  "--checksum, --sig and --provenance files")
            evidence = fetch_evidence(server.rstrip("/"), sha256=sha256, build=args.build or "")
        if local["checksum"]:
            evidence.checksum = Path(local["checksum"]).read_bytes()
        if local["sig"]:
            evidence.signature = Path(local["sig"]).read_bytes()
        if local["provenance"]:
            evidence.provenance = Path(local["provenance"]).read_bytes()
    except (VerifyError, SigningKeyError, OSError, ValueError, KeyError) as exc:
        print(f"kiln verify: {exc}", file=sys.stderr)
        print("NOT verified")
        return EXIT_FAILED
    assert evidence.checksum is not None and evidence.signature is not None
    assert evidence.provenance is not None
    print(f"{file.name}: sha256 {sha256}" + (f", build {evidence.build}" if evidence.build
                                             else ""))
    check_checksum(report, evidence.checksum, sha256, file.name)
    check_signature(report, data, evidence.signature, keys, evidence.signature_key_id)
    check_provenance(report, evidence.provenance, sha256, keys, evidence.build)
    print(report.render())
    return EXIT_OK if report.ok else EXIT_FAILED


def add_command(sub: Any) -> None:
    """Register ``kiln verify`` on the kiln command's subparsers."""
    p = sub.add_parser("verify", help="check a binary's checksum, signature and provenance",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", metavar="FILE", help="the binary to verify")
    p.add_argument("--key", required=True, metavar="KEY_OR_URL",
                   help="the public key: a PEM or base64 file or text, or the server URL "
                        "(its /api/signing-key is fetched)")
    p.add_argument("--server", metavar="URL",
                   help="the Kiln server to fetch the evidence from (default: --key's server)")
    p.add_argument("--build", metavar="KEY", help="the build key (default: found by sha256)")
    p.add_argument("--key-id", metavar="ID",
                   help="accept only the key with this id (or id prefix)")
    p.add_argument("--checksum", metavar="FILE", help="a local .sha256 file")
    p.add_argument("--sig", metavar="FILE", help="a local .sig file (raw ed25519 signature)")
    p.add_argument("--provenance", metavar="FILE", help="a local provenance (DSSE) file")
    p.set_defaults(func=verify)
