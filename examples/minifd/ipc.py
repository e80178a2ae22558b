"""ZMQ plumbing shared by the API server and the engine: JSON messages, polled so threads can stop."""

from __future__ import annotations

import threading
from typing import Any, Iterator

import zmq


def messages(sock: zmq.Socket, stop: threading.Event, poll_ms: int = 100) -> Iterator[dict[str, Any]]:
    """JSON messages from `sock` until `stop` is set (checked every `poll_ms`)."""
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    while not stop.is_set():
        if poller.poll(poll_ms):
            yield sock.recv_json()
