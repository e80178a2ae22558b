"""OTLP/JSON lines export, reading it back, the HTML timeline and the summary — on spans made by the
real pipeline (configure -> trace_print -> assembler -> SDK provider -> BatchSpanProcessor -> file)."""

from __future__ import annotations

import base64
import html
import json
import logging
import re
import statistics
import threading
import time
from html.parser import HTMLParser

import pytest
from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

import fastdeploy_otel as fdt
from fastdeploy_otel import _selflog as selflog
from fastdeploy_otel import attributes as A
from fastdeploy_otel._otlp_json import OtlpJsonLinesExporter
from fastdeploy_otel.events import LoggingEventName as E
from fastdeploy_otel.span_plan import REQUEST_SPAN_NAME
from fastdeploy_otel.tools.spans import Span, read_spans
from fastdeploy_otel.tools.timeline import format_summary, group_requests, render_html, summarize, write_html
from tests.support.lifecycles import MIXED

HOSTILE = "<script>alert(1)</script>"
HTTP_SPAN = "POST /v1/chat/completions"
OK_IDS = ["req-ok-1", "req-nohit", HOSTILE, "req-http"]
ERR_ID, ABORT_ID = "req-err", "req-abort"
ALL_IDS = OK_IDS + [ERR_ID, ABORT_ID]
ERR_MESSAGE = "boom <b>bad</b> & worse"
FULL_SPANS = {
    REQUEST_SPAN_NAME, "PREPROCESSING", "SCHEDULE", "REQUEST_QUEUE", "RESOURCE_ALLOCATE", "PREPARE_PREFIX_CACHE",
    "PREFILL", "DECODE", "POSTPROCESSING", "WRITE_CACHE_TO_STORAGE",
}
HEX32, HEX16 = re.compile(r"^[0-9a-f]{32}$"), re.compile(r"^[0-9a-f]{16}$")


def _until(event: E) -> list:
    """MIXED up to (not including) `event`."""
    idx = [e for e, _ in MIXED].index(event)
    return MIXED[:idx]


def _replay(rid: str, lifecycle, user: str = "alice") -> None:
    for event, attrs in lifecycle:
        fdt.trace_print(event, rid, user, **attrs)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Replays six requests through the real pipeline once; yields (jsonl path, spans, html)."""
    tmp = tmp_path_factory.mktemp("timeline")
    path = tmp / "spans.jsonl"
    exporter = OtlpJsonLinesExporter(path)
    fdt.configure(
        mode="otel", log_dir=str(tmp / "log"), env={}, endpoint="http://127.0.0.1:9", timeout_s=1.0,
        extra_exporters=[exporter], strict=True, flush_interval_s=0.05,
    )
    try:
        _replay("req-ok-1", MIXED)
        # Only a miss: no CACHE_HIT / CACHE_SWAP_IN; and a preemption during decode.
        nohit = [(e, a) for e, a in MIXED if e not in (E.CACHE_HIT, E.CACHE_SWAP_IN)]
        decode_at = [e for e, _ in nohit].index(E.DECODE_START) + 1
        nohit[decode_at:decode_at] = [(E.PREEMPTED, {}), (E.RESCHEDULED_INFERENCE_START, {})]
        _replay("req-nohit", nohit)
        _replay(HOSTILE, MIXED, user="mallory")
        tracer = fdt.get_tracer_provider().get_tracer("test.http")
        with tracer.start_as_current_span(HTTP_SPAN, kind=SpanKind.SERVER):
            _replay("req-http", MIXED)
        # An exception while PREFILL is open, then the request finishes.
        _replay(ERR_ID, _until(E.FIRST_TOKEN_GENERATED))
        try:
            raise ValueError(ERR_MESSAGE)
        except ValueError as exc:
            fdt.record_error(ERR_ID, exc)
        # Aborted during DECODE.
        _replay(ABORT_ID, _until(E.INFERENCE_END))
        time.sleep(0.01)
        fdt.abort_request(ABORT_ID, "client disconnected")
        for rid in OK_IDS + [ERR_ID]:
            fdt.finish_request(rid)
    finally:
        fdt.shutdown()  # flushes the assembler and both BatchSpanProcessors
    spans = read_spans(path)
    yield path, spans, render_html(spans, "test <run> & co")


def _by_request(spans):
    rows = {}
    for r in group_requests(spans):
        rows[r.request_id] = r
    return rows


# ---- OTLP/JSON lines -----------------------------------------------------------------------------
def test_spans_round_trip_with_names_parents_and_hex_ids(run):
    _, spans, _ = run
    ours = [s for s in spans if s.name != HTTP_SPAN]
    by_rid: dict[str, list[dict]] = {}
    for s in ours:
        by_rid.setdefault(s.attributes[A.REQUEST_ID], []).append(s)
    assert set(by_rid) == set(ALL_IDS)
    for s in spans:
        assert HEX32.match(s.trace_id), s
        assert HEX16.match(s.span_id), s
        assert s.parent_span_id == "" or HEX16.match(s.parent_span_id), s
        assert s.end_ns >= s.start_ns > 0
        assert s.resource.get("service.name")
    for rid in OK_IDS:
        names = [s.name for s in by_rid[rid]]
        assert sorted(names) == sorted(FULL_SPANS), (rid, names)
        req = next(s for s in by_rid[rid] if s.name == REQUEST_SPAN_NAME)
        stage = {s.name: s for s in by_rid[rid]}
        for name in ("PREPROCESSING", "SCHEDULE", "PREFILL", "DECODE", "POSTPROCESSING"):
            assert stage[name].parent_span_id == req.span_id
            assert stage[name].trace_id == req.trace_id
        for sub, parent in (("REQUEST_QUEUE", "SCHEDULE"), ("PREPARE_PREFIX_CACHE", "SCHEDULE"),
                            ("WRITE_CACHE_TO_STORAGE", "POSTPROCESSING")):
            assert stage[sub].parent_span_id == stage[parent].span_id
        assert [e["name"] for e in stage["PREFILL"].events] == ["FIRST_TOKEN_GENERATED"]
        assert stage["SCHEDULE"].attributes[A.STAGE] == "SCHEDULE"
    # Attributes keep their types through JSON (intValue is a string on the wire).
    hit = next(e for s in by_rid["req-ok-1"] if s.name == "SCHEDULE" for e in s.events if e["name"] == "CACHE_HIT")
    assert hit["attributes"][A.CACHE_MATCHED_TOKENS] == 16
    assert hit["attributes"][A.CACHE_SOURCE_TIER] == "gpu"
    req1 = next(s for s in by_rid["req-ok-1"] if s.name == REQUEST_SPAN_NAME)
    assert req1.attributes[A.GEN_AI_USAGE_INPUT_TOKENS] == 48
    assert req1.attributes[A.GEN_AI_RESPONSE_FINISH_REASONS] == ["stop"]
    # The HTTP server span is the request span's parent, in the same trace.
    http = [s for s in spans if s.name == HTTP_SPAN]
    assert len(http) == 1 and http[0].parent_span_id == "" and http[0].kind == 2
    req_http = next(s for s in by_rid["req-http"] if s.name == REQUEST_SPAN_NAME)
    assert req_http.parent_span_id == http[0].span_id
    assert req_http.trace_id == http[0].trace_id
    # Distinct traces per request otherwise.
    roots = [s for s in ours if s.name == REQUEST_SPAN_NAME]
    assert len({s.trace_id for s in roots}) == len(ALL_IDS)


def test_error_and_abort_spans(run):
    _, spans, _ = run
    err = [s for s in spans if s.attributes.get(A.REQUEST_ID) == ERR_ID]
    prefill = next(s for s in err if s.name == "PREFILL")
    assert prefill.status_code == 2
    assert ERR_MESSAGE in prefill.status_message
    exc = [e for e in prefill.events if e["name"] == "exception"]
    assert exc and exc[0]["attributes"]["exception.message"] == ERR_MESSAGE
    assert next(s for s in err if s.name == REQUEST_SPAN_NAME).status_code == 2
    ab = [s for s in spans if s.attributes.get(A.REQUEST_ID) == ABORT_ID]
    ab_req = next(s for s in ab if s.name == REQUEST_SPAN_NAME)
    assert ab_req.attributes[A.ABORTED] is True
    assert ab_req.attributes[A.ABORT_REASON] == "client disconnected"
    assert next(s for s in ab if s.name == "DECODE").attributes[A.ABORTED] is True


def test_lines_are_otlp_json(run):
    path, spans, _ = run
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines and all(line.strip() for line in lines)
    total = 0
    for line in lines:
        obj = json.loads(line)
        assert set(obj) == {"resourceSpans"}
        for rs in obj["resourceSpans"]:
            for ss in rs["scopeSpans"]:
                for span in ss["spans"]:
                    assert HEX32.match(span["traceId"]) and HEX16.match(span["spanId"])
                    assert isinstance(span["kind"], int)  # OTLP/JSON: enums as integers
                    assert isinstance(span["startTimeUnixNano"], str)
                    want = (bytes.fromhex(span["traceId"]), bytes.fromhex(span["spanId"]),
                            bytes.fromhex(span.get("parentSpanId", "")))
                    # Back to protobuf JSON (base64 bytes) and through the real message type.
                    for key in ("traceId", "spanId", "parentSpanId"):
                        if key in span:
                            span[key] = base64.b64encode(bytes.fromhex(span[key])).decode()
                    span["_want"] = want
        wants = [sp.pop("_want") for rs in obj["resourceSpans"] for ss in rs["scopeSpans"] for sp in ss["spans"]]
        msg = json_format.Parse(json.dumps(obj), ExportTraceServiceRequest())
        got = [(s.trace_id, s.span_id, s.parent_span_id) for rs in msg.resource_spans for ss in rs.scope_spans
               for s in ss.spans]
        assert got == wants
        total += len(got)
    # 4 full requests, the HTTP span, the failed one (request + 6 up to PREFILL), the aborted one (+ DECODE).
    assert total == len(spans) == 4 * len(FULL_SPANS) + 1 + 7 + 8


def test_read_spans_tolerates_a_truncated_last_line(run, tmp_path):
    path, spans, _ = run
    text = path.read_text(encoding="utf-8")
    cut = tmp_path / "cut.jsonl"
    last = text.splitlines()[-1]
    cut.write_text(text + last[: len(last) // 2], encoding="utf-8")  # a writer died mid-line
    assert len(read_spans(cut)) == len(spans)
    cut.write_text(text + "\n\n", encoding="utf-8")
    assert len(read_spans(cut)) == len(spans)


def _readable_spans(n: int = 3):
    mem = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(mem))
    tracer = provider.get_tracer("t")
    for i in range(n):
        with tracer.start_as_current_span(f"s{i}", attributes={"i": i}):
            pass
    return mem.get_finished_spans()


def test_exporter_failure_returns_failure_logs_once_and_recovers(tmp_path, caplog):
    selflog.reset()
    target = tmp_path / "dir-in-the-way"
    target.mkdir()  # opening a directory for append fails
    exporter = OtlpJsonLinesExporter(target)
    spans = _readable_spans()
    with caplog.at_level(logging.WARNING, logger="fastdeploy_otel"):
        assert exporter.export(spans) is SpanExportResult.FAILURE
        assert exporter.export(spans) is SpanExportResult.FAILURE
    failures = [r for r in caplog.records if "writing spans to" in r.getMessage() and "failed" in r.getMessage()]
    assert len(failures) == 1
    assert exporter.failed == 6 and exporter.exported == 0
    target.rmdir()
    assert exporter.export(spans) is SpanExportResult.SUCCESS
    assert exporter.exported == 3
    assert [s.name for s in read_spans(target)] == ["s0", "s1", "s2"]
    exporter.shutdown()
    assert exporter.export(spans) is SpanExportResult.FAILURE


def test_exporter_is_thread_safe(tmp_path):
    path = tmp_path / "sub" / "concurrent.jsonl"  # the folder is created
    exporter = OtlpJsonLinesExporter(path)
    spans = _readable_spans(5)
    results = []

    def work():
        for _ in range(40):
            results.append(exporter.export(spans))

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r is SpanExportResult.SUCCESS for r in results) and len(results) == 320
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 320
    assert all(len(json.loads(line)["resourceSpans"][0]["scopeSpans"][0]["spans"]) == 5 for line in lines)
    assert len(read_spans(path)) == 1600


# ---- HTML ----------------------------------------------------------------------------------------
class _Elements(HTMLParser):
    """Every start tag with its (unescaped) attributes, and the request row it sits in."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str], str | None]] = []
        self.scripts = 0
        self._row: str | None = None

    def handle_starttag(self, tag, attrs):
        a = {k: v or "" for k, v in attrs}
        if tag == "script":
            self.scripts += 1
        if tag == "div" and "row" in a.get("class", "").split():
            self._row = a.get("data-rid")
        self.elements.append((tag, a, self._row))


def _elements(page: str) -> _Elements:
    p = _Elements()
    p.feed(page)
    return p


def _row_elements(p: _Elements, rid: str):
    return [(tag, a) for tag, a, row in p.elements if row == rid]


def test_html_one_row_per_request_and_escaping(run):
    _, _, page = run
    p = _elements(page)
    rows = [a for tag, a, _ in p.elements if tag == "div" and "r" in a.get("class", "").split()]
    assert sorted(a["data-rid"] for a in rows) == sorted(ALL_IDS)
    # The hostile id appears only escaped; the only script is ours.
    assert HOSTILE not in page
    assert html.escape(HOSTILE) in page
    assert p.scripts == 1 and page.count("<script") == 1
    assert "<b>bad</b>" not in page and html.escape("<b>bad</b>") in page
    assert "<run>" not in page and "<title>test &lt;run&gt; &amp; co</title>" in page
    # Self-contained: nothing fetched from anywhere.
    assert not re.search(r"<(link|img|iframe)\b|\bsrc=|@import|https?://", page)
    statuses = {a["data-rid"]: a["data-st"] for a in rows}
    assert statuses == {**{rid: "ok" for rid in OK_IDS}, ERR_ID: "error", ABORT_ID: "aborted"}


def test_html_bars_markers_errors_and_abort(run):
    _, _, page = run
    p = _elements(page)

    def markers(rid, name):
        return [a for tag, a in _row_elements(p, rid) if tag == "span" and f"ev-{name}" in a.get("class", "").split()]

    def bars(rid):
        return {a["title"].split()[0]: a for tag, a in _row_elements(p, rid)
                if tag == "div" and "b" in a.get("class", "").split()}

    for rid in ALL_IDS:
        assert len(markers(rid, "CACHE_MISS")) == 1
        assert len(markers(rid, "FIRST_TOKEN_GENERATED")) == (0 if rid == ERR_ID else 1)
        assert len(markers(rid, "CACHE_HIT")) == (0 if rid == "req-nohit" else 1)
        assert len(markers(rid, "CACHE_SWAP_IN")) == (0 if rid == "req-nohit" else 1)
        assert len(markers(rid, "PREEMPTED")) == (1 if rid == "req-nohit" else 0)
    # Distinct glyphs for the three cache decisions.
    glyphs = {}
    for name in ("CACHE_HIT", "CACHE_MISS", "CACHE_SWAP_IN"):
        m = re.search(r'class="m ev-%s"[^>]*>([^<]+)</span>' % name, page)
        glyphs[name] = m.group(1)
    assert len(set(glyphs.values())) == 3
    hit = markers("req-ok-1", "CACHE_HIT")[0]
    assert A.CACHE_MATCHED_TOKENS + " = 16" in hit["title"]

    full = bars("req-ok-1")
    assert set(full) == FULL_SPANS - {REQUEST_SPAN_NAME}
    assert all("err" not in a["class"].split() for a in full.values())
    assert "sub" in full["REQUEST_QUEUE"]["class"].split() and "sub" not in full["SCHEDULE"]["class"].split()
    assert re.search(r"^PREFILL  [\d.]+ (ms|µs|s)$", full["PREFILL"]["title"].splitlines()[0])
    # Sub-stage bars sit below the stage bars.
    top = lambda a: int(re.search(r"top:(\d+)px", a["style"]).group(1))  # noqa: E731
    assert top(full["REQUEST_QUEUE"]) > top(full["SCHEDULE"])
    assert float(full["DECODE"]["data-a"]) >= float(full["PREFILL"]["data-a"])

    err = bars(ERR_ID)
    assert "err" in err["PREFILL"]["class"].split()
    assert ERR_MESSAGE in err["PREFILL"]["title"]
    assert markers(ERR_ID, "exception") and ERR_MESSAGE in markers(ERR_ID, "exception")[0]["title"]
    err_label = next(a for tag, a in _row_elements(p, ERR_ID) if "lab" in a.get("class", "").split())
    assert ERR_MESSAGE in err_label["title"]
    assert "DECODE" not in err  # never reached

    ab_row = [a for tag, a in _row_elements(p, ABORT_ID) if tag == "div" and a.get("data-rid") == ABORT_ID][0]
    assert "aborted" in ab_row["class"].split()
    assert "abt" in bars(ABORT_ID)["DECODE"]["class"].split()
    assert len(markers(ABORT_ID, "ABORTED")) == 1
    assert 'class="badge aborted">ABORTED<' in page

    srv = [a for tag, a in _row_elements(p, "req-http") if "srv" in a.get("class", "").split()]
    assert len(srv) == 1 and srv[0]["title"].startswith(HTTP_SPAN)
    assert not [a for tag, a in _row_elements(p, "req-ok-1") if "srv" in a.get("class", "").split()]
    legend = page[page.index('class="legend"'): page.index('class="controls"')]
    for text in ("cache hit", "cache miss", "cache swap-in", "first token", "preempted", "error status", "aborted"):
        assert text in legend


def test_summarize_matches_the_replay(run):
    _, spans, _ = run
    s = summarize(spans)
    assert s["requests"] == 6
    assert s["errors"] == 2  # the failed one and the aborted one (it ends with ERROR status)
    assert s["aborted"] == 1
    assert s["preempted"] == 1
    assert s["cache_requests"] == 6 and s["cache_hit_requests"] == 5
    assert s["cache_hit_ratio"] == pytest.approx(5 / 6)
    assert s["swap_ins"] == 5
    counts = {name: d["count"] for name, d in s["stages"].items()}
    assert counts["PREPROCESSING"] == 6 and counts["SCHEDULE"] == 6 and counts["PREFILL"] == 6
    assert counts["DECODE"] == 5  # not the failed request
    assert counts["POSTPROCESSING"] == 4 and counts["WRITE_CACHE_TO_STORAGE"] == 4
    assert list(s["stages"])[:5] == ["PREPROCESSING", "SCHEDULE", "PREFILL", "DECODE", "POSTPROCESSING"]
    for name in ("PREFILL", "SCHEDULE", "DECODE"):
        ms = [(x.end_ns - x.start_ns) / 1e6 for x in spans if x.name == name]
        assert s["stages"][name]["p50_ms"] == pytest.approx(statistics.median(ms))
        assert s["stages"][name]["p99_ms"] == pytest.approx(statistics.quantiles(ms, n=100, method="inclusive")[98])
        assert s["stages"][name]["p99_ms"] >= s["stages"][name]["p50_ms"]
    assert s["request_ms"]["count"] == 6
    assert s["ttft_ms"]["count"] == 5  # the failed request never produced a token
    text = format_summary(s)
    assert "requests 6" in text and "errors 2" in text and "aborted 1" in text
    assert "83.3%" in text and "swap-ins 5" in text
    prefill_line = next(line for line in text.splitlines() if line.startswith("PREFILL "))
    assert prefill_line.split()[1] == "6"
    assert f"{s['stages']['PREFILL']['p50_ms']:.3f}" in prefill_line


def test_write_html_and_a_partial_file(run, tmp_path):
    path, spans, _ = run
    out = tmp_path / "timeline.html"
    summary = write_html(path, out)
    page = out.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert summary == summarize(spans)
    assert page.count('class="row r') == 6
    # Stage spans without their request span (another process's file) still get a row.
    orphan = [x for x in spans if x.attributes.get(A.REQUEST_ID) == "req-ok-1" and x.name != REQUEST_SPAN_NAME]
    rows = group_requests(orphan)
    assert len(rows) == 1 and rows[0].request is None and rows[0].request_id == "req-ok-1"
    assert len(rows[0].children) == len(FULL_SPANS) - 1
    assert 'data-rid="req-ok-1"' in render_html(orphan, "partial")
    assert "No fastdeploy.request spans" in render_html([], "empty")


def _synthetic(n: int) -> list[Span]:
    """n requests shaped like the replay's, laid out over a few seconds (for size and speed)."""
    spans, t = [], 1_700_000_000_000_000_000
    for i in range(n):
        tid, rid_span = f"{i + 1:032x}", f"{i + 1:016x}"
        base = t + i * 20_000_000
        rid = f"req-{i}"

        def span(name, sid, parent, start, end, events=(), status=0, attrs=None):
            spans.append(Span(
                name=name, trace_id=tid, span_id=sid, parent_span_id=parent, start_ns=start, end_ns=end,
                attributes={A.REQUEST_ID: rid, **({A.STAGE: name} if name != REQUEST_SPAN_NAME else {}), **(attrs or {})},
                events=list(events), status_code=status, status_message="x" if status else "", resource={},
            ))

        span(REQUEST_SPAN_NAME, rid_span, "", base, base + 90_000_000, status=2 if i % 10 == 0 else 0)
        span("PREPROCESSING", f"{i + 1:08x}00000001", rid_span, base, base + 5_000_000)
        span("SCHEDULE", f"{i + 1:08x}00000002", rid_span, base + 5_000_000, base + 15_000_000,
             events=[{"name": "CACHE_HIT" if i % 3 else "CACHE_MISS", "time_ns": base + 9_000_000, "attributes": {}}])
        span("PREFILL", f"{i + 1:08x}00000003", rid_span, base + 15_000_000, base + 40_000_000,
             events=[{"name": "FIRST_TOKEN_GENERATED", "time_ns": base + 40_000_000, "attributes": {}}])
        span("DECODE", f"{i + 1:08x}00000004", rid_span, base + 40_000_000, base + 85_000_000)
        span("POSTPROCESSING", f"{i + 1:08x}00000005", rid_span, base + 85_000_000, base + 90_000_000)
    return spans


def test_two_hundred_requests_stay_small_and_fast():
    spans = _synthetic(200)
    t = time.perf_counter()
    page = render_html(spans, "load")
    elapsed = time.perf_counter() - t
    assert page.count('class="row r') == 200
    assert elapsed < 2.0
    assert len(page) < 2_000_000
    s = summarize(spans)
    assert s["requests"] == 200 and s["errors"] == 20
    assert s["stages"]["PREFILL"]["p50_ms"] == pytest.approx(25.0)
    assert s["cache_hit_ratio"] == pytest.approx(133 / 200)
    assert s["ttft_ms"]["p99_ms"] == pytest.approx(40.0)
    limited = render_html(spans, "load", max_rows=50)
    assert limited.count('class="row r') == 50 and "50 of 200 requests" in limited
