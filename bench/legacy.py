"""The baseline: FastDeploy's legacy ``trace_print`` path, re-implemented faithfully.

What FastDeploy does per lifecycle event (``fastdeploy/trace/trace_logger.py``,
``fastdeploy/logger/formatters.py``, ``FastDeployLogger.get_trace_logger``; see
``/work/shared/reference/fastdeploy_tracing.md`` section 3):

* build an ``attributes`` dict (request_id, user_id, event, stage, trace_id; ``trace_id`` is
  ``"unknown"`` when the request has no OTel context, always the case with OTel off),
* ``logger.info("", extra={"attributes": attributes}, stacklevel=2)`` on the ``legacy.trace`` logger,
  inside a bare ``try/except``,
* the record goes through ``CustomFormatter`` (thread, thread_name, a timestamp taken at format
  time, then the attributes with camelCase keys turned into snake_case, empty-string values dropped,
  ``[k=v]`` joined in front of the message) and the ``_LOG_FORMAT`` line format,
* a daily rotating file handler writes the line to ``trace.log`` (synchronously, on the calling
  thread; the handler flushes after every record).

This module is the ratio-1.0 reference of the benchmark; it is not used by ``fastdeploy_otel``.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import re
import time

from fastdeploy_otel.events import EVENT_TO_STAGE_MAP

_LOG_FORMAT = "%(levelname)-8s %(asctime)s %(process)-5s %(filename)s[line:%(lineno)d] %(message)s"

_CAMEL = re.compile("([a-z0-9])([A-Z])")


class CustomFormatter(logging.Formatter):
    """FastDeploy's formatter: ``[thread=] [thread_name=] [timestamp=]`` then the record's attributes."""

    def _camel_to_snake(self, name: str) -> str:
        return _CAMEL.sub(r"\1_\2", name).lower()

    def format(self, record: logging.LogRecord) -> str:
        try:
            log_fields = {
                "thread": record.thread,
                "thread_name": record.threadName,
                "timestamp": int(time.time() * 1000),  # format time, not record.created
            }
            attributes = getattr(record, "attributes", None)
            if isinstance(attributes, dict):
                for k, v in attributes.items():
                    log_fields[self._camel_to_snake(k)] = v
            # empty strings are dropped; None stays "None"
            log_fields = {k: v for k, v in log_fields.items() if not (isinstance(v, str) and v == "")}
            log_str = " ".join(f"[{k}={v}]" for k, v in log_fields.items())
            if log_str:
                record.msg = f"{log_str} {record.msg}"
            if getattr(record, "otelSpanID", None) is not None:
                record.msg = f"[otel_span_id={record.otelSpanID}] {record.msg}"
            if getattr(record, "otelTraceID", None) is not None:
                record.msg = f"[otel_trace_id={record.otelTraceID}] {record.msg}"
        except Exception:  # FastDeploy: bare except
            pass
        return super().format(record)


# FastDeploy's per-request OTel contexts (fastdeploy/metrics/trace.py ``reqs_context``); empty with
# OTel off, so every line carries trace_id=unknown.
_reqs_context: dict[str, dict[str, str]] = {}

trace_logger: logging.Logger = logging.getLogger("legacy.trace")
_handler: logging.Handler | None = None


def get_trace_info_for_request(request_id: str) -> dict[str, str] | None:
    return _reqs_context.get(request_id)


def setup(log_dir: str, backup_count: int = 7, name: str = "trace", file_name: str = "trace.log") -> str:
    """``FastDeployLogger().get_trace_logger(name, file_name)``: returns the path of the log file."""
    global trace_logger, _handler
    teardown()
    os.makedirs(log_dir, exist_ok=True)
    logger = logging.getLogger(f"legacy.{name}")
    for h in list(logger.handlers):  # FastDeploy clears existing handlers; propagate stays as it is
        logger.removeHandler(h)
    logger.setLevel(logging.INFO)
    path = os.path.join(log_dir, file_name)
    handler = logging.handlers.TimedRotatingFileHandler(path, when="midnight", backupCount=backup_count, encoding="utf-8")
    handler.setFormatter(CustomFormatter(_LOG_FORMAT))
    logger.addHandler(handler)
    trace_logger, _handler = logger, handler
    return path


def teardown() -> None:
    global _handler
    if _handler is not None:
        trace_logger.removeHandler(_handler)
        _handler.close()
        _handler = None


def trace_print(event, request_id, user):
    """FastDeploy's ``trace_logger.print(event, request_id, user)``."""
    try:
        attributes = {
            "request_id": f"{request_id}",
            "user_id": f"{user}",
            "event": event.value,
            "stage": EVENT_TO_STAGE_MAP.get(event).value,
        }
        trace_info = get_trace_info_for_request(request_id)
        if trace_info:
            attributes["trace_id"] = trace_info["trace_id"]
        else:
            attributes["trace_id"] = "unknown"
        trace_logger.info("", extra={"attributes": attributes}, stacklevel=2)
    except:  # noqa: E722 - FastDeploy's bare except
        pass
