"""A real OTLP receiver (``tests.support.receiver.OtlpReceiver``) in a child process.

The benchmark measures the CPU time of its own process; decoding the spans on the far end of the
export must not be counted, so the receiver runs in a spawned child and answers over a pipe.
"""

from __future__ import annotations

import multiprocessing as mp
from typing import Any


def _serve(conn) -> None:  # runs in the child
    from tests.support.receiver import OtlpReceiver

    with OtlpReceiver(keep=False) as r:  # count only: a collector's decoding is not serving cost
        conn.send((r.grpc_endpoint, r.http_endpoint))
        while True:
            try:
                msg = conn.recv()
            except EOFError:
                return
            op = msg[0]
            if op == "wait":  # ("wait", at_least, timeout_s) -> spans received so far
                _, n, timeout = msg
                conn.send(r.store.wait_for_count(n, timeout))
            elif op == "count":
                conn.send(r.store.count)
            elif op == "clear":
                r.store.clear()
                conn.send(0)
            elif op == "stop":
                conn.send(0)
                return


class ReceiverProcess:
    """``with ReceiverProcess() as rx:`` then export to ``rx.grpc_endpoint``; ``rx.wait(n)``, ``rx.clear()``."""

    def __init__(self) -> None:
        ctx = mp.get_context("spawn")  # never fork a process that runs gRPC threads
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child,), name="bench-otlp-receiver", daemon=True)
        self._proc.start()
        child.close()
        if not self._conn.poll(60):
            self._proc.kill()
            raise RuntimeError("the OTLP receiver process did not start within 60 s")
        self.grpc_endpoint, self.http_endpoint = self._conn.recv()

    def _ask(self, *msg: Any) -> int:
        self._conn.send(msg)
        return self._conn.recv()

    def wait(self, at_least: int, timeout: float = 60.0) -> int:
        """Block until the receiver holds at least `at_least` spans; returns how many it holds."""
        return self._ask("wait", at_least, timeout)

    def count(self) -> int:
        return self._ask("count")

    def clear(self) -> None:
        self._ask("clear")

    def stop(self) -> None:
        try:
            self._ask("stop")
        except (OSError, EOFError):
            pass
        self._proc.join(10)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)
        self._conn.close()

    def __enter__(self) -> "ReceiverProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
