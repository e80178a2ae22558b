"""OpenTelemetry-native request tracing for FastDeploy.

import fastdeploy_otel as fdt
fdt.configure()                                   # FD_TRACE, OTEL_* from the environment
fdt.trace_print("PREPROCESSING_START", request_id, user)
carrier = fdt.inject(request_id)                  # send with the request to the engine
fdt.extract(request_id, carrier)                  # in the engine
fdt.record_error(request_id, exc)
fdt.finish_request(request_id)
fdt.shutdown()
"""

from .api import (
    RequestError,
    abort_request,
    configure,
    extract,
    finish_request,
    flush,
    get_tracer_provider,
    inject,
    record_error,
    settings,
    shutdown,
    start_server_span,
    stats,
    trace_print,
    trace_print_for_caller,
)
from .config import ConfigError, Settings
from .events import EVENT_TO_STAGE_MAP, LoggingEventName, StageName, UnknownEventError
from .version import __version__

__all__ = [
    "ConfigError",
    "EVENT_TO_STAGE_MAP",
    "LoggingEventName",
    "RequestError",
    "Settings",
    "StageName",
    "UnknownEventError",
    "__version__",
    "abort_request",
    "configure",
    "extract",
    "finish_request",
    "flush",
    "get_tracer_provider",
    "inject",
    "record_error",
    "settings",
    "shutdown",
    "start_server_span",
    "stats",
    "trace_print",
    "trace_print_for_caller",
]
