"""``print(event, request_id, user)``: one trace.log line, with the trace_id of the request when known."""

from fastdeploy.metrics.trace import get_trace_info_for_request
from fastdeploy.trace.constants import EVENT_TO_STAGE_MAP
from fastdeploy.utils import trace_logger


def print(event, request_id, user):
    try:
        info = get_trace_info_for_request(request_id)
        trace_logger.info("", extra={"attributes": {
            "request_id": f"{request_id}", "user_id": f"{user}", "event": event.value,
            "stage": EVENT_TO_STAGE_MAP.get(event).value, "trace_id": info["trace_id"] if info else "unknown",
        }}, stacklevel=2)
    except Exception:
        pass
