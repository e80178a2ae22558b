"""API-server side: ``EngineClient.add_requests`` preprocesses a task and sends it to the engine."""

from __future__ import annotations

import time
import traceback
from copy import copy

from fastdeploy.metrics import trace as tracing
from fastdeploy.trace.constants import LoggingEventName
from fastdeploy.trace.trace_logger import print as trace_print
from fastdeploy.utils import api_server_logger


class EngineError(Exception):
    pass


class EngineClient:
    def __init__(self, send) -> None:
        self._send = send  # puts a task dict on the wire to the engine

    def add_requests(self, task: dict) -> None:
        task.setdefault("metrics", {})["preprocess_start_time"] = time.time()
        request_id = task["request_id"].split("_")[0]
        tracing.trace_slice_start(tracing.TraceSpanName.PREPROCESSING, request_id)
        trace_print(LoggingEventName.PREPROCESSING_START, task["request_id"], task.get("user", ""))
        try:
            if not task.get("prompt"):
                raise ValueError("the prompt is empty")
            task["prompt_token_ids_len"] = len(task["prompt"].split())
        except Exception as e:
            api_server_logger.error(f"add_requests error: {e}, {str(traceback.format_exc())}")
            raise EngineError(str(e))
        base, index = task["request_id"].rsplit("_", 1)
        task["trace_carrier"] = tracing.trace_get_proc_propagate_context(base)
        n = task.get("n", 1)
        for i in range(int(index) * n, (int(index) + 1) * n):
            child = copy(task)
            child["request_id"] = f"{base}_{i}"
            self._send(child)
        tracing.trace_slice_end(tracing.TraceSpanName.PREPROCESSING, base, thread_finish_flag=True)
