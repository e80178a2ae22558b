"""Replay benchmark: ``fastdeploy-otel replay FILE --jsonl OUT`` over a FastDeploy-format trace.log.

The input is what FastDeploy writes with OTel off (``trace_id=unknown``): the lines of one MIXED
request are written by ``bench/legacy.py`` (FastDeploy's logger and formatter), then repeated with
fresh request ids and timestamps (about 30 requests in flight at once) up to N lines, in time order.
The last requests are cut off by N and end as incomplete.  The replay runs
in a child process, which reports its own CPU time and peak RSS:

replay_lines_per_s        lines / CPU seconds of the child: one core, whatever else the machine runs
replay_wall_lines_per_s   lines / wall seconds
replay_peak_rss_mb        the child's peak resident set (VmHWM), MB

The child runs with cached bytecode (see run_replay), as an installed package does.
"""

from __future__ import annotations

import heapq
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

from tests.support.lifecycles import MIXED

REPLAY_KEYS = ("replay_lines_per_s", "replay_wall_lines_per_s", "replay_peak_rss_mb", "replay_lines")

# The peak is VmHWM, the child's own: getrusage's ru_maxrss also counts the image it was exec'd from
# (the bench process, 300 MB after the micro bench), so it read 298 MB after a full run, 39 alone.
_CHILD = """
import json, sys, time
from fastdeploy_otel.tools import cli
t0, c0 = time.monotonic(), time.process_time()
rc = cli.main(["replay", "--no-progress", sys.argv[1], "--jsonl", sys.argv[2]])
wall, cpu = time.monotonic() - t0, time.process_time() - c0
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"rc": rc, "wall_s": wall, "cpu_s": cpu, "maxrss_mb": hwm / 1024}))
"""

# What the child imports, so that its bytecode is cached before the timed run.
_WARM_UP = "import fastdeploy_otel.tools.cli, fastdeploy_otel.tools.replay_cmd, fastdeploy_otel._export"


def _template(tmp: str) -> list[str]:
    """One request's lines as FastDeploy's logger writes them (placeholders for id and time)."""
    from bench import legacy

    log_dir = os.path.join(tmp, "template")
    path = legacy.setup(log_dir)
    try:
        for event, _ in MIXED:
            rid = "@RID@" if event.value == "POSTPROCESSING_END" else "@RID@_0"
            legacy.trace_print(event, rid, None)
    finally:
        legacy.teardown()
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines(keepends=True)
    out = []
    for line in lines:
        head, _, rest = line.partition("[timestamp=")
        out.append(head + "[timestamp=@TS@" + rest[rest.index("]") :])
    return out


def write_input(path: str, lines: int, tmp: str) -> int:
    """`lines` lines of overlapping requests (a new one every 2 ms, 3 ms between events), in time
    order, as a FastDeploy process writes them."""
    template = _template(tmp)
    t0 = int(time.time() * 1000) - 86_400_000
    written = k = 0
    pending: list[tuple[int, int, str]] = []  # (timestamp, sequence, line): a heap
    seq = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < lines:
            start = t0 + 2 * k
            while pending and pending[0][0] < start and written < lines:  # nothing later can come before
                f.write(heapq.heappop(pending)[2])
                written += 1
            rid = f"chatcmpl-{k:08x}-3f0b-4d7e-9a51-2f5d1c0e8b44"
            for i, line in enumerate(template):
                ts = start + 3 * i
                heapq.heappush(pending, (ts, seq, line.replace("@RID@", rid).replace("@TS@", str(ts))))
                seq += 1
            k += 1
    return written


def run_replay(lines: int = 1_000_000, log: Callable[[str], None] = print) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-replay-") as tmp:
        src, out = os.path.join(tmp, "trace.log"), os.path.join(tmp, "spans.jsonl")
        n = write_input(src, lines, tmp)
        log(f"replay: {n:,} lines ({os.path.getsize(src) / 1e6:.0f} MB) -> OTLP/JSON lines ...")
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        # The child may read and write cached bytecode (__pycache__), as an installed package does (pip
        # compiles it at install): with PYTHONDONTWRITEBYTECODE=1 inherited, every child compiled the
        # modules it imports, which is startup, not replay.  One untimed import writes the cache first.
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        subprocess.run([sys.executable, "-c", _WARM_UP], env=env, check=True, timeout=300, cwd=root)
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD, src, out], capture_output=True, text=True, timeout=1800, cwd=root, env=env
        )
        if proc.returncode != 0:
            raise RuntimeError(f"replay failed: {proc.stderr[-2000:]}")
        res = json.loads(proc.stdout.strip().splitlines()[-1])
    return {
        "replay_lines": n,
        "replay_lines_per_s": n / res["cpu_s"],
        "replay_wall_lines_per_s": n / res["wall_s"],
        "replay_peak_rss_mb": res["maxrss_mb"],
    }
