"""OTLP/JSON lines: a span exporter that writes what the OTel Collector's ``file`` exporter writes,
and a reader that flattens such files back into plain dicts.

Each exported batch becomes ONE line: an ``ExportTraceServiceRequest`` (``{"resourceSpans": [...]}``)
encoded as OTLP/JSON, i.e. protobuf JSON with lowerCamelCase field names, enums as integers, 64-bit
integers as strings and trace/span ids as lowercase hex (not base64, which plain protobuf JSON
would give for bytes fields).  Files written by the Collector (``exporters: file: path: ...``) read
back the same way, so a timeline can be drawn from either.

    provider.add_span_processor(BatchSpanProcessor(OtlpJsonLinesExporter("spans.jsonl")))
    spans = read_spans("spans.jsonl")   # [{"name", "trace_id", "span_id", ...}, ...]
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import threading
from typing import Any, Iterator, Sequence

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from . import selflog

__all__ = ["OtlpJsonLinesExporter", "encode_json_line", "iter_requests", "read_spans"]

# Fields holding ids, per message, that OTLP/JSON writes as hex.
_SPAN_ID_FIELDS = ("traceId", "spanId", "parentSpanId")
_LINK_ID_FIELDS = ("traceId", "spanId")


def _b64_to_hex(value: Any) -> Any:
    if not isinstance(value, str) or not value:
        return value
    try:
        return base64.b64decode(value, validate=True).hex()
    except (binascii.Error, ValueError):
        return value


def _hex_ids(request: dict[str, Any]) -> dict[str, Any]:
    """protobuf JSON writes bytes as base64; OTLP/JSON wants lowercase hex ids (in place)."""
    for rs in request.get("resourceSpans", ()):
        for ss in rs.get("scopeSpans", ()):
            for span in ss.get("spans", ()):
                for key in _SPAN_ID_FIELDS:
                    if key in span:
                        span[key] = _b64_to_hex(span[key])
                for link in span.get("links", ()):
                    for key in _LINK_ID_FIELDS:
                        if key in link:
                            link[key] = _b64_to_hex(link[key])
    return request


def encode_json_line(spans: Sequence[ReadableSpan]) -> str:
    """One OTLP/JSON ``ExportTraceServiceRequest`` for `spans`, without a trailing newline."""
    from google.protobuf.json_format import MessageToJson
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    text = MessageToJson(encode_spans(spans), indent=None, use_integers_for_enums=True)
    return json.dumps(_hex_ids(json.loads(text)), separators=(",", ":"), ensure_ascii=False)


class OtlpJsonLinesExporter(SpanExporter):
    """Appends each exported batch to `path` as one line of OTLP/JSON.

    Thread-safe; an I/O or encoding failure is never raised into the caller: export() returns
    FAILURE, the failure is logged once (and once more when writing works again), and the spans
    of that batch are counted in ``failed``.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self.exported = 0
        self.failed = 0
        self._lock = threading.Lock()
        self._shut = False
        self._failing = False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if not spans:
            return SpanExportResult.SUCCESS
        with self._lock:
            if self._shut:
                self.failed += len(spans)
                return SpanExportResult.FAILURE
            try:
                line = encode_json_line(spans) + "\n"
                folder = os.path.dirname(self.path)
                if folder:
                    os.makedirs(folder, exist_ok=True)
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(line)
            except Exception as exc:  # noqa: BLE001 - never into the BatchSpanProcessor thread
                self.failed += len(spans)
                if not self._failing:
                    self._failing = True
                    selflog.report(
                        "otlp-json:" + self.path,
                        "fastdeploy_otel: writing spans to %s failed (%s: %s); spans are dropped and counted",
                        self.path, type(exc).__name__, exc,
                    )
                return SpanExportResult.FAILURE
            if self._failing:
                self._failing = False
                selflog.logger.log(logging.WARNING, "fastdeploy_otel: writing spans to %s works again", self.path)
            self.exported += len(spans)
            return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        with self._lock:
            self._shut = True

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True  # every export() has already written and closed its line


# ---- reading -------------------------------------------------------------------------------------
def _get(d: dict[str, Any], camel: str, snake: str, default: Any = None) -> Any:
    v = d.get(camel)
    if v is None:
        v = d.get(snake, default)
    return v


def _id(value: Any, nbytes: int) -> str:
    """A hex id from OTLP/JSON (hex) or from plain protobuf JSON (base64); "" when absent."""
    if not value or not isinstance(value, str):
        return ""
    v = value.strip()
    if len(v) == 2 * nbytes:
        try:
            int(v, 16)
            return v.lower()
        except ValueError:
            pass
    try:
        raw = base64.b64decode(v, validate=True)
    except (binascii.Error, ValueError):
        return v.lower()
    return raw.hex() if len(raw) == nbytes else v.lower()


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def _any_value(v: Any) -> Any:
    if not isinstance(v, dict) or not v:
        return None
    for key in ("stringValue", "string_value"):
        if key in v:
            return v[key]
    for key in ("boolValue", "bool_value"):
        if key in v:
            return bool(v[key])
    for key in ("intValue", "int_value"):
        if key in v:
            return _int(v[key])
    for key in ("doubleValue", "double_value"):
        if key in v:
            try:
                return float(v[key])
            except (TypeError, ValueError):
                return v[key]
    arr = _get(v, "arrayValue", "array_value")
    if arr is not None:
        return [_any_value(x) for x in arr.get("values", ())]
    kv = _get(v, "kvlistValue", "kvlist_value")
    if kv is not None:
        return _attrs(kv.get("values", ()))
    b = _get(v, "bytesValue", "bytes_value")
    if b is not None:
        return b
    return None


def _attrs(kvs: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in kvs or ():
        if isinstance(kv, dict) and "key" in kv:
            out[kv["key"]] = _any_value(kv.get("value"))
    return out


_STATUS_NAMES = {"STATUS_CODE_UNSET": 0, "STATUS_CODE_OK": 1, "STATUS_CODE_ERROR": 2}
_KIND_NAMES = {
    "SPAN_KIND_UNSPECIFIED": 0, "SPAN_KIND_INTERNAL": 1, "SPAN_KIND_SERVER": 2,
    "SPAN_KIND_CLIENT": 3, "SPAN_KIND_PRODUCER": 4, "SPAN_KIND_CONSUMER": 5,
}


def _enum(value: Any, names: dict[str, int]) -> int:
    """OTLP/JSON enums are integers; plain protobuf JSON may give the value's name."""
    if isinstance(value, str) and value in names:
        return names[value]
    return _int(value)


def _flatten(request: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for rs in _get(request, "resourceSpans", "resource_spans", ()) or ():
        resource = _attrs((rs.get("resource") or {}).get("attributes"))
        for ss in _get(rs, "scopeSpans", "scope_spans", ()) or ():
            scope = (ss.get("scope") or {}).get("name", "")
            for s in ss.get("spans", ()) or ():
                status = s.get("status") or {}
                yield {
                    "name": s.get("name", ""),
                    "trace_id": _id(_get(s, "traceId", "trace_id"), 16),
                    "span_id": _id(_get(s, "spanId", "span_id"), 8),
                    "parent_span_id": _id(_get(s, "parentSpanId", "parent_span_id"), 8),
                    "start_ns": _int(_get(s, "startTimeUnixNano", "start_time_unix_nano")),
                    "end_ns": _int(_get(s, "endTimeUnixNano", "end_time_unix_nano")),
                    "kind": _enum(s.get("kind"), _KIND_NAMES),
                    "attributes": _attrs(s.get("attributes")),
                    "events": [
                        {
                            "name": e.get("name", ""),
                            "time_ns": _int(_get(e, "timeUnixNano", "time_unix_nano")),
                            "attributes": _attrs(e.get("attributes")),
                        }
                        for e in s.get("events", ()) or ()
                    ],
                    "status_code": _enum(status.get("code"), _STATUS_NAMES),
                    "status_message": status.get("message", ""),
                    "resource": resource,
                    "scope": scope,
                }


def iter_requests(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """The parsed ``ExportTraceServiceRequest`` objects of an OTLP/JSON lines file.

    A line that does not parse (typically the last one, cut short by a crash or a writer still
    busy) is skipped.
    """
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict):
                yield obj


def read_spans(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every span in an OTLP/JSON lines file (ours or the Collector's ``file`` exporter's), flattened to
    dicts: name, trace_id (32 hex), span_id (16 hex), parent_span_id ("" for a root), start_ns,
    end_ns, attributes, events ([{name, time_ns, attributes}]), status_code (0 unset, 1 ok, 2 error),
    status_message, resource (plus kind and scope)."""
    spans: list[dict[str, Any]] = []
    for request in iter_requests(path):
        spans.extend(_flatten(request))
    return spans
