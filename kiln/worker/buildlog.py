"""Build logs: workers write each attempt's output in batches; the API reads and follows it.

A worker's `LogWriter` hands out one sink per attempt. Lines are numbered (seq, from 1 per
attempt) as they arrive and written to ``kiln_build_logs`` in batches of ``batch_lines``
or every ``flush_seconds``, whichever comes first; each batch is announced with a NOTIFY on
``kiln_logs`` in the same statement, so a watcher woken by it always finds the lines. A
database fault never fails a build: a batch that cannot be written is retried a few times
on later flushes, then dropped with a warning.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from kiln.db.build_logs import RESULT_STEP, BuildLogs

log = logging.getLogger(__name__)

BATCH_LINES = 100
FLUSH_SECONDS = 0.2
MAX_LINE_LENGTH = 4096
MAX_LINES = 20000
#: consecutive failed writes of one attempt's batch before its lines are dropped
MAX_WRITE_FAILURES = 3
#: an attempt that printed nothing for this long (and has nothing buffered) is forgotten
IDLE_FORGET_SECONDS = 600.0


class AttemptLog:
    """The log sink of one attempt: numbers lines and buffers them for the writer."""

    def __init__(self, writer: LogWriter, key: str, attempt: int) -> None:
        self.writer = writer
        self.key = key
        self.attempt = attempt
        self.seq = 0
        self.finished = False
        self.truncated = False
        self.failures = 0
        self.first_at = 0.0
        self.last_at = writer.clock()
        self._buffer: list[tuple[int, str, str, float]] = []
        self._lock = threading.Lock()
        # one batch in flight per attempt, so batches are committed in seq order
        self._flush_lock = threading.Lock()

    def __call__(self, step: str, line: str) -> None:
        """Buffer one line of output (the LogSink the builder and worker call)."""
        w = self.writer
        if len(line) > w.max_line_length:
            line = line[: w.max_line_length] + " [line cut]"
        wake = False
        with self._lock:
            if self.seq >= w.max_lines and step != RESULT_STEP:
                if self.truncated:
                    return
                self.truncated = True
                line = f"[further output not stored: the log passed {w.max_lines} lines]"
            self.seq += 1
            now = w.clock()
            if not self._buffer:
                self.first_at = now
                wake = True
            self.last_at = now
            self._buffer.append((self.seq, step, line, w.wall()))
            wake = wake or len(self._buffer) >= w.batch_lines
        if step == RESULT_STEP:
            # the attempt is over: write its last lines now, before the worker moves on
            # (or exits), from the build's own thread
            self.finished = True
            self.flush()
        elif wake:
            w.wake()

    def pending(self) -> int:
        """Return how many lines wait to be written."""
        with self._lock:
            return len(self._buffer)

    def due(self, now: float) -> bool:
        """Return whether buffered lines should be written now."""
        with self._lock:
            return self._due(now)

    def _due(self, now: float) -> bool:
        return bool(self._buffer) and (len(self._buffer) >= self.writer.batch_lines
                                       or now - self.first_at >= self.writer.flush_seconds)

    def flush(self, *, whole: bool = True) -> None:
        """Write buffered lines in batches: all of them, or (not ``whole``) the due ones.

        A batch that cannot be written stays buffered for the next flush, a few times.
        """
        w = self.writer
        with self._flush_lock:
            while True:
                with self._lock:
                    if not self._buffer or not (whole or self._due(w.clock())):
                        return
                    batch = self._buffer[: w.batch_lines]
                    del self._buffer[: w.batch_lines]
                    if self._buffer:  # the rest waits at most another flush_seconds
                        self.first_at = w.clock()
                try:
                    w.logs.append(self.key, self.attempt, batch)
                except Exception as exc:  # the build must not fail because its log can't be stored
                    self.failures += 1
                    if self.failures >= MAX_WRITE_FAILURES:
                        log.warning("dropping %d log lines of build %s: %s", len(batch),
                                    self.key, exc, extra={"build_key": self.key})
                        self.failures = 0
                        continue
                    log.info("could not store log lines of build %s, will retry: %s",
                             self.key, exc, extra={"build_key": self.key})
                    with self._lock:
                        self._buffer[:0] = batch
                        self.first_at = w.clock()
                    return
                self.failures = 0


class LogWriter:
    """Make per-attempt log sinks (a worker's ``log_sinks``) and write them in batches."""

    def __init__(self, logs: BuildLogs, *, batch_lines: int = BATCH_LINES,
                 flush_seconds: float = FLUSH_SECONDS, max_line_length: int = MAX_LINE_LENGTH,
                 max_lines: int = MAX_LINES, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.logs = logs
        self.batch_lines = batch_lines
        self.flush_seconds = flush_seconds
        self.max_line_length = max_line_length
        self.max_lines = max_lines
        self.clock = clock
        self.wall = wall
        self._sinks: dict[tuple[str, int], AttemptLog] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __call__(self, key: str, attempt: int) -> AttemptLog:
        """Return the sink of one attempt of one build."""
        sink = AttemptLog(self, key, attempt)
        with self._lock:
            self._sinks[(key, attempt)] = sink
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._thread = threading.Thread(target=self._run, name="kiln-log-writer",
                                                daemon=True)
                self._thread.start()
        return sink

    def wake(self) -> None:
        """Have the writer thread look at the buffers now."""
        self._wake.set()

    def flush(self, *, force: bool = False) -> None:
        """Write every batch that is due (all of them with ``force``); forget finished sinks."""
        now = self.clock()
        with self._lock:
            sinks = list(self._sinks.items())
        for name, sink in sinks:
            if force or sink.due(now):
                sink.flush(whole=force)
            if sink.pending() == 0 and (
                    sink.finished or now - sink.last_at >= IDLE_FORGET_SECONDS):
                with self._lock:
                    if self._sinks.get(name) is sink:
                        del self._sinks[name]

    def close(self) -> None:
        """Write everything still buffered and stop the writer thread."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.flush(force=True)

    def _next_wait(self) -> float:
        with self._lock:
            sinks = list(self._sinks.values())
        waits = [self.flush_seconds - (self.clock() - s.first_at) for s in sinks if s.pending()]
        return min(max(min(waits), 0.005), self.flush_seconds) if waits else 1.0

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self._next_wait())
            self._wake.clear()
            try:
                self.flush()
            except Exception:  # keep the writer alive whatever happens
                log.exception("log writer failed")
