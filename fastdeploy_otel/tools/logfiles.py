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

__all__ = ["STDIN", "find_logs", "is_trace_log", "open_text", "read_lines"]

STDIN = "-"
_CHUNK = 16 << 10  # characters of lines read at a time
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


def read_lines(path: str, on_error: Callable[[str, int, str], None]) -> Iterator[list[str]]:
    """The lines of `path` in lists of about _CHUNK characters (one call per list, not per line); an
    open or read failure is passed to `on_error` (path, line number, what) and ends the file.  The
    lines of the list being read when it failed are lost, as the text of the block being decoded
    always was."""
    lineno = 0
    try:
        with open_text(path) as f:
            while lines := f.readlines(_CHUNK):
                lineno += len(lines)
                yield lines
    except (OSError, EOFError, gzip.BadGzipFile, ValueError) as exc:
        on_error(path, lineno + 1, f"cannot read further: {type(exc).__name__}: {exc}")
