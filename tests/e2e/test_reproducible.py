"""Reproducible builds: one spec gives the same bytes whatever the sandbox and the caches.

The same Caddy with a plugin, built by the Builder with cold caches (separate empty cache
directories) once in the process sandbox and once in the docker sandbox, and once more in
the docker sandbox with the shared warm caches: the three binaries are byte-identical,
while the build keys of the two sandboxes differ, because the key includes the sandbox's
identity (the image id for docker).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from kiln.request.spec import BuildSpec, ResolvedPlugin
from kiln.worker.sandbox.base import Sandbox
from tests import binfmt
from tests.dockerutil import ensure_sandbox_image
from tests.fixtures import goproxy as gp
from tests.sandboxes import builder, docker_sandbox, process_sandbox, readable_proxy

pytestmark = [pytest.mark.docker, pytest.mark.slow]

CADDY_VERSION = "v2.8.0"
PLUGIN = ResolvedPlugin(gp.HELLO, gp.HELLO, "v0.1.0")


def spec_for(sandbox: Sandbox) -> BuildSpec:
    return BuildSpec(os="linux", arch="amd64", arm="", caddy_version=CADDY_VERSION,
                     plugins=(PLUGIN,), replacements=(), go_version=sandbox.go_version(),
                     sandbox=sandbox.identity)


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    from kiln.worker.sandbox.docker_engine import docker_client

    ensure_sandbox_image()
    engine = docker_client(required=True)
    assert engine is not None
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def builds(client: Any, go_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> dict[str, tuple[BuildSpec, bytes]]:
    """Build the spec three ways; map each way to its spec and its binary's bytes."""
    root = tmp_path_factory.mktemp("reproducible")
    proxy = readable_proxy(root / "proxy")
    worker_id = f"kiln-test-repro-{uuid.uuid4().hex[:8]}"
    sandboxes: dict[str, Sandbox] = {
        "process, cold": process_sandbox(root / "cold-process"),
        "docker, cold": docker_sandbox(client, ensure_sandbox_image(), root / "cold-docker",
                                       proxy, worker_id=worker_id),
        "docker, warm": docker_sandbox(client, ensure_sandbox_image(), go_cache_dir, proxy,
                                       worker_id=worker_id),
    }

    def build(way: str) -> tuple[BuildSpec, bytes]:
        sandbox = sandboxes[way]
        spec = spec_for(sandbox)
        # a different work directory each time: its path must not reach the binary
        workdir = root / "work" / way.replace(", ", "-")
        output = builder(sandbox, proxy).build(spec, key=spec.key(), workdir=workdir,
                                               log=lambda step, line: None)
        return spec, output.binary.read_bytes()

    # the two cold builds leave each other a core now and then: run them side by side
    with ThreadPoolExecutor(2) as pool:
        return dict(zip(sandboxes, pool.map(build, sandboxes), strict=True))


def test_process_and_docker_builds_from_cold_caches_are_byte_identical(
        builds: dict[str, tuple[BuildSpec, bytes]]) -> None:
    digests = {way: hashlib.sha256(data).hexdigest() for way, (_spec, data) in builds.items()}
    assert len(set(digests.values())) == 1, digests
    # and they are real binaries of the spec, built with the toolchain both sandboxes report
    spec, data = builds["docker, cold"]
    version, settings = binfmt.build_info(data)
    assert version == spec.go_version
    assert settings["-trimpath"] == "true"


def test_build_keys_differ_by_the_sandbox_identity_only(
        builds: dict[str, tuple[BuildSpec, bytes]], client: Any) -> None:
    process, _ = builds["process, cold"]
    docker, _ = builds["docker, cold"]
    assert process.key() != docker.key()
    # the docker sandbox's identity is the image id, whatever cache it uses
    image_id = client.images.get(ensure_sandbox_image()).id
    assert docker.sandbox == f"docker:{image_id}"
    assert builds["docker, warm"][0].key() == docker.key()
    assert process.sandbox.startswith("process:")
    assert process.go_version == docker.go_version
    a, b = json.loads(process.canonical_json()), json.loads(docker.canonical_json())
    assert {name for name in a if a[name] != b[name]} == {"sandbox"}
