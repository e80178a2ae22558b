"""``fastdeploy-otel replay``: trace.log files in, spans out (OTLP, JSON lines, a timeline, a summary).

The command around ``replay.Replayer``: finding and reading the inputs (``logfiles``, ``follow``),
putting lines of several files in time order (``ordering``), skipping damaged lines with a report,
the sinks, progress on a terminal, and the exit status (0: clean; 1: lines skipped or spans not
exported; 2: nothing to read or a bad option).  See docs/REPLAY.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import gc
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO, cast

from .._records import SpanState
from ..version import __version__
from .follow import Follower
from .logfiles import STDIN, find_logs, read_blocks
from .ordering import HeldLines, merge, reorder
from .replay import Replayer, base_request_id
from .spans import Span
from .spanstates import JsonLinesWriter, to_span
from .tracelog import TraceLine, parse, parse_many, split_lines, why_bad

__all__ = ["Options", "parse_time", "run"]

SCOPE = ("fastdeploy_otel", __version__)
_EXAMPLES = 5  # damaged lines reported with file:line
_GC_THRESHOLD = (100_000, 20, 100)  # cyclic GC while replaying files (the default is (700, 10, 10))


@dataclass
class Options:
    paths: list[str]
    follow: bool = False
    jsonl: str | None = None
    html: str | None = None
    otlp: bool = False
    summary: bool = False
    since_ms: int | None = None
    until_ms: int | None = None
    request_ids: frozenset[str] = frozenset()
    ttl_s: float = 600.0
    max_in_flight: int = 100_000
    reorder_ms: int = 1000  # how late a line may be, in log time, and still be put in its place
    follow_delay_s: float = 0.5  # following: how long a line is held for lines of other files to catch up
    poll_s: float = 0.2
    from_end: bool = False
    progress: bool | None = None  # None: on a terminal only


_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")


def parse_time(value: str, now: float | None = None) -> int:
    """Epoch ms from epoch seconds, an ISO date-time (local time unless it has an offset) or an age
    (``90s``, ``15m``, ``2h``, ``1d``: that long ago).  ValueError when it is none of them."""
    v = value.strip()
    m = _RELATIVE.match(v)
    if m:
        unit = {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
        return int(((time.time() if now is None else now) - float(m.group(1)) * unit) * 1000)
    try:
        return int(float(v) * 1000)
    except ValueError:
        pass
    try:
        return int(dt.datetime.fromisoformat(v.replace("Z", "+00:00")).timestamp() * 1000)
    except ValueError:
        raise ValueError(f"{value!r} is not a time: use epoch seconds, an ISO date-time or an age like 15m") from None


class Damage:
    """Lines skipped, by reason, and the first few with where they were."""

    def __init__(self) -> None:
        self.lines = 0
        self.by_reason: dict[str, int] = {}
        self.examples: list[str] = []
        self.read_errors = 0

    def line(self, path: str, lineno: int, text: str) -> None:
        self.count(path, lineno, why_bad(text))

    def count(self, path: str, lineno: int, why: str) -> None:
        self.lines += 1
        reason = why.split(":")[0]
        self.by_reason[reason] = self.by_reason.get(reason, 0) + 1
        if len(self.examples) < _EXAMPLES:
            where = f"{path}:{lineno}" if lineno > 0 else path
            self.examples.append(f"{where}: {why}")

    def read_error(self, path: str, lineno: int, why: str) -> None:
        self.read_errors += 1
        if len(self.examples) < _EXAMPLES:
            self.examples.append(f"{path}:{lineno}: {why}")


class Outputs:
    """Where replayed spans go: JSON lines, OTLP (the live export pipeline), the timeline's list."""

    def __init__(self, opts: Options, stdout: TextIO) -> None:
        from .._export import make_resource
        from ..config import load_settings

        settings, self.config_errors = load_settings()
        settings = dataclasses.replace(settings, mode="otel", json_file=None)
        self.resource: dict[str, Any] = dict(make_resource(settings).attributes)
        self._file: TextIO | None = None
        self.jsonl: JsonLinesWriter | None = None
        if opts.jsonl:
            self._file = stdout if opts.jsonl == STDIN else open(opts.jsonl, "w", encoding="utf-8")
            self.jsonl = JsonLinesWriter(self._file, self.resource, SCOPE)
        self.otel: Any = None
        self.otlp_target = ""
        if opts.otlp:
            from .._export import OtelSink

            self.otel = OtelSink(settings)
            self.otlp_target = ", ".join(c.target for c in self.otel.channels) or "no exporter (OTEL_TRACES_EXPORTER)"
        self.spans: list[Span] | None = [] if (opts.html or opts.summary) else None
        self.emitted = 0

    def emit(self, spans: Sequence[SpanState]) -> None:
        self.emitted += len(spans)
        if self.jsonl is not None:
            self.jsonl.write(spans)
        if self.spans is not None:
            self.spans.extend(to_span(s, self.resource, SCOPE[0]) for s in spans)
        if self.otel is not None:
            self.otel.build_all(list(spans))
            if any(c.queued > 2048 for c in self.otel.channels):  # a replay waits for the exporter, never drops
                self.otel.flush(60.0)

    def flush(self) -> None:
        if self.jsonl is not None:
            self.jsonl.flush()

    def close(self, timeout_s: float = 30.0) -> dict[str, int]:
        self.flush()
        if self._file is not None and self._file is not sys.stdout:
            self._file.close()
        if self.otel is None:
            return {}
        self.otel.flush(timeout_s)
        lost = self.otel.shutdown(time.monotonic() + 5.0)
        out = self.otel.counters()
        out["spans_lost_at_shutdown"] = lost
        return out


class Progress:
    """Lines/s and requests on stderr, on a terminal only (tqdm when installed, else one status line)."""

    def __init__(self, enabled: bool | None) -> None:
        self._on = sys.stderr.isatty() if enabled is None else enabled
        self._bar: Any = None
        self._t0 = time.monotonic()
        self._last = 0.0
        self._lines = 0
        if self._on:
            try:
                from tqdm import tqdm  # optional: pip install 'fastdeploy-otel[replay]'

                self._bar = tqdm(unit=" lines", unit_scale=True, file=sys.stderr, dynamic_ncols=True, leave=False)
            except ImportError:
                self._bar = None

    def update(self, lines: int, replayer: Replayer) -> None:
        if not self._on:
            return
        now = time.monotonic()
        if now - self._last < 0.25:
            return
        self._last = now
        post = f"requests {replayer.requests:,}, in flight {replayer.in_flight:,}"
        if self._bar is not None:
            self._bar.update(lines - self._lines)
            self._bar.set_postfix_str(post, refresh=False)
        else:
            rate = lines / max(now - self._t0, 1e-9)
            sys.stderr.write(f"\r{lines:,} lines ({rate:,.0f}/s), {post}   ")
            sys.stderr.flush()
        self._lines = lines

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self._on:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


@dataclass
class _Run:
    opts: Options
    damage: Damage = field(default_factory=Damage)
    lines: int = 0
    stop: threading.Event = field(default_factory=threading.Event)

    def wanted(self, ts: int, rid: str) -> bool:
        o = self.opts
        if o.since_ms is not None and ts < o.since_ms:
            return False
        if o.until_ms is not None and ts > o.until_ms:
            return False
        return not o.request_ids or rid in o.request_ids or base_request_id(rid) in o.request_ids

    def stream(self, path: str) -> Iterator[list[TraceLine]]:
        """The usable lines of one file, in file order, a read's worth at a time; damaged lines are
        counted and reported, with their line numbers."""
        filtering = self.opts.since_ms is not None or self.opts.until_ms is not None or self.opts.request_ids
        wanted = self.wanted
        lineno = 0

        def read_error(why: str) -> None:
            self.damage.read_error(path, lineno + 1, why)

        for text in read_blocks(path, read_error):
            parsed = parse_many(text)
            # all(): no None, i.e. no line parse() could not use
            lines = cast("list[TraceLine]", parsed) if all(parsed) else self._usable(path, lineno, text, parsed)
            if filtering:
                lines = [line for line in lines if wanted(line.ts_ms, line.request_id)]
            lineno += len(parsed)
            yield lines

    def _usable(self, path: str, lineno: int, block: str, lines: list[TraceLine | None]) -> list[TraceLine]:
        """`lines` (of `block`) without the Nones, each reported (a blank line is passed over)."""
        out = []
        for i, (text, line) in enumerate(zip(split_lines(block), lines, strict=True), lineno + 1):
            if line is not None:
                out.append(line)
            elif text.strip():
                self.damage.line(path, i, text)
        return out


def _batch(run: _Run, files: list[str], replayer: Replayer, progress: Progress) -> None:
    n = 0
    for lines in reorder(merge([run.stream(p) for p in files]), run.opts.reorder_ms):
        replayer.feed(lines)
        n += len(lines)
        run.lines = n
        progress.update(n, replayer)
        if run.stop.is_set():
            break


def _follow(run: _Run, replayer: Replayer, outputs: Outputs, progress: Progress) -> None:
    opts = run.opts
    follower = Follower(opts.paths, run.damage.read_error, from_end=opts.from_end)
    held = HeldLines(opts.follow_delay_s)
    bad = run.damage.line

    def take(lines: list[tuple[str, int, str]], now: float) -> None:
        items = []
        for path, lineno, text in lines:
            line = parse(text)
            if line is None:
                if text.strip():
                    bad(path, lineno, text)
            elif run.wanted(line.ts_ms, line.request_id):
                items.append(line)
        held.add(items, now)

    def feed(items: list[TraceLine]) -> None:
        replayer.feed(items)
        run.lines += len(items)

    while not run.stop.is_set():
        now = time.monotonic()
        take(follower.poll(), now)
        feed(held.release(now))
        replayer.sweep(time.time_ns())
        outputs.flush()
        progress.update(run.lines, replayer)
        run.stop.wait(opts.poll_s)
    take(follower.close(), time.monotonic())
    feed(held.release(time.monotonic(), everything=True))


def run(opts: Options, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """Replay `opts.paths`; returns the exit status."""
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    files: list[str] = []
    if opts.follow:
        if STDIN in opts.paths:
            print("fastdeploy-otel replay: --follow needs files or directories, not -", file=err)
            return 2
        for p in opts.paths:
            if not os.path.exists(p):  # a file a process has yet to create: followed once it appears
                print(f"fastdeploy-otel replay: {p}: not there yet; waiting for it", file=err)
    else:
        files, missing = find_logs(opts.paths)
        for p in missing:
            print(f"fastdeploy-otel replay: {p}: no such file or directory", file=err)
    if not opts.follow and not files:
        print("fastdeploy-otel replay: no trace.log files to read", file=err)
        return 2

    outputs = Outputs(opts, out)
    for exc in outputs.config_errors:
        print(f"fastdeploy-otel replay: {exc}; using the default", file=err)
    replayer = Replayer(outputs.emit, ttl_s=opts.ttl_s, max_in_flight=opts.max_in_flight)
    state = _Run(opts)
    progress = Progress(opts.progress)
    t0 = time.monotonic()
    previous = _on_stop_signals(state.stop)
    try:
        if opts.follow:
            what = ", ".join(opts.paths)
            print(f"following {what} (Ctrl-C or SIGTERM to stop)", file=err, flush=True)
            _follow(state, replayer, outputs, progress)
        else:
            with _rare_collections():
                _batch(state, files, replayer, progress)
        replayer.finish()
    finally:
        progress.close()
        _restore_signals(previous)
    export = outputs.close()
    seconds = time.monotonic() - t0
    return _report(state, replayer, outputs, export, seconds, files, out, err)


def _report(
    state: _Run,
    replayer: Replayer,
    outputs: Outputs,
    export: dict[str, int],
    seconds: float,
    files: list[str],
    out: TextIO,
    err: TextIO,
) -> int:
    opts, damage = state.opts, state.damage
    if outputs.spans is not None:
        from .timeline import format_summary, render_html, summarize

        if opts.html:
            title = f"fastdeploy-otel replay ({replayer.requests} requests)"
            tmp = opts.html + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(render_html(outputs.spans, title=title))
            os.replace(tmp, opts.html)
        if opts.summary:
            print(format_summary(summarize(outputs.spans)), file=out if opts.jsonl != STDIN else err)
    rate = state.lines / seconds if seconds > 0 else 0.0
    where = f"{len(files)} files" if files else ", ".join(opts.paths)
    print(
        f"replayed {state.lines:,} lines from {where} in {seconds:.1f}s ({rate:,.0f} lines/s): "
        f"{replayer.requests:,} requests ({replayer.incomplete:,} incomplete), {outputs.emitted:,} spans"
        + (f"; {replayer.duplicates:,} repeated mirror lines skipped" if replayer.duplicates else ""),
        file=err,
    )
    status = 0
    if damage.lines or damage.read_errors:
        status = 1
        reasons = ", ".join(f"{n:,} {why}" for why, n in sorted(damage.by_reason.items(), key=lambda kv: -kv[1]))
        what = f"skipped {damage.lines:,} lines" + (f" ({reasons})" if reasons else "")
        if damage.read_errors:
            what += f"; {damage.read_errors} files could not be read to the end"
        print(what + ":", file=err)
        for example in damage.examples:
            print(f"  {example}", file=err)
    if export:
        failed = export.get("spans_export_failed", 0) + export.get("spans_lost_at_shutdown", 0)
        failed += export.get("spans_dropped_export_queue", 0)
        print(
            f"OTLP to {outputs.otlp_target}: {export.get('spans_exported', 0):,} spans exported, {failed:,} not",
            file=err,
        )
        if failed:
            status = 1
    if opts.jsonl and opts.jsonl != STDIN:
        print(f"spans: {opts.jsonl}", file=err)
    if opts.html:
        print(f"timeline: {opts.html}", file=err)
    return status


@contextlib.contextmanager
def _rare_collections() -> Iterator[None]:
    """A replay makes millions of short-lived objects, none in a reference cycle (reference counting
    frees them), while lines, requests and spans in flight survive long enough to be scanned again and
    again: at the default thresholds the cyclic GC found nothing and took 15% of a 1M-line replay."""
    previous = gc.get_threshold()
    gc.set_threshold(*_GC_THRESHOLD)
    try:
        yield
    finally:
        gc.set_threshold(*previous)


def _on_stop_signals(stop: threading.Event) -> dict[int, Any]:
    """SIGTERM and SIGINT end the replay cleanly (in-flight requests flushed as incomplete)."""
    previous: dict[int, Any] = {}
    if threading.current_thread() is not threading.main_thread():
        return previous
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.signal(sig, lambda *_: stop.set())
    return previous


def _restore_signals(previous: dict[int, Any]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)
