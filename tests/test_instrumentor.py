"""FastDeployInstrumentor over the stand-in FastDeploy (tests/standin): real processes, a real OTLP receiver.

The stand-in reproduces FastDeploy's module paths, signatures and call order (see its docstring);
these tests run it unmodified under ``fastdeploy-otel run`` and ``opentelemetry-instrument``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from importlib.metadata import distribution
from pathlib import Path

import pytest

from fastdeploy_otel.mirror import parse_line
from fastdeploy_otel.package import _instruments_any
from fastdeploy_otel.span_plan import REQUEST_SPAN_NAME

ROOT = Path(__file__).resolve().parents[1]
STANDIN = str(ROOT / "tests" / "standin")
BIN = Path(sys.executable).parent
CALLER_TRACE, CALLER_SPAN = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
STAGES = {"PREPROCESSING", "SCHEDULE", "PREFILL", "DECODE", "POSTPROCESSING"}


def _env(tmp_path: Path, receiver, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "FD_"))}
    env.update(PYTHONPATH=STANDIN, FD_LOG_DIR=str(tmp_path / "log"), OTEL_EXPORTER_OTLP_ENDPOINT=receiver.grpc_endpoint,
               EXPORTER_OTLP_ENDPOINT=receiver.grpc_endpoint, FD_TRACE_FLUSH_INTERVAL_MS="50",
               OTEL_BSP_SCHEDULE_DELAY="100", OTEL_METRICS_EXPORTER="none", OTEL_LOGS_EXPORTER="none")
    env.update(extra)
    return env


def _serve(tmp_path: Path, receiver, launcher: list[str], *flags: str, **env: str) -> list[dict]:
    """Run the stand-in API server (and its engines) on two requests: a good one and a failing one."""
    requests = [{"request_id": "good", "prompt": "hello there", "headers": {"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"}},
                {"request_id": "bad", "prompt": "boom goes the vocabulary"}]
    (tmp_path / "in.json").write_text(json.dumps(requests))
    res = subprocess.run([*launcher, sys.executable, "-m", "fastdeploy.entrypoints.openai.api_server",
                          "--requests", str(tmp_path / "in.json"), "--out", str(tmp_path / "out.json"), *flags],
                         env=_env(tmp_path, receiver, **env), capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads((tmp_path / "out.json").read_text())


def _trace(receiver, trace_id: str, names: set[str]) -> list:
    spans = receiver.store.wait_for(lambda s: names <= {x.name for x in s if x.trace_id == trace_id}, timeout=30)
    return [s for s in spans if s.trace_id == trace_id]


def _check_traces(tmp_path: Path, receiver, pd: bool = False) -> None:
    good = _trace(receiver, CALLER_TRACE, STAGES | {REQUEST_SPAN_NAME})
    (root,) = [s for s in good if s.name == REQUEST_SPAN_NAME]
    assert root.parent_span_id == CALLER_SPAN  # the caller's traceparent is continued
    assert root.attributes["fastdeploy.request_id"] == "chatcmpl-good"
    for stage in STAGES:
        spans = [s for s in good if s.name == stage]
        assert spans and all(s.parent_span_id == root.span_id for s in spans), stage
    assert not any(s.is_error for s in good), [s.name for s in good if s.is_error]
    assert len(good) == len({s.span_id for s in good})
    # PREPROCESSING opened in the API server, ended in the engine; POSTPROCESSING the other way round.
    assert len([s for s in good if s.name in ("PREPROCESSING", "POSTPROCESSING")]) == (3 if pd else 2)
    if pd:
        assert {"ASK_DECODE_RESOURCE", "CHECK_CACHE_TRANSFER", "DECODE_PROCESS_PREALLOCATE_REQUEST"} <= {s.name for s in good}
    # FastDeploy's own root, thread and slice spans are not emitted beside ours.
    everything = receiver.store.spans()
    assert not [s.name for s in everything if "(host:" in s.name or " Req " in s.name or s.name == "FASTDEPLOY"]
    # The failing request: the engine's error, logged through FastDeploy's logger, is on its stage span.
    bad_roots = [s for s in everything if s.name == REQUEST_SPAN_NAME and s.attributes.get("fastdeploy.request_id") == "chatcmpl-bad"]
    assert len(bad_roots) == 1 and bad_roots[0].is_error
    bad = _trace(receiver, bad_roots[0].trace_id, {"PREFILL"})
    (prefill,) = [s for s in bad if s.name == "PREFILL"]
    assert prefill.is_error
    (exc,) = [e for e in prefill.events if e["name"] == "exception"]
    assert exc["attributes"]["exception.type"] == "IndexError" and "out of bounds" in exc["attributes"]["exception.message"]
    # trace.log: FastDeploy's flat layout, every line with real ids, naming FastDeploy's call sites.
    lines = [parse_line(line) for line in (tmp_path / "log" / "trace.log").read_text().splitlines()]
    assert lines and all(lines), "unparsable trace.log line"
    assert not [l for l in lines if l["trace_id"] in ("unknown", "0" * 32)]
    assert {l["trace_id"] for l in lines if "good" in l["request_id"]} == {CALLER_TRACE}
    assert {l["file"] for l in lines} >= {"engine_client.py", "common_engine.py", "token_processor.py", "serving_chat.py"}
    assert (tmp_path / "log" / "error.log").exists()


@pytest.mark.parametrize("launch", ["spawn", "subprocess"])
def test_fastdeploy_otel_run_traces_api_and_engine_processes_in_one_trace(tmp_path, receiver, launch):
    receiver.store.clear()
    out = _serve(tmp_path, receiver, [str(BIN / "fastdeploy-otel"), "run", "--"], "--launch", launch)
    assert out[0]["text"] and "out of bounds" in out[1]["error"]
    _check_traces(tmp_path, receiver)


def test_opentelemetry_instrument_traces_a_pd_pair(tmp_path, receiver):
    receiver.store.clear()
    _serve(tmp_path, receiver, [str(BIN / "opentelemetry-instrument")], "--pd", "--launch", "subprocess", FD_TRACE="all")
    _check_traces(tmp_path, receiver, pd=True)


def _python(code: str, tmp_path: Path, env: dict[str, str] | None = None, launcher: tuple[str, ...] = ()) -> str:
    res = subprocess.run([*launcher, sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                         timeout=60, cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr[-4000:]
    return res.stdout


def test_instrument_before_and_after_import_and_uninstrument_restores_every_binding(tmp_path):
    script = f"""
    import os, sys
    sys.path[:0] = [{STANDIN!r}]
    os.environ.update(FD_LOG_DIR={str(tmp_path / 'log')!r}, FD_TRACE="local")
    import fastdeploy_otel as fdt
    from fastdeploy_otel import _fd_takeover as fd_takeover
    from fastdeploy_otel.instrumentor import FastDeployInstrumentor
    order = sys.argv[1] if len(sys.argv) > 1 else ""
    if order == "after":
        from fastdeploy.entrypoints import engine_client   # binds print as trace_print, metrics.trace as tracing
        from fastdeploy.trace import trace_logger
        from fastdeploy.metrics import trace as tracing
        originals = (trace_logger.print, tracing.trace_req_start, engine_client.trace_print)
        assert fdt.settings() is None
    FastDeployInstrumentor().instrument()
    from fastdeploy.entrypoints import engine_client
    from fastdeploy.trace import trace_logger
    from fastdeploy.metrics import trace as tracing
    from fastdeploy.engine.request import Request
    assert trace_logger.print is fd_takeover.trace_print and engine_client.trace_print is fd_takeover.trace_print
    assert tracing.trace_req_start is fd_takeover.trace_req_start and tracing.trace_slice is fd_takeover.trace_slice_end
    assert fdt.settings() is not None and fdt.settings().mode == "local"
    sent = []
    client = engine_client.EngineClient(sent.append)
    tracing.trace_req_start("chatcmpl-x")
    client.add_requests({{"request_id": "chatcmpl-x_0", "prompt": "a b c"}})
    carrier = sent[0]["trace_carrier"]
    assert set(carrier) >= {{"root_span", "prev_span", "fastdeploy_otel"}}, carrier   # FastDeploy's keys stay
    info = tracing.get_trace_info_for_request("chatcmpl-x_0")
    assert carrier["root_span"]["traceparent"].split("-")[1] == info["trace_id"], (carrier, info)
    assert Request.from_dict.__func__.__wrapped__ is not None
    FastDeployInstrumentor().uninstrument()
    assert fdt.settings() is None
    assert trace_logger.print is not fd_takeover.trace_print and engine_client.trace_print is trace_logger.print
    assert tracing.trace_req_start is not fd_takeover.trace_req_start
    assert not hasattr(Request.from_dict.__func__, "__wrapped__")
    if order == "after":
        assert (trace_logger.print, tracing.trace_req_start, engine_client.trace_print) == originals
    text = open({str(tmp_path / 'log' / 'trace.log')!r}).read()
    print("lines", text.count("event=PREPROCESSING_START"), len(text.splitlines()) == text.count("[span_id="))  # ours only
    """
    for order in ("before", "after"):
        res = subprocess.run([sys.executable, "-c", textwrap.dedent(script), order], capture_output=True, text=True,
                             timeout=60, cwd=tmp_path, env={k: v for k, v in os.environ.items() if k != "FD_TRACE"})
        assert res.returncode == 0, (order, res.stderr[-4000:])
        assert "lines 1 True" in res.stdout, (order, res.stdout)
        shutil.rmtree(tmp_path / "log")


def test_nothing_at_all_in_a_process_without_fastdeploy(tmp_path):
    """Under `run`: without FastDeploy installed, or installed but never imported: no thread, no directory."""
    code = """
        import os, sys, threading
        from fastdeploy_otel.instrumentor import FastDeployInstrumentor
        import fastdeploy_otel as fdt
        print(FastDeployInstrumentor().is_instrumented_by_opentelemetry, threading.active_count(), fdt.settings(),
              os.path.exists(os.environ["FD_LOG_DIR"]), sorted(m for m in sys.modules if m.startswith("fastdeploy.")))
    """
    base = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "FD_"))}
    run = (str(BIN / "fastdeploy-otel"), "run", "--")
    absent = _python(code, tmp_path, dict(base, FD_LOG_DIR=str(tmp_path / "a"), PYTHONPATH=""), run)
    assert absent.split() == ["False", "1", "None", "False", "[]"], absent
    unused = _python(code, tmp_path, dict(base, FD_LOG_DIR=str(tmp_path / "b"), PYTHONPATH=STANDIN), run)
    assert unused.split() == ["True", "1", "None", "False", "[]"], unused
    assert list(tmp_path.iterdir()) == []


def test_run_defaults_fd_trace_keeps_an_explicit_one_and_chains_an_existing_sitecustomize(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "sitecustomize.py").write_text("import os\nos.environ['CHAINED'] = 'yes'\n")
    code = "import os; print(os.environ['FD_TRACE'], os.environ.get('CHAINED'))"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "FD_"))}
    run = (str(BIN / "fastdeploy-otel"), "run")
    assert _python(code, tmp_path, dict(base, PYTHONPATH=str(other)), run).split() == ["all", "yes"]
    assert _python(code, tmp_path, dict(base, PYTHONPATH=str(other), FD_TRACE="local"), run).split() == ["local", "yes"]


def test_the_distribution_declares_the_fastdeploy_distributions_it_instruments():
    declared = sorted(r.split(";")[0].replace(" ", "") for r in distribution("fastdeploy-otel").requires or []
                      if 'extra == "instruments-any"' in r)
    assert declared == sorted(x.replace(" ", "") for x in _instruments_any)


def test_instrument_honours_a_tracer_provider_and_uninstrument_flushes(tmp_path):
    out = _python(f"""
        import os, sys
        sys.path[:0] = [{STANDIN!r}]
        os.environ.update(FD_LOG_DIR={str(tmp_path / 'log')!r}, FD_TRACE="otel")
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
        from fastdeploy_otel.instrumentor import FastDeployInstrumentor
        mem = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(mem))
        FastDeployInstrumentor().instrument(tracer_provider=provider)
        from fastdeploy.entrypoints.engine_client import EngineClient
        from fastdeploy.metrics import trace as tracing
        from fastdeploy.trace.constants import LoggingEventName as E
        from fastdeploy.trace.trace_logger import print as trace_print
        tracing.trace_req_start("chatcmpl-p")
        EngineClient(lambda task: None).add_requests({{"request_id": "chatcmpl-p_0", "prompt": "x"}})
        trace_print(E.POSTPROCESSING_START, "chatcmpl-p", "")
        trace_print(E.POSTPROCESSING_END, "chatcmpl-p", "")
        tracing.trace_req_finish("chatcmpl-p")
        FastDeployInstrumentor().uninstrument()
        print(sorted(s.name for s in mem.get_finished_spans()))
    """, tmp_path, {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "FD_"))})
    assert "'POSTPROCESSING', 'fastdeploy.request'" in out, out


class _Unhashable:
    def __hash__(self) -> int:
        raise RuntimeError("no hash")


def test_a_failing_replacement_never_raises_into_fastdeploy_and_says_so_once(tmp_path, caplog):
    import logging

    import fastdeploy_otel as fdt
    from fastdeploy_otel import _fd_takeover as takeover

    caplog.set_level(logging.WARNING, logger="fastdeploy_otel")
    fdt.configure(env={}, mode="local", log_dir=str(tmp_path / "log"))
    try:
        for _ in range(3):
            takeover.trace_print("PREPROCESSING_START", _Unhashable(), "")  # the id lookup raises
    finally:
        fdt.shutdown()
    said = [r.getMessage() for r in caplog.records if r.name.startswith("fastdeploy_otel._fd_takeover")]
    assert said.count("a FastDeploy trace event could not be recorded") == 1  # once, not per call
