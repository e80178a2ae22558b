"""``tail -F`` for trace.log files: new lines as they are written, across rotation and truncation.

Each followed path is re-examined on every poll.  When it names another file than the one open
(FastDeploy's ``trace.log`` symlink switched to a new day at midnight, or a rename-style rotation),
the old file stays open for a grace period, since a process that has not yet rolled over still
appends to it, and the new file is read from its start.  A file that shrank was truncated: it is
read again from the start.  A directory is searched again every few seconds for trace logs that
appear later (a process that starts after the follower).  Only whole lines are returned; a partial
line waits for its newline, and one longer than MAX_LINE is dropped and reported.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .logfiles import is_trace_log
from .tracelog import MAX_LINE

__all__ = ["Follower"]

_READ = 1 << 20
_MAX_READ_PER_POLL = 16 << 20  # stay responsive (progress, SIGTERM) while catching up on a big file
_RESCAN_S = 2.0
_TAIL = 128


@dataclass
class _Open:
    fd: int
    ident: tuple[int, int]  # (st_dev, st_ino)
    offset: int = 0
    lineno: int = 0
    partial: bytes = b""
    tail: bytes = b""  # the last bytes read: seeing other bytes there means the file was rewritten
    skipping: bool = False  # inside an over-long line: drop up to the next newline
    idle_since: float = field(default_factory=time.monotonic)


@dataclass
class _Target:
    path: str
    current: _Open | None = None
    draining: list[_Open] = field(default_factory=list)


Lines = list[tuple[str, int, str]]  # (path, line number, text)


class Follower:
    """Follows files and the trace logs under directories; poll() returns the new whole lines."""

    def __init__(
        self,
        paths: list[str],
        on_error: Callable[[str, int, str], None],
        from_end: bool = False,
        grace_s: float = 5.0,
    ) -> None:
        self._dirs = [p for p in paths if os.path.isdir(p)]
        self._targets: dict[str, _Target] = {p: _Target(p) for p in paths if not os.path.isdir(p)}
        self._on_error = on_error
        self._grace_s = grace_s
        self._last_scan = 0.0
        self._scan()
        if from_end:  # what is there now is not followed: start at the end of each file
            for t in self._targets.values():
                self._reopen(t)
                if t.current is not None:
                    t.current.offset = os.lseek(t.current.fd, 0, os.SEEK_END)
                    t.current.lineno = -1  # line numbers unknown from here

    @property
    def paths(self) -> list[str]:
        return list(self._targets)

    def _scan(self) -> None:
        self._last_scan = time.monotonic()
        for d in self._dirs:
            for root, _, files in os.walk(d):
                for name in files:
                    # The live file only: trace.log (and trace_logger.log); rotated days are history.
                    if is_trace_log(name) and name in ("trace.log", "trace_logger.log"):
                        full = os.path.join(root, name)
                        self._targets.setdefault(full, _Target(full))

    def poll(self) -> Lines:
        out: Lines = []
        now = time.monotonic()
        if self._dirs and now - self._last_scan > _RESCAN_S:
            self._scan()
        for t in self._targets.values():
            self._check(t, out)
            for old in list(t.draining):
                self._read(t.path, old, out)
                if now - old.idle_since > self._grace_s:
                    self._close(t.path, old, out)
                    t.draining.remove(old)
            if t.current is not None:
                self._read(t.path, t.current, out)
        return out

    def close(self) -> Lines:
        """Stop following; what is left of a last line without a newline is returned as a line."""
        out: Lines = []
        for t in self._targets.values():
            for h in [*t.draining, *([t.current] if t.current is not None else [])]:
                self._read(t.path, h, out)
                self._close(t.path, h, out)
            t.current, t.draining = None, []
        return out

    # ---- one path -------------------------------------------------------------------------------
    def _check(self, t: _Target, out: Lines) -> None:
        """Has the path been switched to another file, or truncated?"""
        try:
            st = os.stat(t.path)
        except OSError:
            return  # gone for now (mid-rotation, or not created yet): keep reading what is open
        cur = t.current
        if cur is None or (st.st_dev, st.st_ino) != cur.ident:
            if cur is not None:  # read to its end below, and for a grace period after
                cur.idle_since = time.monotonic()
                t.draining.append(cur)
            self._reopen(t)
        elif st.st_size < cur.offset or not self._same_tail(cur):
            # Truncated in place (copytruncate, `> trace.log`), maybe already written again past where
            # we were: the bytes before our offset are not the ones we read.
            if cur.partial:
                self._on_error(t.path, cur.lineno + 1, "truncated line (the file was truncated)")
            cur.offset, cur.partial, cur.lineno, cur.skipping, cur.tail = 0, b"", 0, False, b""
            os.lseek(cur.fd, 0, os.SEEK_SET)

    @staticmethod
    def _same_tail(h: _Open) -> bool:
        if not h.tail:
            return True
        try:
            return os.pread(h.fd, len(h.tail), h.offset - len(h.tail)) == h.tail
        except OSError:
            return True

    def _reopen(self, t: _Target) -> None:
        try:
            fd = os.open(t.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            t.current = None
            return
        st = os.fstat(fd)
        t.current = _Open(fd, (st.st_dev, st.st_ino))

    def _read(self, path: str, h: _Open, out: Lines) -> None:
        total = 0
        while total < _MAX_READ_PER_POLL:
            try:
                chunk = os.read(h.fd, _READ)
            except OSError as exc:
                self._on_error(path, h.lineno + 1, f"read failed: {exc}")
                return
            if not chunk:
                return
            total += len(chunk)
            h.offset += len(chunk)
            h.tail = (h.tail + chunk)[-_TAIL:] if len(chunk) < _TAIL else chunk[-_TAIL:]
            h.idle_since = time.monotonic()
            self._split(path, h, chunk, out)

    def _split(self, path: str, h: _Open, chunk: bytes, out: Lines) -> None:
        data = h.partial + chunk if h.partial else chunk
        lines = data.split(b"\n")
        h.partial = lines.pop()
        for raw in lines:
            h.lineno += 1 if h.lineno >= 0 else 0
            if h.skipping:
                h.skipping = False
                continue
            out.append((path, h.lineno, raw.decode("utf-8", "replace")))
        if len(h.partial) > MAX_LINE:
            self._on_error(path, h.lineno + 1, f"line over {MAX_LINE:,} bytes")
            h.partial, h.skipping = b"", True

    def _close(self, path: str, h: _Open, out: Lines) -> None:
        if h.partial and not h.skipping:
            h.lineno += 1 if h.lineno >= 0 else 0
            out.append((path, h.lineno, h.partial.decode("utf-8", "replace")))  # parse() judges it
        h.partial = b""
        try:
            os.close(h.fd)
        except OSError:
            pass
