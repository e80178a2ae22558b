"""The trace.log mirror: FastDeploy's line format, its escaping, its regex, and the rotating file.

A line is what FastDeploy's ``trace_print`` writes, plus the ids of the span the event belongs to::

    INFO     2026-04-28 10:15:02,118 81234 engine_client.py[line:412] [thread=139872645371712] \
[thread_name=MainThread] [timestamp=1777342502118] [request_id=chatcmpl-7c1e_0] [user_id=None] \
[event=PREPROCESSING_START] [stage=PREPROCESSING] [trace_id=<32 hex>] [span_id=<16 hex>] 

Values are escaped (``\\``, ``[``, ``]``, control and line-separator characters become ``\\xNN`` /
``\\uNNNN``; values over 256 characters are cut and marked), so no input can start a new line or
forge a field.  ``LINE_RE`` and ``FIELD_RE`` parse a line back.
"""

from __future__ import annotations

import os
import re
import time

from ._logfile import DatedFile
from ._records import MirrorRecord
from ._selflog import get_logger
from .attributes import text as _text

logger = get_logger(__name__)

MAX_VALUE_LEN = 256

LINE_RE = re.compile(
    r"^(?P<level>[A-Z]+) +(?P<asctime>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (?P<pid>\d+) +"
    r"(?P<file>\S+)\[line:(?P<line>\d+)\] (?P<fields>(?:\[[a-z_]+=(?:[^\[\]\\\n]|\\.)*\] )+)$"
)
FIELD_RE = re.compile(r"\[(?P<key>[a-z_]+)=(?P<value>(?:[^\[\]\\\n]|\\.)*)\]")

_SAFE_SPECIALS = frozenset("[]\\")


def escape(value: object) -> str:
    """One field value that cannot break out of its brackets or its line."""
    text = value if type(value) is str else _text(value)
    if len(text) <= MAX_VALUE_LEN and text.isprintable() and not (_SAFE_SPECIALS & set(text)):
        return text
    cut = ""
    if len(text) > MAX_VALUE_LEN:
        cut = f"...(+{len(text) - MAX_VALUE_LEN} chars)"
        text = text[:MAX_VALUE_LEN]
    out = []
    for ch in text:
        if ch == "\\":
            out.append("\\\\")
        elif ch in "[]" or (not ch.isprintable() and ch != " "):
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
        else:
            out.append(ch)
    return "".join(out) + cut


def unescape(value: str) -> str:
    """Inverse of escape (for values that were not cut)."""
    return re.sub(
        r"\\(\\|x[0-9a-f]{2}|u[0-9a-f]{4}|U[0-9a-f]{8})",
        lambda m: "\\" if m.group(1) == "\\" else chr(int(m.group(1)[1:], 16)),
        value,
    )


def parse_line(line: str) -> dict[str, str] | None:
    """The fields of a mirror line (unescaped), plus level/asctime/pid/file/line; None if it is not one."""
    m = LINE_RE.match(line.rstrip("\n"))
    if m is None:
        return None
    out = {k: m.group(k) for k in ("level", "asctime", "pid", "file", "line")}
    for f in FIELD_RE.finditer(m.group("fields")):
        out[f.group("key")] = unescape(f.group("value"))
    return out


# ",000" ... ",999": the millisecond part of asctime, without formatting a number per line.
_MILLIS = tuple(f",{ms:03d}" for ms in range(1000))
_CACHE_MAX = 4096  # entries per fragment cache; a full cache starts afresh


class AscTime:
    """``2026-04-28 10:15:02,118`` for an epoch-ms time, caching the per-second part."""

    def __init__(self) -> None:
        self._sec = -1
        self._text = ""

    def __call__(self, ts_ms: int) -> str:
        sec, ms = divmod(ts_ms, 1000)
        if sec != self._sec:
            self._sec, self._text = sec, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sec))
        return self._text + _MILLIS[ms]


class LineFormatter:
    """MirrorRecord to line.  The same threads, call sites, request ids, users and trace ids recur
    line after line, so each fragment is escaped or formatted once and cached: half the instructions
    of formatting every field of every line."""

    def __init__(self, pid: int | None = None) -> None:
        self._asctime = AscTime()
        self._head = f"{os.getpid() if pid is None else pid:<5} "
        self._where: dict[tuple[str, int], str] = {}
        self._threads: dict[tuple[int, str], str] = {}
        self._who: dict[tuple[str, object], str] = {}
        self._hex: dict[int, str] = {}

    def __call__(self, r: MirrorRecord) -> str:
        ts_ns, filename, lineno, thread_id, thread_name, request_id, user, event, stage, trace_id, span_id = r
        ms = ts_ns // 1_000_000
        where = self._where.get((filename, lineno))
        if where is None:
            where = _put(self._where, (filename, lineno), f"{escape(os.path.basename(filename))}[line:{lineno}] ")
        thread = self._threads.get((thread_id, thread_name))
        if thread is None:
            thread = _put(
                self._threads, (thread_id, thread_name), f"[thread={thread_id}] [thread_name={escape(thread_name)}] "
            )
        # Only plain str ids and a str or None user are cached: 1, 1.0 and True would share a key,
        # and a str subclass may hash or compare as it likes.
        cached = type(request_id) is str and (user is None or type(user) is str)
        who = self._who.get((request_id, user)) if cached else None
        if who is None:
            who = f"[request_id={escape(request_id)}] " + ("" if user == "" else f"[user_id={escape(user)}] ")
            if cached:
                _put(self._who, (request_id, user), who)
        trace = self._hex.get(trace_id)
        if trace is None:
            trace = _put(self._hex, trace_id, f"{trace_id:032x}")
        return (
            f"INFO     {self._asctime(ms)} {self._head}{where}{thread}[timestamp={ms}] {who}"
            f"[event={event}] [stage={stage}] [trace_id={trace}] [span_id={span_id:016x}] "
        )


def _put(cache: dict, key: object, value: str) -> str:
    if len(cache) >= _CACHE_MAX:
        cache.clear()
    cache[key] = value
    return value


class TraceLogMirror:
    """Writes batches of mirror lines, one ``write`` per batch."""

    def __init__(
        self, log_dir: str, backup_count: int = 7, file_name: str = "trace.log", pid: int | None = None
    ) -> None:
        """`pid`: the process the lines are of (the export process writes the serving process's)."""
        self.file = DatedFile(os.path.join(log_dir, file_name), backup_count)
        self.path = self.file.path
        self._format = LineFormatter(pid)
        self._unformattable = 0

    @property
    def lines_written(self) -> int:
        return self.file.lines_written

    @property
    def lines_failed(self) -> int:
        return self.file.lines_failed + self._unformattable

    def write(self, records: list[MirrorRecord]) -> None:
        """One write per batch: the lines of concurrent processes never interleave mid-line."""
        if not records:
            return
        try:
            lines = list(map(self._format, records))
        except Exception:  # a bad record: line by line, so that it costs only itself
            lines = [line for line in map(self._line, records) if line is not None]
        if lines:
            self.file.write("\n".join(lines) + "\n", len(lines))

    def _line(self, record: MirrorRecord) -> str | None:
        try:
            return self._format(record)
        except Exception:  # one bad record must not cost the batch
            logger.warning("a trace.log line could not be formatted; written with its values as text", exc_info=True)
        try:
            return self._format(
                record._replace(
                    user=_text(record.user),
                    thread_name=_text(record.thread_name),
                    request_id=_text(record.request_id),
                    filename="<unknown>",
                )
            )
        except Exception:  # not even as text: the line is lost, and counted
            self._unformattable += 1
            return None

    def close(self) -> None:
        self.file.close()
