"""Serving benchmark: the example server (``examples/minifd``) under a closed-loop load, tracing
``all`` (OTLP to a real receiver + the trace.log mirror) and ``local`` vs ``off``.

One stack per mode, all started at once and kept up, so that the modes take short turns: the
machine's drift (tens of percent from minute to minute on a shared 2-core box) lands on every mode
alike.  Each round runs every mode once with the clients free-running (throughput, latency), then
three turns of bursts in *waves* (clients send together, so every mode's engine sees the same
batches) for CPU per request, read per process, and per thread in the engine, from /proc.  The order
of the modes rotates from turn to turn; each turn gives one all/off (and local/off) difference and the
figures are medians over them.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

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
    """CPU time of a process, in seconds: its threads' nanosecond run times where the kernel keeps
    them (``/proc/<pid>/task/*/schedstat``), else utime + stime in clock ticks (10 ms: coarse for a
    burst of 100 requests at 1 ms each); NaN where /proc is not there."""
    threads = thread_cpu_s(pid)
    if threads:
        return sum(threads.values())
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu_s(pid: int) -> dict[int, float]:
    """CPU time of each live thread of a process, in seconds, by thread id, from the scheduler's
    nanosecond count (empty where the kernel has no schedstat)."""
    out: dict[int, float] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                out[int(tid)] = int(f.read().split()[0]) / 1e9
        except (OSError, ValueError, IndexError):
            continue
    return out


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


def engine_steps(stack: Any) -> int | None:
    """The engine's model steps so far (SIGUSR1 makes it log them): equal steps per request in two
    modes mean equal batches, so a CPU difference between them is not one of batching."""
    path = os.path.join(stack.log_dir, "engine.out")
    try:
        before = os.path.getsize(path)
        os.kill(stack.procs["engine"].pid, signal.SIGUSR1)
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            with open(path, "rb") as f:
                f.seek(before)
                m = re.search(rb"step stats: steps=(\d+)", f.read())
            if m:
                return int(m.group(1))
            time.sleep(0.02)
    except OSError:
        pass
    return None


class LiveStack:
    """One mode's stack, started once and kept up: bursts of the modes alternate in short turns, so
    the machine's drift (tens of percent from minute to minute here) lands on every mode alike."""

    def __init__(self, Stack: Any, mode: str, rx: ReceiverProcess, clients: int, max_tokens: int) -> None:
        self.mode = mode
        self.clients, self.max_tokens = clients, max_tokens
        self.log_dir = tempfile.mkdtemp(prefix=f"bench-serving-{mode}-")
        trace_mode = mode.split("_")[0]  # "off_b": a second stack with tracing off (an A/A control)
        endpoint = rx.grpc_endpoint if trace_mode != "off" else None
        t0 = time.monotonic()
        self.stack = Stack(trace_mode=trace_mode, log_dir=self.log_dir, otlp_endpoint=endpoint, port=0)
        try:
            self.stack.start()
            self.startup_s = time.monotonic() - t0
            self.url = self.stack.base_url.rstrip("/") + "/v1/completions"
            self.model = served_model(self.stack.base_url)
        except BaseException:
            self.close()
            raise
        self.pids = {role: self.stack.procs[role].pid for role in ROLES}
        # The export side-processes' CPU is reported too: moved off the serving process, not free.
        self.kids = {role: export_children(pid) for role, pid in self.pids.items()}

    def run(self, requests: int, waves: bool) -> dict[str, Any]:
        """`requests` completions; throughput, latencies and per-process (and engine per-thread) CPU per request."""
        pids, kids = self.pids, self.kids
        before = {role: process_cpu_s(pid) for role, pid in pids.items()}
        kids_before = {role: sum(process_cpu_s(k) for k in ks) for role, ks in kids.items()}
        threads_before = thread_cpu_s(pids["engine"])
        steps_before = engine_steps(self.stack) if waves else None
        out = closed_loop(self.url, self.clients, requests, self.max_tokens, self.model, waves=waves)
        done = max(1, out["completed"])
        for role, pid in pids.items():
            out[f"{role}_cpu_ms_per_request"] = (process_cpu_s(pid) - before[role]) * 1e3 / done
            used = sum(process_cpu_s(k) for k in kids[role]) - kids_before[role]
            out[f"{role}_export_process_cpu_ms_per_request"] = used * 1e3 / done
        # The model runner is the engine's busiest thread; it runs no tracing code.  What tracing
        # costs it (GIL, caches) is its difference between modes; the other threads carry tracing.
        used = thread_cpu_s(pids["engine"])
        per_thread = sorted((used[t] - threads_before.get(t, 0.0) for t in used), reverse=True)
        out["engine_model_thread_cpu_ms_per_request"] = (per_thread[0] if per_thread else math.nan) * 1e3 / done
        out["engine_other_threads_cpu_ms_per_request"] = sum(per_thread[1:]) * 1e3 / done
        steps_after = engine_steps(self.stack) if waves else None
        if steps_before is not None and steps_after is not None:
            out["engine_steps_per_request"] = (steps_after - steps_before) / done
        return out

    def close(self) -> dict[str, Any]:
        """Stop the stack (it flushes); what it wrote."""
        try:
            self.stack.stop()
            return {
                "trace_log_bytes": sum(  # each process writes its own trace.log under log_dir/<role>/
                    os.path.getsize(os.path.join(d, f))
                    for d, _, files in os.walk(self.log_dir) for f in files if f.startswith("trace.log")
                )
            }
        finally:
            shutil.rmtree(self.log_dir, ignore_errors=True)


def _skipped(reason: str, available: bool = False) -> dict[str, Any]:
    """Null figures and why; `available`: the stack could run, the benchmark failed."""
    out: dict[str, Any] = {k: None for k in SERVING_KEYS}
    out.update({"serving_available": available, "serving_skipped_reason": reason})
    return out


def run_serving(
    quick: bool = False,
    *,
    clients: int | None = None,
    requests: int | None = None,
    max_tokens: int | None = None,
    pairs: int | None = None,
    modes: Sequence[str] | None = None,
    between_rounds: Callable[[int], None] | None = None,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
) -> dict[str, Any]:
    """Throughput and latency with tracing all vs off; the ratios are all/off.  `between_rounds(k)`
    runs after round k's bursts, the stacks idle (the micro's paced pairs, at the same moment)."""
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
    modes = tuple(modes or (("off", "all") if quick else ("off", "all", "local")))
    if modes[0] != "off" or "all" not in modes or len(set(modes)) != len(modes):
        raise ValueError(f"serving modes must start with off, include all and not repeat: {modes}")
    warmup = max(clients, requests // 10)
    # CPU in waves, in bursts of a third of a run: three turns of every mode per throughput round.
    burst = max(clients, requests // 3 // clients * clients)
    # Rounds of every mode, the order rotating from round to round: a disturbance of the machine lands
    # in one round, not in one mode, and each round gives one all/off (and local/off) comparison.
    def rotations(n: int) -> list[tuple[str, ...]]:
        return [modes[i % len(modes):] + modes[: i % len(modes)] for i in range(n)]

    runs: list[dict[str, Any]] = []
    bursts: list[dict[str, Any]] = []
    stacks: dict[str, LiveStack] = {}
    closed: dict[str, dict[str, Any]] = {}
    t_start = time.monotonic()
    try:
        with ReceiverProcess() as rx:
            try:
                for mode in modes:  # all up at once, each warmed up
                    stacks[mode] = LiveStack(Stack, mode, rx, clients, max_tokens)
                    stacks[mode].run(warmup, waves=False)
                    stacks[mode].run(warmup, waves=True)
                rx.clear()
                for k, order in enumerate(rotations(pairs)):
                    for mode in order:  # throughput and latency, clients free-running
                        run = stacks[mode].run(requests, waves=False)
                        run.update(mode=mode, round=k)
                        runs.append(run)
                        log(
                            f"  serving round {k + 1}/{pairs} trace={mode}: {run['throughput_rps']:.1f} req/s, "
                            f"p50 {percentile(run['latencies'], 50) * 1e3:.1f} ms, "
                            f"p99 {percentile(run['latencies'], 99) * 1e3:.1f} ms, CPU ms/request "
                            f"api {run['api_cpu_ms_per_request']:.2f} engine {run['engine_cpu_ms_per_request']:.2f}, "
                            f"errors {run['errors']}"
                        )
                    for j, turn in enumerate(rotations(3)):
                        for mode in turn:  # CPU per request, in waves
                            b = stacks[mode].run(burst, waves=True)
                            b.update(mode=mode, round=3 * k + j)
                            bursts.append(b)
                    last = [b for b in bursts if b["round"] >= 3 * k]
                    log("  CPU ms/request in waves, this round's bursts: " + "; ".join(
                        f"{m} api {statistics.median(b['api_cpu_ms_per_request'] for b in last if b['mode'] == m):.2f} "
                        f"engine {statistics.median(b['engine_cpu_ms_per_request'] for b in last if b['mode'] == m):.2f}"
                        for m in modes))
                    if between_rounds is not None:
                        try:
                            between_rounds(k)
                        except Exception as exc:  # the serving figures stand without it
                            log(f"  after round {k + 1}: {type(exc).__name__}: {exc}")
            finally:
                for mode, live in stacks.items():  # every one, whatever the others do
                    try:
                        closed[mode] = live.close()
                    except Exception as exc:
                        log(f"  stopping the {mode} stack failed: {exc}")
            spans_received = rx.count()  # after the stacks shut down (and flushed)
    except Exception as exc:
        reason = f"serving benchmark failed: {type(exc).__name__}: {exc}"
        log("  " + reason)
        return _skipped(reason, available=True)
    failed = sum(r["errors"] for r in runs + bursts)
    if failed:
        first = next(r["first_error"] for r in runs + bursts if r["first_error"])
        reason = f"serving benchmark failed: {failed} requests failed, e.g. {first}"
        log("  " + reason)
        return _skipped(reason, available=True)

    by_mode: dict[str, dict[str, Any]] = {}
    cpu_keys = [f"{role}_cpu_ms_per_request" for role in ROLES] + [
        f"{role}_export_process_cpu_ms_per_request" for role in ROLES
    ] + ["engine_model_thread_cpu_ms_per_request", "engine_other_threads_cpu_ms_per_request", "engine_steps_per_request"]
    for mode in modes:
        mine = [r for r in runs if r["mode"] == mode]
        lat = [x for r in mine for x in r["latencies"]]
        by_mode[mode] = {
            "throughput_rps": statistics.median(r["throughput_rps"] for r in mine),
            "throughput_rps_runs": [round(r["throughput_rps"], 2) for r in mine],
            "p50_ms": percentile(lat, 50) * 1e3,
            "p99_ms": percentile(lat, 99) * 1e3,
            "p99_ms_runs": [round(percentile(r["latencies"], 99) * 1e3, 2) for r in mine],
            "completed": sum(r["completed"] for r in mine) + sum(b["completed"] for b in bursts if b["mode"] == mode),
            "startup_s": round(stacks[mode].startup_s, 2),
            "trace_log_bytes": closed.get(mode, {}).get("trace_log_bytes"),
        }
        for key in cpu_keys:  # in waves, the medians over the bursts
            values = [b[key] for b in bursts if b["mode"] == mode and key in b]
            by_mode[mode][key] = statistics.median(values) if values else math.nan
            by_mode[mode][key + "_runs"] = [round(v, 3) for v in values]
        for role in ROLES:  # free-running, for reference
            key = f"{role}_cpu_ms_per_request"
            by_mode[mode][key + "_free"] = statistics.median(r[key] for r in mine)
    by_mode["all"]["spans_received"] = spans_received
    off, on = by_mode["off"], by_mode["all"]

    def paired(items: list[dict[str, Any]], metric: Callable[[dict[str, Any], dict[str, Any]], float], mode: str) -> list[float]:
        """metric(item in `mode`, item with tracing off) for each round of `items`."""
        out = []
        for k in sorted({x["round"] for x in items}):
            r = {x["mode"]: x for x in items if x["round"] == k}
            out.append(metric(r[mode], r["off"]))
        return out

    tput = paired(runs, lambda a, o: a["throughput_rps"] / o["throughput_rps"], "all")
    p50 = paired(runs, lambda a, o: percentile(a["latencies"], 50) / percentile(o["latencies"], 50), "all")
    p99 = paired(runs, lambda a, o: percentile(a["latencies"], 99) / percentile(o["latencies"], 99), "all")
    added: dict[str, Any] = {}
    for mode in modes[1:]:
        suffix = "" if mode == "all" else f"_{mode}"
        for key, name in (
            ("api_cpu_ms_per_request", "api_cpu_ms_added"),
            ("engine_cpu_ms_per_request", "engine_cpu_ms_added"),
            ("engine_other_threads_cpu_ms_per_request", "engine_tracing_threads_cpu_ms_added"),
            ("engine_model_thread_cpu_ms_per_request", "engine_model_thread_cpu_ms_added"),
        ):
            diffs = paired(bursts, lambda a, o, key=key: a[key] - o[key], mode)
            added[f"serving_{name}{suffix}"] = statistics.median(diffs)
            added[f"serving_{name}{suffix}_rounds"] = [round(x, 3) for x in diffs]
        for role in ROLES:
            key = f"{role}_cpu_ms_per_request"
            free = paired(runs, lambda a, o, key=key: a[key] - o[key], mode)
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
        "serving_off_engine_cpu_ms": off["engine_cpu_ms_per_request"],
        # CPU of the OTLP export side-processes, per request (not in the *_added figures: not the
        # serving process's, and not under its GIL; on a 2-core box it still competes for cores)
        "serving_api_export_process_cpu_ms": on["api_export_process_cpu_ms_per_request"],
        "serving_engine_export_process_cpu_ms": on["engine_export_process_cpu_ms_per_request"],
        # equal in every mode when the waves kept the batches equal (the engine's CPU follows its steps)
        "serving_engine_steps_per_request": {m: by_mode[m]["engine_steps_per_request"] for m in modes},
        "serving_p99_ratio_pooled": on["p99_ms"] / off["p99_ms"],
        "serving_off_rps": off["throughput_rps"],
        "serving_all_rps": on["throughput_rps"],
        "serving_off_p50_ms": off["p50_ms"],
        "serving_all_p50_ms": on["p50_ms"],
        "serving_off_p99_ms": off["p99_ms"],
        "serving_all_p99_ms": on["p99_ms"],
        "serving_clients": clients,
        "serving_requests_per_run": requests,
        "serving_requests_per_burst": burst,
        "serving_max_tokens": max_tokens,
        "serving_rounds": pairs,
        "serving_seconds": time.monotonic() - t_start,
        "serving": by_mode,
    }
