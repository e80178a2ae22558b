"""The records that flow one way through the pipeline, in one place:

    calling thread ─ Record ─► assembler ─┬─ MirrorRecord ─► trace.log
                                          ├─ ErrorLog     ─► error.log
                                          └─ SpanState    ─► export (once ended)

The assembler makes them and the sinks consume them; neither imports the other.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from opentelemetry.context import Context

# What a calling thread queued: the first element of every Record.
EVENT, ERROR, FINISH, ABORT, EXTRACT, SPAN_EVENT = range(6)
# A SPAN_EVENT's payload is (name, time_ns or None for the record's own, attributes): a named moment
# on the request's innermost open span (FastDeploy's trace_event); an EVENT is a lifecycle event.

# A queued record, as the hot path builds it:
#     (kind, ts_ns, event, request_id, user, payload, thread, context, filename, lineno)
# It stays a plain tuple: building a NamedTuple on the hot path costs about 70 ns an event (~5-10%
# of trace_print); readers unpack it by name, in this order.
Record = tuple[int, int, Any, str, "str | None", Any, threading.Thread, Context, str, int]


# A NamedTuple's own constructor is a Python function (~0.5 us); tuple.__new__(Cls, values) makes
# the same object in C.  For the records built once per event or span.
new_record: Any = tuple.__new__


class MirrorRecord(NamedTuple):
    """Everything one trace.log line needs; made by the assembler, formatted by the worker."""

    ts_ns: int
    filename: str
    lineno: int
    thread_id: int
    thread_name: str
    request_id: str
    user: object
    event: str
    stage: str
    trace_id: int
    span_id: int


@dataclass(slots=True)
class SpanState:
    """A span being assembled; once `end_ns` is set it is handed to the span builder."""

    name: str
    trace_id: int
    span_id: int
    parent_id: int  # 0: a root span
    parent_remote: bool
    sampled: bool
    start_ns: int
    stage: str
    attributes: dict[str, Any] = field(default_factory=dict)
    events: list[tuple[str, int, dict[str, Any]]] = field(default_factory=list)
    exceptions: list[tuple[BaseException, int]] = field(default_factory=list)
    error: str | None = None  # ERROR status description
    implicit: bool = False
    last_ns: int = 0
    end_ns: int = 0


@dataclass(slots=True)
class ErrorLog:
    """One record_error call, resolved to its request's ids by the assembler."""

    ts_ns: int
    request_id: str
    trace_id: int
    span_id: int
    exc: BaseException
    filename: str = ""
    lineno: int = 0
