"""The hand-written OTLP protobuf encoder (``_otlp_proto``) against the SDK's own encoder: for the same
spans, the requests must parse to equal messages."""

from __future__ import annotations

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from fastdeploy_otel._export import make_resource_from
from fastdeploy_otel._wire import Rebuilder, WireSpan
from fastdeploy_otel._limits import Limits
from fastdeploy_otel._otlp_proto import Encoder

RESOURCE = {"service.name": "fastdeploy", "host.name": "gpu-7", "process.pid": 4242, "fastdeploy.role": "engine"}
OURS = ("fastdeploy_otel", "0.3.0")
HTTP = ("minifd.http", None)


def wire(name, span_id, parent_id=0, **kw) -> WireSpan:
    base = dict(
        name=name, trace_id=0x0AF7651916CD43DD8448EB211C80319C, span_id=span_id, parent_id=parent_id,
        parent_remote=False, kind=0, start_ns=1_700_000_000_123_456_789, end_ns=1_700_000_000_223_456_789,
        attributes={}, events=[], links=(), status=0, description=None, scope=OURS,
    )
    base.update(kw)
    return WireSpan(**base)


SPANS = [
    wire("POST /v1/completions", 0x1111, 0xB7AD6B7169203331, parent_remote=True, kind=1, scope=HTTP,
         trace_state="congo=t61rcWkgMzE,rojo=00f067aa0ba902b7",
         attributes={"http.request.method": "POST", "http.response.status_code": 500, "url.scheme": "http"},
         status=2),
    wire("fastdeploy.request", 0x2222, 0x1111,
         attributes={"fastdeploy.request_id": "chatcmpl-1_0", "gen_ai.usage.input_tokens": 48, "enduser.id": "ünïcødé ✓",
                     "fastdeploy.finish_reasons": ["stop", "length"], "ratio": 0.25, "flag": True, "neg": -7,
                     "ints": (1, 2, 3), "empty": ""},
         status=2, description="unterminated: PREFILL"),
    wire("SCHEDULE", 0x3333, 0x2222,
         events=[("CACHE_HIT", 1_700_000_000_150_000_000, {"matched_tokens": 16, "source_tier": "gpu"}),
                 ("CACHE_MISS", 1_700_000_000_160_000_000, {}),
                 ("CACHE_SWAP_IN", 1_700_000_000_170_000_000, {"swapped_in_bytes": 8192, "big": 2**40})],
         attributes={"fastdeploy.stage": "SCHEDULE"}),
    wire("PREPROCESSING", 0x4444, 0x2222, parent_remote=True, attributes={"fastdeploy.stage": "PREPROCESSING"}),
    wire("linked", 0x5555, 0, links=[(0x1234, 0x5678, {"why": "prev"})], scope=HTTP),
    wire("SCHEDULE", 0x6666, 0x2222, attributes={"fastdeploy.stage": "SCHEDULE"}),  # cached pairs reused
]


def test_requests_parse_to_what_the_sdk_encoder_makes():
    ours = Encoder(RESOURCE, None)
    payload = ours.request([ours.span(w) for w in SPANS])
    rebuild = Rebuilder(make_resource_from(RESOURCE, None), Limits())
    theirs = encode_spans([rebuild(w) for w in SPANS])
    mine = ExportTraceServiceRequest.FromString(payload)
    assert mine == theirs, (mine, theirs)
    # and the message is well-formed protobuf for any reader: the same bytes once re-serialised
    assert ExportTraceServiceRequest.FromString(mine.SerializeToString()) == theirs


def test_a_resource_schema_url_and_a_value_out_of_int64_range():
    ours = Encoder(RESOURCE, "https://opentelemetry.io/schemas/1.26.0")
    w = wire("odd", 0x7777, attributes={"huge": 2**70, "none": None})
    request = ExportTraceServiceRequest.FromString(ours.request([ours.span(w)]))
    rs = request.resource_spans[0]
    assert rs.schema_url == "https://opentelemetry.io/schemas/1.26.0"
    attrs = {kv.key: kv.value for kv in rs.scope_spans[0].spans[0].attributes}
    assert attrs["huge"].string_value == str(2**70)  # as text, rather than the SDK's failing batch
    assert attrs["none"].WhichOneof("value") is None
