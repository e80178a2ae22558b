"""The tracing pipeline that one ``configure()`` sets up: the record queue, the worker thread that
turns records into spans, mirror lines and error records, and the sinks they go to.

Two kinds of thread, so that trace.log never waits for the network: the worker assembles and
writes the files; the export channels' threads (``_channel``) talk to the collector behind
bounded queues.  ``api`` holds the public calls and the hot path that feeds the queue.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Sequence
from typing import Any

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter

from ._assembler import Assembler
from ._errorlog import ErrorLogFile
from ._selflog import get_logger, name_os_thread, warn
from .attributes import text
from .config import Settings
from .events import parse_event
from .mirror import TraceLogMirror

logger = get_logger(__name__)


class Runtime:
    """Everything one configure() sets up; replaced whole by the next configure().

    Two kinds of thread, so that trace.log never waits for the network: the worker turns records
    into spans, mirror lines and error records and writes the files; the export channels' threads
    (``channel``) talk to the collector behind bounded queues.
    """

    def __init__(
        self,
        settings: Settings,
        extra_exporters: Sequence[SpanExporter],
        queue: collections.deque | None = None,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        self.settings = settings
        # A configure() that replaces a runtime hands its queue on, so no record in flight is lost.
        self.queue: collections.deque = queue if queue is not None else collections.deque()
        self.max_pending = settings.max_pending
        self.lock = threading.Lock()  # guards the assembler
        self._ship_lock = threading.Lock()  # keeps batches in order on their way out
        self._count_lock = threading.Lock()
        self.counters = {
            "records": 0,
            "dropped_queue_full": 0,
            "unknown_events": 0,
            "record_failures": 0,
            "bad_carriers_at_call": 0,
        }
        # Files open on the first write: a missing directory is made then, and an unwritable one is
        # reported then (once) without stopping the process.
        self.mirror = TraceLogMirror(settings.log_dir, settings.backup_count) if settings.local else None
        self.error_log = ErrorLogFile(settings.log_dir, settings.backup_count)
        self.sink = None
        if settings.otel:
            try:
                from ._export import OtelSink

                write_lines = self.mirror.write if self.mirror is not None else None
                self.sink = OtelSink(settings, extra_exporters, tracer_provider, write_lines)
            except Exception:
                logger.exception("OTLP export could not be set up; tracing continues without it")
        sampler = self.sink.should_sample if self.sink is not None else (lambda ctx, trace_id: True)
        self.assembler = Assembler(
            sampler, settings.capture_content, settings.max_requests, int(settings.request_ttl_s * 1e9)
        )
        self._last_sweep = 0
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._run, name="fastdeploy-otel-worker", daemon=True)

    def start(self) -> None:
        self._worker.start()

    # ---- worker --------------------------------------------------------------------------------
    def _run(self) -> None:
        name_os_thread("fdotel-worker")
        while not self._stop.wait(self.settings.flush_interval_s):
            self.flush()

    def _drain(self) -> None:
        """Feed queued records to the assembler (caller holds self.lock)."""
        q, handle = self.queue, self.assembler.handle
        n = len(q)
        self.counters["records"] += n
        for _ in range(n):
            try:
                rec = q.popleft()
            except IndexError:  # a runtime being replaced shares this queue and took it first
                self.counters["records"] -= 1
                continue
            try:
                handle(rec)
            except Exception:
                self.counters["record_failures"] += 1
                logger.warning("a trace record could not be processed; dropped", exc_info=True)

    def flush(self, final_reason: str | None = None) -> None:
        """Records to spans, lines and error records, all written or queued; never waits on the network."""
        try:
            with self._ship_lock:
                with self.lock:
                    self._drain()
                    now = time.time_ns()
                    if final_reason is not None:
                        self.assembler.finish_all(now, final_reason)
                    elif now - self._last_sweep > 1_000_000_000:
                        self._last_sweep = now
                        self.assembler.sweep(now)
                    spans, lines, errors = self.assembler.take()
                self._ship(spans, lines, errors)
                if self.sink is not None:
                    self.sink.pump()
        except Exception:
            logger.warning("flushing traces failed", exc_info=True)

    def _ship(self, spans: list, lines: list, errors: list) -> None:
        """Errors first (the rarest and most wanted), then the mirror, then the spans; each guarded."""
        steps: tuple[tuple[str, Any, list], ...] = (
            ("error-log", self.error_log and self.error_log.write, errors),
            ("mirror", self.mirror and self._write_lines, lines),
            ("export", self.sink and self.sink.build_all, spans),
        )
        for step, write, items in steps:
            if write is None or not items:
                continue
            try:
                write(items)
            except Exception:
                logger.warning("%s failed for a batch", step, exc_info=True)

    def _write_lines(self, lines: list) -> None:
        """The export process writes the mirror when there is one to take them; else this one."""
        if self.sink is None or not self.sink.offer_lines(lines):
            self.mirror.write(lines)  # type: ignore[union-attr]

    def close(self, timeout_s: float) -> None:
        """Stop within `timeout_s`: files first (local, quick), then whatever export can do in the rest."""
        deadline = time.monotonic() + timeout_s
        self._stop.set()
        if self._worker.is_alive():
            self._worker.join(timeout=max(0.0, min(1.0, deadline - time.monotonic())))
        self.flush(final_reason="unterminated: tracing was shut down before the request finished")
        if self.sink is not None:
            try:
                lost = self.sink.shutdown(deadline)
            except Exception:
                lost = 0
                logger.exception("stopping export failed")
            if lost:
                where = "their events are in trace.log" if self.mirror is not None else "they are lost (FD_TRACE=otel)"
                logger.error(
                    "%d spans could not be exported within the %gs shutdown deadline "
                    "(FD_TRACE_SHUTDOWN_TIMEOUT_MS); %s",
                    lost,
                    timeout_s,
                    where,
                )
        if self.mirror is not None:
            self.mirror.close()
        self.error_log.close()

    def inject(self, request_id: str) -> dict[str, str]:
        """The carrier for `request_id`: the queue is drained first, since the carrier holds ids the
        assembler chose (the one call that touches the assembler off the worker thread)."""
        with self.lock:
            self._drain()
            return self.assembler.inject(request_id, time.time_ns())

    # ---- counted drops ---------------------------------------------------------------------------
    def count(self, key: str) -> None:
        with self._count_lock:
            self.counters[key] += 1

    def unknown(self, event: object) -> None:
        if self.settings.strict:
            parse_event(event)  # raises UnknownEventError with the accepted names
        self.count("unknown_events")
        warn(logger, "dropped unknown trace event %r (counted)", text(event)[:64])

    def full(self) -> None:
        self.count("dropped_queue_full")
        warn(logger, "%d trace events pending; dropping new ones (counted)", self.max_pending)
