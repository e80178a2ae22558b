"""The FastDeploy replacements in-process (``_fd_takeover``), without the stand-in's processes.

FastDeploy's ``LoggingEventName`` is a plain Enum (not a str Enum); these tests build one like it.
"""

from __future__ import annotations

import threading
from enum import Enum
from pathlib import Path
from typing import Iterator

import pytest

import fastdeploy_otel as fdt
from fastdeploy_otel import _fd_takeover as takeover
from tests.support.helpers import read_mirror
from tests.support.lifecycles import MIXED

FDEventName = Enum("LoggingEventName", {e.name: e.value for e in fdt.LoggingEventName})
Odd = Enum("Odd", {"UNHASHABLE": ["PREPROCESSING_START"], "NEW_IN_FASTDEPLOY": "NEW_IN_FASTDEPLOY"})


@pytest.fixture
def local(tmp_path: Path) -> Iterator[str]:
    """Tracing in mode local, FastDeploy's events mapped; every takeover table forgotten afterwards."""
    log_dir = str(tmp_path / "log")
    takeover.map_events(FDEventName)
    takeover.map_events(Odd)
    fdt.configure(env={}, mode="local", log_dir=log_dir, flush_interval_s=0.05)
    yield log_dir
    fdt.shutdown()
    takeover.reset()


def test_fastdeploy_members_strings_and_unknown_events(local):
    rid = "chatcmpl-map_0"
    for ev, _ in MIXED:
        takeover.trace_print(FDEventName[ev.name], rid, "u")
    takeover.trace_print("CACHE_HIT", rid, "u")  # a string event: the slow path, recorded all the same
    takeover.trace_print(Odd.UNHASHABLE, rid, "u")  # an unhashable value: counted as unknown, never raised
    takeover.trace_print(Odd.NEW_IN_FASTDEPLOY, rid, "u")  # an event we do not know
    fdt.flush()
    lines = read_mirror(local)
    assert [line["event"] for line in lines] == [ev.value for ev, _ in MIXED] + ["CACHE_HIT"]
    assert {line["request_id"] for line in lines} == {"chatcmpl-map"}  # PREPROCESSING_START here: owned, base id
    assert all(line["file"] == "test_fd_takeover.py" for line in lines)  # FastDeploy's call site, either path
    assert fdt.stats()["unknown_events"] == 2


def test_events_without_a_user_are_recorded_with_the_call_site(local):
    rid = "chatcmpl-nouser_0"
    takeover.trace_print(FDEventName.PREPROCESSING_END, rid, None)  # joins the request
    takeover.trace_print(FDEventName.REQUEST_SCHEDULE_START, rid, None)  # the fast path
    takeover.trace_print(FDEventName.REQUEST_SCHEDULE_END, rid)
    fdt.flush()
    lines = read_mirror(local)
    assert [line["event"] for line in lines] == ["PREPROCESSING_END", "REQUEST_SCHEDULE_START", "REQUEST_SCHEDULE_END"]
    assert all(line["file"] == "test_fd_takeover.py" for line in lines)


def test_current_request_is_per_thread_and_forgotten_at_reset(local):
    takeover.trace_print(FDEventName.PREPROCESSING_END, "chatcmpl-a_0", "")  # slow path (first event)
    takeover.trace_print(FDEventName.REQUEST_SCHEDULE_START, "chatcmpl-b_0", "")
    assert takeover.current_request() == "chatcmpl-b_0"
    takeover.trace_print(FDEventName.REQUEST_SCHEDULE_START, "chatcmpl-a_0", "")  # fast path (joined)
    assert takeover.current_request() == "chatcmpl-a_0"
    seen = []

    def other() -> None:
        seen.append(takeover.current_request())
        takeover.trace_print(FDEventName.REQUEST_QUEUE_START, "chatcmpl-b_0", "")
        seen.append(takeover.current_request())

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert seen == [None, "chatcmpl-b_0"]
    assert takeover.current_request() == "chatcmpl-a_0"  # this thread's own
    takeover.reset()
    assert takeover.current_request() is None


@pytest.fixture
def spans(memory) -> Iterator[object]:
    """Spans in memory (the ``memory`` fixture), FastDeploy's events mapped; takeover tables forgotten afterwards."""
    takeover.map_events(FDEventName)
    yield memory
    takeover.reset()


def test_trace_event_is_a_span_event_on_the_open_stage_or_sub_stage(spans):
    rid, base = "chatcmpl-ev_0", "chatcmpl-ev"
    takeover.trace_print(FDEventName.PREPROCESSING_START, rid, "")  # owned here: recorded under the base id
    takeover.trace_print(FDEventName.PREPROCESSING_END, rid, "")
    takeover.trace_print(FDEventName.REQUEST_SCHEDULE_START, rid, "")
    takeover.trace_print(FDEventName.REQUEST_QUEUE_START, rid, "")
    takeover.trace_event("queued_behind", base, ts=1_700_000_000_123_456_789, attrs={"depth": 3})
    takeover.trace_print(FDEventName.REQUEST_QUEUE_END, rid, "")
    takeover.trace_event("picked", rid)  # the choice id finds the same request; no time: now
    takeover.trace_event("nobody", "chatcmpl-unknown")  # a request not traced here: nothing, no error
    takeover.trace_print(FDEventName.REQUEST_SCHEDULE_END, rid, "")
    fdt.finish_request(base)
    fdt.flush()
    by_name = {s.name: s for s in spans.get_finished_spans()}
    (queued,) = by_name["REQUEST_QUEUE"].events
    assert (queued.name, queued.timestamp, dict(queued.attributes)) == ("queued_behind", 1_700_000_000_123_456_789,
                                                                       {"fastdeploy.depth": 3})
    (picked,) = by_name["SCHEDULE"].events
    assert picked.name == "picked" and by_name["REQUEST_QUEUE"].end_time <= picked.timestamp
    assert picked.timestamp <= by_name["SCHEDULE"].end_time
    assert not any("queued_behind" in k or "picked" in k for s in by_name.values() for k in s.attributes)
    assert fdt.stats()["orphan_span_events"] == 0


def test_trace_event_before_the_request_is_traced_here_is_counted_not_misplaced(spans):
    takeover.trace_req_start("chatcmpl-early")  # the API server owns it; no event recorded yet
    takeover.trace_event("before_preprocessing", "chatcmpl-early")
    takeover.trace_print(FDEventName.PREPROCESSING_START, "chatcmpl-early_0", "")
    takeover.trace_print(FDEventName.PREPROCESSING_END, "chatcmpl-early_0", "")
    fdt.finish_request("chatcmpl-early")
    fdt.flush()
    assert fdt.stats()["orphan_span_events"] == 1
    assert {s.name for s in spans.get_finished_spans()} == {"PREPROCESSING", "fastdeploy.request"}
    assert not [e for s in spans.get_finished_spans() for e in s.events if e.name == "before_preprocessing"]


def test_each_of_n_choices_hands_its_postprocessing_back_and_is_finished_in_the_engine(spans):
    """The engine side of n=2: FastDeploy asks for the carrier (base id) just before each choice's
    POSTPROCESSING_START; the last choice to join finishes first."""
    base, trace_id = "chatcmpl-n2", "0af7651916cd43dd8448eb211c80319c"
    takeover.receive(base, {"root_span": {"traceparent": f"00-{trace_id}-b7ad6b7169203331-01"}, "prev_span": "None"})
    for rid in (f"{base}_0", f"{base}_1"):
        for ev in (FDEventName.PREPROCESSING_END, FDEventName.INFERENCE_START, FDEventName.INFERENCE_END):
            takeover.trace_print(ev, rid, "")
    carriers = {}
    for rid in (f"{base}_1", f"{base}_0"):
        carriers[rid] = takeover.trace_get_proc_propagate_context(base)
        takeover.trace_print(FDEventName.POSTPROCESSING_START, rid, "")
    fdt.flush()
    for rid, carrier in carriers.items():
        ours = carrier[takeover.CARRIER_KEY]
        assert ours["traceparent"].split("-")[1] == trace_id, rid
        assert "POSTPROCESSING" in ours.get("fastdeploy-stages", ""), (rid, ours)  # this choice's, handed over
    assert carriers[f"{base}_0"][takeover.CARRIER_KEY] != carriers[f"{base}_1"][takeover.CARRIER_KEY]
    assert fdt.stats()["requests_in_flight"] == 0  # both choices finished here, none left to the TTL
    assert {s.name for s in spans.get_finished_spans()} >= {"PREFILL", "DECODE"}
    assert "POSTPROCESSING" not in {s.name for s in spans.get_finished_spans()}  # the API server ends it


def test_tracking_tables_stay_bounded_and_keep_the_newest():
    from fastdeploy_otel._fd_takeover import _MAX_TRACKED, _remember

    table: dict = {}
    for i in range(2 * _MAX_TRACKED + 7):
        _remember(table, f"req-{i}", i)
    assert len(table) <= _MAX_TRACKED
    newest = 2 * _MAX_TRACKED + 6
    assert table[f"req-{newest}"] == newest and "req-0" not in table
    assert min(table.values()) > newest - _MAX_TRACKED  # only the oldest were forgotten
