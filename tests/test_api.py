"""The public calls end to end: the span model, the mirror, the error path, modes, and what odd
input and a concurrent configure() do, exported through a real OTLP receiver."""

from __future__ import annotations

import logging
import threading
import time

import pytest

import fastdeploy_otel as fdt
from fastdeploy_otel import _selflog
from fastdeploy_otel import attributes as A
from fastdeploy_otel.events import ALIASES, EVENT_TO_STAGE_MAP, StageName, UnknownEventError
from fastdeploy_otel.events import LoggingEventName as E
from fastdeploy_otel.mirror import LINE_RE
from fastdeploy_otel.span_plan import PLAN, REQUEST_SPAN_NAME
from tests.support.helpers import read_mirror
from tests.support.lifecycles import MIXED, PD_DECODE, PD_PREFILL


def replay(rid, lifecycle, user="alice"):
    for event, attrs in lifecycle:
        fdt.trace_print(event, rid, user, **attrs)


def by_name(spans, trace_id=None):
    out = {}
    for s in spans:
        if trace_id is None or s.trace_id == trace_id:
            out.setdefault(s.name, []).append(s)
    return out


def test_vocabulary_is_fastdeploys():
    assert len(E) == 33  # FastDeploy's 32 + CACHE_SWAP_IN
    assert [s.value for s in StageName] == ["PREPROCESSING", "SCHEDULE", "PREFILL", "DECODE", "POSTPROCESSING"]
    assert EVENT_TO_STAGE_MAP[E.CACHE_SWAP_IN] is StageName.SCHEDULE
    assert E.DECODE_PROCESS_PREALLOCAT_REQUEST_END.value == "DECODE_PROCESS_PREALLOCAT_REQUEST_END"
    assert ALIASES["DECODE_PROCESS_PREALLOCATE_REQUEST_END"] is E.DECODE_PROCESS_PREALLOCAT_REQUEST_END
    assert set(PLAN) == set(E)


def test_unknown_event_strict_raises_and_production_counts(traced, tmp_path):
    traced(strict=True)
    with pytest.raises(UnknownEventError, match="NOT_AN_EVENT"):
        fdt.trace_print("NOT_AN_EVENT", "r")
    traced(strict=False)
    fdt.trace_print("NOT_AN_EVENT", "r")
    fdt.trace_print(["unhashable"], "r")
    fdt.trace_print("DECODE_PROCESS_PREALLOCATE_REQUEST_END", "r")  # alias is accepted
    fdt.flush()
    st = fdt.stats()
    assert st["unknown_events"] == 2
    assert st["records"] == 1


def test_mixed_lifecycle_span_tree(traced, receiver):
    traced()
    replay("req-mixed", MIXED)
    fdt.finish_request("req-mixed", output_tokens=16, cached_tokens=32, response_id="chatcmpl-1")
    fdt.flush()
    spans = receiver.store.wait_for(lambda s: any(x.name == REQUEST_SPAN_NAME for x in s))
    names = by_name(spans)
    root = names[REQUEST_SPAN_NAME][0]
    tid = root.trace_id
    assert all(s.trace_id == tid for s in spans)
    assert root.parent_span_id == ""
    for stage in ("PREPROCESSING", "SCHEDULE", "PREFILL", "DECODE", "POSTPROCESSING"):
        (span,) = names[stage]
        assert span.parent_span_id == root.span_id, stage
        assert span.attributes[A.STAGE] == stage
        assert span.attributes[A.REQUEST_ID] == "req-mixed"
        assert span.attributes[A.USER_ID] == "alice"
        assert span.status_code == 0
        assert span.start_ns <= span.end_ns
    schedule = names["SCHEDULE"][0]
    for sub in ("REQUEST_QUEUE", "RESOURCE_ALLOCATE", "PREPARE_PREFIX_CACHE"):
        assert names[sub][0].parent_span_id == schedule.span_id
    for sub in ("WRITE_CACHE_TO_STORAGE",):
        assert names[sub][0].parent_span_id == names["POSTPROCESSING"][0].span_id
    events = {e["name"]: e for e in schedule.events}
    assert set(events) == {"CACHE_HIT", "CACHE_SWAP_IN", "CACHE_MISS"}
    assert events["CACHE_HIT"]["attributes"][A.CACHE_MATCHED_TOKENS] == 16
    assert events["CACHE_HIT"]["attributes"][A.CACHE_SOURCE_TIER] == "gpu"
    assert events["CACHE_SWAP_IN"]["attributes"][A.CACHE_SWAPPED_IN_BYTES] == 8192
    assert events["CACHE_MISS"]["attributes"][A.CACHE_MISSED_TOKENS] == 16
    assert [e["name"] for e in names["PREFILL"][0].events] == ["FIRST_TOKEN_GENERATED"]
    # stage order on the time line
    starts = [names[s][0].start_ns for s in ("PREPROCESSING", "SCHEDULE", "PREFILL", "DECODE", "POSTPROCESSING")]
    assert starts == sorted(starts)
    assert root.attributes[A.GEN_AI_REQUEST_MODEL] == "tiny"
    assert root.attributes[A.GEN_AI_OPERATION_NAME] == "chat"
    assert root.attributes[A.GEN_AI_USAGE_INPUT_TOKENS] == 48
    assert root.attributes[A.GEN_AI_USAGE_OUTPUT_TOKENS] == 16
    assert root.attributes[A.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS] == 32
    assert root.attributes[A.GEN_AI_RESPONSE_FINISH_REASONS] == ["stop"]
    assert root.attributes[A.GEN_AI_RESPONSE_ID] == "chatcmpl-1"
    assert root.resource["service.name"] == "fastdeploy"
    # low-cardinality names: no ids in them
    assert all("req-mixed" not in s.name for s in spans)


def test_pd_prefill_and_decode_instances_share_one_trace(traced, receiver):
    traced()
    # The router/API side starts the request; the carrier goes to the prefill and the decode instance.
    fdt.trace_print(E.PREPROCESSING_START, "pd-1")
    carrier = fdt.inject("pd-1")
    fdt.extract("pd-1_p", carrier)
    replay("pd-1_p", PD_PREFILL[1:])
    fdt.finish_request("pd-1_p")
    fdt.extract("pd-1_d", fdt.inject("pd-1"))
    replay("pd-1_d", PD_DECODE[:-1])
    back = fdt.inject("pd-1_d")  # POSTPROCESSING goes back to the API side
    fdt.finish_request("pd-1_d")
    fdt.extract("pd-1", back)
    fdt.trace_print(E.POSTPROCESSING_END, "pd-1")
    fdt.finish_request("pd-1")
    fdt.flush()
    spans = receiver.store.wait_for(lambda s: any(x.name == REQUEST_SPAN_NAME for x in s))
    root = by_name(spans)[REQUEST_SPAN_NAME][0]
    assert {s.trace_id for s in spans} == {root.trace_id}
    p = by_name([s for s in spans if s.attributes.get(A.REQUEST_ID) == "pd-1_p"])
    d = by_name([s for s in spans if s.attributes.get(A.REQUEST_ID) == "pd-1_d"])
    assert p["SCHEDULE"][0].parent_span_id == root.span_id
    assert p["ASK_DECODE_RESOURCE"][0].parent_span_id == p["SCHEDULE"][0].span_id
    assert p["CHECK_CACHE_TRANSFER"][0].parent_span_id == p["POSTPROCESSING"][0].span_id
    assert p["POSTPROCESSING"][0].attributes[A.IMPLICIT_START] is True
    assert p["POSTPROCESSING"][0].status_code == 0  # implicit stage: ends with its last child
    assert "PREFILL" in p and "DECODE" not in p
    # On the decode instance INFERENCE_START comes inside DECODE: no PREFILL span there.
    assert "PREFILL" not in d
    dec = d["DECODE"][0]
    assert dec.parent_span_id == root.span_id
    assert {c.name for c in spans if c.parent_span_id == dec.span_id} == {
        "DECODE_PROCESS_PREALLOCATE_REQUEST",
        "DECODE_PROCESS_PREFILLED_REQUEST",
    }
    assert [e["name"] for e in dec.events] == ["INFERENCE_START"]
    # One PREPROCESSING span (started on the API side, ended on the prefill instance), one POSTPROCESSING
    # on the decode path (started on D, ended on the API side).
    pre = by_name(spans)["PREPROCESSING"]
    assert len(pre) == 1 and pre[0].status_code == 0
    post_d = [s for s in by_name(spans)["POSTPROCESSING"] if s.attributes.get(A.REQUEST_ID) == "pd-1"]
    assert len(post_d) == 1 and post_d[0].status_code == 0


def test_mirror_lines_match_exported_spans(traced, receiver, tmp_path):
    traced()
    replay("req-m", MIXED)
    fdt.finish_request("req-m")
    fdt.flush()
    spans = receiver.store.wait_for(lambda s: any(x.name == REQUEST_SPAN_NAME for x in s))
    lines = read_mirror(str(tmp_path / "log"))
    assert [l["event"] for l in lines] == [e.value for e, _ in MIXED]  # one line per event, in order
    by_id = {s.span_id: s for s in spans}
    for line in lines:
        event = E(line["event"])
        span = by_id[line["span_id"]]  # the id on the line is an exported span
        assert line["trace_id"] == span.trace_id
        assert span.name == PLAN[event].span
        assert line["stage"] == EVENT_TO_STAGE_MAP[event].value
        assert line["request_id"] == "req-m" and line["user_id"] == "alice"
        assert span.start_ns // 1_000_000 <= int(line["timestamp"]) <= span.end_ns // 1_000_000 + 1
        assert line["file"] == "test_api.py"


@pytest.mark.parametrize("sampler", [
    {"OTEL_TRACES_SAMPLER": "always_off"},
    {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0"},
    {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0"},
])
def test_sampling_zero_still_mirrors_every_request(traced, receiver, tmp_path, sampler):
    traced(env=sampler)
    for i in range(3):
        replay(f"s-{i}", MIXED)
        fdt.finish_request(f"s-{i}")
    fdt.flush()
    time.sleep(0.3)
    assert receiver.store.spans() == []
    lines = read_mirror(str(tmp_path / "log"))
    assert len(lines) == 3 * len(MIXED)
    assert len({l["trace_id"] for l in lines}) == 3
    assert all(int(l["trace_id"], 16) and int(l["span_id"], 16) for l in lines)
    assert fdt.stats()["spans_built"] == 0  # an unsampled request costs no span building


def test_error_is_recorded_on_stage_and_request_span_and_logged(traced, receiver, tmp_path):
    traced()
    fdt.trace_print(E.PREPROCESSING_START, "err-1", "bob")
    try:
        int("not a number")
    except ValueError as exc:
        fdt.record_error("err-1", exc)
    fdt.finish_request("err-1")
    fdt.flush()
    spans = receiver.store.wait_for(lambda s: any(x.name == REQUEST_SPAN_NAME for x in s))
    names = by_name(spans)
    pre, root = names["PREPROCESSING"][0], names[REQUEST_SPAN_NAME][0]
    assert pre.is_error and root.is_error
    (exc_event,) = [e for e in pre.events if e["name"] == "exception"]
    assert exc_event["attributes"]["exception.type"] == "ValueError"
    assert "not a number" in exc_event["attributes"]["exception.message"]
    assert "int(\"not a number\")" in exc_event["attributes"]["exception.stacktrace"]
    assert root.attributes[A.ERROR_TYPE] == "ValueError"
    log = (tmp_path / "log" / "error.log").read_text()
    assert f"[trace_id={pre.trace_id}]" in log and f"[span_id={pre.span_id}]" in log
    assert "[request_id=err-1]" in log and "Traceback (most recent call last)" in log


@pytest.mark.parametrize("mode", ["off", "local", "otel", "all"])
def test_fd_trace_modes(traced, receiver, tmp_path, mode):
    traced(env={"FD_TRACE": mode}, mode=None)
    replay(f"mode-{mode}", MIXED[:2])
    fdt.finish_request(f"mode-{mode}")
    fdt.flush()
    time.sleep(0.2)
    lines = read_mirror(str(tmp_path / "log"))
    spans = receiver.store.spans()
    assert (len(lines) == 2) == (mode in ("local", "all"))
    assert (len(spans) == 2) == (mode in ("otel", "all"))
    if mode == "off":
        assert fdt.stats() == {} and lines == [] and spans == []


@pytest.mark.parametrize(
    "rid",
    [
        "evil\n INFO     2026-01-01 00:00:00,000 1 x.py[line:1] [request_id=forged] [event=PREPROCESSING_END] ",
        "a]b[c] [trace_id=00000000000000000000000000000001]",
        "ctl\x00\x1b[31m\r\x7f\u2028\u2029end",
        "x" * 5000,
        "trailing\\",
    ],
)
def test_hostile_ids_cannot_forge_or_break_a_line(traced, tmp_path, rid):
    traced(mode="local")
    fdt.trace_print(E.PREPROCESSING_START, rid, rid)
    fdt.trace_print(E.PREPROCESSING_END, rid, rid)
    fdt.finish_request(rid)
    fdt.flush()
    raw = (tmp_path / "log" / "trace.log").read_text(encoding="utf-8").splitlines()
    assert len(raw) == 2
    for line in raw:
        assert LINE_RE.match(line), line
    lines = read_mirror(str(tmp_path / "log"))
    assert [l["event"] for l in lines] == ["PREPROCESSING_START", "PREPROCESSING_END"]
    for l in lines:
        assert "forged" not in l.get("event", "")
        if len(rid) <= 256:
            assert l["request_id"] == rid and l["user_id"] == rid
        else:
            assert len(l["request_id"]) < 300 and "+4744 chars" in l["request_id"]


def test_sequences_that_go_wrong_are_marked_not_raised(traced, receiver):
    traced()
    fdt.trace_print(E.REQUEST_QUEUE_END, "seq")  # END without START
    fdt.trace_print(E.REQUEST_SCHEDULE_START, "seq")
    fdt.trace_print(E.REQUEST_SCHEDULE_START, "seq")  # duplicate START
    fdt.trace_print(E.INFERENCE_START, "seq")  # stays open
    fdt.finish_request("seq")
    fdt.flush()
    spans = receiver.store.wait_for(lambda s: any(x.name == REQUEST_SPAN_NAME for x in s))
    names = by_name(spans)
    assert names["REQUEST_QUEUE"][0].attributes[A.ANOMALY] == "end_without_start"
    (explicit,) = names["SCHEDULE"]  # opened for the orphan END, then adopted by the START
    assert A.IMPLICIT_START not in explicit.attributes
    assert names["REQUEST_QUEUE"][0].parent_span_id == explicit.span_id
    assert any(e["attributes"].get(A.ANOMALY) == "duplicate_start" for e in explicit.events)
    prefill = names["PREFILL"][0]
    assert prefill.is_error and "unterminated" in prefill.status_message
    assert explicit.is_error  # SCHEDULE was never ended either
    assert fdt.stats()["anomalies"] == 2


def test_ttl_and_capacity_keep_memory_bounded(traced, receiver):
    traced(request_ttl_s=0.2, max_requests=5)
    for i in range(8):
        fdt.trace_print(E.PREPROCESSING_START, f"leak-{i}")
    fdt.flush()
    assert fdt.stats()["requests_in_flight"] == 5
    time.sleep(1.5)  # the worker sweeps about once a second
    fdt.flush()
    st = fdt.stats()
    assert st["requests_in_flight"] == 0 and st["evicted_requests"] == 8
    spans = receiver.store.wait_for(lambda s: len([x for x in s if x.name == REQUEST_SPAN_NAME]) == 8)
    roots = [s for s in spans if s.name == REQUEST_SPAN_NAME]
    assert all(s.is_error and "evicted" in s.status_message for s in roots)


def test_stuck_request_shows_start_lines_within_a_second(traced, tmp_path):
    traced(mode="local", flush_interval_s=0.2)
    fdt.trace_print(E.PREPROCESSING_START, "stuck")
    fdt.trace_print(E.PREPROCESSING_END, "stuck")
    fdt.trace_print(E.REQUEST_SCHEDULE_START, "stuck")
    deadline = time.monotonic() + 1.0
    lines = []
    while time.monotonic() < deadline and len(lines) < 3:
        time.sleep(0.05)
        lines = read_mirror(str(tmp_path / "log"))
    assert [l["event"] for l in lines] == ["PREPROCESSING_START", "PREPROCESSING_END", "REQUEST_SCHEDULE_START"]


def test_full_queue_drops_are_counted(traced, caplog, monkeypatch):
    caplog.set_level(logging.WARNING, logger="fastdeploy_otel")
    traced(mode="local", max_pending=10, flush_interval_s=60)
    for _ in range(25):
        fdt.trace_print(E.PREPROCESSING_START, "flood")
    assert fdt.stats()["dropped_queue_full"] == 15
    # One line for the flood; the 14 held back (never built: a drop must stay cheap) are counted
    # and named by the next line that passes.
    flood = [r.getMessage() for r in caplog.records if "dropping new ones" in r.getMessage()]
    assert len(flood) == 1
    monkeypatch.setattr(_selflog, "INTERVAL_S", 0.0)
    fdt.trace_print(E.PREPROCESSING_START, "flood")
    flood = [r.getMessage() for r in caplog.records if "dropping new ones" in r.getMessage()]
    assert len(flood) == 2 and "(14 similar messages suppressed" in flood[1]


def test_collector_down_never_reaches_serving(traced, caplog):
    caplog.set_level(logging.WARNING, logger="fastdeploy_otel")
    traced(endpoint="http://127.0.0.1:9", env={"OTEL_BSP_SCHEDULE_DELAY": "50", "OTEL_EXPORTER_OTLP_TIMEOUT": "1"})
    t0 = time.perf_counter()
    for i in range(50):
        replay(f"down-{i}", MIXED)
        fdt.finish_request(f"down-{i}")
    elapsed = time.perf_counter() - t0
    fdt.flush()
    st = fdt.stats()
    assert st["spans_export_failed"] > 0 and st["spans_exported"] == 0
    failing = [r for r in caplog.records if "is failing" in r.getMessage()]
    assert len(failing) == 1
    assert elapsed < 5  # generous: recording never waits on the exporter


def test_unwritable_log_dir_keeps_tracing_without_files(traced, receiver, tmp_path, caplog):
    caplog.set_level(logging.ERROR, logger="fastdeploy_otel")
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the log dir should be")
    traced(log_dir=str(blocker / "log"))
    replay("nolog", MIXED[:2])
    fdt.finish_request("nolog")
    fdt.flush()
    assert receiver.store.wait_for(lambda s: any(x.name == "PREPROCESSING" for x in s))
    failed = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert len(failed) == 1 and "trace.log" in failed[0], failed


def test_a_reused_request_id_is_a_new_request_in_its_own_trace(traced, receiver):
    from opentelemetry import context
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    traced()
    for caller in ("1" * 32, "2" * 32):
        ctx = TraceContextTextMapPropagator().extract({"traceparent": f"00-{caller}-{'a' * 16}-01"})
        token = context.attach(ctx)
        try:
            fdt.trace_print(E.PREPROCESSING_START, "same-id")
            fdt.trace_print(E.PREPROCESSING_END, "same-id")
            fdt.finish_request("same-id")
        finally:
            context.detach(token)
    fdt.flush()
    spans = receiver.store.wait_for(lambda s: len([x for x in s if x.name == REQUEST_SPAN_NAME]) == 2)
    roots = {s.trace_id: s for s in spans if s.name == REQUEST_SPAN_NAME}
    assert set(roots) == {"1" * 32, "2" * 32}
    for s in spans:
        if s.name == "PREPROCESSING":
            assert s.parent_span_id == roots[s.trace_id].span_id


def test_a_burst_larger_than_the_export_queue_drops_and_counts_without_touching_the_mirror(traced, receiver, tmp_path):
    traced(env={"OTEL_BSP_MAX_QUEUE_SIZE": "256"}, flush_interval_s=60)
    for i in range(300):  # 300 requests x 2 spans in one flush: more than twice the queue
        fdt.trace_print(E.PREPROCESSING_START, f"burst-{i}")
        fdt.trace_print(E.PREPROCESSING_END, f"burst-{i}")
        fdt.finish_request(f"burst-{i}")
    assert fdt.flush(timeout=10)
    st = fdt.shutdown()
    assert st["spans_built"] == 600 and st["spans_dropped_export_queue"] > 0
    assert st["spans_exported"] + st["spans_dropped_export_queue"] + st["spans_export_failed"] == 600
    assert len(receiver.store.spans()) == st["spans_exported"]
    assert len(read_mirror(str(tmp_path / "log"))) == 600  # every event kept its line


class _Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no str for you")


def test_odd_users_neither_lose_lines_nor_get_confused(traced, tmp_path):
    traced(mode="local")
    for i, user in enumerate([True, 1, 1.0, _Unprintable()]):
        fdt.trace_print(E.PREPROCESSING_START, f"u-{i}", user)
    try:
        raise KeyError("boom")
    except KeyError as exc:
        fdt.record_error("u-3", exc)
    fdt.flush()
    users = [l["user_id"] for l in read_mirror(str(tmp_path / "log"))]
    assert users == ["True", "1", "1.0", "<unprintable _Unprintable>"]
    assert "[request_id=u-3]" in (tmp_path / "log" / "error.log").read_text()


def test_calls_from_the_top_of_a_thread_never_raise(traced):
    """finish_request as a thread's very first frame: no caller frame to name, and still recorded."""
    import _thread

    traced(mode="local")
    before = fdt.stats()["records"]
    _thread.start_new_thread(fdt.finish_request, ("top",))
    _thread.start_new_thread(fdt.record_error, ("top", ValueError("x")))
    deadline = time.monotonic() + 5
    while fdt.stats()["records"] - before < 2 and time.monotonic() < deadline:
        fdt.flush()
        time.sleep(0.05)
    assert fdt.stats()["records"] - before == 2


class _Hostile:
    """Everything Python may call on it raises."""

    def __str__(self) -> str:
        raise RuntimeError("str")

    __repr__ = __str__

    def __hash__(self) -> int:
        raise RuntimeError("hash")

    def __eq__(self, other: object) -> bool:
        raise RuntimeError("eq")


class _BadMapping(dict):
    def __iter__(self):
        raise RuntimeError("iter")

    def keys(self):
        raise RuntimeError("keys")

    def __len__(self) -> int:
        return 1


def test_hostile_objects_never_raise_and_never_spoil_another_request(tmp_path):
    log_dir = str(tmp_path / "log")
    fdt.configure(env={}, mode="local", log_dir=log_dir, flush_interval_s=60)
    bad = _Hostile()
    fdt.trace_print(E.PREPROCESSING_START, "ok-before", "u")
    fdt.trace_print(bad, "x")  # event
    fdt.trace_print(E.PREPROCESSING_START, bad, bad)  # request id and user
    fdt.trace_print(E.PREPROCESSING_END, "ok-before", "u", weird=bad, listed=[bad, 1])
    fdt.extract("x", _BadMapping())
    assert fdt.inject(bad) == {}  # its failure is logged with the id as text, never raised
    fdt.record_error(bad, bad)
    fdt.finish_request(bad)
    fdt.abort_request(bad, bad)
    fdt.trace_print(E.PREPROCESSING_START, "ok-after", "u")
    fdt.flush()
    st = fdt.shutdown()
    rids = [x["request_id"] for x in read_mirror(log_dir)]
    assert rids.count("ok-before") == 2 and rids.count("ok-after") == 1
    assert "<unprintable _Hostile>" in rids
    assert st["unknown_events"] == 1 and st["bad_carriers_at_call"] == 1 and st["record_failures"] == 0


def test_configure_while_threads_trace_loses_nothing(tmp_path):
    log_dir = str(tmp_path / "log")
    fdt.configure(env={}, mode="local", log_dir=log_dir, flush_interval_s=0.01)
    per_thread, threads = 3000, 4
    go = threading.Event()

    def work(t: int) -> None:
        go.wait()
        for i in range(per_thread):
            fdt.trace_print(E.PREPROCESSING_START, f"c-{t}-{i}", "u")

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    go.set()
    reconfigured = 0
    while any(w.is_alive() for w in workers) or reconfigured < 5:
        fdt.configure(env={}, mode="local", log_dir=log_dir, flush_interval_s=0.01)
        reconfigured += 1
        time.sleep(0.005)
    for w in workers:
        w.join()
    fdt.shutdown()
    assert reconfigured >= 5
    assert len(read_mirror(log_dir)) == per_thread * threads


def test_attribute_values_of_an_applications_own_types_reach_the_collector(traced, receiver):
    """A str subclass or an IntEnum of the application's (here of a module the export process cannot
    import) is sent as the builtin value: pickled as itself it would stop the export process."""
    import enum

    Tier = enum.IntEnum("Tier", {"GPU": 1})
    Tier.__module__ = "no_such_module_of_the_application"
    Name = type("Name", (str,), {"__module__": "no_such_module_of_the_application"})
    traced()
    fdt.trace_print(E.PREPROCESSING_START, "own-types", "u", tier=Tier.GPU, label=Name("blue"), tiers=[Tier.GPU])
    fdt.trace_print(E.PREPROCESSING_END, "own-types", "u")
    fdt.finish_request("own-types")
    assert fdt.flush(timeout=10)
    spans = receiver.store.wait_for(lambda s: any(x.name == "PREPROCESSING" for x in s))
    (pre,) = [s for s in spans if s.name == "PREPROCESSING"]
    assert pre.attributes["fastdeploy.tier"] == 1 and pre.attributes["fastdeploy.label"] == "blue"
    assert pre.attributes["fastdeploy.tiers"] == [1]
    st = fdt.stats()
    assert st["spans_exported"] == st["spans_built"] and st["spans_lost_at_shutdown"] == 0
