"""Settings: explicit ``configure()`` arguments, then the environment, then defaults.

Standard OpenTelemetry variables are validated here so that a bad value gets one clear message
naming the variable; the SDK and the OTLP exporters then read them as usual.  Values of header
variables are never echoed: they hold tokens.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any
from urllib.parse import unquote

MODES = ("off", "local", "otel", "all")
PROTOCOLS = ("grpc", "http/protobuf")
EXPORTERS = ("otlp", "console", "none")
ENCODERS = ("fastdeploy", "sdk")
SAMPLERS = (
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
)
DEFAULT_PROTOCOL = "grpc"
# Where an OTel Collector listens by default; deploy/ and the README use the same ports.
DEFAULT_OTLP_GRPC_PORT = 4317
DEFAULT_OTLP_HTTP_PORT = 4318
DEFAULT_OTLP_GRPC_ENDPOINT = f"http://localhost:{DEFAULT_OTLP_GRPC_PORT}"
DEFAULT_OTLP_HTTP_ENDPOINT = f"http://localhost:{DEFAULT_OTLP_HTTP_PORT}"
DEFAULT_SERVICE_NAME = "fastdeploy"


class ConfigError(ValueError):
    """A setting with a value we cannot use; the message names the variable."""


@dataclass(frozen=True)
class Settings:
    mode: str = "local"
    log_dir: str = "log"
    backup_count: int = 7
    service_name: str = DEFAULT_SERVICE_NAME
    host_name: str = field(default_factory=socket.gethostname)
    protocol: str = DEFAULT_PROTOCOL
    exporter: str = "otlp"  # OTEL_TRACES_EXPORTER: otlp, console or none
    json_file: str | None = None  # also write spans as OTLP JSON lines here (no collector needed)
    endpoint: str | None = None  # None: the exporter's own env handling and default
    headers: dict[str, str] | None = None
    insecure: bool | None = None
    certificate: str | None = None
    timeout_s: float | None = None  # OTLP export timeout
    sampler: str = "parentbased_always_on"
    sampler_arg: float = 1.0
    bsp: dict[str, int] = field(default_factory=dict)  # BatchSpanProcessor keyword arguments
    capture_content: bool = False
    strict: bool = False  # unknown events raise at the call site (tests), instead of a counted drop
    max_pending: int = 65536  # events buffered between the calling threads and the worker
    max_requests: int = 100_000  # requests in flight before the oldest is evicted
    request_ttl_s: float = 600.0  # a request with no event for this long is evicted
    flush_interval_s: float = (
        0.1  # how often the worker turns events into spans and lines (small batches: short GIL holds)
    )
    # OTLP encoding and sending in a side process, off the serving process's GIL (OTLP exporter only)
    export_process: bool = True
    # how the export process encodes OTLP: "fastdeploy" (_otlp_proto, ~7x cheaper) or "sdk" (the SDK's encoder)
    export_encoder: str = "fastdeploy"
    shutdown_timeout_s: float = 5.0  # shutdown() returns within this, whatever the collector does
    max_export_batch_bytes: int = 3 * 1024 * 1024  # an export message stays under a collector's 4 MiB gRPC limit
    # The OTel span limits (OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT, ...), applied to every span we build.
    attribute_count_limit: int = 128
    event_count_limit: int = 128
    event_attribute_count_limit: int = 128
    attribute_length_limit: int | None = None  # None: no limit, as in OTel

    @property
    def otel(self) -> bool:
        return self.mode in ("otel", "all")

    @property
    def local(self) -> bool:
        return self.mode in ("local", "all")

    def __repr__(self) -> str:  # never print header values: they hold tokens
        shown = {f.name: getattr(self, f.name) for f in fields(self)}
        if shown["headers"]:
            shown["headers"] = {k: "***" for k in shown["headers"]}
        return "Settings(" + ", ".join(f"{k}={v!r}" for k, v in shown.items()) + ")"


def _first(env: Mapping[str, str], *names: str) -> tuple[str, str] | None:
    for name in names:
        value = env.get(name)
        if value is not None and value.strip() != "":
            return name, value.strip()
    return None


def _bool(name: str, value: str) -> bool:
    low = value.lower()
    if low in ("true", "1", "yes", "on"):
        return True
    if low in ("false", "0", "no", "off"):
        return False
    raise ConfigError(f"{name}={value!r} is not a boolean; use true or false")


def _number(name: str, value: str, kind: type, low: float, high: float | None = None) -> Any:
    try:
        number = kind(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r} is not a{'n integer' if kind is int else ' number'}") from None
    if number < low or (high is not None and number > high):
        span = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ConfigError(f"{name}={value!r} is out of range; it must be {span}")
    return number


def parse_headers(name: str, value: str) -> dict[str, str]:
    """``k1=v1,k2=v2`` as the OTLP spec writes it; errors never show the values."""
    headers: dict[str, str] = {}
    for i, item in enumerate(value.split(",")):
        if not item.strip():
            continue
        key, sep, val = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{name}: entry {i + 1} is not of the form key=value (values not shown)")
        headers[unquote(key.strip()).lower()] = unquote(val.strip())  # the spec percent-encodes both
    return headers


_BSP = {
    "OTEL_BSP_SCHEDULE_DELAY": "schedule_delay_millis",
    "OTEL_BSP_MAX_QUEUE_SIZE": "max_queue_size",
    "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "max_export_batch_size",
    "OTEL_BSP_EXPORT_TIMEOUT": "export_timeout_millis",
}


def _from_env(env: Mapping[str, str]) -> tuple[dict[str, Any], list[ConfigError]]:
    """Read every variable we know; collect one error per bad variable."""
    out: dict[str, Any] = {}
    errors: list[ConfigError] = []

    def read(names: tuple[str, ...], key: str, convert) -> None:
        found = _first(env, *names)
        if found is None:
            return
        try:
            out[key] = convert(*found)
        except ConfigError as exc:
            errors.append(exc)

    def choice(allowed: tuple[str, ...]):
        def convert(name: str, value: str) -> str:
            if value.lower() not in allowed:
                raise ConfigError(f"{name}={value!r} is not one of {', '.join(allowed)}")
            return value.lower()

        return convert

    read(("FD_TRACE",), "mode", choice(MODES))
    read(("FD_LOG_DIR",), "log_dir", lambda n, v: v)
    read(("FD_LOG_BACKUP_COUNT",), "backup_count", lambda n, v: _number(n, v, int, 0))
    read(("OTEL_SERVICE_NAME", "FD_SERVICE_NAME"), "service_name", lambda n, v: v)
    read(("FD_HOST_NAME",), "host_name", lambda n, v: v)
    read(("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"), "protocol", choice(PROTOCOLS))
    read(("OTEL_TRACES_EXPORTER",), "exporter", choice(EXPORTERS))
    read(("FD_TRACE_JSON_FILE",), "json_file", lambda n, v: v)
    read(("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "OTEL_EXPORTER_OTLP_HEADERS"), "headers", parse_headers)
    read(("OTEL_EXPORTER_OTLP_TRACES_INSECURE", "OTEL_EXPORTER_OTLP_INSECURE"), "insecure", _bool)

    def certificate(name: str, value: str) -> str:
        if not os.path.isfile(value):
            raise ConfigError(f"{name}={value!r}: no such file")
        return value

    read(("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE", "OTEL_EXPORTER_OTLP_CERTIFICATE"), "certificate", certificate)

    def endpoint(name: str, value: str) -> str:
        if "://" not in value:
            raise ConfigError(f"{name}={value!r} needs a scheme, e.g. {DEFAULT_OTLP_GRPC_ENDPOINT}")
        if name == "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT":
            out["_endpoint_is_full"] = True  # the spec uses the signal-specific URL as it is
        return value

    read(("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"), "endpoint", endpoint)
    read(("FD_TRACE_CAPTURE_CONTENT",), "capture_content", _bool)
    read(("FD_TRACE_STRICT",), "strict", _bool)
    read(("FD_TRACE_MAX_PENDING",), "max_pending", lambda n, v: _number(n, v, int, 1))
    read(("FD_TRACE_MAX_REQUESTS",), "max_requests", lambda n, v: _number(n, v, int, 1))
    read(("FD_TRACE_REQUEST_TTL",), "request_ttl_s", lambda n, v: _number(n, v, float, 0.001))
    read(("FD_TRACE_FLUSH_INTERVAL_MS",), "flush_interval_s", lambda n, v: _number(n, v, float, 1) / 1000)

    read(("FD_TRACE_EXPORT_PROCESS",), "export_process", _bool)
    read(("FD_TRACE_EXPORT_ENCODER",), "export_encoder", choice(ENCODERS))
    read(("FD_TRACE_SHUTDOWN_TIMEOUT_MS",), "shutdown_timeout_s", lambda n, v: _number(n, v, float, 0) / 1000)
    read(("FD_TRACE_MAX_EXPORT_BATCH_BYTES",), "max_export_batch_bytes", lambda n, v: _number(n, v, int, 1024))
    count = lambda n, v: _number(n, v, int, 0)  # noqa: E731
    read(("OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT", "OTEL_ATTRIBUTE_COUNT_LIMIT"), "attribute_count_limit", count)
    read(("OTEL_SPAN_EVENT_COUNT_LIMIT",), "event_count_limit", count)
    read(("OTEL_EVENT_ATTRIBUTE_COUNT_LIMIT", "OTEL_ATTRIBUTE_COUNT_LIMIT"), "event_attribute_count_limit", count)
    read(
        ("OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT", "OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT"), "attribute_length_limit", count
    )

    read(
        ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT"),
        "timeout_s",
        lambda n, v: _number(n, v, float, 0.001) / 1000,
    )
    read(("OTEL_TRACES_SAMPLER",), "sampler", choice(SAMPLERS))
    if out.get("sampler", "").endswith("traceidratio"):
        read(("OTEL_TRACES_SAMPLER_ARG",), "sampler_arg", lambda n, v: _number(n, v, float, 0.0, 1.0))
    bsp = {}
    for name, key in _BSP.items():
        found = _first(env, name)
        if found is not None:
            try:
                bsp[key] = _number(*found, int, 1)
            except ConfigError as exc:
                errors.append(exc)
    if bsp:
        out["bsp"] = bsp
    read(("OTEL_SDK_DISABLED",), "_sdk_disabled", _bool)
    return out, errors


def load_settings(env: Mapping[str, str] | None = None, **overrides: Any) -> tuple[Settings, list[ConfigError]]:
    """Settings from overrides > env > defaults, and the errors found (bad values fall back to defaults)."""
    env = os.environ if env is None else env
    values, errors = _from_env(env)
    sdk_disabled = values.pop("_sdk_disabled", False)
    endpoint_is_full = values.pop("_endpoint_is_full", False) and overrides.get("endpoint") is None
    for key in [k for k in values if k.startswith("_")]:
        values.pop(key)
    if "mode" not in values:
        # No FD_TRACE: the mirror always; spans too as soon as somewhere to send them is given.
        values["mode"] = "all" if "endpoint" in values or "json_file" in values else "local"
    if "json_file" in values and "endpoint" not in values and "exporter" not in values:
        values["exporter"] = "none"  # spans to the JSON file only: do not dial localhost:4317
    unknown = set(overrides) - {f.name for f in fields(Settings)}
    if unknown:
        raise TypeError(f"configure() got unknown settings: {', '.join(sorted(unknown))}")
    for key, value in overrides.items():
        if value is not None:
            values[key] = value
    settings = Settings(**values)
    if settings.mode not in MODES:
        raise ConfigError(f"mode={settings.mode!r} is not one of {', '.join(MODES)}")
    if settings.sampler not in SAMPLERS:
        raise ConfigError(f"sampler={settings.sampler!r} is not one of {', '.join(SAMPLERS)}")
    if settings.export_encoder not in ENCODERS:
        raise ConfigError(f"export_encoder={settings.export_encoder!r} is not one of {', '.join(ENCODERS)}")
    if settings.protocol not in PROTOCOLS:
        raise ConfigError(f"protocol={settings.protocol!r} is not one of {', '.join(PROTOCOLS)}")
    if settings.protocol == "http/protobuf" and settings.endpoint and not endpoint_is_full:
        # OTLP/HTTP: a base endpoint gets the signal path, as the OTel spec says.
        if not settings.endpoint.rstrip("/").endswith("/v1/traces"):
            settings = replace(settings, endpoint=settings.endpoint.rstrip("/") + "/v1/traces")
    if sdk_disabled and settings.otel:
        settings = replace(settings, mode="local" if settings.local else "off")
    return settings, errors
