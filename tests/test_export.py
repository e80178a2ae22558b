"""The OTLP side: attaching to an application's provider."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import fastdeploy_otel as fdt
from fastdeploy_otel.events import LoggingEventName as E


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


def test_the_default_samplers_shortcut_decides_as_the_sdk_sampler(tmp_path):
    """parentbased_always_on is decided from the parent's flag without the SDK; the same decisions."""
    from opentelemetry import trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    from fastdeploy_otel import api
    from fastdeploy_otel._export import make_sampler

    fdt.configure(env={}, mode="all", exporter="none", log_dir=str(tmp_path))
    try:
        sink = api._runtime.sink
        assert sink._by_parent
        sdk = make_sampler(sink.settings)
        contexts = [None]
        for remote in (False, True):
            for flags in (TraceFlags.SAMPLED, TraceFlags.DEFAULT):
                parent = SpanContext(0xAB, 0xCD, is_remote=remote, trace_flags=TraceFlags(flags))
                contexts.append(trace.set_span_in_context(NonRecordingSpan(parent)))
        contexts.append(trace.set_span_in_context(NonRecordingSpan(SpanContext(0, 0, False))))  # invalid parent
        for ctx in contexts:
            expected = sdk.should_sample(ctx, 0x1234, "x").decision.is_sampled()
            assert sink.should_sample(ctx, 0x1234) is expected
        assert [sink.should_sample(c, 1) for c in contexts] == [True, True, False, True, False, True]
    finally:
        fdt.shutdown()
