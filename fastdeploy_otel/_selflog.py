"""Self-diagnostics, the SDK way: a logger per module (``get_logger(__name__)``), all under the
``fastdeploy_otel`` package logger, each with one shared rate limit.

Failures inside tracing are logged, never raised into serving.  The same message template from the
same module is passed at most once a minute; the next one that passes says how many were held back.
``configure()`` resets the limit, so a new setup reports afresh.
"""

from __future__ import annotations

import logging
import threading
import time

INTERVAL_S = 60.0


class RateLimit(logging.Filter):
    """Passes a (logger, template) pair at most once per INTERVAL_S; counts what it holds back."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._last: dict[tuple[str, str], float] = {}
        self._held: dict[tuple[str, str], int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg))
        now = time.monotonic()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < INTERVAL_S:
                self._held[key] = self._held.get(key, 0) + 1
                return False
            self._last[key] = now
            held = self._held.pop(key, 0)
        if held:
            record.msg = f"{record.msg} ({held} similar messages suppressed in the last {int(INTERVAL_S)}s)"
        return True

    def holds(self, name: str, msg: str) -> bool:
        """Whether `msg` from logger `name` would be held back now (counted if so), asked before a
        LogRecord is made: on a per-item drop path under overload, making one costs ~10 us a call."""
        key = (name, msg)
        last = self._last.get(key)
        if last is None or time.monotonic() - last >= INTERVAL_S:
            return False
        with self._lock:
            self._held[key] = self._held.get(key, 0) + 1
        return True

    def reset(self) -> None:
        with self._lock:
            self._last.clear()
            self._held.clear()


_limit = RateLimit()


def get_logger(name: str) -> logging.Logger:
    """The module's logger, rate-limited."""
    logger = logging.getLogger(name)
    if _limit not in logger.filters:
        logger.addFilter(_limit)
    return logger


def warn(logger: logging.Logger, msg: str, *args: object) -> None:
    """``logger.warning(msg, *args)`` for a path that may run once per dropped item: when the rate
    limit would hold the line back anyway, nothing is built."""
    if not _limit.holds(logger.name, msg):
        logger.warning(msg, *args)


def name_os_thread(name: str) -> None:
    """Give the calling thread `name` in the OS too (``top -H``, ``/proc/<pid>/task/*/comm``), so an
    operator sees which threads are tracing's and what they cost; Linux only, silent elsewhere."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(15, name.encode("ascii", "replace")[:15], 0, 0, 0)  # PR_SET_NAME: 15 bytes at most
    except Exception:  # no prctl (not Linux): the Python name still shows in tracebacks and py-spy
        return


def reset() -> None:
    """Forget what was reported (configure() calls this)."""
    _limit.reset()
