"""Finished SpanStates written out without the SDK: as OTLP/JSON lines, and as ``tools.spans.Span``.

A replay turns hundreds of thousands of lines a second into spans; building a ReadableSpan, a
protobuf message and its JSON for each (``_otlp_json``) costs several times the whole replay.
The text written here is the same OTLP/JSON (hex ids, int64 as strings, enums as integers), and
``tools.spans.read_spans`` reads it back into the same Spans that ``to_span`` makes directly.
A request built from a template (``templates.BuiltRequest``) is written from its shape's skeleton:
this encoder's own text for the shape, made once, with the request's values put in.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from operator import itemgetter
from typing import Any, TextIO

from .._records import SpanState
from ..attributes import text
from .spans import STATUS_ERROR, Span
from .templates import BuiltRequest, Shape

__all__ = ["JsonLinesWriter", "encode_request", "to_span"]

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
# A str as a JSON string literal, what _dumps does for a str, without its Python-level dispatch.
_string = json.encoder.encode_basestring
_SPAN_KIND_INTERNAL = 1
# Entries kept: the pairs that recur (stage, replayed) are re-encoded after a clear at no real cost, and a
# request's own (its id) stop recurring when it ends; at 50,000 the cache was a quarter of a replay's RSS.
_CACHE_MAX = 4096


def _any_value(v: Any) -> str:
    """One OTLP/JSON AnyValue."""
    t = type(v)
    if t is str:
        return '{"stringValue":' + _string(v) + "}"
    if t is bool:
        return '{"boolValue":true}' if v else '{"boolValue":false}'
    if t is int:
        return '{"intValue":"' + str(v) + '"}'
    if t is float:
        if math.isfinite(v):
            return '{"doubleValue":' + repr(v) + "}"
        return '{"doubleValue":"' + ("NaN" if math.isnan(v) else "Infinity" if v > 0 else "-Infinity") + '"}'
    if isinstance(v, (list, tuple)):
        return '{"arrayValue":{"values":[' + ",".join(_any_value(x) for x in v) + "]}}"
    return '{"stringValue":' + _string(text(v)) + "}"


# The same few (key, string) pairs recur on every span of a request and every request, and the
# same few dozen span and event names on every span: each is encoded once, names with the constant
# text around them.
_kv_cache: dict[tuple[str, object], str] = {}
_span_heads: dict[str, str] = {}
_event_heads: dict[str, str] = {}
_NAME = '","name":'  # a name follows a value in quotes: a span's id, an event's time
_AFTER_SPAN_NAME = f',"kind":{_SPAN_KIND_INTERNAL},"startTimeUnixNano":"'
_AFTER_EVENT_NAME = ',"attributes":['


def _attributes(attrs: Mapping[str, Any]) -> str:
    cache = _kv_cache
    out = []
    for item in attrs.items():
        t = type(item[1])
        if t is str or t is bool:
            kv = cache.get(item)
            if kv is None:
                if len(cache) > _CACHE_MAX:
                    cache.clear()
                kv = cache[item] = '{"key":' + _string(item[0]) + ',"value":' + _any_value(item[1]) + "}"
        else:
            kv = '{"key":' + _string(item[0]) + ',"value":' + _any_value(item[1]) + "}"
        out.append(kv)
    return ",".join(out)


def _cached(cache: dict[str, str], name: str, before: str, after: str) -> str:
    """`name` as a JSON string between `before` and `after`, encoded on its first use."""
    text = cache.get(name)
    if text is None:
        if len(cache) > _CACHE_MAX:
            cache.clear()
        text = cache[name] = before + _string(name) + after
    return text


def _span(s: SpanState, head: str) -> str:
    """One span; `head`: its opening up to the span id (the trace id, shared by a request's spans).
    Ids are OTel's 64 and 128 bits wide; ``to_bytes().hex()`` formats them at a third of ``:016x``'s cost."""
    events = ""
    if s.events:
        heads = _event_heads  # looked up inline; _cached only on a miss (its result is never empty)
        events = (
            ',"events":['
            + ",".join(
                [
                    f'{{"timeUnixNano":"{ts}{heads.get(name) or _cached(heads, name, _NAME, _AFTER_EVENT_NAME)}'
                    f"{_attributes(attrs) if attrs else ''}]}}"
                    for name, ts, attrs in s.events
                ]
            )
            + "]"
        )
    parent = '","parentSpanId":"' + s.parent_id.to_bytes(8, "big").hex() if s.parent_id else ""
    status = f'{{"code":{STATUS_ERROR},"message":{_string(s.error)}}}' if s.error else "{}"
    name = _span_heads.get(s.name) or _cached(_span_heads, s.name, _NAME, _AFTER_SPAN_NAME)
    return (
        f"{head}{s.span_id.to_bytes(8, 'big').hex()}{parent}{name}{s.start_ns}"
        f'","endTimeUnixNano":"{s.end_ns}","attributes":[{_attributes(s.attributes)}]{events},"status":{status}}}'
    )


def encode_request(spans: Iterable[SpanState], resource: Mapping[str, Any], scope: tuple[str, str]) -> str:
    """One OTLP/JSON ExportTraceServiceRequest (one line, no newline) holding `spans`."""
    return _join(_head(resource, scope), _encoded(spans), _TAIL)


_TAIL = "]}]}]}"


def _head(resource: Mapping[str, Any], scope: tuple[str, str]) -> str:
    """A request's text up to its first span."""
    return (
        '{"resourceSpans":[{"resource":{"attributes":['
        + _attributes(resource)
        + ']},"scopeSpans":[{"scope":{"name":'
        + _string(scope[0])
        + ',"version":'
        + _string(scope[1])
        + '},"spans":['
    )


def _encoded(spans: Iterable[SpanState]) -> list[str]:
    out = []
    last, span_head = -1, ""
    for s in spans:
        if s.trace_id != last:  # spans come a request at a time
            last, span_head = s.trace_id, '{"traceId":"' + s.trace_id.to_bytes(16, "big").hex() + '","spanId":"'
        out.append(_span(s, span_head))
    return out


def _join(head: str, spans: list[str], tail: str) -> str:
    """`head`, the spans' texts (a list it may change) and `tail` by one join: a line of 512 spans
    is a few hundred KB, and each ``+`` on it (head, tail, newline) copied all of it again."""
    if not spans:
        return head + tail
    spans[0] = head + spans[0]  # the head and the tail join the first and last spans: no comma
    spans[-1] += tail
    return ",".join(spans)


# ---- requests built from a template (``templates.BuiltRequest``) ------------------------------------
# A built request's text is its shape's text with its own values put in.  The shape's skeleton is what
# _encoded makes of the shape's spans holding sentinel values, cut at each sentinel: the text between
# and which value goes in each place.  It is made once per shape and checked against _encoded on the
# shape's first built request; a shape whose check fails is encoded span by span, as any other.
_TRACE_SENTINEL = int("e" * 32, 16)
_ID_SENTINEL = int("5a5a5a5a5a5a0000", 16)  # + the id's position; a letter in it: no run of digits
_TIME_SENTINEL = 9_100_000_000_000_000_000  # + the line's position: 19 digits, no one inside another
_TEXT_SENTINELS = ("\x00R\x00", "\x00N\x00", "\x00U\x00")  # request id, request span's, user
Skeleton = tuple[list[str], Callable[[list[str]], tuple[str, ...]]]  # the text between, which value where
_skeletons: dict[Shape, Skeleton | None] = {}


def _values(r: BuiltRequest) -> list[str]:
    """A built request's values in the order its skeleton numbers them."""
    values = [r.trace_id.to_bytes(16, "big").hex()]
    values += [x.to_bytes(8, "big").hex() for x in r.ids]
    values += map(str, r.times)
    values += (_string(r.request_id), _string(r.name), _string(r.user) if r.user is not None else "")
    return values


def _skeleton(r: BuiltRequest) -> Skeleton | None:
    """The skeleton of `r`'s shape, or None when a sentinel's text could be read two ways or the
    skeleton does not give `r`'s own text."""
    shape = r.shape
    stand_in = BuiltRequest(
        shape,
        [_TIME_SENTINEL + i for i in range(len(r.times))],
        _TRACE_SENTINEL,
        [_ID_SENTINEL + i for i in range(len(r.ids))],
        *_TEXT_SENTINELS[:2],
        _TEXT_SENTINELS[2] if shape.user else None,
    )
    text = ",".join(_encoded(stand_in))
    places = []  # (where, length, which value)
    for which, value in enumerate(_values(stand_in)):
        at = text.find(value) if value else -1
        while at >= 0:
            places.append((at, len(value), which))
            at = text.find(value, at + len(value))
    places.sort()
    between, end = [], 0
    for at, length, _ in places:
        if at < end:
            return None  # overlapping sentinels
        between.append(text[end:at])
        end = at + length
    between.append(text[end:])
    order = [which for _, _, which in places]
    pick = itemgetter(*order) if len(order) > 1 else lambda v: (v[order[0]],)
    skeleton: Skeleton = (between, pick)
    # Checked on the request itself: its text from the skeleton must be its text from _encoded.
    if _fill(skeleton, r) != ",".join(_encoded(r.spans())):
        return None
    return skeleton


def _fill(skeleton: Skeleton, r: BuiltRequest) -> str:
    between, pick = skeleton
    parts: list[str] = [""] * (2 * len(between) - 1)
    parts[0::2] = between
    parts[1::2] = pick(_values(r))
    return "".join(parts)


def _built_text(r: BuiltRequest) -> str | None:
    """The text of a built request's spans, comma-joined; None when its shape has no skeleton."""
    shape = r.shape
    skeleton = _skeletons.get(shape)
    if skeleton is None:
        if shape in _skeletons:
            return None
        if len(_skeletons) > _CACHE_MAX:
            _skeletons.clear()
        skeleton = _skeletons[shape] = _skeleton(r)
        if skeleton is None:
            return None
    return _fill(skeleton, r)


class JsonLinesWriter:
    """Appends spans to a text stream as OTLP/JSON lines, `batch` spans to a line.  Each span is
    encoded when it is written, while its objects are fresh in the CPU's caches, and only its text
    waits for the line (the same text as encoding 512 spans at once: a few percent less CPU)."""

    def __init__(self, out: TextIO, resource: Mapping[str, Any], scope: tuple[str, str], batch: int = 512) -> None:
        self._out = out
        self._head = _head(resource, scope)
        self._batch = batch
        self._pending: list[str] = []  # span texts: one span's each, or a built request's spans
        self._spans = 0  # spans in _pending
        self.written = 0

    def write(self, spans: Sequence[SpanState]) -> None:
        text = _built_text(spans) if type(spans) is BuiltRequest else None
        if text is not None:
            self._pending.append(text)
        else:
            self._pending += _encoded(spans)
        self._spans += len(spans)
        if self._spans >= self._batch:
            self.flush(sync=False)

    def flush(self, sync: bool = True) -> None:
        """Write what is pending as one line; `sync`: and push it to the file (follow mode)."""
        if self._pending:
            pending, self._pending = self._pending, []  # _join changes the list; a failed write loses it whole
            count, self._spans = self._spans, 0
            self._out.write(_join(self._head, pending, _TAIL + "\n"))
            self.written += count
        if sync:
            self._out.flush()


def to_span(s: SpanState, resource: Mapping[str, Any], scope: str) -> Span:
    """The Span that read_spans would give for `s` once written: no file in between."""
    return Span(
        name=s.name,
        trace_id=f"{s.trace_id:032x}",
        span_id=f"{s.span_id:016x}",
        parent_span_id=f"{s.parent_id:016x}" if s.parent_id else "",
        start_ns=s.start_ns,
        end_ns=s.end_ns,
        attributes=dict(s.attributes),
        events=[{"name": name, "time_ns": ts, "attributes": dict(attrs)} for name, ts, attrs in s.events],
        status_code=STATUS_ERROR if s.error else 0,
        status_message=s.error or "",
        resource=dict(resource),
        kind=_SPAN_KIND_INTERNAL,
        scope=scope,
    )
