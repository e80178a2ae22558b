"""Finding and reading trace.log files: directories searched, rotated and gzipped files, stdin.

What a deployment leaves behind: ``trace.log`` (a symlink to today's ``trace.log.YYYY-MM-DD`` in
FastDeploy's and our layout), older days, ``trace.log.N`` from a size-rotating handler, any of them
gzipped, and ``trace_logger.log`` from FastDeploy's first version.  A symlink and its target are read
once.  Reading never raises: a file that cannot be opened or is cut short is reported and skipped.
"""

from __future__ import annotations

import gzip
import io
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import TextIO

__all__ = ["STDIN", "find_logs", "is_trace_log", "open_text", "read_blocks"]

STDIN = "-"
_CHUNK = 32 << 10  # characters read at a time: a block stays within tracelog.MAX_LINE, its fast path
_NAME = re.compile(r"^trace(?:_logger)?\.log(?:\.\d{4}-\d\d-\d\d|\.\d+)?(?:\.gz)?$")


def is_trace_log(name: str) -> bool:
    """Whether a file name is one a trace logger writes or rotates to."""
    return _NAME.match(name) is not None


def find_logs(paths: Iterable[str]) -> tuple[list[str], list[str]]:
    """The files to read for `paths` (files as given, directories searched), and the paths not found."""
    found: list[str] = []
    missing: list[str] = []
    seen: set[str] = set()

    def add(path: str) -> None:
        real = os.path.realpath(path) if path != STDIN else STDIN
        if real not in seen:
            seen.add(real)
            found.append(path)

    for path in paths:
        if path == STDIN or os.path.isfile(path):
            add(path)
        elif os.path.isdir(path):
            for root, dirs, files in os.walk(path):
                dirs.sort()
                for name in sorted(files):
                    full = os.path.join(root, name)
                    if is_trace_log(name) and os.path.isfile(full):
                        add(full)
        else:
            missing.append(path)
    return found, missing


def open_text(path: str) -> TextIO:
    """A text stream of the file (gzip recognised by its magic bytes), undecodable bytes replaced."""
    if path == STDIN:
        return io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="replace", newline="\n")
    raw = open(path, "rb")
    try:
        magic = raw.peek(2)[:2]
    except OSError:
        magic = b""
    if magic == b"\x1f\x8b":
        return io.TextIOWrapper(gzip.GzipFile(fileobj=raw), encoding="utf-8", errors="replace", newline="\n")
    return io.TextIOWrapper(raw, encoding="utf-8", errors="replace", newline="\n")


def read_blocks(path: str, on_error: Callable[[str], None]) -> Iterator[str]:
    """The text of `path` in blocks of whole lines, about _CHUNK characters each: no str per line is
    made (nor joined again) before the parser's one pass over a block.  Each block ends at a newline
    but the file's last.  An open or read failure is passed to `on_error` (what happened) and ends
    the file; the lines of the block being read when it failed are lost, as the text of the block
    being decoded always was.  Lines are not counted here (a count is a pass over the text): the
    caller knows how many it has had."""
    try:
        with open_text(path) as f:
            pending: list[str] = []  # a line longer than a read, so far
            while block := f.read(_CHUNK):
                end = block.rfind("\n") + 1
                if not end:
                    pending.append(block)
                    continue
                text = block[:end]
                if pending:
                    text = "".join([*pending, text])
                    pending.clear()
                if end < len(block):
                    pending.append(block[end:])
                yield text
            if pending:
                yield "".join(pending)
    except (OSError, EOFError, gzip.BadGzipFile, ValueError) as exc:
        on_error(f"cannot read further: {type(exc).__name__}: {exc}")
