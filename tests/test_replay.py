"""`fastdeploy-otel replay`: trace.log files, FastDeploy's own and our mirror, back into spans."""

from __future__ import annotations

import gzip
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest

import fastdeploy_otel as fdt
from fastdeploy_otel.events import LoggingEventName as E
from fastdeploy_otel.span_plan import REQUEST_SPAN_NAME
from fastdeploy_otel.tools import cli
from fastdeploy_otel.tools.logfiles import read_blocks
from fastdeploy_otel.tools.replay import base_request_id
from fastdeploy_otel.tools.spans import Span, read_spans
from fastdeploy_otel.tools.spanstates import JsonLinesWriter, to_span
from fastdeploy_otel.tools.tracelog import parse, parse_many, split_lines
from tests.support.fdlogs import FdLog
from tests.support.lifecycles import MIXED, PD_DECODE, PD_PREFILL

CLI = [sys.executable, "-m", "fastdeploy_otel.tools.cli"]
T0 = 1777342502118  # 2026-04-28 10:15:02.118 in Asia/Shanghai; asctime is never used


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "FD_"))}
    env.update(extra)
    return env


def replay(capsys, *args: str) -> tuple[int, str, str]:
    rc = cli.main(["replay", "--no-progress", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def fd_events(rid: str, start: int, lifecycle=MIXED, step: int = 3) -> tuple[list, list]:
    """(API server events, engine events) of one request, as FastDeploy logs them: the engine and
    PREPROCESSING_START carry the per-choice id, POSTPROCESSING_END the id the client sent."""
    api, engine = [], []
    for i, (event, _) in enumerate(lifecycle):
        ts = start + i * step
        if event is E.PREPROCESSING_START:
            api.append((ts, event, f"{rid}_0"))
        elif event is E.POSTPROCESSING_END:
            api.append((ts, event, rid))
        else:
            engine.append((ts, event, f"{rid}_0"))
    return api, engine


def by_trace(spans: list[Span]) -> dict[str, list[Span]]:
    out: dict[str, list[Span]] = {}
    for s in spans:
        out.setdefault(s.trace_id, []).append(s)
    return out


def tree(spans: list[Span]) -> set[tuple[str, str]]:
    """(span name, parent name) pairs: the nesting, independent of ids."""
    names = {s.span_id: s.name for s in spans}
    return {(s.name, names.get(s.parent_span_id, "")) for s in spans}


MIXED_TREE = {
    (REQUEST_SPAN_NAME, ""),
    ("PREPROCESSING", REQUEST_SPAN_NAME),
    ("SCHEDULE", REQUEST_SPAN_NAME),
    ("REQUEST_QUEUE", "SCHEDULE"),
    ("RESOURCE_ALLOCATE", "SCHEDULE"),
    ("PREPARE_PREFIX_CACHE", "SCHEDULE"),
    ("PREFILL", REQUEST_SPAN_NAME),
    ("DECODE", REQUEST_SPAN_NAME),
    ("POSTPROCESSING", REQUEST_SPAN_NAME),
    ("WRITE_CACHE_TO_STORAGE", "POSTPROCESSING"),
}


# ---- FastDeploy's formats ------------------------------------------------------------------------
def test_fastdeploy_log_with_unknown_trace_ids_gives_one_trace_per_request(tmp_path, capsys):
    api, engine = FdLog(str(tmp_path / "log" / "api")), FdLog(str(tmp_path / "log" / "engine"))
    api_events, engine_events = [], []
    for k in range(3):  # overlapping requests
        a, e = fd_events(f"chatcmpl-{k}", T0 + k * 7)
        api_events += a
        engine_events += e
    api.write(sorted(api_events, key=lambda x: x[0]))
    engine.write(sorted(engine_events, key=lambda x: x[0]))
    assert "[trace_id=unknown]" in open(api.path).read()

    rc, _, err = replay(capsys, str(tmp_path / "log"), "--jsonl", str(tmp_path / "a.jsonl"))
    assert rc == 0, err
    traces = by_trace(read_spans(tmp_path / "a.jsonl"))
    assert len(traces) == 3
    for spans in traces.values():
        assert tree(spans) == MIXED_TREE
        assert all(s.attributes["fastdeploy.replayed"] is True for s in spans)
        root = next(s for s in spans if s.name == REQUEST_SPAN_NAME)
        assert root.attributes["fastdeploy.request_id"] in {"chatcmpl-0", "chatcmpl-1", "chatcmpl-2"}
        assert not any(s.is_error or "fastdeploy.anomaly" in s.attributes for s in spans)
        schedule = next(s for s in spans if s.name == "SCHEDULE")
        assert [e["name"] for e in schedule.events] == ["CACHE_HIT", "CACHE_SWAP_IN", "CACHE_MISS"]
        assert root.end_ns - root.start_ns == (len(MIXED) - 1) * 3 * 1_000_000

    # Deterministic: the same files give the same spans, ids included.
    rc, _, _ = replay(capsys, str(tmp_path / "log"), "--jsonl", str(tmp_path / "b.jsonl"))
    assert rc == 0 and (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()


def test_first_format_and_a_trace_id_that_appears_late(tmp_path, capsys):
    """Format (i) has no trace_id at all; format (ii) writes FastDeploy's 64-bit OTel trace id,
    zero-padded, once the request has a context: the whole request joins that trace."""
    old = FdLog(str(tmp_path / "old"), fmt="i")
    a, e = fd_events("cmpl-old", T0)
    old.write(sorted(a + e, key=lambda x: x[0]))
    assert "(fdlogs.py:" in open(old.path).read() and "trace_id" not in open(old.path).read()

    new = FdLog(str(tmp_path / "new"))
    a, e = fd_events("cmpl-new", T0 + 1000)
    new.write(a)  # the API server's lines: no context when PREPROCESSING_START is printed
    new.write(e, trace_ids={"cmpl-new_0": 0xB3A91F27C4D05E6A})  # the engine's have one
    rc, _, err = replay(capsys, str(tmp_path), "--jsonl", str(tmp_path / "s.jsonl"))
    assert rc == 0, err
    traces = by_trace(read_spans(tmp_path / "s.jsonl"))
    assert len(traces) == 2 and "0000000000000000b3a91f27c4d05e6a" in traces
    for spans in traces.values():
        assert tree(spans) == MIXED_TREE


def test_pd_prefill_and_decode_instances_merge_into_one_trace(tmp_path, capsys):
    rid = "chatcmpl-pd"
    FdLog(str(tmp_path / "api")).write([(T0, E.PREPROCESSING_START, f"{rid}_0")])
    t = T0 + 2
    p_events = [(t + i, ev, f"{rid}_0") for i, (ev, _) in enumerate(PD_PREFILL) if ev is not E.PREPROCESSING_START]
    t += len(PD_PREFILL) + 5
    d_events = [(t + i, ev, f"{rid}_0") for i, (ev, _) in enumerate(PD_DECODE) if ev is not E.POSTPROCESSING_END]
    FdLog(str(tmp_path / "prefill")).write(p_events)
    FdLog(str(tmp_path / "decode")).write(d_events)
    FdLog(str(tmp_path / "api"), file_name="trace.log.1").write([(t + 50, E.POSTPROCESSING_END, rid)])
    rc, _, err = replay(capsys, str(tmp_path), "--jsonl", str(tmp_path / "s.jsonl"))
    assert rc == 0, err
    spans = read_spans(tmp_path / "s.jsonl")
    assert len(by_trace(spans)) == 1
    names = {s.name for s in spans}
    assert {"ASK_DECODE_RESOURCE", "CHECK_CACHE_TRANSFER", "DECODE_PROCESS_PREALLOCATE_REQUEST",
            "DECODE_PROCESS_PREFILLED_REQUEST", "PREFILL", "DECODE", REQUEST_SPAN_NAME} <= names
    root = next(s for s in spans if s.name == REQUEST_SPAN_NAME)
    assert root.attributes["fastdeploy.request_id"] == rid and "fastdeploy.anomaly" not in root.attributes


def test_rotation_across_midnight_and_gzip(tmp_path, capsys):
    """FastDeploy's layout: trace.log.YYYY-MM-DD per day, trace.log a symlink to today's; the older
    day gzipped.  A request that crosses midnight is one request, and the symlink is read once."""
    log = tmp_path / "log"
    midnight = T0 - T0 % 86_400_000 + 86_400_000
    a, e = fd_events("chatcmpl-midnight", midnight - 20)
    events = sorted(a + e, key=lambda x: x[0])
    FdLog(str(log), file_name="trace.log.2026-04-28").write([x for x in events if x[0] < midnight])
    FdLog(str(log), file_name="trace.log.2026-04-29").write([x for x in events if x[0] >= midnight])
    a, e = fd_events("chatcmpl-yesterday", midnight - 100_000)
    FdLog(str(log), file_name="trace.log.2026-04-27").write(sorted(a + e, key=lambda x: x[0]))
    day = log / "trace.log.2026-04-27"
    with open(day, "rb") as f, gzip.open(str(day) + ".gz", "wb") as g:
        g.write(f.read())
    day.unlink()
    os.symlink("trace.log.2026-04-29", log / "trace.log")
    rc, _, err = replay(capsys, str(log), "--jsonl", str(tmp_path / "s.jsonl"))
    assert rc == 0, err
    assert "replayed 42 lines from 3 files" in err
    traces = by_trace(read_spans(tmp_path / "s.jsonl"))
    assert len(traces) == 2
    for spans in traces.values():
        assert tree(spans) == MIXED_TREE


# ---- damage ---------------------------------------------------------------------------------------
def test_damaged_and_hostile_lines_are_skipped_and_reported(tmp_path, capsys):
    """Our mirror escapes a hostile request id; then the file is damaged in every way we know."""
    hostile = "evil] [event=POSTPROCESSING_END] [x=\\y\n"
    log = tmp_path / "log"
    fdt.configure(env={}, mode="local", log_dir=str(log), strict=True, flush_interval_s=0.05)
    try:
        for rid in (hostile, "good"):
            for event, kwargs in MIXED:
                fdt.trace_print(event, rid, "u[1]", **kwargs)
            fdt.finish_request(rid)
    finally:
        fdt.shutdown()
    path = log / "trace.log"
    good = path.read_text().splitlines(keepends=True)
    assert "\\x5b" in "".join(good)  # brackets escaped
    damaged = good[:5] + [
        good[5][: len(good[5]) // 2] + "\n",  # cut mid-line
        "\x00\x01\x7f garbage \x80\n",
        "INFO " + "x" * 1_000_000 + "\n",  # a 1 MB line
        re.sub(r"\[event=\w+\]", "[event=QUEUE_FROM_THE_FUTURE]", good[6]),
        "\n",
    ] + good[5:]
    path.unlink()
    raw = "".join(damaged).encode("utf-8", "surrogateescape")
    (log / "trace.log").write_bytes(raw[:100] + b"\xff\xfe" + raw[100:])  # and bytes that are not UTF-8

    rc, _, err = replay(capsys, str(path), "--jsonl", str(tmp_path / "s.jsonl"))
    assert rc == 1  # something was skipped
    assert "skipped 4 lines (1 truncated line, 1 binary data, 1 line too long, 1 unknown event)" in err, err
    assert f"{path}:6: truncated line" in err and f"{path}:8: line too long: 1,000,006 characters" in err
    assert f"{path}:9: unknown event: 'QUEUE_FROM_THE_FUTURE'" in err
    spans = read_spans(tmp_path / "s.jsonl")
    rids = {s.attributes["fastdeploy.request_id"] for s in spans if s.name == REQUEST_SPAN_NAME}
    assert rids == {hostile, "good"}
    assert {s.attributes.get("fastdeploy.user_id") for s in spans} == {"u[1]"}


def test_an_unfinished_lifecycle_ends_at_its_last_event_as_incomplete(tmp_path, capsys):
    a, e = fd_events("chatcmpl-cut", T0)
    events = sorted(a + e, key=lambda x: x[0])[:16]  # up to DECODE_START: decoding when the log ends
    FdLog(str(tmp_path)).write(events)
    rc, _, err = replay(capsys, str(tmp_path), "--jsonl", str(tmp_path / "s.jsonl"))
    assert rc == 0 and "1 requests (1 incomplete)" in err, err
    spans = {s.name: s for s in read_spans(tmp_path / "s.jsonl")}
    assert not any(s.is_error for s in spans.values())
    assert spans[REQUEST_SPAN_NAME].attributes["fastdeploy.anomaly"] == "incomplete"
    assert spans["DECODE"].attributes["fastdeploy.anomaly"] == "incomplete"
    assert spans[REQUEST_SPAN_NAME].end_ns == spans["DECODE"].end_ns == events[-1][0] * 1_000_000 + 500_000
    assert "fastdeploy.anomaly" not in spans["SCHEDULE"].attributes


def test_out_of_order_lines_and_stdin(tmp_path):
    a, e = fd_events("chatcmpl-shuffled", T0, step=20)
    lines = []
    FdLog(str(tmp_path)).write(sorted(a + e, key=lambda x: x[0]))
    lines = (tmp_path / "trace.log").read_text().splitlines(keepends=True)
    rng = random.Random(7)
    for i in range(0, len(lines) - 1, 2):  # swap neighbours: each line at most 20 ms out of place
        if rng.random() < 0.7:
            lines[i], lines[i + 1] = lines[i + 1], lines[i]
    res = subprocess.run([*CLI, "replay", "-", "--jsonl", "-"], input="".join(lines), capture_output=True,
                         text=True, timeout=60, env=_env())
    assert res.returncode == 0, res.stderr
    (tmp_path / "s.jsonl").write_text(res.stdout)
    spans = read_spans(tmp_path / "s.jsonl")
    assert tree(spans) == MIXED_TREE and not any("fastdeploy.anomaly" in s.attributes for s in spans)


def test_request_id_and_time_filters(tmp_path, capsys):
    events = []
    for k in range(4):
        a, e = fd_events(f"cmpl-{k}", T0 + k * 10_000)
        events += a + e
    FdLog(str(tmp_path)).write(sorted(events, key=lambda x: x[0]))
    rc, out, _ = replay(capsys, str(tmp_path), "--request-id", "cmpl-2", "--summary")
    assert rc == 0 and out.startswith("requests 1 ")
    rc, out, _ = replay(capsys, str(tmp_path), "--since", str((T0 + 10_000) / 1000), "--until",
                        str((T0 + 29_999) / 1000))
    assert rc == 0 and out.startswith("requests 2 ")
    rc, _, err = replay(capsys, str(tmp_path), "--since", "yesterday-ish")
    assert rc == 2 and "not a time" in err


def test_nothing_to_read_is_status_2(tmp_path, capsys):
    rc, _, err = replay(capsys, str(tmp_path / "missing"))
    assert rc == 2 and "no such file" in err


# ---- units ----------------------------------------------------------------------------------------
def test_line_formats_parse_to_the_same_values():
    ii = ("INFO     2026-04-28 10:15:02,131 81190 common_engine.py[line:1287] [thread=139870120400448] "
          "[thread_name=Thread-4 (_insert_zmq_task_to_scheduler)] [timestamp=1777342502131] "
          "[request_id=chatcmpl-7c1e_0] [user_id=None] [event=REQUEST_QUEUE_START] [stage=SCHEDULE] "
          "[trace_id=0000000000000000b3a91f27c4d05e6a] \n")
    i = ("[2025-11-20 14:03:11,902] [INFO    ] (trace_logger.py:print:27) [thread=140] [thread_name=MainThread] "
         "[timestamp=1777342502131] [request_id=chatcmpl-7c1e_0] [event=REQUEST_QUEUE_START] [stage=SCHEDULE] \n")
    a, b = parse(ii), parse(i)
    assert a is not None and b is not None
    assert (a.ts_ms, a.request_id, a.event, a.user, a.trace_id) == (1777342502131, "chatcmpl-7c1e_0",
                                                                       E.REQUEST_QUEUE_START, None, 0xB3A91F27C4D05E6A)
    assert (b.ts_ms, b.request_id, b.event, b.trace_id, b.span_id) == (a.ts_ms, a.request_id, a.event, 0, 0)
    # FastDeploy does not escape: "] [" inside a value stays in it
    odd = ii.replace("[thread_name=Thread-4 (_insert_zmq_task_to_scheduler)]", "[thread_name=a] [b]")
    assert parse(odd) == a
    assert parse(ii.replace("b3a91f27c4d05e6a", "unknown").replace("0000000000000000unknown", "unknown")).trace_id == 0
    assert parse(ii[:-20]) is None and parse("") is None
    assert [base_request_id(r) for r in ("x_0", "x::n::3", "x", "_1", "a_b")] == ["x", "x", "x", "_1", "a_b"]
    # a mirror line whose span id is wider than 64 bits is damaged there: no span id, never an invalid one
    wide = ii.replace(" \n", " [span_id=" + "ab" * 16 + "] \n").replace("[thread_name=Thread-4 (_insert", "[thread_name=T\\x5d (_insert")
    parsed = parse(wide)
    assert parsed is not None and parsed.span_id == 0 and parsed.trace_id == 0xB3A91F27C4D05E6A


def test_a_block_of_lines_parses_as_each_line_does():
    """parse_many (one regex pass over a block) gives what parse gives line by line, damage included."""
    fd = ("INFO     2026-04-28 10:15:02,131 81190 common_engine.py[line:1287] [thread=1] [thread_name=T] "
          "[timestamp=1777342502131] [request_id=chatcmpl-7c1e_0] [user_id=None] [event=REQUEST_QUEUE_START] "
          "[stage=SCHEDULE] [trace_id=0000000000000000b3a91f27c4d05e6a] \n")
    mirror = ("INFO     2026-04-28 10:15:02,131 81190 x.py[line:1] [thread=1] [thread_name=T] [timestamp=1777342502132] "
              "[request_id=r\\x5d1] [user_id=u] [event=DECODE_START] [stage=DECODE] "
              "[trace_id=000000000000000000000000000000ab] [span_id=00000000000000cd]\n")
    variants = [fd, fd.replace("[user_id=None]", "[user_id=]"), fd.replace("[user_id=None] ", ""),
                fd.replace("REQUEST_QUEUE_START", "NO_SUCH_EVENT"), fd[:80] + "\n", "\n", mirror,
                fd.replace(" \n", "\r\n"), fd.replace("chatcmpl-7c1e_0", "a] [b"), fd.rstrip("\n")]
    rnd = random.Random(5)
    for _ in range(200):
        lines = [rnd.choice(variants[:1] * 8 + variants) for _ in range(rnd.randint(1, 40))]
        lines = [t if t.endswith("\n") else t + "\n" for t in lines[:-1]] + lines[-1:]
        assert split_lines("".join(lines)) == lines
        assert parse_many("".join(lines)) == [parse(t) for t in lines]
    assert parse_many(fd * 3) == [parse(fd)] * 3 and parse_many("") == []


def test_blocks_of_a_file_parse_as_its_lines_do(tmp_path):
    """read_blocks cuts a file at line ends only, whatever straddles a read (a line longer than a read,
    a line too long to use, CRLF, no final newline, gzip), and parse_many over its blocks gives what
    parse gives line by line."""
    fd = ("INFO     2026-04-28 10:15:02,131 81190 common_engine.py[line:1287] [thread=1] [thread_name=T] "
          "[timestamp=1777342502131] [request_id=chatcmpl-7c1e_0] [user_id=None] [event=REQUEST_QUEUE_START] "
          "[stage=SCHEDULE] [trace_id=unknown] \n")
    variants = [fd, fd.replace("chatcmpl-7c1e_0", "r" * 40_000), fd.replace("chatcmpl-7c1e_0", "r" * 70_000),
                fd.replace(" \n", "\r\n"), fd.replace("[user_id=None]", "[user_id=Nonesuch]"), "\n", fd[:90] + "\n"]
    rnd = random.Random(7)
    lines = [rnd.choice(variants[:1] * 20 + variants) for _ in range(600)] + [fd.rstrip("\n")]
    text = "".join(lines)
    for name, opener in (("trace.log", open), ("trace.log.gz", gzip.open)):
        path = tmp_path / name
        with opener(path, "wt", encoding="utf-8", newline="") as f:
            f.write(text)
        errors: list[str] = []
        blocks = list(read_blocks(str(path), errors.append))
        assert not errors and "".join(blocks) == text and len(blocks) > 10
        assert all(b.endswith("\n") for b in blocks[:-1])
        assert [line for b in blocks for line in parse_many(b)] == [parse(t) for t in lines]


@pytest.mark.parametrize("gap_ms", [100, 7], ids=["one-after-another", "in-flight-together"])
def test_requests_that_share_a_trace_id_get_distinct_span_ids(tmp_path, capsys, gap_ms):
    """One traceparent for many calls (an agent's session): FastDeploy writes the same trace_id on the
    lines of several requests and no span_id, so their spans' ids are derived, each request's its own
    (a counter per trace started again with each request), and each request's spans are its own."""
    log = FdLog(str(tmp_path / "log"))
    events = []
    for k in range(3):
        a, e = fd_events(f"chatcmpl-{k}", T0 + k * gap_ms)
        events += a + e
    log.write(sorted(events, key=lambda x: x[0]), trace_ids={f"chatcmpl-{k}_0": 0xB3A91F27C4D05E6A for k in range(3)})
    rc, _, err = replay(capsys, str(tmp_path / "log"), "--jsonl", str(tmp_path / "s.jsonl"))
    assert rc == 0, err
    spans = read_spans(tmp_path / "s.jsonl")
    assert {s.trace_id for s in spans} == {"0000000000000000b3a91f27c4d05e6a"}
    assert len([s for s in spans if s.name == REQUEST_SPAN_NAME]) == 3
    assert len({s.span_id for s in spans}) == len(spans) == 3 * len(MIXED_TREE)
    by_request: dict[str, list[Span]] = {}
    for s in spans:
        by_request.setdefault(base_request_id(s.attributes["fastdeploy.request_id"]), []).append(s)
    for rid, mine in by_request.items():  # each request: the whole lifecycle, nested under its own span
        ids = {s.span_id for s in mine}
        assert tree(mine) == MIXED_TREE, rid
        assert all(s.parent_span_id in ids for s in mine if s.name != REQUEST_SPAN_NAME), rid


def test_json_lines_writer_batches_the_text_encode_request_makes(tmp_path):
    """Spans are encoded as they are written and joined into lines of `batch` spans: each line is
    exactly encode_request of its spans, whatever the writes that brought them."""
    from fastdeploy_otel._records import SpanState
    from fastdeploy_otel.tools.spanstates import encode_request

    spans = [SpanState(f"S{i}", 2**100 + i // 3, 1000 + i, 7, False, True, 10 * i, "DECODE",
                       attributes={"fastdeploy.request_id": f"r{i // 3}"}, end_ns=10 * i + 5) for i in range(8)]
    resource, scope = {"service.name": "fastdeploy"}, ("fastdeploy_otel", "1")
    for batch, writes in ((3, [spans[:2], spans[2:3], spans[3:7], spans[7:]]), (1, [spans[:1]]), (100, [[]])):
        path = tmp_path / f"b{batch}.jsonl"
        with open(path, "w") as f:
            w = JsonLinesWriter(f, resource, scope, batch=batch)
            for chunk in writes:
                w.write(chunk)
            w.flush()
        got = path.read_text().splitlines()
        written = [s for chunk in writes for s in chunk]
        expected, line = [], []
        for chunk in writes:  # a line is cut once a write brings it to `batch` spans or more
            line += chunk
            if len(line) >= batch:
                expected.append(encode_request(line, resource, scope))
                line = []
        if line:
            expected.append(encode_request(line, resource, scope))
        assert got == expected and w.written == len(written)
        assert sum(len(json.loads(x)["resourceSpans"][0]["scopeSpans"][0]["spans"]) for x in got) == len(written)


def test_json_lines_read_back_as_the_spans_made_directly(tmp_path):
    from fastdeploy_otel._records import SpanState

    s = SpanState("DECODE", 2**127 + 5, 2**63 + 7, 9, False, True, 1_000, "DECODE",
                  attributes={"a": "x\"\n\u2603", "i": -3, "f": 0.5, "b": False, "l": [1, 2], "n": float("nan")},
                  events=[("PREEMPTED", 1_500, {"fastdeploy.preemptions": 2})], error="unterminated: x", end_ns=2_000)
    root = SpanState(REQUEST_SPAN_NAME, 2**127 + 5, 9, 0, False, True, 900, "", end_ns=2_100)
    with open(tmp_path / "s.jsonl", "w") as f:
        w = JsonLinesWriter(f, {"service.name": "fastdeploy"}, ("fastdeploy_otel", "1"), batch=1)
        w.write([s, root])
        w.flush()
    back = read_spans(tmp_path / "s.jsonl")
    direct = [to_span(x, {"service.name": "fastdeploy"}, "fastdeploy_otel") for x in (s, root)]
    assert back[0].attributes.pop("n") != back[0].attributes.pop("n", 0)  # NaN, as written
    direct[0].attributes.pop("n")
    assert back == direct


# ---- round trips ---------------------------------------------------------------------------------
def _compare(live: list[Span], replayed: list[Span], skip_requests: set[str] = frozenset()) -> None:
    """Names, ids, parents, events and times (within 1 ms) of every span the live run exported."""
    ours = [s for s in live if s.name == REQUEST_SPAN_NAME or "fastdeploy.stage" in s.attributes]
    got = {(s.trace_id, s.span_id): s for s in replayed}
    assert len(got) == len(replayed)  # no span replayed twice
    compared = 0
    for s in ours:
        r = got.get((s.trace_id, s.span_id))
        assert r is not None, f"{s.name} of {s.attributes.get('fastdeploy.request_id')} was not replayed"
        assert r.name == s.name
        rid = base_request_id(str(s.attributes.get("fastdeploy.request_id")))
        if s.name != REQUEST_SPAN_NAME:  # the request span's parent (an HTTP span, a caller) is not in trace.log
            assert r.parent_span_id == s.parent_span_id, s.name
        if rid in skip_requests:
            continue
        assert abs(r.start_ns - s.start_ns) < 1_000_000 and abs(r.end_ns - s.end_ns) < 1_000_000, (s.name, rid)
        live_events = [e for e in s.events if e["name"] not in ("exception", "ABORTED")]  # not in trace.log
        assert [e["name"] for e in r.events] == [e["name"] for e in live_events], s.name
        assert all(abs(a["time_ns"] - b["time_ns"]) < 1_000_000 for a, b in zip(r.events, live_events, strict=True))
        compared += 1
    assert compared and len(ours) == len(got)


def test_round_trip_live_spans_equal_the_spans_replayed_from_the_mirror(tmp_path, capsys):
    """One process, the live pipeline: what it exported equals what its trace.log replays to."""
    log, spans_file = tmp_path / "log", tmp_path / "live.jsonl"
    fdt.configure(env={}, mode="all", exporter="none", json_file=str(spans_file), log_dir=str(log), strict=True,
                  flush_interval_s=0.05)
    try:
        for k in range(5):
            rid = f"chatcmpl-rt{k}"
            for event, kwargs in MIXED:
                time.sleep(0.0005)
                fdt.trace_print(event, rid, "user-1", **kwargs)
            fdt.finish_request(rid)
        for event, _ in MIXED[:9]:  # one left open (an abandoned request)
            fdt.trace_print(event, "chatcmpl-open")
    finally:
        fdt.shutdown()
    rc, _, err = replay(capsys, str(log), "--jsonl", str(tmp_path / "replayed.jsonl"))
    assert rc == 0, err
    _compare(read_spans(spans_file), read_spans(tmp_path / "replayed.jsonl"), skip_requests={"chatcmpl-open"})


def test_a_batch_of_mirror_lines_written_twice_replays_once(tmp_path, capsys):
    """The mirror is written at least once (an export process that dies between writing a batch and
    saying so has it written again): the repeats are skipped, counted, and the spans are the live ones."""
    log, spans_file = tmp_path / "log", tmp_path / "live.jsonl"
    fdt.configure(env={}, mode="all", exporter="none", json_file=str(spans_file), log_dir=str(log), strict=True,
                  flush_interval_s=0.05)
    try:
        for k in range(4):
            for event, kwargs in MIXED:
                time.sleep(0.0005)
                fdt.trace_print(event, f"chatcmpl-twice{k}", "user-1", **kwargs)
            fdt.finish_request(f"chatcmpl-twice{k}")
    finally:
        fdt.shutdown()
    path = os.path.realpath(log / "trace.log")
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    with open(path, "a", encoding="utf-8") as f:
        f.writelines(lines[10:40])  # a batch again, after the lines that followed it
    rc, _, err = replay(capsys, str(log), "--jsonl", str(tmp_path / "replayed.jsonl"))
    assert rc == 0, err
    assert "30 repeated mirror lines skipped" in err
    _compare(read_spans(spans_file), read_spans(tmp_path / "replayed.jsonl"))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    pytest.importorskip("paddle")
    out = tmp_path_factory.mktemp("demo") / "out"
    res = subprocess.run([*CLI, "demo", "--out", str(out)], capture_output=True, text=True, timeout=300, env=_env())
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return out


def test_the_demos_merged_trace_log_replays_as_its_per_process_logs(demo, tmp_path, capsys):
    """The demo's one trace.log orders the processes' lines of one millisecond by the lifecycle, as
    the replay of the separate files does (it split requests: the API's POSTPROCESSING_END came before
    the engine's INFERENCE_END of the same ms)."""
    rc, _, err_logs = replay(capsys, str(demo / "logs"), "--jsonl", str(tmp_path / "logs.jsonl"))
    assert rc == 0, err_logs
    rc, _, err_merged = replay(capsys, str(demo / "trace.log"), "--jsonl", str(tmp_path / "merged.jsonl"))
    assert rc == 0, err_merged
    per_process, merged = read_spans(tmp_path / "logs.jsonl"), read_spans(tmp_path / "merged.jsonl")
    assert sorted((s.trace_id, s.span_id, s.name) for s in merged) == sorted(
        (s.trace_id, s.span_id, s.name) for s in per_process)
    count = re.compile(r"(\d+) requests \((\d+) incomplete\)")
    assert count.search(err_merged).groups() == count.search(err_logs).groups()


def test_round_trip_of_a_demo_run(demo, tmp_path, capsys):
    """Two processes (API server, engine), stages handed across, preemptions, cache events, errors:
    the replay of their trace.log files has the live ids, parents, events and times; an aborted
    request ends at its last line, not at the abort, which trace.log does not record."""
    rc, _, err = replay(capsys, str(demo / "logs"), "--jsonl", str(tmp_path / "r.jsonl"), "--html",
                        str(tmp_path / "t.html"))
    assert rc == 0, err
    live, replayed = read_spans(demo / "spans.jsonl"), read_spans(tmp_path / "r.jsonl")
    aborted = {base_request_id(str(s.attributes["fastdeploy.request_id"])) for s in live
               if s.name == REQUEST_SPAN_NAME and s.attributes.get("fastdeploy.aborted")}
    # An engine error ends its open stage at record_error/finish_request, neither of which is a
    # trace.log line: only its ids, names and parents can be compared.
    failed = {base_request_id(str(s.attributes["fastdeploy.request_id"])) for s in live
              if any(e["name"] == "exception" for e in s.events)}
    assert aborted and failed
    _compare(live, replayed, skip_requests=aborted | failed)
    # The timeline shows the same requests, stages and cache events as the live one.
    from fastdeploy_otel.tools.timeline import group_requests, summarize

    def rows(spans: list[Span]) -> dict[str, tuple]:
        return {r.request_id: (sorted(c.name for c in r.children),
                               sorted(e["name"] for _, e in r.events(("CACHE_HIT", "CACHE_MISS", "CACHE_SWAP_IN",
                                                                      "PREEMPTED", "FIRST_TOKEN_GENERATED"))))
                for r in group_requests(spans)}

    assert rows(replayed) == rows(live)
    a, b = summarize(replayed), summarize(live)
    assert (a["requests"], a["cache_hit_ratio"], a["swap_ins"], a["preempted"]) == (
        b["requests"], b["cache_hit_ratio"], b["swap_ins"], b["preempted"])
    html = (tmp_path / "t.html").read_text()
    assert all(rid in html for rid in rows(live))


# ---- follow ---------------------------------------------------------------------------------------
def _wait_for(predicate, timeout: float = 20.0, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(every)
    return predicate()


def _request_ids(path) -> list[str]:
    if not os.path.exists(path):
        return []
    return [s.attributes["fastdeploy.request_id"] for s in read_spans(path) if s.name == REQUEST_SPAN_NAME]


def test_follow_through_rotation_and_truncation_then_sigterm(tmp_path):
    log, out = tmp_path / "log", tmp_path / "s.jsonl"
    log.mkdir()
    proc = subprocess.Popen([*CLI, "replay", "--follow", str(log), "--jsonl", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        def write(name: str, rid: str, start: int, lifecycle_cut: int | None = None) -> None:
            a, e = fd_events(rid, start)
            FdLog(str(log), file_name=name).write(sorted(a + e, key=lambda x: x[0])[:lifecycle_cut])

        now = int(time.time() * 1000)
        day1, day2 = "trace.log.2026-04-28", "trace.log.2026-04-29"
        write(day1, "req-a", now)
        os.symlink(day1, log / "trace.log")
        assert _wait_for(lambda: _request_ids(out) == ["req-a"]), proc.stderr
        # midnight: the symlink moves to a new day's file (atomically, as _logfile does it)
        write(day2, "req-b", now + 100)
        os.symlink(day2, log / ".tmp-link")
        os.replace(log / ".tmp-link", log / "trace.log")
        assert _wait_for(lambda: _request_ids(out) == ["req-a", "req-b"])
        # truncated in place, then written again
        os.truncate(log / day2, 0)
        write(day2, "req-c", now + 200)
        assert _wait_for(lambda: _request_ids(out) == ["req-a", "req-b", "req-c"])
        write(day2, "req-d", now + 300, lifecycle_cut=10)  # still in flight
        time.sleep(1.0)
        assert _request_ids(out) == ["req-a", "req-b", "req-c"]
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=10)
        assert time.monotonic() - t0 < 5
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 0, proc.stderr.read() if proc.stderr else ""
    spans = read_spans(out)
    assert _request_ids(out) == ["req-a", "req-b", "req-c", "req-d_0"]  # only its per-choice id was seen
    cut = [s for s in spans if s.name == REQUEST_SPAN_NAME and s.attributes["fastdeploy.request_id"] == "req-d_0"]
    assert cut[0].attributes["fastdeploy.anomaly"] == "incomplete"


def test_follow_a_running_serve_exports_a_request_within_2s_of_its_last_line(tmp_path):
    pytest.importorskip("paddle")
    import httpx

    from minifd.stack import free_port

    port, log, out = free_port(), tmp_path / "log", tmp_path / "s.jsonl"
    serve = subprocess.Popen([*CLI, "serve", "--port", str(port), "--log-dir", str(log)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env=_env(FD_TRACE="local"))
    follow = None
    try:
        base = f"http://127.0.0.1:{port}"
        assert _wait_for(lambda: _healthy(base), timeout=90, every=0.3)
        follow = subprocess.Popen([*CLI, "replay", "--follow", str(log), "--jsonl", str(out)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env())
        time.sleep(1.0)
        resp = httpx.post(base + "/v1/completions", json={"prompt": "follow me", "max_tokens": 4}, timeout=60)
        assert resp.status_code == 200
        rid = resp.headers["x-request-id"]
        assert _wait_for(lambda: rid in _request_ids(out), timeout=10, every=0.02)
        seen = time.time()
        last = max(int(line.split("[timestamp=")[1].split("]")[0])
                   for role in ("api", "engine") for line in (log / role / "trace.log").read_text().splitlines()
                   if rid in line)
        assert seen - last / 1000 < 2.0
    finally:
        for p in (follow, serve):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in (follow, serve):
            if p is not None:
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()


def _healthy(base: str) -> bool:
    import httpx

    try:
        return httpx.get(base + "/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_bad_json_free_output_is_valid_otlp_json(tmp_path, capsys):
    """Every line of --jsonl is one ExportTraceServiceRequest in OTLP/JSON (what a Collector reads)."""
    a, e = fd_events("cmpl-json", T0)
    FdLog(str(tmp_path)).write(sorted(a + e, key=lambda x: x[0]))
    rc, _, _ = replay(capsys, str(tmp_path), "--jsonl", str(tmp_path / "s.jsonl"))
    assert rc == 0
    for line in (tmp_path / "s.jsonl").read_text().splitlines():
        doc = json.loads(line)
        span = doc["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
        assert len(span["traceId"]) == 32 and len(span["spanId"]) == 16 and span["startTimeUnixNano"].isdigit()


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_otlp_export_configured_by_the_standard_variables(tmp_path, capsys, monkeypatch, receiver, protocol):
    """--otlp goes through the live export pipeline to a real receiver, over gRPC and HTTP, and the
    spans that arrive are the ones written as JSON lines."""
    receiver.store.clear()
    events = []
    for k in range(3):
        a, e = fd_events(f"cmpl-otlp{k}", T0 + k * 100)
        events += a + e
    FdLog(str(tmp_path / "log")).write(sorted(events, key=lambda x: x[0]))
    for name in [n for n in os.environ if n.startswith(("OTEL_", "FD_"))]:
        monkeypatch.delenv(name)
    endpoint = receiver.grpc_endpoint if protocol == "grpc" else receiver.http_endpoint
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "replayed-fd")
    rc, _, err = replay(capsys, str(tmp_path / "log"), "--otlp", "--jsonl", str(tmp_path / "s.jsonl"))
    assert rc == 0, err
    assert "30 spans exported, 0 not" in err
    got = receiver.store.wait_for(lambda spans: len(spans) >= 30)
    written = read_spans(tmp_path / "s.jsonl")
    key = lambda s: (s.trace_id, s.span_id)  # noqa: E731
    assert sorted(map(key, got)) == sorted(map(key, written))
    assert {s.resource["service.name"] for s in got} == {"replayed-fd"}
    assert all(s.attributes["fastdeploy.replayed"] is True for s in got)
