"""The library under faults that production meets: a collector that refuses, hangs, answers 503/429
or is slow; bursts; hostile values; configure() under load.  Real receivers on 127.0.0.1 throughout.

Rotation across midnight and full or read-only disks are in test_logfiles.py.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import pytest

import fastdeploy_otel as fdt
from fastdeploy_otel import api
from fastdeploy_otel._errorlog import CONTINUATION
from fastdeploy_otel.events import LoggingEventName as E
from tests.support.lifecycles import MIXED
from fastdeploy_otel._limits import TRUNCATED
from fastdeploy_otel.mirror import LINE_RE
from tests.support.receiver import BlackHole, OtlpReceiver

from bench.faults import FAULTS, collector_run, run_request

from .conftest import read_mirror

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
        assert r.received == st["spans_exported"] > 0
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


FORGED_HEAD = "ERROR    2026-01-01 00:00:00,000 1 x.py[line:1] request[FORGED] failed: X: y [request_id=FORGED]"


def test_no_client_value_can_start_a_line_in_trace_log_or_error_log(tmp_path):
    log_dir = str(tmp_path / "log")
    fdt.configure(env={}, mode="local", log_dir=log_dir)
    hostile = ["r\n" + FORGED_HEAD, "r\r\nINFO     forged", "r\u2028x", "r\x85y", "r]\n[event=X] ", "r\x00\x1b[31m"]
    for i, rid in enumerate(hostile):
        fdt.trace_print(E.PREPROCESSING_START, rid, "user\n" + FORGED_HEAD)
        try:
            raise ValueError(f"bad\n{FORGED_HEAD}\n\u2028{FORGED_HEAD}")
        except ValueError as exc:
            fdt.record_error(rid, exc)
        fdt.record_error(rid, "plain text\n" + FORGED_HEAD)
    st = fdt.shutdown()
    with open(os.path.join(log_dir, "trace.log"), encoding="utf-8") as f:
        trace_lines = f.read().split("\n")[:-1]
    assert len(trace_lines) == len(hostile) and all(LINE_RE.match(x) for x in trace_lines)
    with open(os.path.join(log_dir, "error.log"), encoding="utf-8") as f:
        text = f.read()
    lines = text.split("\n")[:-1]
    heads = [x for x in lines if not x.startswith(CONTINUATION)]
    assert len(heads) == 2 * len(hostile) and st["error_log_lines"] == len(lines)
    assert all(x.startswith("ERROR    ") and "request[FORGED]" not in x.split(" failed:")[0] for x in heads)
    for sep in ("\r", "\u2028", "\x85", "\x0b", "\x0c"):
        assert sep not in text  # nothing else a reader may take for a line break
    assert "RequestError: plain text\\x0aERROR" in text  # record_error(rid, "text") is recorded, escaped


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
