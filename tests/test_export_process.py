"""OTLP export from the side process (``_export_process``), the way it breaks in production: the
child killed or frozen, the serving process killed, a backlog beyond the outbox."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import fastdeploy_otel as fdt
from fastdeploy_otel import _export_process
from fastdeploy_otel import api as fdt_api
from tests.support.helpers import read_mirror
from tests.support.lifecycles import MIXED

SPANS_PER_MIXED = 10


def replay(rid: str) -> None:
    for event, attrs in MIXED:
        fdt.trace_print(event, rid, "alice", **attrs)
    fdt.finish_request(rid)


def channel():
    rt = fdt_api._runtime
    assert rt is not None and rt.sink is not None
    return rt.sink.process


def accounted(st: dict) -> int:
    return (
        st["spans_exported"] + st["spans_export_failed"] + st["spans_dropped_export_queue"] + st["spans_lost_at_shutdown"]
    )


@pytest.mark.parametrize("encoder", ["fastdeploy", "sdk"])
def test_spans_go_through_a_child_with_the_serving_process_resource(traced, receiver, encoder):
    traced(export_encoder=encoder)
    proc = channel()._proc
    assert proc is not None and proc.pid != os.getpid()
    for i in range(20):
        replay(f"xp-{i}")
    assert fdt.flush(10)
    st = fdt.stats()
    assert st["spans_built"] == 20 * SPANS_PER_MIXED
    assert st["spans_exported"] == st["spans_built"] and accounted(st) == st["spans_built"]
    spans = receiver.store.wait_for(lambda s: len(s) >= 20 * SPANS_PER_MIXED)
    request = next(s for s in spans if s.name == "fastdeploy.request")
    assert request.resource["process.pid"] == os.getpid()  # the serving process, not the exporter
    assert {s.name for s in spans} >= {"PREPROCESSING", "SCHEDULE", "PREFILL", "DECODE", "POSTPROCESSING"}
    fdt.shutdown()
    assert proc.poll() is not None  # the child went with the runtime


def test_off_switch_exports_in_process(traced, receiver):
    traced(export_process=False)
    assert channel() is None
    replay("inproc")
    assert fdt.flush(10)
    assert fdt.stats()["spans_exported"] == SPANS_PER_MIXED


def test_a_killed_child_is_restarted_and_its_spans_are_counted(traced, receiver, caplog):
    caplog.set_level(logging.ERROR, logger="fastdeploy_otel")
    traced()
    first = channel()._proc
    for i in range(10):
        replay(f"before-{i}")
    assert fdt.flush(10)
    os.kill(first.pid, signal.SIGKILL)
    first.wait(5)
    for i in range(10):
        replay(f"after-{i}")
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:  # restarted after its back-off (1 s), then the rest arrives
        if fdt.flush(2) and fdt.stats()["spans_exported"] >= 20 * SPANS_PER_MIXED - fdt.stats()["spans_lost_at_shutdown"]:
            break
    st = fdt.stats()
    assert channel()._proc is not None and channel()._proc.pid != first.pid
    assert accounted(st) == st["spans_built"] == 20 * SPANS_PER_MIXED
    assert st["spans_exported"] >= 10 * SPANS_PER_MIXED  # the first ten were exported before the kill
    said = [r.getMessage() for r in caplog.records if "export process" in r.getMessage() and "exited" in r.getMessage()]
    assert len(said) == 1, said
    received = {s.attributes.get("fastdeploy.request_id") for s in receiver.store.spans()}
    assert {f"after-{i}" for i in range(10)} <= received


def test_a_frozen_child_neither_blocks_serving_nor_the_shutdown_deadline(traced, receiver, monkeypatch):
    monkeypatch.setattr(_export_process, "_PIPE_SIZE", 64 * 1024)
    monkeypatch.setattr(_export_process, "_MAX_OUTBOX_BYTES", 128 * 1024)
    traced()
    child = channel()._proc
    os.kill(child.pid, signal.SIGSTOP)
    try:
        worst = 0.0
        for i in range(600):  # far more than the pipe and the outbox hold
            t0 = time.perf_counter()
            replay(f"frozen-{i}")
            worst = max(worst, time.perf_counter() - t0)
            if i % 50 == 0:
                fdt_api._runtime.flush()  # the worker's flush: pumps, never waits on the child
        t0 = time.perf_counter()
        fdt_api._runtime.flush()
        assert time.perf_counter() - t0 < 0.5
        assert worst < 0.5  # a blocked write would hang here; the GIL on a loaded box costs ms
        assert fdt.stats()["spans_dropped_export_queue"] > 0
        t0 = time.monotonic()
        st = fdt.shutdown(timeout=1.0)
        assert time.monotonic() - t0 < 2.0
    finally:
        try:
            os.kill(child.pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
    assert child.poll() is not None  # killed at the deadline
    assert accounted(st) == st["spans_built"] == 600 * SPANS_PER_MIXED
    assert st["spans_lost_at_shutdown"] > 0


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_a_killed_serving_process_still_gets_its_pumped_spans_out(receiver, tmp_path, protocol):
    """SIGKILL of the serving process: the child sees EOF and exports what it was sent."""
    endpoint = receiver.grpc_endpoint if protocol == "grpc" else receiver.http_endpoint
    script = textwrap.dedent(f"""
        import os, signal, sys, time
        sys.path.insert(0, {os.getcwd()!r})
        import fastdeploy_otel as fdt
        from tests.support.lifecycles import MIXED
        fdt.configure(env={{}}, mode="all", log_dir={str(tmp_path)!r}, endpoint={endpoint!r},
                      protocol={protocol!r}, flush_interval_s=0.05)
        for i in range(5):
            for event, attrs in MIXED:
                fdt.trace_print(event, f"killed-{{i}}", "bob", **attrs)
            fdt.finish_request(f"killed-{{i}}")
        time.sleep(0.5)  # a few worker flushes: assembled and pumped to the child
        print(fdt.api._runtime.sink.process._proc.pid, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    receiver.store.clear()
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert res.returncode == -signal.SIGKILL, res.stderr
    child = int(res.stdout.split()[0])
    spans = receiver.store.wait_for(lambda s: len(s) >= 5 * SPANS_PER_MIXED, timeout=15)
    assert {s.attributes.get("fastdeploy.request_id") for s in spans} >= {f"killed-{i}" for i in range(5)}
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{child}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{child}")  # and it did not outlive its parent


class Unpicklable(str):
    """A str subclass (so it passes as an attribute value) that refuses to be pickled."""

    def __reduce_ex__(self, protocol):
        raise TypeError("not today")


def test_a_span_that_cannot_be_pickled_is_dropped_alone_and_counted(traced, receiver, caplog):
    """Our own spans carry only builtin values (attributes.clean); an application's SDK span through
    our provider may carry anything, and the one that cannot be pickled is the only one lost."""
    caplog.set_level(logging.WARNING, logger="fastdeploy_otel")
    traced()
    replay("fine-1")
    fdt.trace_print("PREPROCESSING_START", "odd", "alice", weird=Unpicklable("x"))  # sent as a plain "x"
    fdt.trace_print("PREPROCESSING_END", "odd")
    fdt.finish_request("odd")
    fdt.get_tracer_provider().get_tracer("app").start_span("app-span", attributes={"weird": Unpicklable("y")}).end()
    replay("fine-2")
    assert fdt.flush(10)
    st = fdt.stats()
    assert st["spans_dropped_export_queue"] == 1
    assert accounted(st) == st["spans_built"] + 1  # ours, and the application's span
    spans = receiver.store.wait_for(lambda s: len(s) >= 21)
    assert {"fine-1", "fine-2", "odd"} <= {s.attributes.get("fastdeploy.request_id") for s in spans}
    (odd,) = [s for s in spans if s.name == "PREPROCESSING" and s.attributes.get("fastdeploy.request_id") == "odd"]
    assert odd.attributes["fastdeploy.weird"] == "x"
    assert not any(s.name == "app-span" for s in spans)
    assert any("cannot be sent to the export process" in r.getMessage() for r in caplog.records)


def test_a_flush_the_child_cannot_finish_in_time_returns_false(tmp_path):
    """The child's own flush result travels back: a hung collector makes flush() say False."""
    from tests.support.receiver import BlackHole

    hole = BlackHole()
    try:
        fdt.configure(env={}, mode="all", log_dir=str(tmp_path / "log"), endpoint=hole.endpoint)
        assert fdt.flush(timeout=10) is True  # nothing queued: the child is up and answers at once
        for i in range(5):
            replay(f"hung-{i}")
        t0 = time.monotonic()
        assert fdt.flush(timeout=0.5) is False
        assert time.monotonic() - t0 < 1.0
        st = fdt.shutdown(timeout=1.0)
    finally:
        hole.close()
    assert accounted(st) == st["spans_built"] == 5 * SPANS_PER_MIXED


# ---- the trace.log mirror, written by the export process -----------------------------------------------
LINES_PER_MIXED = len(MIXED)


def mirrored(tmp_path) -> list[dict[str, str]]:
    return read_mirror(str(tmp_path / "log"))


def test_the_child_writes_the_mirror_with_the_serving_process_pid(traced, tmp_path):
    traced()
    assert fdt.flush(10)  # the child has answered: it is up (until then this process writes the lines)
    for i in range(20):
        replay(f"lines-{i}")
    assert fdt.flush(10)
    lines = mirrored(tmp_path)
    assert len(lines) == 20 * LINES_PER_MIXED
    assert {line["pid"] for line in lines} == {str(os.getpid())}  # the serving process's, not the child's
    assert fdt_api._runtime.mirror.lines_written == 0 and channel().lines_written == 20 * LINES_PER_MIXED
    assert fdt.stats()["mirror_lines"] == 20 * LINES_PER_MIXED and fdt.stats()["mirror_lines_failed"] == 0


def test_a_killed_child_loses_no_line(traced, tmp_path):
    """The batches a dead child had not said it wrote are written here: every line at least once."""
    traced()
    assert fdt.flush(10)  # the child is up and takes the lines
    for i in range(10):
        replay(f"kill-{i}")
    fdt_api._runtime.flush()  # handed to the child, maybe not written yet
    first = channel()._proc
    os.kill(first.pid, signal.SIGKILL)
    first.wait(5)
    for i in range(10, 20):
        replay(f"kill-{i}")
    fdt.flush(5)
    expected = {(f"kill-{i}", event.name) for i in range(20) for event, _ in MIXED}
    deadline = time.monotonic() + 10
    while {(line["request_id"], line["event"]) for line in mirrored(tmp_path)} != expected:
        assert time.monotonic() < deadline, len(mirrored(tmp_path))
        time.sleep(0.1)
    # A batch can be written twice only if the child died between writing it and saying so.
    assert len(mirrored(tmp_path)) <= len(expected) + 10 * LINES_PER_MIXED


def test_a_frozen_child_lines_are_written_here_after_the_stale_time(traced, tmp_path, monkeypatch):
    monkeypatch.setattr(_export_process, "_LINES_STALE_S", 0.5)
    traced()
    assert fdt.flush(5)  # the child is up and answering
    child = channel()._proc
    os.kill(child.pid, signal.SIGSTOP)
    try:
        for i in range(10):
            replay(f"frozen-lines-{i}")
        expected = {(f"frozen-lines-{i}", event.name) for i in range(10) for event, _ in MIXED}
        t0 = time.monotonic()
        while {(line["request_id"], line["event"]) for line in mirrored(tmp_path)} != expected:
            assert time.monotonic() - t0 < 5, len(mirrored(tmp_path))
            time.sleep(0.05)
        assert fdt_api._runtime.mirror.lines_written >= len(expected)  # here, not by the frozen child
        assert fdt.flush(timeout=0.3) is False
    finally:
        os.kill(child.pid, signal.SIGCONT)
    replay("after-thaw")
    assert fdt.flush(10)
    assert {line["request_id"] for line in mirrored(tmp_path)} >= {"after-thaw"}


def test_until_the_child_has_answered_the_lines_are_written_here(traced, tmp_path):
    """A starting child takes about half a second: lines must not wait for it."""
    traced()
    replay("early")
    fdt_api._runtime.flush()  # the worker's flush, before anyone read an answer from the child
    assert [line["event"] for line in mirrored(tmp_path)] == [event.name for event, _ in MIXED]
    assert fdt_api._runtime.mirror.lines_written == LINES_PER_MIXED


def test_lines_wait_ahead_of_spans_for_a_child_behind(traced, monkeypatch):
    """A child behind on encoding spans must not hold trace.log back: line batches queue ahead of
    the span frames waiting for it, in their own order."""
    monkeypatch.setattr(_export_process, "_PIPE_SIZE", 64 * 1024)
    monkeypatch.setattr(_export_process, "_LINES_STALE_S", 60.0)
    traced()
    assert fdt.flush(5)
    child = channel()._proc
    os.kill(child.pid, signal.SIGSTOP)
    try:
        for i in range(200):
            replay(f"behind-{i}")
            if i % 20 == 0:
                fdt_api._runtime.flush()
        fdt_api._runtime.flush()
        frames = list(channel()._outbox)[1:]  # the head may be a frame begun
        kinds = ["lines" if f.lines else "spans" if f.spans else "control" for f in frames]
        assert "lines" in kinds and "spans" in kinds, kinds
        assert kinds.index("spans") > max(i for i, k in enumerate(kinds) if k == "lines"), kinds
        numbers = [f.lines for f in frames if f.lines]
        assert numbers == sorted(numbers)
    finally:
        os.kill(child.pid, signal.SIGCONT)


def test_frames_marshal_builtin_values_and_pickle_the_rest():
    """Spans and mirror lines cross the pipe by marshal (quicker in the serving process); a value
    marshal cannot write (the settings in hello, an application's type) goes by pickle, whole."""
    from fractions import Fraction

    from fastdeploy_otel._export_process import _HEADER, _frame, _unframe

    spans = ("spans", [("SCHEDULE", 1 << 127, 7, {"k": [1.5, True], "t": (1, 2)}, [("e", 3, {})], None)])
    frame = _frame(spans)
    assert _HEADER.unpack(frame[:4])[0] == len(frame) - 4
    assert frame[4:5] == b"m" and _unframe(frame[4:]) == spans
    odd = ("lines", 1, [(1, "engine.py", Fraction(1, 3))])
    frame = _frame(odd)
    assert frame[4:5] == b"p" and _unframe(frame[4:]) == odd
