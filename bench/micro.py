"""Per-request micro benchmark: FastDeploy's legacy trace.log path vs fastdeploy_otel.

Every variant replays ``tests.support.lifecycles.MIXED`` (21 events, with their attributes) for N
requests with unique request ids, then ``finish_request``.  Variants, measured in the same process,
interleaved round by round (order alternating), medians taken:

legacy     bench/legacy.py: FastDeploy's logger + CustomFormatter + daily file, written on the
           calling thread (that is FastDeploy's cost).
hot path   fastdeploy_otel with the full pipeline on: mode="all", OTLP/gRPC export to a real
           receiver plus the trace.log mirror.  Calling-thread CPU time of the replay loop.
total CPU  the same run: CPU time of the whole process (all threads) from before the replay until
           flush() returned and the receiver holds every exported span: spans assembled, built,
           encoded, sent and mirror lines written.  The receiver runs in a child process, so
           decoding on the far end is not counted.  Compared with legacy's process CPU.
disabled   configure(mode="off"): the same replay.
naive SDK  a TracerProvider + BatchSpanProcessor(OTLP gRPC) with in-line start_span/end per stage
           and sub-stage and add_event for point events, as a direct instrumentation would do it.
as serving the pipeline of `hot path`, each request as serving makes it (an HTTP SERVER span, both
           carrier hand-overs), back to back: warm caches, big batches for the worker.
paced      the same requests at serving's pace (one every `pace_ms`, the thread asleep in between, the
           worker's flush interval serving's), all minus off at the same pace: what tracing adds to a
           process that serves.  Tracing's code and data are cold by each request's calls (the
           serving figure pays about twice the warm loop's CPU for the same instructions), and this
           is the variant that predicts serving (``micro_predicts_serving_ratio``).

At 1 and at 8 emitting threads (each thread replays its share concurrently; per-request figures
are the calling-thread time summed over threads / requests).  Plus the resident memory of 10,000
requests in flight (first half of MIXED, no finish), measured in an isolated child process.
"""

from __future__ import annotations

import contextlib
import gc
import math
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from typing import Any, Callable, Iterator, Sequence

import fastdeploy_otel as fdt
from tests.support.lifecycles import MIXED
from fastdeploy_otel.events import LoggingEventName as E
from fastdeploy_otel.span_plan import PLAN, REQUEST_SPAN_NAME, Action

from . import legacy
from .receiver_proc import ReceiverProcess
from .serving import process_cpu_s

_thread_ns = time.thread_time_ns
_process_ns = time.process_time_ns
_wall_ns = time.perf_counter_ns

VARIANTS = ("legacy", "otel", "shaped", "off", "naive")
HALF = MIXED[: len(MIXED) // 2]

# The headline keys run_micro() always returns as finite numbers (the smoke test checks them).
MICRO_KEYS = (
    "hot_path_ratio",
    "total_cpu_ratio",
    "disabled_ratio",
    "naive_sdk_ratio",
    "legacy_us",
    "hot_path_us",
    "disabled_us",
    "naive_sdk_us",
    "legacy_total_cpu_us",
    "total_cpu_us",
    "naive_sdk_total_cpu_us",
    "rss_in_flight_mb",
    "rss_in_flight_requests",
    "events_per_request",
    "spans_per_request",
    "dropin_overhead_ratio",
    "serving_shaped_cpu_us",
    "serving_paced_cpu_us",
)

# Per thread count: (key, variant, field)
_FIGURES = (
    ("legacy_us", "legacy", "calling_us"),
    ("hot_path_us", "otel", "calling_us"),
    ("disabled_us", "off", "calling_us"),
    ("naive_sdk_us", "naive", "calling_us"),
    ("legacy_total_cpu_us", "legacy", "process_us"),
    ("total_cpu_us", "otel", "process_us"),
    ("in_process_cpu_us", "otel", "in_process_us"),
    ("export_process_cpu_us", "otel", "export_process_us"),
    ("naive_sdk_total_cpu_us", "naive", "process_us"),
    ("serving_shaped_cpu_us", "shaped", "in_process_us"),
)
_RATIOS = (
    ("hot_path_ratio", "otel", "calling_us", "legacy", "calling_us"),
    ("total_cpu_ratio", "otel", "process_us", "legacy", "process_us"),
    ("disabled_ratio", "off", "calling_us", "legacy", "calling_us"),
    ("naive_sdk_ratio", "naive", "calling_us", "legacy", "calling_us"),
)


def request_ids(n: int) -> list[str]:
    """FastDeploy-shaped ids (``chatcmpl-<uuid>_0``), unique across the whole run."""
    return [f"chatcmpl-{uuid.uuid4()}_0" for _ in range(n)]


def split(items: Sequence[str], parts: int) -> list[list[str]]:
    return [list(items[i::parts]) for i in range(parts)]


# ---- the replays -------------------------------------------------------------------------------
def replay_legacy(rids: Sequence[str]) -> None:
    tp = legacy.trace_print
    events = [ev for ev, _ in MIXED]
    for rid in rids:
        for ev in events:
            tp(ev, rid, None)


def replay_fdt(rids: Sequence[str], lifecycle=MIXED, finish: bool = True) -> None:
    tp, fin = fdt.trace_print, fdt.finish_request
    for rid in rids:
        for ev, attrs in lifecycle:
            tp(ev, rid, None, **attrs)
        if finish:
            fin(rid)


def replay_serving_shaped(rids: Sequence[str]) -> None:
    """MIXED as serving does it, for the prediction of serving's CPU: an HTTP SERVER span around
    each request (``fdt.start_server_span``, what ``minifd.http_spans`` makes) and the two carrier
    hand-overs (PREPROCESSING to the engine, POSTPROCESSING back), as inject() and extract() in this
    one process."""
    from opentelemetry import context as otel_context
    from opentelemetry import trace

    tp, fin, inject, extract = fdt.trace_print, fdt.finish_request, fdt.inject, fdt.extract
    handed = (E.PREPROCESSING_START, E.POSTPROCESSING_START)
    attrs = {"http.request.method": "POST", "url.path": "/v1/completions", "url.scheme": "http",
             "client.address": "127.0.0.1"}
    for rid in rids:
        span = fdt.start_server_span("POST /v1/completions", attributes=attrs)
        token = otel_context.attach(trace.set_span_in_context(span))
        for ev, kw in MIXED:
            tp(ev, rid, None, **kw)
            if ev in handed:
                extract(rid, inject(rid))
        fin(rid)
        span.set_attributes({"http.route": "/v1/completions", "http.response.status_code": 200})
        span.end()
        otel_context.detach(token)


def paced(replay: Callable[[Sequence[str]], None], pace_s: float) -> Callable[[Sequence[str]], None]:
    """`replay`, one request every `pace_s` (on a schedule, so the work does not stretch the pace)."""

    def run(rids: Sequence[str]) -> None:
        due = time.monotonic()
        for i in range(len(rids)):
            replay(rids[i : i + 1])
            due += pace_s
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)

    return run


class NaiveInstrumentation:
    """What instrumenting FastDeploy directly with the SDK would look like: a span started at every
    START and ended at every END (sub-stages as children of their stage, stages as children of a
    request span), point events as ``add_event`` on the stage span."""

    def __init__(self, tracer) -> None:
        from opentelemetry import trace

        self._tracer = tracer
        self._in = trace.set_span_in_context
        self._requests: dict[str, dict[str, Any]] = {}

    def trace_print(self, event, request_id: str, user: object = None, **attrs: Any) -> None:
        req = self._requests.get(request_id)
        if req is None:
            root = self._tracer.start_span(REQUEST_SPAN_NAME, attributes={"fastdeploy.request_id": request_id})
            req = self._requests[request_id] = {"": root}
        step = PLAN[event]
        action = step.action
        if action is Action.OPEN and not (step.unless_open and step.unless_open in req):
            parent = req[""] if step.is_stage else (req.get(step.stage) or req[""])
            base = {"fastdeploy.request_id": request_id, "fastdeploy.stage": step.stage}
            if attrs:
                base.update(attrs)
            req[step.span] = self._tracer.start_span(step.span, context=self._in(parent), attributes=base)
        elif action is Action.CLOSE:
            span = req.pop(step.span, None)
            if span is not None:
                if attrs:
                    span.set_attributes(attrs)
                span.end()
            for extra in step.also_closes:
                span = req.pop(extra, None)
                if span is not None:
                    span.end()
        else:  # a point event (or INFERENCE_START inside DECODE)
            span = req.get(step.stage) or req[""]
            span.add_event(event.value, attrs)
            if action is Action.POINT_CLOSE:
                req.pop(step.stage, None)
                span.end()

    def finish_request(self, request_id: str) -> None:
        req = self._requests.pop(request_id, None)
        if req is None:
            return
        root = req.pop("")
        for span in req.values():
            span.end()
        root.end()

    def replay(self, rids: Sequence[str]) -> None:
        tp, fin = self.trace_print, self.finish_request
        for rid in rids:
            for ev, attrs in MIXED:
                tp(ev, rid, None, **attrs)
            fin(rid)


# ---- timing ------------------------------------------------------------------------------------
def run_threads(fn: Callable[[Sequence[str]], None], chunks: list[list[str]]) -> tuple[int, int]:
    """Run fn over each chunk, one emitting thread per chunk; (calling-thread CPU ns summed, wall ns)."""
    if len(chunks) == 1:
        w0, t0 = _wall_ns(), _thread_ns()
        fn(chunks[0])
        t1, w1 = _thread_ns(), _wall_ns()
        return t1 - t0, w1 - w0
    spent = [0] * len(chunks)
    barrier = threading.Barrier(len(chunks) + 1)

    def work(i: int) -> None:
        barrier.wait()
        t0 = _thread_ns()
        fn(chunks[i])
        spent[i] = _thread_ns() - t0

    threads = [threading.Thread(target=work, args=(i,), name=f"bench-emitter-{i}") for i in range(len(chunks))]
    for t in threads:
        t.start()
    barrier.wait()
    w0 = _wall_ns()
    for t in threads:
        t.join()
    return sum(spent), _wall_ns() - w0


class _Bench:
    def __init__(self, rx: ReceiverProcess, workdir: str, flush_interval_s: float, bsp: dict[str, int]) -> None:
        self.rx = rx
        self.workdir = workdir
        self.flush_interval_s = flush_interval_s
        self.bsp = bsp
        self.warmup = 30

    def _dir(self, name: str) -> str:
        path = os.path.join(self.workdir, name)
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path)
        return path

    @staticmethod
    def _sample(n: int, thread_ns: int, wall_ns: int, process_ns: int | None, **extra: Any) -> dict[str, Any]:
        out = {
            "requests": n,
            "calling_us": thread_ns / n / 1e3,
            "wall_s": wall_ns / 1e9,
            "requests_per_s": n / (wall_ns / 1e9) if wall_ns else math.inf,
            "process_us": process_ns / n / 1e3 if process_ns is not None else None,
        }
        out.update(extra)
        return out

    def legacy(self, n: int, threads: int) -> dict[str, Any]:
        fdt.shutdown()
        log_dir = self._dir("legacy")
        legacy.setup(log_dir)
        try:
            replay_legacy(request_ids(self.warmup))
            chunks = split(request_ids(n), threads)
            gc.collect()
            p0 = _process_ns()
            thread_ns, wall_ns = run_threads(replay_legacy, chunks)
            legacy._handler.flush()
            p1 = _process_ns()
        finally:
            legacy.teardown()
        return self._sample(n, thread_ns, wall_ns, p1 - p0)

    def otel(
        self, n: int, threads: int, replay: Callable[[Sequence[str]], None] = replay_fdt,
        flush_interval_s: float | None = None,
    ) -> dict[str, Any]:
        log_dir = self._dir("otel")
        fdt.configure(
            mode="all", endpoint=self.rx.grpc_endpoint, log_dir=log_dir, env={},
            flush_interval_s=flush_interval_s or self.flush_interval_s, bsp=dict(self.bsp) or None,
        )
        try:
            replay(request_ids(self.warmup))  # warm-up: opens the gRPC channel, fills caches
            fdt.flush()
            self.rx.wait(fdt.stats().get("spans_exported", 0), 30)
            self.rx.clear()
            base = fdt.stats()
            chunks = split(request_ids(n), threads)
            kid = export_process_pid()
            gc.collect()
            k0 = process_cpu_s(kid) if kid else 0.0
            p0 = _process_ns()
            thread_ns, wall_ns = run_threads(replay, chunks)
            fdt.flush()
            st = fdt.stats()
            exported = st.get("spans_exported", 0) - base.get("spans_exported", 0)
            received = self.rx.wait(exported, 60)
            p1 = _process_ns()
            k1 = process_cpu_s(kid) if kid else 0.0
            d = {k: st.get(k, 0) - base.get(k, 0) for k in st}
        finally:
            fdt.shutdown()
        built = d.get("spans_built", 0)
        export_ns = int((k1 - k0) * 1e9)  # the OTLP export process: tracing's CPU, if not this process's
        return self._sample(
            n, thread_ns, wall_ns, p1 - p0 + export_ns,
            in_process_us=(p1 - p0) / n / 1e3, export_process_us=export_ns / n / 1e3,
            spans_built=built, spans_exported=exported, spans_received=received,
            spans_export_failed=d.get("spans_export_failed", 0),
            spans_dropped=built - exported - d.get("spans_export_failed", 0),
            mirror_lines=d.get("mirror_lines", 0), records=d.get("records", 0),
            dropped_queue_full=d.get("dropped_queue_full", 0),
        )

    def off(self, n: int, threads: int, replay: Callable[[Sequence[str]], None] = replay_fdt) -> dict[str, Any]:
        fdt.configure(mode="off", env={})
        replay(request_ids(self.warmup))
        chunks = split(request_ids(n), threads)
        gc.collect()
        p0 = _process_ns()
        thread_ns, wall_ns = run_threads(replay, chunks)
        p1 = _process_ns()
        return self._sample(n, thread_ns, wall_ns, p1 - p0)

    def naive(self, n: int, threads: int) -> dict[str, Any]:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExportResult

        class ReportingExporter:  # counts what the receiver acknowledged
            def __init__(self, inner: Any, _: str) -> None:
                self.inner, self.exported = inner, 0

            def export(self, spans: Any) -> SpanExportResult:
                result = self.inner.export(spans)
                if result is SpanExportResult.SUCCESS:
                    self.exported += len(spans)
                return result

            def shutdown(self) -> None:
                self.inner.shutdown()

        fdt.shutdown()
        provider = TracerProvider(resource=Resource.create({"service.name": "bench-naive"}))
        exporter = ReportingExporter(OTLPSpanExporter(endpoint=self.rx.grpc_endpoint, insecure=True), "naive")
        provider.add_span_processor(BatchSpanProcessor(exporter, **self.bsp))
        inst = NaiveInstrumentation(provider.get_tracer("bench.naive"))
        try:
            inst.replay(request_ids(self.warmup))
            provider.force_flush()
            self.rx.wait(exporter.exported, 30)
            self.rx.clear()
            base = exporter.exported
            chunks = split(request_ids(n), threads)
            gc.collect()
            p0 = _process_ns()
            thread_ns, wall_ns = run_threads(inst.replay, chunks)
            provider.force_flush()
            exported = exporter.exported - base
            received = self.rx.wait(exported, 60)
            p1 = _process_ns()
        finally:
            provider.shutdown()
        return self._sample(n, thread_ns, wall_ns, p1 - p0, spans_exported=exported, spans_received=received)


# ---- memory with requests in flight (child process) ------------------------------------------------
def _vm(field: str) -> int:
    """kB of a /proc/self/status field (VmRSS, VmHWM); 0 where /proc is not there."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _rss_child(conn, endpoint: str, n: int, flush_interval_s: float, bsp: dict[str, int]) -> None:
    import resource

    tmp = tempfile.mkdtemp(prefix="bench-rss-")
    try:
        fdt.configure(mode="all", endpoint=endpoint, log_dir=tmp, env={}, flush_interval_s=flush_interval_s, bsp=dict(bsp) or None)
        replay_fdt(request_ids(50))
        fdt.flush()
        rids = request_ids(n)  # the ids exist in the server anyway; not tracing's memory
        gc.collect()
        rss0, hwm0, maxrss0 = _vm("VmRSS"), _vm("VmHWM"), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for i in range(0, n, 1000):  # in steps, so that no burst outruns the bounded event queue
            replay_fdt(rids[i : i + 1000], HALF, finish=False)
            fdt.flush()
        gc.collect()
        rss1, hwm1, maxrss1 = _vm("VmRSS"), _vm("VmHWM"), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        st = fdt.stats()
        conn.send({
            "rss_in_flight_mb": (rss1 - rss0) / 1024,
            "rss_hwm_delta_mb": (hwm1 - hwm0) / 1024,
            "ru_maxrss_delta_mb": (maxrss1 - maxrss0) / 1024,
            "rss_before_mb": rss0 / 1024,
            "rss_after_mb": rss1 / 1024,
            "rss_in_flight_requests": st.get("requests_in_flight", 0),
            "rss_events_per_request": len(HALF),
        })
    except BaseException as exc:  # report, do not hang the parent
        conn.send({"error": f"{type(exc).__name__}: {exc}"})
    finally:
        conn.close()
        shutil.rmtree(tmp, ignore_errors=True)
        os._exit(0)  # skip shutdown(): it would end and export every request still in flight


def measure_rss(endpoint: str, n: int, flush_interval_s: float, bsp: dict[str, int]) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_rss_child, args=(child, endpoint, n, flush_interval_s, bsp), name="bench-rss")
    proc.start()
    child.close()
    try:
        if not parent.poll(600):
            raise TimeoutError("the memory measurement did not finish in 600 s")
        out = parent.recv()
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
    if "error" in out:
        raise RuntimeError("memory measurement failed: " + out["error"])
    return out


# ---- driver --------------------------------------------------------------------------------------
def export_process_pid() -> int | None:
    """The pid of the running configuration's OTLP export process, if it has one."""
    rt = fdt.api._runtime
    process = rt.sink.process if rt is not None and rt.sink is not None else None
    proc = process._proc if process is not None else None
    return proc.pid if proc is not None else None


def _median(values: list[float]) -> float:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(values) if values else math.nan


def spans_per_request() -> int:
    """Spans one MIXED request becomes (request span included): counted from the span plan."""
    spans = {REQUEST_SPAN_NAME}
    for ev, _ in MIXED:
        step = PLAN[ev]
        spans.add(step.span if step.action is not Action.POINT else step.stage)
    return len(spans)


def run_micro(
    quick: bool = False,
    *,
    requests: int | None = None,
    rounds: int | None = None,
    threads: Sequence[int] = (1, 8),
    rss_requests: int = 10_000,
    off_factor: int = 10,
    flush_interval_s: float = 0.2,
    bsp: dict[str, int] | None = None,
    pace_ms: float = 12.0,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
) -> dict[str, Any]:
    """Run every variant at every thread count; returns headline figures (1 thread) + details."""
    requests = requests or (400 if quick else 2000)
    rounds = rounds or (5 if quick else 9)
    paced_requests = min(requests, 60 if quick else 150)  # at 12 ms each: 2 s a run
    bsp = dict(bsp or {})
    result: dict[str, Any] = {
        "events_per_request": len(MIXED),
        "spans_per_request": spans_per_request(),
        "micro_requests": requests,
        "micro_rounds": rounds,
        "micro_threads": list(threads),
        "off_requests": requests * off_factor,
        "flush_interval_s": flush_interval_s,
        "bsp": bsp,
    }
    by_threads: dict[str, Any] = {}
    workdir = tempfile.mkdtemp(prefix="bench-micro-")
    t_start = time.monotonic()
    try:
        with ReceiverProcess() as rx:
            bench = _Bench(rx, workdir, flush_interval_s, bsp)
            run = {
                "legacy": bench.legacy,
                "otel": bench.otel,
                "shaped": lambda n, t: bench.otel(n, t, replay_serving_shaped),
                "off": bench.off,
                "naive": bench.naive,
            }
            for t in threads:
                for v in VARIANTS:  # one discarded pass: imports, caches, file creation, gRPC channels
                    run[v](max(t, requests // 5), t)
                samples: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
                for r in range(rounds):
                    order = VARIANTS if r % 2 == 0 else VARIANTS[::-1]
                    for v in order:
                        n = requests * off_factor if v == "off" else requests
                        samples[v].append(run[v](n, t))
                    log(
                        f"  micro threads={t} round {r + 1}/{rounds}: "
                        + "  ".join(f"{v}={samples[v][-1]['calling_us']:.1f}us" for v in VARIANTS)
                        + f"  otel_total={samples['otel'][-1]['process_us']:.1f}us legacy_total={samples['legacy'][-1]['process_us']:.1f}us"
                    )
                by_threads[str(t)] = _summarise(samples, t, requests)
            pairs = PacedPairs(bench, paced_requests, pace_ms / 1e3, log)
            for r in range(rounds):
                pairs.pair(f" round {r + 1}/{rounds}")
            result.update(pairs.figures())
            log(f"  memory: {rss_requests} requests in flight (child process)")
            result.update(measure_rss(rx.grpc_endpoint, rss_requests, flush_interval_s, bsp))
    finally:
        fdt.shutdown()
        shutil.rmtree(workdir, ignore_errors=True)
    from .dropin import run_dropin

    log("  drop-in: FastDeploy-style trace_print through the instrumentor vs a direct call")
    result.update(run_dropin(requests=max(requests // 2, 10), rounds=max(rounds, 3)))
    result["micro_seconds"] = time.monotonic() - t_start
    result["by_threads"] = by_threads
    first = by_threads[str(threads[0])]
    for key in [k for k, *_ in _FIGURES] + [k for k, *_ in _RATIOS]:
        result[key] = first[key]
    for t in threads[1:]:
        for key in [k for k, *_ in _FIGURES] + [k for k, *_ in _RATIOS]:
            result[f"{key}_{t}t"] = by_threads[str(t)][key]
    return result


class PacedPairs:
    """The serving-shaped requests at serving's pace, a pair at a time: all, then off (or the other
    way round); the figure is all minus off, per pair.  `bench/__main__` also takes a pair between
    the serving bench's rounds, so that prediction and serving share the machine's state of the moment
    (its speed here drifts by tens of percent in minutes)."""

    def __init__(self, bench: _Bench, n: int, pace_s: float, log: Callable[[str], None]) -> None:
        from fastdeploy_otel.config import Settings

        self.n, self.pace_s, self.log = n, pace_s, log
        replay = paced(replay_serving_shaped, pace_s)
        self._run = {
            "all": lambda: bench.otel(n, 1, replay, flush_interval_s=Settings().flush_interval_s),
            "off": lambda: bench.off(n, 1, replay),
        }
        self.added: list[float] = []
        self.off: list[float] = []
        self.built = self.received = 0
        self._run["all"](), self._run["off"]()  # discarded: as the other variants' first pass

    def pair(self, label: str = "") -> None:
        order = ("all", "off") if len(self.added) % 2 == 0 else ("off", "all")
        got = {mode: self._run[mode]() for mode in order}
        self.added.append(got["all"]["in_process_us"] - got["off"]["process_us"])
        self.off.append(got["off"]["process_us"])
        self.built += got["all"]["spans_built"]
        self.received += got["all"]["spans_received"]
        self.log(f"  micro paced (a request every {self.pace_s * 1e3:g} ms){label}: all "
                 f"{got['all']['in_process_us']:.1f}us off {got['off']['process_us']:.1f}us in the process")

    def figures(self, suffix: str = "") -> dict[str, Any]:
        return {
            f"serving_paced_cpu_us{suffix}": _median(self.added),
            f"serving_paced_cpu_us{suffix}_rounds": [round(x, 1) for x in self.added],
            f"paced_off_cpu_us{suffix}": _median(self.off),
            # received = built + one HTTP SERVER span a request, when nothing was dropped on the way
            f"paced_spans_built{suffix}": self.built,
            f"paced_spans_received{suffix}": self.received,
            "paced_requests": self.n,
            "pace_ms": self.pace_s * 1e3,
        }


@contextlib.contextmanager
def paced_pairs(
    n: int, pace_ms: float, log: Callable[[str], None], bsp: dict[str, int] | None = None
) -> Iterator[PacedPairs]:
    """PacedPairs with a receiver of their own, for pairs taken outside run_micro."""
    workdir = tempfile.mkdtemp(prefix="bench-paced-")
    try:
        with ReceiverProcess() as rx:
            yield PacedPairs(_Bench(rx, workdir, 0.2, dict(bsp or {})), n, pace_ms / 1e3, log)
    finally:
        fdt.shutdown()
        shutil.rmtree(workdir, ignore_errors=True)


def _summarise(samples: dict[str, list[dict[str, Any]]], threads: int, requests: int) -> dict[str, Any]:
    out: dict[str, Any] = {"threads": threads, "requests": requests, "rounds": len(samples["legacy"])}
    for key, variant, field in _FIGURES:
        out[key] = _median([s[field] for s in samples[variant]])
    # Ratios: the median of the per-round ratios (each round runs every variant back to back, so
    # slow drift of the machine cancels), next to the ratio of medians for reference.
    for key, num_v, num_f, den_v, den_f in _RATIOS:
        per_round = [a[num_f] / b[den_f] for a, b in zip(samples[num_v], samples[den_v]) if b[den_f]]
        out[key] = _median(per_round)
        out[key + "_of_medians"] = out[f"{_key_of(num_v, num_f)}"] / out[f"{_key_of(den_v, den_f)}"]
    for v in VARIANTS:  # the raw per-round figures, to judge the noise
        out[f"{v}_calling_us_rounds"] = [round(s["calling_us"], 2) for s in samples[v]]
        out[f"{v}_process_us_rounds"] = [round(s["process_us"], 2) for s in samples[v]]
    for v in VARIANTS:
        out[f"{v}_wall_s"] = _median([s["wall_s"] for s in samples[v]])
        out[f"{v}_requests_per_s"] = _median([s["requests_per_s"] for s in samples[v]])
    otel = samples["otel"]
    out["otel_spans_built"] = sum(s["spans_built"] for s in otel)
    out["otel_spans_exported"] = sum(s["spans_exported"] for s in otel)
    out["otel_spans_received"] = sum(s["spans_received"] for s in otel)
    out["otel_spans_dropped"] = sum(s["spans_dropped"] for s in otel)
    out["otel_dropped_queue_full"] = sum(s["dropped_queue_full"] for s in otel)
    out["otel_mirror_lines"] = sum(s["mirror_lines"] for s in otel)
    out["naive_spans_exported"] = sum(s["spans_exported"] for s in samples["naive"])
    out["naive_spans_received"] = sum(s["spans_received"] for s in samples["naive"])
    return out


def _key_of(variant: str, field: str) -> str:
    for key, v, f in _FIGURES:
        if v == variant and f == field:
            return key
    raise KeyError((variant, field))
