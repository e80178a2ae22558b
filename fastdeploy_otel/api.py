"""The public entry points, and the hot path.

``trace_print`` does little more than take a timestamp and append a tuple to a bounded deque; the
pipeline behind it (``_runtime``) turns records into spans, trace.log lines and error records.
With tracing off, ``trace_print`` costs one branch.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context, get_current
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter

from ._records import ABORT, ERROR, EVENT, EXTRACT, FINISH
from ._runtime import Runtime
from ._selflog import get_logger
from ._selflog import reset as reset_log_limits
from .attributes import text
from .config import Settings, load_settings
from .events import _LOOKUP, LoggingEventName

logger = get_logger(__name__)

_time_ns = time.time_ns
_current_thread = threading.current_thread
_getframe = sys._getframe
_lookup = _LOOKUP.get


class RequestError(Exception):
    """An error known only by its message: what ``record_error(request_id, "text")`` records."""


_runtime: Runtime | None = None
_configure_lock = threading.Lock()


# ---- hot path ------------------------------------------------------------------------------------
def _make_trace_print(depth: int) -> Callable[..., None]:
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
        q.append((EVENT, _time_ns(), ev, request_id, user, attributes, _current_thread(), get_current(),
                  f.f_code.co_filename, f.f_lineno))  # fmt: skip

    return trace_print


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
        return rt.inject(request_id)
    except Exception:
        logger.warning(
            "inject(%r) failed; the request continues untraced downstream",
            text(request_id)[:64],
            exc_info=True,
        )
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
            logger.warning("extract() got a carrier that cannot be read; ignored")
        return
    _enqueue(EXTRACT, request_id, copy)


# ---- lifecycle -----------------------------------------------------------------------------------
def configure(
    *,
    env: Mapping[str, str] | None = None,
    strict_config: bool = False,
    extra_exporters: Sequence[SpanExporter] = (),
    tracer_provider: TracerProvider | None = None,
    **overrides: Any,
) -> Settings:
    """Set up tracing from overrides > environment > defaults; replaces any earlier setup.

    Keyword arguments are the fields of ``Settings`` (``mode``, ``log_dir``, ``endpoint``, ...), each
    overriding its environment variable.  A bad environment value is logged once, naming the
    variable, and its default is used (``strict_config=True`` raises ConfigError instead).
    ``extra_exporters`` get every span too; ``tracer_provider`` is an SDK provider to export through
    instead of the global one or our own.  Records made while an earlier setup is replaced go to the
    old setup or the new one; none is lost.
    """
    global _runtime
    with _configure_lock:
        settings, problems = load_settings(env, **overrides)
        if strict_config and problems:
            raise problems[0]
        reset_log_limits()
        for problem in problems:  # each its own template, so that none holds back another
            logger.error(str(problem).replace("%", "%%") + "; using the default")
        old = _runtime
        new = None
        if settings.mode != "off":
            queue = old.queue if old is not None else None
            new = Runtime(settings, extra_exporters, queue=queue, tracer_provider=tracer_provider)
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
        logger.warning("stopping tracing at exit failed; spans not yet exported are lost", exc_info=True)


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


def _stats(rt: Runtime) -> dict[str, int]:
    out = dict(rt.counters)
    out.update(rt.assembler.counters)
    out["requests_in_flight"] = len(rt.assembler.requests)
    out["pending"] = len(rt.queue)
    if rt.mirror is not None:  # written here, and by the export process
        process = rt.sink.process if rt.sink is not None else None
        out["mirror_lines"] = rt.mirror.lines_written + (process.lines_written if process is not None else 0)
        out["mirror_lines_failed"] = rt.mirror.lines_failed + (process.lines_failed if process is not None else 0)
    out["error_log_lines"] = rt.error_log.file.lines_written
    out["error_log_lines_failed"] = rt.error_log.file.lines_failed
    if rt.sink is not None:
        out.update(rt.sink.counters())
    return out


def start_server_span(
    name: str, context: Context | None = None, attributes: Mapping[str, Any] | None = None
) -> trace.Span:
    """A SERVER span for the HTTP request around a generation request: set it in the context while
    the request is handled and the request's spans become its children.  `context` holds the caller's
    span (``propagate.extract`` of its headers).  Recorded through the tracing pipeline at about half
    an SDK span's cost; without OTLP export, a non-recording span with the caller's context."""
    rt = _runtime
    sink = rt.sink if rt is not None else None
    try:
        if sink is not None:
            return sink.start_server_span(text(name), context, attributes)
    except Exception:
        logger.warning("a server span could not be started; the request is traced without it", exc_info=True)
    # The caller's span context travels on; the span itself is not ours to rename or end.
    return trace.NonRecordingSpan(trace.get_current_span(context).get_span_context())


def get_tracer_provider() -> TracerProvider | None:
    """The provider spans go through (for FastAPIInstrumentor and friends); None without OTLP."""
    rt = _runtime
    return rt.sink.provider if rt is not None and rt.sink is not None else None  # always the SDK's


def settings() -> Settings | None:
    rt = _runtime
    return rt.settings if rt is not None else None
