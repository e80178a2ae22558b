"""The serving stack under bad requests and a dead engine (issue 12; figures in docs/RELIABILITY.md).

Real parts only: uvicorn on 127.0.0.1, httpx and the official openai client, the real engine process
running Paddle, a real OTLP receiver.  Engine faults are injected with MINIFD_FAULTS=1 (a request's
``user`` names the stage to fail) or by SIGKILL.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest

from fastdeploy_otel.span_plan import REQUEST_SPAN_NAME

from tests.support.helpers import read_mirror
from .test_cli import _clean_env, start_serve
from .test_serving import spans_of

pytest.importorskip("paddle")
from minifd import fuzz  # noqa: E402
from minifd.engine import STAGES  # noqa: E402
from minifd.server import REQUEST_ID_PATTERN  # noqa: E402
from minifd.stack import Stack, free_port  # noqa: E402

FAST_EXPORT = {"FD_TRACE_FLUSH_INTERVAL_MS": "50", "OTEL_BSP_SCHEDULE_DELAY": "100"}
# A long generation: EOS pushed away, so it runs until the engine is killed.
LONG = {"prompt": "a long generation that the engine will not finish", "max_tokens": 200, "temperature": 0,
        "logit_bias": {"256": -100}}


@pytest.fixture(scope="module")
def stack(tmp_path_factory, receiver):
    log_dir = str(tmp_path_factory.mktemp("faults"))
    with Stack(log_dir=log_dir, otlp_endpoint=receiver.grpc_endpoint, fault_injection=True, max_batch=8,
               extra_env=FAST_EXPORT) as s:
        s.client = httpx.Client(base_url=s.base_url, timeout=60)
        yield s
        s.client.close()


def _root(receiver, trace_id: str):
    spans = spans_of(receiver, trace_id)
    return next(s for s in spans if s.name == REQUEST_SPAN_NAME)


def _exception_types(receiver, trace_id: str) -> set[str]:
    return {e["attributes"]["exception.type"] for s in receiver.store.spans() if s.trace_id == trace_id
            for e in s.events if e["name"] == "exception"}


# ---- validation at the door --------------------------------------------------------------------------

BAD_FIELDS = [
    ({"temperature": 1e-320}, "temperature"), ({"temperature": 1e308}, "temperature"),
    ({"temperature": -0.5}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"seed": -1}, "seed"), ({"seed": 2**64}, "seed"), ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 10**30}, "max_tokens"), ({"logit_bias": {"\u00b2": 1}}, "logit_bias"),
    ({"logit_bias": {"99999": 1}}, "logit_bias"), ({"logit_bias": {"-3": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 1e9}}, "logit_bias"), ({"n": 3}, "n"), ({"user": "u" * 257}, "user"),
    ({"prompt": "x\ud800"}, "prompt"), ({"user": "\ud800"}, "user"), ({"request_id": "\ud800"}, "request_id"),
    ({"prompt": ""}, "prompt"), ({"prompt": "x" * 300}, "max_tokens"), ({"stream": "maybe"}, "stream"),
]


@pytest.mark.parametrize("change,param", BAD_FIELDS, ids=[p + ":" + repr(c)[:30] for c, p in BAD_FIELDS])
def test_a_bad_field_gets_400_naming_it_and_an_error_trace(stack, change, param):
    body = {"prompt": "valid prompt", "max_tokens": 2, **change}
    resp = stack.client.post("/v1/completions", content=json.dumps(body), headers={"content-type": "application/json"})
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"]
    assert REQUEST_ID_PATTERN.fullmatch(resp.headers["x-request-id"]) and len(resp.headers["x-trace-id"]) == 32


def test_nan_and_infinity_literals_get_400(stack, receiver):
    for raw, param in ((b'{"prompt": "x", "temperature": NaN}', "temperature"),
                       (b'{"prompt": "x", "top_p": Infinity}', "top_p"),
                       (b'{"prompt": "x", "logit_bias": {"7": -Infinity}}', "logit_bias")):
        resp = stack.client.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == param, resp.text
    root = _root(receiver, resp.headers["x-trace-id"])
    assert root.is_error
    assert _exception_types(receiver, root.trace_id) == {"minifd.server.BadRequest"}


def test_the_openai_client_gets_bad_request_and_not_found(stack):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=stack.base_url + "/v1", api_key="unused", max_retries=0, timeout=30)
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model="minifd-tiny", prompt="hi", max_tokens=2, seed=-1)
    assert bad.value.status_code == 400 and bad.value.param == "seed"
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert missing.value.code == "model_not_found"
    ok = client.chat.completions.create(model="minifd-tiny", messages=[{"role": "user", "content": "hi"}],
                                        max_tokens=3, temperature=0)
    assert ok.usage.completion_tokens >= 1


def test_seeded_fuzz_of_every_field_and_header(stack):
    report = fuzz.run(stack.base_url, requests=300, seed=12, concurrency=8, timeout=30)
    assert report.ok, report.summary() + "\n" + "\n".join((report.hangs + report.dropped + report.unexpected)[:10])
    assert report.statuses[200] > 50 and report.statuses[400] > 50 and report.statuses[404] > 0  # it covered both


# ---- hostile ids ---------------------------------------------------------------------------------------

HOSTILE_HEADERS = [b"\x01\x02", "\u4e2d\u6587".encode(), b"\xff\xfe", b"a b", b"x" * 500, b"[request_id=evil]"]
HOSTILE_BODY_IDS = ["a\nb", "\u4e2d\u6587", "\x01", "x" * 200, "[x] y"]


@pytest.mark.parametrize("stream", [False, True])
def test_hostile_request_ids_are_replaced_and_kept_escaped_on_the_span(stack, receiver, stream):
    cases = [({"x-request-id": h}, {}) for h in HOSTILE_HEADERS] + [({}, {"request_id": i}) for i in HOSTILE_BODY_IDS]
    for headers, extra in cases * 2:  # the same id twice: a retry must not meet its own ghost (409)
        body = {"prompt": "hostile id", "max_tokens": 2, "stream": stream, **extra}
        resp = stack.client.post("/v1/completions", content=json.dumps(body),
                                 headers={"content-type": "application/json", **headers})
        assert resp.status_code == 200, (headers, extra, resp.text)
        rid = resp.headers["x-request-id"]
        assert REQUEST_ID_PATTERN.fullmatch(rid) and rid.startswith("cmpl-")
        if stream:
            assert resp.text.rstrip().endswith("data: [DONE]") and f'"id": "{rid}"' in resp.text
        else:
            assert resp.json()["id"] == rid
    root = _root(receiver, resp.headers["x-trace-id"])  # the last one (body id "[x] y"): exported, so ended
    assert not root.is_error
    spans = spans_of(receiver, root.trace_id, lambda m: any("fastdeploy.client_request_id" in s.attributes for s in m))
    assert {s.attributes.get("fastdeploy.client_request_id") for s in spans} >= {"[x] y"}
    lines = read_mirror(os.path.join(stack.log_dir, "api"))  # asserts that every line parses
    assert lines and not [l for l in lines if "evil" in l["request_id"] or "\x01" in l["request_id"]]


def test_a_valid_client_id_is_kept(stack):
    resp = stack.client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1},
                             headers={"X-Request-Id": "client.id:42-A_b"})
    assert resp.status_code == 200 and resp.headers["x-request-id"] == "client.id:42-A_b" == resp.json()["id"]


# ---- engine faults: one request fails, the engine carries on ---------------------------------------

@pytest.mark.parametrize("stage", STAGES)
def test_a_fault_at_any_engine_stage_fails_that_request_alone(stack, receiver, stage):
    good: dict[str, httpx.Response] = {}
    with httpx.Client(base_url=stack.base_url, timeout=60) as other:
        t = threading.Thread(target=lambda: good.setdefault("r", other.post(
            "/v1/completions", json={"prompt": f"a good neighbour of {stage}", "max_tokens": 12, "temperature": 0,
                                     "logit_bias": {"256": -100}})))
        t.start()
        bad = stack.client.post("/v1/completions", json={"prompt": f"fail me at {stage}", "max_tokens": 12,
                                                         "user": f"fault:{stage}", "logit_bias": {"256": -100}})
        t.join()
    assert bad.status_code == 500, bad.text
    assert bad.json()["error"]["type"] == "server_error" and "InjectedFault" in bad.json()["error"]["message"]
    assert good["r"].status_code == 200 and good["r"].json()["usage"]["completion_tokens"] == 12
    assert _root(receiver, bad.headers["x-trace-id"]).is_error
    deadline = time.monotonic() + 10
    while "minifd.engine.InjectedFault" not in _exception_types(receiver, bad.headers["x-trace-id"]):
        assert time.monotonic() < deadline, "the engine span with the exception never arrived"
        time.sleep(0.1)
    rid = bad.headers["x-request-id"]
    while f"request_id={rid}_0]" not in open(os.path.join(stack.log_dir, "engine", "error.log")).read():
        assert time.monotonic() < deadline, "no error.log record"
        time.sleep(0.1)
    assert stack.client.get("/health").status_code == 200


def test_a_fault_mid_stream_ends_the_stream_with_an_error_event(stack):
    body = {"prompt": "stream then fail", "max_tokens": 30, "stream": True, "user": "fault:decode"}
    resp = stack.client.post("/v1/completions", json=body)
    events = [l[6:] for l in resp.text.splitlines() if l.startswith("data: ")]
    assert resp.status_code == 200 and events[-1] == "[DONE]"
    assert "InjectedFault" in json.loads(events[-2])["error"]["message"]
    assert stack.client.get("/health").status_code == 200


# ---- a dead engine ------------------------------------------------------------------------------------

def _start_long_requests(base_url: str, n_stream: int, n_plain: int) -> tuple[list[threading.Thread], list[dict]]:
    """Long requests in threads, back once every stream has its first chunk (the engine is mid-generation);
    each result records its outcome and when it ended."""
    results: list[dict] = [{"kind": "stream"} for _ in range(n_stream)] + [{"kind": "plain"} for _ in range(n_plain)]

    def stream(out: dict) -> None:
        try:
            with httpx.Client(base_url=base_url, timeout=60) as c, c.stream("POST", "/v1/completions",
                                                                             json={**LONG, "stream": True}) as r:
                out["trace_id"] = r.headers["x-trace-id"]
                out["request_id"] = r.headers["x-request-id"]
                out["lines"] = []
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        out["lines"].append(line[6:])
                        out.setdefault("first_chunk", time.monotonic())
        except httpx.HTTPError as exc:
            out["exception"] = repr(exc)
        out["ended"] = time.monotonic()

    def plain(out: dict) -> None:
        try:
            with httpx.Client(base_url=base_url, timeout=60) as c:
                r = c.post("/v1/completions", json=LONG)
                out.update(status=r.status_code, body=r.json(), trace_id=r.headers["x-trace-id"])
        except httpx.HTTPError as exc:
            out["exception"] = repr(exc)
        out["ended"] = time.monotonic()

    threads = [threading.Thread(target=stream if out["kind"] == "stream" else plain, args=(out,)) for out in results]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while not all("first_chunk" in out for out in results[:n_stream]):
        assert time.monotonic() < deadline, results
        time.sleep(0.02)
    assert not any("ended" in out for out in results), results  # still in flight
    return threads, results


def _assert_engine_death_handled(base_url: str, receiver, threads, results, killed_at: float, n: int) -> None:
    # /health says 503 within 2 s
    while True:
        health = httpx.get(base_url + "/health", timeout=5)
        if health.status_code == 503:
            break
        assert time.monotonic() - killed_at < 2.0, "the API server did not notice the dead engine within 2 s"
        time.sleep(0.05)
    health_after = time.monotonic() - killed_at
    assert health.json()["status"] == "unhealthy" and "heartbeat" in health.json()["reason"]
    # every in-flight client gets an error within 5 s
    for t in threads:
        t.join(timeout=max(0.1, killed_at + 5 - time.monotonic()))
    assert len(results) == n and all(not t.is_alive() for t in threads), f"an in-flight request hangs: {results}"
    for out in results:
        assert "exception" not in out, out  # an answer, not a dropped connection
        assert out["ended"] - killed_at < 5.0, out
        if out["kind"] == "stream":
            assert out["lines"][-1] == "[DONE]"
            err = json.loads(out["lines"][-2])["error"]
            assert err["code"] == "engine_unavailable", err
        else:
            assert out["status"] == 503 and out["body"]["error"]["code"] == "engine_unavailable", out
    print(f"engine SIGKILL: /health 503 after {health_after:.2f}s; in-flight clients answered after "
          f"{max(out['ended'] for out in results) - killed_at:.2f}s at most")  # the figures in docs/RELIABILITY.md
    # every in-flight trace ends with ERROR status and is exported
    for out in results:
        root = _root(receiver, out["trace_id"])
        assert root.is_error and "minifd.server.EngineUnavailable" in _exception_types(receiver, out["trace_id"])


def test_stack_engine_sigkill_mid_stream_then_a_new_engine(tmp_path, receiver):
    with Stack(log_dir=str(tmp_path), otlp_endpoint=receiver.grpc_endpoint, extra_env=FAST_EXPORT) as s:
        threads, results = _start_long_requests(s.base_url, n_stream=2, n_plain=1)
        s.procs["engine"].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        _assert_engine_death_handled(s.base_url, receiver, threads, results, killed_at, 3)
        t0 = time.monotonic()
        resp = httpx.post(s.base_url + "/v1/completions", json={"prompt": "after", "max_tokens": 2}, timeout=10)
        assert resp.status_code == 503 and time.monotonic() - t0 < 1.0  # at once, no blocking on IPC
        assert resp.json()["error"]["code"] == "engine_unavailable"
        assert _root(receiver, resp.headers["x-trace-id"]).is_error
        assert httpx.get(s.base_url + "/v1/models", timeout=5).status_code == 200  # the event loop is free
        s.procs["engine"].wait()
        s.start_engine()  # a new engine connects to the same API server: healthy again, and serving
        s._wait_healthy()
        resp = httpx.post(s.base_url + "/v1/completions", json={"prompt": "again", "max_tokens": 3}, timeout=30)
        assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] >= 1, resp.text
        # The ids the dead engine held are free with the new one (held otherwise, in case it came back).
        reused = httpx.post(s.base_url + "/v1/completions", json={"prompt": "again", "max_tokens": 2},
                            headers={"X-Request-Id": results[0]["request_id"]}, timeout=30)
        assert reused.status_code == 200, reused.text


def test_engine_thread_crash_marks_the_engine_unhealthy_and_it_exits(tmp_path, receiver):
    with Stack(log_dir=str(tmp_path), otlp_endpoint=receiver.grpc_endpoint, fault_injection=True,
               extra_env=FAST_EXPORT) as s:
        t0 = time.monotonic()
        resp = httpx.post(s.base_url + "/v1/completions", timeout=30,
                          json={"prompt": "kill the scheduler", "max_tokens": 4, "user": "fault:kill:schedule"})
        assert resp.status_code == 503 and time.monotonic() - t0 < 5, resp.text
        assert "engine thread scheduler died" in resp.json()["error"]["message"]
        health = httpx.get(s.base_url + "/health", timeout=5)
        assert health.status_code == 503 and "engine thread scheduler died" in health.json()["reason"]
        assert s.procs["engine"].wait(timeout=20) == 1
        assert _root(receiver, resp.headers["x-trace-id"]).is_error
        assert httpx.post(s.base_url + "/v1/completions", json={"prompt": "x"}, timeout=5).status_code == 503


def _children(pid: int) -> dict[int, str]:
    """{pid: cmdline} of a process's children (to find the engine `serve` started)."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    out[int(entry)] = f.read().replace(b"\0", b" ").decode()
        except (OSError, ValueError, IndexError):
            continue
    return out


def test_serve_engine_sigkill_mid_stream_then_exits_1(tmp_path, receiver):
    port = free_port()
    proc = start_serve(port, tmp_path / "log",
                       _clean_env(FD_TRACE="all", OTEL_EXPORTER_OTLP_ENDPOINT=receiver.grpc_endpoint, **FAST_EXPORT))
    base = f"http://127.0.0.1:{port}"
    try:
        (engine_pid,) = [p for p, cmd in _children(proc.pid).items() if "minifd.engine" in cmd]
        threads, results = _start_long_requests(base, n_stream=2, n_plain=1)
        os.kill(engine_pid, signal.SIGKILL)
        killed_at = time.monotonic()
        _assert_engine_death_handled(base, receiver, threads, results, killed_at, 3)
        assert proc.wait(timeout=30) == 1  # serve exits non-zero (documented), and does not hang
        assert "the engine process exited" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
