"""End to end: signed artifacts, provenance and SBOM, checked the way a user would.

A real worker signs with a key made by ``openssl genpkey``; the signature and the DSSE
provenance are verified with ``openssl pkeyutl -verify -rawin``, the checksum file with
``sha256sum -c``, the SBOM against the CycloneDX schema, and all of it with ``kiln verify``
(a subprocess, as a user runs it). Flipping one byte makes each check fail.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import requests
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator

from kiln.request.spec import BuildSpec
from kiln.worker.attest import Attestor
from kiln.worker.sandbox.base import COMPILE, Step
from kiln.worker.sandbox.process import ProcessSandbox, find_go
from tests.fixtures import goproxy as gp
from tests.service import REPO, KilnProcesses

pytestmark = pytest.mark.slow

BUILDER_ID = "https://builds.kiln.test/"


def openssl(*args: str, data: bytes | None = None, check: bool = True
            ) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["openssl", *args], input=data, capture_output=True, check=check,
                          timeout=60)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The worker's private key (made by openssl), its public PEM, and an unrelated key."""
    root = tmp_path_factory.mktemp("keys")
    private = root / "signing.pem"
    openssl("genpkey", "-algorithm", "ed25519", "-out", str(private))
    public = root / "public.pem"
    openssl("pkey", "-in", str(private), "-pubout", "-out", str(public))
    other = root / "other.pem"
    openssl("genpkey", "-algorithm", "ed25519", "-out", str(other))
    other_public = root / "other-public.pem"
    openssl("pkey", "-in", str(other), "-pubout", "-out", str(other_public))
    return {"private": private, "public": public, "other_public": other_public}


@pytest.fixture(scope="module")
def kiln_env(keys: dict[str, Path]) -> dict[str, str]:
    return {"KILN_SIGNING__KEY_FILE": str(keys["private"]),
            "KILN_SIGNING__BUILDER_ID": BUILDER_ID}


@pytest.fixture(scope="module")
def built(kiln: KilnProcesses, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One succeeded build with a plugin, and everything downloaded next to its binary."""
    resp = kiln.post_build({"os": "linux", "arch": "amd64", "caddy_version": "v2.8.0",
                            "plugins": [f"{gp.HELLO}@v0.1.0"]})
    assert resp.status_code in (200, 202), resp.text
    doc = kiln.wait_build(resp.json()["key"])
    assert doc["state"] == "succeeded", doc
    root = tmp_path_factory.mktemp("download")
    files: dict[str, Any] = {"doc": doc, "key": doc["key"], "dir": root}
    for name, link in (("caddy_linux_amd64_custom", "artifact"),
                       ("caddy_linux_amd64_custom.sig", "signature"),
                       ("caddy_linux_amd64_custom.sha256", "checksum"),
                       ("provenance.json", "provenance"), ("sbom.json", "sbom")):
        got = requests.get(kiln.url + doc["links"][link], timeout=60)
        assert got.status_code == 200, (link, got.text)
        (root / name).write_bytes(got.content)
        files[link] = root / name
        files[link + "_headers"] = got.headers
    return files


def flipped(source: Path, dest: Path, offset: int = 1000) -> Path:
    data = bytearray(source.read_bytes())
    data[offset] ^= 0x01
    dest.write_bytes(bytes(data))
    return dest


def kiln_verify(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kiln.cli", "verify", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "CONFIG_PATH": "/dev/null"})


def test_signing_key_is_the_workers_public_key(kiln: KilnProcesses, keys: dict[str, Path],
                                               built: dict[str, Any]) -> None:
    doc = requests.get(kiln.url + "/api/signing-key", timeout=10).json()
    pem = keys["public"].read_text()
    assert doc["algorithm"] == "ed25519"
    assert doc["public_key_pem"] == pem
    raw = openssl("pkey", "-pubin", "-in", str(keys["public"]), "-outform", "DER").stdout[-32:]
    assert base64.b64decode(doc["public_key"]) == raw
    assert doc["key_id"] == hashlib.sha256(raw).hexdigest()
    assert [k["key_id"] for k in doc["keys"]] == [doc["key_id"]]
    as_pem = requests.get(kiln.url + "/api/signing-key?format=pem", timeout=10)
    assert as_pem.text == pem and as_pem.headers["X-Kiln-Key-Id"] == doc["key_id"]
    assert built["signature_headers"]["X-Kiln-Key-Id"] == doc["key_id"]


def test_artifact_signature_and_checksum_verify_with_openssl_and_sha256sum(
        built: dict[str, Any], keys: dict[str, Path]) -> None:
    binary, sig = built["artifact"], built["signature"]
    assert len(sig.read_bytes()) == 64
    assert built["checksum"].read_text() == (
        f"{built['doc']['artifact']['sha256']}  caddy_linux_amd64_custom\n")
    check = subprocess.run(["sha256sum", "-c", built["checksum"].name], cwd=built["dir"],
                           capture_output=True, text=True, check=False)
    assert check.returncode == 0 and "caddy_linux_amd64_custom: OK" in check.stdout
    verify = ["pkeyutl", "-verify", "-pubin", "-inkey", str(keys["public"]), "-rawin",
              "-sigfile", str(sig)]
    ok = openssl(*verify, "-in", str(binary), check=False)
    assert ok.returncode == 0 and b"Signature Verified Successfully" in ok.stdout
    bad = flipped(binary, built["dir"] / "tampered")
    assert openssl(*verify, "-in", str(bad), check=False).returncode != 0
    wrong_key = ["pkeyutl", "-verify", "-pubin", "-inkey", str(keys["other_public"]),
                 "-rawin", "-sigfile", str(sig), "-in", str(binary)]
    assert openssl(*wrong_key, check=False).returncode != 0


def _pae(payload_type: str, payload: bytes) -> bytes:
    # DSSE v1 pre-authentication encoding, as the DSSE specification writes it
    return b" ".join([b"DSSEv1", str(len(payload_type)).encode(), payload_type.encode(),
                      str(len(payload)).encode(), payload])


def test_provenance_verifies_with_openssl_and_describes_the_build(
        kiln: KilnProcesses, built: dict[str, Any], keys: dict[str, Path]) -> None:
    envelope = json.loads(built["provenance"].read_text())
    assert built["provenance_headers"]["Content-Type"].startswith(
        "application/vnd.dsse.envelope.v1+json")
    payload = base64.b64decode(envelope["payload"])
    [signature] = envelope["signatures"]
    root: Path = built["dir"]
    (root / "pae").write_bytes(_pae(envelope["payloadType"], payload))
    (root / "pae.sig").write_bytes(base64.b64decode(signature["sig"]))
    verify = ["pkeyutl", "-verify", "-pubin", "-inkey", str(keys["public"]), "-rawin",
              "-sigfile", str(root / "pae.sig")]
    assert openssl(*verify, "-in", str(root / "pae"), check=False).returncode == 0
    (root / "pae.bad").write_bytes(_pae(envelope["payloadType"], payload.replace(
        b"v0.1.0", b"v0.1.1", 1)))
    assert openssl(*verify, "-in", str(root / "pae.bad"), check=False).returncode != 0

    statement = json.loads(payload)
    doc = built["doc"]
    assert envelope["payloadType"] == "application/vnd.in-toto+json"
    assert statement["_type"] == "https://in-toto.io/Statement/v1"
    assert statement["predicateType"] == "https://slsa.dev/provenance/v1"
    assert statement["subject"] == [{"name": "caddy_linux_amd64_custom",
                                     "digest": {"sha256": doc["artifact"]["sha256"]}}]
    definition = statement["predicate"]["buildDefinition"]
    assert BuildSpec.from_dict(definition["externalParameters"]).key() == doc["key"]
    internal = definition["internalParameters"]
    assert f"{gp.HELLO} v0.1.0 h1:" in internal["goSum"]
    assert f"{gp.HELLO} v0.1.0" in internal["goMod"]
    assert internal["goVersion"] == doc["go_version"]
    assert internal["sandbox"] == doc["sandbox"]
    flags = internal["flags"]
    assert (flags["-trimpath"], flags["CGO_ENABLED"], flags["GOOS"], flags["GOARCH"]) == (
        "true", "0", "linux", "amd64")
    assert flags["-ldflags"] == "-w -s" and flags["-tags"] == "nobadger,nomysql,nopgx"
    assert any(d["name"] == gp.HELLO for d in definition["resolvedDependencies"])
    run = statement["predicate"]["runDetails"]
    assert run["builder"]["id"] == BUILDER_ID
    worker = requests.get(f"{kiln.url}/api/builds/{doc['key']}", timeout=10).json()[
        "attempt_history"][0]["worker_id"]
    assert run["builder"]["version"]["worker"] == worker
    assert run["metadata"]["invocationId"] == f"{doc['key']}/1"
    assert run["metadata"]["startedOn"] <= run["metadata"]["finishedOn"]
    sbom_digest = hashlib.sha256(built["sbom"].read_bytes()).hexdigest()
    assert {"name": "sbom.cdx.json", "mediaType": "application/vnd.cyclonedx+json",
            "digest": {"sha256": sbom_digest}} in run["byproducts"]


def test_sbom_lists_the_modules_linked_into_the_binary(built: dict[str, Any]) -> None:
    text = built["sbom"].read_text()
    assert JsonStrictValidator(SchemaVersion.V1_5).validate_str(text) is None
    sbom = json.loads(text)
    versions = {c["name"]: c["version"] for c in sbom["components"]}
    assert versions[gp.HELLO] == "v0.1.0"
    assert versions[gp.CADDY] == "v2.8.0"
    assert versions["std"] == built["doc"]["go_version"]
    main = sbom["metadata"]["component"]
    assert main["name"] == "caddy_linux_amd64_custom"
    assert main["hashes"] == [{"alg": "SHA-256", "content": built["doc"]["artifact"]["sha256"]}]


def test_kiln_verify_passes_for_the_real_binary(kiln: KilnProcesses, built: dict[str, Any],
                                                keys: dict[str, Path]) -> None:
    binary = str(built["artifact"])
    by_url = kiln_verify(binary, "--key", kiln.url)
    assert by_url.returncode == 0, by_url.stdout + by_url.stderr
    assert by_url.stdout.splitlines()[-1] == "verified"
    for check in ("checksum", "signature", "provenance"):
        assert f"OK     {check}:" in by_url.stdout
    assert f"Caddy v2.8.0 for linux/amd64 with {gp.HELLO} v0.1.0" in by_url.stdout
    key_id = hashlib.sha256(openssl("pkey", "-pubin", "-in", str(keys["public"]),
                                    "-outform", "DER").stdout[-32:]).hexdigest()
    pinned = kiln_verify(binary, "--key", str(keys["public"]), "--server", kiln.url,
                         "--build", built["key"], "--key-id", key_id[:12])
    assert pinned.returncode == 0, pinned.stdout + pinned.stderr
    offline = kiln_verify(binary, "--key", keys["public"].read_text(),
                          "--checksum", str(built["checksum"]), "--sig", str(built["signature"]),
                          "--provenance", str(built["provenance"]))
    assert offline.returncode == 0, offline.stdout + offline.stderr


def test_kiln_verify_fails_for_a_flipped_byte_or_another_key(
        kiln: KilnProcesses, built: dict[str, Any], keys: dict[str, Path]) -> None:
    bad = str(flipped(built["artifact"], built["dir"] / "caddy_flipped"))
    unknown = kiln_verify(bad, "--key", kiln.url)
    assert unknown.returncode == 1
    assert "has no build of a file with sha256" in unknown.stderr
    assert unknown.stdout.splitlines()[-1] == "NOT verified"
    named = kiln_verify(bad, "--key", kiln.url, "--build", built["key"])
    assert named.returncode == 1
    for check in ("checksum", "signature", "provenance"):
        assert f"FAILED {check}:" in named.stdout, named.stdout
    assert "the file was changed or is another build" in named.stdout
    other = kiln_verify(str(built["artifact"]), "--key", str(keys["other_public"]),
                        "--server", kiln.url)
    assert other.returncode == 1
    assert "OK     checksum:" in other.stdout
    assert "FAILED signature: does not verify with the key given (the server says key" \
        in other.stdout
    assert "FAILED provenance:" in other.stdout
    wrong_id = kiln_verify(str(built["artifact"]), "--key", kiln.url, "--key-id", "00ff00ff")
    assert wrong_id.returncode == 1 and "no key with id 00ff00ff" in wrong_id.stderr


def test_builds_are_found_by_the_sha256_of_their_binary(kiln: KilnProcesses,
                                                        built: dict[str, Any]) -> None:
    sha256 = built["doc"]["artifact"]["sha256"]
    found = requests.get(f"{kiln.url}/api/artifacts/{sha256}", timeout=10)
    assert found.status_code == 200
    assert [b["key"] for b in found.json()["builds"]] == [built["key"]]
    b64 = base64.b64encode(bytes.fromhex(sha256)).decode()
    assert requests.get(f"{kiln.url}/api/artifacts/{b64}", timeout=10).json()["sha256"] == sha256
    missing = requests.get(f"{kiln.url}/api/artifacts/{'0' * 64}", timeout=10)
    assert missing.status_code == 404 and "no succeeded build" in missing.json()["error"]["message"]
    assert requests.get(f"{kiln.url}/api/artifacts/xyz", timeout=10).status_code == 404


def test_attestations_of_builds_that_did_not_succeed_are_404(kiln: KilnProcesses) -> None:
    doc = kiln.post_build({"os": "linux", "arch": "amd64", "plugins": [gp.BROKEN]}).json()
    assert kiln.wait_build(doc["key"])["state"] == "failed"
    for suffix in ("artifact.sig", "artifact.sha256", "provenance", "sbom"):
        resp = requests.get(f"{kiln.url}/api/builds/{doc['key']}/{suffix}", timeout=10)
        assert resp.status_code == 404, suffix
        assert f"build {doc['key']} is failed" in resp.json()["error"]["message"]
    unknown = requests.get(f"{kiln.url}/api/builds/{'0' * 64}/artifact.sig", timeout=10)
    assert unknown.status_code == 404 and "no build" in unknown.json()["error"]["message"]


# -- the key never reaches a build step ----------------------------------------------------


def _key_material(keys: dict[str, Path]) -> list[str]:
    pem = keys["private"].read_text()
    body = "".join(pem.strip().splitlines()[1:-1])
    return [str(keys["private"]), body]


def test_a_process_sandbox_step_sees_no_key_in_its_environment(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, keys: dict[str, Path],
        go_cache_dir: Path) -> None:
    # the worker's own environment holds the key (both ways it can be configured)
    monkeypatch.setenv("KILN_SIGNING__KEY_FILE", str(keys["private"]))
    monkeypatch.setenv("KILN_SIGNING__KEY", keys["private"].read_text())
    sandbox = ProcessSandbox(go=find_go(), cache_dir=go_cache_dir)
    step = Step(COMPILE, ("sh", "-c", "env; ls -a"), env={"GOOS": "linux"}, network=False,
                timeout=30, build_key="k")
    result = sandbox.run(step, workdir=tmp_path)
    assert result.ok, result.output
    assert "GOOS=linux" in result.output
    for secret in _key_material(keys):
        assert secret not in result.output
    assert "KILN_SIGNING" not in result.output


@pytest.mark.docker
def test_a_docker_sandbox_step_can_read_neither_key_file_nor_key(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, keys: dict[str, Path],
        built: dict[str, Any]) -> None:
    from kiln.worker.sandbox.docker import DockerSandbox
    from kiln.worker.sandbox.docker_engine import docker_client
    from tests.dockerutil import ensure_sandbox_image

    image = ensure_sandbox_image()
    monkeypatch.setenv("KILN_SIGNING__KEY_FILE", str(keys["private"]))
    monkeypatch.setenv("KILN_SIGNING__KEY", keys["private"].read_text())
    client = docker_client(required=True)
    try:
        sandbox = DockerSandbox(client=client, image=image, cache_dir=tmp_path / "cache",
                                network="none", memory="256m", pids_limit=64, cpus=1.0,
                                cache_mode="shared", user="1000:1000",
                                worker_id="kiln-test-signing", goproxy="off")
        work = tmp_path / "work"
        work.mkdir()
        script = f"env; cat {keys['private']} && echo READ-THE-KEY; ls {keys['private'].parent}"
        result = sandbox.run(Step(COMPILE, ("sh", "-c", script), network=False, timeout=60,
                                  build_key="k"), workdir=work)
        assert "READ-THE-KEY" not in result.output
        assert "No such file" in result.output or "can't open" in result.output
        for secret in _key_material(keys)[1:]:
            assert secret not in result.output
        assert "KILN_SIGNING" not in result.output
        # the SBOM's inspect step reads a binary in this sandbox as the worker does
        (work / built["artifact"].name).write_bytes(built["artifact"].read_bytes())
        info = Attestor(store=None, signer=None).inspect(  # type: ignore[arg-type]
            sandbox, work / built["artifact"].name, key="k", log=lambda *_: None)
        assert any(d.path == gp.HELLO for d in info.deps), info
    finally:
        client.close()
