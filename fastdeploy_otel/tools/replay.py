"""Replay: trace.log lines, in timestamp order, into the spans live tracing would have made.

Each line becomes the Record that ``trace_print`` queues and goes through the live ``Assembler``, so
replayed spans follow the same span plan (names, nesting, events, anomalies).  What trace.log does
not say is decided here:

* **Which request.**  Lines are grouped by request id; a per-choice id (``X_0``, ``X::n::0``) joins
  its base request ``X``, and a base id joins a request that began under one of its choice ids.
* **Ids.**  A line's trace_id is the request's trace id, and a mirror line's span_id is the id of the
  span its event belongs to, so a replayed mirror reproduces the live ids.  The request span's id is
  derived from the request's first line (``_assembler.request_span_id``), as live.  Anything else is
  derived: a trace id from the request id and its first timestamp, the other span ids from the
  request span's (each request its own, even in a shared trace): the same files give the same ids.
  A trace id first seen on a later line (FastDeploy writes ``unknown`` until its context exists) is
  adopted by the whole request, since its spans are held, by request, until the request ends.
* **Times.**  A line says its millisecond; the event is put in the middle of it (within 0.5 ms).
* **When a request ends.**  At POSTPROCESSING_END, the last event of every lifecycle that answers a
  client.  A lifecycle that stops short (end of input, idle past the TTL, or pushed out by the
  in-flight cap) ends at its last event marked ``fastdeploy.anomaly=incomplete``, not as an error.
* **Recurring shapes.**  A request's lines wait for its END; a request whose events repeat a shape
  that has recurred is built from that shape's template (``templates``), learned from the Assembler,
  instead of line by line: the same spans, at a fraction of the cost.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence

from .. import attributes as A
from .._assembler import Assembler, request_span_id
from .._records import FINISH, SpanState
from ..events import LoggingEventName
from ..span_plan import PLAN, REQUEST_SPAN_NAME, Action
from .templates import BuiltRequest, Shape, learn, stand_in_lines
from .tracelog import TraceLine

__all__ = ["Replayer", "ReplayIds", "base_request_id"]

_END = LoggingEventName.POSTPROCESSING_END
_MAX_SHAPES = 4096  # templates kept: past it, a request of a new shape is assembled line by line
_LEARN_AT = 8  # a shape's template is learned when its 8th request ends (the first 7 are assembled)
_MAX_SHAPE_LINES = 256  # a longer request is assembled: shapes stay small keys (FastDeploy's have about 20)
_ShapeKey = tuple[tuple[LoggingEventName, ...], bool]  # a request's events, and whether its first line names a user
_NO_THREAD = threading.main_thread()  # Records name a thread; only mirror lines use it, and a replay makes none
_HALF_MS = 500_000


def _ns(ts_ms: int) -> int:
    """The time a line's event is put at: the middle of the millisecond it says (within 0.5 ms)."""
    return ts_ms * 1_000_000 + _HALF_MS


_RECENT = 10_000  # finished request ids remembered, so that a late line joins its request


def base_request_id(request_id: str) -> str:
    """The request a per-choice id belongs to (``X_0`` and ``X::n::0`` -> ``X``): the id without a
    trailing ``_N`` or ``::n::N`` (N: decimal digits), unless nothing would be left.  Looked at from
    the end (a regex search would try every position of the id)."""
    end = len(request_id)
    while end and request_id[end - 1].isdecimal():  # isdecimal: what \d matches
        end -= 1
    if end < len(request_id):
        if request_id.endswith("_", 0, end) and end > 1:
            return request_id[: end - 1]
        if request_id.endswith("::n::", 0, end) and end > 5:
            return request_id[: end - 5]
    return request_id


_GOLDEN = 0x9E3779B97F4A7C15
_M64 = (1 << 64) - 1


def _target(step_name: LoggingEventName, open_spans: dict[str, SpanState]) -> str:
    """The span the event belongs to, i.e. the span whose id its mirror line carries."""
    step = PLAN[step_name]
    if step.action is Action.OPEN:
        return step.unless_open if step.unless_open and step.unless_open in open_spans else step.span
    if step.action is Action.CLOSE:
        return step.span
    return step.stage


class ReplayIds:
    """The assembler's ids during a replay: from the line being fed where it has them, else derived."""

    __slots__ = ("line", "preset", "_opened")  # `line` is set for every line fed

    def __init__(self) -> None:
        self.line: TraceLine | None = None
        self.preset: str = ""  # the span name the line's span_id is for
        self._opened: dict[str, int] = {}  # per request in flight, the last span id derived (or its request span's)

    def trace_id(self, request_id: str, ts_ns: int) -> int:
        line = self.line
        if line is not None and line.trace_id:
            return line.trace_id
        key = f"trace/{request_id}/{ts_ns // 1_000_000}".encode("utf-8", "surrogatepass")
        return int.from_bytes(hashlib.blake2b(key, digest_size=16).digest(), "big") or 1

    def span_id(self, trace_id: int, request_id: str, name: str, ts_ns: int) -> int:
        line = self.line
        if name == REQUEST_SPAN_NAME:
            span_id = request_span_id(trace_id, line.request_id if line is not None else request_id, ts_ns)
            self._opened[request_id] = span_id  # the request's other spans count on from its own id
            return span_id
        if line is not None and line.span_id and name == self.preset:
            return line.span_id
        # The n-th span opened in the request: its request span's id (a hash: well spread, and another
        # for each request, even of one trace) + n * golden ratio; the odd step keeps them distinct.
        x = self._opened.get(request_id)
        if x is None:  # a late line's request, whose request span this replay did not open: its own start
            key = f"late/{trace_id:032x}/{request_id}/{ts_ns // 1_000_000}".encode("utf-8", "surrogatepass")
            x = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big")
        x = (x + _GOLDEN) & _M64
        self._opened[request_id] = x
        return x or 1

    def forget(self, request_id: str) -> None:
        self._opened.pop(request_id, None)

    @staticmethod
    def series(first: int, count: int) -> list[int]:
        """The request span's id `first` and the next `count - 1` ids span_id derives from it."""
        out, x = [first], first
        for _ in range(count - 1):
            x = (x + _GOLDEN) & _M64
            out.append(x or 1)
        return out


# Mirror lines remembered for spotting a batch written twice, which comes within about 1 s (its export
# process died) to 3 s and more (it stalled) of the first copy: a generation covers 10 s of log time,
# two are kept; past _SEEN_MAX lines in one, it turns early (memory before completeness).
_SEEN_SPAN_MS = 10_000
_SEEN_MAX = 500_000


class Replayer:
    """Feeds lines to an Assembler and hands each ended request's spans to `emit`, marked replayed.

    `templates`: a request's lines wait for its END, and a request of a shape that has recurred is
    built from that shape's template (``templates``) instead of line by line; off, every line goes to
    the Assembler as it comes (the same spans, in the same order; the tests compare the two)."""

    def __init__(
        self,
        emit: Callable[[Sequence[SpanState]], None],
        ttl_s: float = 600.0,
        max_in_flight: int = 100_000,
        templates: bool = True,
    ) -> None:
        self._emit = emit
        self.ids = ReplayIds()
        self.ttl_ns = int(ttl_s * 1e9)
        self.max_in_flight = max_in_flight
        # The assembler's own cap would end a request as an ERROR ("evicted"); ours ends it incomplete first.
        self.asm = Assembler(lambda ctx, trace_id: True, False, max_in_flight + 1, self.ttl_ns, self.ids, mirror=False)
        self._templates = templates
        # Requests in flight whose lines wait for their END, by key (a request is here or in the assembler).
        self._waiting: dict[str, list[TraceLine]] = {}
        # The keys of all requests in flight, waiting or assembled, in the order they began: the cap ends
        # the first, and the TTL and the end of input end them in this order, templates or not.
        # An OrderedDict: its first key is found at once, where a dict's scans the holes deletions left.
        self._begun: OrderedDict[str, None] = OrderedDict()
        # A shape (events, names a user) -> its template, or None: a shape its template cannot serve.
        self._shapes: dict[_ShapeKey, Shape | None] = {}
        self._sightings: dict[_ShapeKey, int] = {}  # shapes not learned yet -> their requests so far
        self._keys: dict[str, str] = {}  # a base id -> the key of the in-flight request that began under a choice id
        self._base_seen: dict[str, str] = {}  # such a key -> its base id, once a line used it
        # ids of recently ended requests -> their key (ordered: the oldest is dropped, see Assembler._finished)
        self._recent: OrderedDict[str, str] = OrderedDict()
        self._pinned: set[str] = set()  # requests whose trace id came from a line
        self._held: dict[str, list[SpanState]] = {}  # a request's finished spans, by its key, until it ends
        self._fed = 0
        self._next_sweep = 4096
        self.requests = 0  # requests ended (spans emitted)
        self.incomplete = 0
        # A mirror is written at least once: a batch its export process wrote but could not acknowledge
        # is written again.  Such a repeat (same span, event, millisecond, request) is skipped and counted;
        # two generations of recent keys bound the memory.
        self.duplicates = 0
        self._seen: set[int] = set()  # hashes of (span id, event, ms, request id)
        self._seen_before: set[int] = set()
        self._seen_until = 0  # the log time at which the current generation turns
        self.last_ns = 0

    @property
    def in_flight(self) -> int:
        return len(self._begun)

    # ---- lines ----------------------------------------------------------------------------------
    def _key(self, rid: str) -> str:
        requests, waiting = self.asm.requests, self._waiting
        if rid in requests or rid in waiting:
            return rid
        key = self._keys.get(rid)
        if key is not None:
            self._base_seen[key] = rid
            return key
        base = base_request_id(rid)
        if base != rid and (base in requests or base in waiting):
            return base
        return self._recent.get(rid) or self._recent.get(base) or rid

    def feed(self, lines: Iterable[TraceLine]) -> None:
        """Lines in timestamp order (a little disorder is an anomaly, not a failure).  A list at a
        time: what every line needs is looked up once per list, not once per line."""
        asm = self.asm
        requests = asm.requests
        waiting = self._waiting
        templates = self._templates
        last_ns = self.last_ns
        fed, next_sweep = self._fed, self._next_sweep
        for line in lines:
            ts_ms, rid, event, _, _, span_id = line
            if span_id and self._repeated(line):
                continue
            ts = ts_ms * 1_000_000 + _HALF_MS  # _ns(ts_ms), inline: every line passes here
            if ts > last_ns:
                last_ns = ts
            key = rid if rid in waiting or rid in requests else self._key(rid)
            held = waiting.get(key)
            if held is not None and not span_id:
                held.append(line)
                if event is _END:
                    self._end_waiting(key)
            elif held is None and templates and not span_id and key not in requests and asm.begins(key, event, ts):
                self._begin(key)
                waiting[key] = [line]
                if event is _END:  # a log that starts in the middle of a request
                    self._end_waiting(key)
            else:
                if held is not None:  # a mirror line: the request goes to the assembler after all
                    self._assemble(key)
                self._line(key, line)
            fed += 1
            if fed >= next_sweep:
                next_sweep = fed + max(4096, len(self._begun))
                self.last_ns = last_ns
                self.sweep(last_ns)
        self.last_ns = last_ns
        self._fed, self._next_sweep = fed, next_sweep

    def _repeated(self, line: TraceLine) -> bool:
        """Whether the mirror line `line` repeats one already fed (and counts it if so)."""
        ts_ms, rid, event, _, _, span_id = line
        mark = hash((span_id, event, ts_ms, rid))
        if mark in self._seen or mark in self._seen_before:
            self.duplicates += 1
            return True
        if ts_ms >= self._seen_until or len(self._seen) >= _SEEN_MAX:
            self._seen_before, self._seen = self._seen, set()
            self._seen_until = ts_ms + _SEEN_SPAN_MS
        self._seen.add(mark)
        return False

    def _begin(self, key: str) -> None:
        """The request `key` begins (the in-flight cap ends the oldest first); begun under a choice
        id, its base id joins it."""
        if len(self._begun) >= self.max_in_flight:
            self.end(next(iter(self._begun)))
        self._begun[key] = None
        base = base_request_id(key)
        if base != key:
            self._keys[base] = key

    def _line(self, key: str, line: TraceLine) -> None:
        """One line of the request `key` through the assembler."""
        ts_ms, _, event, user, trace_id, span_id = line
        asm = self.asm
        req = asm.requests.get(key)
        ts = _ns(ts_ms)
        if req is None:
            if key not in self._begun:  # else a waiting request, begun already, now assembled
                self._begin(key)
        elif trace_id and req.trace_id != trace_id and key not in self._pinned:
            self._adopt(key, trace_id)
        ids = self.ids
        ids.line = line
        if span_id:
            ids.preset = _target(event, req.open if req is not None else {})
            if req is not None:
                self._pin_span(key, ids.preset, span_id)
        asm.event(ts, event, key, user, None, None, None)
        if trace_id:
            self._pinned.add(key)
        spans = asm.spans
        if event is _END:
            asm.handle((FINISH, ts, None, key, None, None, _NO_THREAD, None, "", 0))  # type: ignore[arg-type]
            self._ended(key)
        elif spans:  # a span closed: held until its request ends
            self._hold(key, spans)
            spans.clear()

    def _assemble(self, key: str) -> None:
        """The waiting request `key` goes to the assembler, its lines so far with it."""
        for line in self._waiting.pop(key):
            self._line(key, line)

    # ---- templates ------------------------------------------------------------------------------
    def _end_waiting(self, key: str) -> None:
        """The waiting request `key` has its END: built from its shape's template, else assembled.
        A template serves lines in time order whose first names the user if any does (the user and
        trace id a request keeps are then its first line's, its first trace id's)."""
        lines = self._waiting[key]
        ms = [line[0] for line in lines]
        users = [line[3] for line in lines]
        user = users[0]
        template = None
        if len(ms) <= _MAX_SHAPE_LINES and ms == sorted(ms) and (user is not None or users.count(None) == len(users)):
            template = self._shape(tuple([line[2] for line in lines]), user is not None)
        if template is None:
            self._assemble(key)
            return
        del self._waiting[key]
        times = [m * 1_000_000 + _HALF_MS for m in ms]  # _ns(m), inline: a call per line costs 1%
        first = lines[0]
        ids = self.ids
        ids.line = first
        trace_id = ids.trace_id(key, times[0])  # as the assembler asks for it: the first line's, or derived
        first_id = request_span_id(trace_id, first[1], times[0])
        trace_id = next((t for t in [line[4] for line in lines] if t), trace_id)  # a later line's is adopted
        request_id = A.capped(key)
        base = self._base_seen.get(key)
        self.asm.remember_finished(key, trace_id, first_id, times[-1])
        built = BuiltRequest(
            template,
            times,
            trace_id,
            ReplayIds.series(first_id, len(template.spans)),
            request_id,
            A.capped(base) if base is not None else request_id,
            A.capped(A.text(user)) if user is not None else None,
        )
        self._done(key, built)

    def _shape(self, events: tuple[LoggingEventName, ...], user: bool) -> Shape | None:
        """The template of requests with these events (naming a user or not), learned when the
        _LEARN_AT-th of them ends; None: not yet, a shape its template cannot serve, or past the caps."""
        key = (events, user)
        if key in self._shapes:
            return self._shapes[key]
        # Learning costs some requests' worth (a stand-in replayed, its JSON skeleton made and checked):
        # a shape is learned once it has recurred, so that a log of ever-new shapes costs no more.
        seen = self._sightings.get(key, 0) + 1
        if seen < _LEARN_AT:
            if len(self._sightings) >= 4 * _MAX_SHAPES:  # a new count from here: shapes met later are learned too
                self._sightings.clear()
            self._sightings[key] = seen
            return None
        self._sightings.pop(key, None)
        if len(self._shapes) >= _MAX_SHAPES:
            return None
        shape = self._shapes[key] = self._learn(events, user)
        return shape

    def _learn(self, events: tuple[LoggingEventName, ...], user: bool) -> Shape | None:
        """The template of a shape: what a replay without templates makes of its stand-in request."""
        lines = stand_in_lines(events, user)
        made: list[SpanState] = []
        replayer = Replayer(made.extend, templates=False)
        replayer.feed(lines)
        replayer.finish()
        return learn(lines, made, [_ns(line.ts_ms) for line in lines], ReplayIds.series)

    def _pin_span(self, key: str, name: str, span_id: int) -> None:
        """A line names the id of an open span that was opened with a derived one (implicitly, by an
        event whose line did not carry it): the line is right; the span and its children follow it."""
        req = self.asm.requests[key]
        span = req.open.get(name)
        if span is None or span.span_id == span_id:
            return
        old, span.span_id = span.span_id, span_id
        for child in req.open.values():
            if child.parent_id == old:
                child.parent_id = span_id
        for held in self._held.get(key, ()):
            if held.parent_id == old:
                held.parent_id = span_id

    def _adopt(self, key: str, trace_id: int) -> None:
        """The request's trace id, first seen now: every span of the request takes it."""
        req = self.asm.requests[key]
        req.trace_id = trace_id
        if req.span is not None:
            req.span.trace_id = trace_id
        for span in req.open.values():
            span.trace_id = trace_id
        for span in self._held.get(key, ()):
            span.trace_id = trace_id

    # ---- ends -----------------------------------------------------------------------------------
    def _hold(self, key: str, spans: list[SpanState]) -> None:
        """Spans the request `key` closed (the assembler's list, in which a line or an end leaves only
        that request's): held by request, not by trace, since requests may share a trace id."""
        got = self._held.get(key)
        if got is None:
            self._held[key] = spans.copy()
        else:
            got += spans

    def _ended(self, key: str) -> None:
        """The request `key` has left the assembler: hand its spans on."""
        spans = self.asm.spans
        self._hold(key, spans)
        spans.clear()
        self._done(key, self._held.pop(key, None))

    def _done(self, key: str, out: Sequence[SpanState] | None) -> None:
        """The request `key` has ended with the spans `out`: marked (a built request's template has
        the marks), handed on, its key remembered."""
        self._begun.pop(key, None)
        base = self._base_seen.pop(key, None)
        if out and type(out) is not BuiltRequest:
            for s in out:
                s.attributes[A.REPLAYED] = True
                if base is not None and s.name == REQUEST_SPAN_NAME:
                    s.attributes[A.REQUEST_ID] = A.capped(base)  # the request as its client knows it
        if out:
            self._emit(out)
        self.ids.forget(key)
        self.requests += 1
        self._pinned.discard(key)
        base = base_request_id(key)
        if self._keys.get(base) == key:
            del self._keys[base]
        self._recent[key] = key
        if base != key:
            self._recent[base] = key
        while len(self._recent) > _RECENT:
            self._recent.popitem(last=False)

    def end(self, key: str) -> None:
        """End the in-flight request `key` as incomplete."""
        if key in self._waiting:
            self._assemble(key)
        req = self.asm.requests.get(key)
        if req is not None:
            self.incomplete += 1
            self.asm.end_incomplete(key)
            self._ended(key)

    def sweep(self, now_ns: int) -> None:
        """End the requests with no line for longer than the TTL (log time, or the clock when following)."""
        cutoff = now_ns - self.ttl_ns
        waiting, requests = self._waiting, self.asm.requests
        stale = []
        for key in self._begun:
            lines = waiting.get(key)
            last = _ns(lines[-1][0]) if lines is not None else requests[key].last_ns
            if last < cutoff:
                stale.append(key)
        for key in stale:
            self.end(key)

    def finish(self) -> None:
        """End of input: every request still in flight ends incomplete."""
        for key in list(self._begun):
            self.end(key)
        leftover = [s for spans in self._held.values() for s in spans]  # spans of requests already gone
        self._held.clear()
        if leftover:
            for s in leftover:
                s.attributes[A.REPLAYED] = True
            self._emit(leftover)
