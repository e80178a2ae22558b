"""Turns queued lifecycle records into finished spans, mirror lines and error-log records.

The assembler is pure bookkeeping: no I/O, no SDK calls.  It runs on the worker thread (and, for
``inject``, under the same lock on the caller's thread).  Span ids are chosen when a span opens, so
the mirror line of a START event already carries the id the span will be exported with; spans are
built with explicit start and end times once they close.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from opentelemetry import trace
from opentelemetry.context import Context

from . import attributes as A
from ._propagation import Carried, CarrierError, HandedSpan, decode, encode
from ._records import (
    ABORT,
    ERROR,
    EVENT,
    EXTRACT,
    FINISH,
    SPAN_EVENT,
    ErrorLog,
    MirrorRecord,
    Record,
    SpanState,
    new_record,
)
from ._selflog import get_logger
from .events import EVENT_TO_STAGE_MAP, LoggingEventName
from .span_plan import CROSS_PROCESS_STAGES, PLAN, REQUEST_SPAN_NAME, STAGE_ORDER, Action

logger = get_logger(__name__)

# A generator of our own, seeded from the OS: immune to random.seed() in the application (vLLM
# #10447) and, re-seeded in a forked child, never repeating the parent's ids.
_ids = random.Random(os.urandom(32))
os.register_at_fork(after_in_child=lambda: _ids.seed(os.urandom(32)))


def new_span_id() -> int:
    return _ids.getrandbits(64) or 1


def new_trace_id() -> int:
    return _ids.getrandbits(128) or 1


def request_span_id(trace_id: int, request_id: str, ts_ns: int) -> int:
    """The request span's id, derived from what its first trace.log line carries (trace id, request
    id, millisecond timestamp): no line names the request span, yet a replayed mirror reproduces it."""
    key = f"{trace_id.to_bytes(16, 'big').hex()}/{request_id}/{ts_ns // 1_000_000}".encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") or 1


class SpanIds(Protocol):
    """Where the assembler's ids come from: random when live, preset or derived when replaying."""

    def trace_id(self, request_id: str, ts_ns: int) -> int:
        """A new request's trace id, when no parent context gives one."""
        ...

    def span_id(self, trace_id: int, request_id: str, name: str, ts_ns: int) -> int:
        """The id of span `name` of the request, opening at `ts_ns`."""
        ...


class LiveIds:
    """Random ids; the request span's is derived (request_span_id) so that trace.log implies it."""

    def trace_id(self, request_id: str, ts_ns: int) -> int:
        return new_trace_id()

    def span_id(self, trace_id: int, request_id: str, name: str, ts_ns: int) -> int:
        if name == REQUEST_SPAN_NAME:
            return request_span_id(trace_id, request_id, ts_ns)
        return new_span_id()


@dataclass(slots=True)
class RequestState:
    request_id: str
    user: object
    trace_id: int
    span_id: int  # the request span's id (remote in a copy)
    owner: bool  # this process builds the request span
    sampled: bool
    last_ns: int
    span: SpanState | None  # the request span, when owner
    open: dict[str, SpanState] = field(default_factory=dict)  # open spans by name, in opening order
    error: str | None = None


class _Finished(NamedTuple):
    """A request finished a moment ago: a late event still joins its trace."""

    trace_id: int
    span_id: int
    sampled: bool
    ts_ns: int


# How long after finish_request an event still counts as a late event of that request.
_LATE_WINDOW_NS = 60 * 1_000_000_000
# Events that always begin a request, even when its id was used before.
_OPENING = frozenset({LoggingEventName.PREPROCESSING_START})


def _joins(late: _Finished, fresh: bool, ts: int) -> bool:
    """Whether an event at `ts` that begins no request (`fresh` false) joins the `late` finished one."""
    return not fresh and ts - late.ts_ns < _LATE_WINDOW_NS


# Plain strings for the enum values (an Enum's .value is a descriptor call per use).
_NAME = {e: e.value for e in LoggingEventName}
_STAGE = {e: s.value for e, s in EVENT_TO_STAGE_MAP.items()}
# The actions as plain names: an Enum member looked up on its class costs ~70 ns, a global ~7 ns.
_OPEN, _CLOSE, _POINT_CLOSE = Action.OPEN, Action.CLOSE, Action.POINT_CLOSE
_STAGE_INDEX = {stage: i for i, stage in enumerate(STAGE_ORDER)}

# Attributes every process sets for itself; not worth carrying.
_PER_PROCESS = frozenset({A.REQUEST_ID, A.STAGE, A.USER_ID})

Sampler = Callable[[Context | None, int], bool]


class Assembler:
    def __init__(
        self,
        sampler: Sampler,
        capture_content: bool,
        max_requests: int,
        ttl_ns: int,
        ids: SpanIds | None = None,
        mirror: bool = True,
    ) -> None:
        """`ids`: where ids come from (LiveIds by default); `mirror`: whether events make MirrorRecords
        (a replay of trace.log has no use for them)."""
        self._id_source: SpanIds = ids if ids is not None else LiveIds()
        self._mirror = mirror
        self._sampler = sampler
        self._capture_content = capture_content
        self._max_requests = max_requests
        self._ttl_ns = ttl_ns
        self.requests: dict[str, RequestState] = {}
        # Recently finished requests, so a late event still lands in the same trace.  An OrderedDict:
        # dropping a plain dict's first key scans the holes its earlier deletions left (~10 us here).
        self._finished: OrderedDict[str, _Finished] = OrderedDict()
        self.spans: list[SpanState] = []
        self.lines: list[MirrorRecord] = []
        self.errors: list[ErrorLog] = []
        self.counters = {
            "evicted_requests": 0,
            "bad_carriers": 0,
            "anomalies": 0,
            "late_events": 0,
            "orphan_span_events": 0,
        }

    # ---- outputs -------------------------------------------------------------------------------
    def take(self) -> tuple[list[SpanState], list[MirrorRecord], list[ErrorLog]]:
        out = self.spans, self.lines, self.errors
        self.spans, self.lines, self.errors = [], [], []
        return out

    # ---- records -------------------------------------------------------------------------------
    def handle(self, rec: Record) -> None:
        kind, ts, event, rid, user, payload, _, ctx, _, _ = rec
        if kind == EVENT:
            self.event(ts, event, rid, user, payload, ctx, rec)
        elif kind == ERROR:
            self._error(rec)
        elif kind == FINISH:
            self._finish(rid, ts, payload)
        elif kind == ABORT:
            self._abort(rid, ts, payload)
        elif kind == EXTRACT:
            self._extract(rid, ts, payload, ctx)
        elif kind == SPAN_EVENT:
            self._span_event(rid, ts, payload)

    def inject(self, request_id: str, now_ns: int) -> dict[str, str]:
        """The carrier for `request_id`; open cross-process stages are handed to the receiver."""
        req = self.requests.get(request_id)
        if req is None:
            return {}
        handed = []
        # Only an explicitly started stage travels: one opened implicitly by its sub-stages (the PD
        # prefill instance's POSTPROCESSING around CHECK_CACHE_TRANSFER) belongs to this process.
        for name in [n for n, sp in req.open.items() if n in CROSS_PROCESS_STAGES and not sp.implicit]:
            span = req.open.pop(name)
            self._close_children(req, span, now_ns, "unterminated: parent stage handed to another process")
            attrs = {k: v for k, v in span.attributes.items() if k not in _PER_PROCESS}
            handed.append(HandedSpan(span.name, span.span_id, span.start_ns, attrs, span.events))
        return encode(req.trace_id, req.span_id, req.sampled, handed, req.error)

    def sweep(self, now_ns: int) -> None:
        """Evict requests idle for longer than the TTL: memory stays bounded."""
        cutoff = now_ns - self._ttl_ns
        stale = [rid for rid, r in self.requests.items() if r.last_ns < cutoff]
        for rid in stale:
            self._evict(rid, now_ns, f"evicted: no finish_request within {self._ttl_ns / 1e9:g}s")

    def finish_all(self, now_ns: int, reason: str) -> None:
        for rid in list(self.requests):
            self._evict(rid, now_ns, reason)

    def end_incomplete(self, request_id: str) -> None:
        """End a lifecycle that stops short (a replay's end of input, TTL or cap) at its last event,
        marked ``incomplete``, without ERROR: a log that was cut off says nothing about failure.
        An open explicit span was open up to that event; an implicit one ends with its last activity."""
        req = self.requests.get(request_id)
        if req is None:
            return
        for span in list(req.open.values()):
            if span.name in req.open:  # not already closed as a child
                span.attributes[A.ANOMALY] = A.INCOMPLETE
                self._close(req, span, span.last_ns if span.implicit else req.last_ns)
        if req.span is not None:
            req.span.attributes[A.ANOMALY] = A.INCOMPLETE
        self._finish(request_id, req.last_ns, None)

    # ---- request state -------------------------------------------------------------------------
    def _request(
        self, request_id: str, ts: int, user: object, ctx: Context | None, fresh: bool = False
    ) -> RequestState:
        """The request's state; created on its first record. `fresh`: this event always begins a request."""
        req = self.requests.get(request_id)
        if req is not None:
            req.last_ns = ts
            if user is not None and req.user is None:
                req.user = user
            return req
        if len(self.requests) >= self._max_requests:
            oldest = next(iter(self.requests))
            self._evict(oldest, ts, f"evicted: more than {self._max_requests} requests in flight")
        parent = trace.get_current_span(ctx).get_span_context() if ctx is not None else None
        late = self._finished.pop(request_id, None)
        if (
            late is not None
            and _joins(late, fresh, ts)
            and not (parent is not None and parent.is_valid and parent.trace_id != late.trace_id)
        ):
            # An event just after finish_request: same trace, under the finished request span.
            self.counters["late_events"] += 1
            req = RequestState(request_id, user, late.trace_id, late.span_id, False, late.sampled, ts, None)
        else:  # a new request (a reused request id is a new request too)
            remote = parent if parent is not None and parent.is_valid else None
            if remote is not None:
                trace_id = remote.trace_id
            else:
                trace_id, ctx = self._id_source.trace_id(request_id, ts), None
            sampled = self._sampler(ctx, trace_id)
            span = SpanState(
                REQUEST_SPAN_NAME,
                trace_id,
                self._id_source.span_id(trace_id, request_id, REQUEST_SPAN_NAME, ts),
                remote.span_id if remote is not None else 0,
                bool(remote is not None and remote.is_remote),
                sampled,
                ts,
                "",
                attributes={A.REQUEST_ID: A.capped(request_id)},
            )
            req = RequestState(request_id, user, trace_id, span.span_id, True, sampled, ts, span)
        self.requests[request_id] = req
        return req

    def _open(self, req: RequestState, name: str, stage: str, ts: int, implicit: bool = False) -> SpanState:
        parent = req.span_id if name == stage else self._stage(req, stage, ts).span_id
        # Every field positionally: keyword arguments and default factories cost a third of the call.
        span = SpanState(
            name,
            req.trace_id,
            self._id_source.span_id(req.trace_id, req.request_id, name, ts),
            parent,
            not req.owner and name == stage,
            req.sampled,
            ts,
            stage,
            {A.REQUEST_ID: A.capped(req.request_id), A.STAGE: stage},  # attributes
            [],  # events
            [],  # exceptions
            None,  # error
            implicit,
            ts,  # last_ns
        )
        if implicit:
            span.attributes[A.IMPLICIT_START] = True
        req.open[name] = span
        return span

    def _stage(self, req: RequestState, stage: str, ts: int) -> SpanState:
        """The open stage span, opened implicitly when a sub-stage or point event needs it."""
        span = req.open.get(stage)
        if span is None:
            if req.open:
                self._end_implicit_before(req, stage)
            span = self._open(req, stage, stage, ts, implicit=True)
        return span

    def _end_implicit_before(self, req: RequestState, stage: str) -> None:
        order = _STAGE_INDEX[stage]
        for name, span in list(req.open.items()):
            if span.implicit and _STAGE_INDEX.get(name, order) < order:
                self._close(req, span, span.last_ns)

    def _close(self, req: RequestState, span: SpanState, ts: int, error: str | None = None) -> None:
        req.open.pop(span.name, None)
        if req.open and span.name == span.stage:  # only a stage span has children (its sub-stages)
            self._close_children(req, span, ts, "unterminated: its stage ended first")
        span.end_ns = ts if ts > span.start_ns else span.start_ns
        if error and not span.error:
            span.error = error
        if req.user is not None:  # the user may only be known from a later event
            span.attributes[A.USER_ID] = A.capped(A.text(req.user))
        parent = req.open.get(span.stage) if span.name != span.stage else None
        if parent is not None and span.end_ns > parent.last_ns:
            parent.last_ns = span.end_ns
        if span.sampled:
            self.spans.append(span)

    def _close_children(self, req: RequestState, span: SpanState, ts: int, why: str) -> None:
        for child in [c for c in req.open.values() if c.parent_id == span.span_id and c is not span]:
            self._close(req, child, ts, why)

    def _line(self, rec: Record, req: RequestState, span_id: int, stage: str) -> None:
        _, ts, event, rid, user, _, thread, _, filename, lineno = rec
        self.lines.append(
            new_record(
                MirrorRecord,
                (
                    ts,
                    filename,
                    lineno,
                    thread.ident or 0,
                    thread.name,
                    rid,
                    user,
                    _NAME[event],
                    stage,
                    req.trace_id,
                    span_id,
                ),
            )
        )

    def _anomaly(self, span: SpanState, what: str, ts: int, event: str) -> None:
        self.counters["anomalies"] += 1
        span.events.append((A.ANOMALY, ts, {A.ANOMALY: what, "fastdeploy.event": event}))

    # ---- record handlers -----------------------------------------------------------------------
    def event(
        self,
        ts: int,
        event: LoggingEventName,
        rid: str,
        user: object,
        kwargs: dict[str, Any] | None,
        ctx: Context | None,
        rec: Record | None,
    ) -> None:
        """An EVENT record, its fields as arguments (a replay has no record to build and unpack);
        `rec`, the record itself, for its mirror line (a replay makes none: None)."""
        req = self.requests.get(rid)
        if req is None:
            req = self._request(rid, ts, user, ctx, event in _OPENING)
        else:  # what _request does for a request in flight, without the call
            req.last_ns = ts
            if user is not None and req.user is None:
                req.user = user
        step = PLAN[event]
        if kwargs:
            request_attrs, attrs = A.split_keywords(kwargs, self._capture_content)
            if request_attrs:
                if req.span is not None:
                    req.span.attributes.update(request_attrs)
                else:
                    attrs.update(request_attrs)  # a copy cannot touch the request span; keep them on this one
        else:
            attrs = {}
        action = step.action
        if action is _OPEN and step.unless_open and step.unless_open in req.open:
            span = req.open[step.unless_open]
            span.events.append((_NAME[event], ts, attrs))
        elif action is _OPEN:
            found = req.open.get(step.span)
            if found is not None and found.implicit:
                # The stage was opened by an earlier sub-stage or point event: the START adopts it.
                span = found
                span.implicit = False
                span.attributes.pop(A.IMPLICIT_START, None)
                if attrs:
                    span.attributes.update(attrs)
            elif found is not None:
                span = found
                self._anomaly(span, "duplicate_start", ts, _NAME[event])
            else:
                if step.is_stage and req.open:
                    self._end_implicit_before(req, step.span)
                span = self._open(req, step.span, step.stage, ts)
                if attrs:
                    span.attributes.update(attrs)
        elif action is _CLOSE:
            closing = req.open.get(step.span)
            if closing is not None:
                span = closing
            else:
                # END without START: a zero-length span, marked, so the END is still visible.
                span = self._open(req, step.span, step.stage, ts)
                span.attributes[A.ANOMALY] = "end_without_start"
                self.counters["anomalies"] += 1
            if attrs:
                span.attributes.update(attrs)
            self._close(req, span, ts)
            for extra in step.also_closes:
                if extra in req.open:
                    self._close(req, req.open[extra], ts)
        else:  # POINT, POINT_CLOSE
            span = self._stage(req, step.stage, ts)
            span.events.append((_NAME[event], ts, attrs))
            span.last_ns = ts
            if action is _POINT_CLOSE:
                self._close(req, span, ts)
        if self._mirror and rec is not None:
            self._line(rec, req, span.span_id, _STAGE[event])

    def _innermost(self, req: RequestState) -> SpanState | None:
        if req.open:
            return next(reversed(req.open.values()))
        return req.span

    def _span_event(self, rid: str, ts: int, payload: tuple[str, int | None, dict[str, Any] | None]) -> None:
        """A named moment on the request's innermost open span (its current stage or sub-stage, else the
        request span), with the keywords as trace_print's.  A request not in flight here, or one with
        no span of this process's open, has nowhere to put it: counted, dropped."""
        req = self.requests.get(rid)
        span = self._innermost(req) if req is not None else None
        if req is None or span is None:
            self.counters["orphan_span_events"] += 1
            return
        name, at, kwargs = payload
        request_attrs, attrs = A.split_keywords(kwargs, self._capture_content) if kwargs else ({}, {})
        attrs.update(request_attrs)  # about this moment: kept on it, not spread onto the request span
        at = ts if at is None else at
        span.events.append((name, at, attrs))
        span.last_ns = max(span.last_ns, at)
        req.last_ns = max(req.last_ns, ts)

    def _error(self, rec: Record) -> None:
        _, ts, _, rid, _, exc, _, ctx, filename, lineno = rec
        req = self._request(rid, ts, None, ctx)
        span = self._innermost(req)
        exc_type = type(exc).__qualname__
        message = f"{exc_type}: {A.text(exc)}"
        req.error = exc_type
        if span is not None:
            span.exceptions.append((exc, ts))
            span.error = span.error or message
        if req.span is not None and req.span is not span:
            req.span.error = req.span.error or message
        if req.span is not None:
            req.span.attributes[A.ERROR_TYPE] = exc_type
        span_id = span.span_id if span is not None else req.span_id
        self.errors.append(ErrorLog(ts, rid, req.trace_id, span_id, exc, filename, lineno))

    def _finish(self, rid: str, ts: int, kwargs: dict | None, error: str | None = None) -> None:
        req = self.requests.pop(rid, None)
        if req is None:
            return
        if kwargs and req.span is not None:
            req.span.attributes.update(A.split_keywords(kwargs, self._capture_content)[0])
        for span in list(req.open.values()):
            if span.name not in req.open:
                continue  # already closed as a child
            if error:
                self._close(req, span, ts, error)
            elif span.implicit:
                self._close(req, span, span.last_ns)
            else:
                self._close(req, span, ts, f"unterminated: {span.name} was still open when the request finished")
        if req.span is not None:
            span = req.span
            if error and not span.error:
                span.error = error
            elif req.error and not span.error:
                span.error = req.error
            span.end_ns = max(ts, span.start_ns)
            if req.user is not None:
                span.attributes[A.USER_ID] = A.capped(A.text(req.user))
            if span.sampled:
                self.spans.append(span)
        self.remember_finished(rid, req.trace_id, req.span_id, ts, req.sampled)

    def remember_finished(self, rid: str, trace_id: int, span_id: int, ts: int, sampled: bool = True) -> None:
        """The request `rid` (request span `span_id`) finished at `ts`: a late event still joins it.
        Also for a request a replay built without the assembler (``tools.templates``)."""
        self._finished.pop(rid, None)  # to the end of the order, as a new entry
        self._finished[rid] = _Finished(trace_id, span_id, sampled, ts)
        if len(self._finished) > 10_000:
            self._finished.popitem(last=False)

    def begins(self, rid: str, event: LoggingEventName, ts: int) -> bool:
        """Whether `event` at `ts`, the first record of `rid` while no request of that id is in
        flight, begins a request rather than joining the one of that id just finished (as
        _request decides when no parent context is given); if it begins one, the finished one is
        forgotten, as _request forgets it."""
        late = self._finished.get(rid)
        if late is None:
            return True
        if _joins(late, event in _OPENING, ts):
            return False
        del self._finished[rid]
        return True

    def _abort(self, rid: str, ts: int, reason: str) -> None:
        req = self.requests.get(rid)
        if req is None:
            return
        mark = {A.ABORTED: True, A.ABORT_REASON: str(reason)}
        for span in req.open.values():
            span.attributes.update(mark)
        if req.span is not None:
            req.span.attributes.update(mark)
            req.span.attributes[A.ERROR_TYPE] = "aborted"
            req.span.events.append(("ABORTED", ts, {A.ABORT_REASON: str(reason)}))
        self._finish(rid, ts, None, error=f"aborted: {reason}")

    def _evict(self, rid: str, ts: int, reason: str) -> None:
        self.counters["evicted_requests"] += 1
        self._finish(rid, ts, None, error=reason)

    def _extract(self, rid: str, ts: int, carrier: Any, ctx: Context | None) -> None:
        try:
            carried: Carried | None = decode(carrier)
        except CarrierError as exc:
            self.counters["bad_carriers"] += 1
            logger.warning("extract(%r): ignoring a bad trace carrier: %s", rid[:64], exc)
            carried = None
        req = self.requests.get(rid)
        if req is None:
            self._finished.pop(rid, None)
            if carried is None:
                self._request(rid, ts, None, ctx)
                return
            req = RequestState(rid, None, carried.trace_id, carried.span_id, False, carried.sampled, ts, None)
            self.requests[rid] = req
        if carried is None:
            return
        if carried.trace_id != req.trace_id:
            self.counters["bad_carriers"] += 1
            logger.warning("extract(%r): carrier belongs to another trace; ignored", rid[:64])
            return
        for h in carried.stages:
            if h.name in req.open:
                continue
            span = self._open(req, h.name, h.name, h.start_ns)
            span.span_id = h.span_id
            span.parent_id = req.span_id
            span.parent_remote = not req.owner
            span.attributes.update(h.attributes)
            span.events.extend(h.events)
        if carried.error:
            req.error = req.error or carried.error
            if req.span is not None:
                req.span.attributes.setdefault(A.ERROR_TYPE, carried.error)
