"""The public surface is pinned: a name added to or removed from ``fastdeploy_otel`` is a decision."""

from __future__ import annotations

import importlib.metadata
import pkgutil

import fastdeploy_otel

PUBLIC = [
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

# Modules a user may import; everything else has a leading underscore (or lives in tools/).
PUBLIC_MODULES = {"api", "attributes", "config", "events", "instrumentor", "mirror", "package", "span_plan", "tools",
                  "version"}


def test_all_is_pinned_and_sorted():
    assert fastdeploy_otel.__all__ == PUBLIC == sorted(PUBLIC)
    for name in PUBLIC:
        assert getattr(fastdeploy_otel, name) is not None


def test_internal_modules_are_private():
    names = {m.name for m in pkgutil.iter_modules(fastdeploy_otel.__path__)}
    assert {n for n in names if not n.startswith("_")} <= PUBLIC_MODULES, names


def test_version_is_single_sourced():
    assert fastdeploy_otel.__version__ == importlib.metadata.version("fastdeploy-otel")


def test_typed_marker_ships():
    from importlib import resources

    assert resources.files("fastdeploy_otel").joinpath("py.typed").is_file()
