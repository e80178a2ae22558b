"""Loggers as FastDeploy makes them: ``legacy.<name>`` file loggers under FD_LOG_DIR, and trace_logger."""

import logging
import os

from fastdeploy import envs

_LOG_FORMAT = "%(levelname)-8s %(asctime)s %(process)-5s %(filename)s[line:%(lineno)d] %(message)s"


class CustomFormatter(logging.Formatter):
    """Prefixes ``[key=value]`` fields from ``extra={"attributes": ...}``, as FastDeploy's formatter does."""

    def format(self, record):
        import time

        fields = {"thread": record.thread, "thread_name": record.threadName, "timestamp": int(time.time() * 1000)}
        fields.update(getattr(record, "attributes", {}) or {})
        prefix = " ".join(f"[{k}={v}]" for k, v in fields.items() if v != "")
        record.msg = f"{prefix} {record.msg}"
        return super().format(record)


def get_logger(name: str, file_name: str, formatter: logging.Formatter | None = None) -> logging.Logger:
    logger = logging.getLogger(f"legacy.{name}")
    logger.setLevel(logging.INFO)
    logger.handlers.clear()
    log_dir = envs.FD_LOG_DIR
    handler = logging.FileHandler(os.path.join(log_dir, file_name), delay=True)
    handler.setFormatter(formatter or logging.Formatter(_LOG_FORMAT))
    logger.addHandler(handler)
    logger.propagate = False
    return logger


def get_base_request_id(request_id: str) -> str:
    """The id without its choice suffix (``_n`` or ``::n::n``)."""
    i = request_id.find("::n::")
    return request_id[:i] if i >= 0 else request_id.split("_")[0]


os.makedirs(envs.FD_LOG_DIR, exist_ok=True)
api_server_logger = get_logger("api_server", "api_server.log")
llm_logger = get_logger("fastdeploy", "fastdeploy.log")
trace_logger = get_logger("trace", "trace.log", CustomFormatter(_LOG_FORMAT))
