"""Spot-instance preemption: notice the cloud's warning and drain the worker.

Each detector speaks its provider's instance metadata protocol:

- AWS: IMDSv2. ``PUT /latest/api/token`` (header ``X-aws-ec2-metadata-token-ttl-seconds``)
  returns a session token; ``GET /latest/meta-data/spot/instance-action`` with header
  ``X-aws-ec2-metadata-token`` answers 404 until the two-minute interruption notice, then
  ``{"action": "terminate"|"stop"|"hibernate", "time": "..."}``.
- GCE: ``GET /computeMetadata/v1/instance/preempted`` with ``Metadata-Flavor: Google``
  answers ``FALSE``, then ``TRUE`` once the VM is being preempted (30 s before it stops).
- Azure: Scheduled Events. ``GET /metadata/scheduledevents?api-version=2020-07-01`` with
  ``Metadata: true`` lists events; a ``Preempt`` event for this VM (at least 30 s ahead) is
  the notice. Once drained, the worker acknowledges it by POSTing ``{"StartRequests":
  [{"EventId": ...}]}`` to the same URL, which lets Azure proceed at once.

SIGTERM and SIGUSR1 are notices too (Kubernetes evicting a pod from a reclaimed node, a
termination handler, an operator). A ``PreemptionMonitor`` polls the detectors in
threads and calls its ``on_notice`` once, with the first notice.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger(__name__)

AWS_TOKEN_TTL_SECONDS = 21600
#: a token is renewed this long before it expires
AWS_TOKEN_MARGIN_SECONDS = 60.0
AZURE_API_VERSION = "2020-07-01"
AZURE_COMPUTE_API_VERSION = "2021-02-01"
POLL_SECONDS = 1.0
REQUEST_TIMEOUT = 2.0
#: signals that drain the worker (SIGINT too, for a worker run in a terminal)
DRAIN_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


@dataclass(frozen=True)
class Notice:
    """A warning that this machine is about to go away."""

    source: str
    detail: str
    #: the provider's id of the event (Azure), for the acknowledgement
    event_id: str = ""


class Detector(Protocol):
    """Asks one metadata service whether this instance is being preempted."""

    name: str

    def poll(self) -> Notice | None:
        """Return a notice if one was given; raise OSError if the service cannot be reached."""
        ...

    def acknowledge(self, notice: Notice) -> None:
        """Tell the provider the worker is done with the notice (where it wants to know)."""
        ...


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


def http(method: str, url: str, *, headers: dict[str, str], timeout: float,
         data: bytes | None = None) -> Response:
    """Send one request and return the response, whatever its status (never via a proxy)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with opener.open(request, timeout=timeout) as resp:
            return Response(resp.status, {k.lower(): v for k, v in resp.headers.items()},
                            resp.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return Response(exc.code, {k.lower(): v for k, v in exc.headers.items()},
                            exc.read())


class AwsSpotDetector:
    """EC2 spot interruption notices through IMDSv2."""

    name = "aws"

    def __init__(self, base_url: str, *, timeout: float = REQUEST_TIMEOUT,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.base = base_url.rstrip("/")
        self.timeout = timeout
        self.clock = clock
        self._token = ""
        self._token_expires = 0.0

    def _session_token(self) -> str:
        if self._token and self.clock() < self._token_expires:
            return self._token
        resp = http("PUT", f"{self.base}/latest/api/token", timeout=self.timeout,
                    headers={"X-aws-ec2-metadata-token-ttl-seconds": str(AWS_TOKEN_TTL_SECONDS)})
        if resp.status != 200:
            raise OSError(f"IMDSv2 token request answered {resp.status}")
        self._token = resp.body.decode().strip()
        self._token_expires = self.clock() + AWS_TOKEN_TTL_SECONDS - AWS_TOKEN_MARGIN_SECONDS
        return self._token

    def poll(self) -> Notice | None:
        """Return the spot instance-action notice, if any."""
        for _ in range(2):
            resp = http("GET", f"{self.base}/latest/meta-data/spot/instance-action",
                        timeout=self.timeout,
                        headers={"X-aws-ec2-metadata-token": self._session_token()})
            if resp.status == 401:  # the token expired or IMDS restarted: get a new one
                self._token = ""
                continue
            if resp.status == 404:
                return None
            if resp.status != 200:
                raise OSError(f"spot/instance-action answered {resp.status}")
            try:
                action = json.loads(resp.body)
                detail = f"spot {action.get('action', '?')} at {action.get('time', '?')}"
            except (ValueError, AttributeError):
                detail = f"spot instance-action {resp.body[:200]!r}"
            return Notice(self.name, detail)
        raise OSError("IMDSv2 rejected a fresh token")

    def acknowledge(self, notice: Notice) -> None:
        """Do nothing: EC2 takes no acknowledgement."""


class GceDetector:
    """Compute Engine preemption (spot and preemptible VMs) through the metadata server."""

    name = "gce"

    def __init__(self, base_url: str, *, timeout: float = REQUEST_TIMEOUT) -> None:
        self.base = base_url.rstrip("/")
        self.timeout = timeout

    def poll(self) -> Notice | None:
        """Return a notice once ``instance/preempted`` says TRUE."""
        resp = http("GET", f"{self.base}/computeMetadata/v1/instance/preempted",
                    timeout=self.timeout, headers={"Metadata-Flavor": "Google"})
        if resp.status != 200:
            raise OSError(f"instance/preempted answered {resp.status}")
        # the real server labels its answers; anything else is not the metadata server
        if resp.headers.get("metadata-flavor") != "Google":
            raise OSError("the answer did not come from a GCE metadata server")
        if resp.body.decode().strip().upper() == "TRUE":
            return Notice(self.name, "instance preempted")
        return None

    def acknowledge(self, notice: Notice) -> None:
        """Do nothing: GCE takes no acknowledgement."""


class AzureDetector:
    """Azure Scheduled Events: Preempt events for this VM (spot priority)."""

    name = "azure"

    def __init__(self, base_url: str, *, timeout: float = REQUEST_TIMEOUT) -> None:
        self.base = base_url.rstrip("/")
        self.timeout = timeout
        self.url = f"{self.base}/metadata/scheduledevents?api-version={AZURE_API_VERSION}"
        self._vm_name: str | None = None

    def _name(self) -> str:
        """Return this VM's name ("" if unknown: then every Preempt event counts)."""
        if self._vm_name is None:
            resp = http("GET", f"{self.base}/metadata/instance/compute/name"
                               f"?api-version={AZURE_COMPUTE_API_VERSION}&format=text",
                        timeout=self.timeout, headers={"Metadata": "true"})
            self._vm_name = resp.body.decode().strip() if resp.status == 200 else ""
        return self._vm_name

    def poll(self) -> Notice | None:
        """Return a notice for a scheduled Preempt event naming this VM."""
        resp = http("GET", self.url, timeout=self.timeout, headers={"Metadata": "true"})
        if resp.status != 200:
            raise OSError(f"scheduledevents answered {resp.status}")
        try:
            events = json.loads(resp.body).get("Events") or []
        except (ValueError, AttributeError) as exc:
            raise OSError(f"scheduledevents is not JSON: {exc}") from None
        name = self._name()
        for event in events:
            if event.get("EventType") != "Preempt":
                continue
            resources = event.get("Resources") or []
            if name and resources and name not in resources:
                continue
            return Notice(self.name, f"Preempt not before {event.get('NotBefore', '?')}",
                          event_id=str(event.get("EventId", "")))
        return None

    def acknowledge(self, notice: Notice) -> None:
        """Approve the event so that Azure proceeds without waiting for NotBefore."""
        if not notice.event_id:
            return
        body = json.dumps({"StartRequests": [{"EventId": notice.event_id}]}).encode()
        resp = http("POST", self.url, data=body, timeout=self.timeout,
                    headers={"Metadata": "true", "Content-Type": "application/json"})
        if resp.status != 200:
            raise OSError(f"acknowledging event {notice.event_id} answered {resp.status}")


class PreemptionMonitor:
    """Poll detectors in threads and report the first notice (or drain signal) once."""

    def __init__(self, detectors: Sequence[Detector], *, on_notice: Callable[[Notice], None],
                 poll_seconds: float = POLL_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.detectors = list(detectors)
        self.on_notice = on_notice
        self.poll_seconds = poll_seconds
        self.clock = clock
        self.notice: Notice | None = None
        #: clock() when the notice arrived
        self.noticed_at: float | None = None
        self._detector: Detector | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def _report(self, notice: Notice, detector: Detector | None, *,
                blocking: bool = True) -> bool:
        # a signal handler must not block: it may have interrupted this very method
        if not self._lock.acquire(blocking=blocking):
            return False
        try:
            if self.notice is not None:
                return False
            self.notice, self.noticed_at, self._detector = notice, self.clock(), detector
        finally:
            self._lock.release()
        self.on_notice(notice)
        return True

    def check(self) -> Notice | None:
        """Poll every detector once, now (an instance may be doomed before the worker starts)."""
        for detector in self.detectors:
            try:
                notice = detector.poll()
            except (OSError, ValueError) as exc:
                log.warning("%s metadata service unreachable: %s", detector.name, exc)
                continue
            if notice is not None:
                self._report(notice, detector)
                return notice
        return None

    def _watch(self, detector: Detector) -> None:
        failing = False
        while not self._stop.is_set() and self.notice is None:
            try:
                notice = detector.poll()
            except (OSError, ValueError) as exc:  # unreachable, or answering nonsense
                if not failing:  # once per outage, not once a second
                    log.warning("%s metadata service unreachable: %s", detector.name, exc)
                failing = True
            else:
                if failing:
                    log.info("%s metadata service reachable again", detector.name)
                failing = False
                if notice is not None:
                    if self._report(notice, detector):
                        log.warning("preemption notice from %s (%s): draining",
                                    notice.source, notice.detail)
                    return
            self._stop.wait(self.poll_seconds)

    def start(self) -> None:
        """Start one polling thread per detector."""
        for detector in self.detectors:
            thread = threading.Thread(target=self._watch, args=(detector,),
                                      name=f"kiln-preemption-{detector.name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def on_signal(self, signum: int, frame: object = None) -> None:
        """Treat a drain signal as a notice (install as a signal handler)."""
        # a signal handler must not log (the logging lock may be held by this thread)
        self._report(Notice("signal", signal.Signals(signum).name), None, blocking=False)

    def install_signal_handlers(self) -> None:
        """Drain on SIGTERM, SIGUSR1 and SIGINT."""
        for signum in DRAIN_SIGNALS:
            signal.signal(signum, self.on_signal)

    def stop(self) -> None:
        """Stop polling."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=REQUEST_TIMEOUT + 1)

    def acknowledge(self) -> None:
        """Acknowledge the notice to the provider that gave it (after draining)."""
        if self.notice is None or self._detector is None:
            return
        try:
            self._detector.acknowledge(self.notice)
        except OSError as exc:
            log.warning("could not acknowledge the %s notice: %s", self.notice.source, exc)
