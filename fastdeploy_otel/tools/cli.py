"""``fastdeploy-otel``: the demo, the server, and a check of the tracing environment.

fastdeploy-otel demo [--out DIR]        run the traced stack on a workload; leave trace.log,
                                        spans.jsonl and timeline.html in DIR
fastdeploy-otel serve --port N          run the traced stack until Ctrl-C / SIGTERM
fastdeploy-otel check-config            validate the tracing environment variables
fastdeploy-otel run [--] COMMAND ...    run COMMAND with every Python process it starts traced
                                        (FastDeploy's own tracing calls taken over; FD_TRACE=all
                                        unless set)
fastdeploy-otel replay PATH... [--follow] [--jsonl F] [--html F] [--otlp] [--summary]
                                        trace.log files (FastDeploy's or the mirror) to spans
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import threading
import time

from ..config import ConfigError, load_settings


def _check_env() -> None:
    """Fail with one clear line per bad variable, before starting anything."""
    _, errors = load_settings()
    if errors:
        for exc in errors:
            print(f"fastdeploy-otel: {exc}", file=sys.stderr)
        raise SystemExit(2)


# The serving extras the example stack needs, by the module each one provides.
_SERVE_MODULES = ("fastapi", "uvicorn", "httpx", "zmq", "paddle")


def _example_stack() -> None:
    """Make the example serving stack (``examples/minifd``) importable, or exit with what to do.

    It is not part of the installed package: it runs from a source checkout, where ``examples/``
    sits beside ``fastdeploy_otel/`` (or wherever ``FASTDEPLOY_OTEL_EXAMPLES`` points).
    """
    import importlib.util

    missing = [m for m in _SERVE_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        print(
            f"fastdeploy-otel: the example serving stack needs {', '.join(missing)}; "
            "install them with: pip install 'fastdeploy-otel[serve,cpu]' (or '[serve,gpu]')",
            file=sys.stderr,
        )
        raise SystemExit(2)
    if importlib.util.find_spec("minifd") is not None:
        return
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    examples = os.environ.get("FASTDEPLOY_OTEL_EXAMPLES") or os.path.join(here, "examples")
    if not os.path.isdir(os.path.join(examples, "minifd")):
        print(
            "fastdeploy-otel: the example serving stack (examples/minifd) ships with the source repository, "
            "not with the package; run this command from a checkout installed with "
            "pip install -e '.[serve,cpu]', or set FASTDEPLOY_OTEL_EXAMPLES to its examples/ directory",
            file=sys.stderr,
        )
        raise SystemExit(2)
    sys.path.insert(0, examples)


def _merge_mirrors(log_dir: str, out_path: str) -> int:
    """One trace.log for the demo: each process's lines, merged by timestamp and, within one
    millisecond, by the event's place in the lifecycle (``ordering.RANK``, as a replay of the separate
    files orders them: the engine's INFERENCE_END before the API server's POSTPROCESSING_END).
    Each file's own lines keep their order."""
    import heapq

    from ..events import lookup
    from ..mirror import parse_line
    from .ordering import RANK

    streams: list[list[tuple[tuple[int, int], str]]] = []
    for role in sorted(os.listdir(log_dir)):
        path = os.path.join(log_dir, role, "trace.log")
        if not os.path.isfile(path):
            continue
        keyed = []
        with open(path, encoding="utf-8") as f:
            for line in f:
                fields = parse_line(line)
                event = lookup(fields["event"]) if fields else None
                keyed.append(((int(fields["timestamp"]) if fields else 0, RANK.get(event, 0) if event else 0), line))
        streams.append(keyed)
    count = 0
    with open(out_path, "w", encoding="utf-8") as f:
        for _, line in heapq.merge(*streams, key=lambda kv: kv[0]):
            f.write(line)
            count += 1
    return count


def _merge_json(json_dir: str, out_path: str) -> None:
    with open(out_path, "w", encoding="utf-8") as out:
        for name in sorted(os.listdir(json_dir)):
            with open(os.path.join(json_dir, name), encoding="utf-8") as f:
                shutil.copyfileobj(f, out)


def demo(args: argparse.Namespace) -> int:
    _check_env()
    _example_stack()
    from minifd import workload
    from minifd.stack import Stack

    from .spans import read_spans
    from .timeline import format_summary, render_html, summarize

    out = os.path.abspath(args.out)
    if os.path.exists(out):
        shutil.rmtree(out)
    logs, json_dir = os.path.join(out, "logs"), os.path.join(out, "json")
    os.makedirs(json_dir)
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    print(f"[demo] starting engine + API server (logs in {logs}) ...", flush=True)
    if endpoint:
        print(f"[demo] spans also go to {endpoint}", flush=True)
    t0 = time.monotonic()
    with Stack(
        trace_mode="all",
        log_dir=logs,
        json_dir=json_dir,
        gpu_blocks=args.gpu_blocks,
        cpu_blocks=args.cpu_blocks,
        max_batch=4,
        fault_injection=True,
    ) as stack:
        print(
            f"[demo] stack ready at {stack.base_url} in {time.monotonic() - t0:.1f}s; sending the workload", flush=True
        )

        def report(o, done, total):
            extra = f" cached={o.cached_tokens}" if o.cached_tokens else ""
            print(
                f"[demo] {done:2d}/{total} {o.status} {o.elapsed_ms:7.0f} ms  {o.label:<32} "
                f"trace_id={o.trace_id}{extra}"
                f"{'  ' + o.note if o.note else ''}",
                flush=True,
            )

        outcomes = workload.run(stack.base_url, report)
        print("[demo] stopping the stack (flushing spans and mirror lines) ...", flush=True)
    lines = _merge_mirrors(logs, os.path.join(out, "trace.log"))
    spans_path = os.path.join(out, "spans.jsonl")
    _merge_json(json_dir, spans_path)
    spans = read_spans(spans_path)
    html_path = os.path.join(out, "timeline.html")
    with open(html_path, "w", encoding="utf-8") as f:
        f.write(render_html(spans, title=f"fastdeploy-otel demo ({len(outcomes)} requests)"))
    print()
    print(format_summary(summarize(spans)))
    print()
    print(f"  trace.log     {os.path.join(out, 'trace.log')}  ({lines} lines; per process under {logs}/<role>/)")
    print(f"  spans         {spans_path}  ({len(spans)} spans, OTLP JSON lines)")
    print(f"  timeline      {html_path}")
    print(f"  error log     {logs}/<role>/error.log")
    failed = [o for o in outcomes if o.status not in (200, 400, 500)]
    return 1 if failed else 0


ENGINE_DEATH_DRAIN_S = 3


def serve(args: argparse.Namespace) -> int:
    _check_env()
    _example_stack()
    from minifd.stack import Stack

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stack = Stack(
        log_dir=args.log_dir,
        port=args.port,
        host=args.host,
        gpu_blocks=args.gpu_blocks,
        cpu_blocks=args.cpu_blocks,
        max_batch=args.max_batch,
    )
    with stack:
        print(
            f"serving on {stack.base_url} (OpenAI-compatible: /v1/completions, /v1/chat/completions, /v1/models, "
            f"/health); Ctrl-C to stop",
            flush=True,
        )
        print(
            f"{describe(load_settings()[0])}; trace.log and error.log under {args.log_dir}/<role>/, "
            f"process output (export warnings too) in {args.log_dir}/api.out and engine.out",
            flush=True,
        )
        while not stop.wait(0.5):
            dead = [role for role, p in stack.procs.items() if p.poll() is not None]
            if dead:
                # Exit non-zero (a supervisor restarts us); the API server first gets ENGINE_DEATH_DRAIN_S to
                # answer in-flight requests with errors and /health with 503 (docs/RELIABILITY.md).
                drain = ENGINE_DEATH_DRAIN_S if dead == ["engine"] else 0
                print(
                    f"the {dead[0]} process exited; see {args.log_dir}/{dead[0]}.out; exiting 1 in {drain}s",
                    file=sys.stderr,
                    flush=True,
                )
                stop.wait(drain)
                return 1
        print("shutting down: flushing spans and trace.log ...", flush=True)
    return 0


def describe(settings) -> str:
    """One line on what tracing will do, for a startup banner."""
    parts = {"off": ["tracing off"], "local": ["trace.log only"], "otel": [], "all": ["trace.log"]}[settings.mode]
    if settings.otel:
        if settings.exporter == "otlp":
            parts.append(f"OTLP {settings.protocol} to {settings.endpoint or 'the exporter default (localhost)'}")
        elif settings.exporter == "console":
            parts.append("spans to the console")
        if settings.json_file:
            parts.append(f"spans as JSON lines to {settings.json_file}")
    return f"tracing: FD_TRACE={settings.mode}: " + ", ".join(parts or ["no span destination"])


def check_config(_: argparse.Namespace) -> int:
    settings, errors = load_settings()
    for exc in errors:
        print(f"error: {exc}", file=sys.stderr)
    if errors:
        return 2
    print(describe(settings))
    print(settings)
    return 0


def run_environment(env: dict[str, str]) -> dict[str, str]:
    """`env` with the start-up hook first on PYTHONPATH (inherited by every child) and FD_TRACE defaulted."""
    from .. import _bootstrap as bootstrap

    hook_dir = os.path.dirname(os.path.abspath(bootstrap.__file__))
    out = dict(env)
    paths = [p for p in out.get("PYTHONPATH", "").split(os.pathsep) if p and os.path.abspath(p) != hook_dir]
    out["PYTHONPATH"] = os.pathsep.join([hook_dir, *paths])
    if not out.get("FD_TRACE", "").strip():
        out["FD_TRACE"] = "all"
    return out


def run(args: argparse.Namespace) -> int:
    command = list(args.argv)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        print("fastdeploy-otel run: no command given", file=sys.stderr)
        return 2
    _check_env()
    env = run_environment(dict(os.environ))
    try:
        os.execvpe(command[0], command, env)  # the command becomes this process: its signals, its exit status
    except OSError as exc:
        print(f"fastdeploy-otel run: cannot run {command[0]!r}: {exc.strerror}", file=sys.stderr)
        return 127


def replay(args: argparse.Namespace) -> int:
    from .replay_cmd import Options, parse_time, run

    try:
        since = parse_time(args.since) if args.since else None
        until = parse_time(args.until) if args.until else None
    except ValueError as exc:
        print(f"fastdeploy-otel replay: {exc}", file=sys.stderr)
        return 2
    opts = Options(
        paths=args.paths,
        follow=args.follow,
        jsonl=args.jsonl,
        html=args.html,
        otlp=args.otlp,
        summary=args.summary or not (args.jsonl or args.html or args.otlp),
        since_ms=since,
        until_ms=until,
        request_ids=frozenset(args.request_id or ()),
        ttl_s=args.ttl,
        max_in_flight=args.max_in_flight,
        from_end=args.from_end,
        progress=args.progress,
    )
    return run(opts)


def _add_replay(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser(
        "replay",
        help="turn trace.log files (FastDeploy's or the mirror) into spans, a timeline and a summary",
        description="Rebuild spans from trace.log lines, the way live tracing builds them. PATH is a file, "
        "a directory (searched for trace.log, trace.log.YYYY-MM-DD, trace.log.N, .gz included) or - for "
        "standard input. Without an output option the summary is printed. Exit status: 0 clean, 1 lines "
        "skipped or spans not exported, 2 nothing to read or a bad option. See docs/REPLAY.md.",
    )
    r.add_argument("paths", nargs="+", metavar="PATH")
    r.add_argument("-f", "--follow", action="store_true", help="keep following the files, like tail -F")
    r.add_argument("--from-end", action="store_true", help="with --follow: skip what the files already hold")
    r.add_argument("--jsonl", metavar="FILE", help="write spans as OTLP/JSON lines (- for standard output)")
    r.add_argument("--html", metavar="FILE", help="write the request timeline (the demo's timeline.html)")
    r.add_argument("--otlp", action="store_true", help="export spans over OTLP, configured by OTEL_* variables")
    r.add_argument("--summary", action="store_true", help="print the summary table (the default output)")
    r.add_argument("--since", metavar="T", help="only lines at or after T (epoch s, ISO date-time, or 15m/2h/1d ago)")
    r.add_argument("--until", metavar="T", help="only lines at or before T")
    r.add_argument("--request-id", action="append", metavar="RID", help="only this request (repeatable)")
    r.add_argument(
        "--ttl",
        type=float,
        default=600.0,
        metavar="S",
        help="a request with no line for S seconds ends as incomplete (default 600)",
    )
    r.add_argument(
        "--max-in-flight",
        type=int,
        default=100_000,
        metavar="N",
        help="requests open at once before the oldest ends as incomplete (default 100000)",
    )
    r.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show progress (default: on a terminal only)",
    )
    r.set_defaults(func=replay)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="fastdeploy-otel", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="run the traced stack on a demo workload and leave its artefacts")
    d.add_argument("--out", default="demo-out", help="where to leave trace.log, spans.jsonl, timeline.html")
    d.add_argument("--gpu-blocks", type=int, default=16, help="GPU-tier KV blocks (small, to force swaps)")
    d.add_argument("--cpu-blocks", type=int, default=64, help="CPU-tier KV blocks")
    d.set_defaults(func=demo)
    s = sub.add_parser("serve", help="run the traced stack until Ctrl-C or SIGTERM")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--log-dir", default=os.environ.get("FD_LOG_DIR", "log"))
    s.add_argument("--gpu-blocks", type=int, default=64, help="GPU-tier KV blocks of 16 tokens")
    s.add_argument("--cpu-blocks", type=int, default=256, help="CPU-tier KV blocks of 16 tokens")
    s.add_argument("--max-batch", type=int, default=8)
    s.set_defaults(func=serve)
    c = sub.add_parser("check-config", help="validate the FD_* and OTEL_* tracing variables")
    c.set_defaults(func=check_config)
    r = sub.add_parser("run", help="run a command with FastDeploy traced in every Python process it starts")
    r.add_argument("argv", nargs=argparse.REMAINDER, metavar="[--] COMMAND ARGS", help="the command to run")
    r.set_defaults(func=run)
    _add_replay(sub)
    args = p.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"fastdeploy-otel: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
