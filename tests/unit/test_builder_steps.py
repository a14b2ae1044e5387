"""The builder's steps: xcaddy's procedure, without repeating a step that changes nothing."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

from kiln.request.spec import BuildSpec, ResolvedPlugin
from kiln.worker.builder import Builder
from kiln.worker.sandbox.base import EachStep, Step, StepResult

CADDY = "github.com/caddyserver/caddy/v2"


class RecordingSandbox:
    """Record each step; answer as go would for a build whose versions all hold."""

    identity = "test:recording"

    def __init__(self, spec: BuildSpec) -> None:
        self.spec = spec
        self.steps: list[tuple[str, ...]] = []

    def go_version(self) -> str:
        return "go1.27.3"

    def cleanup_orphans(self) -> int:
        return 0

    @contextlib.contextmanager
    def session(self, name: str, *, workdir: Path, network: bool, build_key: str,
                timeout: float) -> Iterator[EachStep]:
        yield EachStep(self, workdir)  # type: ignore[arg-type]

    def run(self, step: Step, *, workdir: Path, on_output: object = None,
            cancel: threading.Event | None = None) -> StepResult:
        self.steps.append(step.argv)
        if step.argv[:3] == ("go", "mod", "tidy"):
            requires = [f"\t{CADDY} {self.spec.caddy_version}"]
            requires += [f"\t{p.module} {p.version}" for p in self.spec.plugins]
            (workdir / "go.mod").write_text("module caddy\n\nrequire (\n"
                                            + "\n".join(requires) + "\n)\n")
        if step.argv[:2] == ("go", "build"):
            (workdir / self.spec.filename).write_bytes(b"binary")
        return StepResult(exit_code=0, output="", duration=0.0)


def _steps(tmp_path: Path, plugins: list[tuple[str, str]]) -> list[tuple[str, ...]]:
    spec = BuildSpec(os="linux", arch="amd64", arm="", caddy_version="v2.8.4",
                     plugins=tuple(ResolvedPlugin(package=m, module=m, version=v)
                                   for m, v in plugins),
                     replacements=(), go_version="go1.27.3", sandbox="test:recording")
    sandbox = RecordingSandbox(spec)
    builder = Builder(sandbox=sandbox, goproxy="file:///nowhere", gosumdb="off",
                      fetch_timeout=60, compile_timeout=60)
    builder.build(spec, key=spec.key(), workdir=tmp_path / "work", log=lambda s, line: None)
    return sandbox.steps


def test_one_plugin_is_fetched_once(tmp_path: Path) -> None:
    core, hello = f"{CADDY}@v2.8.4", "example.com/hello@v0.1.0"
    steps = _steps(tmp_path, [("example.com/hello", "v0.1.0")])
    assert [s for s in steps if s[:2] == ("go", "get")] == [
        ("go", "get", core), ("go", "get", hello, core)]
    assert steps[-2][:3] == ("go", "mod", "tidy") and steps[-1][:2] == ("go", "build")


def test_several_plugins_get_one_combined_re_pin(tmp_path: Path) -> None:
    core = f"{CADDY}@v2.8.4"
    a, b = "example.com/a@v1.0.0", "example.com/b@v2.0.0"
    steps = _steps(tmp_path, [("example.com/a", "v1.0.0"), ("example.com/b", "v2.0.0")])
    assert [s for s in steps if s[:2] == ("go", "get")] == [
        ("go", "get", core), ("go", "get", a, core), ("go", "get", b, core),
        ("go", "get", core, a, b)]
