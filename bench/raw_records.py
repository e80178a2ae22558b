"""A probe for issue 13's next step: what would an engine save if its records went to the export
process raw, to be assembled there, instead of being assembled and shipped as spans and mirror lines?

``python -m bench.raw_records`` runs engine-shaped requests (extract, the engine's 19 events of MIXED,
finish_request; no inject) with OTLP to a receiver process, 40 requests a flush (a 0.1 s flush at
about 400 requests/s), and alternates two ways of handling one flush's records:

* as now: ``Runtime.flush()``, which drains the queue through the Assembler and hands the spans and
  the mirror lines to the export process;
* raw: each record made of builtin values (the thread as its ident and name, the context as its span
  context's ids) and the batch marshalled, as it would be framed for the pipe.

It prints the serving-process CPU per request of each.  A probe, not a figure of the bench: the raw
way leaves out what a real design needs besides (cleaning the keywords to builtin values, and an
``inject()`` that answers without the Assembler: see docs/BENCHMARKS.md, issue 13's fifth pass).
"""

from __future__ import annotations

import marshal
import tempfile
import time
from typing import Any

import fastdeploy_otel as fdt
from fastdeploy_otel import api
from fastdeploy_otel.events import LoggingEventName as E
from tests.support.lifecycles import MIXED

from .receiver_proc import ReceiverProcess

ENGINE = [(e, kw) for e, kw in MIXED if e not in (E.PREPROCESSING_START, E.POSTPROCESSING_END)]


def _builtin(records: list[tuple]) -> list[tuple]:
    from opentelemetry import trace

    out = []
    for kind, ts, ev, rid, user, payload, thread, ctx, filename, lineno in records:
        sc = trace.get_current_span(ctx).get_span_context()
        ids = (sc.trace_id, sc.span_id, sc.is_remote) if sc.is_valid else None
        out.append((kind, ts, ev.value if ev is not None else None, rid, user, payload, thread.ident, thread.name,
                    ids, filename, lineno))  # fmt: skip
    return out


def run(per_flush: int = 40, rounds: int = 30) -> dict[str, Any]:
    rx = ReceiverProcess()
    fdt.configure(mode="all", endpoint=rx.grpc_endpoint, log_dir=tempfile.mkdtemp(), env={}, flush_interval_s=3600)
    rt = api._runtime
    assert rt is not None
    carriers = []
    for k in range(400):  # the API's carriers, handing PREPROCESSING over
        fdt.trace_print(E.PREPROCESSING_START, f"api-{k}", None, model="tiny", operation="chat")
        carriers.append(fdt.inject(f"api-{k}"))
        fdt.finish_request(f"api-{k}")
    rt.flush()
    for _ in range(3):  # the export process answers within about a second: from then on it writes the mirror
        time.sleep(1.2)
        rt.flush()

    def requests(tag: str) -> None:
        for k in range(per_flush):
            rid = f"{tag}-{k}"
            fdt.extract(rid, carriers[k % len(carriers)])
            for ev, kw in ENGINE:
                fdt.trace_print(ev, rid, None, **kw)
            fdt.finish_request(rid)

    assembled = raw = 0.0
    size = 0
    for r in range(rounds):
        requests(f"a{r}")
        t = time.process_time()
        rt.flush()
        assembled += time.process_time() - t
        requests(f"b{r}")
        records = list(rt.queue)
        rt.queue.clear()
        t = time.process_time()
        size = len(marshal.dumps(_builtin(records)))
        raw += time.process_time() - t
        rt.flush()
    fdt.shutdown()
    n = per_flush * rounds
    return {
        "assembled_and_shipped_us": assembled / n * 1e6,
        "raw_marshalled_us": raw / n * 1e6,
        "raw_bytes_per_request": size / per_flush,
    }


if __name__ == "__main__":
    res = run()
    print(
        f"per engine request, in the serving process: assembled and shipped {res['assembled_and_shipped_us']:.1f} us; "
        f"raw records marshalled {res['raw_marshalled_us']:.1f} us ({res['raw_bytes_per_request']:.0f} bytes)"
    )
