"""A soak of the example stack: unique prompts at a fixed concurrency, RSS of both processes sampled.

    python -m minifd.soak --seconds 1800 --warmup-seconds 120 --trace all   # the 30-minute run, by hand

It starts its own Stack, sends requests until the time is up, and reports, after warm-up, each
process's RSS growth per request (least-squares slope over the samples) and from first to last
sample.  tests/test_soak.py runs a short one in CI and fails on growth per request.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import itertools
import json
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field

import httpx

from .stack import Stack


def rss_mb(pid: int) -> float:
    """Resident set size of a process, in MiB (Linux /proc)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs (0 for fewer than two distinct xs)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    return 0.0 if var == 0 else sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var


@dataclass
class SoakReport:
    seconds: float
    requests: int  # after warm-up
    warmup_requests: int
    errors: int
    samples: list[tuple[int, float, float]] = field(default_factory=list)  # (requests, engine MiB, api MiB)

    def kb_per_request(self, role: str) -> float:
        col = 1 if role == "engine" else 2
        return 1024 * slope([s[0] for s in self.samples], [s[col] for s in self.samples])

    def growth_percent(self, role: str) -> float:
        col = 1 if role == "engine" else 2
        return 100 * (self.samples[-1][col] - self.samples[0][col]) / self.samples[0][col]

    def summary(self) -> str:
        parts = [f"{self.requests} requests after {self.warmup_requests} warm-up in {self.seconds:.0f}s "
                 f"({self.requests / max(self.seconds, 1e-9):.1f}/s), {self.errors} errors"]
        for role, col in (("engine", 1), ("api", 2)):
            parts.append(f"{role} RSS {self.samples[0][col]:.1f} -> {self.samples[-1][col]:.1f} MiB "
                         f"({self.growth_percent(role):+.1f}%, {self.kb_per_request(role):+.2f} KB/request)")
        return "; ".join(parts)


def _one(client: httpx.Client, n: int) -> bool:
    """One request with a unique prompt (every one a cache miss and a new hash); streams every other one."""
    body = {"prompt": f"{n} {uuid.uuid4().hex} soak prompt, unique so every block misses the cache",
            "max_tokens": 16, "temperature": 0.7, "seed": n, "stream": n % 2 == 0}
    if body["stream"]:
        with client.stream("POST", "/v1/completions", json=body) as resp:
            ok = resp.status_code == 200 and list(resp.iter_lines())[-2:] == ["data: [DONE]", ""]
            return ok
    return client.post("/v1/completions", json=body).status_code == 200


def soak(stack: Stack, seconds: float, warmup_seconds: float, concurrency: int = 4,
         sample_every_s: float = 2.0) -> SoakReport:
    """Load `stack` for warmup_seconds + seconds; RSS samples are taken after the warm-up."""
    pids = stack.procs["engine"].pid, stack.procs["api"].pid
    counter = itertools.count()
    done = [0, 0]  # requests, errors
    lock = threading.Lock()
    stop = threading.Event()

    def worker(client: httpx.Client) -> None:
        while not stop.is_set():
            ok = _one(client, next(counter))
            with lock:
                done[0] += 1
                done[1] += not ok

    with httpx.Client(base_url=stack.base_url, timeout=60) as client, cf.ThreadPoolExecutor(concurrency) as pool:
        futures = [pool.submit(worker, client) for _ in range(concurrency)]
        time.sleep(warmup_seconds)
        with lock:
            warm = done[0]
            done[1] = 0
        report = SoakReport(seconds=0.0, requests=0, warmup_requests=warm, errors=0)
        t0 = time.monotonic()
        while True:
            with lock:
                n = done[0] - warm
            report.samples.append((n, rss_mb(pids[0]), rss_mb(pids[1])))
            if time.monotonic() - t0 >= seconds:
                break
            time.sleep(sample_every_s)
        stop.set()
        for fut in futures:
            fut.result()
    report.seconds = time.monotonic() - t0
    report.requests = report.samples[-1][0]
    report.errors = done[1]
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=600)
    p.add_argument("--warmup-seconds", type=float, default=60)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--trace", default="all", help="FD_TRACE for both processes")
    p.add_argument("--log-dir", default=None)
    p.add_argument("--json", default=None, help="also write the report (with every sample) here")
    args = p.parse_args(argv)
    log_dir = args.log_dir or tempfile.mkdtemp(prefix="minifd-soak-")
    with Stack(trace_mode=args.trace, log_dir=log_dir) as stack:
        report = soak(stack, args.seconds, args.warmup_seconds, args.concurrency)
    print(report.summary())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(asdict(report), f)
    return 0 if report.errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
