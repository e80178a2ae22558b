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
    text = value if isinstance(value, str) else _text(value)
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


class AscTime:
    """``2026-04-28 10:15:02,118`` for an epoch-ns time, caching the per-second part."""

    def __init__(self) -> None:
        self._sec = -1
        self._text = ""

    def __call__(self, ts_ns: int) -> str:
        sec, ms = divmod(ts_ns // 1_000_000, 1000)
        if sec != self._sec:
            self._sec, self._text = sec, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sec))
        return f"{self._text},{ms:03d}"


class LineFormatter:
    def __init__(self) -> None:
        self._asctime = AscTime()
        self._pid = os.getpid()
        # The same request ids, users, threads and files recur line after line: escape each once.
        self._escaped: dict[object, str] = {}
        self._files: dict[str, str] = {}

    def _esc(self, value: object) -> str:
        if type(value) is not str:  # only strings are cached: 1, 1.0 and True would share a key
            return escape(value)
        text = self._escaped.get(value)
        if text is None:
            if len(self._escaped) > 50_000:
                self._escaped.clear()
            text = self._escaped[value] = escape(value)
        return text

    def __call__(self, r: MirrorRecord) -> str:
        user = "" if r.user == "" else f"[user_id={self._esc(r.user)}] "  # FastDeploy drops an empty user
        file = self._files.get(r.filename)
        if file is None:
            file = self._files[r.filename] = escape(os.path.basename(r.filename))
        return (
            f"INFO     {self._asctime(r.ts_ns)} {self._pid:<5} {file}[line:{r.lineno}] "
            f"[thread={r.thread_id}] [thread_name={self._esc(r.thread_name)}] [timestamp={r.ts_ns // 1_000_000}] "
            f"[request_id={self._esc(r.request_id)}] {user}[event={r.event}] [stage={r.stage}] "
            f"[trace_id={r.trace_id:032x}] [span_id={r.span_id:016x}] "
        )


class TraceLogMirror:
    """Writes batches of mirror lines, one ``write`` per batch."""

    def __init__(self, log_dir: str, backup_count: int = 7, file_name: str = "trace.log") -> None:
        self.file = DatedFile(os.path.join(log_dir, file_name), backup_count)
        self.path = self.file.path
        self._format = LineFormatter()

    @property
    def lines_written(self) -> int:
        return self.file.lines_written

    @property
    def lines_failed(self) -> int:
        return self.file.lines_failed

    def write(self, records: list[MirrorRecord]) -> None:
        """One write per batch: the lines of concurrent processes never interleave mid-line."""
        if records:
            self.file.write("".join([self._line(r) + "\n" for r in records]), len(records))

    def _line(self, record: MirrorRecord) -> str:
        try:
            return self._format(record)
        except Exception:  # one bad record must not cost the batch
            logger.warning("a trace.log line could not be formatted; written with its values as text", exc_info=True)
            return self._format(
                record._replace(
                    user=_text(record.user),
                    thread_name=_text(record.thread_name),
                    request_id=_text(record.request_id),
                    filename="<unknown>",
                )
            )

    def close(self) -> None:
        self.file.close()
