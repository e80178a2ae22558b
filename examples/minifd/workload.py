"""The demo workload: requests chosen so that every traced path really happens.

Shared prefixes (CACHE_HIT), unique prompts (CACHE_MISS), enough concurrent long generations to
run out of KV blocks (swap-out, PREEMPTED) and then the shared prefix again (CACHE_SWAP_IN),
streaming and non-streaming, one bad request, one engine-side error (a fault injected at sampling:
the stack must run with ``fault_injection=True``, since validation keeps every real bad value out of
the engine) and one abandoned stream.
"""

from __future__ import annotations

import concurrent.futures as cf
import time
from dataclasses import dataclass
from typing import Any, Callable

import httpx

SYSTEM = "You are a terse assistant for the FastDeploy tracing demo. Answer in one line. "  # 5 full blocks


@dataclass
class Outcome:
    label: str
    status: int
    trace_id: str
    cached_tokens: int
    elapsed_ms: float
    note: str = ""


def _send(client: httpx.Client, label: str, body: dict[str, Any], chat: bool = False, abandon_after: int = 0) -> Outcome:
    path = "/v1/chat/completions" if chat else "/v1/completions"
    t0 = time.perf_counter()
    if body.get("stream"):
        with client.stream("POST", path, json=body) as resp:
            chunks = 0
            last = ""
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    chunks += 1
                    last = line
                    if abandon_after and chunks >= abandon_after:
                        break  # hang up mid-stream: the server aborts the request
            note = f"{chunks} chunks" + (", abandoned" if abandon_after else "")
            cached = 0
            status, trace_id = resp.status_code, resp.headers.get("x-trace-id", "")
            del last
    else:
        resp = client.post(path, json=body)
        status, trace_id = resp.status_code, resp.headers.get("x-trace-id", "")
        data = resp.json()
        cached = data.get("usage", {}).get("prompt_tokens_details", {}).get("cached_tokens", 0) if status == 200 else 0
        note = data["error"]["message"][:60] if status != 200 else ""
    return Outcome(label, status, trace_id, cached, (time.perf_counter() - t0) * 1000, note)


def _chat(question: str, stream: bool, max_tokens: int = 12) -> dict[str, Any]:
    return {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
            "max_tokens": max_tokens, "temperature": 0.7, "seed": 7, "stream": stream, "user": "demo-user"}


def run(base_url: str, report: Callable[[Outcome, int, int], None], concurrency: int = 4) -> list[Outcome]:
    """Send the whole workload; `report(outcome, done, total)` is called as each request ends."""
    phases: list[list[tuple[str, dict[str, Any], dict[str, Any]]]] = [
        # 1. a shared system prompt: the first misses, the next ones hit the GPU tier
        [("shared prefix", _chat("What is a span?", stream=False), {"chat": True})],
        [("shared prefix", _chat("What is a trace?", stream=True), {"chat": True}),
         ("shared prefix", _chat("What is a span event?", stream=False), {"chat": True})],
        # 2. unique prompts with long generations, all at once: misses, block pressure, swap-out, preemption
        # (logit_bias pushes EOS away so that each one really generates all its tokens)
        [(f"unique #{i}", {"prompt": f"{i}: a unique prompt, so it misses; " + "tell me a long story " * 3,
                           "max_tokens": 96, "temperature": 0, "stream": i % 2 == 0, "user": "demo-user",
                           "logit_bias": {"256": -100}}, {}) for i in range(8)],
        # 3. the shared prompt again: its blocks were swapped out to the CPU tier, so they swap back in
        [("shared prefix again", _chat("What is a trace id?", stream=False), {"chat": True})],
        [("shared prefix again", _chat("What is a span id?", stream=True), {"chat": True})],
        # 4. what goes wrong
        [("bad request (prompt too long)", {"prompt": "x" * 400, "max_tokens": 8}, {}),
         ("engine error (injected fault)", {"prompt": "sample me", "max_tokens": 8, "user": "fault:sample"}, {}),
         ("abandoned stream", {"prompt": "a stream the client walks away from", "max_tokens": 150, "temperature": 0,
                               "stream": True}, {"abandon_after": 3})],
    ]
    total = sum(len(p) for p in phases)
    outcomes: list[Outcome] = []
    with httpx.Client(base_url=base_url, timeout=120) as client, cf.ThreadPoolExecutor(concurrency) as pool:
        for phase in phases:
            futures = [pool.submit(_send, client, label, body, **kw) for label, body, kw in phase]
            for fut in cf.as_completed(futures):
                outcomes.append(fut.result())
                report(outcomes[-1], len(outcomes), total)
    return outcomes
