"""``python -m bench [--quick] [--json FILE]``: fastdeploy_otel vs FastDeploy's legacy trace.log.

Prints a table with PASS/MISS against the targets and, with ``--json``, writes every figure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import time
from typing import Any

from .micro import paced_pairs, run_micro
from .replay import REPLAY_KEYS, run_replay
from .instructions import INSTRUCTION_KEYS, run_instructions
from .serving import SERVING_KEYS, run_serving

# key: (comparison, target); None = informational
TARGETS: dict[str, tuple[str, float] | None] = {
    "hot_path_ratio": ("<=", 0.25),
    "total_cpu_ratio": ("<=", 1.0),
    "disabled_ratio": ("<=", 0.02),
    "naive_sdk_ratio": None,
    "dropin_overhead_ratio": ("<=", 1.2),  # one thread only (bench/dropin.py)
    "serving_throughput_ratio": (">=", 0.97),
    "serving_p99_ratio": ("<=", 1.05),
    "serving_api_cpu_ms_added": ("<=", 0.30),
    "serving_engine_cpu_ms_added": ("<=", 0.25),
    "serving_engine_tracing_threads_cpu_ms_added": ("<=", 0.25),
    "replay_lines_per_s": (">=", 150_000),
    # serving's added CPU (api + the engine's tracing threads) over the micro's prediction (MIXED as
    # serving does it, at serving's pace: serving_paced_cpu_us); the engine's model thread, which
    # runs no tracing code, is left out: its CPU moves by +-1.5 ms a turn with tracing off in both
    # stacks (an A/A run: --serving-modes off,all,off_b)
    "micro_predicts_serving_ratio": ("within", (0.75, 1.25)),
}


def verdict(key: str, value: Any) -> str:
    target = TARGETS.get(key)
    if target is None:
        return "info"
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return "n/a"
    op, limit = target
    if op == "within":
        low, high = limit  # type: ignore[misc]
        ok = low <= value <= high
    else:
        ok = value <= limit if op == "<=" else value >= limit
    return "PASS" if ok else "MISS"


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def table(res: dict[str, Any]) -> str:
    lines = []
    threads = res.get("micro_threads") or []
    extra = [t for t in threads[1:]]
    head = f"{'figure':<28}{'1 thread':>12}" + "".join(f"{f'{t} threads':>12}" for t in extra) + f"{'target':>12}  result"
    lines.append(head)
    lines.append("-" * len(head))
    for key, target in TARGETS.items():
        if target is None:
            tgt = "(info)"
        elif target[0] == "within":
            tgt = "{:g}-{:g}".format(*target[1])  # type: ignore[str-format]
        else:
            tgt = f"{target[0]} {target[1]:g}"
        one_figure = key.startswith(("serving_", "dropin_", "replay_", "micro_predicts"))
        if one_figure:
            row = f"{key:<28}{_fmt(res.get(key)):>12}" + "".join(f"{'':>12}" for _ in extra)
        else:
            row = f"{key:<28}{_fmt(res.get(key)):>12}" + "".join(f"{_fmt(res.get(f'{key}_{t}t')):>12}" for t in extra)
        result = verdict(key, res.get(key))
        if not one_figure and target is not None:
            result += "".join(f" / {verdict(key, res.get(f'{key}_{t}t'))}" for t in extra)
        lines.append(f"{row}{tgt:>12}  {result}")
    lines.append("")
    lines.append(f"{'µs per request (MIXED, 21 events)':<36}{'1 thread':>12}" + "".join(f"{f'{t} threads':>12}" for t in extra))
    for key, label in (
        ("legacy_us", "legacy, calling thread"),
        ("hot_path_us", "otel all, calling thread"),
        ("disabled_us", "off, calling thread"),
        ("naive_sdk_us", "naive SDK, calling thread"),
        ("legacy_total_cpu_us", "legacy, process CPU"),
        ("total_cpu_us", "otel all, total CPU (+ export process)"),
        ("in_process_cpu_us", "  of which in the process"),
        ("export_process_cpu_us", "  of which the export process"),
        ("naive_sdk_total_cpu_us", "naive SDK, process CPU"),
        ("serving_shaped_cpu_us", "as serving (HTTP span, carriers)"),
        ("serving_paced_cpu_us", "  at serving's pace, added"),
        ("serving_paced_cpu_us_in_serving", "  the same, between serving's rounds"),
    ):
        lines.append(f"{label:<36}{_fmt(res.get(key), 1):>12}" + "".join(f"{_fmt(res.get(f'{key}_{t}t'), 1):>12}" for t in extra))
    if "rss_in_flight_mb" in res:
        lines.append(
            f"memory, {res.get('rss_in_flight_requests')} requests in flight: "
            f"+{res['rss_in_flight_mb']:.1f} MB RSS (peak +{res.get('rss_hwm_delta_mb', math.nan):.1f} MB)"
        )
    if res.get("replay_lines"):
        lines.append(
            f"replay: {res['replay_lines']:,} lines, {_fmt(res.get('replay_lines_per_s'))} lines/s of CPU "
            f"({_fmt(res.get('replay_wall_lines_per_s'))} wall), peak RSS {_fmt(res.get('replay_peak_rss_mb'), 1)} MB"
        )
    if res.get("instructions_otel_per_request"):
        lines.append(
            f"instructions per request: legacy {_fmt(res.get('instructions_legacy_per_request'))}, "
            f"otel {_fmt(res.get('instructions_otel_per_request'))} "
            f"({_fmt(res.get('instructions_otel_in_process_per_request'))} in the process), "
            f"as serving {_fmt(res.get('instructions_shaped_per_request'))}; "
            f"the API server in serving +{_fmt(res.get('instructions_serving_api_added_per_request'))}"
        )
    if res.get("serving_available"):
        lines.append(
            f"serving: off {_fmt(res.get('serving_off_rps'), 1)} req/s, p50 {_fmt(res.get('serving_off_p50_ms'), 1)} ms, "
            f"p99 {_fmt(res.get('serving_off_p99_ms'), 1)} ms | all {_fmt(res.get('serving_all_rps'), 1)} req/s, "
            f"p50 {_fmt(res.get('serving_all_p50_ms'), 1)} ms, p99 {_fmt(res.get('serving_all_p99_ms'), 1)} ms; "
            f"CPU ms/request off: api {_fmt(res.get('serving_off_api_cpu_ms'), 2)}, "
            f"engine {_fmt(res.get('serving_off_engine_cpu_ms'), 2)}"
        )
    elif res.get("serving_skipped_reason"):
        lines.append(res["serving_skipped_reason"])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="about a minute in all (fewer requests and rounds)")
    p.add_argument("--json", metavar="FILE", help="write every figure to FILE as JSON")
    p.add_argument("--no-serving", action="store_true", help="skip the serving benchmark")
    p.add_argument("--no-micro", action="store_true", help="skip the micro benchmark")
    p.add_argument("--requests", type=int, help="micro: requests per variant per round")
    p.add_argument("--rounds", type=int, help="micro: interleaved rounds (medians are taken)")
    p.add_argument("--threads", default="1,8", help="micro: emitting thread counts, comma separated (default 1,8)")
    p.add_argument("--rss-requests", type=int, default=10_000, help="micro: requests in flight for the memory figure")
    p.add_argument("--flush-interval", type=float, default=0.2, help="micro: fastdeploy_otel flush_interval_s")
    p.add_argument(
        "--bsp-queue", type=int, default=65536,
        help="micro: BatchSpanProcessor max_queue_size for otel and naive (0: the SDK default, 2048, which "
        "drops spans under the bench's bursts; drops are counted in the JSON)",
    )
    p.add_argument(
        "--pace-ms", type=float, default=12.0,
        help="micro: the paced variant's interval between requests (default 12: about the example stack's rate)",
    )
    p.add_argument("--no-replay", action="store_true", help="skip the replay benchmark")
    p.add_argument(
        "--no-instructions", action="store_true", help="skip the instruction counts (callgrind; about 3-4 minutes)"
    )
    p.add_argument("--replay-lines", type=int, default=1_000_000, help="replay: lines of the input (default 1000000)")
    p.add_argument("--serving-requests", type=int, help="serving: requests per run")
    p.add_argument("--serving-clients", type=int, help="serving: concurrent clients (default 8)")
    p.add_argument("--max-tokens", type=int, help="serving: max_tokens per request")
    p.add_argument(
        "--serving-modes", type=lambda v: tuple(m.strip() for m in v.split(",")),
        help="serving: FD_TRACE modes, off first (default off,all,local; off,all,otel: the mirror's cost); "
        "a label after '_' starts a second stack of a mode (off,all,off_b: an A/A control of the noise)",
    )
    args = p.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t0 = time.monotonic()
    res: dict[str, Any] = {k: None for k in TARGETS}
    res.update({k: None for k in SERVING_KEYS})
    res.update({k: None for k in REPLAY_KEYS})
    res.update({k: None for k in INSTRUCTION_KEYS})
    res.update({
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "quick": args.quick,
        "command": "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "targets": {k: (None if v is None else {"op": v[0], "value": v[1]}) for k, v in TARGETS.items()},
    })
    bsp = {"max_queue_size": args.bsp_queue} if args.bsp_queue else {}
    if not args.no_micro:
        threads = tuple(int(x) for x in args.threads.split(",") if x.strip())
        log(f"micro benchmark (threads {threads}) ...")
        res.update(run_micro(
            args.quick, requests=args.requests, rounds=args.rounds, threads=threads,
            rss_requests=args.rss_requests, flush_interval_s=args.flush_interval, pace_ms=args.pace_ms,
            bsp=bsp, log=log,
        ))
    if not args.no_instructions:
        log("instructions per request (callgrind) ...")
        res.update(run_instructions(log=log))
    if not args.no_replay:
        log("replay benchmark ...")
        res.update(run_replay(args.replay_lines, log=log))
    if not args.no_serving:
        log("serving benchmark ...")
        with contextlib.ExitStack() as stack:
            pairs = None
            if not args.no_micro:  # the micro's prediction again, a pair after each serving round
                try:
                    pairs = stack.enter_context(paced_pairs(res["paced_requests"], args.pace_ms, log, bsp))
                except Exception as exc:  # serving goes on; the prediction is the micro's own
                    log(f"  paced pairs during serving unavailable: {type(exc).__name__}: {exc}")
            res.update(run_serving(
                args.quick, clients=args.serving_clients, requests=args.serving_requests,
                max_tokens=args.max_tokens, modes=args.serving_modes, log=log,
                between_rounds=(lambda k: pairs.pair(f" after serving round {k + 1}")) if pairs else None,
            ))
            if pairs is not None and pairs.added:
                res.update(pairs.figures("_in_serving"))
    # The prediction: the paced pairs taken between serving's rounds when there are some (the machine
    # as serving found it), else the micro's own.
    paced_key = "serving_paced_cpu_us_in_serving" if "serving_paced_cpu_us_in_serving" in res else "serving_paced_cpu_us"
    predicted, warm, api, engine, threads = (res.get(k) for k in (
        paced_key, "serving_shaped_cpu_us", "serving_api_cpu_ms_added", "serving_engine_cpu_ms_added",
        "serving_engine_tracing_threads_cpu_ms_added"))
    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and math.isfinite(v)

    # serving's added CPU over the micro's prediction (paced); `_warm`: over the back-to-back variant
    for name, parts in (("", (api, threads)), ("_whole_engine", (api, engine))):
        if all(map(number, parts)):
            for suffix, micro in (("", predicted), ("_warm", warm)):
                if number(micro) and micro > 0:
                    res[f"micro_predicts_serving_ratio{name}{suffix}"] = sum(parts) * 1000 / micro
                    res["micro_predicts_serving_from"] = paced_key
    res["seconds"] = time.monotonic() - t0
    res["results"] = {k: verdict(k, res.get(k)) for k in TARGETS}
    print(table(res))
    print(f"\n{res['cores']} cores, Python {res['python']}, {res['seconds']:.0f} s")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=2, sort_keys=True, default=str)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

