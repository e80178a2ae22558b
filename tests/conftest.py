from __future__ import annotations

import os
from typing import Iterator

import pytest

import fastdeploy_otel as fdt
from fastdeploy_otel.mirror import parse_line
from tests.support.receiver import OtlpReceiver


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


def read_mirror(log_dir: str) -> list[dict[str, str]]:
    path = os.path.join(log_dir, "trace.log")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    parsed = [parse_line(line) for line in lines]
    assert all(p is not None for p in parsed), [l for l, p in zip(lines, parsed) if p is None]
    return parsed  # type: ignore[return-value]
