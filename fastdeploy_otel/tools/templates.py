"""A request whose lines repeat an earlier request's events: its spans from a template, not line by line.

Most requests of a deployment go through the same events in the same order.  Once a shape (its
events, and whether its first line names a user) has recurred (``replay._LEARN_AT``), a stand-in
request of it is replayed by the Assembler as usual, on stand-in values: one request id, one user, a
line every second.  What that made is kept as a template: for each span, which line's time starts
and ends it, which span is its parent, which of the request's derived ids it takes.  From then on
the requests of the shape are built from the template, at a fraction of the cost: the same spans the
Assembler would make, byte for byte (``tests/test_replay_templates.py`` replays random and damaged
logs both ways).  Only requests the template cannot differ on take it (``Replayer`` decides).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple, overload

from .. import attributes as A
from .._records import SpanState
from ..events import LoggingEventName
from ..span_plan import REQUEST_SPAN_NAME
from .tracelog import TraceLine

__all__ = ["BuiltRequest", "Shape", "SpanTemplate", "learn", "stand_in_lines"]

# Stand-ins no real line carries (a NUL cannot be in a parsed value): where they show in what the
# Assembler made, the request's own id or user goes.
STAND_IN_ID = "\x00request\x00"
STAND_IN_USER = "\x00user\x00"
_STEP_MS = 1000  # the stand-in lines' spacing: distinct times, so a span's time names its line


class SpanTemplate(NamedTuple):
    """One span of a shape; times and ids by position (the request's lines, its derived ids)."""

    name: str
    stage: str
    ordinal: int  # 0: the request span; n: the n-th span the request opened after it
    parent: int  # the parent's ordinal; -1: a root span
    parent_remote: bool
    start: int  # the line whose time it starts at
    end: int
    attributes: dict[str, Any]  # with the stand-in request id (and user)
    events: tuple[tuple[str, int, dict[str, Any]], ...]  # (name, line, attributes)
    error: str | None
    implicit: bool


def stand_in_lines(events: Sequence[LoggingEventName], user: bool) -> list[TraceLine]:
    """The stand-in request of a shape."""
    who = STAND_IN_USER if user else None
    return [TraceLine((i + 1) * _STEP_MS, STAND_IN_ID, ev, who, 0, 0) for i, ev in enumerate(events)]


def learn(
    lines: Sequence[TraceLine],
    spans: Sequence[SpanState],
    times: Sequence[int],
    derived: Callable[[int, int], list[int]],
) -> Shape | None:
    """The template of the spans a replay made of the stand-in `lines`, whose times (in ns, as the
    replay puts them) are `times`; `derived(first, n)`: the ids a request derives from its request
    span's.  None when the spans hold anything the template could not reproduce."""
    line_of = {t: i for i, t in enumerate(times)}
    roots = [s for s in spans if s.name == REQUEST_SPAN_NAME and not s.parent_id]
    if len(roots) != 1 or len(line_of) != len(lines):
        return None
    ordinal_of = {x: n for n, x in enumerate(derived(roots[0].span_id, len(spans)))}
    user = lines[0].user is not None
    out = []
    for s in spans:
        attrs = s.attributes
        if attrs.get(A.REQUEST_ID) != STAND_IN_ID or (user and attrs.get(A.USER_ID) != STAND_IN_USER):
            return None
        rest = [v for k, v in attrs.items() if k not in (A.REQUEST_ID, A.USER_ID)]
        rest += [v for _, _, a in s.events for v in a.values()]
        if s.exceptions or any(type(v) is str and "\x00" in v for v in rest):
            return None
        try:
            out.append(
                SpanTemplate(
                    s.name,
                    s.stage,
                    ordinal_of[s.span_id],
                    ordinal_of[s.parent_id] if s.parent_id else -1,
                    s.parent_remote,
                    line_of[s.start_ns],
                    line_of[s.end_ns],
                    dict(attrs),
                    tuple((name, line_of[ts], dict(a)) for name, ts, a in s.events),
                    s.error,
                    s.implicit,
                )
            )
        except KeyError:  # a time or an id that is not a line's or a derived one
            return None
    return Shape(tuple(out), user)


class Shape:
    """A shape's template: its spans, in the order the Assembler hands them on.  Compared and hashed
    by identity: encoders may key what they derive from it (``spanstates``) by the shape itself."""

    __slots__ = ("spans", "user")

    def __init__(self, spans: tuple[SpanTemplate, ...], user: bool) -> None:
        self.spans = spans
        self.user = user  # its requests name a user: every span carries it


class BuiltRequest(Sequence[SpanState]):
    """A request's spans as its shape and its own values; the SpanStates are made when first read
    (a JSON-lines replay may never read them: ``spanstates`` fills in the shape's encoded text)."""

    __slots__ = ("shape", "times", "trace_id", "ids", "request_id", "name", "user", "_spans")

    def __init__(
        self,
        shape: Shape,
        times: Sequence[int],
        trace_id: int,
        ids: Sequence[int],
        request_id: str,
        name: str,
        user: str | None,
    ) -> None:
        """`times`: its lines' times; `ids`: its derived ids (the request span's first); `request_id`
        and `user`: the attribute values (capped) that replace the stand-ins; `name`: the request
        span's request id (its base id, when the request began under a choice id)."""
        self.shape = shape
        self.times = times
        self.trace_id = trace_id
        self.ids = ids
        self.request_id = request_id
        self.name = name
        self.user = user
        self._spans: list[SpanState] | None = None

    def __len__(self) -> int:
        return len(self.shape.spans)

    @overload
    def __getitem__(self, i: int) -> SpanState: ...
    @overload
    def __getitem__(self, i: slice) -> list[SpanState]: ...
    def __getitem__(self, i: int | slice) -> SpanState | list[SpanState]:
        return self.spans()[i]

    def __iter__(self) -> Iterator[SpanState]:
        return iter(self.spans())

    def spans(self) -> list[SpanState]:
        if self._spans is None:
            self._spans = self._build()
        return self._spans

    def _build(self) -> list[SpanState]:
        times, ids, user = self.times, self.ids, self.user
        out = []
        for t in self.shape.spans:
            attrs = t.attributes.copy()
            attrs[A.REQUEST_ID] = self.name if t.ordinal == 0 else self.request_id  # keys it has: the order stays
            if user is not None:
                attrs[A.USER_ID] = user
            end = times[t.end]
            out.append(
                SpanState(
                    t.name,
                    self.trace_id,
                    ids[t.ordinal],
                    ids[t.parent] if t.parent >= 0 else 0,
                    t.parent_remote,
                    True,  # a replay samples every request
                    times[t.start],
                    t.stage,
                    attrs,
                    [(name, times[i], a.copy()) for name, i, a in t.events],
                    [],
                    t.error,
                    t.implicit,
                    end,  # last_ns: a closed span's is no longer read
                    end,
                )
            )
        return out
