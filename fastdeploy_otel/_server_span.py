"""A SERVER span (the HTTP request around a generation request) recorded straight into the pipeline.

Why not the SDK's span: in the example API server an SDK span cost 0.26M instructions per request,
a third of all tracing's work in that process (bounded attributes cleaned value by value behind a
lock, a ReadableSpan copied at end, then read back into a WireSpan).  This one keeps plain fields
and becomes a WireSpan at ``end()``; the export process applies the span limits, as for every span
of ours.  It is a real ``opentelemetry.trace.Span``: set it in a context and the request's spans
become its children, in this process and downstream.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Mapping
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.util import types

from ._assembler import new_span_id, new_trace_id
from ._records import new_record
from ._selflog import get_logger
from ._wire import WireSpan
from .attributes import clean, clean_all, text

logger = get_logger(__name__)

_SERVER = SpanKind.SERVER.value
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_NOT_SAMPLED = TraceFlags(TraceFlags.DEFAULT)


class ServerSpan(trace.Span):
    """A recording SERVER span whose end hands a WireSpan to `offer` (never blocks, never raises)."""

    def __init__(
        self,
        offer: Any,
        scope: tuple[str, str | None],
        name: str,
        context: SpanContext,
        parent: SpanContext | None,
        attributes: Mapping[str, Any] | None,
    ) -> None:
        self._offer = offer
        self._scope = scope
        self._name = name
        self._context = context
        self._parent = parent
        self._start_ns = time.time_ns()
        self._attributes: dict[str, Any] = {}
        self._events: list[tuple[str, int, dict[str, Any]]] = []
        self._links: list[tuple[int, int, dict[str, Any]]] = []
        self._status = StatusCode.UNSET
        self._description: str | None = None
        self._ended = False
        if attributes:
            self.set_attributes(attributes)

    def get_span_context(self) -> SpanContext:
        return self._context

    def is_recording(self) -> bool:
        return not self._ended

    def set_attributes(self, attributes: Mapping[str, types.AttributeValue]) -> None:
        if not self._ended:
            self._attributes.update(clean_all(attributes))

    def set_attribute(self, key: str, value: types.AttributeValue) -> None:
        if not self._ended and value is not None and isinstance(key, str):
            self._attributes[key] = clean(value)

    def add_event(
        self, name: str, attributes: types.Attributes = None, timestamp: int | None = None
    ) -> None:  # fmt: skip
        if not self._ended:
            self._events.append((text(name), time.time_ns() if timestamp is None else timestamp, clean_all(attributes)))

    def add_link(self, context: SpanContext, attributes: types.Attributes = None) -> None:
        if not self._ended and isinstance(context, SpanContext) and context.is_valid:
            self._links.append((context.trace_id, context.span_id, clean_all(attributes)))

    def update_name(self, name: str) -> None:
        if not self._ended:
            self._name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        """As the SDK: OK is final, UNSET (and anything that is not a status) is ignored."""
        if self._ended or self._status is StatusCode.OK:
            return
        code = status
        if isinstance(status, Status):
            code, description = status.status_code, status.description
        if not isinstance(code, StatusCode) or code is StatusCode.UNSET:
            return
        self._status = code
        self._description = description if code is StatusCode.ERROR else None

    def record_exception(
        self,
        exception: BaseException,
        attributes: types.Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        """The semantic conventions' ``exception`` event, as the SDK writes it."""
        try:
            stack = "".join(traceback.format_exception(type(exception), exception, exception.__traceback__))
        except Exception:  # an exception whose traceback cannot be printed is still recorded
            stack = ""
        kind = type(exception)
        module = kind.__module__
        attrs: dict[str, Any] = {
            "exception.type": f"{module}.{kind.__qualname__}" if module and module != "builtins" else kind.__qualname__,
            "exception.message": text(exception),
            "exception.stacktrace": stack,
            "exception.escaped": str(escaped),
        }
        attrs.update(attributes or {})
        self.add_event("exception", attrs, timestamp)

    def end(self, end_time: int | None = None) -> None:
        if self._ended:
            return
        self._ended = True
        ctx, parent = self._context, self._parent
        try:
            self._offer(new_record(WireSpan, (
                self._name, ctx.trace_id, ctx.span_id, parent.span_id if parent else 0,
                bool(parent and parent.is_remote), _SERVER, self._start_ns, end_time or time.time_ns(),
                self._attributes, self._events, self._links, self._status.value, self._description, self._scope,
                ctx.trace_state.to_header() if ctx.trace_state else "",
            )))  # fmt: skip
        except Exception:  # never into the request: the span is lost, and said so
            logger.warning("a server span could not be handed to export; dropped", exc_info=True)


def start(
    offer: Any,
    should_sample: Any,
    scope: tuple[str, str | None],
    name: str,
    context: Context | None,
    attributes: Mapping[str, Any] | None,
) -> trace.Span:
    """A SERVER span under `context`'s span (a caller's traceparent; None: the current context, as the
    SDK reads it), sampled as our request spans are."""
    current = trace.get_current_span(context).get_span_context()
    parent = current if current.is_valid else None
    trace_id = parent.trace_id if parent is not None else new_trace_id()
    sampled = should_sample(context, trace_id)
    span_context = SpanContext(
        trace_id,
        new_span_id(),
        is_remote=False,
        trace_flags=_SAMPLED if sampled else _NOT_SAMPLED,
        trace_state=parent.trace_state if parent is not None else None,
    )
    if not sampled:
        return trace.NonRecordingSpan(span_context)
    return ServerSpan(offer, scope, name, span_context, parent, attributes)
