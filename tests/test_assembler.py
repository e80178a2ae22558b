"""The assembler on its own: records in; spans, mirror lines and error records out.  No threads, no
wire, no files: each test feeds Records as the hot path builds them and reads ``take()``."""

from __future__ import annotations

import threading

from opentelemetry.context import Context

from fastdeploy_otel import attributes as A
from fastdeploy_otel._assembler import Assembler
from fastdeploy_otel._records import ABORT, ERROR, EVENT, EXTRACT, FINISH, Record
from fastdeploy_otel.events import LoggingEventName as E
from fastdeploy_otel.span_plan import REQUEST_SPAN_NAME
from tests.support.lifecycles import MIXED

T0 = 1_800_000_000_000_000_000
SEC = 1_000_000_000


def record(kind: int, ts: int, rid: str, event: E | None = None, payload: object = None, user: str | None = "u") -> Record:
    return (kind, ts, event, rid, user, payload, threading.current_thread(), Context(), "caller.py", 7)


def assembler(sample: bool = True, max_requests: int = 100, ttl_s: float = 60) -> Assembler:
    return Assembler(lambda ctx, trace_id: sample, False, max_requests, int(ttl_s * SEC))


def run(a: Assembler, rid: str, events, t: int = T0, finish: bool = True) -> int:
    for i, (event, attrs) in enumerate(events):
        a.handle(record(EVENT, t + i * 1000, rid, event, attrs))
    t += len(events) * 1000
    if finish:
        a.handle(record(FINISH, t, rid, payload={"output_tokens": 3}))
    return t


def test_a_lifecycle_becomes_a_span_tree_and_one_line_per_event():
    a = assembler()
    run(a, "r1", MIXED)
    spans, lines, errors = a.take()
    assert not errors and len(lines) == len(MIXED)
    by_name = {s.name: s for s in spans}
    root = by_name[REQUEST_SPAN_NAME]
    assert root.parent_id == 0 and root.attributes[A.GEN_AI_USAGE_OUTPUT_TOKENS] == 3
    for stage in ("PREPROCESSING", "SCHEDULE", "PREFILL", "DECODE", "POSTPROCESSING"):
        assert by_name[stage].parent_id == root.span_id
    assert by_name["REQUEST_QUEUE"].parent_id == by_name["SCHEDULE"].span_id
    assert {s.trace_id for s in spans} == {root.trace_id} == {line.trace_id for line in lines}
    ids = {s.span_id for s in spans}
    assert all(line.span_id in ids for line in lines)  # every line names the span it belongs to
    assert all(s.start_ns <= s.end_ns for s in spans)
    cache = [e for e in by_name["SCHEDULE"].events if e[0] in ("CACHE_HIT", "CACHE_MISS", "CACHE_SWAP_IN")]
    assert cache, "cache decisions are events on SCHEDULE"


def test_an_error_lands_on_the_innermost_open_span_and_in_one_error_record():
    a = assembler()
    t = run(a, "r2", MIXED[:12], finish=False)  # up to the middle of PREFILL
    exc = ValueError("bad token")
    a.handle(record(ERROR, t, "r2", payload=exc))
    a.handle(record(FINISH, t + 1, "r2"))
    spans, _, errors = a.take()
    (err,) = errors
    failing = next(s for s in spans if s.span_id == err.span_id)
    assert err.exc is exc and err.filename == "caller.py" and err.lineno == 7
    assert failing.exceptions and failing.error and "bad token" in failing.error
    root = next(s for s in spans if s.name == REQUEST_SPAN_NAME)
    assert root.error and root.attributes[A.ERROR_TYPE] == "ValueError"


def test_sequences_that_go_wrong_are_marked():
    a = assembler()
    a.handle(record(EVENT, T0, "r3", E.PREPROCESSING_END))  # END without START
    a.handle(record(EVENT, T0 + 1, "r3", E.REQUEST_SCHEDULE_START))  # never ended
    a.handle(record(FINISH, T0 + 2, "r3"))
    spans, _, _ = a.take()
    pre = next(s for s in spans if s.name == "PREPROCESSING")
    sched = next(s for s in spans if s.name == "SCHEDULE")
    assert pre.attributes[A.ANOMALY] == "end_without_start"
    assert sched.error and sched.error.startswith("unterminated")
    assert a.counters["anomalies"] == 1


def test_an_unsampled_request_builds_no_span_but_keeps_its_lines():
    a = assembler(sample=False)
    run(a, "r4", MIXED)
    spans, lines, _ = a.take()
    assert spans == [] and len(lines) == len(MIXED)


def test_a_stage_handed_over_keeps_its_span_id_in_the_other_process():
    api, engine = assembler(), assembler()
    api.handle(record(EVENT, T0, "r5", E.PREPROCESSING_START))
    carrier = api.inject("r5", T0 + 10)
    engine.handle(record(EXTRACT, T0 + 20, "r5", payload=carrier))
    engine.handle(record(EVENT, T0 + 30, "r5", E.PREPROCESSING_END))
    engine.handle(record(FINISH, T0 + 40, "r5"))
    _, api_lines, _ = api.take()
    spans, _, _ = engine.take()
    (pre,) = [s for s in spans if s.name == "PREPROCESSING"]
    assert pre.span_id == api_lines[0].span_id and pre.trace_id == api_lines[0].trace_id
    assert pre.start_ns == T0 and pre.end_ns == T0 + 30


def test_memory_is_bounded_by_ttl_and_capacity():
    a = assembler(max_requests=2, ttl_s=1)
    for i in range(3):
        a.handle(record(EVENT, T0 + i, f"c{i}", E.PREPROCESSING_START))
    assert set(a.requests) == {"c1", "c2"}  # the oldest was evicted to make room
    a.sweep(T0 + 2 * SEC)
    assert a.requests == {} and a.counters["evicted_requests"] == 3
    spans, _, _ = a.take()
    assert all(s.error and s.error.startswith("evicted") for s in spans if s.name == REQUEST_SPAN_NAME)


def test_an_aborted_request_marks_its_request_span_and_the_spans_still_open():
    a = assembler()
    run(a, "r6", MIXED[:6], finish=False)
    still_open = set(a.requests["r6"].open)
    a.handle(record(ABORT, T0 + 10_000, "r6", payload="client went away"))
    spans, _, _ = a.take()
    marked = {s.name for s in spans if s.attributes.get(A.ABORTED) is True}
    assert still_open and marked == still_open | {REQUEST_SPAN_NAME}
    root = next(s for s in spans if s.name == REQUEST_SPAN_NAME)
    assert root.error == "aborted: client went away"
