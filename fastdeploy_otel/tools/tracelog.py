"""One trace.log line, of any of the formats in the field, into the few values a replay needs.

Formats (``/work/shared/reference/fastdeploy_tracing.md`` section 3, and ``fastdeploy_otel.mirror``)::

    [2025-11-20 14:03:11,902] [INFO    ] (trace_logger.py:print:27) [thread=…] … [event=…] [stage=…]
    INFO     2026-04-28 10:15:02,118 81234 engine_client.py[line:412] [thread=…] … [trace_id=unknown]
    INFO     … [stage=…] [trace_id=<32 hex>] [span_id=<16 hex>]                      (our mirror)

Only the bracketed fields count; the header (asctime is local time, never used) may be anything.
FastDeploy does not escape its values, so a ``] [`` inside a value that is not followed by a field
name is kept in that value; the mirror escapes brackets, and its values are unescaped here.
``parse`` never raises: a line it cannot use gives None, and ``why_bad`` says why (slow, for reports).
"""

from __future__ import annotations

import re
from typing import NamedTuple

from ..events import _LOOKUP, LoggingEventName, lookup
from ..mirror import unescape

__all__ = ["MAX_LINE", "TraceLine", "parse", "why_bad"]

_lookup = _LOOKUP.get  # names only reach it: strings, always hashable
_new = tuple.__new__  # a NamedTuple without its generated __new__: a third of the cost of a line

# Longer lines are damage (the longest real line is a few hundred bytes; mirror values are capped).
MAX_LINE = 64 * 1024

_KEY = re.compile(r"[a-z_]+\Z")
_KNOWN = frozenset(
    ("thread", "thread_name", "timestamp", "request_id", "user_id", "event", "stage", "trace_id", "span_id")
)
_FIRST_FIELD = re.compile(r"\[[a-z_]+=")


class TraceLine(NamedTuple):
    """What a replay takes from one line: the rest (thread, file, pid) is not part of a span."""

    ts_ms: int  # the [timestamp=] field: epoch milliseconds, taken when the line was formatted
    request_id: str  # as written, with any per-choice suffix
    event: LoggingEventName
    user: str | None  # None: no user (FastDeploy writes "None")
    trace_id: int  # 0: none or "unknown"
    span_id: int  # 0: none (only the mirror writes one)


def _fields(text: str) -> dict[str, str] | None:
    """The bracketed ``[key=value]`` fields of a line; None when there are none or the last is cut."""
    body = text.rstrip()
    if not body.endswith("]"):
        return None
    start = body.find("[thread=")
    if start < 0:
        m = _FIRST_FIELD.search(body)
        if m is None:
            return None
        start = m.start()
    out: dict[str, str] = {}
    last = ""
    for part in body[start + 1 : -1].split("] ["):
        key, sep, value = part.partition("=")
        if sep and (key in _KNOWN or _KEY.match(key)):
            out[key] = value
            last = key
        elif last:  # "] [" inside an unescaped value: it belongs to the field before
            out[last] += "] [" + part
        else:
            return None
    return out


def _hex(value: str | None) -> int:
    if not value or value == "unknown":
        return 0
    try:
        return int(value, 16) if len(value) <= 32 else 0
    except ValueError:
        return 0


def _common(parts: list[str]) -> TraceLine | None:
    """The fields in the order FastDeploy and the mirror write them, from [timestamp=] on, with no
    bracket or escape in any value: one split instead of a dict.  None for anything else."""
    n = len(parts)
    if n < 4 or n > 7:
        return None
    ts, rid = parts[0], parts[1]
    if not (ts.startswith("timestamp=") and rid.startswith("request_id=")):
        return None
    user = None
    i = 2
    if parts[2].startswith("user_id="):
        user = parts[2][8:]
        if user == "None":
            user = None
        i = 3
    if i + 1 >= n or not parts[i].startswith("event=") or not parts[i + 1].startswith("stage="):
        return None
    event = _lookup(parts[i][6:])
    i += 2
    trace_id = span_id = 0
    try:
        if i < n and parts[i].startswith("trace_id="):
            value = parts[i][9:]
            if value != "unknown":
                trace_id = int(value, 16)
            i += 1
        if i < n and parts[i].startswith("span_id="):
            span_id = int(parts[i][8:], 16)
            i += 1
        ms = int(ts[10:])
    except ValueError:
        return None
    rid = rid[11:]
    if i != n or event is None or not rid or ms <= 0 or trace_id >> 128 or span_id >> 64:
        return None
    return _new(TraceLine, (ms, rid, event, user, trace_id, span_id))


def parse(text: str) -> TraceLine | None:
    """The line's values, or None when it is not a usable trace line (see why_bad)."""
    if len(text) > MAX_LINE:
        return None
    body = text.rstrip()
    if not body.endswith("]"):
        return None  # cut short (a whole line ends with its last field's bracket)
    start = body.find("[timestamp=")
    if start >= 0 and "\\" not in body:
        line = _common(body[start + 1 : -1].split("] ["))
        if line is not None:
            return line
    f = _fields(text)
    if f is None:
        return None
    try:
        ts = int(f["timestamp"])
        rid = f["request_id"]
        event = lookup(f["event"])
    except (KeyError, ValueError):
        return None
    if event is None or not rid or ts <= 0:
        return None
    span_id = _hex(f.get("span_id"))
    user = f.get("user_id")
    if span_id and "\\" in text:  # the mirror escapes its values; FastDeploy does not
        rid = unescape(rid)
        user = unescape(user) if user is not None else None
    return TraceLine(ts, rid, event, None if user == "None" else user, _hex(f.get("trace_id")), span_id)


def why_bad(text: str) -> str:
    """Why parse() rejected `text`: a few words, then any detail after a colon."""
    if len(text) > MAX_LINE:
        return f"line too long: {len(text):,} characters (over {MAX_LINE:,})"
    if "\ufffd" in text or "\x00" in text:
        return "binary data"
    f = _fields(text)
    if f is None:
        return "truncated line" if "[timestamp=" in text else "not a trace line"
    for key in ("timestamp", "request_id", "event"):
        if not f.get(key):
            return f"no {key} field"
    if not f["timestamp"].isdigit():
        return f"bad timestamp: {f['timestamp'][:32]!r}"
    if lookup(f["event"]) is None:
        return f"unknown event: {f['event'][:64]!r}"
    return "unusable line"
