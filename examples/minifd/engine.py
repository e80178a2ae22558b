"""The engine process: FastDeploy's engine threads in miniature, traced at FastDeploy's call sites.

    insert task ──> scheduler ──> model runner ──> token processor ──> API server
    (ZMQ PULL)     (waiting queue,   (Paddle prefill    (first token, finish,
                    KV blocks,        and batched        outputs over ZMQ PUSH)
                    preemption)       decode)

Run as ``python -m minifd.engine --recv ADDR --send ADDR``; tracing is configured from the
environment (FD_TRACE, FD_LOG_DIR, OTEL_*), as in FastDeploy.

Fault containment (docs/RELIABILITY.md): an exception while handling one request, in any thread,
fails that request alone (an error to its client, ``record_error`` on its span); the token
processor sends a heartbeat every HEARTBEAT_S saying whether every thread is alive, and a thread
that dies anyway makes the process report itself unhealthy and exit 1.  With ``MINIFD_FAULTS=1``
a request whose ``user`` is ``fault:<stage>`` raises at that stage (insert, schedule, prefill,
decode, sample, emit) and ``fault:kill:<stage>`` kills that stage's thread: how the tests prove all this.
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import sys
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import zmq

import fastdeploy_otel as fdt
from fastdeploy_otel import LoggingEventName as E

from .ipc import HEARTBEAT_S, configure_sender, messages, send
from .kv_cache import NoFreeBlocks, PrefixCacheManager
from .model import ModelConfig, TinyTransformer, sample
from .tokenizer import EOS_ID

log = logging.getLogger("minifd.engine")
#: Set to "1" to honour fault-injection requests (tests and drills only).
FAULTS_ENV = "MINIFD_FAULTS"
STAGES = ("insert", "schedule", "prefill", "decode", "sample", "emit")


class InjectedFault(RuntimeError):
    """Raised at a stage on request (MINIFD_FAULTS=1, user "fault:<stage>"): a stand-in for any bug."""


class InjectedThreadDeath(BaseException):
    """Escapes every per-request guard (they catch Exception): the thread dies, as with a bug in the loop itself."""


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = ModelConfig()
    gpu_blocks: int = 48
    cpu_blocks: int = 96
    max_batch: int = 8


@dataclass(eq=False)  # two requests are the same only when they are the same object: ids can be reused
class Request:
    rid: str
    user: str | None
    prompt: list[int] = field(default_factory=list)
    max_tokens: int = 0
    temperature: float = 0.0
    top_p: float = 1.0
    stream: bool = False
    logit_bias: dict[int, float] = field(default_factory=dict)
    rng: np.random.Generator | None = None
    output: list[int] = field(default_factory=list)
    cached_tokens: int = 0
    started: bool = False  # INFERENCE_START was traced (a resumed request gets RESCHEDULED_INFERENCE_START)
    allocating: bool = False  # RESOURCE_ALLOCATE_START was traced for this scheduling attempt
    preemptions: int = 0

    def tokens(self) -> list[int]:
        """What the model must have in its KV cache: the prompt plus what was generated so far."""
        return self.prompt + self.output


@dataclass
class StepResult:
    req: Request
    token: int | None = None
    error: BaseException | None = None
    # Set by the scheduler when it applies the token; the token processor reads these, not req.output,
    # which the scheduler keeps extending meanwhile.
    count: int = 0
    finish_reason: str | None = None
    aborted: bool = False  # the scheduler has let go of an id the API server aborted: it may reuse the id


@dataclass
class StepStats:
    """What the model runner did: the engine's CPU per request follows its steps, not only its requests."""

    steps: int = 0
    prefills: int = 0
    decode_rows: int = 0

    def log(self, *_: object) -> None:
        """SIGUSR1: one line to the engine's log (the serving bench reads it around a run)."""
        log.info("step stats: steps=%d prefills=%d decode_rows=%d", self.steps, self.prefills, self.decode_rows)


class Engine:
    def __init__(self, cfg: EngineConfig, recv_addr: str, send_addr: str) -> None:
        self.cfg = cfg
        self.model = TinyTransformer(cfg.model)
        self.cache = PrefixCacheManager(cfg.model, cfg.gpu_blocks, cfg.cpu_blocks)
        self._ctx = zmq.Context()
        self._recv = self._ctx.socket(zmq.PULL)
        self._recv.connect(recv_addr)
        self._send = self._ctx.socket(zmq.PUSH)  # the token processor thread's alone (ZMQ sockets are not thread-safe)
        configure_sender(self._send, immediate=False)
        self._send.connect(send_addr)
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self._lock = threading.Condition()
        self._aborts: set[str] = set()  # ids the API server aborted
        self._failed: list[tuple[Request, BaseException]] = []  # requests whose output could not be processed
        self._steps: queue.Queue = queue.Queue(maxsize=1)
        self._results: queue.Queue = queue.Queue(maxsize=1)
        self._outputs: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._faults = os.environ.get(FAULTS_ENV) == "1"
        self.threads: list[threading.Thread] = []
        self.fatal: str | None = None  # why the engine is unhealthy (a thread died); sent in the heartbeat
        self.stats = StepStats()

    def _fault(self, req: Request, stage: str) -> None:
        """Fault injection (off unless MINIFD_FAULTS=1): raise at `stage` when the request asks for it."""
        if not self._faults or not isinstance(req.user, str) or not req.user.startswith("fault:"):
            return
        if req.user == f"fault:{stage}":
            raise InjectedFault(f"fault injected at {stage} for {req.rid}")
        if req.user == f"fault:kill:{stage}":
            raise InjectedThreadDeath(f"thread killed at {stage} by {req.rid}")

    # ---- insert task thread (FastDeploy: _insert_zmq_task_to_scheduler) --------------------------
    def insert_loop(self) -> None:
        for msg in messages(self._recv, self._stop):
            rid = msg.get("request_id")
            if not isinstance(rid, str):
                log.error("dropped a message without a request id: type=%r", msg.get("type"))
                continue
            if msg.get("type") == "abort":
                with self._lock:
                    self._aborts.add(rid)
                    self._lock.notify()
                continue
            user = msg.get("user") if isinstance(msg.get("user"), str) else None
            try:
                self._insert(rid, user, msg)
            except Exception as exc:  # this request fails; the loop takes the next one
                self._outputs.put(StepResult(Request(rid=rid, user=user), error=exc))

    def _insert(self, rid: str, user: str | None, msg: dict[str, Any]) -> None:
        fdt.extract(rid, msg.get("trace_carrier"))
        fdt.trace_print(E.PREPROCESSING_END, rid, user)
        fdt.trace_print(E.REQUEST_SCHEDULE_START, rid, user)
        fdt.trace_print(E.REQUEST_QUEUE_START, rid, user)
        req = Request(
            rid=rid, user=user, prompt=[int(t) for t in msg["prompt_tokens"]], max_tokens=int(msg["max_tokens"]),
            temperature=float(msg["temperature"]), top_p=float(msg["top_p"]), stream=bool(msg["stream"]),
            logit_bias={int(k): float(v) for k, v in (msg.get("logit_bias") or {}).items()},
            rng=np.random.default_rng(msg.get("seed")),
        )
        self._fault(req, "insert")
        with self._lock:
            self.waiting.append(req)
            self._lock.notify()

    # ---- scheduler thread (FastDeploy: _schedule_request_to_worker_v1 + resource manager) ---------
    def schedule_loop(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                while not (self.waiting or self.running or self._aborts or self._failed) and not self._stop.is_set():
                    self._lock.wait(0.1)
                aborts, self._aborts = self._aborts, set()
                failed, self._failed = self._failed, []
            if self._stop.is_set():
                return
            try:
                self._step(aborts, failed)
            except Exception:  # a bug in one step must not stop the engine: log it and go on
                log.exception("scheduler step failed")
                time.sleep(0.05)

    def _step(self, aborts: set[str], failed: list[tuple[Request, BaseException]]) -> None:
        for req, exc in failed:
            with self._lock:
                live = req in self.running or req in self.waiting
            if live:  # else its end was reported already (an earlier failure, or an abort)
                self._fail(req, exc)
        for rid in aborts:
            try:
                self._abort(rid)
            except Exception:  # one abort must not cost the others or the step
                log.exception("aborting %r failed", rid)
        prefills = self._admit()
        decodes = self._reserve_decode_slots([r for r in self.running if r not in prefills])
        if not prefills and not decodes:
            time.sleep(0.005)
            return
        self._steps.put((prefills, decodes))
        for res in self._results.get():
            try:
                self._after_step(res)
            except Exception as exc:  # this request fails; the rest of the batch carries on
                self._fail(res.req, exc)

    def _admit(self) -> list[Request]:
        admitted: list[Request] = []
        while True:
            with self._lock:
                if not self.waiting or len(self.running) >= self.cfg.max_batch:
                    return admitted
                req = self.waiting[0]
            try:
                outcome = self._admit_one(req, alone=not self.running and not admitted)
            except Exception as exc:  # this request fails; the others carry on
                self._fail(req, exc)
                continue
            if outcome == "wait":
                return admitted
            if outcome == "admitted":
                admitted.append(req)

    def _admit_one(self, req: Request, alone: bool) -> Literal["admitted", "failed", "wait"]:
        """Allocate the head of the waiting queue: admitted, failed (already reported) or wait for blocks."""
        tokens = req.tokens()
        if not req.allocating:
            req.allocating = True
            fdt.trace_print(E.REQUEST_QUEUE_END, req.rid, req.user)
            fdt.trace_print(E.RESOURCE_ALLOCATE_START, req.rid, req.user)
        needed = -(-(len(tokens) + 1) // self.cfg.model.block_size)
        if self.cache.obtainable_gpu_blocks() < needed:
            if alone:
                self._fail(req, NoFreeBlocks(f"request needs {needed} KV blocks; the cache has {self.cfg.gpu_blocks}"))
                return "failed"
            return "wait"  # for blocks to be freed
        fdt.trace_print(E.PREPARE_PREFIX_CACHE_START, req.rid, req.user)
        try:
            decision = self.cache.allocate_prompt(req.rid, tokens)
        except NoFreeBlocks:
            fdt.trace_print(E.PREPARE_PREFIX_CACHE_END, req.rid, req.user)
            return "wait"
        except Exception as exc:
            fdt.trace_print(E.PREPARE_PREFIX_CACHE_END, req.rid, req.user)
            self._fail(req, exc, free=False)  # whatever blocks the id holds are not this request's
            return "failed"
        # The cache manager's own decision becomes the event on the SCHEDULE span.
        fdt.trace_print(decision.kind, req.rid, req.user, **decision.event_attributes())
        fdt.trace_print(E.PREPARE_PREFIX_CACHE_END, req.rid, req.user)
        self._fault(req, "schedule")  # after allocation: its blocks must come back
        fdt.trace_print(E.RESOURCE_ALLOCATE_END, req.rid, req.user)
        fdt.trace_print(E.REQUEST_SCHEDULE_END, req.rid, req.user)
        req.allocating = False
        if not req.started:
            req.cached_tokens = decision.matched_tokens
            fdt.trace_print(E.INFERENCE_START, req.rid, req.user)
            req.started = True
        else:
            fdt.trace_print(E.RESCHEDULED_INFERENCE_START, req.rid, req.user, preemptions=req.preemptions)
        req.num_cached = decision.matched_tokens  # type: ignore[attr-defined]
        with self._lock:
            self.waiting.pop(0)
            self.running.append(req)
        return "admitted"

    def _reserve_decode_slots(self, reqs: list[Request]) -> list[Request]:
        """A KV slot for each decoding request's next token; preempt the newest when blocks run out."""
        ready: list[Request] = []
        for req in list(reqs):
            if req not in self.running:
                continue  # preempted below as a victim
            try:
                pos = len(req.tokens()) - 1
                while not self.cache.append_slot(req.rid, pos):
                    victim = self.running[-1]
                    self._preempt(victim)
                    if victim is req:
                        break
                else:
                    ready.append(req)
            except Exception as exc:  # this request fails; the others still decode
                self._fail(req, exc)
        return [r for r in ready if r in self.running]

    def _preempt(self, req: Request) -> None:
        self.cache.free(req.rid)
        req.preemptions += 1
        fdt.trace_print(E.PREEMPTED, req.rid, req.user, preemptions=req.preemptions)
        fdt.trace_print(E.REQUEST_SCHEDULE_START, req.rid, req.user)
        fdt.trace_print(E.REQUEST_QUEUE_START, req.rid, req.user)
        with self._lock:
            self.running.remove(req)
            self.waiting.insert(0, req)

    def _abort(self, rid: str) -> None:
        try:
            with self._lock:
                found = [r for r in self.running + self.waiting if r.rid == rid]
                self.running = [r for r in self.running if r.rid != rid]
                self.waiting = [r for r in self.waiting if r.rid != rid]
            if found:
                self.cache.free(rid)
                fdt.abort_request(rid, "client disconnected")
        finally:
            # Always acknowledged, found or not: until then the API server holds the id, so that a new
            # request with the same id can never meet this one's blocks, outputs or abort.
            self._outputs.put(StepResult(Request(rid=rid, user=None), aborted=True))

    def _fail(self, req: Request, exc: BaseException, free: bool = True) -> None:
        with self._lock:
            if req in self.running:
                self.running.remove(req)
            if req in self.waiting:
                self.waiting.remove(req)
        if free:
            try:
                self.cache.free(req.rid)
            except Exception:  # its client still hears of it, once; the other requests carry on
                log.exception("freeing the blocks of failed request %r failed", req.rid)
        self._outputs.put(StepResult(req, error=exc))

    def _after_step(self, res: StepResult) -> None:
        req = res.req
        if res.error is not None:
            self._fail(req, res.error)
            return
        req.output.append(res.token)
        res.count = len(req.output)
        if res.token == EOS_ID:
            res.finish_reason = "stop"
        elif len(req.output) >= req.max_tokens or len(req.tokens()) >= self.cfg.model.max_context:
            res.finish_reason = "length"
        if res.finish_reason:  # let go of the id before the client hears it is done (it may reuse it)
            with self._lock:
                self.running.remove(req)
            self.cache.free(req.rid)
        self._outputs.put(res)

    # ---- model runner thread (FastDeploy: the worker process) ------------------------------------
    def runner_loop(self) -> None:
        while not self._stop.is_set():
            try:
                prefills, decodes = self._steps.get(timeout=0.1)
            except queue.Empty:
                continue
            results: list[StepResult] = []
            stats = self.stats
            stats.steps += 1
            stats.prefills += len(prefills)
            stats.decode_rows += len(decodes)
            for req in prefills:
                try:
                    self._fault(req, "prefill")
                    tokens = req.tokens()
                    logits = self.model.prefill(tokens, self.cache.block_table(req.rid), req.num_cached, self.cache.pool)  # type: ignore[attr-defined]
                    self.cache.mark_computed(req.rid)
                    results.append(StepResult(req, token=self._sample(req, logits)))
                except Exception as exc:
                    results.append(StepResult(req, error=exc))
            if decodes:
                try:
                    rows: list[Any] = self._decode(decodes)
                except Exception:  # find the culprit: decode one by one, so only it fails
                    rows = []
                    for req in decodes:
                        try:
                            rows.append(self._decode([req])[0])
                        except Exception as exc:
                            rows.append(exc)
                for req, row in zip(decodes, rows):
                    if isinstance(row, BaseException):
                        results.append(StepResult(req, error=row))
                        continue
                    try:
                        results.append(StepResult(req, token=self._sample(req, row)))
                    except Exception as exc:  # one request's failure; the batch carries on
                        results.append(StepResult(req, error=exc))
            self._results.put(results)

    def _decode(self, reqs: list[Request]) -> list[Any]:
        """One batched decode step; a row of logits per request."""
        for req in reqs:
            self._fault(req, "decode")
        batch = [(r.output[-1], len(r.tokens()) - 1, self.cache.block_table(r.rid)) for r in reqs]
        logits = self.model.decode(batch, self.cache.pool)
        return [logits[i] for i in range(len(reqs))]

    def _sample(self, req: Request, logits: Any) -> int:
        self._fault(req, "sample")
        arr = logits.numpy().astype(np.float64).reshape(-1)
        for token_id, bias in req.logit_bias.items():
            arr[token_id] += bias  # an id outside the vocabulary raises IndexError here, as it would in a real engine
        return sample(arr, req.temperature, req.top_p, req.rng)

    # ---- token processor thread (FastDeploy: TokenProcessor) -------------------------------------
    def token_loop(self) -> None:
        """Outputs to the API server, and the heartbeat: this thread owns the send socket."""
        send(self._send, {"type": "ready", "device": self.cache.pool.device})
        last_beat = time.monotonic()
        while not self._stop.is_set():
            if time.monotonic() - last_beat >= HEARTBEAT_S:
                send(self._send, {"type": "heartbeat", "healthy": self.fatal is None, "reason": self.fatal})
                last_beat = time.monotonic()
            try:
                res = self._outputs.get(timeout=HEARTBEAT_S / 2)
            except queue.Empty:
                continue
            try:
                self._process(res)
            except Exception as exc:  # this request fails (its client hears of it); the loop goes on
                if res.error is not None or res.aborted:
                    log.exception("could not report the end of %r", res.req.rid)
                elif res.finish_reason:  # the scheduler has let go of it already: say so from here
                    try:
                        self._process(StepResult(res.req, error=exc))
                    except Exception:
                        log.exception("could not report the failure of %r", res.req.rid)
                else:
                    self._process_failed(res.req, exc)

    def _process_failed(self, req: Request, exc: BaseException) -> None:
        """A request whose output could not be processed: the scheduler drops it, then its client hears of it
        (in that order, so that the id is free when the client may reuse it)."""
        with self._lock:
            self._failed.append((req, exc))
            self._lock.notify()

    def _process(self, res: StepResult) -> None:
        req = res.req
        if res.aborted:
            if not send(self._send, {"type": "aborted", "request_id": req.rid}):
                log.error("the API server is not reading; it will free the id %r after its own deadline", req.rid)
            return
        if res.error is not None:
            fdt.record_error(req.rid, res.error)
            self._emit(req, finished=True, reason="error", error=f"{type(res.error).__name__}: {res.error}")
            return
        self._fault(req, "emit")
        if res.count == 1:
            fdt.trace_print(E.FIRST_TOKEN_GENERATED, req.rid, req.user)
            fdt.trace_print(E.DECODE_START, req.rid, req.user)
        if res.finish_reason:
            fdt.trace_print(E.INFERENCE_END, req.rid, req.user, output_tokens=res.count, finish_reasons=[res.finish_reason])
            self._emit(req, finished=True, reason=res.finish_reason, tokens=[res.token] if req.stream else None)
        elif req.stream:
            self._emit(req, finished=False, tokens=[res.token])

    def _emit(self, req: Request, finished: bool, reason: str | None = None, error: str | None = None,
              tokens: list[int] | None = None) -> None:
        msg: dict[str, Any] = {"request_id": req.rid, "finished": finished}
        if tokens is not None:
            msg["tokens"] = tokens
        if finished:
            fdt.trace_print(E.POSTPROCESSING_START, req.rid, req.user)
            msg.update(
                tokens=[t for t in (tokens if tokens is not None else req.output) if t != EOS_ID],
                finish_reason=reason,
                error=error,
                usage={"prompt_tokens": len(req.prompt), "completion_tokens": len(req.output), "cached_tokens": req.cached_tokens},
                trace_carrier=fdt.inject(req.rid),  # POSTPROCESSING travels back to the API server
            )
            fdt.finish_request(req.rid)
        if not send(self._send, msg):
            log.error("the API server is not reading; dropped the output of %r", req.rid)

    # ---- process ---------------------------------------------------------------------------------
    def run(self) -> int:
        """Run the threads until stop(); 1 when one of them died (the process should exit non-zero)."""
        self.threads = threads = [
            threading.Thread(target=self.insert_loop, name="insert_task", daemon=True),
            threading.Thread(target=self.schedule_loop, name="scheduler", daemon=True),
            threading.Thread(target=self.runner_loop, name="model_runner", daemon=True),
            threading.Thread(target=self.token_loop, name="token_processor", daemon=True),
        ]
        for t in threads:
            t.start()
        try:
            while not self._stop.wait(HEARTBEAT_S):
                dead = [t.name for t in threads if not t.is_alive()]
                if dead:
                    self.fatal = f"engine thread {dead[0]} died"
                    log.error("%s; the engine is unhealthy and exits", self.fatal)
                    time.sleep(3 * HEARTBEAT_S)  # the token processor, if alive, tells the API server why
                    return 1
            return 0
        finally:
            self._stop.set()
            for t in threads:  # a thread that lost its peer may never return: do not wait long for it then
                t.join(timeout=5 if self.fatal is None else 0.5)
            self._recv.close(0)
            self._send.close(0)
            self._ctx.term()

    def stop(self, *_: object) -> None:
        self._stop.set()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="minifd engine process")
    p.add_argument("--recv", required=True, help="ZMQ address the API server pushes requests to")
    p.add_argument("--send", required=True, help="ZMQ address outputs are pushed to")
    p.add_argument("--gpu-blocks", type=int, default=EngineConfig.gpu_blocks)
    p.add_argument("--cpu-blocks", type=int, default=EngineConfig.cpu_blocks)
    p.add_argument("--max-batch", type=int, default=EngineConfig.max_batch)
    p.add_argument("--dim", type=int, default=ModelConfig.dim)
    p.add_argument("--layers", type=int, default=ModelConfig.n_layers)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s engine %(levelname)s %(message)s")
    fdt.configure()
    cfg = EngineConfig(ModelConfig(dim=args.dim, n_layers=args.layers), args.gpu_blocks, args.cpu_blocks, args.max_batch)
    engine = Engine(cfg, args.recv, args.send)
    signal.signal(signal.SIGTERM, engine.stop)
    signal.signal(signal.SIGINT, engine.stop)
    signal.signal(signal.SIGUSR1, engine.stats.log)
    try:
        code = engine.run()
    finally:
        fdt.shutdown()
    sys.exit(code)


if __name__ == "__main__":
    # Run the importable module's main, so exception types read "minifd.engine.X", not "__main__.X".
    from minifd.engine import main as _main

    _main()
