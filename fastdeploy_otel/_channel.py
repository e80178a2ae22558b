"""The export channel: a bounded queue and one thread between finished spans and one exporter.

It stands where the SDK's BatchSpanProcessor would, with what a serving process needs on top:
- ``on_end`` never blocks: a full queue drops the span and counts it, there and then;
- batches are bounded in bytes as well as in spans, and a span too big for a message is shrunk,
  so one huge attribute cannot get a whole batch rejected by the collector;
- ``force_flush`` and ``shutdown`` take a deadline and keep it, whatever the collector does;
  what is still queued at the deadline is counted as lost.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

from opentelemetry.sdk.trace import SpanProcessor
from opentelemetry.sdk.trace.export import SpanExportResult

from ._limits import shrink, span_size
from ._selflog import get_logger, name_os_thread, warn

logger = get_logger(__name__)

T = TypeVar("T")

THREAD_PREFIX = "fastdeploy-otel-export"
DEFAULT_MAX_BATCH_BYTES = 3 * 1024 * 1024  # under the 4 MiB a gRPC server accepts by default
_BACKLOG_BATCH_FACTOR = 4  # with a backlog, fewer and bigger batches


class ExportChannel(SpanProcessor, Generic[T]):
    """Queue `T`s (ReadableSpans by default) and export them in batches on a thread."""

    def __init__(
        self,
        exporter: Any,
        target: str,
        *,
        max_queue_size: int = 8192,
        schedule_delay_millis: float = 500,
        max_export_batch_size: int = 64,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
        size_of: Callable[[T], int] | None = span_size,  # type: ignore[assignment]
        shrink_to: Callable[[T, int], T] | None = shrink,  # type: ignore[assignment]
        export: Callable[[Sequence[T]], SpanExportResult] | None = None,
        **_ignored: Any,  # export_timeout_millis: each exporter's own timeout bounds an export, as in the SDK
    ) -> None:
        self.exporter = exporter
        self.target = target
        self._export_fn = export or exporter.export
        self._max_queue = max_queue_size
        self._delay = schedule_delay_millis / 1000
        self._batch = max_export_batch_size
        self._max_bytes = max_batch_bytes
        self._max_span_bytes = max_batch_bytes // 2
        self._size_of = size_of  # None: batches bounded in spans only
        self._shrink_to = shrink_to  # None: items are never over half a batch (the caller saw to it)
        self._queue: collections.deque[T] = collections.deque()
        lock = threading.Lock()
        self._wake = threading.Condition(lock)  # the thread waits here for work
        self._idle = threading.Condition(lock)  # flushers wait here for an empty queue
        self._flush_wanted = False
        self._closing = False
        self._stopped = False
        self._abandoned = False
        self._inflight = 0
        self._down = False
        # Counters: every span offered ends up in exactly one of them (or is still queued).
        self.dropped = 0  # queue full
        self.exported = 0
        self.failed = 0  # the exporter said no (collector down, refused, ...)
        self.lost = 0  # still queued or in flight when the shutdown deadline passed
        self.truncated = 0
        self._thread = threading.Thread(target=self._run, name=f"{THREAD_PREFIX}-{target}"[:60], daemon=True)
        self._thread.start()

    # ---- the calling side ---------------------------------------------------------------------------
    def on_start(self, span: Any, parent_context: Any = None) -> None:
        pass

    def on_end(self, span: T) -> None:  # type: ignore[override]
        """Queue one span; never blocks.  Called on the tracing worker thread."""
        q = self._queue
        if len(q) >= self._max_queue or self._closing:
            self.dropped += 1
            warn(
                logger, "export queue for %s is full (%d spans); dropping spans (counted)", self.target, self._max_queue
            )
            return
        q.append(span)
        if len(q) == self._batch:
            with self._wake:
                self._wake.notify()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Export everything queued now; False when the deadline passed first."""
        deadline = time.monotonic() + timeout_millis / 1000
        with self._wake:
            self._flush_wanted = True
            self._wake.notify()
            while (self._queue or self._inflight) and not self._abandoned and self._thread.is_alive():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def shutdown(self, timeout_millis: int = 5000) -> None:
        """Export what is queued within the deadline, then stop; what is left is counted in ``lost``."""
        self.begin_shutdown()
        self.finish_shutdown(time.monotonic() + timeout_millis / 1000)

    def begin_shutdown(self) -> None:
        with self._wake:
            self._closing = True
            self._wake.notify()

    def finish_shutdown(self, deadline: float) -> int:
        """Wait for the thread until `deadline`; whatever is left then is counted as lost."""
        if self._stopped:
            return 0
        self._stopped = True
        self._thread.join(max(0.0, deadline - time.monotonic()))
        lost = 0
        with self._wake:
            if self._thread.is_alive():
                lost = len(self._queue) + self._inflight
                self._queue.clear()
                self._abandoned = True
                self._idle.notify_all()
        self.lost += lost
        # Interrupt a retry back-off or a call in flight (the gRPC exporter closes its channel), without
        # waiting on an exporter that does not return.
        now = time.monotonic()
        run_with_deadline(self._shutdown_exporter, max(now + 0.05, min(deadline, now + 0.5)))
        return lost

    def _shutdown_exporter(self) -> None:
        try:
            if self.exporter is not None:
                self.exporter.shutdown()
        except Exception:
            logger.debug("exporter shutdown failed", exc_info=True)

    @property
    def queued(self) -> int:
        return len(self._queue)

    # ---- the export thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        name_os_thread("fdotel-export")
        while True:
            with self._wake:
                if not (self._closing or self._flush_wanted or len(self._queue) >= self._batch):
                    self._wake.wait(self._delay)
                urgent = self._closing or self._flush_wanted
                self._flush_wanted = False
                closing = self._closing
            while not self._abandoned:
                batch = self._take(urgent)
                if not batch:
                    break
                self._export(batch)
                if not urgent and len(self._queue) < self._batch:
                    break
            with self._wake:
                self._idle.notify_all()
                if (closing and not self._queue) or self._abandoned:
                    return

    def _take(self, urgent: bool) -> list[T]:
        """The next batch: up to the batch size in spans and the byte limit in size."""
        q = self._queue
        if urgent:  # flushing or stopping: as few exports as the byte limit allows (a slow collector
            count = len(q)  # answers a big batch about as fast as a small one)
        elif len(q) > 2 * self._batch:
            count = self._batch * _BACKLOG_BATCH_FACTOR  # behind: catch up in bigger batches
        else:
            count = self._batch
        batch: list[T] = []
        size = 0
        while q and len(batch) < count:
            item = q.popleft()
            size_of = self._size_of
            if size_of is not None:
                n = size_of(item)
                if n > self._max_span_bytes and self._shrink_to is not None:
                    item = self._shrink_to(item, self._max_span_bytes)
                    n = size_of(item)
                    self.truncated += 1
                    logger.warning(
                        "a span of about %d bytes was shrunk to fit an "
                        "export message (attribute values cut; marked fastdeploy.truncated)",
                        n,
                    )
                if batch and size + n > self._max_bytes:
                    q.appendleft(item)  # only this thread takes from the left
                    break
                size += n
            batch.append(item)
        with self._wake:
            self._inflight = len(batch)
        return batch

    def _export(self, batch: list[T]) -> None:
        try:
            result = self._export_fn(batch)
        except Exception:  # an exporter bug must not kill the export thread
            logger.warning(
                "exporter for %s raised; spans dropped",
                self.target,
                exc_info=True,
            )
            result = SpanExportResult.FAILURE
        with self._wake:
            self._inflight = 0
            if self._abandoned:
                return  # already counted as lost
            if result is SpanExportResult.SUCCESS:
                self.exported += len(batch)
                recovered, self._down = self._down, False
            else:
                self.failed += len(batch)
                recovered, went_down = False, not self._down
                self._down = True
        if result is SpanExportResult.SUCCESS:
            if recovered:
                logger.warning("OTLP export to %s recovered", self.target)
        elif went_down:
            logger.warning(
                "OTLP export to %s is failing; spans are dropped and counted, trace.log keeps every "
                "event (serving is not affected)",
                self.target,
            )


def run_with_deadline(fn: Callable[[], object], deadline: float) -> bool:
    """Call `fn` on a daemon thread and wait for it until `deadline` (a time.monotonic() value);
    False if it has not returned: a call that may never return cannot hold a deadline up."""
    t = threading.Thread(target=fn, name=f"{THREAD_PREFIX}-deadline", daemon=True)
    t.start()
    t.join(max(0.0, deadline - time.monotonic()))
    return not t.is_alive()
