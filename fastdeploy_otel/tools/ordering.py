"""Lines of several files in timestamp order, tolerating a little disorder within each.

Items are tuples ``(timestamp, rank, ...)``: the ``[timestamp=]`` in epoch ms (never asctime, which
is local time), then the event's place in the lifecycle (``RANK``), which orders lines of the same
millisecond (two processes' lines of one ms would otherwise come in file order: the API server's
POSTPROCESSING_END before the engine's INFERENCE_END).

Each file is nearly sorted already: FastDeploy stamps a line as it writes it, and our mirror writes
each process's lines in batches, so processes that share one file interleave by up to a flush
interval.  Files are merged with a heap, then a window re-sorts what is out of order by less than
the window: memory is bounded by the lines of one window, not by the input.
"""

from __future__ import annotations

import bisect
import heapq
from collections import deque
from collections.abc import Iterable, Iterator
from operator import itemgetter
from typing import Any

from ..events import LoggingEventName
from ..span_plan import PLAN, STAGE_ORDER, Action

__all__ = ["RANK", "HeldLines", "merge", "reorder"]

Item = tuple[Any, ...]  # (ts_ms, rank, ...)
_ts = itemgetter(0)
_key = itemgetter(0, 1)
_CHUNK = 4096

_PHASE = {Action.OPEN: 0, Action.POINT: 1, Action.CLOSE: 2, Action.POINT_CLOSE: 2}
# Lifecycle order of the events: by stage, and within a stage what opens, decorates, then closes.
RANK: dict[LoggingEventName, int] = {
    event: STAGE_ORDER.index(step.stage) * 3 + _PHASE[step.action] for event, step in PLAN.items()
}


def merge(streams: list[Iterator[Item]]) -> Iterator[Item]:
    """The items of several streams, each nearly sorted by time, merged by time."""
    if len(streams) == 1:
        return streams[0]
    return heapq.merge(*streams, key=_key)


def reorder(items: Iterable[Item], window_ms: int) -> Iterator[Item]:
    """`items` sorted by time, where each is at most `window_ms` late (later ones keep their place).
    Lines of the same millisecond keep their order: within a file it is the order they happened in."""
    buf: list[Item] = []
    high = 0
    disordered = False
    due = _CHUNK
    for item in items:
        ts = item[0]
        if ts > high:
            high = ts
        elif ts < high:
            disordered = True
        buf.append(item)
        if len(buf) >= due:
            if disordered:  # sorting costs as much as the rest of the replay: only when needed
                buf.sort(key=_ts)  # stable: lines of one ms stay as the merge (or their file) put them
                disordered = False
            cut = bisect.bisect_right(buf, high - window_ms, key=_ts)
            if cut:
                yield from buf[:cut]
                del buf[:cut]
            due = len(buf) + _CHUNK  # a sort per CHUNK lines, however many the window holds
    buf.sort(key=_ts)
    yield from buf


class HeldLines:
    """Following live files: each line is held `delay_s` after it was read, then released in time
    order, so a line another process wrote a moment earlier (but flushed later) still comes first."""

    def __init__(self, delay_s: float) -> None:
        self._delay = delay_s
        self._items: list[Item] = []
        self._reads: deque[tuple[float, int]] = deque()  # (when read, highest timestamp read by then)
        self._high = 0

    def __len__(self) -> int:
        return len(self._items)

    def add(self, items: list[Item], now: float) -> None:
        if not items:
            return
        self._items.extend(items)
        self._high = max(self._high, max(i[0] for i in items))
        self._reads.append((now, self._high))

    def release(self, now: float, everything: bool = False) -> list[Item]:
        """The lines due by `now` (all of them with `everything`), in time order."""
        reads = self._reads
        mark = -1
        while reads and (everything or reads[0][0] <= now - self._delay):
            mark = reads.popleft()[1]
        if mark < 0 or not self._items:
            return []
        self._items.sort(key=_key)
        cut = len(self._items) if everything else bisect.bisect_right(self._items, mark, key=_ts)
        out, self._items = self._items[:cut], self._items[cut:]
        return out
