"""Smoke test of the benchmark (``python -m bench``) with tiny counts: it runs end to end and its JSON
has every figure as a finite number.  No timing assertions: the figures are not checked here."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def test_micro_bench_smoke(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--no-serving", "--no-instructions", "--requests", "12", "--rounds", "1", "--threads", "1,2",
         "--rss-requests", "200", "--replay-lines", "20000", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "hot_path_ratio" in proc.stdout  # the table was printed
    res = json.loads(out.read_text())

    sys.path.insert(0, ROOT)
    try:
        from bench.instructions import INSTRUCTION_KEYS
        from bench.micro import MICRO_KEYS
        from bench.replay import REPLAY_KEYS
        from bench.serving import SERVING_KEYS
    finally:
        sys.path.remove(ROOT)

    per_thread = ("legacy_us", "hot_path_us", "disabled_us", "naive_sdk_us", "legacy_total_cpu_us", "total_cpu_us",
                  "naive_sdk_total_cpu_us", "hot_path_ratio", "total_cpu_ratio", "disabled_ratio", "naive_sdk_ratio")
    required = list(MICRO_KEYS) + [f"{k}_2t" for k in per_thread] + ["cores", "micro_requests", "micro_rounds"]
    required += list(REPLAY_KEYS)
    bad = {k: res.get(k) for k in required if not _finite(res.get(k))}
    assert not bad, bad
    assert res["micro_threads"] == [1, 2]
    assert res["rss_in_flight_requests"] == 200
    assert res["replay_lines"] >= 20000
    assert res["spans_per_request"] == 10 and res["events_per_request"] == 21
    for t in ("1", "2"):
        row = res["by_threads"][t]
        # every span the pipeline built reached the receiver, and no event was dropped
        assert row["otel_spans_built"] == row["otel_spans_received"] == 10 * 12
        assert row["otel_dropped_queue_full"] == 0
        assert row["otel_mirror_lines"] == 21 * 12
    # the paced round: every request's 10 spans and its HTTP SERVER span reached the receiver
    assert res["paced_requests"] == 12 and res["paced_spans_built"] == 10 * 12 and res["paced_spans_received"] == 11 * 12
    for key in (*SERVING_KEYS, *INSTRUCTION_KEYS):  # --no-serving, --no-instructions: present, null
        assert key in res and res[key] is None
    assert res["python"] == ".".join(map(str, sys.version_info[:3]))
