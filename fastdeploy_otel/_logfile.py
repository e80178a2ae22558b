"""Daily log files that several processes can share: trace.log and error.log.

FastDeploy's layout, which is safe with many writers: every process appends to the dated file
``trace.log.YYYY-MM-DD`` (local date), the ``trace.log`` symlink is switched atomically to the newest
day, and files past the backup count are pruned idempotently.  No process ever renames a file that
another one writes, so a midnight with several processes on one ``FD_LOG_DIR`` loses no line.

A failed write (full disk, removed or read-only directory) never raises: the lines are counted as
failed, reported once on stderr and in the process log, and a notice follows when writing recovers.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import sys
import threading
import time

from ._selflog import get_logger

logger = get_logger(__name__)

_DATE_SUFFIX = re.compile(r"^\.\d{4}-\d\d-\d\d$")
_OPEN_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)


def _next_midnight(now: float) -> float:
    """Epoch seconds of the next local midnight after `now` (DST-safe: mktime normalises the day)."""
    t = time.localtime(now)
    return time.mktime((t.tm_year, t.tm_mon, t.tm_mday + 1, 0, 0, 0, 0, 0, -1))


def say(message: str) -> None:
    """One line to the process log and to stderr: the log may be on the disk that just filled up.

    Without handlers of the application's own, logging's last resort already prints to stderr.
    """
    logger.error(message.replace("%", "%%"))
    if logger.hasHandlers() and not _reaches_stderr(logger):
        try:
            sys.stderr.write(f"fastdeploy_otel: {message}\n")
            sys.stderr.flush()
        except (OSError, ValueError, AttributeError):  # stderr closed or gone: nothing more to try
            pass


def _reaches_stderr(log: logging.Logger) -> bool:
    """Whether a handler on the way up already prints this logger's records to stderr."""
    current: logging.Logger | None = log
    while current is not None:
        for h in current.handlers:
            if type(h) is logging.StreamHandler and getattr(h, "stream", None) is sys.stderr:
                return True
        current = current.parent if current.propagate else None
    return False


class DatedFile:
    """Appends whole batches of lines to ``PATH.YYYY-MM-DD`` and keeps ``PATH`` a symlink to it."""

    def __init__(self, path: str, backup_count: int = 7) -> None:
        self.path = os.path.abspath(path)
        self.dir, self.name = os.path.split(self.path)
        self.backup_count = backup_count
        self.lines_written = 0
        self.lines_failed = 0
        self._fd = -1
        self._day = ""
        self._rollover_at = 0.0
        self._failing = False
        self._failed_since = 0
        self._dangling = False  # a partial write left a line unfinished: start the next on a new line
        self._lock = threading.Lock()

    # ---- writing --------------------------------------------------------------------------------
    def write(self, text: str, lines: int) -> int:
        """Append `text` (`lines` whole lines, each ending in a newline); returns the lines written."""
        if not lines:
            return 0
        payload = text.encode("utf-8", "backslashreplace")  # a lone surrogate must not cost the batch
        with self._lock:
            prefix = b"\n" if self._dangling else b""
            data = prefix + payload
            written = 0
            try:
                now = time.time()
                if self._fd < 0 or now >= self._rollover_at:
                    self._open(now)
                view = memoryview(data)
                while written < len(data):
                    n = os.write(self._fd, view[written:])
                    if n <= 0:
                        raise OSError(errno.EIO, "write returned 0")
                    written += n
            except OSError as exc:
                done = 0
                if written >= len(prefix):  # count the whole lines that made it; finish a cut one later
                    cut = written - len(prefix)
                    part = payload[:cut]
                    done = part.count(b"\n")
                    self._dangling = bool(part) and not part.endswith(b"\n")
                    if self._dangling and payload[cut : cut + 1] == b"\n":
                        done += 1  # only its newline is missing: the line is whole once the next write ends it
                self.lines_written += done
                self._failed(exc, lines - done)
                return done
            self._dangling = False
            self.lines_written += lines
            if self._failing:
                self._failing = False
                say(f"writing {self.path} recovered; {self._failed_since} lines were lost while it failed")
            return lines

    def _failed(self, exc: OSError, lost: int) -> None:
        self.lines_failed += lost
        if self._fd >= 0 and exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            self._close_fd()  # a removed directory or a stale handle: reopen on the next write
        if not self._failing:
            self._failing = True
            self._failed_since = 0
            say(
                f"writing {self.path} failed ({exc.strerror or exc}); "
                "lines are dropped and counted until it recovers (serving is not affected)"
            )
        self._failed_since += lost

    # ---- the dated file, the symlink, pruning -----------------------------------------------------
    def _open(self, now: float) -> None:
        day = time.strftime("%Y-%m-%d", time.localtime(now))
        self._rollover_at = _next_midnight(now)
        if day == self._day and self._fd >= 0:
            return
        self._close_fd()
        os.makedirs(self.dir, exist_ok=True)
        target = f"{self.name}.{day}"
        self._fd = os.open(os.path.join(self.dir, target), _OPEN_FLAGS, 0o644)
        self._day = day
        self._link(target)
        self._prune()

    def _link(self, target: str) -> None:
        """Point PATH at `target`, atomically, and never backwards (a lagging process leaves it be)."""
        try:
            current = os.readlink(self.path)
        except FileNotFoundError:
            current = None
        except OSError:  # PATH is a regular file (an older layout): leave it, write the dated file
            logger.warning("%s is not a symlink; today's lines go to %s.%s", self.path, self.path, self._day)
            return
        if current is not None and current >= target:
            return
        tmp = os.path.join(self.dir, f".{self.name}.{os.getpid()}.{threading.get_ident()}.link")
        try:
            os.symlink(target, tmp)
            os.replace(tmp, self.path)
        except OSError as exc:
            logger.warning("could not point %s at %s: %s", self.path, target, exc)
            try:
                os.unlink(tmp)
            except OSError:
                pass

    def _prune(self) -> None:
        """Remove days past the backup count; safe to run in every process at once."""
        if self.backup_count <= 0:
            return
        prefix = self.name + "."
        try:
            days = sorted(
                n for n in os.listdir(self.dir) if n.startswith(prefix) and _DATE_SUFFIX.match(n[len(self.name) :])
            )
        except OSError:
            return
        for old in days[: max(0, len(days) - 1 - self.backup_count)]:
            try:
                os.unlink(os.path.join(self.dir, old))
            except FileNotFoundError:
                pass  # another process pruned it first
            except OSError as exc:
                logger.warning("could not remove old log %s: %s", old, exc)

    def _close_fd(self) -> None:
        if self._fd >= 0:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = -1
            self._day = ""

    def close(self) -> None:
        with self._lock:
            self._close_fd()
