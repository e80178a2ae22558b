"""The API server: OpenAI-compatible FastAPI app, talking to the engine process over ZMQ.

PREPROCESSING starts here and ends in the engine; POSTPROCESSING starts in the engine and ends
here.  The FastAPI HTTP span is the parent of the request span, and every response carries the
trace id (``X-Trace-Id``) so a user can go straight from a response to the trace.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
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
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from pydantic import BaseModel, Field

import fastdeploy_otel as fdt
from fastdeploy_otel import LoggingEventName as E

from . import tokenizer
from .ipc import messages
from .model import ModelConfig

log = logging.getLogger("minifd.server")
MODEL_NAME = "minifd-tiny"
TRACE_ID_HEADER = "X-Trace-Id"


class BadRequest(ValueError):
    """A request we refuse with 400; recorded on its trace like any other error."""


class _Sampling(BaseModel):
    """The OpenAI fields both endpoints share."""

    model: str = MODEL_NAME
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
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
    """Pushes requests to the engine and routes its outputs to the waiting handlers."""

    def __init__(self, send_addr: str, recv_addr: str) -> None:
        self._ctx = zmq.Context()
        self._push = self._ctx.socket(zmq.PUSH)
        self._push.bind(send_addr)
        self._pull = self._ctx.socket(zmq.PULL)
        self._pull.bind(recv_addr)
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()
        self.ready = threading.Event()
        self.device = "unknown"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._route, name="engine_outputs", daemon=True)
        self._thread.start()

    def _route(self) -> None:
        for msg in messages(self._pull, self._stop):
            if msg.get("type") == "ready":
                self.device = msg.get("device", "unknown")
                self.ready.set()
                continue
            with self._lock:
                target = self._streams.get(msg["request_id"])
            if target is not None:
                loop, q = target
                loop.call_soon_threadsafe(q.put_nowait, msg)

    def in_flight(self, engine_rid: str) -> bool:
        with self._lock:
            return engine_rid in self._streams

    def submit(self, payload: dict[str, Any]) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue()
        with self._lock:
            self._streams[payload["request_id"]] = (asyncio.get_running_loop(), q)
        self._push.send_json(payload)
        return q

    def release(self, engine_rid: str, abort: bool) -> None:
        with self._lock:
            self._streams.pop(engine_rid, None)
        if abort:
            self._push.send_json({"type": "abort", "request_id": engine_rid})

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


def _error_body(message: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": None}}


def _trace_id_of(carrier: dict[str, str]) -> str | None:
    tp = carrier.get("traceparent", "")
    return tp.split("-")[1] if tp.count("-") == 3 else None


def create_app(client: EngineClient, model_cfg: ModelConfig) -> FastAPI:
    app = FastAPI(title="minifd", version="0.1")

    def begin(raw: Request, rid: str, user: str | None, operation: str, body: CompletionRequest | ChatCompletionRequest) -> None:
        with _caller_context(raw):
            fdt.trace_print(
                E.PREPROCESSING_START, rid, user, operation=operation, model=body.model,
                max_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p,
                stream=body.stream, prompt=getattr(body, "prompt", None) or [m.content for m in getattr(body, "messages", [])],
            )

    def validate(body: CompletionRequest | ChatCompletionRequest, prompt_tokens: list[int]) -> None:
        if body.model != MODEL_NAME:
            raise BadRequest(f"model {body.model!r} does not exist; this server serves {MODEL_NAME!r}")
        if not 0 <= body.temperature <= 2:
            raise BadRequest("temperature must be between 0 and 2")
        if not 0 < body.top_p <= 1:
            raise BadRequest("top_p must be in (0, 1]")
        if body.max_tokens < 1:
            raise BadRequest("max_tokens must be at least 1")
        if not prompt_tokens:
            raise BadRequest("the prompt is empty")
        if len(prompt_tokens) + body.max_tokens > model_cfg.max_context:
            raise BadRequest(
                f"this model's maximum context length is {model_cfg.max_context} tokens; the prompt has "
                f"{len(prompt_tokens)} and max_tokens is {body.max_tokens}"
            )
        for key in body.logit_bias or {}:
            if not key.lstrip("-").isdigit():
                raise BadRequest(f"logit_bias key {key!r} is not a token id")

    def reject(rid: str, exc: BaseException) -> JSONResponse:
        """400: the error is recorded on PREPROCESSING, which ends here since the engine never sees it."""
        fdt.record_error(rid, exc)
        fdt.trace_print(E.PREPROCESSING_END, rid)
        headers = {"X-Request-Id": rid, TRACE_ID_HEADER: _trace_id_of(fdt.inject(rid)) or ""}
        fdt.finish_request(rid)
        return JSONResponse(_error_body(str(exc)), status_code=400, headers=headers)

    async def handle(raw: Request, body: CompletionRequest | ChatCompletionRequest, operation: str) -> Any:
        prefix = "chatcmpl" if operation == "chat" else "cmpl"
        rid = raw.headers.get("x-request-id") or body.request_id or f"{prefix}-{uuid.uuid4()}"
        if client.in_flight(f"{rid}_0"):
            # Ids key the engine's state and the trace: two live requests must not share one.
            return JSONResponse(_error_body(f"request id {rid!r} is already in flight", "request_id"), status_code=409,
                                headers={"X-Request-Id": rid})
        user = body.user
        begin(raw, rid, user, operation, body)
        text = (
            body.prompt if isinstance(body, CompletionRequest)
            else "".join(f"{m.role}: {m.content}\n" for m in body.messages) + "assistant:"
        )
        prompt_tokens = tokenizer.encode(text)
        try:
            validate(body, prompt_tokens)
        except BadRequest as exc:
            return reject(rid, exc)
        carrier = fdt.inject(rid)  # PREPROCESSING is handed to the engine with the request
        headers = {"X-Request-Id": rid, TRACE_ID_HEADER: _trace_id_of(carrier) or ""}
        engine_rid = f"{rid}_0"  # FastDeploy's per-choice id
        q = client.submit({
            "request_id": engine_rid, "user": user, "prompt_tokens": prompt_tokens, "max_tokens": body.max_tokens,
            "temperature": body.temperature, "top_p": body.top_p, "stream": body.stream, "seed": body.seed,
            "logit_bias": body.logit_bias, "trace_carrier": carrier,
        })
        created = int(time.time())
        if body.stream:
            http_span = trace.get_current_span()
            return StreamingResponse(
                stream(rid, engine_rid, user, q, operation, created, http_span),
                media_type="text/event-stream", headers=headers,
            )
        try:
            final = await q.get()
        finally:
            client.release(engine_rid, abort=False)
        status, payload = finish(rid, user, final, operation, created, final.get("tokens", []))
        return JSONResponse(payload, status_code=status, headers=headers)

    def finish(rid: str, user: str | None, final: dict, operation: str, created: int, tokens: list[int]) -> tuple[int, dict]:
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
            return 500, {"error": {"message": error, "type": "server_error", "param": None, "code": None}}
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
            client.release(engine_rid, abort=not done)
            if not done:  # the client went away mid-stream
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
        ok = client.ready.is_set()
        return JSONResponse({"status": "ok" if ok else "starting", "device": client.device}, status_code=200 if ok else 503)

    @app.exception_handler(RequestValidationError)
    async def invalid(raw: Request, exc: RequestValidationError) -> JSONResponse:
        """A body that does not parse is still a request: it gets a trace with the error on it."""
        rid = raw.headers.get("x-request-id") or f"invalid-{uuid.uuid4()}"
        with _caller_context(raw):
            fdt.trace_print(E.PREPROCESSING_START, rid, None)
        errors = exc.errors()
        first = errors[0] if errors else {}
        message = f"{'.'.join(str(p) for p in first.get('loc', ()))}: {first.get('msg', 'invalid request')}"
        return reject(rid, BadRequest(message))

    return app


def instrument(app: FastAPI) -> None:
    """HTTP server spans (parents of the request spans), without /health, /metrics or per-chunk spans."""
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    provider = fdt.get_tracer_provider()
    if provider is None:
        return
    FastAPIInstrumentor.instrument_app(
        app, tracer_provider=provider, excluded_urls="health,metrics", exclude_spans=["receive", "send"],
    )


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
