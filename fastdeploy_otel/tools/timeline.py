"""A request timeline as one self-contained HTML file, and summary numbers, from exported spans.

    spans = read_spans("spans.jsonl")             # fastdeploy_otel.tools.spans (ours or the Collector's)
    open("timeline.html", "w").write(render_html(spans, "bench run 3"))
    print(format_summary(summarize(spans)))

    python -m fastdeploy_otel.tools.timeline spans.jsonl timeline.html

One row per request (a ``fastdeploy.request`` span): its stage spans as coloured bars on a shared
time axis, sub-stages as thinner bars below them, span events as markers, errors outlined in red,
aborted requests hatched.  Everything (CSS, JS) is inline; no network is needed to view it.
Every string taken from the spans is escaped: request ids and attribute values come from users.
"""

from __future__ import annotations

import html
import math
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from .. import attributes as A
from ..span_plan import PLAN, REQUEST_SPAN_NAME, STAGE_ORDER
from .spans import STATUS_ERROR, Span, read_spans

__all__ = ["format_summary", "render_html", "summarize", "write_html"]

CACHE_EVENTS = ("CACHE_HIT", "CACHE_MISS", "CACHE_SWAP_IN")
CACHE_HITS = ("CACHE_HIT", "CACHE_SWAP_IN")


def _substage_order() -> tuple[str, ...]:
    """Sub-stage span names in lifecycle order (by stage, then as the plan lists them)."""
    subs: list[str] = []
    for stage in STAGE_ORDER:
        for step in PLAN.values():
            if step.stage == stage and not step.is_stage and step.span not in subs:
                subs.append(step.span)
    return tuple(subs)


SUBSTAGE_ORDER = _substage_order()

STAGE_COLORS = {
    "PREPROCESSING": "#bfdbfe",
    "SCHEDULE": "#fde68a",
    "PREFILL": "#fdba74",
    "DECODE": "#86efac",
    "POSTPROCESSING": "#c4b5fd",
}
SUBSTAGE_COLORS = {
    "REQUEST_QUEUE": "#9ca3af",
    "ASK_DECODE_RESOURCE": "#f59e0b",
    "RESOURCE_ALLOCATE": "#d97706",
    "PREPARE_PREFIX_CACHE": "#92400e",
    "DECODE_PROCESS_PREALLOCATE_REQUEST": "#16a34a",
    "DECODE_PROCESS_PREFILLED_REQUEST": "#166534",
    "CHECK_CACHE_TRANSFER": "#7c3aed",
    "WRITE_CACHE_TO_STORAGE": "#4c1d95",
}
# Event name -> (glyph, colour, legend text)
MARKERS: dict[str, tuple[str, str, str]] = {
    "CACHE_HIT": ("\u25cf", "#15803d", "cache hit"),
    "CACHE_MISS": ("\u2715", "#374151", "cache miss"),
    "CACHE_SWAP_IN": ("\u25c6", "#1d4ed8", "cache swap-in (lower tier)"),
    "FIRST_TOKEN_GENERATED": ("\u2605", "#b45309", "first token"),
    "PREEMPTED": ("\u25b2", "#9333ea", "preempted"),
    "RESCHEDULED_INFERENCE_START": ("\u21bb", "#0e7490", "rescheduled"),
    "exception": ("\u26a0", "#dc2626", "exception"),
    "ABORTED": ("\u2298", "#b91c1c", "aborted"),
    A.ANOMALY: ("?", "#6b7280", "anomaly (out-of-order event)"),
}
_OTHER_MARKER = ("\u2022", "#475569", "other event")
_PALETTE = ("#0ea5e9", "#f43f5e", "#84cc16", "#eab308", "#14b8a6", "#a855f7", "#64748b")

LABEL_W = 300  # px, the sticky label column
_ATTR_LIMIT = 40  # attributes shown per hover title
_VALUE_LIMIT = 300  # characters per attribute value in a hover title


# ---- grouping ------------------------------------------------------------------------------------
@dataclass
class Row:
    """One request: its request span (None when only its stages are in the file) and its descendants."""

    key: str
    trace_id: str
    request: Span | None = None
    children: list[Span] = field(default_factory=list)
    server: Span | None = None  # the HTTP server span the request span hangs under, when present

    @property
    def spans(self) -> list[Span]:
        return ([self.request] if self.request is not None else []) + self.children

    @property
    def request_id(self) -> str:
        for s in self.spans:
            rid = s.attributes.get(A.REQUEST_ID)
            if rid is not None:
                return str(rid)
        return f"(no request id) {self.key}"

    @property
    def start_ns(self) -> int:
        if self.request is not None:
            return self.request.start_ns
        return min(s.start_ns for s in self.children)

    @property
    def end_ns(self) -> int:
        ends = [s.end_ns for s in self.spans]
        return max(ends) if ends else self.start_ns

    @property
    def first_ns(self) -> int:
        """The earliest thing drawn in the row (the HTTP span starts before the request span)."""
        starts = [s.start_ns for s in self.spans]
        if self.server is not None:
            starts.append(self.server.start_ns)
        return min(starts)

    @property
    def last_ns(self) -> int:
        ends = [s.end_ns for s in self.spans]
        if self.server is not None:
            ends.append(self.server.end_ns)
        return max(ends)

    @property
    def is_error(self) -> bool:
        return any(s.status_code == STATUS_ERROR for s in self.spans)

    @property
    def is_aborted(self) -> bool:
        return any(s.attributes.get(A.ABORTED) is True for s in self.spans)

    @property
    def errors(self) -> list[str]:
        """Status messages and exception messages, request span first, without repeats."""
        out: list[str] = []
        for s in self.spans:
            msgs = [s.status_message] if s.status_code == STATUS_ERROR else []
            for e in s.events:
                if e.get("name") == "exception":
                    ea = e.get("attributes", {})
                    msgs.append(f"{ea.get('exception.type', '')}: {ea.get('exception.message', '')}".strip(": "))
            for m in msgs:
                m = f"{s.name}: {m}" if m else f"{s.name}: error"
                if m not in out:
                    out.append(m)
        return out

    def events(self, name: str | tuple[str, ...]) -> list[tuple[Span, dict[str, Any]]]:
        names = (name,) if isinstance(name, str) else name
        return [(s, e) for s in self.spans for e in s.events if e.get("name") in names]


def _is_ours(span: Span) -> bool:
    return span.name == REQUEST_SPAN_NAME or A.STAGE in span.attributes


def group_requests(spans: Iterable[Span]) -> list[Row]:
    """Requests, by start time: each ``fastdeploy.request`` span with its stage and sub-stage spans.

    Stage spans whose request span is not among `spans` (e.g. a PD decode instance's file, where the
    request span was made by another process) are grouped under the missing parent as a row of their own.
    """
    spans = [s for s in spans if s.span_id]
    by_id: dict[tuple[str, str], Span] = {(s.trace_id, s.span_id): s for s in spans}
    rows: dict[tuple[str, str], Row] = {}
    for s in spans:
        if s.name == REQUEST_SPAN_NAME:
            key = (s.trace_id, s.span_id)
            row = rows.setdefault(key, Row(s.span_id, s.trace_id))
            row.request = s
            parent = by_id.get((s.trace_id, s.parent_span_id))
            if parent is not None and not _is_ours(parent):
                row.server = parent
    for s in spans:
        if s.name == REQUEST_SPAN_NAME or not _is_ours(s):
            continue
        cur, seen = s, set()
        while True:
            pid = cur.parent_span_id
            parent = by_id.get((s.trace_id, pid)) if pid else None
            if parent is None or parent.name == REQUEST_SPAN_NAME or not _is_ours(parent) or pid in seen:
                break
            seen.add(pid)
            cur = parent
        root = pid or cur.span_id
        key = (s.trace_id, root)
        rows.setdefault(key, Row(root, s.trace_id)).children.append(s)
    out = [r for r in rows.values() if r.spans]
    for r in out:
        r.children.sort(key=lambda c: (c.start_ns, c.end_ns))
    out.sort(key=lambda r: (r.start_ns, r.request_id))
    return out


def _is_stage(span: Span) -> bool:
    return span.name in STAGE_ORDER or span.name == span.attributes.get(A.STAGE)


# ---- summary -------------------------------------------------------------------------------------
def _percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not sorted_values:
        return float("nan")
    pos = (len(sorted_values) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _dist(values_ms: list[float]) -> dict[str, Any]:
    v = sorted(values_ms)
    return {"count": len(v), "p50_ms": _percentile(v, 0.50), "p99_ms": _percentile(v, 0.99)}


def _name_order(name: str) -> tuple[int, str]:
    if name in STAGE_ORDER:
        return (STAGE_ORDER.index(name), name)
    if name in SUBSTAGE_ORDER:
        return (100 + SUBSTAGE_ORDER.index(name), name)
    return (1000, name)


def summarize(spans: Iterable[Span]) -> dict[str, Any]:
    """Numbers for a run.

    ``requests``: requests (rows); ``stages``: ``{span name: {"count", "p50_ms", "p99_ms"}}`` over every
    stage and sub-stage span; ``request_ms`` and ``ttft_ms``: the same for whole requests and for the time
    from the request span's start to FIRST_TOKEN_GENERATED; ``cache_hit_ratio``: requests with a CACHE_HIT
    or CACHE_SWAP_IN event / requests with any cache event (None without cache events); ``swap_ins``:
    CACHE_SWAP_IN events; ``errors``: requests where the request span or any of its spans has ERROR
    status (aborted requests included: they end with ERROR status); ``aborted``; ``preempted``:
    requests with a PREEMPTED event.  Percentiles interpolate linearly between closest ranks.
    """
    rows = group_requests(spans)
    durations: dict[str, list[float]] = {}
    for r in rows:
        for s in r.children:
            durations.setdefault(s.name, []).append((s.end_ns - s.start_ns) / 1e6)
    ttft = []
    for r in rows:
        firsts = [e["time_ns"] for _, e in r.events("FIRST_TOKEN_GENERATED")]
        if firsts and r.request is not None:
            ttft.append((min(firsts) - r.request.start_ns) / 1e6)
    cache_rows = [r for r in rows if r.events(CACHE_EVENTS)]
    hit_rows = [r for r in cache_rows if r.events(CACHE_HITS)]
    return {
        "requests": len(rows),
        "stages": {name: _dist(durations[name]) for name in sorted(durations, key=_name_order)},
        "request_ms": _dist([(r.end_ns - r.start_ns) / 1e6 for r in rows if r.request is not None]),
        "ttft_ms": _dist(ttft),
        "cache_requests": len(cache_rows),
        "cache_hit_requests": len(hit_rows),
        "cache_hit_ratio": (len(hit_rows) / len(cache_rows)) if cache_rows else None,
        "swap_ins": sum(len(r.events("CACHE_SWAP_IN")) for r in rows),
        "errors": sum(1 for r in rows if r.is_error),
        "aborted": sum(1 for r in rows if r.is_aborted),
        "preempted": sum(1 for r in rows if r.events("PREEMPTED")),
    }


def _ms(v: float) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def format_summary(summary: dict[str, Any]) -> str:
    """A compact table of summarize()'s numbers."""
    ratio = summary.get("cache_hit_ratio")
    lines = [
        f"requests {summary['requests']}   errors {summary['errors']} (aborted included)   aborted {summary['aborted']}"
        f"   preempted {summary.get('preempted', 0)}",
        "cache hit ratio "
        + (f"{ratio * 100:.1f}%" if ratio is not None else "-")
        + f" ({summary.get('cache_hit_requests', 0)}/{summary.get('cache_requests', 0)} requests with cache events)"
        + f"   swap-ins {summary['swap_ins']}",
        "",
        f"{'span':<36} {'count':>6} {'p50 ms':>11} {'p99 ms':>11}",
    ]
    rows = [(name, d) for name, d in summary["stages"].items()]
    rows += [("request (whole)", summary["request_ms"]), ("time to first token", summary["ttft_ms"])]
    for name, d in rows:
        indent = "  " if name in SUBSTAGE_ORDER else ""
        lines.append(f"{(indent + name)[:36]:<36} {d['count']:>6} {_ms(d['p50_ms']):>11} {_ms(d['p99_ms']):>11}")
    return "\n".join(lines)


# ---- HTML ----------------------------------------------------------------------------------------
def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _dur(ms: float) -> str:
    if ms >= 1000:
        return f"{ms / 1000:.3f} s"
    if ms >= 1:
        return f"{ms:.2f} ms"
    return f"{ms * 1000:.1f} \u00b5s"


def _value(v: Any) -> str:
    text = str(v)
    return text if len(text) <= _VALUE_LIMIT else text[:_VALUE_LIMIT] + "\u2026"


def _attr_lines(attrs: dict[str, Any], skip: tuple[str, ...] = ()) -> list[str]:
    items = [(k, v) for k, v in attrs.items() if k not in skip]
    out = [f"  {k} = {_value(v)}" for k, v in items[:_ATTR_LIMIT]]
    if len(items) > _ATTR_LIMIT:
        out.append(f"  \u2026 {len(items) - _ATTR_LIMIT} more")
    return out


def _color(name: str, table: dict[str, str]) -> str:
    if name in table:
        return table[name]
    return _PALETTE[sum(name.encode()) % len(_PALETTE)]


def _pack(items: list[Span]) -> list[int]:
    """Lane per span so that spans in one lane do not overlap (greedy, by start)."""
    ends: list[int] = []
    lanes = [0] * len(items)
    for i in sorted(range(len(items)), key=lambda i: (items[i].start_ns, -items[i].end_ns)):
        s = items[i]
        for lane, end in enumerate(ends):
            if end <= s.start_ns:
                ends[lane] = s.end_ns
                lanes[i] = lane
                break
        else:
            ends.append(s.end_ns)
            lanes[i] = len(ends) - 1
    return lanes


def _nice_step(total: float, target: int = 8) -> float:
    if total <= 0:
        return 1.0
    raw = total / target
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def _ticks(total_ms: float) -> str:
    step = _nice_step(total_ms)
    out, t, n = [], 0.0, 0
    while t <= total_ms + 1e-9 and n < 100:
        left = t / total_ms * 100 if total_ms > 0 else 0
        out.append(f'<div class="tick" style="left:{left:.4f}%"><span>{_e(_dur(t) if t else "0")}</span></div>')
        n += 1
        t = n * step
    return "".join(out)


def _pos(a_ms: float, r_ms: float, w_ms: float | None, total_ms: float) -> str:
    """data-* (absolute start, start from the row's origin, width; all ms) and the initial style."""
    left = a_ms / total_ms * 100 if total_ms > 0 else 0
    if w_ms is None:
        return f'data-a="{a_ms:.4f}" data-r="{r_ms:.4f}" style="left:{left:.4f}%'
    width = w_ms / total_ms * 100 if total_ms > 0 else 0
    return f'data-a="{a_ms:.4f}" data-r="{r_ms:.4f}" data-w="{w_ms:.4f}" style="left:{left:.4f}%;width:{width:.4f}%'


def _span_title(s: Span, row_origin: int, skip: tuple[str, ...]) -> str:
    ms = (s.end_ns - s.start_ns) / 1e6
    lines = [f"{s.name}  {_dur(ms)}", f"starts at +{_dur((s.start_ns - row_origin) / 1e6)}"]
    if s.status_code == STATUS_ERROR:
        lines.append(f"ERROR: {s.status_message or '(no message)'}")
    for e in s.events:
        if e.get("name") == "exception":
            ea = e.get("attributes", {})
            lines.append(f"exception {ea.get('exception.type', '')}: {_value(ea.get('exception.message', ''))}")
    lines += _attr_lines(s.attributes, skip)
    return "\n".join(lines)


def _asset(name: str) -> str:
    """The page's stylesheet and script, shipped as package data beside this module."""
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


def _legend() -> str:
    items = []
    for name in STAGE_ORDER:
        items.append(
            f'<span class="it"><span class="sw" style="background:{STAGE_COLORS.get(name, "#e5e7eb")}"></span>{_e(name)}</span>'
        )
    for name in SUBSTAGE_ORDER:
        items.append(
            f'<span class="it"><span class="sw sub" style="background:{_color(name, SUBSTAGE_COLORS)}"></span>'
            f"{_e(name.lower())}</span>"
        )
    for name, (glyph, color, text) in MARKERS.items():
        items.append(
            f'<span class="it" title="{_e(name)}"><span style="color:{color};font-size:13px">{glyph}</span>{_e(text)}</span>'
        )
    items.append(
        '<span class="it"><span class="sw" style="outline:2px solid #dc2626;background:#fff"></span>error status</span>'
    )
    items.append(
        '<span class="it"><span class="sw" style="background:repeating-linear-gradient(135deg,#ffedd5 0 4px,#fff 4px 8px);'
        'border-color:#fb923c"></span>aborted request</span>'
    )
    items.append('<span class="it"><span class="sw" style="background:#f1f5f9"></span>request span</span>')
    items.append(
        '<span class="it"><span class="sw" style="height:3px;background:#475569"></span>HTTP server span</span>'
    )
    return '<div class="legend">' + "".join(items) + "</div>"


def _row_html(row: Row, t0: int, total_ms: float) -> tuple[str, float]:
    """One request row; also returns its span (ms) from its own origin, for the aligned view."""
    origin = row.first_ns
    parts: list[str] = []

    def pos(start_ns: int, end_ns: int | None) -> str:
        a = (start_ns - t0) / 1e6
        r = (start_ns - origin) / 1e6
        return _pos(a, r, None if end_ns is None else max(end_ns - start_ns, 0) / 1e6, total_ms)

    skip = (A.REQUEST_ID,)
    top = 1
    if row.server is not None:
        srv = row.server
        title = _span_title(srv, origin, ())
        parts.append(f'<div class="srv" {pos(srv.start_ns, srv.end_ns)}" title="{_e(title)}"></div>')
        top = 5
    stages = [s for s in row.children if _is_stage(s)]
    subs = [s for s in row.children if not _is_stage(s)]
    stage_lanes = _pack(stages)
    sub_lanes = _pack(subs)
    n_stage = max(stage_lanes, default=0) + 1
    n_sub = max(sub_lanes, default=-1) + 1
    lane_h, sub_h = 15, 6
    stage_top = top + 1
    sub_top = stage_top + n_stage * lane_h + 2
    height = sub_top + n_sub * (sub_h + 1) + 2
    height = max(height, 24)

    if row.request is not None:
        rq = row.request
        title = _span_title(rq, origin, skip)
        cls = "req err" if rq.status_code == STATUS_ERROR and not row.is_aborted else "req"
        parts.append(
            f'<div class="{cls}" {pos(rq.start_ns, rq.end_ns)};top:{top}px;height:{height - top - 1}px" '
            f'title="{_e(title)}"></div>'
        )
    lane_of: dict[str, int] = {}
    for s, lane in zip(stages, stage_lanes, strict=True):
        lane_of[s.span_id] = lane
        attrs = s.attributes
        classes = ["b"]
        if s.status_code == STATUS_ERROR:
            classes.append("abt" if attrs.get(A.ABORTED) is True else "err")
        if attrs.get(A.IMPLICIT_START):
            classes.append("imp")
        color = _color(s.name, STAGE_COLORS)
        parts.append(
            f'<div class="{" ".join(classes)}" {pos(s.start_ns, s.end_ns)};top:{stage_top + lane * lane_h}px;'
            f'height:{lane_h - 1}px;background:{color}" title="{_e(_span_title(s, origin, skip))}">{_e(s.name)}</div>'
        )
    for s, lane in zip(subs, sub_lanes, strict=True):
        attrs = s.attributes
        classes = ["b", "sub"]
        if s.status_code == STATUS_ERROR:
            classes.append("abt" if attrs.get(A.ABORTED) is True else "err")
        color = _color(s.name, SUBSTAGE_COLORS)
        parts.append(
            f'<div class="{" ".join(classes)}" {pos(s.start_ns, s.end_ns)};top:{sub_top + lane * (sub_h + 1)}px;'
            f'height:{sub_h}px;background:{color}" title="{_e(_span_title(s, origin, skip))}"></div>'
        )
    # Markers: on the stage lane of the span they belong to; the request span's on the first lane.
    stage_of_id = {s.span_id: s for s in stages}
    for s in row.spans:
        found = lane_of.get(s.span_id)
        if found is None:
            parent = stage_of_id.get(s.parent_span_id)
            found = lane_of.get(parent.span_id, 0) if parent is not None else 0
        lane = found
        for e in s.events:
            name = e.get("name", "")
            glyph, color, text = MARKERS.get(name, _OTHER_MARKER)
            ts = e.get("time_ns", s.start_ns)
            lines = [f"{name} @ +{_dur((ts - origin) / 1e6)}  (on {s.name})"]
            lines += _attr_lines(e.get("attributes", {}))
            # Cache decisions sit a little higher than the other markers, so they stay apart.
            y = stage_top + lane * lane_h + (-2 if name in CACHE_EVENTS else 2)
            parts.append(
                f'<span class="m ev-{_e(name)}" {pos(ts, None)};top:{y}px;color:{color}" '
                f'title="{_e(chr(10).join(lines))}">{glyph}</span>'
            )

    status = "aborted" if row.is_aborted else "error" if row.is_error else "ok"
    badges = []
    if row.is_aborted:
        badges.append('<span class="badge aborted">ABORTED</span>')
    if row.is_error and (not row.is_aborted or row.events("exception")):
        badges.append('<span class="badge error">ERROR</span>')
    if not badges:
        badges.append('<span class="badge ok">OK</span>')
    dur_ms = (row.end_ns - row.start_ns) / 1e6
    rid = row.request_id
    label_title = [f"request {rid}", f"trace {row.trace_id}", f"duration {_dur(dur_ms)}", f"status {status.upper()}"]
    if row.request is None:
        label_title.append("(its request span is not in this file; grouped under parent span " + row.key + ")")
    if row.server is not None:
        label_title.append(f"HTTP: {row.server.name}")
    label_title += [f"! {m}" for m in row.errors]
    cls = "row r" + (" err" if status == "error" else "") + (" aborted" if status == "aborted" else "")
    html_row = (
        f'<div class="{cls}" data-rid="{_e(rid)}" data-st="{status}" data-s="{(row.start_ns - t0) / 1e6:.4f}" '
        f'data-d="{dur_ms:.4f}" style="height:{height}px">'
        f'<div class="lab" title="{_e(chr(10).join(label_title))}"><span class="rid">{_e(rid)}</span>'
        f'{"".join(badges)}<span class="rdur">{_e(_dur(dur_ms))}</span></div>'
        f'<div class="trk">{"".join(parts)}</div></div>'
    )
    return html_row, (row.last_ns - origin) / 1e6


def render_html(spans: list[Span], title: str, max_rows: int = 5000) -> str:
    """The timeline page (a complete, self-contained HTML document) for `spans` (read_spans())."""
    rows = group_requests(spans)
    total_rows = len(rows)
    rows = rows[:max_rows]
    summary = summarize([s for r in rows for s in r.spans] + [r.server for r in rows if r.server is not None])
    if rows:
        t0 = min(r.first_ns for r in rows)
        t1 = max(r.last_ns for r in rows)
    else:
        t0 = t1 = 0
    total_a = max((t1 - t0) / 1e6, 1e-6)
    body_rows, rel = [], []
    for r in rows:
        h, span_ms = _row_html(r, t0, total_a)
        body_rows.append(h)
        rel.append(span_ms)
    total_r = max(max(rel, default=0.0), 1e-6)
    shown = (
        f"{len(rows)} of {total_rows} requests (limit {max_rows})"
        if total_rows > len(rows)
        else f"{len(rows)} requests"
    )
    css = _asset("timeline.css").replace("LABEL_W", str(LABEL_W)).replace("TRACK_PAD", str(LABEL_W + 40))
    meta = f"{shown} \u00b7 {len(spans)} spans \u00b7 time span {_dur(total_a)}"
    if not rows:
        body = '<div class="empty">No fastdeploy.request spans in this file.</div>'
    else:
        body = "".join(body_rows)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{_e(title)}</title><style>{css}</style></head><body>"
        f'<header><h1>{_e(title)}</h1><div class="meta">{_e(meta)}</div>'
        f'<details open><summary>Summary</summary><pre class="sum">{_e(format_summary(summary))}</pre></details>'
        f"{_legend()}"
        '<div class="controls">'
        '<label>filter <input id="q" type="search" placeholder="request id" autocomplete="off"></label>'
        '<label><input id="prob" type="checkbox"> errors / aborted only</label>'
        '<label>sort <select id="sort"><option value="start">start time</option><option value="dur">duration</option>'
        '<option value="status">status</option><option value="id">request id</option></select></label>'
        '<label><input id="align" type="checkbox"> align requests at their start</label>'
        '<label>zoom <input id="zoom" type="range" min="1" max="50" step="1" value="1"> <span id="zv">1\u00d7</span></label>'
        '<span id="shown" class="meta"></span></div></header>'
        f'<div class="tl" id="tl" data-total-a="{total_a:.4f}" data-total-r="{total_r:.4f}">'
        f'<div class="row axis"><div class="lab">request \u00b7 status \u00b7 duration</div>'
        f'<div class="trk" id="axis-trk">{_ticks(total_a)}</div></div>'
        f"{body}</div><script>{_asset('timeline.js')}</script></body></html>\n"
    )


def write_html(
    spans_path: str | os.PathLike[str], html_path: str | os.PathLike[str], title: str | None = None
) -> dict[str, Any]:
    """Read an OTLP/JSON lines file, write its timeline page; returns summarize() of its spans."""

    spans = read_spans(spans_path)
    page = render_html(spans, title or f"FastDeploy request timeline \u2014 {os.path.basename(os.fspath(spans_path))}")
    tmp = os.fspath(html_path) + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(page)
    os.replace(tmp, html_path)
    return summarize(spans)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (2, 3):
        print("usage: python -m fastdeploy_otel.tools.timeline SPANS.jsonl OUT.html [TITLE]", file=sys.stderr)
        return 2
    summary = write_html(args[0], args[1], args[2] if len(args) == 3 else None)
    print(format_summary(summary))
    print(f"wrote {args[1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
