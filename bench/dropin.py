"""``dropin_overhead_ratio``: one FastDeploy-style ``trace_print`` call through the instrumentor's
replacement (FastDeploy's plain-Enum event mapped, its choice id looked up) divided by one direct
``fastdeploy_otel.trace_print`` call.

Both replay the MIXED lifecycle for the same kind of request ids in mode "local" (trace.log only, the
same downstream work either way), interleaved round by round; calling-thread CPU time, median of
the per-round ratios.
"""

from __future__ import annotations

import gc
import shutil
import statistics
import tempfile
import time
import uuid
from enum import Enum
from typing import Any, Callable

import fastdeploy_otel as fdt
from fastdeploy_otel import _fd_takeover as fd_takeover
from tests.support.lifecycles import MIXED

# FastDeploy's LoggingEventName is a plain Enum (not a str Enum): the shape the replacement receives.
FDEventName = Enum("LoggingEventName", {e.name: e.value for e in fdt.LoggingEventName})


def _replay(print_fn: Callable[..., None], events: list[Any], rids: list[str]) -> int:
    gc.collect()
    t0 = time.thread_time_ns()
    for rid in rids:
        for ev in events:
            print_fn(ev, rid, "")
    spent = time.thread_time_ns() - t0
    # Drain the queue untimed, as the worker does every 100 ms in a server: the replacement's hand-over
    # at POSTPROCESSING_START (inject) would otherwise drain the other variant's records on its clock.
    fdt.flush()
    return spent


def run_dropin(requests: int = 2000, rounds: int = 7, chunk: int = 50) -> dict[str, Any]:
    """The ratio and both per-call costs (µs), for requests already joined (their choice ids known).

    Joined by a PREPROCESSING_START with no carrier, each is owned here (recorded under its base id,
    as the API server's are), so its POSTPROCESSING bookkeeping is the API server's.

    Within a round the two variants alternate every `chunk` requests, so that the machine's drift
    (a shared CI box) falls on both alike; the queue is drained, untimed, after each chunk."""
    workdir = tempfile.mkdtemp(prefix="bench-dropin-")
    fd_takeover.map_events(FDEventName)
    ours = [ev for ev, _ in MIXED]
    theirs = [FDEventName[ev.name] for ev in ours]
    calls = requests * len(ours)
    direct_us, patched_us, ratios = [], [], []
    gc_was_enabled = gc.isenabled()
    gc.disable()  # collections triggered by the growing queue would land on whichever variant runs then
    try:
        fdt.configure(mode="local", log_dir=workdir, env={}, max_pending=10_000_000, flush_interval_s=3600.0)
        for r in range(rounds + 1):  # the first round warms up and is discarded
            a = [f"chatcmpl-{uuid.uuid4()}_0" for _ in range(requests)]
            b = [f"chatcmpl-{uuid.uuid4()}_0" for _ in range(requests)]
            for rid in b:  # joined at its first event, untimed (owned here: see the docstring)
                fd_takeover.trace_print(theirs[0], rid, "")
            fdt.flush()
            d = p = 0
            for i in range(0, requests, chunk):
                if (i // chunk + r) % 2:
                    d += _replay(fdt.trace_print, ours, a[i:i + chunk])
                    p += _replay(fd_takeover.trace_print, theirs, b[i:i + chunk])
                else:
                    p += _replay(fd_takeover.trace_print, theirs, b[i:i + chunk])
                    d += _replay(fdt.trace_print, ours, a[i:i + chunk])
            for rid in a + b:
                fdt.finish_request(rid)
            fdt.flush()
            if r:
                direct_us.append(d / 1000 / calls)
                patched_us.append(p / 1000 / calls)
                ratios.append(p / d)
    finally:
        if gc_was_enabled:
            gc.enable()
        fdt.shutdown()
        fd_takeover.reset()
        shutil.rmtree(workdir, ignore_errors=True)
    return {"dropin_overhead_ratio": statistics.median(ratios), "dropin_direct_us": statistics.median(direct_us),
            "dropin_patched_us": statistics.median(patched_us)}


if __name__ == "__main__":
    print(run_dropin())
