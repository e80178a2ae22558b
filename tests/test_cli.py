"""The two commands an operator runs: `fastdeploy-otel demo` and `fastdeploy-otel serve`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from fastdeploy_otel.mirror import parse_line
from fastdeploy_otel.span_plan import REQUEST_SPAN_NAME
from fastdeploy_otel.tools.spans import read_spans

pytest.importorskip("paddle")
from minifd.stack import free_port  # noqa: E402

CLI = [sys.executable, "-m", "fastdeploy_otel.tools.cli"]


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "FD_"))}
    env.update(extra)
    return env


def start_serve(port: int, log_dir, env: dict[str, str]) -> subprocess.Popen:
    """`fastdeploy-otel serve` on 127.0.0.1:port, returned once /health says 200 (stdout piped, as text)."""
    proc = subprocess.Popen([*CLI, "serve", "--port", str(port), "--log-dir", str(log_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise AssertionError(f"serve did not become healthy: {proc.communicate()[0][-3000:]}")


def test_demo_leaves_the_three_artefacts_and_a_summary(tmp_path):
    out = tmp_path / "demo-out"
    res = subprocess.run([*CLI, "demo", "--out", str(out)], capture_output=True, text=True, timeout=300,
                         env=_clean_env())
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "cache hit ratio" in res.stdout and "p99" in res.stdout and "swap-ins" in res.stdout
    lines = [parse_line(l) for l in (out / "trace.log").read_text().splitlines()]
    assert lines and all(l is not None for l in lines)
    spans = read_spans(str(out / "spans.jsonl"))
    span_ids = {s.span_id for s in spans}
    assert all(l["span_id"] in span_ids for l in lines)  # every mirror line points at an exported span
    events = {l["event"] for l in lines}
    assert {"CACHE_MISS", "CACHE_HIT", "CACHE_SWAP_IN", "PREEMPTED", "RESCHEDULED_INFERENCE_START"} <= events
    roots = [s for s in spans if s.name == REQUEST_SPAN_NAME]
    assert len(roots) == 16
    assert sum(1 for s in roots if s.status_code == 2) == 3  # bad request, engine error, abandoned stream
    assert any(s.attributes.get("fastdeploy.aborted") for s in roots)
    html = (out / "timeline.html").read_text()
    assert html.count("CACHE_SWAP_IN") >= 1 and "<script>" in html
    assert not [s for s in spans if s.name.endswith(("http send", "http receive"))]  # no per-chunk spans


def test_serve_runs_until_sigterm_then_flushes(tmp_path):
    port = free_port()
    log_dir = tmp_path / "log"
    proc = start_serve(port, log_dir, _clean_env(FD_TRACE="local"))
    try:
        base = f"http://127.0.0.1:{port}"
        models = httpx.get(base + "/v1/models").json()
        assert models["data"][0]["id"] == "minifd-tiny"
        caller = "5" * 32  # FD_TRACE=local: no HTTP span, and trace.log still continues the caller's trace
        resp = httpx.post(base + "/v1/completions", json={"prompt": "serve me", "max_tokens": 3}, timeout=60,
                          headers={"traceparent": f"00-{caller}-{'6' * 16}-01"})
        assert resp.status_code == 200 and resp.headers["x-trace-id"] == caller
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    api = [parse_line(l) for l in (log_dir / "api" / "trace.log").read_text().splitlines()]
    engine = [parse_line(l) for l in (log_dir / "engine" / "trace.log").read_text().splitlines()]
    assert [l["event"] for l in api] == ["PREPROCESSING_START", "POSTPROCESSING_END"]
    assert "INFERENCE_END" in {l["event"] for l in engine}
    assert {l["trace_id"] for l in api + engine} == {resp.headers["x-trace-id"]}


def test_bad_environment_is_one_clear_line(tmp_path):
    res = subprocess.run([*CLI, "demo", "--out", str(tmp_path / "x")], capture_output=True, text=True, timeout=60,
                         env=_clean_env(FD_TRACE="verbose"))
    assert res.returncode == 2
    assert res.stderr.strip() == "fastdeploy-otel: FD_TRACE='verbose' is not one of off, local, otel, all"
    res = subprocess.run([*CLI, "check-config"], capture_output=True, text=True, timeout=60,
                         env=_clean_env(OTEL_EXPORTER_OTLP_HEADERS="authorization=Bearer xyz", FD_TRACE="all"))
    assert res.returncode == 0 and "xyz" not in res.stdout + res.stderr and "'authorization': '***'" in res.stdout
