"""ZMQ plumbing shared by the API server and the engine: JSON messages, polled so threads can stop."""

from __future__ import annotations

import logging
import threading
from typing import Any, Iterator, Literal, overload

import zmq

log = logging.getLogger("minifd.ipc")

#: How often the engine says it is alive, and how long the API server waits before it calls the
#: engine dead: the timeout is what bounds "noticed within 2 s".
HEARTBEAT_S = 0.2
HEARTBEAT_TIMEOUT_S = 1.0
#: Longest a send may block: a peer that stops reading must never freeze the sender.
SEND_TIMEOUT_MS = 1000


@overload
def messages(sock: zmq.Socket, stop: threading.Event, poll_ms: int = ..., idle: Literal[False] = ...) -> Iterator[dict[str, Any]]: ...
@overload
def messages(sock: zmq.Socket, stop: threading.Event, poll_ms: int = ..., *, idle: Literal[True]) -> Iterator[dict[str, Any] | None]: ...


def messages(sock: zmq.Socket, stop: threading.Event, poll_ms: int = 100,
             idle: bool = False) -> Iterator[dict[str, Any] | None]:
    """JSON objects from `sock` until `stop` is set (checked every `poll_ms`).

    With ``idle=True`` a poll that timed out yields None, so the caller can run its periodic checks.
    A frame that is not a JSON object is logged and skipped: one bad message must not end the loop.
    """
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    while not stop.is_set():
        if not poller.poll(poll_ms):
            if idle:
                yield None
            continue
        frame = sock.recv()
        try:
            msg = zmq.utils.jsonapi.loads(frame)
        except ValueError:
            log.error("dropped a message that is not JSON (%d bytes)", len(frame))
            continue
        if not isinstance(msg, dict):
            log.error("dropped a message that is not a JSON object (%s)", type(msg).__name__)
            continue
        yield msg


def send(sock: zmq.Socket, msg: dict[str, Any], block: bool = True) -> bool:
    """Send one JSON message; False (never a hang) when the peer cannot take it: within
    SEND_TIMEOUT_MS if `block`, at once otherwise.  The socket needs no options for this."""
    try:
        sock.send_json(msg, flags=0 if block else zmq.NOBLOCK)
        return True
    except zmq.Again:
        return False


def configure_sender(sock: zmq.Socket, immediate: bool) -> None:
    """Bounded sends: a send times out instead of blocking; `immediate` queues nothing for a peer
    that is not connected (so a dead engine is refused at once instead of piling up requests)."""
    sock.setsockopt(zmq.SNDTIMEO, SEND_TIMEOUT_MS)
    sock.setsockopt(zmq.SNDHWM, 10_000)
    sock.setsockopt(zmq.LINGER, 0)
    if immediate:
        sock.setsockopt(zmq.IMMEDIATE, 1)
