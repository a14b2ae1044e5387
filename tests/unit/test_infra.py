"""The deployment files in infra/: each parses, is complete, and names real Kiln settings.

No cloud and no cluster here: these check what an API server, ``docker compose`` or
``terraform plan`` would refuse first (missing fields, dangling references, unknown
settings), and the things Kiln itself needs of a deployment (health checks on /healthz,
work directories mounted at the same path, a load balancer timeout above api.max_wait).
Where the real tool is installed (docker compose) it checks too.

Beyond that, each Kubernetes manifest is validated against the API's own schemas
(kubernetes-validate) and its KEDA resources against KEDA's CRD schemas (vendored in
testdata/keda), strictly: an unknown field is an error, as with kubectl's server-side
validation. The real kustomize renders infra/k8s, and an overlay of it, and what it renders is
validated too. checkov runs over infra/terraform, infra/k8s, the Dockerfiles and the compose
file, and must report no failed check: each check skipped says why where it is skipped.
OpenTofu (terraform's command-compatible fork) checks the formatting of infra/terraform and
loads it; `validate` cannot run offline (it needs the providers from a registry).
kustomize (go install), OpenTofu (built from its Go module) and checkov (a virtualenv of its
own) are installed once into the shared test cache; where they cannot be had, the tests skip,
or fail in CI.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, NoReturn

import jsonschema
import kubernetes_validate
import pytest
import yaml
from pydantic import BaseModel

from kiln.config import ENV_PREFIX, Config, load_config
from kiln.worker.sandbox.process import find_go
from tests.dockerutil import docker_required
from tests.realcaddy import go_env

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
COMPOSE = INFRA / "compose" / "docker-compose.yml"
K8S = INFRA / "k8s"
TERRAFORM = INFRA / "terraform" / "aws"
#: queued builds a new worker could claim (tests/integration/test_lambda.py runs it on
#: PostgreSQL against the Lambda janitor's QueuedBuilds)
QUEUE_QUERY = (
    "SELECT count(*) FROM kiln_builds b WHERE b.state = 'queued' AND b.run_after <= now() "
    "AND EXISTS (SELECT 1 FROM kiln_workers w WHERE w.sandbox = b.spec->>'sandbox' "
    "AND w.go_version = b.spec->>'go_version' AND ((w.state = 'active' "
    "AND w.heartbeat_at > now() - interval '120 seconds') OR w.id = (SELECT id "
    "FROM kiln_workers ORDER BY started_at DESC LIMIT 1)))")
KEDA_CRDS = REPO / "tests" / "unit" / "testdata" / "keda"
#: the oldest Kubernetes infra/k8s runs on (native sidecars: 1.29) and the newest whose
#: schemas kubernetes-validate bundles
KUBERNETES_VERSIONS = ("1.29", "1.37")
KUSTOMIZE = "sigs.k8s.io/kustomize/kustomize/v5"
KUSTOMIZE_VERSION = "v5.8.2"
#: the Makefile's CHECKOV_VERSION: `make install` puts it in the same place first
CHECKOV_VERSION = "3.3.30"
#: seconds a tool's install may take (go install of kustomize: ~45 s, checkov's pip: ~60 s)
INSTALL_TIMEOUT_SECONDS = 600
#: OpenTofu, terraform's command-compatible fork, built from its Go module (the Makefile's
#: TOFU_VERSION: `make tools` builds the same one into the same place)
TOFU_VERSION = "1.10.6"
TOFU_INSTALL = REPO / "tests" / "install_tofu.sh"
#: a cold build of OpenTofu compiles ~1,500 packages: minutes on two shared cores
TOFU_INSTALL_TIMEOUT_SECONDS = 1800


# -- helpers ------------------------------------------------------------------------------


def setting_exists(name: str) -> bool:
    """Tell whether KILN_<SECTION>__<FIELD> names a field of kiln/config.py."""
    if not name.startswith(ENV_PREFIX) or "__" not in name:
        return False
    model: type[BaseModel] = Config
    parts = name[len(ENV_PREFIX):].lower().split("__")
    for i, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            return False
        annotation = field.annotation
        if i < len(parts) - 1:
            if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
                return False
            model = annotation
    return True


def assert_settings(env: dict[str, Any], where: str) -> None:
    """Every KILN_ variable is a real setting, and together they load as a config."""
    kiln = {k: str(v) for k, v in env.items() if k.startswith(ENV_PREFIX)}
    unknown = sorted(k for k in kiln if not setting_exists(k))
    assert not unknown, f"{where}: not settings of kiln/config.py: {unknown}"
    load_config(env={"CONFIG_PATH": "/dev/null", **kiln})


def tools_required() -> bool:
    """Tell whether a checker that cannot be had fails the test (CI) rather than skips it."""
    return os.environ.get("CI", "").lower() == "true" or docker_required()


def unavailable(reason: str) -> NoReturn:
    """Skip the test for want of a tool, or fail it where the tools must be there."""
    if tools_required():
        pytest.fail(f"{reason} (required in CI, and with KILN_NO_SKIPS=1 or "
                    "KILN_REQUIRE_DOCKER=1)")
    pytest.skip(reason)


_DEFAULT = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


def compose_expand(value: Any) -> Any:
    """Replace ${VAR:-default} with its default, as compose does with an empty environment."""
    if isinstance(value, str):
        return _DEFAULT.sub(lambda m: m.group(2) or "", value).replace("$$", "$")
    if isinstance(value, dict):
        return {k: compose_expand(v) for k, v in value.items()}
    if isinstance(value, list):
        return [compose_expand(v) for v in value]
    return value


# -- compose ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return dict(compose_expand(yaml.safe_load(COMPOSE.read_text())))


def test_compose_runs_the_whole_stack_with_health_checks(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"postgres", "minio", "api", "worker", "janitor"} <= set(services)
    for name in ("postgres", "minio", "api", "worker"):
        check = services[name].get("healthcheck", {})
        assert check.get("test") and not check.get("disable"), f"{name} has no health check"
    assert "/healthz" in " ".join(services["api"]["healthcheck"]["test"])
    for name, service in services.items():
        for needed, condition in (service.get("depends_on") or {}).items():
            assert needed in services, f"{name} depends on unknown service {needed}"
            wanted = condition["condition"]
            if wanted == "service_healthy":
                assert "healthcheck" in services[needed], f"{name} waits for {needed}'s health"
    # the API, worker and janitor wait for a healthy database
    for name in ("api", "worker", "janitor"):
        assert services[name]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_compose_worker_mounts_the_engine_and_same_paths(compose: dict[str, Any]) -> None:
    worker = compose["services"]["worker"]
    env = worker["environment"]
    assert env["KILN_BUILD__SANDBOX"] == "docker"
    mounts = [m.split(":") for m in worker["volumes"]]
    assert ["/var/run/docker.sock", "/var/run/docker.sock"] in mounts
    same = {host for host, inside, *_ in mounts if host == inside}
    for name in ("KILN_BUILD__CACHE_DIR", "KILN_BUILD__WORK_DIR"):
        assert any(env[name].startswith(path + "/") for path in same), (
            f"{name}={env[name]} is not under a directory mounted at the same path")


def test_compose_settings_are_kiln_settings(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        env = service.get("environment")
        if isinstance(env, dict) and any(k.startswith(ENV_PREFIX) for k in env):
            assert_settings(env, f"compose service {name}")


def test_compose_services_of_the_api_image_are_checked_on_what_they_serve(
        compose: dict[str, Any]) -> None:
    """The kiln-api image's HEALTHCHECK asks :8234; another long-running command replaces it."""
    assert "HEALTHCHECK" in (REPO / "worker_image" / "api.Dockerfile").read_text()
    services = compose["services"]
    for name, service in services.items():
        other_command = service["image"] == services["api"]["image"] and "command" in service
        if other_command and service.get("restart", "no") != "no":
            assert "healthcheck" in service, (
                f"{name} runs {service['command']} in the API image: the image's health "
                "check (GET :8234/healthz) would mark it unhealthy")


def test_compose_images_can_all_be_built_offline() -> None:
    """Each image is a variable (the registry's image its default) offline_images.sh names."""
    raw = yaml.safe_load(COMPOSE.read_text())
    printed = (COMPOSE.parent / "offline_images.sh").read_text()
    for name, service in raw["services"].items():
        image = re.fullmatch(r"\$\{(KILN_[A-Z_]+_IMAGE):-([^}]+)\}", service["image"])
        assert image, f"{name}: image {service['image']!r} is not ${{KILN_..._IMAGE:-default}}"
        assert f'"{image.group(1)}=' in printed, (
            f"infra/compose/offline_images.sh does not name {image.group(1)}")
    sandbox = raw["services"]["worker"]["environment"]["KILN_BUILD__DOCKER__IMAGE"]
    assert sandbox.startswith("${KILN_SANDBOX_IMAGE:-")
    assert '"KILN_SANDBOX_IMAGE=' in printed


def _compose_command() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True,
                                 check=False).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def test_compose_file_is_valid_for_docker_compose() -> None:
    command = _compose_command()
    if command is None:
        unavailable("neither `docker compose` nor docker-compose is installed")
    result = subprocess.run([*command, "-f", str(COMPOSE), "config", "-q"], capture_output=True,
                            text=True, cwd=COMPOSE.parent, check=False, timeout=60)
    assert result.returncode == 0, result.stderr


# -- Kubernetes ---------------------------------------------------------------------------


@functools.cache
def manifests() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                found.append((path.name, doc))
    return found


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in manifests() if doc["kind"] == kind]


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    if doc["kind"] == "ScaledJob":
        return dict(doc["spec"]["jobTargetRef"]["template"]["spec"])
    if doc["kind"] == "CronJob":
        return dict(doc["spec"]["jobTemplate"]["spec"]["template"]["spec"])
    return dict(doc["spec"]["template"]["spec"])


WORKLOADS = ("Deployment", "StatefulSet", "Job", "CronJob", "ScaledJob")


def test_every_manifest_has_what_the_api_server_requires() -> None:
    assert manifests(), "no manifests in infra/k8s"
    for name, doc in manifests():
        assert doc.get("apiVersion") and doc.get("kind"), name
        assert doc["metadata"].get("name"), f"{name}: {doc['kind']} without metadata.name"
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "kiln", f"{name}: {doc['kind']}"
        if doc["kind"] in WORKLOADS:
            spec = pod_spec(doc)
            containers = spec["containers"] + spec.get("initContainers", [])
            assert containers, f"{name}: no containers"
            for container in containers:
                assert container.get("name") and container.get("image"), f"{name}: {container}"
        if doc["kind"] in ("Deployment", "StatefulSet"):
            labels = doc["spec"]["template"]["metadata"]["labels"]
            selector = doc["spec"]["selector"]["matchLabels"]
            assert selector.items() <= labels.items(), f"{name}: selector misses the pods"


def test_kustomization_lists_every_manifest_but_the_secret_example() -> None:
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
    assert listed == present


def test_api_pods_are_probed_on_healthz_and_reached_through_service_and_ingress() -> None:
    api = next(d for d in by_kind("Deployment") if d["metadata"]["name"] == "kiln-api")
    container = pod_spec(api)["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe in ("readinessProbe", "livenessProbe"):
        check = container[probe]["httpGet"]
        assert check["path"] == "/healthz"
        assert check["port"] in ports or check["port"] in ports.values()
    listen = next(e["value"] for e in container["env"] if e["name"] == "KILN_API__LISTEN")
    assert int(listen.rsplit(":", 1)[1]) in ports.values()

    services = {s["metadata"]["name"]: s for s in by_kind("Service")}
    labels = api["spec"]["template"]["metadata"]["labels"]
    service = services["kiln-api"]
    assert service["spec"]["selector"].items() <= labels.items()
    service_ports = {p["name"] for p in service["spec"]["ports"]}
    for ingress in by_kind("Ingress"):
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                assert backend["name"] in services
                assert backend["port"].get("name") in service_ports or backend["port"].get(
                    "number") in [p["port"] for p in service["spec"]["ports"]]
        # the ingress must not cut a held download short
        timeout = int(ingress["metadata"]["annotations"][
            "nginx.ingress.kubernetes.io/proxy-read-timeout"])
        config = by_kind("ConfigMap")[0]["data"]
        assert timeout > float(config["KILN_API__MAX_WAIT"])


def test_workers_scale_with_keda_on_queued_builds() -> None:
    (job,) = by_kind("ScaledJob")
    (trigger,) = job["spec"]["triggers"]
    assert trigger["type"] == "postgresql"
    assert trigger["metadata"]["query"] == QUEUE_QUERY
    auths = {a["metadata"]["name"]: a for a in by_kind("TriggerAuthentication")}
    auth = auths[trigger["authenticationRef"]["name"]]
    ref = {r["parameter"]: r for r in auth["spec"]["secretTargetRef"]}["connection"]
    secret = next(d for d in by_kind("Secret") if d["metadata"]["name"] == ref["name"])
    assert ref["key"] in secret["stringData"]


def test_worker_pod_shares_its_engine_and_same_path_directories() -> None:
    (job,) = by_kind("ScaledJob")
    spec = pod_spec(job)
    worker = next(c for c in spec["containers"] if c["name"] == "worker")
    engine = next(c for c in spec["initContainers"] if c["name"] == "dind")
    # a native sidecar: keeps running beside the worker and stops when the worker exits
    assert engine["restartPolicy"] == "Always"
    env = {e["name"]: e.get("value") for e in worker["env"]}
    assert env["KILN_BUILD__SANDBOX"] == "docker"
    socket = env["DOCKER_HOST"].removeprefix("unix://")
    assert f"--host=unix://{socket}" in engine["args"]

    def mounts(container: dict[str, Any]) -> dict[str, str]:
        return {m["mountPath"]: m["name"] for m in container["volumeMounts"]}

    assert mounts(worker)[str(Path(socket).parent)] == mounts(engine)[str(Path(socket).parent)]
    for name in ("KILN_BUILD__CACHE_DIR", "KILN_BUILD__WORK_DIR"):
        path = env[name]
        shared = [p for p in mounts(worker) if path.startswith(p.rstrip("/") + "/")]
        assert shared, f"{name} is on no volume"
        assert mounts(engine).get(shared[0]) == mounts(worker)[shared[0]], (
            f"{name}: the engine does not see {shared[0]} at the same path")


def test_kubernetes_settings_are_kiln_settings() -> None:
    shared: dict[str, Any] = {}
    for doc in by_kind("ConfigMap"):
        shared.update(doc["data"])
    for doc in by_kind("Secret"):
        shared.update(doc.get("stringData", {}))
    assert_settings(shared, "kiln-config and kiln-secrets")
    for _, doc in manifests():
        if doc["kind"] in WORKLOADS:
            for container in pod_spec(doc)["containers"]:
                env = {e["name"]: e.get("value", "x") for e in container.get("env", [])}
                assert_settings({**shared, **env}, f"{doc['metadata']['name']}/{container['name']}")


def strict(schema: Any) -> Any:
    """Refuse the fields a CRD schema does not name, as strict field validation does."""
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    if not isinstance(schema, dict):
        return schema
    schema = {k: strict(v) for k, v in schema.items()}
    if ("properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        schema["additionalProperties"] = False
    return schema


@functools.cache
def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """Return the vendored KEDA CRDs' schemas by (apiVersion, kind), for each served version."""
    found = {}
    for path in sorted(KEDA_CRDS.glob("*.yaml")):
        for crd in yaml.safe_load_all(path.read_text()):
            if not crd:
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                if version["served"]:
                    schema = strict(version["schema"]["openAPIV3Schema"])
                    found[(f"{group}/{version['name']}", kind)] = schema
    return found


def schema_errors(doc: dict[str, Any]) -> list[str]:
    """Validate one resource as an API server would; return what it would refuse."""
    crd = crd_schemas().get((doc["apiVersion"], doc["kind"]))
    if crd is not None:
        # OpenAPI v3 schemas (as CRDs hold them) are JSON Schema draft 4 with extensions
        return [f"{'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
                for e in jsonschema.Draft4Validator(crd).iter_errors(doc)]
    errors = []
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            errors.append(f"Kubernetes {version} has no {doc['apiVersion']} {doc['kind']}")
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(map(str, exc.absolute_path)) or "(top)"
            errors.append(f"Kubernetes {version}: {path}: {exc.message}")
    return errors


def all_schema_errors(docs: list[tuple[str, dict[str, Any]]]) -> list[str]:
    return [f"{where}: {doc['kind']} {doc['metadata']['name']}: {error}"
            for where, doc in docs for error in schema_errors(doc)]


def test_every_manifest_is_valid_for_kubernetes_and_keda() -> None:
    assert {("keda.sh/v1alpha1", "ScaledJob"), ("keda.sh/v1alpha1", "TriggerAuthentication")} <= set(
        crd_schemas())
    problems = all_schema_errors(manifests())
    assert not problems, "\n".join(problems)


def test_schema_validation_refuses_what_an_api_server_refuses() -> None:
    """A misspelt field, a wrong type or a missing field is caught, in core and KEDA kinds."""
    api = next(d for d in by_kind("Deployment") if d["metadata"]["name"] == "kiln-api")
    typo = yaml.safe_load(yaml.safe_dump(api))
    typo["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    assert any("imagePullPolcy" in e for e in schema_errors(typo))
    (job,) = by_kind("ScaledJob")
    for change, expected in ((lambda j: j["spec"].update(pollingIntervall=10), "pollingIntervall"),
                             (lambda j: j["spec"].update(maxReplicaCount="20"), "maxReplicaCount"),
                             (lambda j: j["spec"].pop("jobTargetRef"), "jobTargetRef")):
        broken = yaml.safe_load(yaml.safe_dump(job))
        change(broken)
        assert any(expected in e for e in schema_errors(broken)), expected
    # the worker's pod template is checked too: KEDA's CRD embeds the full PodSpec
    broken = yaml.safe_load(yaml.safe_dump(job))
    pod_spec_of = broken["spec"]["jobTargetRef"]["template"]["spec"]
    pod_spec_of["containers"][0]["resources"]["limit"] = {"memory": "1Gi"}
    assert any("limit" in e for e in schema_errors(broken))


@pytest.fixture(scope="module")
def kustomize(real_cache_dir: Path) -> Path:
    """Install the real kustomize once into the shared test cache; return its path."""
    bindir = real_cache_dir / "bin" / f"kustomize-{KUSTOMIZE_VERSION}"
    binary = bindir / "kustomize"
    if not binary.exists():
        try:
            env = {**go_env(real_cache_dir, real_cache_dir / "home"), "GOBIN": str(bindir),
                   "CGO_ENABLED": "0"}
            result = subprocess.run([str(find_go()), "install", f"{KUSTOMIZE}@{KUSTOMIZE_VERSION}"],
                                    env=env, capture_output=True, text=True, check=False,
                                    timeout=INSTALL_TIMEOUT_SECONDS)
        except Exception as exc:  # no Go, or the proxy too slow: the test says which
            unavailable(f"cannot install kustomize: {exc}")
        if result.returncode != 0:
            unavailable(f"go install {KUSTOMIZE}@{KUSTOMIZE_VERSION} failed: {result.stderr[-2000:]}")
    return binary


def render(kustomize: Path, directory: Path) -> list[dict[str, Any]]:
    """Run ``kustomize build`` on a directory, as ``kubectl apply -k`` does; return its output."""
    result = subprocess.run([str(kustomize), "build", str(directory)], capture_output=True,
                            text=True, check=False, timeout=60)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def images(doc: dict[str, Any]) -> list[str]:
    if doc["kind"] not in WORKLOADS:
        return []
    spec = pod_spec(doc)
    return [c["image"] for c in spec["containers"] + spec.get("initContainers", [])]


def test_kustomize_renders_every_resource_into_the_namespace_with_its_images(
        kustomize: Path) -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    rendered = render(kustomize, K8S)
    expected = {(doc["kind"], doc["metadata"]["name"]) for name, doc in manifests()
                if name in kustomization["resources"]}
    assert {(doc["kind"], doc["metadata"]["name"]) for doc in rendered} == expected
    for doc in rendered:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == kustomization["namespace"], doc["kind"]
    pinned = {i["name"]: f"{i['name']}:{i['newTag']}" for i in kustomization["images"]}
    used = [image for doc in rendered for image in images(doc)]
    for name, image in pinned.items():
        assert image in used, f"kustomization.yaml names {name}, which no container runs"
    problems = all_schema_errors([("kustomize build infra/k8s", doc) for doc in rendered])
    assert not problems, "\n".join(problems)


def test_an_overlay_moves_every_resource_and_replaces_every_kiln_image(
        kustomize: Path, tmp_path: Path) -> None:
    """What a deployment's own kustomization does: another namespace, its registry's images."""
    digest = "sha256:" + "0123456789abcdef" * 4
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": "kiln-staging",
        "resources": [os.path.relpath(K8S, tmp_path)],
        "images": [
            {"name": "registry.example.com/kiln-api", "newName": "registry.test/kiln/api",
             "newTag": "1.2.3"},
            {"name": "registry.example.com/kiln-worker", "newName": "registry.test/kiln/worker",
             "digest": digest},
        ],
    }))
    rendered = render(kustomize, tmp_path)
    (namespace,) = [doc for doc in rendered if doc["kind"] == "Namespace"]
    assert namespace["metadata"]["name"] == "kiln-staging"
    for doc in rendered:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "kiln-staging", doc["kind"]
    by_name = {(doc["kind"], doc["metadata"]["name"]): doc for doc in rendered}
    assert "registry.test/kiln/api:1.2.3" in images(by_name["Deployment", "kiln-api"])
    assert "registry.test/kiln/api:1.2.3" in images(by_name["Deployment", "kiln-janitor"])
    # KEDA's ScaledJob is a custom resource: its pod template still gets the new image
    assert f"registry.test/kiln/worker@{digest}" in images(by_name["ScaledJob", "kiln-worker"])
    left = [i for doc in rendered for i in images(doc)
            if i.startswith(("registry.example.com/kiln-api", "registry.example.com/kiln-worker"))]
    assert not left, f"images the overlay did not replace: {left}"
    problems = all_schema_errors([("overlay", doc) for doc in rendered])
    assert not problems, "\n".join(problems)


# -- Terraform ----------------------------------------------------------------------------


@functools.cache
def terraform() -> dict[str, list[Any]]:
    import hcl2

    merged: dict[str, list[Any]] = {}
    for path in sorted(TERRAFORM.glob("*.tf")):
        with path.open() as f:
            for key, blocks in hcl2.load(f).items():
                merged.setdefault(key, []).extend(blocks)
    return merged


def unquote(value: Any) -> Any:
    """python-hcl2 keeps the quotes of string literals and keys in some versions."""
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


def resources(kind: str) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for block in terraform().get("resource", []):
        for type_, named in block.items():
            if unquote(type_) == kind:
                found.update({unquote(k): v for k, v in named.items()})
    return found


def one(kind: str) -> dict[str, Any]:
    found = resources(kind)
    assert found, f"no {kind} in infra/terraform/aws"
    return next(iter(found.values()))


def block(resource: dict[str, Any], name: str) -> dict[str, Any]:
    value = resource[name]
    return dict(value[0] if isinstance(value, list) else value)


def test_terraform_declares_the_whole_deployment() -> None:
    for kind in ("aws_db_instance", "aws_s3_bucket", "aws_s3_bucket_lifecycle_configuration",
                 "aws_ecs_cluster", "aws_ecs_service", "aws_ecs_task_definition", "aws_lb",
                 "aws_lb_target_group", "aws_autoscaling_group", "aws_launch_template",
                 "aws_lambda_function", "aws_cloudwatch_event_rule",
                 "aws_cloudwatch_event_target", "aws_cloudwatch_metric_alarm"):
        assert resources(kind), f"infra/terraform/aws has no {kind}"
    assert unquote(one("aws_db_instance")["engine"]) == "postgres"
    service = one("aws_ecs_service")
    assert unquote(service["launch_type"]) == "FARGATE" and service["load_balancer"]
    health = block(one("aws_lb_target_group"), "health_check")
    assert unquote(health["path"]) == "/healthz"


def test_terraform_bucket_cleans_up_what_crashed_uploads_leave() -> None:
    rules = one("aws_s3_bucket_lifecycle_configuration")["rule"]
    prefixes = {unquote(block(r, "filter").get("prefix", "")): r for r in rules
                if isinstance(r, dict) and "filter" in r}
    assert "expiration" in prefixes[".tmp/"]
    assert any("abort_incomplete_multipart_upload" in r for r in rules if isinstance(r, dict))


def test_terraform_workers_are_spot_with_rebalancing_and_scale_on_queue_depth() -> None:
    group = one("aws_autoscaling_group")
    assert group["capacity_rebalance"] is True
    policy = block(group, "mixed_instances_policy")
    distribution = block(policy, "instances_distribution")
    assert distribution["on_demand_percentage_above_base_capacity"] == 0
    template = block(policy, "launch_template")
    assert "override" in str(template) and "worker_instance_types" in str(template)
    variables = {unquote(k): v for b in terraform()["variable"] for k, v in b.items()}
    assert len(variables["worker_instance_types"]["default"]) > 1

    alarms = resources("aws_cloudwatch_metric_alarm")
    policies = resources("aws_autoscaling_policy")
    scaling = [a for a in alarms.values() if "QueuedBuilds" in str(a)]
    assert scaling, "no alarm on QueuedBuilds"
    for alarm in scaling:
        actions = str(alarm["alarm_actions"])
        assert any(f"aws_autoscaling_policy.{name}." in actions for name in policies), actions


def test_terraform_janitor_runs_on_a_schedule_with_a_real_handler() -> None:
    functions = resources("aws_lambda_function")
    handlers = {name: unquote(f["handler"]) for name, f in functions.items()}
    assert handlers["janitor"] == "functions.janitor.lambda_handler.handler"
    for handler in handlers.values():
        module, _, attribute = handler.rpartition(".")
        assert callable(getattr(importlib.import_module(module), attribute)), handler
    rule = resources("aws_cloudwatch_event_rule")["janitor"]
    assert "var.janitor_schedule" in str(rule["schedule_expression"])
    target = resources("aws_cloudwatch_event_target")["janitor"]
    assert "aws_lambda_function.janitor" in str(target["arn"])
    variables = {unquote(k): v for b in terraform()["variable"] for k, v in b.items()}
    assert unquote(variables["janitor_schedule"]["default"]).startswith(("rate(", "cron("))


def test_terraform_load_balancer_outlasts_held_downloads() -> None:
    lb = one("aws_lb")
    assert "var.max_wait" in str(lb["idle_timeout"])


def test_terraform_variables_and_outputs_are_documented() -> None:
    readme = (TERRAFORM / "README.md").read_text()
    for kind in ("variable", "output"):
        for entry in terraform()[kind]:
            for name, body in entry.items():
                name = unquote(name)
                assert unquote(body.get("description", "")).strip(), f"{kind} {name}: no description"
                if kind == "variable":
                    assert "type" in body, f"variable {name}: no type"
                assert f"`{name}`" in readme, f"{kind} {name} is not in infra/terraform/aws/README.md"


def test_terraform_settings_are_kiln_settings() -> None:
    names = set()
    for path in TERRAFORM.rglob("*.tf*"):
        names.update(re.findall(r"\b(KILN_[A-Z0-9_]+)\s*=", path.read_text()))
    assert names
    unknown = sorted(n for n in names if not setting_exists(n))
    assert not unknown, f"not settings of kiln/config.py: {unknown}"


@pytest.fixture(scope="module")
def tofu(real_cache_dir: Path) -> Path:
    """Return OpenTofu from the shared test cache, building it there first if needed.

    `make tools` builds the same one (tests/install_tofu.sh, from its Go module).
    """
    binary = real_cache_dir / "bin" / f"tofu-v{TOFU_VERSION}" / "tofu"
    if not binary.exists():
        env = {**go_env(real_cache_dir, real_cache_dir / "home"), "GO": str(find_go())}
        try:
            result = subprocess.run(["sh", str(TOFU_INSTALL), TOFU_VERSION, str(binary)],
                                    env=env, capture_output=True, text=True, check=False,
                                    timeout=TOFU_INSTALL_TIMEOUT_SECONDS)
        except Exception as exc:  # no Go, or a build too slow: the test says which
            unavailable(f"cannot build OpenTofu: {exc}")
        if result.returncode != 0:
            unavailable(f"{TOFU_INSTALL.name} {TOFU_VERSION} failed: {result.stderr[-2000:]}")
    return binary


def run_tofu(tofu: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run OpenTofu offline: no CLI config, no colour, no prompt, state kept out of the repo."""
    return subprocess.run([str(tofu), *args], capture_output=True, text=True, check=False,
                          timeout=120, cwd=cwd,
                          env={**os.environ, "TF_CLI_CONFIG_FILE": "/dev/null",
                               "TF_IN_AUTOMATION": "1", "TF_INPUT": "0",
                               "NO_COLOR": "1", "CHECKPOINT_DISABLE": "1"})


def test_makefile_builds_the_tofu_the_tests_run() -> None:
    assert f"TOFU_VERSION := {TOFU_VERSION}\n" in (REPO / "Makefile").read_text()


def test_terraform_is_formatted(tofu: Path) -> None:
    result = run_tofu(tofu, "fmt", "-check", "-recursive", "-list=true", str(TERRAFORM),
                      cwd=REPO)
    assert result.returncode == 0, (
        f"run `tofu fmt -recursive infra/terraform` (or terraform fmt):\n{result.stdout}"
        f"{result.stderr}")


def test_terraform_configuration_loads_and_requires_its_providers(
        tofu: Path, tmp_path: Path) -> None:
    """What OpenTofu checks offline: the module loads, and it asks for the providers it uses.

    `init -backend=false` then `validate` would check every resource against the providers'
    schemas, but `init` must fetch hashicorp/aws and hashicorp/random from a registry this
    machine cannot reach (nor can they be built: the aws provider's Go module path stops at
    v1), so neither runs here. `tofu providers` loads the whole configuration (syntax, block
    structure, required_providers) as every command does first.
    """
    work = tmp_path / "aws"
    shutil.copytree(TERRAFORM, work)
    result = run_tofu(tofu, "providers", cwd=work)
    assert result.returncode == 0, result.stdout + result.stderr
    required = dict(re.findall(r"provider\[[^\]]*/hashicorp/(\w+)\] (.+)", result.stdout))
    assert required == {"aws": ">= 5.40.0", "random": ">= 3.5.0"}, result.stdout
    used = {unquote(kind).split("_", 1)[0] for block in terraform().get("resource", [])
            for kind in block}
    assert used <= set(required), f"resources of providers not required: {used - set(required)}"


# -- checkov ------------------------------------------------------------------------------


def checkov_targets() -> list[str]:
    """Name every directory checkov checks: -f beside -d makes checkov drop the files."""
    directories = (TERRAFORM.parent, K8S, COMPOSE.parent, REPO / "worker_image")
    return [arg for path in directories for arg in ("-d", str(path.relative_to(REPO)))]


@pytest.fixture(scope="module")
def checkov(go_cache_dir: Path) -> Path:
    """Return checkov from its own virtualenv in the test cache (`make install` makes it)."""
    venv = go_cache_dir / f"checkov-{CHECKOV_VERSION}"
    if not (venv / ".installed").exists():
        shutil.rmtree(venv, ignore_errors=True)
        try:
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True,
                           capture_output=True, timeout=120)
            result = subprocess.run(
                [str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                 f"checkov=={CHECKOV_VERSION}"], capture_output=True, text=True, check=False,
                timeout=INSTALL_TIMEOUT_SECONDS)
        except Exception as exc:
            unavailable(f"cannot install checkov: {exc}")
        if result.returncode != 0:
            unavailable(f"pip install checkov=={CHECKOV_VERSION} failed: {result.stderr[-2000:]}")
        (venv / ".installed").touch()
    return venv / "bin" / "checkov"


def checkov_reports(output: str) -> list[dict[str, Any]]:
    """Parse checkov's JSON output: one report, a list of them, or several in a row."""
    reports: list[dict[str, Any]] = []
    decoder, at = json.JSONDecoder(), 0
    while output[at:].strip():
        at += len(output[at:]) - len(output[at:].lstrip())
        value, at = decoder.raw_decode(output, at)
        reports.extend(value if isinstance(value, list) else [value])
    return reports


def test_makefile_installs_the_checkov_the_tests_run() -> None:
    assert f"CHECKOV_VERSION := {CHECKOV_VERSION}\n" in (REPO / "Makefile").read_text()


def test_checkov_finds_nothing_unjustified_in_infra_and_the_images(
        checkov: Path, kustomize: Path) -> None:
    # offline: no platform key, no guideline download, no external modules; the kustomize
    # framework renders with the kustomize installed above
    result = subprocess.run(
        [str(checkov), *checkov_targets(), "--framework", "terraform", "kubernetes", "kustomize",
         "dockerfile", "secrets", "--quiet", "--compact", "--skip-download",
         "--download-external-modules", "false", "-o", "json"],
        capture_output=True, text=True, check=False, timeout=300, cwd=REPO,
        env={**os.environ, "PATH": f"{kustomize.parent}:{os.environ['PATH']}",
             "BC_API_KEY": "", "PRISMA_API_URL": ""})
    assert result.returncode in (0, 1), result.stderr[-3000:]
    reports = checkov_reports(result.stdout)
    checked = {r["check_type"] for r in reports if r.get("summary", {}).get("resource_count")}
    assert {"terraform", "kubernetes", "kustomize", "dockerfile"} <= checked, (
        f"checkov checked only {sorted(checked)}:\n{result.stderr[-3000:]}")
    # each directory's report repeats the ones before it: the set keeps one of each
    failed = set()
    for report in reports:
        assert not report["summary"]["parsing_errors"], (
            f"checkov could not parse: {report['results'].get('parsing_errors')}")
        for check in report["results"].get("failed_checks", []):
            failed.add(f"{check['check_id']} {check['file_path']} {check['resource']}: "
                       f"{check['check_name']}")
    assert not failed, "checkov failed checks (fix, or skip inline with the reason):\n" + (
        "\n".join(sorted(failed)))


SKIP_COMMENT = re.compile(r"checkov:skip=([A-Z0-9_]+)(?::(.*))?")
SKIP_ANNOTATION = re.compile(r"checkov\.io/skip\d+:\s*([A-Z0-9_]+)(?:=(.*))?")


def test_every_checkov_skip_says_why() -> None:
    """checkov --quiet does not list its skips: read them where they are written."""
    unexplained = []
    for directory in (TERRAFORM.parent, K8S, COMPOSE.parent, REPO / "worker_image"):
        for path in sorted(p for p in directory.rglob("*") if p.is_file()):
            for line in path.read_text(errors="replace").splitlines():
                for skip in (*SKIP_COMMENT.finditer(line), *SKIP_ANNOTATION.finditer(line)):
                    if len((skip.group(2) or "").strip()) < 20:
                        unexplained.append(f"{path.relative_to(REPO)}: {line.strip()}")
    assert not unexplained, "checkov skips without a reason:\n" + "\n".join(unexplained)
