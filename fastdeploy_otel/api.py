"""The public entry points, and the hot path.

``trace_print`` does little more than take a timestamp and append a tuple to a bounded deque.  A
worker thread turns the queued records into spans (``assembler``), builds and exports them
(``export``) and writes the trace.log mirror (``mirror``).  With tracing off, ``trace_print`` costs
one branch.
"""

from __future__ import annotations

import collections
import logging
import os
import sys
import threading
import time
from typing import Any, Mapping, Sequence

from opentelemetry.context import get_current
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter

from . import selflog
from .assembler import ABORT, ERROR, EVENT, EXTRACT, FINISH, Assembler, ErrorLog
from .config import Settings, load_settings
from .events import _LOOKUP, LoggingEventName, parse_event
from .mirror import DailyFile, TraceLogMirror, escape

error_logger = logging.getLogger("fastdeploy_otel.error")

_time_ns = time.time_ns
_current_thread = threading.current_thread
_getframe = sys._getframe
_lookup = _LOOKUP.get


class _Runtime:
    """Everything one configure() sets up; replaced whole by the next configure()."""

    def __init__(self, settings: Settings, extra_exporters: Sequence[SpanExporter]) -> None:
        self.settings = settings
        self.queue: collections.deque = collections.deque()
        self.max_pending = settings.max_pending
        self.lock = threading.Lock()  # guards the assembler
        self._ship_lock = threading.Lock()  # keeps batches in order on their way out
        self.counters = {"records": 0, "dropped_queue_full": 0, "unknown_events": 0, "record_failures": 0}
        self.sink = None
        if settings.otel:
            try:
                from .export import OtelSink

                self.sink = OtelSink(settings, extra_exporters)
            except Exception:
                selflog.logger.exception("fastdeploy_otel: OTLP export could not be set up; tracing continues without it")
        sampler = self.sink.should_sample if self.sink is not None else (lambda ctx, trace_id: True)
        self.assembler = Assembler(
            sampler, settings.capture_content, settings.max_requests, int(settings.request_ttl_s * 1e9)
        )
        self.mirror: TraceLogMirror | None = None
        self._error_file: DailyFile | None = None
        try:
            if settings.local:
                self.mirror = TraceLogMirror(settings.log_dir, settings.backup_count)
            os.makedirs(settings.log_dir, exist_ok=True)
            self._error_file = DailyFile(
                os.path.join(settings.log_dir, "error.log"), when="midnight", backupCount=settings.backup_count, delay=True
            )
        except OSError as exc:  # unwritable log dir: trace without files rather than fail the server
            selflog.logger.error("fastdeploy_otel: cannot write to FD_LOG_DIR=%r (%s); trace.log and error.log are off",
                                 settings.log_dir, exc)
        if self._error_file is not None:
            self._error_file.setFormatter(
                logging.Formatter("%(levelname)-8s %(asctime)s %(process)-5s %(filename)s[line:%(lineno)d] %(message)s")
            )
            error_logger.addHandler(self._error_file)
        error_logger.setLevel(logging.ERROR)
        self._last_sweep = 0
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._run, name="fastdeploy-otel-worker", daemon=True)
        self._worker.start()

    # ---- worker --------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.wait(self.settings.flush_interval_s):
            self.flush()

    def _drain(self) -> None:
        """Feed queued records to the assembler (caller holds self.lock)."""
        q, handle = self.queue, self.assembler.handle
        n = len(q)
        self.counters["records"] += n
        for _ in range(n):
            rec = q.popleft()
            try:
                handle(rec)
            except Exception:
                self.counters["record_failures"] += 1
                selflog.report("record", "fastdeploy_otel: a trace record could not be processed; dropped", exc_info=True)

    def flush(self, final_reason: str | None = None) -> None:
        try:
            with self._ship_lock:
                with self.lock:
                    self._drain()
                    now = _time_ns()
                    if final_reason is not None:
                        self.assembler.finish_all(now, final_reason)
                    elif now - self._last_sweep > 1_000_000_000:
                        self._last_sweep = now
                        self.assembler.sweep(now)
                    spans, lines, errors = self.assembler.take()
                self._ship(spans, lines, errors)
        except Exception:
            selflog.report("flush", "fastdeploy_otel: flushing traces failed", exc_info=True)

    def _ship(self, spans, lines, errors: list[ErrorLog]) -> None:
        """Errors first (the rarest and most wanted), then the mirror, then the spans; each guarded."""
        for e in errors:
            try:
                self._log_error(e)
            except Exception:
                selflog.report("error-log", "fastdeploy_otel: writing an error record failed", exc_info=True)
        if self.mirror is not None:
            self.mirror.write(lines)
        if self.sink is not None:
            self.sink.build_all(spans)

    @staticmethod
    def _log_error(e: ErrorLog) -> None:
        """One record per error, dated and placed where record_error() was called."""
        record = error_logger.makeRecord(
                error_logger.name, logging.ERROR, e.filename, e.lineno,
            "request[%s] failed: %s: %s [request_id=%s] [trace_id=%032x] [span_id=%016x]\n%s",
            (escape(e.request_id), e.exc_type, escape(e.message), escape(e.request_id), e.trace_id, e.span_id,
             e.traceback.rstrip()),
            None,
        )
        record.created = e.ts_ns / 1e9
        record.msecs = (e.ts_ns // 1_000_000) % 1000
        error_logger.handle(record)

    def close(self) -> None:
        self._stop.set()
        self._worker.join(timeout=5)
        self.flush(final_reason="unterminated: tracing was shut down before the request finished")
        if self.sink is not None:
            self.sink.shutdown()
        if self.mirror is not None:
            self.mirror.close()
        if self._error_file is not None:
            error_logger.removeHandler(self._error_file)
            self._error_file.close()

    # ---- counted drops ---------------------------------------------------------------------------
    def unknown(self, event: object) -> None:
        if self.settings.strict:
            parse_event(event)  # raises UnknownEventError with the accepted names
        self.counters["unknown_events"] += 1
        selflog.report("unknown-event", "fastdeploy_otel: dropped unknown trace event %r (counted)", str(event)[:64])

    def full(self) -> None:
        self.counters["dropped_queue_full"] += 1
        selflog.report(
            "queue-full", "fastdeploy_otel: %d trace events pending; dropping new ones (counted)", self.max_pending
        )


_runtime: _Runtime | None = None
_configure_lock = threading.Lock()


# ---- hot path ------------------------------------------------------------------------------------
def trace_print(event: LoggingEventName | str, request_id: str, user: object = None, **attributes: Any) -> None:
    """Record one lifecycle event (FastDeploy's call).  Keywords become span or event attributes."""
    rt = _runtime
    if rt is None:
        return
    try:
        ev = _lookup(event)
    except TypeError:
        ev = None
    if ev is None:
        rt.unknown(event)
        return
    q = rt.queue
    if len(q) >= rt.max_pending:
        rt.full()
        return
    f = _getframe(1)
    q.append((EVENT, _time_ns(), ev, request_id, user, attributes, _current_thread(), get_current(), f.f_code.co_filename, f.f_lineno))


def _enqueue(kind: int, request_id: str, payload: Any = None, user: object = None) -> None:
    rt = _runtime
    if rt is None:
        return
    if len(rt.queue) >= rt.max_pending:
        rt.full()
        return
    try:
        f = _getframe(2)  # the caller of record_error/finish_request/...: named in the error log
        where = f.f_code.co_filename, f.f_lineno
    except ValueError:  # called from the top of a thread's stack
        where = "<unknown>", 0
    rt.queue.append((kind, _time_ns(), None, request_id, user, payload, _current_thread(), get_current(), *where))


def record_error(request_id: str, exc: BaseException) -> None:
    """Record `exc` on the request's innermost open span (ERROR status) and write one error-log record
    with its traceback, request_id, trace_id and span_id."""
    _enqueue(ERROR, request_id, exc)


def finish_request(request_id: str, **attributes: Any) -> None:
    """The request is done in this process: end its spans (a stage still open is ended as unterminated)."""
    _enqueue(FINISH, request_id, attributes or None)


def abort_request(request_id: str, reason: str = "aborted") -> None:
    """The request was cut short (e.g. the client went away): end its spans, marked as aborted."""
    _enqueue(ABORT, request_id, reason)


def inject(request_id: str) -> dict[str, str]:
    """The carrier to send with the request to another process (FastDeploy's ``trace_carrier``)."""
    rt = _runtime
    if rt is None:
        return {}
    try:
        with rt.lock:
            rt._drain()
            return rt.assembler.inject(request_id, _time_ns())
    except Exception:
        selflog.report("inject", "fastdeploy_otel: inject(%r) failed; the request continues untraced downstream", str(request_id)[:64], exc_info=True)
        return {}


def extract(request_id: str, carrier: Mapping[str, str] | None) -> None:
    """Continue the request's trace from a carrier made by inject() in another process."""
    if carrier is None or (isinstance(carrier, Mapping) and not carrier):
        return  # nothing was propagated (tracing off upstream): the first event here starts a trace
    _enqueue(EXTRACT, request_id, dict(carrier) if isinstance(carrier, Mapping) else carrier)


# ---- lifecycle -----------------------------------------------------------------------------------
def configure(
    *, env: Mapping[str, str] | None = None, strict_config: bool = False,
    extra_exporters: Sequence[SpanExporter] = (), **overrides: Any,
) -> Settings:
    """Set up tracing from overrides > environment > defaults; replaces any earlier setup.

    A bad environment value is logged once, naming the variable, and its default is used
    (``strict_config=True`` raises ConfigError instead).
    """
    global _runtime
    with _configure_lock:
        _close()
        selflog.reset()
        settings, problems = load_settings(env, **overrides)
        for problem in problems:
            if strict_config:
                raise problem
            selflog.logger.error("fastdeploy_otel: %s; using the default", problem)
        if settings.mode != "off":
            _runtime = _Runtime(settings, extra_exporters)
        return settings


def _close() -> None:
    global _runtime
    rt, _runtime = _runtime, None
    if rt is not None:
        rt.close()


def shutdown() -> None:
    """Flush everything (spans, mirror lines, error records) and stop tracing."""
    with _configure_lock:
        _close()


def flush() -> None:
    """Process everything recorded so far: spans handed to the exporter, lines written."""
    rt = _runtime
    if rt is not None:
        rt.flush()
        if rt.sink is not None:
            rt.sink.provider.force_flush()


def stats() -> dict[str, int]:
    """Counters: events recorded and dropped, anomalies, evictions, spans built and exported."""
    rt = _runtime
    if rt is None:
        return {}
    out = dict(rt.counters)
    out.update(rt.assembler.counters)
    out["requests_in_flight"] = len(rt.assembler.requests)
    out["pending"] = len(rt.queue)
    if rt.mirror is not None:
        out["mirror_lines"] = rt.mirror.lines_written
    if rt.sink is not None:
        out["spans_built"] = rt.sink.built
        out["spans_dropped_export_queue"] = rt.sink.dropped
        if rt.sink.reporter is not None:
            out["spans_exported"] = rt.sink.reporter.exported
            out["spans_export_failed"] = rt.sink.reporter.failed
    return out


def get_tracer_provider() -> TracerProvider | None:
    """The provider spans go through (for FastAPIInstrumentor and friends); None without OTLP."""
    rt = _runtime
    return rt.sink.provider if rt is not None and rt.sink is not None else None


def settings() -> Settings | None:
    rt = _runtime
    return rt.settings if rt is not None else None

