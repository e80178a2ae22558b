"""Size limits on the spans we hand to exporters.

Finished spans skip the SDK's own ``Span`` class, so the OTel limits
(``OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT``, ``OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT``, ...) are applied here, as
the SDK applies them to its spans.  On top of that, a span too big for one export message is
shrunk rather than allowed to take its batch down with it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from opentelemetry.sdk.trace import Event, ReadableSpan

TRUNCATED = "fastdeploy.truncated"
_SHRUNK_VALUE_LEN = 4096  # a shrunk span keeps this much of every string
_SPAN_OVERHEAD = 160  # ids, times, name, status, kind: roughly what OTLP spends on a span
_EVENT_OVERHEAD = 24
_ATTRIBUTE_OVERHEAD = 8


class Limits(NamedTuple):
    attributes: int = 128
    events: int = 128
    event_attributes: int = 128
    value_length: int | None = None  # None: no limit (the OTel default)


def _cut(value: Any, length: int) -> Any:
    if isinstance(value, str):
        return value[:length]
    if isinstance(value, (list, tuple)):
        return [v[:length] if isinstance(v, str) else v for v in value]
    return value


def limit_attributes(attributes: dict[str, Any], count: int, length: int | None) -> dict[str, Any]:
    """`attributes` within the count and value-length limits; the same dict when already within."""
    if len(attributes) > count:
        attributes = dict(list(attributes.items())[:count])
    if length is not None and any(isinstance(v, (str, list, tuple)) for v in attributes.values()):
        attributes = {k: _cut(v, length) for k, v in attributes.items()}
    return attributes


def _value_size(value: Any) -> int:
    if isinstance(value, str):
        return len(value) if value.isascii() else len(value.encode("utf-8", "replace"))
    if isinstance(value, (list, tuple)):
        return sum(_value_size(v) + 2 for v in value)
    return 8


def _attributes_size(attributes: Mapping[str, Any] | None) -> int:
    if not attributes:
        return 0
    return sum(len(k) + _value_size(v) + _ATTRIBUTE_OVERHEAD for k, v in attributes.items())


def span_size(span: ReadableSpan) -> int:
    """About how many bytes `span` takes in an OTLP message (within a few percent for big spans)."""
    size = _SPAN_OVERHEAD + len(span.name) + _attributes_size(span.attributes)
    for event in span.events:
        size += _EVENT_OVERHEAD + len(event.name) + _attributes_size(event.attributes)
    return size


def shrink_parts(
    name: str,
    attributes: Mapping[str, Any] | None,
    events: Sequence[tuple[str, int, Mapping[str, Any] | None]],
    max_bytes: int,
) -> tuple[dict[str, Any], list[tuple[str, int, dict[str, Any]]]]:
    """The attributes and events of a span named `name` cut to fit in `max_bytes`: strings cut,
    then the events that still do not fit dropped; marked ``fastdeploy.truncated``."""
    attributes = {k: _cut(v, _SHRUNK_VALUE_LEN) for k, v in (attributes or {}).items()}
    attributes[TRUNCATED] = True
    budget = max_bytes - _SPAN_OVERHEAD - len(name) - _attributes_size(attributes)
    if budget < 0:  # too many attributes even when cut: keep the first ones that fit
        kept: dict[str, Any] = {TRUNCATED: True}
        budget = max_bytes - _SPAN_OVERHEAD - len(name) - _attributes_size(kept)
        for k, v in attributes.items():
            cost = len(k) + _value_size(v) + _ATTRIBUTE_OVERHEAD
            if cost <= budget:
                kept[k] = v
                budget -= cost
        attributes = kept
    kept_events = []
    for event_name, ts, attrs in events:
        ea = {k: _cut(v, _SHRUNK_VALUE_LEN) for k, v in (attrs or {}).items()}
        cost = _EVENT_OVERHEAD + len(event_name) + _attributes_size(ea)
        if cost > budget:
            break
        budget -= cost
        kept_events.append((event_name, ts, ea))
    return attributes, kept_events


def shrink(span: ReadableSpan, max_bytes: int) -> ReadableSpan:
    """A copy of `span` that fits in `max_bytes` (``shrink_parts``)."""
    attributes, events = shrink_parts(
        span.name, span.attributes, [(e.name, e.timestamp, e.attributes) for e in span.events], max_bytes
    )
    return ReadableSpan(
        span.name,
        span.context,
        span.parent,
        span.resource,
        attributes,
        [Event(name, ea, ts) for name, ts, ea in events],
        span.links,
        span.kind,
        status=span.status,
        start_time=span.start_time,
        end_time=span.end_time,
        instrumentation_scope=span.instrumentation_scope,
    )
