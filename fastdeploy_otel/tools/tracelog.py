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
import sys
from itertools import repeat
from typing import NamedTuple

from ..events import _LOOKUP, LoggingEventName, lookup
from ..mirror import unescape

__all__ = ["MAX_LINE", "TraceLine", "parse", "parse_many", "split_lines", "why_bad"]

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


def _hex(value: str | None, digits: int = 32) -> int:
    """A hex id of at most `digits` digits (32: a trace id, 16: a span id); 0 when absent or wider."""
    if not value or value == "unknown":
        return 0
    try:
        return int(value, 16) if len(value) <= digits else 0
    except ValueError:
        return 0


# The shape FastDeploy and the mirror write, from [timestamp=] to the end of the line, with no "]" in
# any value, a user (if any) not empty and, on a mirror line, no escape: one match gives every value.
# Any other line ("] [" inside a value, escapes, odd spellings of a number) is left to _fields, which
# agrees on every line this accepts (unless its header, before [timestamp=], is damaged: _fields
# reads fields there too).  A value is any run of characters but "]": a class of one character, sre's
# fastest repeat; possessive where the re module has it (3.11): the same matches, less bookkeeping.
# FastDeploy's "no user", None, is matched but not captured: no str made, hashed and mapped per line.
_P = "+" if sys.version_info >= (3, 11) else ""
_COMMON = re.compile(
    rf"\[timestamp=([0-9]+{_P})\] \[request_id=([^\]]+{_P})\] (?:\[user_id=(?:None\] |([^\]]+{_P})\] ))?"
    rf"\[event=([^\]]+{_P})\] \[stage=[^\]]*{_P}\]"
    r"(?: \[trace_id=(?:unknown|([0-9a-f]{1,32}))\])?(?: \[span_id=([0-9a-f]{1,16})\])?"
    rf"[ \t\r\f\v]*{_P}(?:\n|\Z)"
)
_search = _COMMON.search
_findall = _COMMON.findall
_NO_USER = {"": None}  # findall gives "" for a missing field (or FastDeploy's None)


def split_lines(text: str) -> list[str]:
    """The lines of `text` as a file holds them: each ending at a newline ("\\n" only, as
    ``open(newline="\\n")`` reads them), but a last one without."""
    lines = text.split("\n")
    last = lines.pop()
    lines = [line + "\n" for line in lines]
    if last:
        lines.append(last)
    return lines


def parse_many(text: str) -> list[TraceLine | None]:
    """[parse(t) for t in split_lines(text)], for a block of lines as a file holds them.  When every
    line has the common shape: one regex pass over the block and a few passes in C, no Python call
    (nor str) per line; else line by line."""
    if not text:
        return []
    found = _findall(text)
    # A match ends at a line's end, so as many matches as lines means one within each line; a block
    # no longer than MAX_LINE holds no line longer than it.
    if len(found) == text.count("\n") + (text[-1] != "\n") and len(text) <= MAX_LINE:
        stamps, rids, users, names, trace_ids, span_ids = zip(*found, strict=True)
        events = list(map(_lookup, names))
        ms = list(map(int, stamps))
        if None not in events and min(ms) > 0 and (not any(span_ids) or "\\" not in text):
            return list(
                map(
                    _new,
                    repeat(TraceLine),
                    zip(
                        ms,
                        rids,
                        events,
                        map(_NO_USER.get, users, users) if any(users) else repeat(None),
                        [int(t, 16) if t else 0 for t in trace_ids] if any(trace_ids) else repeat(0),
                        [int(t, 16) if t else 0 for t in span_ids] if any(span_ids) else repeat(0),
                        strict=False,  # repeat(0): a column of zeros
                    ),
                )
            )
    return list(map(parse, split_lines(text)))


def parse(text: str) -> TraceLine | None:
    """The line's values, or None when it is not a usable trace line (see why_bad)."""
    if len(text) > MAX_LINE:
        return None
    m = _search(text)
    if m is not None:
        stamp, rid, user, name, trace_id, span_id = m.groups()
        ms = int(stamp)
        ev = _lookup(name)
        # A span_id makes it a mirror line, whose values may hold escapes: those are _fields' to undo.
        if ev is not None and ms > 0 and (span_id is None or "\\" not in text):
            return _new(
                TraceLine,
                (
                    ms,
                    rid,
                    ev,
                    None if user == "None" else user,
                    int(trace_id, 16) if trace_id else 0,
                    int(span_id, 16) if span_id else 0,
                ),
            )
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
    span_id = _hex(f.get("span_id"), 16)  # a wider one is damage: the span gets a derived id
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
