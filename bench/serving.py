"""Serving benchmark: the example server (``examples/minifd``) under a closed-loop load, tracing
``all`` (OTLP to a real receiver + the trace.log mirror) vs ``off``.

N client threads each send ``POST /v1/completions`` back to back until a fixed total count;
per-request latency is recorded, throughput = completed requests / wall time.  Runs alternate
(off, all | all, off | ...); each adjacent (off, all) pair gives one all/off ratio and the reported
ratio is the median over the pairs, so that drift or a disturbance of the machine cancels out.
"""

from __future__ import annotations

import itertools
import math
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from typing import Any, Callable

from .receiver_proc import ReceiverProcess

SERVING_KEYS = (
    "serving_throughput_ratio",
    "serving_p50_ratio",
    "serving_p99_ratio",
    "serving_api_cpu_ms_added",
    "serving_engine_cpu_ms_added",
)
ROLES = ("api", "engine")


def process_cpu_s(pid: int) -> float:
    """utime + stime of a process, in seconds, from /proc (all its threads); NaN where /proc is not there."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

def export_children(pid: int) -> list[int]:
    """The export side-processes (``fastdeploy_otel._export_process``) that process `pid` started."""
    out = []
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(x) for x in f.read().split()]
    except OSError:
        return out
    for kid in kids:
        try:
            with open(f"/proc/{kid}/cmdline", "rb") as f:
                if b"_export_process" in f.read():
                    out.append(kid)
        except OSError:
            pass
    return out


PROMPTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time, in a land far away,",
    "The quick brown fox jumps over the lazy cat.",
    "def fibonacci(n):",
    "Tracing makes every request stage visible:",
    "Once upon a time, there was a tiny model",
)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def served_model(base_url: str, default: str = "tiny") -> str:
    """The model id the server serves (``GET /v1/models``); `default` when it does not say."""
    import httpx

    try:
        data = httpx.get(base_url.rstrip("/") + "/v1/models", timeout=10).json()["data"]
        return str(data[0]["id"])
    except Exception:
        return default


def closed_loop(
    url: str, clients: int, total: int, max_tokens: int, model: str = "tiny", timeout_s: float = 120.0,
    waves: bool = False,
) -> dict[str, Any]:
    """`clients` threads sending requests back to back until `total` were sent.

    With `waves`, the clients send together, one request each per wave, client i always prompt i:
    every engine step then has the same batch, so the engine's CPU per request does not depend on
    how the requests happened to overlap (which tracing's latency changes).
    """
    import httpx

    counter = itertools.count()
    lock = threading.Lock()
    latencies: list[float] = []
    errors: list[str] = []
    barrier = threading.Barrier(clients + 1)
    wave = threading.Barrier(clients) if waves else None

    def client(k: int) -> None:
        with httpx.Client(timeout=timeout_s) as http:
            barrier.wait()
            for n in itertools.count():
                if wave is not None:
                    if n >= total // clients:
                        return
                    i = k
                    wave.wait()
                else:
                    with lock:
                        i = next(counter)
                    if i >= total:
                        return
                body = {"model": model, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0}
                t0 = time.perf_counter()
                try:
                    r = http.post(url, json=body)
                    r.raise_for_status()
                except Exception as exc:  # counted, reported
                    with lock:
                        errors.append(f"{type(exc).__name__}: {exc}"[:200])
                    continue
                dt = time.perf_counter() - t0
                with lock:
                    latencies.append(dt)

    threads = [threading.Thread(target=client, args=(i,), name=f"bench-client-{i}", daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    w0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - w0
    return {
        "completed": len(latencies),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "wall_s": wall,
        "throughput_rps": len(latencies) / wall if wall > 0 else math.nan,
        "latencies": latencies,
    }


def _one_run(Stack, mode: str, rx: ReceiverProcess, clients: int, requests: int, warmup: int, max_tokens: int) -> dict[str, Any]:
    log_dir = tempfile.mkdtemp(prefix=f"bench-serving-{mode}-")
    try:
        t0 = time.monotonic()
        endpoint = rx.grpc_endpoint if mode != "off" else None
        with Stack(trace_mode=mode, log_dir=log_dir, otlp_endpoint=endpoint, port=0) as stack:
            startup = time.monotonic() - t0
            url = stack.base_url.rstrip("/") + "/v1/completions"
            model = served_model(stack.base_url)
            if warmup:
                closed_loop(url, clients, warmup, max_tokens, model)
            rx.clear()
            pids = {role: stack.procs[role].pid for role in ROLES}
            # The export side-processes' CPU is reported too: moved off the serving process, not free.
            kids = {role: export_children(pid) for role, pid in pids.items()}

            def cpu_of(loop: Callable[[], dict[str, Any]], suffix: str) -> dict[str, Any]:
                """Run `loop`; per-process CPU per request around it (stable where throughput is not)."""
                before = {role: process_cpu_s(pid) for role, pid in pids.items()}
                kids_before = {role: sum(process_cpu_s(k) for k in ks) for role, ks in kids.items()}
                out = loop()
                done = max(1, out["completed"])
                for role, pid in pids.items():
                    out[f"{role}_cpu_ms_per_request{suffix}"] = (process_cpu_s(pid) - before[role]) * 1e3 / done
                    used = sum(process_cpu_s(k) for k in kids[role]) - kids_before[role]
                    out[f"{role}_export_process_cpu_ms_per_request{suffix}"] = used * 1e3 / done
                return out

            # Throughput and latency with the clients free-running; CPU per request in waves (the same
            # batches whatever the latency), where the engine's figure is not swamped by batching.
            run = cpu_of(lambda: closed_loop(url, clients, requests, max_tokens, model), "_free")
            waves = cpu_of(lambda: closed_loop(url, clients, requests, max_tokens, model, waves=True), "")
            run.update({k: v for k, v in waves.items() if "cpu_ms" in k})
            run["errors"] += waves["errors"]
            run["first_error"] = run["first_error"] or waves["first_error"]
            if run["errors"]:
                raise RuntimeError(f"{run['errors']} of {requests} requests failed, e.g. {run['first_error']}")
        run["startup_s"] = startup
        run["mode"] = mode
        if mode != "off":
            run["spans_received"] = rx.count()  # after the stack shut down (and flushed)
        run["trace_log_bytes"] = sum(  # each process writes its own trace.log under log_dir/<role>/
            os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(log_dir) for f in files if f.startswith("trace.log")
        )
        return run
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)


def _skipped(reason: str) -> dict[str, Any]:
    out: dict[str, Any] = {k: None for k in SERVING_KEYS}
    out.update({"serving_available": False, "serving_skipped_reason": reason})
    return out


def run_serving(
    quick: bool = False,
    *,
    clients: int | None = None,
    requests: int | None = None,
    max_tokens: int | None = None,
    pairs: int | None = None,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
) -> dict[str, Any]:
    """Throughput and latency with tracing all vs off; the ratios are all/off."""
    try:
        from minifd.stack import Stack
    except ImportError as exc:
        reason = (
            f"serving benchmark skipped: the example serving stack is not importable "
            f"(from minifd.stack import Stack: {exc}); serving_* figures are null"
        )
        log("  " + reason)
        return _skipped(reason)
    try:
        import httpx  # noqa: F401
    except ImportError as exc:
        reason = f"serving benchmark skipped: httpx is not installed ({exc}); pip install -e '.[serve]'"
        log("  " + reason)
        return _skipped(reason)

    clients = clients or 8
    requests = requests or (120 if quick else 600)
    max_tokens = max_tokens or 16
    pairs = pairs or (2 if quick else 4)
    modes = ("off", "all") if quick else ("off", "all", "local")
    warmup = max(clients, requests // 10)
    # Rounds of every mode, the order rotating from round to round: a disturbance of the machine lands
    # in one round, not in one mode, and each round gives one all/off (and local/off) comparison.
    rounds = [modes[i % len(modes):] + modes[: i % len(modes)] for i in range(pairs)]
    schedule = [m for r in rounds for m in r]
    runs: list[dict[str, Any]] = []
    t_start = time.monotonic()
    try:
        with ReceiverProcess() as rx:
            for i, mode in enumerate(schedule):
                run = _one_run(Stack, mode, rx, clients, requests, warmup, max_tokens)
                run["round"] = i // len(modes)
                runs.append(run)
                log(
                    f"  serving run {i + 1}/{len(schedule)} trace={mode}: {run['throughput_rps']:.1f} req/s, "
                    f"p50 {percentile(run['latencies'], 50) * 1e3:.1f} ms, p99 {percentile(run['latencies'], 99) * 1e3:.1f} ms, "
                    f"CPU ms/request api {run['api_cpu_ms_per_request']:.2f} engine {run['engine_cpu_ms_per_request']:.2f} "
                    f"(export processes {run['api_export_process_cpu_ms_per_request']:.2f}, "
                    f"{run['engine_export_process_cpu_ms_per_request']:.2f}), "
                    f"errors {run['errors']}, startup {run['startup_s']:.1f} s"
                )
    except Exception as exc:
        reason = f"serving benchmark failed: {type(exc).__name__}: {exc}"
        log("  " + reason)
        out = _skipped(reason)
        out["serving_available"] = True
        return out

    by_mode: dict[str, dict[str, Any]] = {}
    for mode in modes:
        mine = [r for r in runs if r["mode"] == mode]
        lat = [x for r in mine for x in r["latencies"]]
        by_mode[mode] = {
            "throughput_rps": statistics.median(r["throughput_rps"] for r in mine),
            "throughput_rps_runs": [round(r["throughput_rps"], 2) for r in mine],
            "p50_ms": percentile(lat, 50) * 1e3,
            "p99_ms": percentile(lat, 99) * 1e3,
            "p99_ms_runs": [round(percentile(r["latencies"], 99) * 1e3, 2) for r in mine],
            "completed": sum(r["completed"] for r in mine),
            "errors": sum(r["errors"] for r in mine),
            "first_error": next((r["first_error"] for r in mine if r["first_error"]), None),
            "startup_s": [round(r["startup_s"], 2) for r in mine],
            "trace_log_bytes": sum(r["trace_log_bytes"] for r in mine),
        }
        for role in ROLES:
            for key in (f"{role}_cpu_ms_per_request", f"{role}_export_process_cpu_ms_per_request",
                        f"{role}_cpu_ms_per_request_free"):
                by_mode[mode][key] = statistics.median(r[key] for r in mine)
                by_mode[mode][key + "_runs"] = [round(r[key], 3) for r in mine]
        if mode == "all":
            by_mode[mode]["spans_received"] = sum(r.get("spans_received", 0) for r in mine)
    off, on = by_mode["off"], by_mode["all"]

    def per_round(metric: Callable[[dict[str, Any], dict[str, Any]], float], mode: str = "all") -> list[float]:
        """metric(run in `mode`, run with tracing off) for each round."""
        out = []
        for k in range(pairs):
            r = {x["mode"]: x for x in runs if x["round"] == k}
            out.append(metric(r[mode], r["off"]))
        return out

    tput = per_round(lambda a, o: a["throughput_rps"] / o["throughput_rps"])
    p50 = per_round(lambda a, o: percentile(a["latencies"], 50) / percentile(o["latencies"], 50))
    p99 = per_round(lambda a, o: percentile(a["latencies"], 99) / percentile(o["latencies"], 99))
    added: dict[str, Any] = {}
    for mode in modes[1:]:
        suffix = "" if mode == "all" else f"_{mode}"
        for role in ROLES:
            key = f"{role}_cpu_ms_per_request"
            diffs = per_round(lambda a, o, key=key: a[key] - o[key], mode)
            added[f"serving_{role}_cpu_ms_added{suffix}"] = statistics.median(diffs)
            added[f"serving_{role}_cpu_ms_added{suffix}_rounds"] = [round(x, 3) for x in diffs]
            free = per_round(lambda a, o, key=key: a[key + "_free"] - o[key + "_free"], mode)
            added[f"serving_{role}_cpu_ms_added{suffix}_free"] = statistics.median(free)
            added[f"serving_{role}_cpu_ms_added{suffix}_free_rounds"] = [round(x, 3) for x in free]
    return {
        "serving_available": True,
        **added,
        # the median over the (off, all) pairs of all/off; the pooled figures below for reference
        "serving_throughput_ratio": statistics.median(tput),
        "serving_p50_ratio": statistics.median(p50),
        "serving_p99_ratio": statistics.median(p99),
        "serving_throughput_ratio_rounds": [round(x, 4) for x in tput],
        "serving_p50_ratio_rounds": [round(x, 4) for x in p50],
        "serving_p99_ratio_rounds": [round(x, 4) for x in p99],
        "serving_off_api_cpu_ms": off["api_cpu_ms_per_request"],
        # CPU of the OTLP export side-processes, per request (not in the *_added figures: not the
        # serving process's, and not under its GIL; on a 2-core box it still competes for cores)
        "serving_api_export_process_cpu_ms": on["api_export_process_cpu_ms_per_request"],
        "serving_engine_export_process_cpu_ms": on["engine_export_process_cpu_ms_per_request"],
        "serving_off_engine_cpu_ms": off["engine_cpu_ms_per_request"],
        "serving_p99_ratio_pooled": on["p99_ms"] / off["p99_ms"],
        "serving_off_rps": off["throughput_rps"],
        "serving_all_rps": on["throughput_rps"],
        "serving_off_p50_ms": off["p50_ms"],
        "serving_all_p50_ms": on["p50_ms"],
        "serving_off_p99_ms": off["p99_ms"],
        "serving_all_p99_ms": on["p99_ms"],
        "serving_clients": clients,
        "serving_requests_per_run": requests,
        "serving_max_tokens": max_tokens,
        "serving_schedule": schedule,
        "serving_seconds": time.monotonic() - t_start,
        "serving": by_mode,
    }
