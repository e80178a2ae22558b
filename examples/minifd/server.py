"""The API server: OpenAI-compatible FastAPI app, talking to the engine process over ZMQ.

PREPROCESSING starts here and ends in the engine; POSTPROCESSING starts in the engine and ends
here.  The FastAPI HTTP span is the parent of the request span, and every response carries the
trace id (``X-Trace-Id``) so a user can go straight from a response to the trace.

Reliability (docs/RELIABILITY.md): every field is checked here, so nothing the engine cannot
handle reaches it; the engine's heartbeat tells this process within HEARTBEAT_TIMEOUT_S that it
died, and then every in-flight request ends with an error and new ones get 503 at once; sends to
the engine never block the event loop.
"""

from __future__ import annotations

import argparse
import os
import asyncio
import contextlib
import json
import logging
import math
import re
import signal
import threading
import time
import uuid
from typing import Any, AsyncIterator, Iterator, Literal

import uvicorn
import zmq
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from pydantic import BaseModel, Field

import fastdeploy_otel as fdt
from fastdeploy_otel import LoggingEventName as E

from . import tokenizer
from .ipc import HEARTBEAT_TIMEOUT_S, configure_sender, messages, send
from .model import ModelConfig

log = logging.getLogger("minifd.server")
MODEL_NAME = "minifd-tiny"
TRACE_ID_HEADER = "X-Trace-Id"
#: A client's request id is used as is only when it matches this (ASCII, header- and log-safe);
#: any other is replaced by a generated one (docs/RELIABILITY.md says why not sanitised).
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,128}")
#: Where the rejected client id is kept, escaped to ASCII, on the PREPROCESSING span.
CLIENT_ID_ATTRIBUTE = "client_request_id"
MAX_USER_CHARS = 256
MAX_SEED = 2**63 - 1
MIN_TEMPERATURE = 1e-5  # below this (but not 0) softmax(logits / T) overflows to NaN
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for a bias value
SUBMIT_WAIT_S = 1.0  # how long a request may wait for the engine's queue before it gets 503
ABORTED_HOLD_S = 30.0  # an aborted id stays taken until the engine acknowledges it, at most this long


class BadRequest(ValueError):
    """A request we refuse with 400; recorded on its trace like any other error."""

    status = 400
    type = "invalid_request_error"
    code: str | None = None

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ModelNotFound(BadRequest):
    """404, as OpenAI and vLLM answer an unknown model (the openai client raises NotFoundError)."""

    status = 404
    code = "model_not_found"


class EngineUnavailable(RuntimeError):
    """The engine is dead, unhealthy or not taking requests: 503, and the request's trace is an ERROR."""

    status = 503
    type = "server_error"
    code = "engine_unavailable"
    param = None


def safe_text(value: object, limit: int = 256) -> str:
    """`value` as printable ASCII (backslash escapes), at most `limit` characters: always encodable
    in a header, a log line, a JSON body or a span, whatever the client sent (control characters,
    lone surrogates, any script)."""
    text = value if isinstance(value, str) else repr(value)
    out = text[:limit].encode("ascii", "backslashreplace").decode("ascii")
    out = "".join(c if c.isprintable() else repr(c)[1:-1] for c in out)
    return out + ("..." if len(text) > limit else "")


def encodable(text: str) -> bool:
    """False for a string holding a lone surrogate (JSON "\\ud800"): it cannot be UTF-8 encoded."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def request_id_of(candidate: str | None, prefix: str) -> tuple[str, str | None]:
    """(the id to use, the client's rejected id escaped for a span, or None).

    A client id outside REQUEST_ID_PATTERN is replaced, not sanitised: a sanitised id could collide
    with another client's id, and ids key the engine's state and the trace."""
    if candidate and REQUEST_ID_PATTERN.fullmatch(candidate):
        return candidate, None
    generated = f"{prefix}-{uuid.uuid4()}"
    return generated, (safe_text(candidate) if candidate else None)


class _Sampling(BaseModel):
    """The OpenAI fields both endpoints share (types here; ranges in `validate`, with the param named)."""

    model: str = MODEL_NAME
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stream: bool = False
    user: str | None = None
    request_id: str | None = None
    seed: int | None = None
    logit_bias: dict[str, float] | None = None


class CompletionRequest(_Sampling):
    prompt: str


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)


class EngineClient:
    """Pushes requests to the engine and routes its outputs to the waiting handlers.

    It also watches the engine: any message from it (a heartbeat every HEARTBEAT_S at least) proves
    it alive; silence for HEARTBEAT_TIMEOUT_S, or a heartbeat that says unhealthy, makes it
    unhealthy, and every waiting handler is then sent a final ``engine_failure`` message.
    """

    def __init__(self, send_addr: str, recv_addr: str, heartbeat_timeout_s: float = HEARTBEAT_TIMEOUT_S) -> None:
        self._ctx = zmq.Context()
        self._push = self._ctx.socket(zmq.PUSH)
        configure_sender(self._push, immediate=True)
        self._push.bind(send_addr)
        self._pull = self._ctx.socket(zmq.PULL)
        self._pull.setsockopt(zmq.LINGER, 0)
        self._pull.bind(recv_addr)
        # engine id -> (loop, queue) of the waiting handler
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        # Ids the engine was told to drop (or that failed while it was unhealthy), with when: taken
        # until it says it has let go ("aborted"), at most ABORTED_HOLD_S, so that a new request with
        # the same id cannot meet the old one's outputs, blocks or abort.
        self._aborted: dict[str, float] = {}
        self._next_expiry = 0.0
        self._lock = threading.Lock()  # the maps above, and the push socket (not thread-safe)
        self.ready = threading.Event()  # the engine has said hello at least once
        self.state: Literal["starting", "ok", "unhealthy"] = "starting"
        self.reason = "waiting for the engine to start"
        self.device = "unknown"
        self._timeout_s = heartbeat_timeout_s
        self._last_seen = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._route, name="engine_outputs", daemon=True)
        self._thread.start()

    @property
    def healthy(self) -> bool:
        return self.state == "ok"

    def _route(self) -> None:
        for msg in messages(self._pull, self._stop, idle=True):
            if msg is not None:
                self._last_seen = time.monotonic()
                self._on_message(msg)
            now = time.monotonic()
            if self._aborted and now >= self._next_expiry:  # bounded: unacknowledged ids go after ABORTED_HOLD_S
                self._next_expiry = now + 1.0
                with self._lock:
                    self._expire_aborted(now)
            if self.state == "ok" and time.monotonic() - self._last_seen > self._timeout_s:
                self._fail_all(f"no heartbeat from the engine for {self._timeout_s:g}s: it is dead or stuck")

    def _on_message(self, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        if kind in ("ready", "heartbeat"):
            if kind == "ready":
                self.device = str(msg.get("device", "unknown"))
                self.ready.set()
                with self._lock:  # a new engine process holds none of the old one's requests
                    self._aborted.clear()
            if msg.get("healthy", True):
                if self.ready.is_set() and self.state != "ok":
                    if self.state == "unhealthy":
                        log.warning("the engine is healthy again")
                    else:
                        log.info("the engine is ready (%s)", self.device)
                    self.state, self.reason = "ok", ""
            else:
                self._fail_all(f"the engine reports: {msg.get('reason') or 'unhealthy'}")
            return
        rid = msg.get("request_id")
        with self._lock:
            if kind == "aborted":
                self._aborted.pop(rid, None)  # type: ignore[arg-type]
                return
            target = self._streams.get(rid)  # type: ignore[arg-type]
        if target is not None:
            loop, q = target
            loop.call_soon_threadsafe(q.put_nowait, msg)

    def _fail_all(self, reason: str) -> None:
        """Unhealthy: every waiting handler gets a final message, so nothing waits for a dead engine."""
        with self._lock:  # with submit's registration: a request is either in the list or refused
            if self.state == "unhealthy":
                return
            self.state, self.reason = "unhealthy", reason
            targets = list(self._streams.items())
            now = time.monotonic()
            for rid, _ in targets:  # a stuck engine that recovers may still hold them: told to drop them
                self._aborted[rid] = now
                send(self._push, {"type": "abort", "request_id": rid}, block=False)
        log.error("engine unhealthy: %s; failing %d in-flight requests", reason, len(targets))
        for rid, (loop, q) in targets:
            with contextlib.suppress(RuntimeError):  # that handler's loop is closed: nobody waits
                loop.call_soon_threadsafe(q.put_nowait, {"request_id": rid, "finished": True, "engine_failure": reason})

    def in_flight(self, engine_rid: str) -> bool:
        with self._lock:
            if engine_rid in self._streams:
                return True
            since = self._aborted.get(engine_rid)
            if since is None:
                return False
            if time.monotonic() - since <= ABORTED_HOLD_S:
                return True
            self._expire_aborted(time.monotonic())
            return False

    def _expire_aborted(self, now: float) -> None:
        """Ids whose abort the engine never acknowledged (a lost message, a restarted engine) are free
        again after ABORTED_HOLD_S (caller holds the lock)."""
        expired = [rid for rid, since in self._aborted.items() if now - since > ABORTED_HOLD_S]
        for rid in expired:
            del self._aborted[rid]
        if expired:
            log.warning("the engine did not acknowledge dropping %d requests within %gs; their ids are free again",
                        len(expired), ABORTED_HOLD_S)

    async def submit(self, payload: dict[str, Any]) -> asyncio.Queue:
        """Queue the request for the engine without blocking the event loop: non-blocking sends, retried
        for up to SUBMIT_WAIT_S (a connection still being set up, a full queue); then EngineUnavailable."""
        q: asyncio.Queue = asyncio.Queue()
        rid = payload["request_id"]
        with self._lock:  # checked with the registration: _fail_all cannot miss it
            if not self.healthy:
                raise EngineUnavailable(f"the engine is unavailable: {self.reason}")
            self._streams[rid] = (asyncio.get_running_loop(), q)
        deadline = time.monotonic() + SUBMIT_WAIT_S
        while not self._send(payload):
            if not self.healthy or time.monotonic() > deadline:
                with self._lock:
                    self._streams.pop(rid, None)
                raise EngineUnavailable(f"the engine is not taking requests ({self.reason or 'its queue is full'})")
            await asyncio.sleep(0.01)
        return q

    def release(self, engine_rid: str, q: asyncio.Queue, abort: bool) -> bool:
        """The handler waiting on `q` is done; `abort`: the engine is told to drop the request.

        Only `q`'s own registration is released (the id may be another request's by now): False if
        there was none."""
        with self._lock:
            target = self._streams.get(engine_rid)
            if target is None or target[1] is not q:
                return False
            del self._streams[engine_rid]
            if abort:  # taken until the engine says it dropped it (a lost abort: ABORTED_HOLD_S)
                self._aborted[engine_rid] = time.monotonic()
                # Sent even to an engine thought unhealthy (a stuck one may recover); a dead one's
                # socket refuses at once.
                send(self._push, {"type": "abort", "request_id": engine_rid}, block=False)
        return True

    def _send(self, payload: dict[str, Any]) -> bool:
        with self._lock:
            return send(self._push, payload, block=False)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._push.close(0)
        self._pull.close(0)
        self._ctx.term()


@contextlib.contextmanager
def _caller_context(raw: Request) -> Iterator[None]:
    """The caller's W3C traceparent, when no HTTP server span carries it already (FD_TRACE=local:
    no OTLP, so no FastAPI instrumentation), so that trace.log continues the caller's trace too."""
    if trace.get_current_span().get_span_context().is_valid or "traceparent" not in raw.headers:
        yield
        return
    token = otel_context.attach(propagate.extract(raw.headers))
    try:
        yield
    finally:
        otel_context.detach(token)


def _error_body(exc: BaseException) -> dict[str, Any]:
    """OpenAI's error shape; the message is made ASCII-safe, since it may quote the client's input."""
    return {"error": {"message": safe_text(str(exc), 1000), "type": getattr(exc, "type", "server_error"),
                      "param": getattr(exc, "param", None), "code": getattr(exc, "code", None)}}


def _trace_id_of(carrier: dict[str, str]) -> str | None:
    tp = carrier.get("traceparent", "")
    return tp.split("-")[1] if tp.count("-") == 3 else None


def _finite(value: float, param: str, low: float, high: float) -> None:
    if not (math.isfinite(value) and low <= value <= high):
        raise BadRequest(f"{param} must be a number between {low:g} and {high:g}, got {safe_text(value)}", param)


def validate(body: CompletionRequest | ChatCompletionRequest, prompt_tokens: list[int], cfg: ModelConfig) -> None:
    """Everything the engine relies on, checked before it gets the request (BadRequest names the field)."""
    if body.model != MODEL_NAME:
        raise ModelNotFound(f"the model '{safe_text(body.model)}' does not exist; this server serves {MODEL_NAME!r}", "model")
    _finite(body.temperature, "temperature", 0.0, 2.0)
    if 0 < body.temperature < MIN_TEMPERATURE:
        raise BadRequest(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE:g}", "temperature")
    _finite(body.top_p, "top_p", 0.0, 1.0)
    if body.top_p == 0:
        raise BadRequest("top_p must be greater than 0", "top_p")
    if body.n != 1:
        raise BadRequest("only n=1 is supported", "n")
    if not 1 <= body.max_tokens <= cfg.max_context:
        raise BadRequest(f"max_tokens must be between 1 and {cfg.max_context}", "max_tokens")
    if body.seed is not None and not 0 <= body.seed <= MAX_SEED:
        raise BadRequest(f"seed must be between 0 and {MAX_SEED}", "seed")
    if body.user is not None and len(body.user) > MAX_USER_CHARS:
        raise BadRequest(f"user must be at most {MAX_USER_CHARS} characters", "user")
    for key, bias in (body.logit_bias or {}).items():
        if not (key.isascii() and key.isdigit() and int(key) < cfg.vocab_size):
            raise BadRequest(f"logit_bias key '{safe_text(key)}' is not a token id (0..{cfg.vocab_size - 1})", "logit_bias")
        _finite(bias, "logit_bias", -MAX_LOGIT_BIAS, MAX_LOGIT_BIAS)
    if not prompt_tokens:
        raise BadRequest("the prompt is empty", "prompt" if isinstance(body, CompletionRequest) else "messages")
    if len(prompt_tokens) + body.max_tokens > cfg.max_context:
        raise BadRequest(
            f"this model's maximum context length is {cfg.max_context} tokens; the prompt has "
            f"{len(prompt_tokens)} and max_tokens is {body.max_tokens}", "max_tokens",
        )


def unencodable_field(body: CompletionRequest | ChatCompletionRequest) -> str | None:
    """The first field holding a lone surrogate, or None: such text cannot be tokenized, logged or exported."""
    fields: list[tuple[str, str | None]] = [("model", body.model), ("user", body.user), ("request_id", body.request_id)]
    if isinstance(body, CompletionRequest):
        fields.append(("prompt", body.prompt))
    else:
        fields += [(f"messages.{i}.content", m.content) for i, m in enumerate(body.messages)]
    fields += [("logit_bias", key) for key in body.logit_bias or {}]
    return next((name for name, value in fields if value is not None and not encodable(value)), None)


def create_app(client: EngineClient, model_cfg: ModelConfig) -> FastAPI:
    app = FastAPI(title="minifd", version="0.1")

    def begin(raw: Request, rid: str, operation: str, body: CompletionRequest | ChatCompletionRequest | None,
              client_id: str | None, text_ok: bool = True) -> None:
        """PREPROCESSING_START; the client's text goes on the trace only when it can be encoded."""
        attrs: dict[str, Any] = {"operation": operation}
        if body is not None and text_ok:
            attrs.update(
                model=body.model, max_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p,
                stream=body.stream,
                prompt=getattr(body, "prompt", None) or [m.content for m in getattr(body, "messages", [])],
            )
        if client_id is not None:
            attrs[CLIENT_ID_ATTRIBUTE] = client_id
        user = body.user if body is not None and text_ok else None
        with _caller_context(raw):
            fdt.trace_print(E.PREPROCESSING_START, rid, user, **attrs)

    def reject(rid: str, exc: BadRequest | EngineUnavailable) -> JSONResponse:
        """4xx/503 before the engine saw the request: the error is recorded on PREPROCESSING, which ends here."""
        fdt.record_error(rid, exc)
        fdt.trace_print(E.PREPROCESSING_END, rid)
        headers = {"X-Request-Id": rid, TRACE_ID_HEADER: _trace_id_of(fdt.inject(rid)) or ""}
        fdt.finish_request(rid)
        return JSONResponse(_error_body(exc), status_code=exc.status, headers=headers)

    def fail(rid: str, exc: BaseException, status: int) -> dict[str, Any]:
        """The request failed after the engine took it (engine gone, or a bug here): ERROR trace, error body."""
        fdt.record_error(rid, exc)
        fdt.finish_request(rid)
        body = _error_body(exc)
        if status >= 500 and not isinstance(exc, EngineUnavailable):
            body["error"]["type"] = "server_error"
        return body

    async def handle(raw: Request, body: CompletionRequest | ChatCompletionRequest, operation: str) -> Any:
        prefix = "chatcmpl" if operation == "chat" else "cmpl"
        bad_field = unencodable_field(body)
        rid, client_id = request_id_of(raw.headers.get("x-request-id") or (body.request_id if bad_field != "request_id" else None), prefix)
        if client.in_flight(f"{rid}_0"):
            # Ids key the engine's state and the trace: two live requests must not share one.
            return JSONResponse(_error_body(BadRequest(f"request id {rid!r} is already in flight", "request_id")),
                                status_code=409, headers={"X-Request-Id": rid})
        begin(raw, rid, operation, body, client_id, text_ok=bad_field is None)
        if bad_field is not None:
            return reject(rid, BadRequest(f"{bad_field} is not valid Unicode text (a lone surrogate)", bad_field))
        text = (
            body.prompt if isinstance(body, CompletionRequest)
            else "".join(f"{m.role}: {m.content}\n" for m in body.messages) + "assistant:"
        )
        prompt_tokens = tokenizer.encode(text)
        try:
            validate(body, prompt_tokens, model_cfg)
            if not client.healthy:
                raise EngineUnavailable(f"the engine is unavailable: {client.reason}")
        except (BadRequest, EngineUnavailable) as exc:
            return reject(rid, exc)
        carrier = fdt.inject(rid)  # PREPROCESSING is handed to the engine with the request
        headers = {"X-Request-Id": rid, TRACE_ID_HEADER: _trace_id_of(carrier) or ""}
        engine_rid = f"{rid}_0"  # FastDeploy's per-choice id
        try:
            q = await client.submit({
                "request_id": engine_rid, "user": body.user, "prompt_tokens": prompt_tokens,
                "max_tokens": body.max_tokens, "temperature": body.temperature, "top_p": body.top_p,
                "stream": body.stream, "seed": body.seed, "logit_bias": body.logit_bias, "trace_carrier": carrier,
            })
        except EngineUnavailable as exc:
            return JSONResponse(fail(rid, exc, 503), status_code=503, headers=headers)
        created = int(time.time())
        if body.stream:
            http_span = trace.get_current_span()
            return StreamingResponse(
                stream(rid, engine_rid, body.user, q, operation, created, http_span),
                media_type="text/event-stream", headers=headers, background=BackgroundTask(never_started, rid, engine_rid, q),
            )
        done = False
        try:
            final = await q.get()
            done = True
        finally:
            client.release(engine_rid, q, abort=not done)
            if not done:  # the client went away (the handler was cancelled)
                fdt.abort_request(rid, "client disconnected")
        status, payload = finish(rid, body.user, final, operation, created, final.get("tokens", []))
        return JSONResponse(payload, status_code=status, headers=headers)

    def finish(rid: str, user: str | None, final: dict, operation: str, created: int, tokens: list[int]) -> tuple[int, dict]:
        """The engine's last word on a request, or the watchdog's when the engine died."""
        if final.get("engine_failure"):
            return 503, fail(rid, EngineUnavailable(f"the engine failed while serving this request: {final['engine_failure']}"), 503)
        try:
            return _finish_ok(rid, user, final, operation, created, tokens)
        except Exception as exc:  # a bug in postprocessing fails this request alone
            log.exception("postprocessing failed for %s", safe_text(rid))
            return 500, fail(rid, exc, 500)

    def _finish_ok(rid: str, user: str | None, final: dict, operation: str, created: int, tokens: list[int]) -> tuple[int, dict]:
        fdt.extract(rid, final.get("trace_carrier"))
        usage = final.get("usage", {})
        error = final.get("error")
        text = tokenizer.decode(tokens)
        fdt.trace_print(
            E.POSTPROCESSING_END, rid, user, input_tokens=usage.get("prompt_tokens"),
            output_tokens=usage.get("completion_tokens"),
            cached_tokens=usage.get("cached_tokens"), finish_reasons=[final.get("finish_reason") or "error"],
            response_id=rid, completion=text,
        )
        fdt.finish_request(rid)
        if error:
            return 500, {"error": {"message": safe_text(error, 1000), "type": "server_error", "param": None, "code": None}}
        usage_out = {
            "prompt_tokens": usage.get("prompt_tokens", 0), "completion_tokens": usage.get("completion_tokens", 0),
            "total_tokens": usage.get("prompt_tokens", 0) + usage.get("completion_tokens", 0),
            "prompt_tokens_details": {"cached_tokens": usage.get("cached_tokens", 0)},
        }
        return 200, {
            "id": rid, "object": "chat.completion" if operation == "chat" else "text_completion", "created": created,
            "model": MODEL_NAME, "usage": usage_out, "choices": [_choice(operation, text, final.get("finish_reason"))],
        }

    def _choice(operation: str, text: str, reason: str | None) -> dict[str, Any]:
        if operation == "chat":
            return {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
        return {"index": 0, "text": text, "finish_reason": reason}

    async def stream(rid: str, engine_rid: str, user: str | None, q: asyncio.Queue, operation: str, created: int,
                     http_span: trace.Span) -> AsyncIterator[bytes]:
        chunks = 0
        done = False
        generated: list[int] = []
        try:
            while True:
                msg = await q.get()
                if msg["finished"]:
                    done = True
                    status, payload = finish(rid, user, msg, operation, created, generated + msg.get("tokens", []))
                    http_span.add_event("last_chunk", {"total_chunks": chunks + 1})
                    if status != 200:
                        yield f"data: {json.dumps(payload)}\n\n".encode()
                    else:
                        delta = tokenizer.decode(msg.get("tokens", []))
                        yield _sse(rid, operation, created, delta, payload["choices"][0]["finish_reason"])
                    yield b"data: [DONE]\n\n"
                    return
                generated.extend(msg.get("tokens", []))
                if chunks == 0:
                    http_span.add_event("first_chunk")
                chunks += 1
                yield _sse(rid, operation, created, tokenizer.decode(msg.get("tokens", [])), None)
        finally:
            client.release(engine_rid, q, abort=not done)
            if not done:  # the client went away mid-stream
                fdt.abort_request(rid, "client disconnected")

    def never_started(rid: str, engine_rid: str, q: asyncio.Queue) -> None:
        """After the response: a client that left before the stream's first byte never ran its `finally`;
        without this its routing entry, and the engine's work on it, would outlive it.  It runs in a worker
        thread, maybe after the client has sent its next request with the same id: `q` says which is ours."""
        if client.release(engine_rid, q, abort=True):
            fdt.abort_request(rid, "client disconnected")

    def _sse(rid: str, operation: str, created: int, delta: str, reason: str | None) -> bytes:
        if operation == "chat":
            choice = {"index": 0, "delta": {"content": delta}, "finish_reason": reason}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": delta, "finish_reason": reason}
            obj = "text_completion"
        return f"data: {json.dumps({'id': rid, 'object': obj, 'created': created, 'model': MODEL_NAME, 'choices': [choice]})}\n\n".encode()

    @app.post("/v1/completions")
    async def completions(raw: Request, body: CompletionRequest) -> Any:
        return await handle(raw, body, "text_completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(raw: Request, body: ChatCompletionRequest) -> Any:
        return await handle(raw, body, "chat")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": MODEL_NAME, "object": "model", "owned_by": "minifd",
                                             "max_model_len": model_cfg.max_context}]}

    @app.get("/health")
    async def health() -> JSONResponse:
        """200 only while the engine is alive and healthy; otherwise 503 and why."""
        body: dict[str, Any] = {"status": client.state, "device": client.device}
        if not client.healthy:
            body["reason"] = client.reason
        return JSONResponse(body, status_code=200 if client.healthy else 503)

    @app.exception_handler(RequestValidationError)
    async def invalid(raw: Request, exc: RequestValidationError) -> JSONResponse:
        """A body that does not parse is still a request: it gets a trace with the error on it."""
        operation = "chat" if raw.url.path.endswith("/chat/completions") else "text_completion"
        rid, client_id = request_id_of(raw.headers.get("x-request-id"), "invalid")
        begin(raw, rid, operation, None, client_id)
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = safe_text(".".join(loc)) if loc else None  # a dict key in `loc` is the client's text
        message = f"{param or 'body'}: {safe_text(first.get('msg', 'invalid request'))}"
        return reject(rid, BadRequest(message, param))

    return app


def instrument(app: FastAPI) -> None:
    """HTTP server spans (parents of the request spans), without /health, /metrics or per-chunk spans.

    ``MINIFD_HTTP_SPANS``: ``lean`` (default, ``http_spans.ServerSpans``), ``contrib``
    (``FastAPIInstrumentor``, about 0.2-0.5 ms more CPU per request) or ``off``.
    """
    provider = fdt.get_tracer_provider()
    choice = os.environ.get("MINIFD_HTTP_SPANS", "lean").strip().lower()
    if provider is None or choice == "off":
        return
    if choice == "contrib":
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

        FastAPIInstrumentor.instrument_app(
            app, tracer_provider=provider, excluded_urls="health,metrics", exclude_spans=["receive", "send"],
        )
        return
    if choice != "lean":
        logging.getLogger(__name__).error("MINIFD_HTTP_SPANS=%r is not one of lean, contrib, off; using lean", choice)
    from .http_spans import ServerSpans

    app.add_middleware(ServerSpans, excluded_paths=("/health", "/metrics"))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="minifd API server")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--engine-recv", required=True, help="ZMQ address to push requests to (the engine's --recv)")
    p.add_argument("--engine-send", required=True, help="ZMQ address to pull outputs from (the engine's --send)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s api %(levelname)s %(message)s")
    fdt.configure()
    client = EngineClient(args.engine_recv, args.engine_send)
    app = create_app(client, ModelConfig())
    instrument(app)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", lifespan="off"))
    signal.signal(signal.SIGTERM, lambda *_: setattr(server, "should_exit", True))
    try:
        server.run()
    finally:
        client.close()
        fdt.shutdown()


if __name__ == "__main__":
    # Run the importable module's main, so exception types read "minifd.server.X", not "__main__.X".
    from minifd.server import main as _main

    _main()
