"""The engine's token processor thread: first token, completion, and the result back to the API server."""

from __future__ import annotations

import time
import traceback

from fastdeploy.metrics import trace as tracing
from fastdeploy.trace.constants import LoggingEventName
from fastdeploy.trace.trace_logger import print as trace_print
from fastdeploy.utils import llm_logger


class TokenProcessor:
    def __init__(self, engine) -> None:
        self.engine = engine

    def process_sampling_results(self) -> None:
        tracing.trace_set_thread_info("Token Processor")
        while True:
            task = self.engine.worker.get()
            if task is None:
                return
            rid = task.request_id.split("_")[0]
            tracing.trace_set_proc_propagate_context(rid, task.trace_carrier,
                                                     int(task.metrics["inference_start_time"] * 1e9))
            try:
                self._generate(task, rid)
            except Exception as e:
                llm_logger.error(f"Error in token processor for {task.request_id}: {e}, {traceback.format_exc()!s}")
                self.engine.send({"request_id": task.request_id, "finished": True, "error": str(e),
                                  "trace_carrier": tracing.trace_get_proc_propagate_context(rid)})

    def _generate(self, task, rid: str) -> None:
        if "boom" in task.prompt:
            raise IndexError(f"index {len(task.prompt)} is out of bounds for the vocabulary")
        time.sleep(0.01)
        if self.engine.role == "mixed":
            trace_print(LoggingEventName.FIRST_TOKEN_GENERATED, task.request_id, task.user)
            tracing.trace_report_span(tracing.TraceSpanName.PREFILL, rid,
                                      int(task.metrics["inference_start_time"] * 1e9), time.time_ns())
        if self.engine.role == "prefill":
            trace_print(LoggingEventName.PREFILL_INFERENCE_END, task.request_id, task.user)
            trace_print(LoggingEventName.CHECK_CACHE_TRANSFER_START, task.request_id, task.user)
            trace_print(LoggingEventName.CHECK_CACHE_TRANSFER_END, task.request_id, task.user)
            carrier = tracing.trace_get_proc_propagate_context(rid)
            self.engine.send({"request_id": task.request_id, "prefilled": True, "trace_carrier": carrier})
            return
        trace_print(LoggingEventName.DECODE_START, task.request_id, task.user)
        time.sleep(0.01)
        carrier = tracing.trace_get_proc_propagate_context(rid=rid)
        tracing.trace_report_span(tracing.TraceSpanName.DECODE, rid, int(task.metrics["inference_start_time"] * 1e9),
                                  time.time_ns(), thread_finish_flag=True)
        end = LoggingEventName.DECODE_INFERENCE_END if self.engine.role == "decode" else LoggingEventName.INFERENCE_END
        trace_print(end, task.request_id, task.user)
        trace_print(LoggingEventName.POSTPROCESSING_START, task.request_id, task.user)
        self.engine.send({"request_id": task.request_id, "finished": True, "text": "ok " * task.max_tokens,
                          "trace_carrier": carrier})
