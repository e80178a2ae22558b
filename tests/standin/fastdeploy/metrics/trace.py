"""FastDeploy's Gen C tracing API (``fastdeploy.metrics.trace``): same names, signatures and span shapes.

Left alone, it exports FastDeploy's own spans (a root ``FastDeploy Req <rid>``, a thread span per
thread named ``<label>(host:.. | pid:..)``, slice spans inside) when FD_TRACE is otel or all; the
instrumentor replaces every function here.
"""

from __future__ import annotations

import threading
import time
from enum import Enum
from typing import Any, Dict, Optional

from opentelemetry import context, propagate, trace

from fastdeploy import envs
from fastdeploy.utils import get_base_request_id

tracing_enabled = False
_tracer = None
_threads: Dict[int, str] = {}
_reqs: Dict[str, dict] = {}


class TraceSpanName(str, Enum):
    FASTDEPLOY = "FASTDEPLOY"
    PREPROCESSING = "PREPROCESSING"
    SCHEDULE = "SCHEDULE"
    PREFILL = "PREFILL"
    DECODE = "DECODE"
    POSTPROCESSING = "POSTPROCESSING"


def process_tracing_init():
    global tracing_enabled, _tracer
    tracing_enabled = envs.FD_TRACE in ("otel", "all")
    if not tracing_enabled:
        return
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource({"service.name": envs.FD_SERVICE_NAME}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=envs.EXPORTER_OTLP_ENDPOINT, insecure=True)))
    trace.set_tracer_provider(provider)
    _tracer = provider.get_tracer("fastdeploy server")


def trace_set_thread_info(thread_label: str, tp_rank: Optional[int] = None, dp_rank: Optional[int] = None):
    if tracing_enabled:
        _threads.setdefault(threading.get_native_id(), thread_label)


def _thread_span(req: dict, ts: int):
    tid = threading.get_native_id()
    if tid not in req["threads"]:
        name = f"{_threads.get(tid, 'unknown')}(host:{envs.FD_HOST_NAME or 'localhost'} | pid:{tid})"
        req["threads"][tid] = {"span": _tracer.start_span(name, context=req["ctx"], start_time=ts), "slices": []}
    return req["threads"][tid]


def trace_req_start(rid: str, trace_content: Any = None, ts: Optional[int] = None, role: Optional[str] = "null"):
    if not tracing_enabled:
        return
    ts = ts or time.time_ns()
    parent = trace_content if isinstance(trace_content, context.Context) else None
    root = _tracer.start_span(f"{'' if role == 'null' else role} Req {get_base_request_id(rid)}".strip(),
                              context=parent, start_time=ts, kind=trace.SpanKind.SERVER)
    _reqs[str(rid)] = {"root": root, "ctx": trace.set_span_in_context(root), "threads": {}}


def trace_req_finish(rid: str, ts: Optional[int] = None, attrs: Optional[Dict[str, Any]] = None):
    req = _reqs.pop(str(rid), None) if tracing_enabled else None
    if req is not None:
        ts = ts or time.time_ns()
        for thread in req["threads"].values():
            thread["span"].end(ts)
        if req["root"] is not None:
            req["root"].end(ts)


def trace_slice_start(name: str, rid: str, ts: Optional[int] = None, anonymous: bool = False):
    req = _reqs.get(str(rid)) if tracing_enabled else None
    if req is not None:
        thread = _thread_span(req, ts or time.time_ns())
        parent = thread["slices"][-1] if thread["slices"] else thread["span"]
        thread["slices"].append(_tracer.start_span(str(getattr(name, "value", name)),
                                                   context=trace.set_span_in_context(parent), start_time=ts))


def trace_slice_end(name: str, rid: str, ts: Optional[int] = None, attrs: Optional[Dict[str, Any]] = None,
                    auto_next_anon: bool = False, thread_finish_flag: bool = False):
    req = _reqs.get(str(rid)) if tracing_enabled else None
    thread = req["threads"].get(threading.get_native_id()) if req else None
    if thread and thread["slices"]:
        span = thread["slices"].pop()
        if attrs:
            span.set_attributes(attrs)
        span.end(ts)
        if thread_finish_flag:
            thread["span"].end(ts)
            del req["threads"][threading.get_native_id()]


trace_slice = trace_slice_end


def trace_report_span(name: str, rid: str, start_time_ns: int, end_time_ns: int,
                      attrs: Dict[str, Any] = None, thread_finish_flag: bool = False):
    trace_slice_start(name, rid, start_time_ns)
    trace_slice_end(name, rid, end_time_ns, attrs, False, thread_finish_flag)


def trace_event(name: str, rid: str, ts: Optional[int] = None, attrs: Dict[str, Any] = None):
    req = _reqs.get(str(rid)) if tracing_enabled else None
    thread = req["threads"].get(threading.get_native_id()) if req else None
    if thread and thread["slices"]:
        thread["slices"][-1].add_event(name, attrs, ts)


def trace_slice_add_attr(rid: str, attrs: Dict[str, Any]):
    req = _reqs.get(str(rid)) if tracing_enabled else None
    thread = req["threads"].get(threading.get_native_id()) if req else None
    if thread and thread["slices"]:
        thread["slices"][-1].set_attributes(attrs)


def trace_span(span_name: str = None):
    def decorator(func):
        return func
    return decorator


def label_span(request):
    span = trace.get_current_span()
    if getattr(request, "stream", False) and span.is_recording():
        span.set_attribute("stream", "true")


def trace_get_proc_propagate_context(rid) -> Optional[Dict[str, Any]]:
    req = _reqs.get(str(rid)) if tracing_enabled else None
    if req is None:
        return None
    carrier: Dict[str, str] = {}
    propagate.inject(carrier, context=req["ctx"])
    return {"root_span": carrier, "prev_span": "None"}


def trace_set_proc_propagate_context(rid, trace_context: Optional[Dict[str, Any]], ts: Optional[int] = None):
    if tracing_enabled and trace_context and "root_span" in trace_context and str(rid) not in _reqs:
        _reqs[str(rid)] = {"root": None, "ctx": propagate.extract(trace_context["root_span"]), "threads": {}}


def get_trace_info_for_request(rid: str) -> Optional[Dict[str, str]]:
    req = _reqs.get(str(rid)) or _reqs.get(get_base_request_id(str(rid))) if tracing_enabled else None
    if req is None:
        return None
    sc = trace.get_current_span(req["ctx"]).get_span_context()
    return {"trace_id": format(sc.trace_id, "032x"), "span_id": format(sc.span_id, "016x")}
