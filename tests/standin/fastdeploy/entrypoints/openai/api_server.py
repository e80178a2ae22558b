"""The API server process: starts the engine process(es), then serves the requests in a JSON file.

    python -m fastdeploy.entrypoints.openai.api_server --requests IN.json --out OUT.json \
        [--launch spawn|subprocess] [--pd]

Each request is ``{"request_id", "prompt", "headers": {...}}``; a ``traceparent`` header is
extracted as FastDeploy's api_server does.  With --pd a prefill and a decode engine serve each
request, the prefill's carrier relayed to the decode instance.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import subprocess
import sys
import threading
from multiprocessing.connection import Listener

from opentelemetry import propagate

from fastdeploy.engine.common_engine import AUTHKEY, run_engine
from fastdeploy.entrypoints.engine_client import EngineClient
from fastdeploy.entrypoints.openai.serving_chat import OpenAIServingChat
from fastdeploy.metrics import trace as tracing

tracing.process_tracing_init()


class Engines:
    """One connection per engine; results routed by request id; PD relays prefilled tasks."""

    def __init__(self, launch: str, roles: list[str]) -> None:
        self.listener = Listener(("127.0.0.1", 0), authkey=AUTHKEY)
        self.procs = []
        self.conns = {}
        for role in roles:
            if launch == "spawn":
                proc = mp.get_context("spawn").Process(target=run_engine, args=(self.listener.address, role))
                proc.start()
            else:
                host, port = self.listener.address
                proc = subprocess.Popen([sys.executable, "-m", "fastdeploy.engine.common_engine",
                                         "--connect", f"{host}:{port}", "--role", role])
            self.procs.append(proc)
            self.conns[role] = self.listener.accept()
        self.results: dict[str, dict] = {}
        self.cond = threading.Condition()
        self.readers = [threading.Thread(target=self._read, args=(c,), daemon=True) for c in self.conns.values()]
        for t in self.readers:
            t.start()

    def send(self, task: dict) -> None:
        self.conns["prefill" if "prefill" in self.conns else "mixed"].send(task)

    def _read(self, conn) -> None:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                return
            if msg.get("prefilled"):  # PD: the decode instance continues what the prefill instance did
                self.conns["decode"].send({"request_id": msg["request_id"], "trace_carrier": msg["trace_carrier"],
                                           "prompt": "prefilled", "max_tokens": 4})
                continue
            with self.cond:
                self.results[msg["request_id"]] = msg
                self.cond.notify_all()

    def wait(self, request_id: str) -> dict:
        with self.cond:
            self.cond.wait_for(lambda: request_id in self.results, timeout=60)
            return self.results.pop(request_id)

    def close(self) -> None:
        for conn in self.conns.values():
            conn.send(None)
        for proc in self.procs:
            proc.join(30) if hasattr(proc, "join") else proc.wait(30)


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--requests", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--launch", choices=("spawn", "subprocess"), default="spawn")
    p.add_argument("--pd", action="store_true")
    args = p.parse_args(argv)
    with open(args.requests) as f:
        requests = json.load(f)
    engines = Engines(args.launch, ["prefill", "decode"] if args.pd else ["mixed"])
    serving = OpenAIServingChat(EngineClient(engines.send), engines.wait)
    out = []
    try:
        for request in requests:
            trace_context = propagate.extract(request.get("headers", {}))
            out.append(serving.create_chat_completion(request, trace_context))
    finally:
        engines.close()
    with open(args.out, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
