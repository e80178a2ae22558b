"""Lines of several files in timestamp order, tolerating a little disorder within each.

Lines (``TraceLine``) are ordered by their ``[timestamp=]`` in epoch ms (never asctime, which is local
time), then by the event's place in the lifecycle (``RANK``), which orders lines of the same
millisecond from different files (two processes' lines of one ms would otherwise come in file
order: the API server's POSTPROCESSING_END before the engine's INFERENCE_END).

Each file is nearly sorted already: FastDeploy stamps a line as it writes it, and our mirror writes
each process's lines in batches, so processes that share one file interleave by up to a flush
interval.  Files are merged with a heap, then a window re-sorts what is out of order by less than
the window: memory is bounded by the lines of one window, not by the input.  Lines travel in lists
(a read's worth, then a window's), so that no step costs a Python call per line.
"""

from __future__ import annotations

import bisect
import heapq
from collections import deque
from collections.abc import Iterable, Iterator
from itertools import chain, islice
from operator import itemgetter, le

from ..events import LoggingEventName
from ..span_plan import PLAN, STAGE_ORDER, Action
from .tracelog import TraceLine

__all__ = ["RANK", "HeldLines", "merge", "reorder"]

_ts = itemgetter(0)  # TraceLine.ts_ms
_CHUNK = 4096

_PHASE = {Action.OPEN: 0, Action.POINT: 1, Action.CLOSE: 2, Action.POINT_CLOSE: 2}
# Lifecycle order of the events: by stage, and within a stage what opens, decorates, then closes.
RANK: dict[LoggingEventName, int] = {
    event: STAGE_ORDER.index(step.stage) * 3 + _PHASE[step.action] for event, step in PLAN.items()
}


def _time_rank(line: TraceLine) -> tuple[int, int]:
    return line.ts_ms, RANK[line.event]


def merge(streams: list[Iterator[list[TraceLine]]]) -> Iterator[list[TraceLine]]:
    """The lines of several streams (of lists of lines), each nearly sorted by time, merged by time."""
    if len(streams) == 1:
        return streams[0]
    merged = heapq.merge(*(chain.from_iterable(s) for s in streams), key=_time_rank)
    return iter(lambda: list(islice(merged, _CHUNK)), [])


def _in_order(lines: list[TraceLine], since: int) -> bool:
    """Whether `lines` are in time order, none before `since` (all in C: no Python call per line)."""
    times = list(map(_ts, lines))
    return times[0] >= since and all(map(le, times, islice(times, 1, None)))


def reorder(chunks: Iterable[list[TraceLine]], window_ms: int) -> Iterator[list[TraceLine]]:
    """The lines of `chunks` sorted by time, where each is at most `window_ms` late (later ones keep
    their place), in lists.  Lines of the same millisecond keep their order: within a file it is the
    order they happened in."""
    buf: list[TraceLine] = []
    high = 0  # the latest time seen
    disordered = False
    due = _CHUNK
    for lines in chunks:
        if not lines:
            continue
        if not disordered and not _in_order(lines, high):
            disordered = True
        high = max(high, max(map(_ts, lines))) if disordered else lines[-1][0]
        buf += lines
        if len(buf) >= due:
            if disordered:  # sorting costs as much as the rest of the replay: only when needed
                buf.sort(key=_ts)  # stable: lines of one ms stay as the merge (or their file) put them
                disordered = False
            cut = bisect.bisect_right(buf, high - window_ms, key=_ts)
            if cut:
                yield buf[:cut]
                del buf[:cut]
            due = len(buf) + _CHUNK  # a sort per CHUNK lines, however many the window holds
    buf.sort(key=_ts)
    if buf:
        yield buf


class HeldLines:
    """Following live files: each line is held `delay_s` after it was read, then released in time
    order, so a line another process wrote a moment earlier (but flushed later) still comes first."""

    def __init__(self, delay_s: float) -> None:
        self._delay = delay_s
        self._items: list[TraceLine] = []
        self._reads: deque[tuple[float, int]] = deque()  # (when read, highest timestamp read by then)
        self._high = 0

    def __len__(self) -> int:
        return len(self._items)

    def add(self, items: list[TraceLine], now: float) -> None:
        if not items:
            return
        self._items.extend(items)
        self._high = max(self._high, max(i[0] for i in items))
        self._reads.append((now, self._high))

    def release(self, now: float, everything: bool = False) -> list[TraceLine]:
        """The lines due by `now` (all of them with `everything`), in time order."""
        reads = self._reads
        mark = -1
        while reads and (everything or reads[0][0] <= now - self._delay):
            mark = reads.popleft()[1]
        if mark < 0 or not self._items:
            return []
        self._items.sort(key=_time_rank)
        cut = len(self._items) if everything else bisect.bisect_right(self._items, mark, key=_ts)
        out, self._items = self._items[:cut], self._items[cut:]
        return out
