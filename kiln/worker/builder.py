"""The builder: xcaddy's procedure, done by Kiln, one sandboxed step at a time."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kiln.buildcache.cache import BuildCache, BuildSession
from kiln.errors import KilnError
from kiln.modproxy.modsets import ModuleSets, set_key
from kiln.request.spec import CADDY_MODULE, BuildSpec
from kiln.worker.sandbox.base import (
    COMPILE,
    FETCH,
    CacheProg,
    EachStep,
    Sandbox,
    Session,
    Step,
    StepResult,
)

#: lines of Go output kept in a failure message
ERROR_LINES = 20
#: longest failure message kept (UTF-8 bytes): it is stored with the build and served with it
MAX_ERROR_BYTES = 4 * 1024

#: a log sink receives (step, line); steps are resolve, fetch, compile, upload
LogSink = Callable[[str, str], None]

# Go's messages for a module or version that does not exist: the user must fix the request.
_NOT_FOUND = re.compile(
    r"(404 Not Found|410 Gone|no matching versions|unknown revision|invalid version|"
    r"not found: |malformed module path|cannot find module providing package|"
    r"does not contain package|module .* found, but does not contain)",
    re.I,
)
# what go says of a module it would have had to ask the proxy for, with GOPROXY=off
_CACHE_MISS = "disabled by GOPROXY=off"
# go get's message when a plugin's go.mod requires a newer core than the one pinned
_NEEDS_NEWER_CORE = re.compile(
    rf"go: (\S+)@(\S+) requires {re.escape(CADDY_MODULE)}@(\S+), not "
    rf"{re.escape(CADDY_MODULE)}@(\S+)"
)
# Messages of an unreachable or failing proxy: worth another attempt.
_UNREACHABLE = re.compile(
    r"(dial tcp|connection refused|connection reset|i/o timeout|TLS handshake timeout|"
    r"no such host|502 Bad Gateway|503 Service Unavailable|504 Gateway Timeout|"
    r"500 Internal Server Error|unexpected EOF|network is unreachable)",
    re.I,
)


def clip_error(message: str, limit: int = MAX_ERROR_BYTES) -> str:
    """Return ``message`` cut to at most ``limit`` UTF-8 bytes, saying how many were cut.

    What it returns fits, so clipping a clipped message changes nothing.
    """
    data = message.encode("utf-8", "replace")
    if len(data) <= limit:
        return message
    # room for the note, whose count has at most 20 digits
    kept = data[:limit - 64].decode("utf-8", "ignore")  # a character cut in two is dropped
    return f"{kept}… ({len(data) - len(kept.encode())} bytes cut)"


class BuildFailure(KilnError):
    """A build did not produce a binary; ``retryable`` says whether trying again may help.

    The message is cut at MAX_ERROR_BYTES: Go's output, which it quotes, has no bound.
    """

    def __init__(self, message: str, *, retryable: bool, step: str = "") -> None:
        message = clip_error(message)
        super().__init__(message)
        self.message = message
        self.retryable = retryable
        self.step = step


@dataclass(frozen=True)
class Fetched:
    """The fetch phase's go.mod; ``known`` when it came from the fleet's module set."""

    go_mod: str
    known: bool


class Cancelled(KilnError):
    """The build was cancelled or taken away while it ran."""


@dataclass
class BuildOutput:
    binary: Path
    go_mod: str
    go_sum: str
    #: seconds spent in each step
    timings: dict[str, float] = field(default_factory=dict)
    #: what the compile put in the fleet build cache: publish it once the build succeeded,
    #: discard it otherwise
    cache: BuildSession | None = None
    #: shares the fetch phase's module set with the fleet (kiln/modproxy/modsets.py): call
    #: it once the build succeeded; None when the fleet has it or sets are off
    share_modules: Callable[[], object] | None = None

    def share(self) -> None:
        """The build succeeded: share what it fetched and compiled with the fleet."""
        if self.cache is not None:
            self.cache.publish()
        if self.share_modules is not None:
            self.share_modules()

    def discard(self) -> None:
        """The build did not complete: share nothing of it."""
        if self.cache is not None:
            self.cache.discard()


def main_go(spec: BuildSpec) -> str:
    """Return the main.go xcaddy v0.4.5 writes for ``spec``, byte for byte.

    Even the comment line counts: with -trimpath the binary still records main.go's line
    numbers, so a different layout gives different bytes.
    """
    imports = [
        f'\tcaddycmd "{CADDY_MODULE}/cmd"',
        "",
        "\t// plug in Caddy modules here",
        f'\t_ "{CADDY_MODULE}/modules/standard"',
    ]
    imports += [f'\t_ "{p.package}"' for p in spec.plugins]
    return (
        "package main\n\nimport (\n" + "\n".join(imports) + "\n)\n\n"
        "func main() {\n\tcaddycmd.Main()\n}\n"
    )


def setup_commands(spec: BuildSpec) -> list[list[str]]:
    """Return the steps that create go.mod, as xcaddy runs them.

    ``go mod init`` picks the go line (Go 1.26+ writes the previous release's), which sets
    the binary's default GODEBUG: writing go.mod by hand would give different bytes.
    """
    commands = [["go", "mod", "init", "caddy"]]
    if spec.replacements:
        edit = ["go", "mod", "edit"]
        for r in spec.replacements:
            source = f"{r.old}@{r.old_version}" if r.old_version else r.old
            edit += ["-replace", f"{source}={r.new}@{r.new_version}"]
        commands.append(edit)
    return commands


def summarize(output: str, limit: int = ERROR_LINES) -> str:
    """Return the lines of Go output a user needs to see why a step failed."""
    lines = [line for line in output.splitlines() if line.strip()]
    # what a module proxy said, as go quotes it under "server response:" (e.g. the module
    # cache refusing a download whose checksum does not match the checksum database)
    quoted: set[int] = set()
    for i, line in enumerate(lines):
        if line.strip() == "server response:":
            j = i + 1
            while j < len(lines) and lines[j].startswith("\t"):
                quoted.add(j)
                j += 1
    wanted = [
        line for i, line in enumerate(lines)
        if line.startswith(("go: ", "# ")) or re.match(r"^\S+\.go:\d+", line)
        or "error" in line.lower() or "requires" in line or i in quoted
    ]
    chosen = wanted or lines
    return "\n".join(chosen[-limit:]) or "(no output)"


def required_version(go_mod_text: str, module: str) -> str | None:
    """Return the version go.mod requires of ``module``."""
    pattern = re.compile(rf"^\s*(?:require\s+)?{re.escape(module)}\s+(\S+)", re.M)
    match = pattern.search(go_mod_text)
    return match.group(1) if match else None


class Builder:
    """Turn a resolved BuildSpec into a Caddy binary in a work directory."""

    def __init__(
        self,
        *,
        sandbox: Sandbox,
        goproxy: str,
        gosumdb: str,
        fetch_timeout: float,
        compile_timeout: float,
        clock: Callable[[], float] = time.monotonic,
        buildcache: BuildCache | None = None,
        modsets: ModuleSets | None = None,
    ) -> None:
        self.sandbox = sandbox
        self.buildcache = buildcache
        self.modsets = modsets
        self.goproxy = goproxy
        self.gosumdb = gosumdb
        self.fetch_timeout = fetch_timeout
        self.compile_timeout = compile_timeout
        self.clock = clock

    def _fetch_env(self) -> dict[str, str]:
        return {
            "GOPROXY": self.goproxy,
            "GOSUMDB": self.gosumdb,
            "GOFLAGS": "-mod=mod",
            "GOTOOLCHAIN": "local",
            "CGO_ENABLED": "0",
        }

    def _run(self, step: Step, place: Session, log: LogSink, cancel: threading.Event | None,
             timings: dict[str, float], *, quiet: bool = False) -> StepResult:
        if cancel is not None and cancel.is_set():
            raise Cancelled()
        log(step.name, "$ " + " ".join(step.argv) + (" (module cache only)" if quiet else ""))
        started = self.clock()
        result = place.run(step, on_output=None if quiet else lambda line: log(step.name, line),
                           cancel=cancel)
        timings[step.name] = timings.get(step.name, 0.0) + (self.clock() - started)
        if result.killed == "cancelled":
            raise Cancelled()
        if result.killed == "timeout":
            raise BuildFailure(
                f"{step.name} step timed out after {step.timeout:.0f}s", retryable=True,
                step=step.name,
            )
        if result.killed == "oom":
            raise BuildFailure(
                f"{step.name} step ran out of memory (the sandbox's memory limit)",
                retryable=False, step=step.name,
            )
        if result.killed:
            raise BuildFailure(f"{step.name} step was stopped: {result.killed}",
                               retryable=False, step=step.name)
        return result

    def _fetch(self, args: list[str], session: Session, log: LogSink,
               cancel: threading.Event | None, timings: dict[str, float], key: str) -> None:
        # First from the module cache alone: even when every module is there, go get asks
        # the proxy for the version list of each module in the graph (retraction and
        # deprecation notices, which do not change go.mod), about 30 s of round trips for
        # a real Caddy; with GOPROXY=off it reads the cache (checksums checked against
        # the checksum database's cached, verified tiles) and writes the same go.mod and
        # go.sum. Anything missing fails at once and the step runs again with the proxy.
        offline = Step(FETCH, tuple(args), env={**self._fetch_env(), "GOPROXY": "off"},
                       network=True, timeout=self.fetch_timeout, build_key=key)
        tried = self._run(offline, session, log, cancel, timings, quiet=True)
        # go mod tidy -e reports what it could not look up and still exits 0
        if tried.ok and _CACHE_MISS not in tried.output:
            return
        step = Step(FETCH, tuple(args), env=self._fetch_env(), network=True,
                    timeout=self.fetch_timeout, build_key=key)
        result = self._run(step, session, log, cancel, timings)
        if result.ok:
            return
        summary = summarize(result.output)
        newer = _NEEDS_NEWER_CORE.search(result.output)
        if newer:
            plugin, version, needed, asked = newer.groups()
            raise BuildFailure(
                f"{plugin} {version} needs Caddy {needed} or newer, but Caddy {asked} was "
                f"asked for: ask for Caddy {needed} or newer, or an older {plugin}\n{summary}",
                retryable=False, step=FETCH,
            )
        if _UNREACHABLE.search(result.output) and not _NOT_FOUND.search(result.output):
            raise BuildFailure(f"module proxy unreachable:\n{summary}", retryable=True,
                               step=FETCH)
        raise BuildFailure(summary, retryable=False, step=FETCH)

    def build(self, spec: BuildSpec, *, key: str, workdir: Path, log: LogSink,
              cancel: threading.Event | None = None) -> BuildOutput:
        """Fetch modules and compile; raise BuildFailure or Cancelled."""
        timings: dict[str, float] = {}
        # what an earlier build of this key compiled comes onto the disk while modules are
        # fetched (kiln/buildcache/cache.py)
        prefetch = self.buildcache.prefetch(key) if self.buildcache is not None else None
        try:
            fetched = self.fetch(spec, key=key, workdir=workdir, log=log, cancel=cancel,
                                 timings=timings)
            output = self.compile(spec, key=key, workdir=workdir, log=log, cancel=cancel,
                                  timings=timings)
        finally:
            if prefetch is not None:
                prefetch.stop()
        if self.modsets is not None and not fetched.known:
            modsets, set_id = self.modsets, self.module_set(spec)
            go_mod, go_sum = output.go_mod, output.go_sum
            output.share_modules = lambda: modsets.publish(set_id, go_mod=go_mod, go_sum=go_sum)
        return output

    def warm(self, spec: BuildSpec, *, key: str) -> bool:
        """Bring onto this worker's disk what the fleet kept of an earlier build of ``key``:
        its module set and its compiled packages; tell whether the modules came."""
        prefetch = self.buildcache.prefetch(key) if self.buildcache is not None else None
        restored = (self.modsets.restore(self.module_set(spec)) if self.modsets is not None
                    else None)
        if prefetch is not None:
            prefetch.wait()
        return restored is not None

    def module_set(self, spec: BuildSpec) -> str:
        """Return the key of the module set ``spec``'s fetch phase gives."""
        return set_key(
            go_version=self.sandbox.go_version(), caddy_version=spec.caddy_version,
            plugins=[(p.module, p.version, p.package) for p in spec.plugins],
            replacements=[(r.old, r.old_version or "", r.new, r.new_version)
                          for r in spec.replacements])

    def _known_set(self, spec: BuildSpec, workdir: Path, log: LogSink,
                   timings: dict[str, float]) -> str | None:
        """Write go.mod and go.sum from the fleet's module set for ``spec``; return go.mod.

        None: the fleet has no usable set, and the fetch steps run.
        """
        if self.modsets is None:
            return None
        started = self.clock()
        set_id = self.module_set(spec)
        log(FETCH, f"modules: asking the fleet for module set {set_id[:12]}")
        known = self.modsets.restore(set_id)
        if known is None:
            log(FETCH, "modules: the fleet has no usable module set; fetching")
            return None
        (workdir / "go.mod").write_text(known.go_mod)
        (workdir / "go.sum").write_text(known.go_sum)
        timings[FETCH] = timings.get(FETCH, 0.0) + (self.clock() - started)
        log(FETCH, f"modules: the fleet's module set {set_id[:12]} ({known.modules} module "
                   f"versions, {known.extracted} of them unpacked from the store); "
                   "fetch steps skipped")
        return known.go_mod

    def fetch(self, spec: BuildSpec, *, key: str, workdir: Path, log: LogSink,
              cancel: threading.Event | None = None,
              timings: dict[str, float] | None = None) -> Fetched:
        """Write main.go and go.mod, fetch and pin the modules; return the final go.mod."""
        timings = {} if timings is None else timings
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "main.go").write_text(main_go(spec))
        (workdir / "go.mod").unlink(missing_ok=True)
        known = self._known_set(spec, workdir, log, timings)
        if known is not None:
            self._check_pins(spec, known)
            return Fetched(known, known=True)
        core = f"{CADDY_MODULE}@{spec.caddy_version}"
        pins = [f"{p.module}@{p.version}" for p in spec.plugins]
        commands = [*setup_commands(spec), ["go", "get", core]]
        commands += [["go", "get", pin, core] for pin in pins]
        if len(pins) > 1:
            # one combined re-pin: fails if any plugin drags core (or another plugin) away;
            # with one plugin it would repeat that plugin's own get (~0.1 s even in a
            # session; bench/)
            commands.append(["go", "get", core, *pins])
        commands.append(["go", "mod", "tidy", "-e"])
        # one session for the whole phase: the docker sandbox runs its steps in one
        # container instead of starting one per step (0.3-0.5 s each; bench/)
        with self.sandbox.session(FETCH, workdir=workdir, network=True, build_key=key,
                                  timeout=2 * self.fetch_timeout * len(commands)) as session:
            for args in commands:
                self._fetch(args, session, log, cancel, timings, key)
        mod_text = (workdir / "go.mod").read_text()
        self._check_pins(spec, mod_text)
        return Fetched(mod_text, known=False)

    @staticmethod
    def _check_pins(spec: BuildSpec, mod_text: str) -> None:
        """Raise BuildFailure when go.mod does not require what ``spec`` pinned."""
        linked = required_version(mod_text, CADDY_MODULE)
        if linked != spec.caddy_version:
            raise BuildFailure(
                f"a plugin requires {CADDY_MODULE} {linked}, not the {spec.caddy_version} "
                "asked for: ask for that Caddy version or an older plugin version",
                retryable=False, step=FETCH,
            )
        for p in spec.plugins:
            got = required_version(mod_text, p.module)
            if got != p.version:
                raise BuildFailure(
                    f"{p.module} was moved from {p.version} to {got} by another plugin's "
                    "requirements: ask for compatible versions",
                    retryable=False, step=FETCH,
                )

    def compile(self, spec: BuildSpec, *, key: str, workdir: Path, log: LogSink,
                cancel: threading.Event | None = None,
                timings: dict[str, float] | None = None) -> BuildOutput:
        """Compile ``spec`` in a work directory ``fetch`` prepared (for any platform)."""
        timings = {} if timings is None else timings
        mod_text = (workdir / "go.mod").read_text()
        output = spec.filename
        env = {
            "GOPROXY": "off",
            "GOFLAGS": "-mod=mod",
            "GOTOOLCHAIN": "local",
            "CGO_ENABLED": "0",
            **spec.goenv(),
        }
        args = ["go", "build", "-o", output, "-trimpath", "-buildvcs=false",
                "-ldflags", spec.ldflags]
        if spec.tags:
            args += ["-tags", ",".join(spec.tags)]
        cache = self.buildcache.begin(key) if self.buildcache is not None else None
        try:
            step = Step(COMPILE, tuple(args), env=env, network=False,
                        timeout=self.compile_timeout, build_key=key,
                        cacheprog=None if cache is None else CacheProg(
                            program=cache.cache.program, socket=cache.socket,
                            outputs=cache.cache.outputs))
            result = self._run(step, EachStep(self.sandbox, workdir), log, cancel, timings)
            if not result.ok:
                raise BuildFailure(summarize(result.output), retryable=False, step=COMPILE)
            binary = workdir / output
            if not binary.is_file():
                raise BuildFailure("go build reported success but wrote no binary",
                                   retryable=True, step=COMPILE)
        except BaseException:
            if cache is not None:
                cache.discard()
            raise
        if cache is not None:
            cache.stop()
        go_sum = workdir / "go.sum"
        return BuildOutput(
            binary=binary,
            go_mod=mod_text,
            go_sum=go_sum.read_text() if go_sum.exists() else "",
            timings=timings,
            cache=cache,
        )
