"""OTLP protobuf for WireSpans, written by hand: the export process's encoder.

Why: the SDK's encoder builds a protobuf object per span, attribute and value from Python, about
37 µs a span here, the largest single cost of tracing.  Writing the wire format directly, with the
bytes of each (key, value) attribute pair cached (stage names, models and users repeat from span to
span), costs about 5 µs.  The bytes parse to exactly what the SDK's ``encode_spans`` makes for the
same spans (tests/test_otlp_proto.py compares them); ``FD_TRACE_EXPORT_ENCODER=sdk`` switches back.

The OTLP exporters still do the sending (retries, TLS, headers, compression): ``install`` lets an
exporter instance take an ``EncodedBatch`` in place of a list of ReadableSpans.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

_fixed64 = struct.Struct("<Q").pack
_double = struct.Struct("<d").pack
_fixed32 = struct.Struct("<I").pack
_MAX_CACHED = 1 << 16  # attribute pairs kept encoded; cleared when full (request ids never repeat)
_INT64 = (-(1 << 63), (1 << 63) - 1)
# Span flags as the SDK sets them: the parent's is_remote is known (0x100), and set (0x200).
_HAS_IS_REMOTE, _IS_REMOTE = 0x100, 0x200


def _varint(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _field(field: int, payload: bytes) -> bytes:
    """A length-delimited field: a string, bytes or an embedded message."""
    return _key(field, 2) + _varint(len(payload)) + payload


def _text(value: str) -> bytes:
    return value.encode("utf-8", "replace")


def _any_value(v: Any) -> bytes:
    """An AnyValue message, as the SDK's _encode_value maps Python values."""
    if v is None:
        return b""
    t = type(v)
    if t is bool:
        return b"\x10\x01" if v else b"\x10\x00"
    if t is str:
        return _field(1, _text(v))
    if t is int:
        if _INT64[0] <= v <= _INT64[1]:
            return b"\x18" + _varint(v & 0xFFFFFFFFFFFFFFFF)
        return _field(1, _text(str(v)))  # out of int64 range: as text rather than lose the batch
    if t is float:
        return b"!" + _double(v)
    if isinstance(v, bytes):
        return _field(7, v)
    if isinstance(v, Mapping):
        return _field(6, b"".join(_field(1, _key_value(str(k), x)) for k, x in v.items()))
    if isinstance(v, Sequence):
        return _field(5, b"".join(_field(1, _any_value(x)) for x in v))
    return _field(1, _text(str(v)))


def _key_value(key: str, value: Any) -> bytes:
    return _field(1, _text(key)) + _field(2, _any_value(value))


class EncodedSpan(NamedTuple):
    """One span's Span message, and the instrumentation scope it is grouped under."""

    scope: tuple[str, str | None]
    data: bytes


class EncodedBatch(list):
    """The EncodedSpans of one export, with the ExportTraceServiceRequest they make (``payload``);
    ``len()`` is the span count, as the exporters' metrics expect."""

    payload: bytes = b""


class Encoder:
    """WireSpans to OTLP protobuf, with one resource (the serving process's)."""

    def __init__(self, resource_attributes: Mapping[str, Any], resource_schema_url: str | None) -> None:
        self._pairs: dict[tuple[str, type, Any], bytes] = {}
        resource = _field(1, self._attributes(1, resource_attributes))
        self._resource = resource + (_field(3, _text(resource_schema_url)) if resource_schema_url else b"")
        self._scopes: dict[tuple[str, str | None], bytes] = {}

    def _attributes(self, field: int, attributes: Mapping[str, Any]) -> bytes:
        """Repeated KeyValue `field`; the bytes of hashable pairs are cached."""
        pairs = self._pairs
        out = []
        for k, v in attributes.items():
            try:
                key = (k, type(v), v)
                data = pairs.get(key)
            except TypeError:  # a list: not hashable, not cached
                key, data = None, None
            if data is None:
                data = _field(field, _key_value(k, v))
                if key is not None:
                    if len(pairs) >= _MAX_CACHED:
                        pairs.clear()
                    pairs[key] = data
            out.append(data)
        return b"".join(out)

    def span(self, w: Any) -> EncodedSpan:
        """One WireSpan (``_export_process.WireSpan``) as a Span message."""
        parts = [b"\n\x10", w.trace_id.to_bytes(16, "big"), b"\x12\x08", w.span_id.to_bytes(8, "big")]
        if w.trace_state:
            parts.append(_field(3, _text(w.trace_state)))
        if w.parent_id:
            parts += (b'"\x08', w.parent_id.to_bytes(8, "big"))
        parts += (
            _field(5, _text(w.name)),
            b"0" + _varint(w.kind + 1),  # OTLP's SpanKind is the SDK's plus one (0 is UNSPECIFIED)
            b"9" + _fixed64(w.start_ns),
            b"A" + _fixed64(w.end_ns),
            self._attributes(9, w.attributes),
        )
        for name, ts, attrs in w.events:
            parts.append(_field(11, b"\t" + _fixed64(ts) + _field(2, _text(name)) + self._attributes(3, attrs)))
        for trace_id, span_id, attrs in w.links:
            link = b"\n\x10" + trace_id.to_bytes(16, "big") + b"\x12\x08" + span_id.to_bytes(8, "big")
            parts.append(_field(13, link + self._attributes(4, attrs) + b"5" + _fixed32(_HAS_IS_REMOTE | _IS_REMOTE)))
        status = (_field(2, _text(w.description)) if w.description else b"") + (
            b"\x18" + _varint(w.status) if w.status else b""
        )
        parts.append(_field(15, status))
        flags = _HAS_IS_REMOTE | (_IS_REMOTE if w.parent_id and w.parent_remote else 0)
        parts.append(b"\x85\x01" + _fixed32(flags))
        return EncodedSpan(w.scope, b"".join(parts))

    def request(self, spans: Sequence[EncodedSpan]) -> bytes:
        """An ExportTraceServiceRequest: one ResourceSpans, a ScopeSpans per scope in order of first use."""
        by_scope: dict[tuple[str, str | None], list[bytes]] = {}
        for s in spans:
            group = by_scope.get(s.scope)
            if group is None:
                group = by_scope[s.scope] = []
            group.append(_field(2, s.data))
        scope_spans = []
        for scope, group in by_scope.items():
            head = self._scopes.get(scope)
            if head is None:
                name, version = scope
                head = self._scopes[scope] = _field(
                    1, (_field(1, _text(name)) if name else b"") + (_field(2, _text(version)) if version else b"")
                )
            scope_spans.append(_field(2, head + b"".join(group)))
        return _field(1, self._resource + b"".join(scope_spans))


def install(exporter: Any) -> bool:
    """Let this exporter instance take an EncodedBatch; False if its kind is not known here (the
    export process then gives it ReadableSpans).  Only ever done in the export process."""
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
    from opentelemetry.exporter.otlp.proto.http import trace_exporter as http_module
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    if isinstance(exporter, GrpcExporter) and hasattr(exporter, "_translate_data"):
        translate = exporter._translate_data

        def translate_encoded(data: Any) -> Any:
            if isinstance(data, EncodedBatch):
                return ExportTraceServiceRequest.FromString(data.payload)
            return translate(data)

        exporter._translate_data = translate_encoded  # type: ignore[method-assign]
        return True
    if isinstance(exporter, http_module.OTLPSpanExporter) and hasattr(http_module, "encode_spans"):
        encode = http_module.encode_spans
        if getattr(encode, "_fastdeploy_otel", False):
            return True

        class _Encoded:
            def __init__(self, payload: bytes) -> None:
                self.payload = payload

            def SerializePartialToString(self) -> bytes:  # noqa: N802 - the protobuf method name
                return self.payload

            SerializeToString = SerializePartialToString  # noqa: N815

        def encode_spans(spans: Any) -> Any:
            return _Encoded(spans.payload) if isinstance(spans, EncodedBatch) else encode(spans)

        encode_spans._fastdeploy_otel = True  # type: ignore[attr-defined]
        http_module.encode_spans = encode_spans  # type: ignore[assignment]
        return True
    return False
