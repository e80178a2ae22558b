"""The public entry points, and the hot path.

``trace_print`` does little more than take a timestamp and append a tuple to a bounded deque.  A
worker thread turns the queued records into spans (``assembler``), builds and exports them
(``export``) and writes the trace.log mirror (``mirror``).  With tracing off, ``trace_print`` costs
one branch.
"""

from __future__ import annotations

import atexit
import collections
import os
import sys
import threading
import time
from typing import Any, Mapping, Sequence

from opentelemetry.context import get_current
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter

from . import selflog
from .assembler import ABORT, ERROR, EVENT, EXTRACT, FINISH, Assembler
from .attributes import text
from .config import Settings, load_settings
from .errorlog import ErrorLogFile
from .events import _LOOKUP, LoggingEventName, parse_event
from .mirror import TraceLogMirror

_time_ns = time.time_ns
_current_thread = threading.current_thread
_getframe = sys._getframe
_lookup = _LOOKUP.get


class RequestError(Exception):
    """An error known only by its message: what ``record_error(request_id, "text")`` records."""


class _Runtime:
    """Everything one configure() sets up; replaced whole by the next configure().

    Two kinds of thread, so that trace.log never waits for the network: the worker turns records
    into spans, mirror lines and error records and writes the files; the export channels' threads
    (``channel``) talk to the collector behind bounded queues.
    """

    def __init__(self, settings: Settings, extra_exporters: Sequence[SpanExporter],
                 queue: collections.deque | None = None, tracer_provider: TracerProvider | None = None) -> None:
        self.settings = settings
        # A configure() that replaces a runtime hands its queue on, so no record in flight is lost.
        self.queue: collections.deque = queue if queue is not None else collections.deque()
        self.max_pending = settings.max_pending
        self.lock = threading.Lock()  # guards the assembler
        self._ship_lock = threading.Lock()  # keeps batches in order on their way out
        self._count_lock = threading.Lock()
        self.counters = {"records": 0, "dropped_queue_full": 0, "unknown_events": 0, "record_failures": 0,
                         "bad_carriers_at_call": 0}
        self.sink = None
        if settings.otel:
            try:
                from .export import OtelSink

                self.sink = OtelSink(settings, extra_exporters, tracer_provider)
            except Exception:
                selflog.logger.exception("fastdeploy_otel: OTLP export could not be set up; tracing continues without it")
        sampler = self.sink.should_sample if self.sink is not None else (lambda ctx, trace_id: True)
        self.assembler = Assembler(
            sampler, settings.capture_content, settings.max_requests, int(settings.request_ttl_s * 1e9)
        )
        # Files open on the first write: a missing directory is made then, and an unwritable one is
        # reported then (once) without stopping the process.
        self.mirror = TraceLogMirror(settings.log_dir, settings.backup_count) if settings.local else None
        self.error_log = ErrorLogFile(settings.log_dir, settings.backup_count)
        self._last_sweep = 0
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._run, name="fastdeploy-otel-worker", daemon=True)

    def start(self) -> None:
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
            try:
                rec = q.popleft()
            except IndexError:  # a runtime being replaced shares this queue and took it first
                self.counters["records"] -= 1
                continue
            try:
                handle(rec)
            except Exception:
                self.counters["record_failures"] += 1
                selflog.report("record", "fastdeploy_otel: a trace record could not be processed; dropped", exc_info=True)

    def flush(self, final_reason: str | None = None) -> None:
        """Records to spans, lines and error records, all written or queued; never waits on the network."""
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

    def _ship(self, spans: list, lines: list, errors: list) -> None:
        """Errors first (the rarest and most wanted), then the mirror, then the spans; each guarded."""
        for step, out, items in (("error-log", self.error_log, errors), ("mirror", self.mirror, lines),
                                 ("export", self.sink, spans)):
            if out is None or not items:
                continue
            try:
                if out is self.sink:
                    out.build_all(items)
                else:
                    out.write(items)
            except Exception:
                selflog.report(step, "fastdeploy_otel: %s failed for a batch", step, exc_info=True)

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
                selflog.logger.exception("fastdeploy_otel: stopping export failed")
            if lost:
                where = "their events are in trace.log" if self.mirror is not None else "they are lost (FD_TRACE=otel)"
                selflog.logger.error(
                    "fastdeploy_otel: %d spans could not be exported within the %gs shutdown deadline "
                    "(FD_TRACE_SHUTDOWN_TIMEOUT_MS); %s", lost, timeout_s, where)
        if self.mirror is not None:
            self.mirror.close()
        self.error_log.close()

    # ---- counted drops ---------------------------------------------------------------------------
    def count(self, key: str) -> None:
        with self._count_lock:
            self.counters[key] += 1

    def unknown(self, event: object) -> None:
        if self.settings.strict:
            parse_event(event)  # raises UnknownEventError with the accepted names
        self.count("unknown_events")
        selflog.report("unknown-event", "fastdeploy_otel: dropped unknown trace event %r (counted)", text(event)[:64])

    def full(self) -> None:
        self.count("dropped_queue_full")
        selflog.report(
            "queue-full", "fastdeploy_otel: %d trace events pending; dropping new ones (counted)", self.max_pending
        )


_runtime: _Runtime | None = None
_configure_lock = threading.Lock()


def _make_trace_print(depth: int) -> Any:
    """trace_print, naming in trace.log the code `depth` frames up (1: its caller)."""

    def trace_print(event: LoggingEventName | str, request_id: str, user: object = None, **attributes: Any) -> None:
        """Record one lifecycle event (FastDeploy's call).  Keywords become span or event attributes."""
        rt = _runtime
        if rt is None:
            return
        try:
            ev = _lookup(event)
        except Exception:  # unhashable, or a __hash__/__eq__ that raises
            ev = None
        if ev is None:
            rt.unknown(event)
            return
        q = rt.queue
        if len(q) >= rt.max_pending:
            rt.full()
            return
        if type(request_id) is not str:  # from here on every id and user is a plain string
            request_id = text(request_id)
        if user is not None and type(user) is not str:
            user = text(user)
        f = _getframe(depth)
        q.append((EVENT, _time_ns(), ev, request_id, user, attributes, _current_thread(), get_current(), f.f_code.co_filename, f.f_lineno))

    return trace_print


# ---- hot path ------------------------------------------------------------------------------------
trace_print = _make_trace_print(1)
# The same for a function that calls it on behalf of its own caller (the FastDeploy instrumentor's
# replacement of FastDeploy's trace_print): trace.log names that caller's file and line.
trace_print_for_caller = _make_trace_print(2)


def _enqueue(kind: int, request_id: str, payload: Any = None) -> None:
    rt = _runtime
    if rt is None:
        return
    if len(rt.queue) >= rt.max_pending:
        rt.full()
        return
    if type(request_id) is not str:
        request_id = text(request_id)
    try:
        f = _getframe(2)  # the caller of record_error/finish_request/...: named in the error log
        where = f.f_code.co_filename, f.f_lineno
    except ValueError:  # called from the top of a thread's stack
        where = "<unknown>", 0
    rt.queue.append((kind, _time_ns(), None, request_id, None, payload, _current_thread(), get_current(), *where))


def record_error(request_id: str, exc: BaseException | str) -> None:
    """Record `exc` on the request's innermost open span (ERROR status) and write one error-log record
    with its traceback, request_id, trace_id and span_id.  A string is recorded as a RequestError."""
    if not isinstance(exc, BaseException):
        exc = RequestError(text(exc))
    _enqueue(ERROR, request_id, exc)


def finish_request(request_id: str, **attributes: Any) -> None:
    """The request is done in this process: end its spans (a stage still open is ended as unterminated)."""
    _enqueue(FINISH, request_id, attributes or None)


def abort_request(request_id: str, reason: str = "aborted") -> None:
    """The request was cut short (e.g. the client went away): end its spans, marked as aborted."""
    _enqueue(ABORT, request_id, text(reason))


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
    try:
        if carrier is None or (isinstance(carrier, Mapping) and not carrier):
            return  # nothing was propagated (tracing off upstream): the first event here starts a trace
        copy = dict(carrier) if isinstance(carrier, Mapping) else carrier
    except Exception:  # a mapping whose len() or iteration raises
        rt = _runtime
        if rt is not None:
            rt.count("bad_carriers_at_call")
            selflog.report("bad-carrier", "fastdeploy_otel: extract() got a carrier that cannot be read; ignored")
        return
    _enqueue(EXTRACT, request_id, copy)


# ---- lifecycle -----------------------------------------------------------------------------------
def configure(
    *, env: Mapping[str, str] | None = None, strict_config: bool = False,
    extra_exporters: Sequence[SpanExporter] = (), tracer_provider: TracerProvider | None = None, **overrides: Any,
) -> Settings:
    """Set up tracing from overrides > environment > defaults; replaces any earlier setup.

    Keyword arguments are the fields of ``Settings`` (``mode``, ``log_dir``, ``endpoint``, ...), each
    overriding its environment variable.  A bad environment value is logged once, naming the
    variable, and its default is used (``strict_config=True`` raises ConfigError instead).
    ``tracer_provider``: an SDK provider to export through instead of the global one or our own.  Records
    made while an earlier setup is replaced go to the old setup or the new one; none is lost.
    """
    global _runtime
    with _configure_lock:
        settings, problems = load_settings(env, **overrides)
        for problem in problems:
            if strict_config:
                raise problem
            selflog.logger.error("fastdeploy_otel: %s; using the default", problem)
        selflog.reset()
        old = _runtime
        new = None
        if settings.mode != "off":
            new = _Runtime(settings, extra_exporters, queue=old.queue if old is not None else None,
                           tracer_provider=tracer_provider)
        _runtime = new
        if old is not None:
            old.close(old.settings.shutdown_timeout_s)
        if new is not None:
            new.start()
            global _exit_hook
            if not _exit_hook:
                _exit_hook = True
                atexit.register(_shutdown_at_exit)
        return settings


_exit_hook = False


def _forget_after_fork() -> None:
    """A forked child starts untraced: the parent's worker and export threads did not come along,
    and its in-flight requests are the parent's to finish (a fork-aware caller configures again)."""
    global _runtime
    _runtime = None


os.register_at_fork(after_in_child=_forget_after_fork)


def _shutdown_at_exit() -> None:
    """At interpreter exit, what the SDK's provider would do: flush and stop, within the deadline."""
    try:
        shutdown()
    except Exception:
        pass


def shutdown(timeout: float | None = None) -> dict[str, int]:
    """Flush everything (trace.log and error.log first, then spans) and stop tracing.

    Returns within `timeout` seconds (default: FD_TRACE_SHUTDOWN_TIMEOUT_MS, 5 s) whatever the
    collector does; spans not exported by then are counted and reported in one log line.  Returns
    the final stats() (``spans_lost_at_shutdown`` among them); empty when tracing was off.
    """
    global _runtime
    with _configure_lock:
        rt, _runtime = _runtime, None
        if rt is None:
            return {}
        rt.close(rt.settings.shutdown_timeout_s if timeout is None else timeout)
        return _stats(rt)


def flush(timeout: float | None = None) -> bool:
    """Write every line recorded so far and export the spans, within `timeout` seconds (default: the
    shutdown deadline); False when export did not finish in time (the lines are written regardless)."""
    rt = _runtime
    if rt is None:
        return True
    rt.flush()
    if rt.sink is None:
        return True
    return rt.sink.flush(rt.settings.shutdown_timeout_s if timeout is None else timeout)


def stats() -> dict[str, int]:
    """Counters: events recorded and dropped, lines written and failed, spans built, exported, dropped
    and lost, anomalies and evictions."""
    rt = _runtime
    return {} if rt is None else _stats(rt)


def _stats(rt: _Runtime) -> dict[str, int]:
    out = dict(rt.counters)
    out.update(rt.assembler.counters)
    out["requests_in_flight"] = len(rt.assembler.requests)
    out["pending"] = len(rt.queue)
    if rt.mirror is not None:
        out["mirror_lines"] = rt.mirror.lines_written
        out["mirror_lines_failed"] = rt.mirror.lines_failed
    out["error_log_lines"] = rt.error_log.file.lines_written
    out["error_log_lines_failed"] = rt.error_log.file.lines_failed
    if rt.sink is not None:
        out.update(rt.sink.counters())
    return out


def get_tracer_provider() -> TracerProvider | None:
    """The provider spans go through (for FastAPIInstrumentor and friends); None without OTLP."""
    rt = _runtime
    return rt.sink.provider if rt is not None and rt.sink is not None else None


def settings() -> Settings | None:
    rt = _runtime
    return rt.settings if rt is not None else None

