"""``OpenAIServingChat.create_chat_completion``: request start, preprocessing, the wait, postprocessing."""

from __future__ import annotations

import time
import traceback

from fastdeploy.entrypoints.engine_client import EngineError
from fastdeploy.metrics import trace as tracing
from fastdeploy.trace.constants import LoggingEventName
from fastdeploy.trace.trace_logger import print as trace_print
from fastdeploy.utils import api_server_logger


class OpenAIServingChat:
    def __init__(self, engine_client, wait_result) -> None:
        self.engine_client = engine_client
        self.wait_result = wait_result  # request_id -> the engine's final result dict

    def create_chat_completion(self, request: dict, trace_context=None) -> dict:
        request_id = f"chatcmpl-{request['request_id']}"
        tracing.trace_req_start(rid=request_id, trace_content=trace_context, role="FastDeploy")
        try:
            task = {"request_id": f"{request_id}_0", "prompt": request.get("prompt", ""),
                    "user": request.get("user", ""), "max_tokens": request.get("max_tokens", 4)}
            try:
                self.engine_client.add_requests(task)
            except EngineError as e:
                return {"id": request_id, "error": str(e)}
            try:
                data = self.wait_result(f"{request_id}_0")
                if data.get("finished") and data.get("trace_carrier"):
                    tracing.trace_set_proc_propagate_context(request_id, data["trace_carrier"])
                    tracing.trace_report_span(tracing.TraceSpanName.POSTPROCESSING, request_id, time.time_ns(),
                                              time.time_ns())
                if data.get("error"):
                    raise RuntimeError(data["error"])
                return {"id": request_id, "text": data["text"]}
            except Exception as e:
                api_server_logger.error(f"request[{request_id}] generator error: {str(e)}, {str(traceback.format_exc())}")
                return {"id": request_id, "error": str(e)}
        finally:
            tracing.trace_req_finish(request_id)
            trace_print(LoggingEventName.POSTPROCESSING_END, request_id, request.get("user", ""))
