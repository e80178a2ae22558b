"""OTLP/JSON lines: a span exporter that writes what the OTel Collector's ``file`` exporter writes
(``FD_TRACE_JSON_FILE``).  ``fastdeploy_otel.tools.spans.read_spans`` reads such files back.

Each exported batch becomes ONE line: an ``ExportTraceServiceRequest`` (``{"resourceSpans": [...]}``)
encoded as OTLP/JSON, i.e. protobuf JSON with lowerCamelCase field names, enums as integers, 64-bit
integers as strings and trace/span ids as lowercase hex (not base64, which plain protobuf JSON
would give for bytes fields).  Files written by the Collector (``exporters: file: path: ...``) read
back the same way, so a timeline can be drawn from either.

    provider.add_span_processor(BatchSpanProcessor(OtlpJsonLinesExporter("spans.jsonl")))
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import threading
from collections.abc import Sequence
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from ._selflog import get_logger

logger = get_logger(__name__)

__all__ = ["OtlpJsonLinesExporter", "encode_json_line"]

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
                    logger.warning(
                        "writing spans to %s failed (%s: %s); spans are dropped and counted",
                        self.path,
                        type(exc).__name__,
                        exc,
                    )
                return SpanExportResult.FAILURE
            if self._failing:
                self._failing = False
                logger.log(logging.WARNING, "writing spans to %s works again", self.path)
            self.exported += len(spans)
            return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        with self._lock:
            self._shut = True

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True  # every export() has already written and closed its line
