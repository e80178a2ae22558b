"""The export channel under faults production meets: a collector that refuses, hangs, answers
503/429 or is slow, over gRPC and HTTP; bursts; huge values; the OTel limits."""

from __future__ import annotations

import logging
import time

import pytest

import fastdeploy_otel as fdt
from bench.faults import FAULTS, collector_run, run_request
from fastdeploy_otel import api
from fastdeploy_otel._limits import TRUNCATED
from fastdeploy_otel.events import LoggingEventName as E
from tests.support.helpers import read_mirror
from tests.support.lifecycles import MIXED
from tests.support.receiver import BlackHole, OtlpReceiver

DEADLINE_S = 2.0  # the suite's shutdown deadline (the 5 s default has a test of its own)


SPANS_PER_REQUEST = 10  # MIXED: the request span, 5 stages, 4 sub-stages


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
@pytest.mark.parametrize("fault", FAULTS)
def test_a_faulty_collector_changes_nothing_for_trace_log_and_shutdown_keeps_its_deadline(protocol, fault, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="fastdeploy_otel")
    log_dir = str(tmp_path / "log")
    r = collector_run(protocol, fault, log_dir, requests=20, deadline_s=DEADLINE_S)
    assert r.with_lines == 20  # every request got its lines ...
    assert r.max_line_lag_s < 1.0, r.max_line_lag_s  # ... within 1 s of its end
    assert r.shutdown_s < DEADLINE_S + 0.5, f"shutdown took {r.shutdown_s:.2f}s"
    st = r.stats
    accounted = (st["spans_exported"] + st["spans_export_failed"] + st["spans_lost_at_shutdown"]
                 + st["spans_dropped_export_queue"])
    assert st["spans_built"] == 20 * SPANS_PER_REQUEST and accounted == st["spans_built"], st  # exported or counted
    if st["spans_lost_at_shutdown"]:
        lost_lines = [r.getMessage() for r in caplog.records if "could not be exported within" in r.getMessage()]
        assert len(lost_lines) == 1 and "trace.log" in lost_lines[0]
    if fault == "slow":  # a slow but healthy collector gets some through; whatever it did not is counted
        # (an export still unanswered at the deadline counts as lost even if the collector has it)
        assert r.received > 0 and r.received >= st["spans_exported"]
    else:
        assert st["spans_exported"] == 0
        assert st["spans_export_failed"] + st["spans_lost_at_shutdown"] > 0
    assert len(read_mirror(log_dir)) == 20 * len(MIXED)


def test_shutdown_default_deadline_is_five_seconds_with_a_hung_collector(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="fastdeploy_otel")
    hole = BlackHole()
    try:
        fdt.configure(env={}, mode="all", log_dir=str(tmp_path / "log"), endpoint=hole.endpoint)
        for i in range(10):
            run_request(f"hang-{i}")
        assert fdt.flush(timeout=0.5) is False  # flush keeps its deadline too, and says it was cut short
        t0 = time.monotonic()
        st = fdt.shutdown()
        elapsed = time.monotonic() - t0
    finally:
        hole.close()
    assert 4.0 < elapsed < 5.6, elapsed
    assert st["spans_lost_at_shutdown"] + st["spans_export_failed"] == st["spans_built"] == 10 * SPANS_PER_REQUEST
    assert len(read_mirror(str(tmp_path / "log"))) == 10 * len(MIXED)


def test_export_failing_then_recovering_is_said_once_each(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="fastdeploy_otel")
    with OtlpReceiver() as rx:
        rx.fault.mode = "unavailable"
        fdt.configure(env={"OTEL_EXPORTER_OTLP_TIMEOUT": "500"}, mode="all", log_dir=str(tmp_path / "log"),
                      endpoint=rx.grpc_endpoint, bsp={"schedule_delay_millis": 50})
        run_request("down-1")
        assert fdt.flush(timeout=5)
        rx.fault.mode = "ok"
        run_request("up-1")
        assert fdt.flush(timeout=5)
        spans = rx.store.wait_for(lambda s: any(x.attributes.get("fastdeploy.request_id") == "up-1" for x in s))
        st = fdt.shutdown()
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if "is failing" in m]) == 1
    assert len([m for m in messages if "recovered" in m]) == 1
    assert st["spans_export_failed"] == SPANS_PER_REQUEST == st["spans_exported"] == len(spans)


def test_one_huge_value_costs_no_other_request_its_spans(tmp_path, receiver):
    """A collector's 4 MiB gRPC limit (the receiver's default) against 1 MB values."""
    receiver.store.clear()
    fdt.configure(env={}, mode="all", log_dir=str(tmp_path / "log"), endpoint=receiver.grpc_endpoint,
                  bsp={"schedule_delay_millis": 1000, "max_export_batch_size": 64})
    huge = "x" * 1_000_000
    for i in range(60):
        rid = f"big-{i}"
        user = huge if i == 7 else "u"
        extra = {"note": huge} if i % 10 == 3 else {}  # six requests carry a 1 MB attribute
        fdt.trace_print(E.PREPROCESSING_START, rid, user, **extra)
        fdt.trace_print(E.PREPROCESSING_END, rid, user)
        fdt.finish_request(rid)
    fdt.trace_print(E.PREPROCESSING_START, "giant", "u", note="y" * 5_000_000)  # bigger than a message
    fdt.finish_request("giant")
    assert fdt.flush(timeout=20)
    st = fdt.shutdown()
    spans = receiver.store.spans()
    rids = {s.attributes["fastdeploy.request_id"] for s in spans}
    assert rids == {f"big-{i}" for i in range(60)} | {"giant"}
    assert st["spans_export_failed"] == 0 and st["spans_exported"] == len(spans) == 60 * 2 + 2
    users = {s.attributes.get("fastdeploy.user_id", "") for s in spans if s.attributes["fastdeploy.request_id"] == "big-7"}
    assert all(len(u) < 300 and u.endswith("chars)") for u in users)  # a client's value is capped
    giant = [s for s in spans if s.attributes["fastdeploy.request_id"] == "giant" and s.name == "PREPROCESSING"]
    assert giant[0].attributes[TRUNCATED] is True and len(giant[0].attributes["fastdeploy.note"]) < 10_000
    assert st["spans_truncated"] >= 1


def test_otel_limits_apply_to_the_spans_we_hand_over(tmp_path, receiver):
    receiver.store.clear()
    fdt.configure(env={"OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT": "10", "OTEL_SPAN_EVENT_COUNT_LIMIT": "2",
                       "OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT": "5"},
                  mode="all", log_dir=str(tmp_path / "log"), endpoint=receiver.grpc_endpoint)
    fdt.trace_print(E.REQUEST_SCHEDULE_START, "lim", "u", a="abcdefghijklmnop", b=1, c=2, d=3, e=4, f=5)
    for _ in range(5):
        fdt.trace_print(E.CACHE_MISS, "lim", "u", missed_tokens=3)
    fdt.trace_print(E.REQUEST_SCHEDULE_END, "lim", "u")
    fdt.finish_request("lim")
    fdt.flush(timeout=5)
    receiver.store.wait_for(lambda s: any(x.name == "SCHEDULE" for x in s))
    sched = [s for s in receiver.store.spans() if s.name == "SCHEDULE"][0]
    fdt.shutdown()
    assert len(sched.events) == 2
    assert len(sched.attributes) <= 5
    assert all(len(v) <= 10 for v in sched.attributes.values() if isinstance(v, str))


def test_a_hung_collector_never_delays_trace_log_under_a_burst(tmp_path):
    """The original failure: a burst over half the queue while the collector is down stalled the worker."""
    hole = BlackHole()
    log_dir = str(tmp_path / "log")
    try:
        fdt.configure(env={"OTEL_BSP_MAX_QUEUE_SIZE": "200"}, mode="all", log_dir=log_dir, endpoint=hole.endpoint,
                      shutdown_timeout_s=1)
        for i in range(100):  # 1,000 spans into a 200-span queue, in one flush interval
            run_request(f"burst-{i}")
        t0 = time.monotonic()
        while len(read_mirror(log_dir)) < 100 * len(MIXED) and time.monotonic() - t0 < 5:
            time.sleep(0.02)
        first = time.monotonic() - t0
        for i in range(50):
            run_request(f"after-{i}")
        t1 = time.monotonic()
        while len(read_mirror(log_dir)) < 150 * len(MIXED) and time.monotonic() - t1 < 5:
            time.sleep(0.02)
        second = time.monotonic() - t1
        st = api.stats()
        st = fdt.shutdown()
    finally:
        hole.close()
    assert first < 1.0 and second < 1.0, (first, second)
    assert st["spans_dropped_export_queue"] >= 100 * SPANS_PER_REQUEST - 200 - 64 * 4
    assert st["spans_built"] == 150 * SPANS_PER_REQUEST
