"""Builds ready before anyone asks: the popular configurations, queued on each new release.

After a Caddy release every popular plugin set is asked for at once. The ``prebuild`` job
(``janitor.prebuild``) resolves "latest" of Caddy, and of the plugins of the most downloaded
configurations, through the resolver the API uses (and its shared cache), and compares each
with the version it recorded last time (kiln_prebuild_versions). When one changed, it queues
each of the top configurations that followed the previous latest (one of its downloaded
builds was on it: its users ask for "latest", not for a pin) as a user asking for
"latest" of everything would: through the build service, so the key is the one that user's
request makes and their first request is a hit. Prebuilds are queued below every user's
priority, recorded as requested by "prebuild", never counted against a quota, and counted
in ``/metrics`` as ``kiln_prebuilds_total{result}``.

The first run only records the versions it sees: a release is a change it witnessed.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Protocol

from kiln.db.prebuilds import Configuration, PrebuildRecords
from kiln.errors import SpecError
from kiln.request.catalog import CatalogError
from kiln.request.spec import CADDY_MODULE, BuildRequest, PluginRequest, is_core_package
from kiln.resolve.proxy import ModuleNotFound
from kiln.resolve.resolver import Resolver

if TYPE_CHECKING:
    from kiln.metrics import MetricsRecorder

log = logging.getLogger(__name__)

#: kiln_builds.requested_by of prebuilds (a user's is a key id or addr:<address>)
PREBUILD_REQUESTER = "prebuild"
#: queue priority of prebuilds: below anonymous requests (0) and keys of any usual priority
PREBUILD_PRIORITY = -1000
METRIC = "kiln_prebuilds_total"
#: what makes a configuration unbuildable for good (a plugin gone or no longer allowed):
#: counted as failed; anything else (the proxy down, no worker yet) fails the run, retried
UNBUILDABLE = (SpecError, ModuleNotFound, CatalogError)


class Submission(Protocol):
    @property
    def key(self) -> str: ...

    @property
    def queued(self) -> bool: ...


class Submit(Protocol):
    def __call__(self, request: BuildRequest, *, priority: int | None = ...,
                 requested_by: str | None = ...) -> Submission: ...


class Prebuilder:
    """Queue the top configurations on a new Caddy or plugin release (the ``prebuild`` job)."""

    def __init__(self, *, records: PrebuildRecords, resolver: Resolver, submit: Submit,
                 top: int, window: float, metrics: MetricsRecorder | None = None) -> None:
        self.records = records
        self.resolver = resolver
        #: BuildService.submit: the API's path from a request to a spec, a key and a queue row
        self.submit = submit
        self.top = top
        self.window = window
        self.metrics = metrics

    def run(self) -> list[str]:
        """Look for releases; queue what they call for; return what was done."""
        configurations = self.records.popular(window=self.window, limit=self.top)
        latest = {CADDY_MODULE: self.resolver.for_request().resolve(CADDY_MODULE, "latest")}
        module_of: dict[str, str] = {}
        for package in sorted({p for c in configurations for p in c.packages
                               if not is_core_package(p)}):
            try:
                plugin = self.resolver.for_request().resolve_plugin(PluginRequest(package))
            except UNBUILDABLE as exc:
                log.warning("prebuild: cannot resolve the latest %s: %s", package, exc)
                continue
            module_of[package] = plugin.module
            latest[plugin.module] = plugin.version
        seen = self.records.seen_versions(latest)
        #: module → the version that was its latest until this release
        released = {m: seen[m] for m, v in latest.items() if m in seen and seen[m] != v}
        for module, before in sorted(released.items()):
            log.info("prebuild: %s has a new latest, %s (was %s)", module, latest[module], before)
        done: list[str] = []
        try:
            for configuration in configurations:
                if self._follows(configuration, released, module_of):
                    done.append(self._prebuild(configuration))
        finally:
            if self.metrics is not None:
                self.metrics.flush()
        # only now: a run that fails before this point sees the release again next time
        self.records.record_versions(latest)
        return done

    @staticmethod
    def _follows(configuration: Configuration, released: dict[str, str],
                 module_of: dict[str, str]) -> bool:
        """Tell whether a configuration was built on the previous latest of a released module."""
        before = released.get(CADDY_MODULE)
        if before is not None and before in configuration.caddy_versions:
            return True
        for package in configuration.packages:
            module = module_of.get(package)
            before = released.get(module) if module else None
            if before is not None and f"{module}@{before}" in configuration.module_versions:
                return True
        return False

    def _prebuild(self, configuration: Configuration) -> str:
        what = configuration.describe()
        try:
            request = BuildRequest.create(
                os=configuration.os, arch=configuration.arch, arm=configuration.arm or None,
                caddy_version="latest", plugins=configuration.packages,
                replacements=[_replacement(r) for r in configuration.replacements])
            submitted = self.submit(request, priority=PREBUILD_PRIORITY,
                                    requested_by=PREBUILD_REQUESTER)
        except UNBUILDABLE as exc:
            log.warning("prebuild of %s refused: %s", what, exc)
            self._count("failed")
            return f"failed {what}: {exc}"
        result = "queued" if submitted.queued else "hit"
        self._count(result)
        return f"{result} {submitted.key[:12]} {what}"

    def _count(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.inc(METRIC, {"result": result})


def _replacement(data: dict[str, str]) -> str:
    """Return a spec's replacement as a request writes it: old[@version]=new@version."""
    old = f"{data['old']}@{data['old_version']}" if data.get("old_version") else data["old"]
    return f"{old}={data['new']}@{data['new_version']}"
