"""error.log: one record per ``record_error``, with the traceback, request_id, trace_id and span_id.

A record is FastDeploy's log line, escaped as trace.log is, followed by the traceback with every
line behind a fixed prefix, so nothing a client sends (an id, a user, an exception message) can
start a line that looks like a record::

    ERROR    2026-11-29 10:33:00,678 14558 engine.py[line:295] request[r-1] failed: IndexError: ... \
[request_id=r-1] [trace_id=<32 hex>] [span_id=<16 hex>]
        | Traceback (most recent call last):
        |   File "engine.py", line 262, in runner_loop
        | IndexError: index 4242 is out of bounds\\x0a(a newline in the message stays on its line)
"""

from __future__ import annotations

import os
import traceback

from ._logfile import DatedFile
from ._records import ErrorLog
from .attributes import text
from .mirror import AscTime, escape

CONTINUATION = "    | "  # begins every traceback line; a record always begins with its level name
MAX_TRACEBACK_LINES = 400
MAX_LINE_LEN = 2048

_CAUSE = "The above exception was the direct cause of the following exception:"
_CONTEXT = "During handling of the above exception, another exception occurred:"


def exception_type(exc: BaseException) -> str:
    """The name Python prints for an exception: ``ValueError``, ``json.decoder.JSONDecodeError``."""
    cls = type(exc)
    module = getattr(cls, "__module__", "")
    name = getattr(cls, "__qualname__", cls.__name__)
    return name if module in ("builtins", "__main__", None, "") else f"{module}.{name}"


def _line(value: str) -> str:
    """A traceback line that cannot end early: control and line-separator characters escaped."""
    if value.isprintable() and len(value) <= MAX_LINE_LEN:
        return value
    cut = f"...(+{len(value) - MAX_LINE_LEN} chars)" if len(value) > MAX_LINE_LEN else ""
    out = []
    for ch in value[:MAX_LINE_LEN]:
        if ch.isprintable() or ch == " ":
            out.append(ch)
        else:
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    return "".join(out) + cut


def traceback_lines(exc: BaseException) -> list[str]:
    """Python's traceback text for `exc` and its chain, one safe line per entry.

    Each exception's message is one escaped line, wherever it came from.
    """
    chain: list[tuple[BaseException, str | None]] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    link: str | None = None
    while current is not None and id(current) not in seen and len(chain) < 16:
        seen.add(id(current))
        chain.append((current, link))
        if current.__cause__ is not None:
            current, link = current.__cause__, _CAUSE
        elif current.__context__ is not None and not current.__suppress_context__:
            current, link = current.__context__, _CONTEXT
        else:
            current = None
    lines: list[str] = []
    for i, (e, _) in enumerate(reversed(chain)):
        if i:
            lines += ["", chain[len(chain) - i][1] or _CONTEXT, ""]
        if e.__traceback__ is not None:
            lines.append("Traceback (most recent call last):")
            for frame in traceback.format_tb(e.__traceback__):
                lines.extend(frame.rstrip("\n").split("\n"))
        message = text(e)
        lines.append(f"{exception_type(e)}: {message}" if message else exception_type(e))
    if len(lines) > MAX_TRACEBACK_LINES:
        keep = MAX_TRACEBACK_LINES // 2
        lines = [*lines[:keep], f"... {len(lines) - 2 * keep} lines cut ...", *lines[-keep:]]
    return [_line(x) for x in lines]


class ErrorLogFile:
    """Formats ErrorLog records and appends them to ``error.log.YYYY-MM-DD`` (see logfile)."""

    def __init__(self, log_dir: str, backup_count: int = 7) -> None:
        self.file = DatedFile(os.path.join(log_dir, "error.log"), backup_count)
        self._asctime = AscTime()
        self._pid = os.getpid()

    def format(self, e: ErrorLog) -> tuple[str, int]:
        """The record's text and its number of lines."""
        rid = escape(e.request_id)
        exc_type, message = escape(exception_type(e.exc)), escape(text(e.exc))
        head = (
            f"ERROR    {self._asctime(e.ts_ns // 1_000_000)} {self._pid:<5} "
            f"{escape(os.path.basename(e.filename or '<unknown>'))}"
            f"[line:{e.lineno}] request[{rid}] failed: {exc_type}: {message} "
            f"[request_id={rid}] [trace_id={e.trace_id:032x}] [span_id={e.span_id:016x}]\n"
        )
        body = traceback_lines(e.exc)
        return head + "".join(CONTINUATION + line + "\n" for line in body), 1 + len(body)

    def write(self, records: list[ErrorLog]) -> None:
        parts, count = [], 0
        for e in records:
            text_, n = self.format(e)
            parts.append(text_)
            count += n
        self.file.write("".join(parts), count)

    def close(self) -> None:
        self.file.close()
