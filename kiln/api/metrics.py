"""``/metrics`` and the middleware that times every request."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from kiln.api.held import KINDS, SlotTable
from kiln.metrics import HTTP_BUCKETS, KilnCollector, MetricsRecorder

if TYPE_CHECKING:
    import falcon

#: methods counted under their own name; any other a client sends is ``other``, so no
#: request can add a series (and a kiln_metrics row) of its choosing
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
#: the route label of a request that matched no route (its path is the client's to choose)
UNMATCHED = "unmatched"


class MetricsMiddleware:
    """Record each request's time to response headers by method, route and status."""

    def __init__(self, recorder: MetricsRecorder,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.recorder = recorder
        self.clock = clock

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.metrics_started = self.clock()

    def process_response(self, req: falcon.Request, resp: falcon.Response, resource: object,
                         req_succeeded: bool) -> None:
        started = req.context.get("metrics_started")
        if started is None:
            return
        # labels come only from the route table and fixed sets: a client chooses none
        route = req.uri_template if resource is not None and req.uri_template else UNMATCHED
        method = req.method if req.method in METHODS else "other"
        self.recorder.observe(
            "kiln_http_request_duration_seconds",
            {"method": method, "route": route, "status": str(resp.status_code)},
            self.clock() - started, HTTP_BUCKETS)


class HeldCollector(Collector):
    """The held downloads and live streams of the process that answers the scrape."""

    def __init__(self, slots: SlotTable) -> None:
        self.slots = slots

    def collect(self) -> Iterator[GaugeMetricFamily]:
        held = GaugeMetricFamily(
            "kiln_api_held_connections",
            "Held downloads and live log streams of the API process that answered",
            labels=["kind"])
        for kind in KINDS:
            held.add_metric([kind], self.slots.held(kind))
        yield held
        yield GaugeMetricFamily(
            "kiln_api_held_limit",
            "Held connections one API process serves at once (api.max_held)",
            value=self.slots.limit)


class MetricsResource:
    """``/metrics``: Prometheus text exposition of the whole deployment."""

    def __init__(self, *, recorder: MetricsRecorder, collector: KilnCollector,
                 slots: SlotTable | None = None) -> None:
        #: requirements for kiln.api.auth (empty: public)
        self.auth: dict[str, str] = {}
        self.recorder = recorder
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        if slots is not None:
            self.registry.register(HeldCollector(slots))

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        # this process's latest counts belong in the answer it gives
        self.recorder.flush()
        resp.content_type = CONTENT_TYPE_LATEST
        resp.data = generate_latest(self.registry)
