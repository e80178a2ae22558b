"""fdt.start_server_span: a SERVER span recorded through the pipeline, exported to a real receiver."""

from __future__ import annotations

import pytest
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Status, StatusCode

import fastdeploy_otel as fdt
from fastdeploy_otel.events import LoggingEventName as E
from fastdeploy_otel.span_plan import REQUEST_SPAN_NAME

CALLER_TRACE, CALLER_SPAN = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
SPAN_KIND_SERVER = 2


def _caller(flags: str = "01", state: str = "") -> otel_context.Context:
    headers = {"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-{flags}"}
    if state:
        headers["tracestate"] = state
    return propagate.extract(headers)


def _serve(rid: str, parent: otel_context.Context | None, fail: bool = False) -> trace.Span:
    """What the example server's middleware does around one request."""
    span = fdt.start_server_span("POST /v1/completions", context=parent, attributes={"http.request.method": "POST"})
    token = otel_context.attach(trace.set_span_in_context(span, parent))
    try:
        fdt.trace_print(E.PREPROCESSING_START, rid, "u")
        fdt.trace_print(E.PREPROCESSING_END, rid, "u")
        fdt.finish_request(rid)
        span.add_event("first_chunk", {"n": 1})
        if fail:
            try:
                raise RuntimeError("engine gone")
            except RuntimeError as exc:
                span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, "engine gone"))
        span.set_attributes({"http.route": "/v1/completions", "http.response.status_code": 500 if fail else 200})
        span.end()
        span.set_attribute("after.end", 1)  # ignored: the span has ended
        span.end()  # once only
    finally:
        otel_context.detach(token)
    return span


@pytest.mark.parametrize("export_process", [True, False])
def test_server_span_is_the_parent_of_the_request_and_child_of_the_caller(traced, receiver, export_process):
    traced(export_process=export_process)
    span = _serve("srv-1", _caller(state="vendor=1"), fail=True)
    assert span.get_span_context().trace_id == int(CALLER_TRACE, 16)
    fdt.flush()
    spans = receiver.store.wait_for(lambda s: {x.name for x in s} >= {"POST /v1/completions", REQUEST_SPAN_NAME})
    (http,) = [s for s in spans if s.name == "POST /v1/completions"]
    (request,) = [s for s in spans if s.name == REQUEST_SPAN_NAME]
    assert http.trace_id == CALLER_TRACE and http.parent_span_id == CALLER_SPAN and http.kind == SPAN_KIND_SERVER
    assert request.parent_span_id == http.span_id  # the request's spans hang under it
    assert http.attributes == {
        "http.request.method": "POST",
        "http.route": "/v1/completions",
        "http.response.status_code": 500,
    }
    assert http.is_error and http.status_message == "engine gone"
    assert [e["name"] for e in http.events] == ["first_chunk", "exception"]
    exc = http.events[1]["attributes"]
    assert exc["exception.type"] == "RuntimeError"  # builtins unqualified, others module-qualified and exc["exception.message"] == "engine gone"
    assert "Traceback (most recent call last)" in exc["exception.stacktrace"]
    assert http.start_ns <= request.start_ns and request.end_ns <= http.end_ns
    assert http.scope == "fastdeploy_otel"
    assert len([s for s in receiver.store.spans() if s.name == "POST /v1/completions"]) == 1  # ended once


def test_server_span_without_a_caller_starts_a_trace(traced, receiver):
    traced()
    span = _serve("srv-root", None)
    fdt.flush()
    ctx = span.get_span_context()
    spans = receiver.store.wait_for(lambda s: any(x.name == "POST /v1/completions" for x in s))
    (http,) = [s for s in spans if s.name == "POST /v1/completions"]
    assert http.parent_span_id == "" and http.trace_id == f"{ctx.trace_id:032x}" and not http.is_error


def test_unsampled_caller_gives_a_non_recording_span_and_exports_nothing(traced, receiver):
    traced()
    span = _serve("srv-unsampled", _caller(flags="00"))
    assert not span.is_recording() and not span.get_span_context().trace_flags.sampled
    assert span.get_span_context().trace_id == int(CALLER_TRACE, 16)  # the trace still continues downstream
    fdt.flush()
    assert fdt.stats()["spans_exported"] == 0


def test_without_otlp_export_the_callers_span_is_returned(traced):
    traced(mode="local")
    parent = _caller()
    span = fdt.start_server_span("GET /x", context=parent)
    assert not span.is_recording() and span.get_span_context().span_id == int(CALLER_SPAN, 16)
    assert not fdt.start_server_span("GET /x").get_span_context().is_valid


def test_status_rules_and_bad_input_are_those_of_the_sdk(traced, receiver):
    traced()
    span = fdt.start_server_span("GET /status")
    span.set_status(StatusCode.ERROR, "broken")
    span.set_status(StatusCode.UNSET)  # ignored, as the SDK ignores it
    span.set_status(None)  # type: ignore[arg-type]  # not a status: ignored, and the span still exports
    span.set_attribute(("not", "a", "str"), 1)  # type: ignore[arg-type]
    span.add_link(None)  # type: ignore[arg-type]
    span.add_event("at-zero", timestamp=0)
    span.end()
    fdt.flush()
    spans = receiver.store.wait_for(lambda s: any(x.name == "GET /status" for x in s))
    (got,) = [s for s in spans if s.name == "GET /status"]
    assert got.is_error and got.status_message == "broken"
    assert got.events[0]["time_ns"] == 0


def test_without_a_context_the_current_span_is_the_parent(traced, receiver):
    traced()
    outer = fdt.start_server_span("outer")
    token = otel_context.attach(trace.set_span_in_context(outer))
    try:
        inner = fdt.start_server_span("inner")  # context=None: the current one, as the SDK reads it
    finally:
        otel_context.detach(token)
    inner.end()
    outer.end()
    assert inner.get_span_context().trace_id == outer.get_span_context().trace_id
    fdt.flush()
    spans = receiver.store.wait_for(lambda s: {x.name for x in s} >= {"outer", "inner"})
    (got,) = [s for s in spans if s.name == "inner"]
    assert got.parent_span_id == f"{outer.get_span_context().span_id:016x}"


def test_without_otlp_an_applications_span_is_not_handed_out_to_be_ended(traced):
    traced(mode="local")
    from opentelemetry.sdk.trace import TracerProvider

    app_span = TracerProvider().get_tracer("app").start_span("app")
    span = fdt.start_server_span("GET /x", context=trace.set_span_in_context(app_span))
    span.update_name("renamed")
    span.end()
    assert app_span.is_recording() and app_span.name == "app"
    assert span.get_span_context() == app_span.get_span_context()
