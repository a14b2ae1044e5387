"""Keys, DSSE envelopes, provenance and SBOM documents, callback URL rules, platform lists.

Interoperability with other tools is checked with the real ones: keys made by ``openssl``,
build information read by the real ``go version -m``, the SBOM against the CycloneDX 1.5
JSON schema shipped by cyclonedx-python-lib.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import hashlib
import hmac
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator

from kiln.api.errors import ApiError
from kiln.api.groups import group_state, platform_requests
from kiln.artifacts.local import LocalStore
from kiln.artifacts.provenance import (
    SLSA_PROVENANCE_V1,
    STATEMENT_TYPE,
    checksum_line,
    cyclonedx_sbom,
    go_sum_dependencies,
    h1_hex,
    provenance_statement,
)
from kiln.artifacts.signing import (
    EnvelopeError,
    PublicKey,
    Signer,
    SigningKeyError,
    load_private_key,
    load_public_key,
    open_envelope,
    signer_from_settings,
)
from kiln.db.groups import group_id
from kiln.janitor.webhooks import sign_body, verify_body
from kiln.request.callbacks import CallbackRefused, check_callback_url
from kiln.request.spec import BuildSpec, ResolvedPlugin
from kiln.worker.attest import Attestor, parse_go_version_m
from kiln.worker.builder import BuildFailure, BuildOutput
from kiln.worker.sandbox.process import ProcessSandbox, find_go

H1 = "h1:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="
H1_HEX = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"

# go version -m of a binary with a replaced dependency, as cmd/go prints it
SAMPLE = (
    "caddy_linux_amd64_custom: go1.27.3\n"
    "\tpath\tcaddy\n"
    "\tmod\tcaddy\t(devel)\t\n"
    f"\tdep\tgithub.com/caddyserver/caddy/v2\tv2.8.0\t{H1}\n"
    "\tdep\tgithub.com/kiln-fixtures/hello\tv0.1.0\n"
    f"\t=>\tgithub.com/kiln-fixtures/hello-fork\tv0.1.1\t{H1}\n"
    "\tbuild\t-buildmode=exe\n"
    "\tbuild\t-ldflags=\"-w -s\"\n"
    "\tbuild\t-tags=nobadger,nomysql,nopgx\n"
    "\tbuild\t-trimpath=true\n"
    "\tbuild\tCGO_ENABLED=0\n"
    "\tbuild\tGOARCH=amd64\n"
    "\tbuild\tGOOS=linux\n"
)


def spec() -> BuildSpec:
    return BuildSpec(
        os="linux", arch="amd64", arm="", caddy_version="v2.8.0",
        plugins=(ResolvedPlugin("github.com/kiln-fixtures/hello", "github.com/kiln-fixtures/hello",
                                "v0.1.0"),),
        replacements=(), go_version="go1.27.3", sandbox="process:go1.27.3",
    )


# -- keys ----------------------------------------------------------------------------------


def openssl(*args: str, data: bytes | None = None) -> bytes:
    return subprocess.run(["openssl", *args], input=data, capture_output=True, check=True,
                          timeout=30).stdout


def test_keys_made_by_openssl_load_in_every_accepted_form(tmp_path: Path) -> None:
    pem = openssl("genpkey", "-algorithm", "ed25519")
    public_pem = openssl("pkey", "-pubout", data=pem)
    signer = Signer(load_private_key(pem))
    assert signer.public.pem.encode() == public_pem  # byte for byte what openssl derives
    raw_seed = openssl("pkey", "-outform", "DER", data=pem)[-32:]  # PKCS#8 ends with the seed
    assert Signer(load_private_key(base64.b64encode(raw_seed).decode())).key_id == signer.key_id
    assert Signer(load_private_key(raw_seed)).key_id == signer.key_id
    raw_public = openssl("pkey", "-pubin", "-outform", "DER", data=public_pem)[-32:]
    for form in (public_pem, base64.b64encode(raw_public).decode(), signer.public.raw_b64):
        assert PublicKey(load_public_key(form)).id == signer.key_id
    assert signer.key_id == hashlib.sha256(raw_public).hexdigest()
    assert "PRIVATE" not in repr(signer) and raw_seed.hex() not in repr(signer)


def test_keys_of_other_kinds_are_refused_with_the_reason(tmp_path: Path) -> None:
    rsa = openssl("genpkey", "-algorithm", "rsa", "-pkeyopt", "rsa_keygen_bits:1024")
    with pytest.raises(SigningKeyError, match="not ed25519"):
        load_private_key(rsa)
    with pytest.raises(SigningKeyError, match="base64 of the raw 32-byte key"):
        load_private_key("bm90IGEga2V5")
    with pytest.raises(SigningKeyError, match="public key"):
        load_public_key("c2hvcnQ=")
    missing = tmp_path / "nope.pem"
    with pytest.raises(SigningKeyError, match=r"signing.key_file: cannot read .*nope.pem"):
        signer_from_settings(key="", key_file=missing)
    assert signer_from_settings(key="", key_file=None) is None


def test_the_config_refuses_an_unreadable_inline_key() -> None:
    from kiln.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="signing.key"):
        load_config("/dev/null", env={"KILN_SIGNING__KEY": "bm90IGEga2V5"})


# -- DSSE ----------------------------------------------------------------------------------


def test_dsse_envelope_verifies_and_any_change_fails() -> None:
    signer = Signer(load_private_key(openssl("genpkey", "-algorithm", "ed25519")))
    other = Signer(load_private_key(openssl("genpkey", "-algorithm", "ed25519")))
    envelope = signer.envelope(b'{"a":1}')
    # the signature covers DSSE's PAE, written out here independently of kiln.artifacts.signing
    pae = b"DSSEv1 28 application/vnd.in-toto+json 7 {\"a\":1}"
    assert signer.public.verify(base64.b64decode(envelope["signatures"][0]["sig"]), pae)
    assert open_envelope(envelope, signer.public) == ("application/vnd.in-toto+json", b'{"a":1}')
    tampered = dict(envelope, payload=base64.b64encode(b'{"a":2}').decode())
    with pytest.raises(EnvelopeError, match="no signature"):
        open_envelope(tampered, signer.public)
    retyped = dict(envelope, payloadType="application/json")
    with pytest.raises(EnvelopeError):
        open_envelope(retyped, signer.public)
    with pytest.raises(EnvelopeError, match=other.key_id[:16]):
        open_envelope(envelope, other.public)
    with pytest.raises(EnvelopeError, match="no signature"):
        open_envelope(dict(envelope, signatures=[]), signer.public)


# -- go version -m, provenance, SBOM -------------------------------------------------------


def test_parse_the_real_go_version_m_output() -> None:
    go = find_go()
    out = subprocess.run([str(go), "version", "-m", str(go)], capture_output=True, text=True,
                         check=True, timeout=60, env={"GOTOOLCHAIN": "local", "HOME": "/tmp"},
                         ).stdout
    info = parse_go_version_m(out)
    assert info.go_version.startswith("go1.")
    assert info.path == "cmd/go"
    assert info.setting("GOOS") == "linux" and info.setting("CGO_ENABLED") == "0"
    with pytest.raises(ValueError):
        parse_go_version_m("go: cannot open x: no such file\n")


def test_parse_dependencies_replacements_and_quoted_flags() -> None:
    info = parse_go_version_m(SAMPLE)
    assert info.main is not None and info.main.version == "(devel)"
    core, hello = info.deps
    assert (core.path, core.version, core.sum) == ("github.com/caddyserver/caddy/v2", "v2.8.0", H1)
    assert hello.replace is not None and hello.replace.path.endswith("hello-fork")
    assert hello.replace.sum == H1
    assert info.setting("-ldflags") == "-w -s"
    assert info.setting("-tags") == "nobadger,nomysql,nopgx"


def test_h1_hashes_become_hex_and_go_sum_dependencies() -> None:
    assert h1_hex(H1) == H1_HEX
    assert h1_hex("h1:not base64!") is None and h1_hex("sha256:abc") is None
    go_sum = (f"github.com/a/b v1.0.0 {H1}\n"
              "github.com/a/b v1.0.0/go.mod h1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n")
    assert go_sum_dependencies(go_sum) == [{
        "uri": "pkg:golang/github.com/a/b@v1.0.0?type=module", "name": "github.com/a/b",
        "digest": {"dirHash": H1_HEX}}]


def test_provenance_statement_names_the_artifact_and_the_whole_build() -> None:
    s = spec()
    started = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    statement = provenance_statement(
        spec=s, filename=s.filename, sha256="ab" * 32,
        output=BuildOutput(binary=Path("x"), go_mod="module caddy\n",
                           go_sum=f"github.com/a/b v1.0.0 {H1}\n", timings={"fetch": 1.5}),
        info=parse_go_version_m(SAMPLE), sandbox="process:go1.27.3", go_version="go1.27.3",
        builder_id="https://kiln.example/", worker_id="w-1",
        invocation="key/1", started_at=started, finished_at=started + dt.timedelta(seconds=9),
        byproducts=[])
    assert statement["_type"] == STATEMENT_TYPE
    assert statement["predicateType"] == SLSA_PROVENANCE_V1
    assert statement["subject"] == [{"name": "caddy_linux_amd64_custom",
                                     "digest": {"sha256": "ab" * 32}}]
    definition = statement["predicate"]["buildDefinition"]
    # the external parameters are the resolved spec: they hash to the build key
    assert BuildSpec.from_dict(definition["externalParameters"]).key() == s.key()
    internal = definition["internalParameters"]
    assert internal["goSum"].startswith("github.com/a/b v1.0.0")
    assert internal["goVersion"] == "go1.27.3" and internal["sandbox"] == "process:go1.27.3"
    assert internal["flags"]["-trimpath"] == "true"
    run = statement["predicate"]["runDetails"]
    assert run["builder"] == {"id": "https://kiln.example/",
                              "version": {"kiln": run["builder"]["version"]["kiln"],
                                          "worker": "w-1"}}
    assert run["metadata"] == {"invocationId": "key/1", "startedOn": "2026-01-02T03:04:05Z",
                               "finishedOn": "2026-01-02T03:04:14Z"}


def test_provenance_records_the_sandbox_and_go_that_ran_not_those_the_spec_names() -> None:
    s = spec()
    moment = dt.datetime(2026, 1, 2, tzinfo=dt.UTC)
    statement = provenance_statement(
        spec=s, filename=s.filename, sha256="ab" * 32,
        output=BuildOutput(binary=Path("x"), go_mod="", go_sum=""), info=None,
        sandbox="docker:kiln-sandbox@sha256:ran", go_version="go1.26.9",
        builder_id="b", worker_id="w-1", invocation="key/1", started_at=moment,
        finished_at=moment, byproducts=[])
    internal = statement["predicate"]["buildDefinition"]["internalParameters"]
    assert internal["sandbox"] == "docker:kiln-sandbox@sha256:ran"
    assert internal["goVersion"] == "go1.26.9"


@pytest.fixture(scope="module")
def process_sandbox(tmp_path_factory: pytest.TempPathFactory) -> ProcessSandbox:
    return ProcessSandbox(go=find_go(), cache_dir=tmp_path_factory.mktemp("go-cache"))


def publish_go_itself(sandbox: ProcessSandbox, root: Path, built_as: BuildSpec
                      ) -> tuple[LocalStore, Any]:
    """Publish the attestations of a Go binary (the go command) as the build of ``built_as``."""
    store = LocalStore(root / "store")
    workdir = root / "work"
    workdir.mkdir()
    binary = workdir / built_as.filename
    shutil.copyfile(find_go(), binary)
    digest = hashlib.sha256(binary.read_bytes()).hexdigest()
    published = Attestor(store=store, signer=None).publish(
        key=built_as.key(), spec=built_as, sha256=digest, sandbox=sandbox, worker_id="w-1",
        output=BuildOutput(binary=binary, go_mod="module caddy\n", go_sum=""), attempt=1,
        started_at=dt.datetime(2026, 1, 2, tzinfo=dt.UTC), log=lambda step, line: None)
    return store, published


def test_attestations_of_a_build_run_in_another_sandbox_or_go_are_refused(
        process_sandbox: ProcessSandbox, tmp_path: Path) -> None:
    ran = process_sandbox.go_version()
    other_sandbox = dataclasses.replace(spec(), sandbox="docker:kiln-sandbox@sha256:x",
                                        go_version=ran)
    with pytest.raises(BuildFailure, match="docker:kiln-sandbox@sha256:x") as caught:
        publish_go_itself(process_sandbox, tmp_path / "a", other_sandbox)
    assert caught.value.retryable  # a worker with that sandbox may take it
    assert process_sandbox.identity in caught.value.message
    assert [f for f in (tmp_path / "a" / "store").rglob("*") if f.is_file()] == []

    other_go = dataclasses.replace(spec(), sandbox=process_sandbox.identity, go_version="go1.2.3")
    with pytest.raises(BuildFailure, match="go1.2.3"):
        publish_go_itself(process_sandbox, tmp_path / "b", other_go)

    matching = dataclasses.replace(spec(), sandbox=process_sandbox.identity, go_version=ran)
    store, published = publish_go_itself(process_sandbox, tmp_path / "c", matching)
    envelope = json.loads((store.root / published.provenance).read_bytes())
    internal = json.loads(base64.b64decode(envelope["payload"]))[
        "predicate"]["buildDefinition"]["internalParameters"]
    assert internal["sandbox"] == process_sandbox.identity and internal["goVersion"] == ran


def test_the_sbom_is_valid_cyclonedx_1_5() -> None:
    s = spec()
    sbom = cyclonedx_sbom(info=parse_go_version_m(SAMPLE), filename=s.filename,
                          sha256="cd" * 32, spec=s, key=s.key(),
                          timestamp=dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
    errors = JsonStrictValidator(SchemaVersion.V1_5).validate_str(json.dumps(sbom))
    assert errors is None, errors
    names = {c["name"]: c for c in sbom["components"]}
    assert names["github.com/caddyserver/caddy/v2"]["hashes"] == [
        {"alg": "SHA-256", "content": H1_HEX}]
    fork = names["github.com/kiln-fixtures/hello-fork"]
    assert fork["version"] == "v0.1.1"
    assert fork["properties"] == [{"name": "kiln:go:replaces",
                                   "value": "github.com/kiln-fixtures/hello@v0.1.0"}]
    assert sbom["metadata"]["component"]["hashes"] == [{"alg": "SHA-256", "content": "cd" * 32}]
    # an invalid document is caught by the same validator
    broken: dict[str, Any] = dict(sbom, components=[{"type": "no-such-type", "name": "x"}])
    assert JsonStrictValidator(SchemaVersion.V1_5).validate_str(json.dumps(broken)) is not None


def test_checksum_line_is_what_sha256sum_checks(tmp_path: Path) -> None:
    (tmp_path / "caddy").write_bytes(b"binary")
    digest = hashlib.sha256(b"binary").hexdigest()
    (tmp_path / "caddy.sha256").write_text(checksum_line(digest, "caddy"))
    ok = subprocess.run(["sha256sum", "-c", "caddy.sha256"], cwd=tmp_path,
                        capture_output=True, text=True, check=False)
    assert ok.returncode == 0 and "caddy: OK" in ok.stdout
    (tmp_path / "caddy").write_bytes(b"binarY")
    bad = subprocess.run(["sha256sum", "-c", "caddy.sha256"], cwd=tmp_path,
                         capture_output=True, text=True, check=False)
    assert bad.returncode == 1


# -- webhooks ------------------------------------------------------------------------------


def test_webhook_signature_is_hmac_sha256_of_the_body() -> None:
    body = b'{"key":"k","state":"succeeded"}'
    header = sign_body("s3cret", body)
    assert header == "sha256=" + hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
    assert verify_body("s3cret", body, header)
    assert not verify_body("s3cret", body + b" ", header)
    assert not verify_body("other", body, header)
    assert not verify_body("s3cret", body, None)


@pytest.mark.parametrize(("url", "reason"), [
    ("ftp://example.com/hook", "http:// or https://"),
    ("file:///etc/passwd", "http:// or https://"),
    ("gopher://1.1.1.1/", "http:// or https://"),
    ("http://user:pw@1.1.1.1/hook", "credentials"),
    ("http:///nohost", "no host"),
    ("http://1.1.1.1:99999/", "port"),
    ("http://1.1.1.1/a b", "spaces"),
    ("http://[1.1.1.1/hook", "not a URL"),
    ("http://" + "a" * 70 + ".example/", "does not resolve"),
    ("http://127.0.0.1:8080/hook", "loopback"),
    ("http://localhost/hook", "private"),
    ("http://10.1.2.3/hook", "private"),
    ("http://192.168.1.1/hook", "private"),
    ("http://169.254.169.254/latest/meta-data", "link-local"),
    ("http://[::1]/hook", "private"),
    ("http://[::ffff:127.0.0.1]/hook", "private"),
    ("http://0.0.0.0/hook", "private"),
    (12, "string"),
    ("http://1.1.1.1/" + "a" * 3000, "characters"),
])
def test_callback_urls_that_are_refused(url: object, reason: str) -> None:
    with pytest.raises(CallbackRefused, match=reason):
        check_callback_url(url, allow_private=False)


def test_callback_urls_that_are_accepted() -> None:
    # IP literals resolve without DNS; nothing is sent anywhere
    assert check_callback_url("https://1.1.1.1/hook?x=1", allow_private=False)
    assert check_callback_url("http://127.0.0.1:8080/hook", allow_private=True)
    assert check_callback_url("http://[::1]:9/", allow_private=True)


# -- several platforms ---------------------------------------------------------------------


def test_platform_lists_give_one_request_per_platform() -> None:
    requests = platform_requests({
        "platforms": [{"os": "linux", "arch": "amd64"}, {"os": "linux", "arch": "arm", "arm": 6},
                      {"os": "windows", "arch": "arm64"}],
        "plugins": ["github.com/kiln-fixtures/hello@v0.1.0"], "callback_url": "http://x/",
    }, max_plugins=10)
    assert [(r.os, r.arch, r.arm) for r in requests] == [
        ("linux", "amd64", ""), ("linux", "arm", "6"), ("windows", "arm64", "")]
    assert all(str(r.plugins[0]) == "github.com/kiln-fixtures/hello@v0.1.0" for r in requests)


@pytest.mark.parametrize(("body", "field"), [
    ({"platforms": []}, "platforms"),
    ({"platforms": "linux/amd64"}, "platforms"),
    ({"platforms": [{"os": "linux", "arch": "amd64"}], "os": "linux"}, "platforms"),
    ({"platforms": [{"os": "linux", "arch": "amd64"}, "darwin"]}, "platforms[1]"),
    ({"platforms": [{"os": "linux", "arch": "amd64", "goamd64": "v3"}]}, "platforms[0].goamd64"),
    ({"platforms": [{"os": "plan9", "arch": "amd64"}]}, "platforms[0].os"),
    ({"platforms": [{"os": "linux", "arch": "arm", "arm": 9}]}, "platforms[0].arm"),
    ({"platforms": [{"os": "linux", "arch": "amd64"}, {"os": "linux", "arch": "amd64"}]},
     "platforms[1]"),
    ({"platforms": [{"os": "linux", "arch": "amd64"}] * 40}, "platforms"),
    ({"platforms": [{"os": "linux", "arch": "amd64"}], "plugins": ["x; rm -rf /"]}, "plugins"),
])
def test_bad_platform_lists_name_the_field(body: dict[str, Any], field: str) -> None:
    with pytest.raises(ApiError) as caught:
        platform_requests(body, max_plugins=10)
    assert caught.value.status_code == 400
    assert (caught.value.field or "").startswith(field), caught.value.field


def test_group_ids_and_states() -> None:
    assert group_id(["a", "b"]) == group_id(["a", "b"]) != group_id(["b", "a"])
    assert group_id(["a"]).startswith("g_") and len(group_id(["a"])) == 34
    assert group_state(["succeeded", "succeeded"]) == "succeeded"
    assert group_state(["queued", "queued"]) == "queued"
    assert group_state(["queued", "succeeded"]) == "running"
    assert group_state(["running", "failed"]) == "running"
    assert group_state(["failed", "succeeded"]) == "failed"
    assert group_state(["cancelled"]) == "failed"
