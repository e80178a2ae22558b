"""Finished SpanStates written out without the SDK: as OTLP/JSON lines, and as ``tools.spans.Span``.

A replay turns hundreds of thousands of lines a second into spans; building a ReadableSpan, a
protobuf message and its JSON for each (``_otlp_json``) costs several times the whole replay.
The text written here is the same OTLP/JSON (hex ids, int64 as strings, enums as integers), and
``tools.spans.read_spans`` reads it back into the same Spans that ``to_span`` makes directly.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TextIO

from .._records import SpanState
from ..attributes import text
from .spans import STATUS_ERROR, Span

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


class JsonLinesWriter:
    """Appends spans to a text stream as OTLP/JSON lines, `batch` spans to a line.  Each span is
    encoded when it is written, while its objects are fresh in the CPU's caches, and only its text
    waits for the line (the same text as encoding 512 spans at once: a few percent less CPU)."""

    def __init__(self, out: TextIO, resource: Mapping[str, Any], scope: tuple[str, str], batch: int = 512) -> None:
        self._out = out
        self._head = _head(resource, scope)
        self._batch = batch
        self._pending: list[str] = []
        self.written = 0

    def write(self, spans: Sequence[SpanState]) -> None:
        self._pending += _encoded(spans)
        if len(self._pending) >= self._batch:
            self.flush(sync=False)

    def flush(self, sync: bool = True) -> None:
        """Write what is pending as one line; `sync`: and push it to the file (follow mode)."""
        if self._pending:
            pending, self._pending = self._pending, []  # _join changes the list; a failed write loses it whole
            self._out.write(_join(self._head, pending, _TAIL + "\n"))
            self.written += len(pending)
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
