"""Crossing a real OS process boundary, OTLP/HTTP export, and configuration."""

from __future__ import annotations

import logging
import multiprocessing
import subprocess
import sys
import textwrap

import pytest

import fastdeploy_otel as fdt
from fastdeploy_otel import attributes as A
from fastdeploy_otel.config import ConfigError, load_settings
from fastdeploy_otel.events import LoggingEventName as E
from fastdeploy_otel.lifecycles import MIXED
from fastdeploy_otel.span_plan import REQUEST_SPAN_NAME

from .conftest import read_mirror


def _engine(endpoint: str, log_dir: str, carrier: dict, out, rid: str = "xp_0", role: str = "mixed") -> None:
    """Runs in a spawned process: an engine instance's side of one request."""
    from fastdeploy_otel import lifecycles

    events = {"mixed": MIXED[1:-1], "prefill": lifecycles.PD_PREFILL[1:], "decode": lifecycles.PD_DECODE[:-1]}[role]
    fdt.configure(mode="all", endpoint=endpoint, log_dir=log_dir, strict=True, env={})
    fdt.extract(rid, carrier)
    for event, attrs in events:
        fdt.trace_print(event, rid, "carol", **attrs)
    back = fdt.inject(rid)
    fdt.finish_request(rid)
    fdt.shutdown()
    out.put(back)


def _spawn(*args) -> dict:
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    child = ctx.Process(target=_engine, args=(*args[:3], out, *args[3:]))
    child.start()
    back = out.get(timeout=60)
    child.join(timeout=30)
    assert child.exitcode == 0
    return back


def _end_on_api_side(rid: str, back: dict, receiver, at_least: int):
    """The API server's end of a request: POSTPROCESSING comes back in the carrier and ends here."""
    fdt.extract(rid, back)
    fdt.trace_print(E.POSTPROCESSING_END, rid, "carol")
    fdt.finish_request(rid)
    fdt.flush()
    spans = receiver.store.wait_for(lambda s: any(x.name == REQUEST_SPAN_NAME for x in s) and len(s) >= at_least)
    root = [s for s in spans if s.name == REQUEST_SPAN_NAME][0]
    assert {s.trace_id for s in spans} == {root.trace_id}  # one trace across every process
    return spans, root


def test_stages_cross_a_real_process_boundary_as_one_span(traced, receiver, tmp_path):
    traced()
    log_dir = str(tmp_path / "log")
    fdt.trace_print(E.PREPROCESSING_START, "xp", "carol")
    back = _spawn(receiver.grpc_endpoint, str(tmp_path / "engine-log"), fdt.inject("xp"))
    spans, root = _end_on_api_side("xp", back, receiver, at_least=10)
    pids = {s.name: s.resource["process.pid"] for s in spans}
    assert pids[REQUEST_SPAN_NAME] != pids["SCHEDULE"]  # really two processes
    (pre,) = [s for s in spans if s.name == "PREPROCESSING"]
    (post,) = [s for s in spans if s.name == "POSTPROCESSING"]
    assert pre.parent_span_id == root.span_id and post.parent_span_id == root.span_id
    # PREPROCESSING: started here, ended (and exported) by the engine process; POSTPROCESSING the reverse.
    assert pre.resource["process.pid"] == pids["SCHEDULE"]
    assert post.resource["process.pid"] == pids[REQUEST_SPAN_NAME]
    (write,) = [s for s in spans if s.name == "WRITE_CACHE_TO_STORAGE"]
    assert write.parent_span_id == post.span_id  # a child made in the engine, under the handed-over stage
    here = read_mirror(log_dir)
    there = read_mirror(str(tmp_path / "engine-log"))
    pre_lines = [l for l in here + there if l["stage"] == "PREPROCESSING"]
    assert [l["event"] for l in pre_lines] == ["PREPROCESSING_START", "PREPROCESSING_END"]
    assert {l["span_id"] for l in pre_lines} == {pre.span_id}
    assert {l["trace_id"] for l in here + there} == {root.trace_id}
    assert pre.start_ns // 1_000_000 == int(pre_lines[0]["timestamp"])


def test_pd_prefill_and_decode_instances_in_real_processes_share_one_trace(traced, receiver, tmp_path):
    traced()
    fdt.trace_print(E.PREPROCESSING_START, "pd", "carol")
    _spawn(receiver.grpc_endpoint, str(tmp_path / "p"), fdt.inject("pd"), "pd_p", "prefill")
    back = _spawn(receiver.grpc_endpoint, str(tmp_path / "d"), fdt.inject("pd"), "pd_d", "decode")
    spans, root = _end_on_api_side("pd", back, receiver, at_least=15)
    pid = {rid: {s.resource["process.pid"] for s in spans if s.attributes.get(A.REQUEST_ID) == rid}
           for rid in ("pd", "pd_p", "pd_d")}
    assert all(len(p) == 1 for p in pid.values()) and len(set().union(*pid.values())) == 3  # three processes
    p = {s.name: s for s in spans if s.attributes.get(A.REQUEST_ID) == "pd_p"}
    d = {s.name: s for s in spans if s.attributes.get(A.REQUEST_ID) == "pd_d"}
    assert p["PREPROCESSING"].parent_span_id == root.span_id  # started by the API side, ended on P
    assert p["ASK_DECODE_RESOURCE"].parent_span_id == p["SCHEDULE"].span_id
    assert p["CHECK_CACHE_TRANSFER"].parent_span_id == p["POSTPROCESSING"].span_id
    assert p["POSTPROCESSING"].resource["process.pid"] in pid["pd_p"]  # implicit: stays with P, not handed on
    assert "PREFILL" in p and "PREFILL" not in d
    assert len(spans) == 15
    assert d["DECODE_PROCESS_PREFILLED_REQUEST"].parent_span_id == d["DECODE"].span_id
    (post,) = [s for s in spans if s.name == "POSTPROCESSING" and s.resource["process.pid"] in pid["pd"]]
    assert post.parent_span_id == root.span_id and post.status_code == 0  # started on D, ended here


def test_http_continues_a_callers_traceparent(traced, receiver):
    traced(protocol="http/protobuf", endpoint=receiver.http_endpoint)
    caller_trace, caller_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    from opentelemetry import context

    ctx = TraceContextTextMapPropagator().extract({"traceparent": f"00-{caller_trace}-{caller_span}-01"})
    token = context.attach(ctx)
    try:
        fdt.trace_print(E.PREPROCESSING_START, "http-1", model="tiny")
    finally:
        context.detach(token)
    fdt.trace_print(E.PREPROCESSING_END, "http-1")
    fdt.finish_request("http-1")
    fdt.flush()
    spans = receiver.store.wait_for(lambda s: any(x.name == REQUEST_SPAN_NAME for x in s))
    root = [s for s in spans if s.name == REQUEST_SPAN_NAME][0]
    assert root.trace_id == caller_trace and root.parent_span_id == caller_span
    assert root.attributes[A.GEN_AI_REQUEST_MODEL] == "tiny"


def test_malformed_carrier_degrades_and_is_counted(traced, receiver, caplog):
    caplog.set_level(logging.WARNING, logger="fastdeploy_otel")
    traced()
    for bad in ({"traceparent": "00-zz-11-01"}, {"traceparent": "00-" + "0" * 32 + "-" + "1" * 16 + "-01"}, "nope",
                {"traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01", "fastdeploy-stages": "[{\"n\": \"X\"}]"}):
        fdt.extract("bad", bad)
    fdt.trace_print(E.PREPROCESSING_END, "bad")
    fdt.finish_request("bad")
    fdt.flush()
    assert fdt.stats()["bad_carriers"] == 4
    assert len([r for r in caplog.records if "bad trace carrier" in r.getMessage()]) == 1
    spans = receiver.store.wait_for(lambda s: any(x.name == "PREPROCESSING" for x in s))
    assert spans  # the request is still traced


def test_bad_env_value_is_one_clear_message_naming_the_variable(caplog):
    caplog.set_level(logging.ERROR, logger="fastdeploy_otel")
    env = {"FD_TRACE": "verbose", "OTEL_TRACES_SAMPLER_ARG": "2", "OTEL_TRACES_SAMPLER": "traceidratio"}
    settings, errors = load_settings(env)
    assert settings.mode == "local" and settings.sampler_arg == 1.0  # defaults kept
    text = " | ".join(map(str, errors))
    assert "FD_TRACE='verbose'" in text and "off, local, otel, all" in text
    assert "OTEL_TRACES_SAMPLER_ARG" in text
    with pytest.raises(ConfigError, match="FD_TRACE"):
        fdt.configure(env={"FD_TRACE": "verbose"}, strict_config=True)
    fdt.configure(env={"FD_TRACE": "verbose", "FD_LOG_DIR": "/tmp/fdotel-badenv"})
    fdt.shutdown()
    msgs = [r.getMessage() for r in caplog.records]
    assert sum("FD_TRACE" in m for m in msgs) == 1
    assert not any("Traceback" in m for m in msgs)


def test_headers_are_never_logged_or_printed(caplog):
    caplog.set_level(logging.DEBUG)
    secret = "Bearer s3cr3t-token"
    settings, errors = load_settings({"OTEL_EXPORTER_OTLP_HEADERS": f"authorization={secret}", "FD_TRACE": "otel"})
    assert settings.headers == {"authorization": secret}
    assert secret not in repr(settings)
    _, errors = load_settings({"OTEL_EXPORTER_OTLP_HEADERS": f"{secret}"})
    assert errors and secret not in str(errors[0]) and "OTEL_EXPORTER_OTLP_HEADERS" in str(errors[0])
    fdt.configure(env={"OTEL_EXPORTER_OTLP_HEADERS": f"authorization={secret}", "FD_TRACE": "otel",
                       "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "OTEL_EXPORTER_OTLP_TIMEOUT": "200",
                       "FD_LOG_DIR": "/tmp/fdotel-headers"})
    fdt.trace_print(E.PREPROCESSING_START, "h")
    fdt.finish_request("h")
    fdt.flush()
    fdt.shutdown()
    assert not any(secret in r.getMessage() for r in caplog.records)


def test_explicit_arguments_win_over_the_environment():
    settings, _ = load_settings({"FD_TRACE": "otel", "FD_LOG_DIR": "/env", "OTEL_SERVICE_NAME": "env-svc"},
                                mode="local", log_dir="/arg")
    assert (settings.mode, settings.log_dir, settings.service_name) == ("local", "/arg", "env-svc")
    settings, _ = load_settings({"FD_SERVICE_NAME": "fd-svc"})
    assert settings.service_name == "fd-svc"
    settings, _ = load_settings({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"})
    assert settings.mode == "all"  # an endpoint turns export on when FD_TRACE is unset
    settings, _ = load_settings({"OTEL_SDK_DISABLED": "true", "FD_TRACE": "all"})
    assert settings.mode == "local"
    settings, _ = load_settings({"FD_TRACE_JSON_FILE": "/tmp/spans.jsonl"})
    assert (settings.mode, settings.exporter) == ("all", "none")  # spans to the file; no dialling localhost


def test_attaches_to_an_existing_tracer_provider(receiver, tmp_path):
    """Under `opentelemetry-instrument` the app owns the provider: spans go through its pipeline."""
    script = textwrap.dedent(f"""
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
        import fastdeploy_otel as fdt
        mem = InMemorySpanExporter()
        app = TracerProvider()
        app.add_span_processor(SimpleSpanProcessor(mem))
        trace.set_tracer_provider(app)
        fdt.configure(mode="all", log_dir={str(tmp_path)!r}, env={{}}, endpoint="http://127.0.0.1:9")
        assert fdt.get_tracer_provider() is app
        fdt.trace_print("PREPROCESSING_START", "a")
        fdt.trace_print("PREPROCESSING_END", "a")
        fdt.finish_request("a")
        fdt.shutdown()
        names = sorted(s.name for s in mem.get_finished_spans())
        assert names == ["PREPROCESSING", "fastdeploy.request"], names
        assert app.id_generator.__class__.__name__ == "RandomIdGenerator"
        print("OK")
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr


def test_carriers_that_parse_but_cannot_be_exported_are_rejected(traced, receiver):
    traced()
    base = {"traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01"}
    bad_stages = [
        '[{"n": "PREPROCESSING", "s": "0123456789abcdef", "t": 100000000000000000000}]',  # beyond fixed64
        '[{"n": "PREPROCESSING", "s": "0123456789abcdef0123", "t": 1795948377129000000}]',  # not 16 hex digits
        '[{"n": "PREPROCESSING", "s": "0123456789abcdef", "t": 1795948377129000000, "a": {"k": 10000000000000000000000}}]',
    ]
    for i, stages in enumerate(bad_stages):
        fdt.extract(f"c-{i}", {**base, "fastdeploy-stages": stages})
    fdt.trace_print(E.PREPROCESSING_START, "good")
    fdt.trace_print(E.PREPROCESSING_END, "good")
    fdt.finish_request("good")
    fdt.flush()
    spans = receiver.store.wait_for(lambda s: any(x.attributes.get(A.REQUEST_ID) == "good" for x in s))
    assert fdt.stats()["bad_carriers"] == 2  # the third parses; its oversize int becomes a string
    assert fdt.stats()["spans_export_failed"] == 0 and spans


def test_malformed_carrier_under_an_http_span_keeps_the_http_parent(traced, receiver):
    from opentelemetry import context
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    traced()
    ctx = TraceContextTextMapPropagator().extract({"traceparent": f"00-{'c' * 32}-{'d' * 16}-01"})
    token = context.attach(ctx)
    try:
        fdt.extract("under-http", {"traceparent": "garbage"})
        fdt.trace_print(E.PREPROCESSING_END, "under-http")
        fdt.finish_request("under-http")
    finally:
        context.detach(token)
    fdt.flush()
    spans = receiver.store.wait_for(lambda s: any(x.name == REQUEST_SPAN_NAME for x in s))
    root = [s for s in spans if s.name == REQUEST_SPAN_NAME][0]
    assert root.trace_id == "c" * 32 and root.parent_span_id == "d" * 16


def test_otlp_headers_are_percent_decoded_as_the_spec_says():
    settings, errors = load_settings({"OTEL_EXPORTER_OTLP_HEADERS": "Authorization=Bearer%20s3cr3t,x-tenant=a%2Cb"})
    assert not errors and settings.headers == {"authorization": "Bearer s3cr3t", "x-tenant": "a,b"}


def test_otlp_http_endpoints_follow_the_spec():
    http = {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}
    base, _ = load_settings({**http, "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"})
    full, _ = load_settings({**http, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/custom"})
    grpc, _ = load_settings({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"})
    assert base.endpoint == "http://c:4318/v1/traces"  # the generic endpoint gets the signal path
    assert full.endpoint == "http://c:4318/custom"  # the signal-specific one is used as it is
    assert grpc.endpoint == "http://c:4317"
