"""Instructions per request (callgrind): the one figure this noisy, shared 2-core machine does not move.

CPU time per request drifts by tens of percent from minute to minute here; the count of machine
instructions a request costs does not (runs agree to well under 1%).  Each variant replays MIXED
(21 events) for `base` and for `base + requests` requests in a fresh process under
``valgrind --tool=callgrind``; the difference over `requests` is the instructions one request costs,
with start-up and imports cancelled out.  ``--trace-children=yes`` counts the OTLP export process too,
so ``otel`` is the whole cost of tracing, wherever it runs.  Instructions are not time (a cache miss
costs more than an add), so the bench reports these next to the CPU figures, not instead of them.

instructions_legacy_per_request    FastDeploy's trace.log path (bench/legacy.py)
instructions_otel_per_request      fastdeploy_otel, mode all, OTLP/gRPC to a real receiver + the mirror
instructions_otel_in_process_per_request   the same, the serving process alone
instructions_shaped_per_request    as serving: an HTTP SERVER span and both carrier hand-overs (serving process)
instructions_ratio                 otel / legacy
instructions_serving_api_added_per_request   what tracing adds to the example API server's own
                                   instructions per request in serving, all vs off: the server runs under
                                   callgrind with collection off until warmed up, then on around
                                   requests in waves; the engine runs as usual
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from .receiver_proc import ReceiverProcess

INSTRUCTION_KEYS = (
    "instructions_legacy_per_request",
    "instructions_otel_per_request",
    "instructions_otel_in_process_per_request",
    "instructions_shaped_per_request",
    "instructions_ratio",
    "instructions_serving_api_added_per_request",
)

_DRIVER = """
import os, sys, tempfile
variant, n, endpoint = sys.argv[1], int(sys.argv[2]), sys.argv[3]
from bench import legacy
from bench.micro import replay_fdt, replay_legacy, replay_serving_shaped, request_ids
import fastdeploy_otel as fdt
tmp = tempfile.mkdtemp()
if variant == "legacy":
    legacy.setup(tmp)
    replay_legacy(request_ids(n))
    legacy.teardown()
else:
    # The export process runs under callgrind too, 50x slower: deadlines long enough for it to finish.
    fdt.configure(mode="all", endpoint=endpoint, log_dir=tmp, env={}, flush_interval_s=0.2, shutdown_timeout_s=600)
    replay = replay_serving_shaped if variant == "shaped" else replay_fdt
    for _ in range(n // 50):  # in chunks, as requests arrive, the worker flushing between them
        replay(request_ids(50))
        fdt.flush()
    st = fdt.shutdown()
    # every span made it: the count is of the whole path
    assert st["spans_exported"] >= st["spans_built"] and not st["spans_lost_at_shutdown"], st
"""

_COLLECTED = re.compile(r"==(\d+)== Collected : (\d+)")


def _count(variant: str, n: int, endpoint: str, cwd: str) -> tuple[int, int]:
    """(instructions of the driver process, of all processes) for `n` requests."""
    out = tempfile.mkdtemp(prefix="bench-cg-")
    try:
        proc = subprocess.Popen(
            ["valgrind", "--tool=callgrind", "--trace-children=yes", f"--callgrind-out-file={out}/cg.%p",
             sys.executable, "-c", _DRIVER, variant, str(n), endpoint],
            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            _, stderr = proc.communicate(timeout=900)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, stderr = proc.communicate()
    finally:
        shutil.rmtree(out, ignore_errors=True)
    counts = {int(pid): int(ir) for pid, ir in _COLLECTED.findall(stderr)}
    if proc.returncode != 0 or proc.pid not in counts:
        raise RuntimeError(f"callgrind run of {variant} failed ({proc.returncode}): {stderr[-500:]}")
    return counts[proc.pid], sum(counts.values())  # valgrind runs the driver as the process it started


def run_instructions(
    requests: int = 300, base: int = 50, log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)
) -> dict[str, Any]:
    if requests % 50 or base % 50 or not base:
        raise ValueError("requests and base are replayed in chunks of 50: give multiples of 50")
    if shutil.which("valgrind") is None:
        log("  instructions skipped: valgrind is not installed (apt-get install valgrind)")
        return {k: None for k in INSTRUCTION_KEYS}
    cwd = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res: dict[str, Any] = {}
    with ReceiverProcess() as rx:
        for variant in ("legacy", "otel", "shaped"):
            lo = _count(variant, base, rx.grpc_endpoint, cwd)
            hi = _count(variant, base + requests, rx.grpc_endpoint, cwd)
            own, total = ((h - low) / requests for h, low in zip(hi, lo, strict=True))
            if variant == "otel":
                res["instructions_otel_per_request"] = total
                res["instructions_otel_in_process_per_request"] = own
            else:
                res[f"instructions_{variant}_per_request"] = own if variant == "shaped" else total
            log(f"  instructions per request, {variant}: {own:,.0f} in the process, {total:,.0f} in all")
        res["instructions_ratio"] = res["instructions_otel_per_request"] / res["instructions_legacy_per_request"]
        api = {mode: _serving_api(mode, rx, requests) for mode in ("off", "all")}
    res["instructions_serving_api_added_per_request"] = api["all"] - api["off"]
    log(f"  API server's instructions per request in serving: off {api['off']:,.0f}, all {api['all']:,.0f}")
    return res


def _serving_api(mode: str, rx: ReceiverProcess, requests: int) -> float:
    """The example API server's instructions per request in serving (waves of 4 clients, 16 tokens)."""
    from minifd.stack import Stack

    from .serving import closed_loop, served_model

    out = tempfile.mkdtemp(prefix="bench-cg-api-")
    launcher = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}/cg.%p"]
    try:
        with Stack(trace_mode=mode, log_dir=os.path.join(out, "log"), port=0, startup_timeout_s=600,
                   otlp_endpoint=rx.grpc_endpoint if mode != "off" else None, launcher={"api": launcher}) as stack:
            url, model = stack.base_url + "/v1/completions", served_model(stack.base_url)
            closed_loop(url, 4, 40, 16, model, waves=True)  # warm, not counted
            pid = stack.procs["api"].pid  # valgrind runs the server as the process it was started as
            subprocess.run(["callgrind_control", "-i", "on", str(pid)], capture_output=True, timeout=60)
            closed_loop(url, 4, 8, 16, model, waves=True)
            before = _collected(pid, out)
            done = closed_loop(url, 4, requests, 16, model, waves=True)["completed"]
            time.sleep(1.0)  # the worker's flushes of these requests
            return (_collected(pid, out) - before) / max(1, done)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _collected(pid: int, out: str) -> int:
    """Instructions the process has run while collection was on: each dump holds those since the last."""
    subprocess.run(["callgrind_control", "-d", str(pid)], capture_output=True, timeout=60)
    time.sleep(1.0)
    total = 0
    for path in glob.glob(f"{out}/cg.{pid}*"):
        with open(path, errors="replace") as f:
            for line in f:
                if line.startswith(("totals:", "summary:")):
                    total += int(line.split()[1])
                    break
    return total
