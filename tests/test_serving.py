"""End to end: uvicorn on 127.0.0.1, a real HTTP client, the real engine process, a real OTLP receiver."""

from __future__ import annotations

import collections
import concurrent.futures
import os
import time

import httpx
import pytest

from fastdeploy_otel import attributes as A
from fastdeploy_otel.events import EVENT_TO_STAGE_MAP
from fastdeploy_otel.events import LoggingEventName as E
from fastdeploy_otel.span_plan import PLAN, REQUEST_SPAN_NAME
from tests.support.helpers import read_mirror

pytest.importorskip("paddle")
from minifd.stack import Stack  # noqa: E402

STAGES = ("PREPROCESSING", "SCHEDULE", "PREFILL", "DECODE", "POSTPROCESSING")
# 16-token blocks; a 12-block GPU tier makes the crafted sequence below swap out and back in.
# A long stream (EOS pushed away) that the client abandons.
LONG_STREAM = {"prompt": "a long stream that the client abandons", "max_tokens": 200, "temperature": 0, "stream": True,
               "logit_bias": {"256": -100}}
SHARED = "The quick brown fox jumps over the lazy dog; " * 2  # 90 bytes: 5 full blocks


@pytest.fixture(scope="module")
def stack(tmp_path_factory, receiver):
    log_dir = str(tmp_path_factory.mktemp("stack"))
    with Stack(log_dir=log_dir, otlp_endpoint=receiver.grpc_endpoint, gpu_blocks=12, cpu_blocks=32, max_batch=4,
               fault_injection=True, extra_env={"FD_TRACE_FLUSH_INTERVAL_MS": "50", "OTEL_BSP_SCHEDULE_DELAY": "100"}) as s:
        s.client = httpx.Client(base_url=s.base_url, timeout=60)
        yield s
        s.client.close()


def spans_of(receiver, trace_id, predicate=None, timeout=15.0):
    """All spans of one trace, once its request span and HTTP span have both arrived."""
    def ready(spans):
        mine = [s for s in spans if s.trace_id == trace_id]
        return any(s.name == REQUEST_SPAN_NAME for s in mine) and any(s.name.startswith(("POST /", "GET /")) for s in mine) and (
            predicate is None or predicate(mine))
    spans = receiver.store.wait_for(ready, timeout=timeout)
    return [s for s in spans if s.trace_id == trace_id]


def complete(stack, prompt, **kw):
    body = {"prompt": prompt, "max_tokens": kw.pop("max_tokens", 4), "temperature": 0, **kw}
    return stack.client.post("/v1/completions", json=body)


def cache_event(spans):
    events = [e for s in spans if s.name == "SCHEDULE" for e in s.events if e["name"].startswith("CACHE_")]
    assert len(events) == 1, events
    return events[0]


def test_span_tree_from_http_span_down_with_traceparent_continuity(stack, receiver):
    caller_trace, caller_span = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    assert stack.client.get("/health").status_code == 200  # excluded from tracing (checked below)
    resp = stack.client.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 5, "temperature": 0,
              "user": "user-42"},
        headers={"traceparent": f"00-{caller_trace}-{caller_span}-01", "X-Request-Id": "req-tree-1"},
    )
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-trace-id"] == caller_trace
    assert resp.json()["id"] == "req-tree-1"
    spans = spans_of(receiver, caller_trace, lambda m: {s.name for s in m} >= set(STAGES))
    (http,) = [s for s in spans if s.name == "POST /v1/chat/completions"]
    (root,) = [s for s in spans if s.name == REQUEST_SPAN_NAME]
    assert http.parent_span_id == caller_span
    assert root.parent_span_id == http.span_id
    for stage in STAGES:
        (span,) = [s for s in spans if s.name == stage]
        assert span.parent_span_id == root.span_id
        assert span.attributes[A.USER_ID] == "user-42"
    roles = {s.name: s.resource["fastdeploy.role"] for s in spans}
    assert roles[REQUEST_SPAN_NAME] == "api" and roles["SCHEDULE"] == "engine" and roles["DECODE"] == "engine"
    assert roles["PREPROCESSING"] == "engine" and roles["POSTPROCESSING"] == "api"  # the cross-process stages
    assert root.attributes[A.GEN_AI_OPERATION_NAME] == "chat"
    assert root.attributes[A.GEN_AI_USAGE_OUTPUT_TOKENS] == resp.json()["usage"]["completion_tokens"]
    assert root.attributes[A.GEN_AI_USAGE_INPUT_TOKENS] == resp.json()["usage"]["prompt_tokens"]
    assert root.attributes[A.GEN_AI_RESPONSE_ID] == "req-tree-1"
    assert A.GEN_AI_INPUT_MESSAGES not in root.attributes  # content is not recorded without opt-in
    assert all("req-tree-1" not in s.name for s in spans)
    assert not [s for s in receiver.store.spans() if "/health" in s.name]


def test_cache_miss_then_hit_then_swap_in(stack, receiver):
    def traced(prompt):
        resp = complete(stack, prompt)
        assert resp.status_code == 200, resp.text
        return resp.headers["x-trace-id"], resp.json()

    miss_tid, _ = traced(SHARED + "first question?")
    miss = cache_event(spans_of(receiver, miss_tid, lambda m: any(s.name == "SCHEDULE" for s in m)))
    assert miss["name"] == "CACHE_MISS" and miss["attributes"][A.CACHE_MISSED_TOKENS] > 0

    hit_tid, hit_body = traced(SHARED + "second question?")
    hit = cache_event(spans_of(receiver, hit_tid, lambda m: any(s.name == "SCHEDULE" for s in m)))
    assert hit["name"] == "CACHE_HIT"
    assert hit["attributes"][A.CACHE_MATCHED_BLOCKS] == 5 and hit["attributes"][A.CACHE_MATCHED_TOKENS] == 80
    assert hit["attributes"][A.CACHE_SOURCE_TIER] == "gpu"
    assert hit_body["usage"]["prompt_tokens_details"]["cached_tokens"] == 80

    for i in range(4):  # unique prompts push the shared blocks out of the 12-block GPU tier
        traced(f"{i} unrelated filler text that is long enough to need several blocks of KV cache, {i}" * 2)

    swap_tid, swap_body = traced(SHARED + "third question?")
    swap_spans = spans_of(receiver, swap_tid, lambda m: any(s.name == "SCHEDULE" for s in m))
    swap = cache_event(swap_spans)
    assert swap["name"] == "CACHE_SWAP_IN"
    assert swap["attributes"][A.CACHE_SWAPPED_IN_BLOCKS] >= 1
    assert swap["attributes"][A.CACHE_SWAPPED_IN_BYTES] > 0
    assert swap["attributes"][A.CACHE_SOURCE_TIER] == "cpu"
    root = [s for s in swap_spans if s.name == REQUEST_SPAN_NAME][0]
    assert root.attributes[A.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS] == swap_body["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


def test_validation_error_gets_400_and_an_error_trace(stack, receiver):
    resp = complete(stack, "x" * 300, max_tokens=8)
    assert resp.status_code == 400 and "maximum context length" in resp.json()["error"]["message"]
    spans = spans_of(receiver, resp.headers["x-trace-id"])
    (pre,) = [s for s in spans if s.name == "PREPROCESSING"]
    (root,) = [s for s in spans if s.name == REQUEST_SPAN_NAME]
    assert pre.is_error and root.is_error
    exc = [e for e in pre.events if e["name"] == "exception"][0]["attributes"]
    assert exc["exception.type"] == "minifd.server.BadRequest" and "maximum context length" in exc["exception.message"]
    # a body that does not even parse is traced too
    resp = stack.client.post("/v1/completions", json={"max_tokens": 3})
    assert resp.status_code == 400
    spans = spans_of(receiver, resp.headers["x-trace-id"])
    assert any(s.is_error and s.name == REQUEST_SPAN_NAME for s in spans)


def test_engine_exception_is_logged_with_ids_and_the_batch_carries_on(stack, receiver):
    good = {"prompt": "a normal request in the same batch", "max_tokens": 24, "temperature": 0}
    bad = {"prompt": "a request whose sampling fails in the engine (an injected fault)", "max_tokens": 24,
           "user": "fault:sample", "request_id": "req-engine-error"}
    with httpx.Client(base_url=stack.base_url, timeout=60) as other:
        import threading

        out = {}
        t = threading.Thread(target=lambda: out.setdefault("good", other.post("/v1/completions", json=good)))
        t.start()
        bad_resp = stack.client.post("/v1/completions", json=bad)
        t.join()
    assert bad_resp.status_code == 500 and "InjectedFault" in bad_resp.json()["error"]["message"]
    assert out["good"].status_code == 200 and out["good"].json()["usage"]["completion_tokens"] == 24
    spans = spans_of(receiver, bad_resp.headers["x-trace-id"], lambda m: any(s.name == "PREFILL" for s in m))
    (prefill,) = [s for s in spans if s.name == "PREFILL"]
    assert prefill.is_error and prefill.resource["fastdeploy.role"] == "engine"
    (exc,) = [e for e in prefill.events if e["name"] == "exception"]
    assert exc["attributes"]["exception.type"] == "minifd.engine.InjectedFault"
    assert [s for s in spans if s.name == REQUEST_SPAN_NAME][0].is_error
    (http,) = [s for s in spans if s.name == "POST /v1/completions"]
    assert http.is_error and http.attributes["http.response.status_code"] == 500  # a 5xx is a server error
    deadline = time.monotonic() + 5
    log = ""
    while time.monotonic() < deadline and prefill.span_id not in log:
        time.sleep(0.1)
        log = open(os.path.join(stack.log_dir, "engine", "error.log")).read()
    assert f"[request_id=req-engine-error_0] [trace_id={prefill.trace_id}] [span_id={prefill.span_id}]" in log
    assert "Traceback (most recent call last)" in log and "InjectedFault" in log


def test_stream_has_no_per_chunk_spans_and_abort_frees_the_request(stack, receiver):
    body = {"prompt": "stream me", "max_tokens": 6, "temperature": 0, "stream": True}
    with stack.client.stream("POST", "/v1/completions", json=body) as resp:
        chunks = [line for line in resp.iter_lines() if line.startswith("data: ")]
        tid = resp.headers["x-trace-id"]
    assert chunks[-1] == "data: [DONE]" and len(chunks) >= 3
    spans = spans_of(receiver, tid, lambda m: any(s.name == "POSTPROCESSING" for s in m))
    (http,) = [s for s in spans if s.name.startswith("POST /")]
    assert len(spans) == len({s.span_id for s in spans})
    assert not any("http send" in s.name or "http receive" in s.name for s in spans)
    assert [e["name"] for e in http.events] == ["first_chunk", "last_chunk"]

    # Abort: read two chunks of a long stream, then hang up.
    long_body = {"prompt": "a long stream that the client abandons", "max_tokens": 200, "temperature": 0, "stream": True,
                 "request_id": "req-abort"}
    with httpx.Client(base_url=stack.base_url, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json=long_body) as resp:
            tid = resp.headers["x-trace-id"]
            lines = resp.iter_lines()
            got = [next(lines) for _ in range(3)]
    assert any(l.startswith("data: ") for l in got)
    spans = spans_of(receiver, tid, lambda m: any(A.ABORTED in s.attributes and s.resource.get("fastdeploy.role") == "engine" for s in m))
    root = [s for s in spans if s.name == REQUEST_SPAN_NAME][0]
    assert root.attributes[A.ABORTED] is True and root.is_error
    assert any(s.name == "DECODE" and s.attributes.get(A.ABORTED) for s in spans)
    # The aborted request's KV blocks are back: a request needing 11 of the 12 blocks still runs.
    resp = complete(stack, "y" * 170, max_tokens=2)
    assert resp.status_code == 200, resp.text


def test_mirror_lines_agree_with_exported_spans(stack, receiver):
    resp = complete(stack, "mirror check prompt", request_id="req-mirror")
    tid = resp.headers["x-trace-id"]
    spans = spans_of(receiver, tid, lambda m: any(s.name == "POSTPROCESSING" for s in m))
    by_id = {s.span_id: s for s in spans}
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        lines = [l for role in ("api", "engine") for l in read_mirror(os.path.join(stack.log_dir, role))
                 if l["trace_id"] == tid]
        if {"INFERENCE_END", "POSTPROCESSING_END"} <= {l["event"] for l in lines}:  # both processes flushed
            break
        time.sleep(0.1)
    needed = {l["span_id"] for l in lines}  # each process exports on its own schedule: wait for all
    spans = receiver.store.wait_for(lambda s: needed <= {x.span_id for x in s})
    by_id = {s.span_id: s for s in spans}
    events = [l["event"] for l in lines]
    ts = {l["event"]: int(l["timestamp"]) for l in lines}
    assert ts["PREPROCESSING_START"] == min(ts.values()) and ts["POSTPROCESSING_END"] == max(ts.values())
    assert len(events) == len(set(events))  # one line per event
    assert {"CACHE_MISS", "INFERENCE_START", "FIRST_TOKEN_GENERATED", "INFERENCE_END"} <= set(events)
    for line in lines:
        span = by_id[line["span_id"]]
        event = E(line["event"])
        assert span.name == PLAN[event].span or (event is E.INFERENCE_START and span.name == "DECODE")
        assert line["stage"] == EVENT_TO_STAGE_MAP[event].value
        assert line["request_id"] in ("req-mirror", "req-mirror_0")


def test_a_duplicate_in_flight_request_id_is_refused_and_the_engine_carries_on(stack):
    # The first request streams and has sent a chunk: it is in flight for certain (a timed gap between
    # two plain requests raced with a fast engine finishing the first).
    body = {"prompt": "duplicate id", "max_tokens": 200, "temperature": 0, "logit_bias": {"256": -100}}
    with httpx.Client(base_url=stack.base_url, timeout=60) as first:
        with first.stream("POST", "/v1/completions", json={**body, "stream": True},
                          headers={"X-Request-Id": "dup-1"}) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            dup = stack.client.post("/v1/completions", json=body, headers={"X-Request-Id": "dup-1"})
            assert dup.status_code == 409 and "already in flight" in dup.json()["error"]["message"]
            assert [line for line in lines if line.startswith("data: ")][-1] == "data: [DONE]"
    assert complete(stack, "after the duplicate").status_code == 200  # the engine is still serving


def test_an_id_reused_as_soon_as_its_request_ended_is_served_as_its_own(stack):
    """The id is free once the client has its answer: the stream's after-response cleanup (a worker
    thread, possibly late) must not abort the next request with that id (it did: 33 of 200 hung)."""
    def reuse(i: int) -> int | str:
        headers = {"X-Request-Id": f"reuse-{i}"}
        first = stack.client.post("/v1/completions", json={"prompt": "r", "max_tokens": 1, "stream": True}, headers=headers)
        assert first.status_code == 200 and first.text.rstrip().endswith("data: [DONE]")
        try:
            return stack.client.post("/v1/completions", json={"prompt": "r", "max_tokens": 1}, headers=headers,
                                     timeout=20).status_code
        except httpx.TimeoutException:
            return "hang"
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        statuses = list(pool.map(reuse, range(40)))
    assert statuses == [200] * 40, collections.Counter(statuses)

    # An abandoned stream: its id stays taken (409) until the engine has let go of it, then the same
    # id gets its own answer, none of the abandoned generation's tokens.
    prompt = {"prompt": "the reused id's own prompt", "max_tokens": 3, "temperature": 0}
    expected = complete(stack, prompt["prompt"], max_tokens=3).json()["choices"][0]["text"]
    with httpx.Client(base_url=stack.base_url, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json={**LONG_STREAM, "request_id": "reuse-abandoned"}) as resp:
            assert next(line for line in resp.iter_lines() if line.startswith("data: "))
    statuses = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        resp = stack.client.post("/v1/completions", json={**prompt, "request_id": "reuse-abandoned"}, timeout=20)
        statuses.append(resp.status_code)
        if resp.status_code != 409:
            break
        time.sleep(0.01)
    assert statuses[-1] == 200 and set(statuses[:-1]) <= {409}, statuses
    assert resp.json()["choices"][0]["text"] == expected and resp.json()["usage"]["completion_tokens"] <= 3


def test_http_server_span_names_routes_not_paths_and_marks_server_errors(stack, receiver):
    """minifd.http_spans: SERVER kind, the route (not the raw path) in the name, the status code on
    the span, and ERROR on a 5xx; an unknown path must not become a span name."""
    caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    headers = {"traceparent": f"00-{caller_trace}-00f067aa0ba902b7-01"}
    assert stack.client.get("/no/such/path/12345", headers=headers).status_code == 404
    bad = stack.client.post("/v1/completions", content=b"{not json", headers=headers)
    assert bad.status_code in (400, 422)
    spans = receiver.store.wait_for(
        lambda s: len([x for x in s if x.trace_id == caller_trace and x.kind == 2]) >= 2, timeout=15
    )
    server = [s for s in spans if s.trace_id == caller_trace and s.kind == 2]  # OTLP SPAN_KIND_SERVER
    (unknown,) = [s for s in server if s.attributes.get("url.path") == "/no/such/path/12345"]
    assert unknown.name == "GET" and unknown.attributes["http.response.status_code"] == 404
    assert "http.route" not in unknown.attributes
    (post,) = [s for s in server if s.attributes.get("url.path") == "/v1/completions"]
    assert post.name == "POST /v1/completions" and post.attributes["http.route"] == "/v1/completions"
    assert post.attributes["http.request.method"] == "POST" and post.parent_span_id == "00f067aa0ba902b7"
    assert post.status_code != 2  # a client error is not a server error
