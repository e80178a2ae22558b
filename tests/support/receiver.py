"""Test support: a small real OTLP trace receiver (gRPC and HTTP/protobuf) on 127.0.0.1 that keeps spans in memory.

Used by the tests and the bench as the far end of a real export: the spans arrive over the wire,
encoded by the SDK's own OTLP exporters, and are decoded back from protobuf here.
"""

from __future__ import annotations

import gzip
import threading
import time
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from fastdeploy_otel.tools.spans import Span, count_spans, decode_request


class SpanStore:
    """Received spans, decoded into Span objects (fastdeploy_otel.tools.spans); with keep=False only counted (a cheap sink
    for load tests: the protobuf is still parsed, no Python object is built per span)."""

    def __init__(self, keep: bool = True) -> None:
        self._spans: list[Span] = []
        self._cond = threading.Condition()
        self.keep = keep
        self.requests = 0
        self.count = 0

    def add(self, req: trace_service_pb2.ExportTraceServiceRequest) -> None:
        spans = decode_request(req) if self.keep else []
        n = len(spans) if self.keep else count_spans(req)
        with self._cond:
            self.requests += 1
            self.count += n
            self._spans.extend(spans)
            self._cond.notify_all()

    def spans(self) -> list[Span]:
        with self._cond:
            return list(self._spans)

    def wait_for(self, predicate, timeout: float = 10.0) -> list[Span]:
        """Wait until predicate(spans) is true; returns the spans (raises TimeoutError otherwise)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self._spans):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"receiver has {len(self._spans)} spans; condition not met in {timeout}s")
                self._cond.wait(left)
            return list(self._spans)

    def wait_for_count(self, at_least: int, timeout: float = 10.0) -> int:
        """Wait until at least `at_least` spans arrived in all; returns the count."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.count < at_least and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
            return self.count

    def clear(self) -> None:
        with self._cond:
            self._spans.clear()
            self.count = 0


class Fault:
    """How the receiver misbehaves, for fault tests: set ``receiver.fault.mode`` at any time.

    ``ok``; ``unavailable`` (gRPC UNAVAILABLE / HTTP 503); ``exhausted`` (RESOURCE_EXHAUSTED / 429);
    ``slow`` (answer after ``delay_s``); ``hang`` (never answer until released or 60 s).
    """

    def __init__(self) -> None:
        self.mode = "ok"
        self.delay_s = 0.0
        self.calls = 0
        self.release = threading.Event()

    def apply(self) -> str:
        """Sleep as the mode says; returns the mode to answer with."""
        self.calls += 1
        mode = self.mode
        if mode == "slow":
            time.sleep(self.delay_s)
        elif mode == "hang":
            self.release.wait(60)
        return mode


class _Servicer(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, store: SpanStore, fault: Fault) -> None:
        self.store = store
        self.fault = fault

    def Export(self, request, context):  # noqa: N802 - gRPC method name
        mode = self.fault.apply()
        if mode == "unavailable":
            context.abort(grpc.StatusCode.UNAVAILABLE, "receiver: unavailable (fault test)")
        if mode == "exhausted":
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "receiver: exhausted (fault test)")
        self.store.add(request)
        return trace_service_pb2.ExportTraceServiceResponse()


class BlackHole:
    """A port that accepts TCP connections (the kernel does) and never answers: a hung collector."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        import socket

        self._sock = socket.socket()
        self._sock.bind((host, 0))
        self._sock.listen(64)
        self.port = self._sock.getsockname()[1]
        self.endpoint = f"http://{host}:{self.port}"

    def close(self) -> None:
        self._sock.close()


def refused_endpoint(host: str = "127.0.0.1") -> str:
    """An endpoint where nothing listens: connections are refused."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    return f"http://{host}:{port}"


class OtlpReceiver:
    """``with OtlpReceiver() as r:`` then export to ``r.grpc_endpoint`` or ``r.http_endpoint``."""

    def __init__(self, host: str = "127.0.0.1", keep: bool = True) -> None:
        self.store = SpanStore(keep)
        self.fault = Fault()
        self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Servicer(self.store, self.fault), self._grpc)
        self.grpc_port = self._grpc.add_insecure_port(f"{host}:0")
        store, fault = self.store, self.fault

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                mode = fault.apply()
                if mode in ("unavailable", "exhausted"):
                    self.send_response(503 if mode == "unavailable" else 429)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path != "/v1/traces":
                    self.send_response(404)
                    self.end_headers()
                    return
                req = trace_service_pb2.ExportTraceServiceRequest()
                req.ParseFromString(body)
                store.add(req)
                payload = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                return

        self._http = ThreadingHTTPServer((host, 0), Handler)
        self.http_port = self._http.server_address[1]
        self.grpc_endpoint = f"http://{host}:{self.grpc_port}"
        self.http_endpoint = f"http://{host}:{self.http_port}"
        self._http_thread = threading.Thread(target=self._http.serve_forever, name="otlp-http-receiver", daemon=True)

    def start(self) -> "OtlpReceiver":
        self._grpc.start()
        self._http_thread.start()
        return self

    def stop(self) -> None:
        self.fault.release.set()
        self._grpc.stop(grace=None)
        self._http.shutdown()
        self._http.server_close()

    def __enter__(self) -> "OtlpReceiver":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
