"""Helpers the tests share (fixtures stay in conftest.py)."""

from __future__ import annotations

import os

from fastdeploy_otel.mirror import parse_line


def read_mirror(log_dir: str) -> list[dict[str, str]]:
    """Every line of ``log_dir/trace.log``, parsed; fails on a line that does not parse."""
    path = os.path.join(log_dir, "trace.log")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        text = f.read()
    # A line still being written (another process appends as we read) is not a line yet.
    lines = text[: text.rfind("\n") + 1].splitlines()
    parsed = [parse_line(line) for line in lines]
    assert all(p is not None for p in parsed), [line for line, p in zip(lines, parsed, strict=True) if p is None]
    return parsed  # type: ignore[return-value]
