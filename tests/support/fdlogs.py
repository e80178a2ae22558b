"""trace.log files as FastDeploy writes them, for replay tests: its logger (``bench/legacy.py``,
a faithful copy) driven by a clock the test sets, in either of FastDeploy's two line formats."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

from bench import legacy
from fastdeploy_otel.events import EVENT_TO_STAGE_MAP, LoggingEventName

# FastDeploy's first trace_logger format (commit ed9eeee7); the later one is legacy._LOG_FORMAT.
FORMAT_I = "[%(asctime)s] [%(levelname)-8s] (%(filename)s:%(funcName)s:%(lineno)d) %(message)s"


class _Clock:
    """Stands in for the ``time`` module inside the legacy formatter: its timestamp is ours to set."""

    def __init__(self) -> None:
        self.now_ms = 0

    def time(self) -> float:
        return self.now_ms / 1000


_clock = _Clock()


def _print_v1(event: LoggingEventName, request_id: str, user: object) -> None:
    """FastDeploy's first ``trace_logger.print``: no trace_id field, no stacklevel."""
    try:
        attributes = {
            "request_id": f"{request_id}",
            "user_id": f"{user}",
            "event": event.value,
            "stage": EVENT_TO_STAGE_MAP[event].value,
        }
        legacy.trace_logger.info("", extra={"attributes": attributes})
    except Exception:  # FastDeploy: bare except
        pass


class FdLog:
    """One FastDeploy process's trace log in `log_dir`: ``write(events)`` appends lines with the
    timestamps given.  Several FdLogs (API server, engine, P and D instances) can be written in turn."""

    def __init__(self, log_dir: str, fmt: str = "ii", file_name: str = "trace.log") -> None:
        self.log_dir, self.fmt, self.file_name = log_dir, fmt, file_name
        os.makedirs(log_dir, exist_ok=True)

    def write(
        self,
        events: Iterable[tuple[int, LoggingEventName, str]],
        trace_ids: dict[str, int] | None = None,
        user: object = None,
    ) -> None:
        """`events`: (epoch ms, event, request id); `trace_ids`: request id -> 64-bit OTel trace id."""
        legacy.setup(self.log_dir, file_name=self.file_name)
        handler = legacy._handler
        assert handler is not None
        if self.fmt == "i":
            handler.setFormatter(legacy.CustomFormatter(FORMAT_I))
        saved, legacy.time = legacy.time, _clock  # type: ignore[assignment]
        legacy._reqs_context.clear()
        for rid, tid in (trace_ids or {}).items():
            legacy._reqs_context[rid] = {"trace_id": format(tid, "032x"), "span_id": "0" * 16}
        try:
            for ts, event, rid in events:
                _clock.now_ms = ts
                (_print_v1 if self.fmt == "i" else legacy.trace_print)(event, rid, user)
        finally:
            legacy.time = saved  # type: ignore[assignment]
            legacy._reqs_context.clear()
            legacy.teardown()
            logging.getLogger("legacy.trace").handlers.clear()

    @property
    def path(self) -> str:
        return os.path.join(self.log_dir, self.file_name)
