"""OTLP export from a side process: spans leave the serving process as pickled tuples, and a child
process builds, encodes and sends them.

Why: OTLP protobuf encoding and the gRPC call are the biggest CPU cost tracing has, and in a serving
process that CPU is spent holding the GIL the model loop and the event loop need.  Pickling a tuple
of plain values is done in C, at a fraction of the cost.

- Parent: ``ProcessChannel``, a SpanProcessor whose ``on_end``/``offer`` only append to a bounded
  queue.  The tracing worker calls ``pump()`` at every flush: it pickles what is pending into one
  frame and writes it to the child's stdin without ever blocking (a full pipe keeps frames in a
  bounded outbox; past the bound they are dropped and counted).
- Child (``python -m fastdeploy_otel._export_process``): rebuilds ReadableSpans and exports them
  through an ``ExportChannel``, with the byte limits, shrinking and deadlines that has.  It answers
  status, flush and close requests with its counters on a second pipe.
- A child that dies is restarted (with back-off); the spans it held are counted as lost.  The
  child exits when its stdin closes, so it never outlives its parent by more than its deadline.
- With the trace.log mirror on, the child also formats and writes its lines (``offer_lines``), off the
  serving process's GIL too.  The parent keeps each batch until the child says it is written; the
  batches of a child that dies, or writes nothing for _LINES_STALE_S, are written by the parent, and
  while no child is up the parent writes.  So every line is written at least once (twice only when
  a child dies between writing a batch and saying so, or stalls and then recovers).
"""

from __future__ import annotations

import collections
import fcntl
import logging
import marshal
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export import SpanExportResult

from ._limits import Limits, shrink_parts
from ._otlp_proto import EncodedBatch, EncodedSpan, Encoder, install
from ._selflog import get_logger, warn
from ._wire import Rebuilder, WireSpan, wire_of_span, within_limits

logger = get_logger(__name__)

_HEADER = struct.Struct("!I")
_PIPE_SIZE = 1 << 20  # F_SETPIPE_SZ: room for about a second of spans while the child is busy
_F_SETPIPE_SZ = 1031
_MAX_OUTBOX_BYTES = 64 << 20  # what waits for a slow or restarting child, beyond the pipe
_STATUS_EVERY_S = 1.0  # how often the child's counters are asked for (stats() freshness)
_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0)  # between restarts of a child that keeps dying
_MAX_HELD_LOGS = 100
_EXIT_WAIT_S = 2.0  # for a child that has answered close to exit (it writes nothing more)
_REPLY_MARGIN_S = 0.25  # the child stops this long before the parent's deadline, so its last counters arrive
_LINES_STALE_S = 3.0  # a child that has not written a batch of lines for this long: the parent writes them
_COUNTERS = ("exported", "failed", "dropped", "lost", "truncated", "lines_written", "lines_failed")
_ENDS = ("exported", "failed", "dropped", "lost")  # where a span the child took ends up


class _Frame(NamedTuple):
    data: bytes
    spans: int
    lines: int = 0  # the batch number of the mirror lines it carries (0: none)


class _Lines(NamedTuple):
    """A batch of mirror lines handed to the child, kept until it says they are written."""

    number: int
    sent: float  # time.monotonic()
    records: list


def _frame(message: Any) -> bytes:
    """A message as it crosses the pipe: its length, its codec, its body.  Spans and mirror lines are
    builtin values, which marshal writes in about half the time pickle takes (in the serving process);
    pickle takes what marshal cannot (the settings in hello, a value of a subclass)."""
    try:
        body = b"m" + marshal.dumps(message)
    except ValueError:  # "unmarshallable object"
        body = b"p" + pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(body)) + body


_MARSHAL = ord("m")


def _unframe(body: bytes | memoryview) -> Any:
    """The message of a frame's body (after its length)."""
    data = memoryview(body)[1:]
    return marshal.loads(data) if body[0] == _MARSHAL else pickle.loads(data)


_live: weakref.WeakSet[ProcessChannel] = weakref.WeakSet()


def _close_after_fork() -> None:
    """A forked child must not keep the export process's pipes open (its EOF is how it stops)."""
    for channel in list(_live):
        channel._forget()


os.register_at_fork(after_in_child=_close_after_fork)


class ProcessChannel(SpanProcessor):
    """The parent's end: a bounded queue, pumped into the export process by the tracing worker.

    Counters as ExportChannel's: every span offered ends up in exactly one of exported, failed,
    dropped or lost (or is still on its way: ``queued``).
    """

    def __init__(
        self,
        settings: Any,
        resource: Any,
        options: dict[str, Any],
        target: str,
        write_lines: Callable[[list], None] | None = None,
    ) -> None:
        """`write_lines`: the parent's own mirror writer; given, the child writes the mirror lines too."""
        self.target = target
        # The absolute directory: a child started after the application changed directory writes the same file.
        log_dir = os.path.abspath(settings.log_dir)
        mirror = (log_dir, settings.backup_count, os.getpid()) if write_lines is not None else None
        self._hello = ("hello", settings, dict(resource.attributes), resource.schema_url, options, mirror)
        self._write_here = write_lines
        self._unwritten: collections.deque[_Lines] = collections.deque()  # handed to the child, not yet written
        self._lines_number = 0
        self._lines_acked = 0  # the last batch the child has written
        self._lines_here_until = 0  # after a take-back: lines are written here until the child has caught up
        self._answered = False  # the child has answered once: it is up (starting takes ~0.5 s) and takes lines
        self._max_queue: int = options.get("max_queue_size", 8192)
        self._pending: collections.deque[WireSpan | ReadableSpan] = collections.deque()
        self._outbox: collections.deque[_Frame] = collections.deque()
        self._outbox_bytes = 0
        self._head_sent = 0  # bytes of the outbox's first frame already written
        self._lock = threading.Lock()  # one pumper at a time
        self._proc: subprocess.Popen | None = None
        self._data_fd = -1
        self._reply_fd = -1
        self._replies = bytearray()
        self._seq = 0
        self._acked = 0
        self._unfinished = 0  # the last flush request the child answered as not finished
        self._status_asked = 0.0
        self._restarts = 0
        self._next_start = 0.0
        self._closing = False
        self._sent_to_child = 0
        self._child: dict[str, int] = dict.fromkeys(_COUNTERS, 0)
        self._base: dict[str, int] = dict.fromkeys(_COUNTERS, 0)  # from children that have exited
        self._dropped_here = 0
        self._lost_here = 0
        _live.add(self)
        with self._lock:
            self._start()

    # ---- the calling side: never blocks ----------------------------------------------------------
    def on_start(self, span: Any, parent_context: Any = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        """An SDK span ended (any thread): queued as it is, turned into a WireSpan at the next pump."""
        self.offer(span)

    def offer(self, span: WireSpan | ReadableSpan) -> None:
        if len(self._pending) >= self._max_queue or self._closing:
            self._dropped_here += 1
            warn(
                logger, "export queue for %s is full (%d spans); dropping spans (counted)", self.target, self._max_queue
            )
            return
        self._pending.append(span)

    # ---- counters ----------------------------------------------------------------------------------
    def _total(self, key: str) -> int:
        return self._base[key] + self._child[key]

    @property
    def exported(self) -> int:
        return self._total("exported")

    @property
    def failed(self) -> int:
        return self._total("failed")

    @property
    def dropped(self) -> int:
        return self._dropped_here + self._total("dropped")

    @property
    def lost(self) -> int:
        return self._lost_here + self._total("lost")

    @property
    def truncated(self) -> int:
        return self._total("truncated")

    @property
    def lines_written(self) -> int:
        return self._total("lines_written")

    @property
    def lines_failed(self) -> int:
        return self._total("lines_failed")

    @property
    def queued(self) -> int:
        in_child = self._sent_to_child - sum(self._child[k] for k in _ENDS)
        return len(self._pending) + sum(f.spans for f in self._outbox) + max(0, in_child)

    # ---- mirror lines ----------------------------------------------------------------------------------
    def offer_lines(self, records: list) -> bool:
        """Hand a batch of mirror lines to the child to format and write; False: the caller writes
        them (no child up, one that stalls or is catching up, a flush pumping on another thread)."""
        if self._write_here is None or self._closing or not self._lock.acquire(blocking=False):
            return False
        try:
            if self._proc is None or self._outbox_bytes > _MAX_OUTBOX_BYTES // 2:
                return False
            self._check_lines(time.monotonic())  # may find the child gone
            if self._proc is None or not self._answered or self._lines_acked < self._lines_here_until:
                return False
            self._lines_number += 1
            frame = _Frame(_frame(("lines", self._lines_number, list(map(tuple, records)))), 0, self._lines_number)
            # Ahead of the span frames waiting (a child behind on encoding must not hold trace.log
            # back), behind a frame begun and the lines before it.
            outbox = self._outbox  # [a frame begun] [lines frames] [span and control frames]
            at = 1 if self._head_sent else 0
            while at < len(outbox) and outbox[at].lines:
                at += 1
            outbox.insert(at, frame)
            self._outbox_bytes += len(frame.data)
            self._unwritten.append(_Lines(self._lines_number, time.monotonic(), records))
            return True
        except Exception:  # never: the records hold plain values; but the caller can still write them
            logger.warning("mirror lines could not be handed to the export process; written here", exc_info=True)
            return False
        finally:
            self._lock.release()

    def _check_lines(self, now: float) -> None:
        """Take back the lines of a child that has written none for _LINES_STALE_S (stopped, swapped
        out, starved of CPU): trace.log must not wait on it."""
        if not self._unwritten or now - self._unwritten[0].sent <= _LINES_STALE_S:
            return
        self._read_replies()  # its answers may only be unread
        if self._unwritten and now - self._unwritten[0].sent > _LINES_STALE_S:
            warn(
                logger, "the export process has not written trace.log lines for %gs; writing them here", _LINES_STALE_S
            )
            self._take_back_lines()

    def _lines_written_up_to(self, number: int) -> None:
        self._lines_acked = max(self._lines_acked, number)
        q = self._unwritten
        while q and q[0].number <= number:
            q.popleft()

    def _take_back_lines(self) -> None:
        """Write here what the child has not written (it died, stalls, or a deadline passed).  Batches
        not yet sent leave the outbox; one a live child has (or is being sent) it may still write."""
        started = self._head_sent > 0 and self._proc is not None
        kept = [f for i, f in enumerate(self._outbox) if not f.lines or (i == 0 and started)]
        unsent = {f.lines for f in self._outbox if f.lines} - {f.lines for f in kept}
        if len(kept) != len(self._outbox):  # (a head frame kept after a stall goes when the child does)
            self._outbox = collections.deque(kept)
            self._outbox_bytes = sum(len(f.data) for f in kept)
        if not self._unwritten:
            return
        batches = list(self._unwritten)
        self._unwritten.clear()
        if self._proc is not None:  # the child may still write what it has: wait for that before handing more
            self._lines_here_until = max((b.number for b in batches if b.number not in unsent), default=0)
        for batch in batches:
            try:
                self._write_here(batch.records)  # type: ignore[misc]
            except Exception:
                logger.warning("mirror lines taken back from the export process could not be written", exc_info=True)

    # ---- the worker's side ----------------------------------------------------------------------------
    def pump(self) -> None:
        """Send what is pending (called by the tracing worker at every flush); never blocks.  Skipped
        while a flush or a shutdown is pumping on another thread."""
        if not self._lock.acquire(blocking=False):
            return
        try:
            self._pump()
        finally:
            self._lock.release()

    def _pump(self) -> None:
        # Every syscall here lets go of the GIL and costs the serving threads a hand-off to get it
        # back: the child is looked at (answers read, liveness) once a second; a write that fails
        # with EPIPE says sooner that it has gone.
        now = time.monotonic()
        if self._proc is not None and now - self._status_asked > _STATUS_EVERY_S:
            self._read_replies()
            self._check_child()
            if self._proc is not None and self._acked == self._seq:
                self._status_asked = now
                self._send_control("status")
        if self._proc is None and not self._closing and now >= self._next_start:
            self._start()
        self._check_lines(now)
        self._frame_pending()
        self._write()

    def _frame_pending(self) -> None:
        q = self._pending
        n = len(q)
        if not n:
            return
        # Plain tuples cross the pipe: a NamedTuple pickles through its Python __getnewargs__, about
        # 2 us a span against 0.3 for the tuple it is.
        batch: list[tuple] = []
        for _ in range(n):
            span = q.popleft()
            try:
                batch.append(tuple(span if isinstance(span, WireSpan) else wire_of_span(span)))
            except Exception:
                self._dropped_here += 1
                logger.warning("a span that could not be read was dropped (counted)", exc_info=True)
        try:
            frame = _Frame(_frame(("spans", batch)), len(batch))
        except Exception:  # an attribute value that cannot be pickled: send the others
            frame = self._frame_each(batch)
        self._queue_frame(frame)

    def _frame_each(self, batch: list[tuple]) -> _Frame:
        good = []
        for span in batch:
            try:
                pickle.dumps(span, protocol=pickle.HIGHEST_PROTOCOL)
                good.append(span)
            except Exception:
                self._dropped_here += 1
                logger.warning("a span with a value that cannot be sent to the export process was dropped (counted)")
        return _Frame(_frame(("spans", good)) if good else b"", len(good))

    def _queue_frame(self, frame: _Frame) -> None:
        if not frame.data:
            return
        if self._outbox_bytes + len(frame.data) > _MAX_OUTBOX_BYTES and frame.spans:
            self._dropped_here += frame.spans
            logger.warning(
                "the export process for %s is not keeping up (%d MiB waiting); dropping spans (counted)",
                self.target,
                self._outbox_bytes >> 20,
            )
            return
        self._outbox.append(frame)
        self._outbox_bytes += len(frame.data)

    def _send_control(self, kind: str, *args: Any) -> int:
        self._seq += 1
        self._queue_frame(_Frame(_frame((kind, self._seq, *args)), 0))
        return self._seq

    def _write(self) -> None:
        """Write as much of the outbox as the pipe takes now."""
        while self._outbox and self._proc is not None:
            frame = self._outbox[0]
            try:
                n = os.write(self._data_fd, memoryview(frame.data)[self._head_sent :])
            except BlockingIOError:
                return
            except OSError:  # EPIPE: the child has gone
                self._child_gone()
                return
            self._head_sent += n
            if self._head_sent == len(frame.data):
                self._outbox.popleft()
                self._outbox_bytes -= len(frame.data)
                self._head_sent = 0
                self._sent_to_child += frame.spans

    def _read_replies(self) -> None:
        """Take the child's answers (counters, acknowledged request numbers) without waiting."""
        if self._proc is not None and not self._drain_replies():
            self._child_gone()
            return
        buf = self._replies
        while len(buf) >= 4:
            (size,) = _HEADER.unpack_from(buf)
            if len(buf) < 4 + size:
                break
            try:
                _, seq, counters, logs, done = _unframe(bytes(buf[4 : 4 + size]))
                self._answered = True
                self._acked = max(self._acked, seq)
                if not done:  # a flush the child could not finish in time
                    self._unfinished = seq
                self._child.update({k: int(counters.get(k, 0)) for k in _COUNTERS})
                self._lines_written_up_to(int(counters.get("lines_acked", 0)))
                for level, message in logs:  # the child's own log lines, said here where the app looks
                    logger.log(level, message.replace("%", "%%"))
            except Exception:
                logger.warning("an unreadable answer from the export process was ignored")
            del buf[: 4 + size]

    def _drain_replies(self) -> bool:
        """Read what the child has written; False at EOF (the child has gone)."""
        while True:
            try:
                chunk = os.read(self._reply_fd, 65536)
            except BlockingIOError:
                return True
            except OSError:
                return False
            if not chunk:
                return False
            self._replies += chunk

    # ---- the child process ----------------------------------------------------------------------------
    def _start(self) -> None:
        """Start the export process; the hello frame goes first, then any frames still waiting."""
        data_r = data_w = reply_r = reply_w = -1
        try:
            data_r, data_w = os.pipe()
            reply_r, reply_w = os.pipe()
            env = dict(os.environ, FD_TRACE="off")  # the child itself is not traced
            proc = subprocess.Popen(
                [sys.executable, "-m", __name__, str(reply_w)],
                stdin=data_r,
                pass_fds=(reply_w,),
                env=env,
                close_fds=True,
            )
        except Exception as exc:
            for fd in (data_r, data_w, reply_r, reply_w):
                if fd >= 0:
                    os.close(fd)
            self._schedule_restart()
            logger.error(
                "the export process could not be started (%s); spans wait (bounded) and it is retried "
                "in %gs; FD_TRACE_EXPORT_PROCESS=false exports from this process instead; trace.log keeps every event",
                exc,
                self._next_start - time.monotonic(),
            )
            return
        os.close(data_r)
        os.close(reply_w)
        for fd in (data_w, reply_r):
            os.set_blocking(fd, False)
        for fd in (data_w, reply_r):  # the child answers each batch of lines: room for a second of them
            try:
                fcntl.fcntl(fd, _F_SETPIPE_SZ, _PIPE_SIZE)
            except OSError:
                pass  # a smaller pipe only means more frames wait in the outbox
        self._proc, self._data_fd, self._reply_fd = proc, data_w, reply_r
        self._replies.clear()
        self._child = dict.fromkeys(_COUNTERS, 0)
        self._lines_acked = 0
        self._answered = False
        self._sent_to_child = 0
        self._head_sent = 0  # a frame cut short by the last child's death is sent whole again
        self._acked = self._seq
        hello = _frame(self._hello)
        self._outbox.appendleft(_Frame(hello, 0))
        self._outbox_bytes += len(hello)
        self._status_asked = time.monotonic()
        self._send_control("status")  # its answer says it is up: lines are written here until then

    def _schedule_restart(self) -> None:
        self._next_start = time.monotonic() + _BACKOFF_S[min(self._restarts, len(_BACKOFF_S) - 1)]
        self._restarts += 1

    def _check_child(self) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            self._child_gone()

    def _child_gone(self) -> None:
        """The child died: what it held and had not accounted for is lost; a new one starts later.
        (A frame it was sent only in part stays at the head of the outbox and goes whole to the next.)"""
        proc = self._proc
        if proc is None:
            return
        self._proc = None
        if self._reply_fd >= 0:
            self._drain_replies()  # its last answers, up to EOF
        self._read_replies()
        held = max(0, self._sent_to_child - sum(self._child[k] for k in _ENDS))
        for key in _COUNTERS:
            self._base[key] += self._child[key]
        self._child = dict.fromkeys(_COUNTERS, 0)
        self._lost_here += held
        self._close_fds()
        self._lines_here_until = 0
        self._take_back_lines()
        try:
            rc = proc.wait(timeout=0.2)  # it closed its pipes: it is exiting
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        if self._closing:
            return
        self._schedule_restart()
        logger.error(
            "the export process for %s exited (status %s); %d spans it held are lost (counted); "
            "restarting in %gs, trace.log keeps every event",
            self.target,
            rc,
            held,
            self._next_start - time.monotonic(),
        )

    def _close_fds(self) -> None:
        for fd in (self._data_fd, self._reply_fd):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._data_fd = self._reply_fd = -1

    def _forget(self) -> None:
        self._unwritten.clear()  # the process that forked writes them
        self._close_fds()
        self._proc = None
        self._closing = True

    # ---- deadlines --------------------------------------------------------------------------------------
    def _wait_for(self, seq: int, deadline: float) -> bool:
        """Pump until the child has answered request `seq` or `deadline` passes."""
        while self._acked < seq:
            left = deadline - time.monotonic()
            if left <= 0 or self._proc is None:
                return False
            want_write = [self._data_fd] if self._outbox else []
            try:
                select.select([self._reply_fd], want_write, [], min(left, 0.05))
            except (OSError, ValueError):
                return False
            self._read_replies()
            self._check_child()
            self._frame_pending()  # spans that end meanwhile keep flowing (the worker's pump is skipped)
            self._write()
        return True

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Everything offered so far exported (or counted), within the deadline."""
        deadline = time.monotonic() + timeout_millis / 1000
        with self._lock:
            self._pump()
            if self._proc is None:
                return not self._pending and not self._outbox
            seq = self._send_control("flush", max(0.0, deadline - time.monotonic() - _REPLY_MARGIN_S))
            done = self._wait_for(seq, deadline) and self._unfinished != seq
            self._read_replies()  # "written" answers not read yet (a deadline already past reads none)
            self._take_back_lines()  # the child writes lines before it flushes: these it did not reach
            return done

    def shutdown(self, timeout_millis: int = 5000) -> None:
        self.begin_shutdown()
        self.finish_shutdown(time.monotonic() + timeout_millis / 1000)

    def begin_shutdown(self) -> None:
        pass  # the child is told in finish_shutdown, once everything pending is framed

    def finish_shutdown(self, deadline: float) -> int:
        """Send what is left and let the child export it until `deadline`; count the rest as lost."""
        before = self.lost
        with self._lock:
            self._frame_pending()
            self._closing = True
            if self._proc is not None:
                seq = self._send_control("close", max(0.0, deadline - time.monotonic() - _REPLY_MARGIN_S))
                self._wait_for(seq, deadline)
                proc = self._proc
                if proc is not None:  # it answered: it is exiting (in 2 s even under a profiler)
                    try:
                        proc.wait(timeout=max(0.01, min(_EXIT_WAIT_S, deadline - time.monotonic())))
                    except subprocess.TimeoutExpired:
                        proc.kill()
                    self._child_gone()
            self._take_back_lines()
            unsent = sum(f.spans for f in self._outbox) + len(self._pending)
            self._outbox.clear()
            self._pending.clear()
            self._lost_here += unsent
            self._close_fds()
        return self.lost - before


# ---- the export process --------------------------------------------------------------------------------
class _Encoding:
    """WireSpans straight to OTLP protobuf bytes (``_otlp_proto``), one span at a time as they
    arrive; a span over half an export message is shrunk first, as ExportChannel would."""

    def __init__(self, exporter: Any, attributes: dict[str, Any], schema_url: str | None, limits: Limits,
                 max_batch_bytes: int) -> None:  # fmt: skip
        self.encoder = Encoder(attributes, schema_url)
        self.limits = limits
        self.max_span_bytes = max_batch_bytes // 2
        self.truncated = 0
        self.exporter = exporter
        self.channel_options = {"export": self.export, "size_of": _encoded_size, "shrink_to": None}

    def __call__(self, w: WireSpan) -> EncodedSpan:
        w = within_limits(w, self.limits)
        encoded = self.encoder.span(w)
        if len(encoded.data) > self.max_span_bytes:
            attributes, events = shrink_parts(w.name, w.attributes, w.events, self.max_span_bytes)
            encoded = self.encoder.span(w._replace(attributes=attributes, events=events))
            self.truncated += 1
            logger.warning(
                "a span of about %d bytes was shrunk to fit an export message (attribute values cut; "
                "marked fastdeploy.truncated)",
                len(encoded.data),
            )
        return encoded

    def export(self, spans: Sequence[EncodedSpan]) -> SpanExportResult:
        batch = EncodedBatch(spans)
        batch.payload = self.encoder.request(spans)
        return self.exporter.export(batch)


def _encoded_size(span: EncodedSpan) -> int:
    return len(span.data) + 4  # and its field key and length


class _Forward(logging.Handler):
    """Holds the export process's log lines for its next answer: the parent logs them, through the
    application's logging, where an operator looks (bounded; what overflows is counted)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.held: collections.deque[tuple[int, str]] = collections.deque()
        self.overflow = 0

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.held) >= _MAX_HELD_LOGS:
            self.overflow += 1
            return
        self.held.append((record.levelno, self.format(record)))

    def take(self) -> list[tuple[int, str]]:
        out = [self.held.popleft() for _ in range(len(self.held))]
        if self.overflow:
            out.append((logging.WARNING, f"{self.overflow} more log lines of the export process were dropped"))
            self.overflow = 0
        return out


def _read_message(stream: Any) -> Any:
    header = stream.read(4)
    if len(header) < 4:
        return None
    (size,) = _HEADER.unpack(header)
    body = stream.read(size)
    if len(body) < size:
        return None
    return _unframe(body)


def serve(stream: Any, reply_fd: int) -> int:
    """The export process's loop: spans in, counters out; returns when told to close or at EOF."""
    from ._channel import ExportChannel
    from ._export import _install_quiet, make_exporter, make_resource_from

    forward = _Forward()
    package = logging.getLogger(__package__)
    package.addHandler(forward)
    package.propagate = False
    hello = _read_message(stream)
    if not hello or hello[0] != "hello":
        return 2
    _, settings, attributes, schema_url, options, mirror_spec = hello
    mirror = None
    if mirror_spec is not None:
        from ._records import MirrorRecord
        from .mirror import TraceLogMirror

        log_dir, backup_count, pid = mirror_spec
        mirror = TraceLogMirror(log_dir, backup_count, pid=pid)  # its lines name the serving process
    lines_acked = 0
    exporter, target = make_exporter(settings)
    _install_quiet()
    limits = Limits(
        settings.attribute_count_limit,
        settings.event_count_limit,
        settings.event_attribute_count_limit,
        settings.attribute_length_limit,
    )
    prepare: Rebuilder | _Encoding
    if settings.export_encoder == "fastdeploy" and install(exporter):
        prepare = _Encoding(exporter, attributes, schema_url, limits, options["max_batch_bytes"])
    else:
        prepare = Rebuilder(make_resource_from(attributes, schema_url), limits)
    channel: ExportChannel = ExportChannel(exporter, target, **{**options, **prepare.channel_options})

    def reply(seq: int, done: bool = True) -> None:
        counters = {
            "exported": channel.exported,
            "failed": channel.failed,
            "dropped": channel.dropped,
            "lost": channel.lost,
            "truncated": channel.truncated + getattr(prepare, "truncated", 0),
            "lines_written": mirror.lines_written if mirror is not None else 0,
            "lines_failed": mirror.lines_failed if mirror is not None else 0,
            "lines_acked": lines_acked,
        }
        try:
            os.write(reply_fd, _frame(("ack", seq, counters, forward.take(), done)))
        except OSError:  # the parent has gone: what was sent is still exported, at EOF below
            pass

    try:
        while True:
            message = _read_message(stream)
            if message is None:  # the parent has gone: export what we hold, within the usual deadline
                channel.begin_shutdown()
                channel.finish_shutdown(time.monotonic() + settings.shutdown_timeout_s)
                return 0
            kind = message[0]
            if kind == "lines":
                if mirror is not None:
                    mirror.write([MirrorRecord._make(r) for r in message[2]])
                lines_acked = message[1]
                reply(0)  # at once: what a child that dies has written is known, not written twice
            elif kind == "spans":
                for w in message[1]:
                    try:
                        channel.on_end(prepare(WireSpan._make(w)))
                    except Exception:
                        channel.failed += 1
                        logger.warning("a span could not be rebuilt for export; dropped (counted)", exc_info=True)
            elif kind == "flush":
                reply(message[1], channel.force_flush(int(message[2] * 1000)))
            elif kind == "status":
                reply(message[1])
            elif kind == "close":
                channel.begin_shutdown()
                channel.finish_shutdown(time.monotonic() + message[2])
                reply(message[1])
                return 0
    finally:  # no line comes after the parent has gone or said close
        if mirror is not None:
            mirror.close()


def main() -> int:
    # The parent decides when this process stops (by closing its stdin): a Ctrl-C or a SIGTERM sent
    # to the whole process group must not lose the spans it holds.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    reply_fd = int(sys.argv[1])
    return serve(os.fdopen(0, "rb", buffering=1 << 20), reply_fd)


if __name__ == "__main__":
    sys.exit(main())
