"""Figures for docs/RELIABILITY.md: the library against a collector that refuses, hangs, answers
503/429 or is slow, over gRPC and HTTP.  ``python -m bench.faults`` prints the table;
tests/test_channel.py runs the same scenarios and asserts on them.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import tempfile
import threading
import time
from dataclasses import asdict, dataclass

import fastdeploy_otel as fdt
from tests.support.lifecycles import MIXED
from tests.support.receiver import BlackHole, OtlpReceiver, refused_endpoint

FAULTS = ("refused", "hang", "unavailable", "exhausted", "slow")
PROTOCOLS = ("grpc", "http/protobuf")
SLOW_S = 1.5  # the slow collector's answer time per export


def run_request(rid: str, user: str = "u") -> None:
    for event, attrs in MIXED:
        fdt.trace_print(event, rid, user, **attrs)
    fdt.finish_request(rid)


class LineWatcher:
    """Notes when each request's last line (POSTPROCESSING_END) reaches trace.log."""

    _END = re.compile(r"\[request_id=([^\]]+)\] \[user_id=[^\]]*\] \[event=POSTPROCESSING_END\]")

    def __init__(self, log_dir: str) -> None:
        self.path = os.path.join(log_dir, "trace.log")
        self.seen: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            try:
                with open(self.path, encoding="utf-8") as f:
                    text = f.read()
            except OSError:
                continue
            now = time.monotonic()
            for m in self._END.finditer(text):
                self.seen.setdefault(m.group(1), now)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class Collector:
    """A collector with one fault: ``with Collector(protocol, fault) as c:`` then ``c.endpoint``."""

    def __init__(self, protocol: str, fault: str) -> None:
        self.rx: OtlpReceiver | None = None
        self._hole: BlackHole | None = None
        if fault == "refused":
            self.endpoint = refused_endpoint()
        elif fault == "hang" and protocol == "grpc":
            self._hole = BlackHole()  # accepts connections, never answers: the HTTP/2 handshake never ends
            self.endpoint = self._hole.endpoint
        else:  # HTTP "hang": the request is read and never answered
            self.rx = OtlpReceiver().start()
            self.rx.fault.mode = fault
            self.rx.fault.delay_s = SLOW_S
            self.endpoint = self.rx.grpc_endpoint if protocol == "grpc" else self.rx.http_endpoint

    def __enter__(self) -> "Collector":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.rx is not None:
            self.rx.stop()
        if self._hole is not None:
            self._hole.close()


@dataclass
class FaultRun:
    protocol: str
    fault: str
    requests: int
    with_lines: int  # requests whose last line reached trace.log
    max_line_lag_s: float  # worst time from finish_request to the request's last line in trace.log
    shutdown_s: float
    deadline_s: float
    stats: dict
    received: int  # spans the receiver holds (None-like -1 where there is no receiver)


def collector_run(protocol: str, fault: str, log_dir: str, requests: int = 20, deadline_s: float = 2.0) -> FaultRun:
    """`requests` requests, 30 ms apart, against one faulty collector; then shutdown() is timed."""
    with Collector(protocol, fault) as c:
        fdt.configure(env={}, mode="all", log_dir=log_dir, endpoint=c.endpoint, protocol=protocol,
                      shutdown_timeout_s=deadline_s, flush_interval_s=0.1,
                      bsp={"schedule_delay_millis": 50, "max_export_batch_size": 16})
        watcher = LineWatcher(log_dir)
        ended: dict[str, float] = {}
        try:
            for i in range(requests):
                rid = f"{protocol[:4]}-{fault}-{i}"
                run_request(rid)
                ended[rid] = time.monotonic()
                time.sleep(0.03)
            wait_until = time.monotonic() + 3
            while len(watcher.seen) < len(ended) and time.monotonic() < wait_until:
                time.sleep(0.05)
        finally:
            watcher.stop()
        lags = [watcher.seen[rid] - t for rid, t in ended.items() if rid in watcher.seen]
        t0 = time.monotonic()
        st = fdt.shutdown()
        elapsed = time.monotonic() - t0
        received = len(c.rx.store.spans()) if c.rx is not None else -1
    return FaultRun(protocol, fault, requests, len(lags), max(lags, default=float("inf")), elapsed, deadline_s,
                    st, received)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=20)
    p.add_argument("--deadline", type=float, default=2.0, help="FD_TRACE_SHUTDOWN_TIMEOUT_MS, in seconds")
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args()
    logging.getLogger("fastdeploy_otel").setLevel(logging.CRITICAL)  # the table says it all
    rows = []
    print("| protocol | collector | requests with lines | worst line lag | shutdown (deadline) "
          "| spans built | exported | failed | lost at deadline | dropped (queue) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for protocol in PROTOCOLS:
        for fault in FAULTS:
            with tempfile.TemporaryDirectory() as d:
                r = collector_run(protocol, fault, os.path.join(d, "log"), args.requests, args.deadline)
            s = r.stats
            rows.append(asdict(r))
            print(f"| {protocol} | {fault} | {r.with_lines}/{r.requests} | {r.max_line_lag_s * 1000:.0f} ms "
                  f"| {r.shutdown_s:.2f} s ({r.deadline_s:g} s) | {s['spans_built']} | {s['spans_exported']} "
                  f"| {s['spans_export_failed']} | {s['spans_lost_at_shutdown']} | {s['spans_dropped_export_queue']} |")
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
