"""FastDeploy's ERROR log records, recorded on the request's span.

FastDeploy reports failures by logging them (``api_server_logger.error(f"request[{id}] ...
{traceback.format_exc()}")``), not through its tracing calls.  ``RequestErrorHandler`` sits on
FastDeploy's loggers and turns each ERROR record about a request this process traces into
``fastdeploy_otel.record_error``: the request named in the message or its arguments, else the one
the logging thread last traced; the exception in hand (``exc_info``, or the one being handled),
else one built from the message text.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from collections.abc import Callable

import fastdeploy_otel as fdt

from . import _fd_takeover as takeover
from ._selflog import get_logger

logger = get_logger(__name__)

# Tokens that may be request ids: chatcmpl-..., cmpl-..., req-123, ids with _n or ::n:: suffixes.
_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:\-]*[A-Za-z0-9]")
# FastDeploy's logger names: the legacy per-file loggers and the channel loggers.
LOGGER_PREFIXES = ("fastdeploy", "legacy.")


class RequestErrorHandler(logging.Handler):
    """ERROR records about a known request become record_error calls (never raises)."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self._busy = threading.local()

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(self._busy, "on", False):
            return  # our own logging while recording
        self._busy.on = True
        try:
            request_id = self._request_of(record)
            if request_id is None:
                return
            exc: BaseException | str | None = (
                record.exc_info[1] if record.exc_info and record.exc_info[1] is not None else sys.exc_info()[1]
            )
            if exc is None:
                exc = record.getMessage().split("\n", 1)[0][:1024]
            fdt.record_error(request_id, exc)
        except Exception:  # never into FastDeploy's logging; said once a minute at most
            logger.warning("a FastDeploy error record could not be put on its trace", exc_info=True)
        finally:
            self._busy.on = False

    @staticmethod
    def _request_of(record: logging.LogRecord) -> str | None:
        texts = [str(record.msg)]
        if record.args:
            args = record.args.values() if isinstance(record.args, dict) else record.args
            texts.extend(str(a) for a in args)
        for text in texts:
            for token in _TOKEN.findall(text[:4096]):
                found = takeover.request_of(token) or takeover.request_of(takeover.base_id(token))
                if found is not None:
                    return found
        return takeover.current_request()


def fastdeploy_loggers() -> list[logging.Logger]:
    """FastDeploy's loggers that exist now and do not pass records up to a logger we are on."""
    found = [logging.getLogger("fastdeploy"), logging.getLogger("legacy")]
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger) and name.startswith(LOGGER_PREFIXES) and not logger.propagate:
            found.append(logger)
    return found


class Attachment:
    """Our handler on FastDeploy's loggers; attach() again picks up loggers made since."""

    def __init__(self, handler_factory: Callable[[], logging.Handler] = RequestErrorHandler) -> None:
        self.handler = handler_factory()
        self._on: list[logging.Logger] = []

    def attach(self) -> None:
        for logger in fastdeploy_loggers():
            if self.handler not in logger.handlers:
                logger.addHandler(self.handler)
                self._on.append(logger)

    def detach(self) -> None:
        for logger in self._on:
            logger.removeHandler(self.handler)
        self._on = []
