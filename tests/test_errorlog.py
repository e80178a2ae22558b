"""error.log and trace.log cannot be forged by anything a client sends."""

from __future__ import annotations

import os
import time

import fastdeploy_otel as fdt
from fastdeploy_otel._errorlog import CONTINUATION
from fastdeploy_otel.events import LoggingEventName as E
from fastdeploy_otel.mirror import LINE_RE

FORGED_HEAD = "ERROR    2026-01-01 00:00:00,000 1 x.py[line:1] request[FORGED] failed: X: y [request_id=FORGED]"


def test_no_client_value_can_start_a_line_in_trace_log_or_error_log(tmp_path):
    log_dir = str(tmp_path / "log")
    fdt.configure(env={}, mode="local", log_dir=log_dir)
    hostile = ["r\n" + FORGED_HEAD, "r\r\nINFO     forged", "r\u2028x", "r\x85y", "r]\n[event=X] ", "r\x00\x1b[31m"]
    for i, rid in enumerate(hostile):
        fdt.trace_print(E.PREPROCESSING_START, rid, "user\n" + FORGED_HEAD)
        try:
            raise ValueError(f"bad\n{FORGED_HEAD}\n\u2028{FORGED_HEAD}")
        except ValueError as exc:
            fdt.record_error(rid, exc)
        fdt.record_error(rid, "plain text\n" + FORGED_HEAD)
    st = fdt.shutdown()
    with open(os.path.join(log_dir, "trace.log"), encoding="utf-8") as f:
        trace_lines = f.read().split("\n")[:-1]
    assert len(trace_lines) == len(hostile) and all(LINE_RE.match(x) for x in trace_lines)
    with open(os.path.join(log_dir, "error.log"), encoding="utf-8") as f:
        text = f.read()
    lines = text.split("\n")[:-1]
    heads = [x for x in lines if not x.startswith(CONTINUATION)]
    assert len(heads) == 2 * len(hostile) and st["error_log_lines"] == len(lines)
    assert all(x.startswith("ERROR    ") and "request[FORGED]" not in x.split(" failed:")[0] for x in heads)
    for sep in ("\r", "\u2028", "\x85", "\x0b", "\x0c"):
        assert sep not in text  # nothing else a reader may take for a line break
    assert "RequestError: plain text\\x0aERROR" in text  # record_error(rid, "text") is recorded, escaped


class _Sneaky(str):
    """A str subclass that formats, compares and hashes as it likes: none of it may reach a line."""

    def __str__(self) -> str:
        return "x\n" + FORGED_HEAD

    def __format__(self, spec: str) -> str:
        return "y\n[event=FORGED] "

    def __eq__(self, other: object) -> bool:
        raise RuntimeError("eq")

    def __hash__(self) -> int:
        raise RuntimeError("hash")


def test_str_subclasses_are_recorded_as_plain_text(tmp_path):
    log_dir = str(tmp_path / "log")
    fdt.configure(env={}, mode="local", log_dir=log_dir)
    fdt.trace_print(E.PREPROCESSING_START, _Sneaky("sneaky-rid"), _Sneaky("sneaky-user"))
    fdt.trace_print(E.PREPROCESSING_END, _Sneaky("sneaky-rid"), "u")
    st = fdt.shutdown()
    with open(os.path.join(log_dir, "trace.log"), encoding="utf-8") as f:
        lines = f.read().split("\n")[:-1]
    assert len(lines) == 2 and all(LINE_RE.match(x) for x in lines)
    assert all("[request_id=sneaky-rid]" in x for x in lines) and "[user_id=sneaky-user]" in lines[0]
    assert "FORGED" not in "".join(lines) and st["record_failures"] == 0


def test_error_log_lines_carry_the_date_and_time_of_the_error(tmp_path):
    log_dir = str(tmp_path / "log")
    fdt.configure(env={}, mode="local", log_dir=log_dir)
    before = time.time()
    fdt.record_error("dated", "it broke")
    fdt.shutdown()
    with open(os.path.join(log_dir, "error.log"), encoding="utf-8") as f:
        head = f.readline()
    stamp = head.split()[1] + " " + head.split()[2]  # ERROR    YYYY-MM-DD HH:MM:SS,mmm
    when = time.mktime(time.strptime(stamp.split(",")[0], "%Y-%m-%d %H:%M:%S"))
    assert abs(when - before) < 5, head
