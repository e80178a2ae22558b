"""What stock FastDeploy's tracing calls become once instrumented.

FastDeploy keys its OTel calls (``fastdeploy.metrics.trace``) by the base request id and its
``trace_print`` calls by the per-choice id (``{id}_{n}`` or ``{id}::n::{n}``), and it ships
``trace_carrier`` between processes.  This module maps both onto ``fastdeploy_otel``:

* the process that called ``trace_req_start`` (the API server) owns the request: its events are
  recorded under the base id, so ``PREPROCESSING_START`` (choice id) and ``POSTPROCESSING_END``
  (base id) land in one request span;
* other processes (engine, PD instances) record each choice under its own id and join it to the
  trace with the carrier FastDeploy hands them (read when ``Request.from_dict`` builds the request,
  or at ``trace_set_proc_propagate_context``), so a first event never starts a stray trace;
* our hand-over travels inside FastDeploy's own carrier dict under ``CARRIER_KEY``; FastDeploy's keys
  (``root_span``, ``prev_span``) stay, pointing at our request span.

Every replacement catches its own errors and logs them (rate-limited): tracing never raises into FastDeploy.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from itertools import islice
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace

import fastdeploy_otel as fdt
from fastdeploy_otel import LoggingEventName
from fastdeploy_otel import api as _api
from fastdeploy_otel._records import EVENT, SPAN_EVENT

from ._selflog import get_logger

logger = get_logger(__name__)

CARRIER_KEY = "fastdeploy_otel"  # our carrier inside FastDeploy's trace_carrier dict
_STAGES_FIELD = "fastdeploy-stages"  # the carrier field with the stage spans handed over (see the README)
_MAX_TRACKED = 50_000  # requests remembered per table; the oldest are forgotten first
_FINISH_GRACE_S = 5.0  # trace_req_finish waits this long for a POSTPROCESSING_END printed after it

# Events travel as our enum's members (trace_print finds a member by identity, its fastest path).
_PRE_START = LoggingEventName.PREPROCESSING_START
_POST_START = LoggingEventName.POSTPROCESSING_START
_POST_END = LoggingEventName.POSTPROCESSING_END
_TRANSFER_END = LoggingEventName.CHECK_CACHE_TRANSFER_END  # a PD prefill instance's last event

_print = fdt.trace_print_for_caller
_getframe = sys._getframe
_time_ns = time.time_ns
_current_thread = threading.current_thread
_get_current = otel_context.get_current
_NO_ATTRIBUTES: dict[str, Any] = {}  # shared: the assembler only reads a record's attributes
_get_ident = threading.get_ident
_attach, _detach = otel_context.attach, otel_context.detach

# FastDeploy's LoggingEventName values -> ours.  The hot path looks a member up by its ``_value_`` (a
# plain str, its hash cached): FastDeploy's Enum hashes in Python, and id() is a call.
_events: dict[Any, LoggingEventName] = {}
# The events after which a process may be done with a request (trace_print checks for them after recording).
_LAST_EVENTS = frozenset((_POST_START, _POST_END, _TRANSFER_END))
# The attribute on a Thread naming the request it last recorded an event for (who an ERROR log line is
# about): cheaper to set than a threading.local, and it goes away with the thread.
_THREAD_REQUEST = "_fastdeploy_otel_request"
# Request ids as FastDeploy prints them -> the id we record them under.
_keys: dict[str, str] = {}
# Base ids this process owns (trace_req_start ran here) -> the caller's context still to apply.
_owned: dict[str, otel_context.Context | None] = {}
# Base ids -> our carrier received here and not yet used by a choice; and those whose stages were adopted.
_inbound: dict[str, dict[str, str]] = {}
_adopted: dict[str, None] = {}
# Base ids -> the choice ids recorded here (engine side).
_choices: dict[str, list[str]] = {}
# Base ids -> the FastDeploy carrier dict we returned, completed when POSTPROCESSING is handed over.
_outbound: dict[str, dict[str, Any]] = {}
# Base ids -> (trace_id, span_id) of the request span, for get_trace_info_for_request.
_ids: dict[str, tuple[str, str]] = {}
# Owned requests whose trace_req_finish came first (attrs, when), and those whose POSTPROCESSING_END did.
_finishing: dict[str, tuple[dict[str, Any], float]] = {}
_ended: dict[str, None] = {}
# Attributes from trace_slice_add_attr / trace_slice_end / trace_report_span, put on the next event.
_annotations: dict[str, dict[str, Any]] = {}

_TABLES = (
    _keys,
    _owned,
    _inbound,
    _adopted,
    _choices,
    _outbound,
    _ids,
    _finishing,
    _ended,
    _annotations,
)


def current_request() -> str | None:
    """The request this thread last recorded an event for."""
    return getattr(_current_thread(), _THREAD_REQUEST, None)


def reset() -> None:
    """Forget every request (uninstrument)."""
    for thread in threading.enumerate():
        thread.__dict__.pop(_THREAD_REQUEST, None)
    for table in _TABLES:
        table.clear()


def _remember(table: dict, key: Any, value: Any) -> None:
    if len(table) >= _MAX_TRACKED:
        # The oldest tenth at once: a dict finds its oldest key by scanning the holes that earlier
        # deletions left, which one by one cost about 25 µs an insert once a table was full.
        for old in list(islice(table, _MAX_TRACKED // 10)):
            del table[old]
    table[key] = value


def base_id(request_id: str) -> str:
    """FastDeploy's base id: the part before ``::n::`` or before the first ``_`` (its own split)."""
    i = request_id.find("::n::")
    if i < 0:
        i = request_id.find("_")
    return request_id[:i] if i >= 0 else request_id


def map_events(fd_event_enum: Any) -> None:
    """Learn FastDeploy's LoggingEventName members, so that the hot path maps them by their value."""
    for member in fd_event_enum:
        try:
            _events[member._value_] = LoggingEventName(member._value_)
        except (ValueError, TypeError):
            pass  # an event we do not know (or an unhashable value): trace_print counts it as unknown


# ---- carriers ------------------------------------------------------------------------------------
def _note_ids(base: str, carrier: Mapping[str, str]) -> None:
    tp = carrier.get("traceparent")
    if isinstance(tp, str) and tp.count("-") == 3:
        _, trace_id, span_id, _ = tp.split("-")
        _remember(_ids, base, (trace_id, span_id))


def ours_in(fd_carrier: Any) -> dict[str, str] | None:
    """Our carrier inside whatever FastDeploy shipped: its dict (with ours inside, or only its W3C
    ``root_span``), or the JSON string of a W3C carrier that older FastDeploy versions send."""
    if isinstance(fd_carrier, str):
        try:
            fd_carrier = json.loads(fd_carrier)
        except ValueError:
            return None
    if not isinstance(fd_carrier, Mapping):
        return None
    inner = fd_carrier.get(CARRIER_KEY)
    if isinstance(inner, Mapping):
        return dict(inner)
    root = fd_carrier.get("root_span")
    if isinstance(root, Mapping) and "traceparent" in root:  # from an uninstrumented FastDeploy
        return {"traceparent": root["traceparent"]}
    if "traceparent" in fd_carrier:
        return {"traceparent": fd_carrier["traceparent"]}
    return None


def _wrap(base: str, ours: dict[str, str]) -> dict[str, Any]:
    """FastDeploy's carrier shape, so an uninstrumented process still parses it, with ours inside."""
    _note_ids(base, ours)
    root = {"traceparent": ours["traceparent"]} if "traceparent" in ours else {}
    return {"root_span": root, "prev_span": "None", CARRIER_KEY: ours}


def receive(rid: Any, fd_carrier: Any) -> None:
    """A carrier arrived for request `rid` (base or choice id): continue its trace here."""
    ours = ours_in(fd_carrier)
    if not ours:
        return
    base = base_id(str(rid))
    if base in _owned:  # the API server getting the engine's carrier back: POSTPROCESSING comes home
        _note_ids(base, ours)
        fdt.extract(base, ours)
        return
    if _STAGES_FIELD not in ours and base in _inbound:
        return  # a re-sent copy within this process; the first one carries what was handed over
    _note_ids(base, ours)
    _remember(_inbound, base, ours)


# ---- the trace_logger.print replacement (hot path) -------------------------------------------------
def trace_print(event: Any, request_id: Any, user: Any = None) -> None:
    """``fastdeploy.trace.trace_logger.print``: one lifecycle event, recorded by fastdeploy_otel."""
    try:
        key = _keys.get(request_id)
        try:
            ev = _events.get(event._value_)
        except Exception:  # not an Enum member (a string event), or an unhashable value
            ev = None
        rt = _api._runtime
        if (
            ev is not None
            and key is not None
            and not _annotations
            and rt is not None
            and (type(user) is str or user is None)
        ):
            # The common case (a FastDeploy enum member, a request already joined): the Record of
            # _records.Record appended here, with no call in between, is most of what keeps the
            # drop-in as cheap as a direct trace_print.
            q = rt.queue
            if len(q) < rt.max_pending:
                f = _getframe(1)
                thread = _current_thread()
                q.append((EVENT, _time_ns(), ev, key, user, _NO_ATTRIBUTES, thread, _get_current(),
                          f.f_code.co_filename, f.f_lineno))  # fmt: skip
                thread._fastdeploy_otel_request = key  # type: ignore[attr-defined]  # _THREAD_REQUEST
            else:
                rt.full()
            if ev in _LAST_EVENTS:
                _after_last_event(ev, key)
        else:  # a request seen for the first time, pending attributes, or an event given as a string
            ev = event if ev is None else ev
            key, extra, ctx = _prepare(ev, request_id)
            token = _attach(ctx) if ctx is not None else None
            try:
                _print(ev, key, user, **extra)  # called from here: trace.log names FastDeploy's call site
            finally:
                if token is not None:
                    _detach(token)
            setattr(_current_thread(), _THREAD_REQUEST, key)
            if type(ev) is LoggingEventName and ev in _LAST_EVENTS:
                _after_last_event(ev, key)
    except Exception:  # never into FastDeploy's call site; said once a minute at most
        logger.warning("a FastDeploy trace event could not be recorded", exc_info=True)


def _prepare(ev: Any, request_id: Any) -> tuple[str, dict[str, Any], otel_context.Context | None]:
    """The slow path: the id to record under (joining or owning a first-seen id), pending attributes,
    and the caller's context to start the trace in."""
    rid = request_id if type(request_id) is str else str(request_id)
    key = _keys.get(rid)
    ctx = None
    if key is None:
        key, ctx = _first_event(rid, ev)
        if rid is not request_id:
            _remember(_keys, request_id, key)
    return key, _annotations.pop(key, None) or {}, ctx


def _first_event(rid: str, ev: Any) -> tuple[str, otel_context.Context | None]:
    """The id to record `rid` under, and the caller's context to start its trace in (if any)."""
    base = base_id(rid)
    ctx = None
    if base in _owned:
        key = base
        ctx = _owned[base]
        _owned[base] = None
    elif ev is _PRE_START and base not in _inbound:
        key = base  # FastDeploy without trace_req_start (older versions): the API server still owns it
        _remember(_owned, base, None)
    else:
        key = rid
        carrier = _inbound.get(base)
        if carrier is not None:
            if base in _adopted:  # a later choice: same trace, but the handed stages are the first's
                carrier = {k: v for k, v in carrier.items() if k != _STAGES_FIELD}
            else:
                _remember(_adopted, base, None)
            fdt.extract(rid, carrier)
        choices = _choices.get(base)
        if choices is None:
            _remember(_choices, base, [rid])
        elif rid not in choices:
            choices.append(rid)
    _remember(_keys, rid, key)
    return key, ctx


def _after_last_event(ev: Any, key: str) -> None:
    """A process's last event for a request: finish what it traced (and hand POSTPROCESSING home)."""
    if ev is _TRANSFER_END:
        if base_id(key) not in _owned:
            fdt.finish_request(key)
    elif ev is _POST_START:
        if key in _owned:  # the API server: POSTPROCESSING is its own
            return
        base = base_id(key)
        if base in _owned:
            return
        # The engine is done with this choice.  FastDeploy asked for the carrier (with the base id) just
        # before, for whichever choice is finishing: it is completed now, handing this choice's
        # POSTPROCESSING to the API server with the result.  With n > 1 choices each finishing choice
        # gets the carrier asked for just before its POSTPROCESSING_START.
        out = _outbound.pop(base, None) if _outbound else None
        if out is not None:
            ours = fdt.inject(key)
            if ours:
                out.update(_wrap(base, ours))
        fdt.finish_request(key)  # even with no carrier waiting: nothing else ends it in this process
    elif key in _owned:
        pending = _finishing.pop(key, None)
        if pending is not None:
            fdt.finish_request(key, **pending[0])
        else:
            _remember(_ended, key, None)


def request_of(text_id: str) -> str | None:
    """The id we record `text_id` under in this process, if it is a request we know."""
    key = _keys.get(text_id)
    if key is not None:
        return key
    if text_id in _owned:
        return text_id
    choices = _choices.get(text_id)
    return choices[-1] if choices else None


# ---- fastdeploy.metrics.trace replacements -------------------------------------------------------------
def _guard(function: Callable) -> Callable:
    """Run a replacement so that it never raises into FastDeploy: None on failure, said in the log."""

    def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except Exception:
            logger.warning("fastdeploy.metrics.trace.%s failed; tracing goes on", function.__name__, exc_info=True)
            return None

    guarded.__name__ = function.__name__
    guarded.__qualname__ = function.__qualname__
    guarded.__doc__ = function.__doc__
    guarded.__wrapped__ = function  # type: ignore[attr-defined]
    return guarded


_on_init: list[Callable[[], None]] = []  # the instrumentor's "configure now" (process_tracing_init)


@_guard
def process_tracing_init() -> None:
    """Set up tracing in this process: ours, not FastDeploy's provider."""
    for callback in _on_init:
        callback()


@_guard
def trace_set_thread_info(thread_label: str, tp_rank: int | None = None, dp_rank: int | None = None) -> None:
    """FastDeploy's per-thread spans are not emitted: nothing to set up."""


@_guard
def trace_req_start(rid: str, trace_content: Any = None, ts: int | None = None, role: str | None = "null") -> None:
    """The API server takes the request: record it here under its base id, in the caller's trace."""
    base = base_id(str(rid))
    ctx = None
    if not trace.get_current_span().get_span_context().is_valid and isinstance(trace_content, otel_context.Context):
        if trace.get_current_span(trace_content).get_span_context().is_valid:
            ctx = trace_content
    _remember(_owned, base, ctx)
    _sweep_finishing(time.monotonic())


@_guard
def trace_req_finish(rid: str, ts: int | None = None, attrs: dict[str, Any] | None = None) -> None:
    """The request is done here; wait briefly for a POSTPROCESSING_END that FastDeploy prints after this."""
    base = base_id(str(rid))
    attrs = {str(k): v for k, v in (attrs or {}).items()}
    now = time.monotonic()
    postprocessing_ended = base in _ended
    _ended.pop(base, None)
    if base not in _owned or postprocessing_ended:
        fdt.finish_request(base, **attrs)
    else:
        _remember(_finishing, base, (attrs, now))
    _sweep_finishing(now)


def _sweep_finishing(now: float) -> None:
    for base in [b for b, (_, t) in _finishing.items() if now - t > _FINISH_GRACE_S]:
        attrs, _ = _finishing.pop(base)
        fdt.finish_request(base, **attrs)


def _annotate(rid: Any, attrs: Mapping[str, Any] | None) -> None:
    if attrs:
        key = request_of(str(rid))
        if key is not None:
            _annotations.setdefault(key, {}).update({str(k): v for k, v in attrs.items()})


@_guard
def trace_slice_start(name: str, rid: str, ts: int | None = None, anonymous: bool = False) -> None:
    """Stage spans come from the trace_print events; FastDeploy's slice spans are not emitted."""


@_guard
def trace_slice_end(
    name: str,
    rid: str,
    ts: int | None = None,
    attrs: dict[str, Any] | None = None,
    auto_next_anon: bool = False,
    thread_finish_flag: bool = False,
) -> None:
    """The slice's attributes go onto the stage span of the request's next event."""
    _annotate(rid, attrs)


@_guard
def trace_report_span(
    name: str,
    rid: str,
    start_time_ns: int,
    end_time_ns: int,
    attrs: dict[str, Any] | None = None,
    thread_finish_flag: bool = False,
) -> None:
    """As trace_slice_end: no span of FastDeploy's own, its attributes kept."""
    _annotate(rid, attrs)


@_guard
def trace_event(name: str, rid: str, ts: int | None = None, attrs: dict[str, Any] | None = None) -> None:
    """A named moment: a span event `name` at `ts` (ns; now if not given) with `attrs`, on the span this
    process has open for the request (its innermost: the current stage or sub-stage), as FastDeploy
    puts it on its current slice span."""
    key = request_of(str(rid))
    if key is not None:
        at = int(ts) if isinstance(ts, (int, float)) and not isinstance(ts, bool) and ts > 0 else None
        _api._enqueue(SPAN_EVENT, key, (str(name), at, {str(k): v for k, v in (attrs or {}).items()}))


@_guard
def trace_slice_add_attr(rid: str, attrs: dict[str, Any]) -> None:
    """Attributes for the current stage span (put on the request's next event)."""
    _annotate(rid, attrs)


def trace_span(span_name: str | None = None) -> Callable[[Callable], Callable]:
    """FastDeploy's endpoint decorator: the function unchanged (HTTP spans are the web framework's)."""
    return lambda func: func


@_guard
def label_span(request: Any) -> None:
    """FastDeploy marks stream requests on the current span; our request span gets ``stream`` from events."""


@_guard
def trace_get_proc_propagate_context(rid: str) -> dict[str, Any] | None:
    """FastDeploy's carrier, with our hand-over inside (open PREPROCESSING goes with the request)."""
    base = base_id(str(rid))
    if base in _owned:
        ours = fdt.inject(base)
        return _wrap(base, ours) if ours else None
    # The engine: the carrier is for the choice about to finish (completed at its POSTPROCESSING_START);
    # until then it names the trace through a choice still in flight here (the last one may have finished).
    choices = _choices.get(base) or []
    ours = {}
    for choice in reversed(choices):
        ours = fdt.inject(choice)
        if ours:
            out = _wrap(base, ours)
            _remember(_outbound, base, out)
            return out
    # Not traced here yet, or already finished here (a PD prefill instance): pass the trace on as received.
    ours = {k: v for k, v in _inbound.get(base, {}).items() if k != _STAGES_FIELD or not choices}
    return _wrap(base, ours) if ours else None


@_guard
def trace_set_proc_propagate_context(rid: str, trace_context: Any, ts: int | None = None) -> None:
    """Continue the request's trace from the carrier FastDeploy received."""
    receive(rid, trace_context)


@_guard
def get_trace_info_for_request(rid: str) -> dict[str, str] | None:
    """The trace_id and request span_id fastdeploy_otel uses for `rid` (choice or base id)."""
    found = _ids.get(base_id(str(rid)))
    return {"trace_id": found[0], "span_id": found[1]} if found else None


# The fastdeploy.metrics.trace names taken over (trace_slice is FastDeploy's alias of trace_slice_end).
METRICS_TRACE: dict[str, Callable] = {
    "process_tracing_init": process_tracing_init,
    "trace_set_thread_info": trace_set_thread_info,
    "trace_req_start": trace_req_start,
    "trace_req_finish": trace_req_finish,
    "trace_slice_start": trace_slice_start,
    "trace_slice_end": trace_slice_end,
    "trace_slice": trace_slice_end,
    "trace_report_span": trace_report_span,
    "trace_event": trace_event,
    "trace_slice_add_attr": trace_slice_add_attr,
    "trace_span": trace_span,
    "label_span": label_span,
    "trace_get_proc_propagate_context": trace_get_proc_propagate_context,
    "trace_set_proc_propagate_context": trace_set_proc_propagate_context,
    "get_trace_info_for_request": get_trace_info_for_request,
}


def from_dict_hook(original: Callable) -> Callable:
    """``Request.from_dict`` wrapped: the carrier in the request dict is read before the engine's first
    trace_print, so that event already belongs to the caller's trace."""

    def from_dict(cls: type, d: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            if isinstance(d, Mapping) and d.get("trace_carrier") and d.get("request_id") is not None:
                receive(d["request_id"], d["trace_carrier"])
        except Exception:  # the request goes on; its engine side starts a trace of its own
            logger.warning("the trace carrier of a FastDeploy request could not be read", exc_info=True)
        return original(cls, d, *args, **kwargs)

    from_dict.__wrapped__ = original  # type: ignore[attr-defined]
    return from_dict


def known_ids() -> Iterator[str]:
    """Every request id this process has recorded (for the error handler's message scan)."""
    yield from _keys
