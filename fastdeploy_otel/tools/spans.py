"""The one span decoder: OTLP protobuf, and OTLP/JSON lines through it, into one ``Span`` shape.

The test receiver decodes what arrives over gRPC and HTTP with ``decode_request``; ``read_spans``
reads the JSON lines written by ``FD_TRACE_JSON_FILE`` or by the Collector's ``file`` exporter,
converting each line to the same protobuf message first.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.json_format import ParseDict, ParseError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

__all__ = ["STATUS_ERROR", "Span", "decode_request", "read_spans"]

STATUS_ERROR = 2  # OTLP's STATUS_CODE_ERROR


@dataclass
class Span:
    """A decoded span: ids as lowercase hex, times in epoch ns, events as
    ``{"name", "time_ns", "attributes"}`` dicts, status code 0 unset, 1 ok, 2 error."""

    name: str
    trace_id: str  # 32 hex
    span_id: str  # 16 hex
    parent_span_id: str  # "" for a root
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    events: list[dict[str, Any]]
    status_code: int
    status_message: str
    resource: dict[str, Any] = field(default_factory=dict)
    kind: int = 0
    scope: str = ""

    @property
    def is_error(self) -> bool:
        return self.status_code == STATUS_ERROR


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, kind) if kind else None


def _attrs(kvs: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in kvs}


def count_spans(req: ExportTraceServiceRequest) -> int:
    return sum(len(ss.spans) for rs in req.resource_spans for ss in rs.scope_spans)


def decode_request(req: ExportTraceServiceRequest) -> list[Span]:
    """Every span of one export request."""
    spans = []
    for rs in req.resource_spans:
        resource = _attrs(rs.resource.attributes)
        for ss in rs.scope_spans:
            for s in ss.spans:
                spans.append(
                    Span(
                        name=s.name,
                        trace_id=s.trace_id.hex(),
                        span_id=s.span_id.hex(),
                        parent_span_id=s.parent_span_id.hex(),
                        start_ns=s.start_time_unix_nano,
                        end_ns=s.end_time_unix_nano,
                        attributes=_attrs(s.attributes),
                        events=[
                            {"name": e.name, "time_ns": e.time_unix_nano, "attributes": _attrs(e.attributes)}
                            for e in s.events
                        ],
                        status_code=s.status.code,
                        status_message=s.status.message,
                        resource=resource,
                        kind=s.kind,
                        scope=ss.scope.name,
                    )
                )
    return spans


# ---- OTLP/JSON lines ------------------------------------------------------------------------------
_ID_FIELDS = {"traceId": 16, "spanId": 8, "parentSpanId": 8, "trace_id": 16, "span_id": 8, "parent_span_id": 8}


def _hex_to_b64(value: Any, nbytes: int) -> Any:
    """OTLP/JSON writes ids as hex where protobuf JSON expects base64; base64 input is kept."""
    if isinstance(value, str) and len(value) == 2 * nbytes:
        try:
            return base64.b64encode(bytes.fromhex(value)).decode()
        except ValueError:
            pass
    return value


def _fix_ids(obj: Any) -> None:
    for rs in obj.get("resourceSpans", obj.get("resource_spans", ())) or ():
        for ss in rs.get("scopeSpans", rs.get("scope_spans", ())) or ():
            for span in ss.get("spans", ()) or ():
                for holder in [span, *(span.get("links", ()) or ())]:
                    for key, n in _ID_FIELDS.items():
                        if key in holder:
                            holder[key] = _hex_to_b64(holder[key], n)


def iter_requests(path: str | os.PathLike[str]) -> Iterator[ExportTraceServiceRequest]:
    """The export requests of an OTLP/JSON lines file; a line that does not parse (typically the
    last one, cut short by a crash or a writer still busy) is skipped."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    continue
                _fix_ids(obj)
                yield ParseDict(obj, ExportTraceServiceRequest(), ignore_unknown_fields=True)
            except (ValueError, ParseError, binascii.Error, AttributeError, TypeError):
                continue


def read_spans(path: str | os.PathLike[str]) -> list[Span]:
    """Every span in an OTLP/JSON lines file (ours or the Collector's ``file`` exporter's)."""
    spans: list[Span] = []
    for request in iter_requests(path):
        spans.extend(decode_request(request))
    return spans
