"""Settings: environment and explicit arguments, bad values, header secrecy, OTLP endpoints."""

from __future__ import annotations

import logging

import pytest

import fastdeploy_otel as fdt
from fastdeploy_otel.config import ConfigError, load_settings
from fastdeploy_otel.events import LoggingEventName as E


def test_bad_env_value_is_one_clear_message_naming_the_variable(caplog):
    caplog.set_level(logging.ERROR, logger="fastdeploy_otel")
    env = {"FD_TRACE": "verbose", "OTEL_TRACES_SAMPLER_ARG": "2", "OTEL_TRACES_SAMPLER": "traceidratio"}
    settings, errors = load_settings(env)
    assert settings.mode == "local" and settings.sampler_arg == 1.0  # defaults kept
    text = " | ".join(map(str, errors))
    assert "FD_TRACE='verbose'" in text and "off, local, otel, all" in text
    assert "OTEL_TRACES_SAMPLER_ARG" in text
    with pytest.raises(ConfigError, match="FD_TRACE"):
        fdt.configure(env={"FD_TRACE": "verbose"}, strict_config=True)
    fdt.configure(env={"FD_TRACE": "verbose", "FD_LOG_DIR": "/tmp/fdotel-badenv"})
    fdt.shutdown()
    msgs = [r.getMessage() for r in caplog.records]
    assert sum("FD_TRACE" in m for m in msgs) == 1
    assert not any("Traceback" in m for m in msgs)


def test_headers_are_never_logged_or_printed(caplog):
    caplog.set_level(logging.DEBUG)
    secret = "Bearer s3cr3t-token"
    settings, errors = load_settings({"OTEL_EXPORTER_OTLP_HEADERS": f"authorization={secret}", "FD_TRACE": "otel"})
    assert settings.headers == {"authorization": secret}
    assert secret not in repr(settings)
    _, errors = load_settings({"OTEL_EXPORTER_OTLP_HEADERS": f"{secret}"})
    assert errors and secret not in str(errors[0]) and "OTEL_EXPORTER_OTLP_HEADERS" in str(errors[0])
    fdt.configure(env={"OTEL_EXPORTER_OTLP_HEADERS": f"authorization={secret}", "FD_TRACE": "otel",
                       "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "OTEL_EXPORTER_OTLP_TIMEOUT": "200",
                       "FD_LOG_DIR": "/tmp/fdotel-headers"})
    fdt.trace_print(E.PREPROCESSING_START, "h")
    fdt.finish_request("h")
    fdt.flush()
    fdt.shutdown()
    assert not any(secret in r.getMessage() for r in caplog.records)


def test_explicit_arguments_win_over_the_environment():
    settings, _ = load_settings({"FD_TRACE": "otel", "FD_LOG_DIR": "/env", "OTEL_SERVICE_NAME": "env-svc"},
                                mode="local", log_dir="/arg")
    assert (settings.mode, settings.log_dir, settings.service_name) == ("local", "/arg", "env-svc")
    settings, _ = load_settings({"FD_SERVICE_NAME": "fd-svc"})
    assert settings.service_name == "fd-svc"
    settings, _ = load_settings({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"})
    assert settings.mode == "all"  # an endpoint turns export on when FD_TRACE is unset
    settings, _ = load_settings({"OTEL_SDK_DISABLED": "true", "FD_TRACE": "all"})
    assert settings.mode == "local"
    settings, _ = load_settings({"FD_TRACE_JSON_FILE": "/tmp/spans.jsonl"})
    assert (settings.mode, settings.exporter) == ("all", "none")  # spans to the file; no dialling localhost


def test_otlp_headers_are_percent_decoded_as_the_spec_says():
    settings, errors = load_settings({"OTEL_EXPORTER_OTLP_HEADERS": "Authorization=Bearer%20s3cr3t,x-tenant=a%2Cb"})
    assert not errors and settings.headers == {"authorization": "Bearer s3cr3t", "x-tenant": "a,b"}


def test_otlp_http_endpoints_follow_the_spec():
    http = {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}
    base, _ = load_settings({**http, "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"})
    full, _ = load_settings({**http, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/custom"})
    grpc, _ = load_settings({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"})
    assert base.endpoint == "http://c:4318/v1/traces"  # the generic endpoint gets the signal path
    assert full.endpoint == "http://c:4318/custom"  # the signal-specific one is used as it is
    assert grpc.endpoint == "http://c:4317"
