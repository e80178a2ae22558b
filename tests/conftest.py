"""Fixtures: a real OTLP receiver, a configure() against it, and an in-memory exporter."""

from __future__ import annotations

import os
import sys
from typing import Iterator

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import fastdeploy_otel as fdt
from tests.support.receiver import OtlpReceiver

# The example serving stack is not installed: the tests import it from the checkout's examples/.
EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
if EXAMPLES not in sys.path:
    sys.path.insert(0, EXAMPLES)


@pytest.fixture(scope="session")
def receiver() -> Iterator[OtlpReceiver]:
    """A real OTLP receiver (gRPC and HTTP) on 127.0.0.1 for the whole session."""
    with OtlpReceiver() as r:
        yield r


@pytest.fixture
def traced(tmp_path, receiver):
    """configure(...) against the receiver with a fresh log dir; shut down afterwards."""
    receiver.store.clear()

    def setup(**overrides):
        overrides.setdefault("mode", "all")
        overrides.setdefault("log_dir", str(tmp_path / "log"))
        overrides.setdefault("endpoint", receiver.grpc_endpoint)
        overrides.setdefault("strict", True)
        overrides.setdefault("flush_interval_s", 0.05)
        env = overrides.pop("env", {})
        return fdt.configure(env=env, **overrides)

    yield setup
    fdt.shutdown()


@pytest.fixture
def memory(tmp_path) -> Iterator[InMemorySpanExporter]:
    """configure() with spans kept in memory (no wire); ``fdt.flush()`` then ``memory.get_finished_spans()``."""
    exporter = InMemorySpanExporter()
    fdt.configure(env={}, mode="all", exporter="none", log_dir=str(tmp_path / "log"), strict=True,
                  flush_interval_s=0.05, extra_exporters=[exporter])
    yield exporter
    fdt.shutdown()
