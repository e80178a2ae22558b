"""Reporting failures inside tracing itself: logged, rate-limited, never raised into serving."""

from __future__ import annotations

import logging
import threading
import time

logger = logging.getLogger("fastdeploy_otel")

_INTERVAL_S = 60.0
_lock = threading.Lock()
_last: dict[str, float] = {}
_suppressed: dict[str, int] = {}


def report(key: str, msg: str, *args: object, level: int = logging.WARNING, exc_info: bool = False) -> None:
    """Log `msg` at most once a minute per `key`, saying how many repeats were held back."""
    now = time.monotonic()
    with _lock:
        last = _last.get(key)
        if last is not None and now - last < _INTERVAL_S:
            _suppressed[key] = _suppressed.get(key, 0) + 1
            return
        _last[key] = now
        held = _suppressed.pop(key, 0)
    if held:
        msg += f" ({held} similar messages suppressed in the last {int(_INTERVAL_S)}s)"
    logger.log(level, msg, *args, exc_info=exc_info)


def reset() -> None:
    """Forget what was reported (configure() calls this, so a new setup reports afresh)."""
    with _lock:
        _last.clear()
        _suppressed.clear()
