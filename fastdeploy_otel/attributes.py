"""Attribute names, in one place, and how ``trace_print(**attributes)`` keywords map onto them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# On every span this package builds.
REQUEST_ID = "fastdeploy.request_id"
USER_ID = "fastdeploy.user_id"
STAGE = "fastdeploy.stage"

# Markers for sequences that went wrong; never raised, always visible on the span.
ANOMALY = "fastdeploy.anomaly"
IMPLICIT_START = "fastdeploy.implicit_start"
ABORTED = "fastdeploy.aborted"
ABORT_REASON = "fastdeploy.abort_reason"
# Spans rebuilt from trace.log by `fastdeploy-otel replay`; a lifecycle cut short there is "incomplete".
REPLAYED = "fastdeploy.replayed"
INCOMPLETE = "incomplete"

# Cache decision events on the SCHEDULE span.
CACHE_MATCHED_TOKENS = "fastdeploy.cache.matched_tokens"
CACHE_MATCHED_BLOCKS = "fastdeploy.cache.matched_blocks"
CACHE_MISSED_TOKENS = "fastdeploy.cache.missed_tokens"
CACHE_SWAPPED_IN_BLOCKS = "fastdeploy.cache.swapped_in_blocks"
CACHE_SWAPPED_IN_BYTES = "fastdeploy.cache.swapped_in_bytes"
CACHE_SOURCE_TIER = "fastdeploy.cache.source_tier"

# OTel GenAI semantic conventions, set on the request span.
GEN_AI_OPERATION_NAME = "gen_ai.operation.name"
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
GEN_AI_USAGE_INPUT_TOKENS = "gen_ai.usage.input_tokens"
GEN_AI_USAGE_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS = "gen_ai.usage.cache_read.input_tokens"
GEN_AI_RESPONSE_FINISH_REASONS = "gen_ai.response.finish_reasons"
GEN_AI_RESPONSE_ID = "gen_ai.response.id"
GEN_AI_REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
GEN_AI_REQUEST_TEMPERATURE = "gen_ai.request.temperature"
GEN_AI_REQUEST_TOP_P = "gen_ai.request.top_p"
# Content: recorded only when the operator opts in (FD_TRACE_CAPTURE_CONTENT=true).
GEN_AI_INPUT_MESSAGES = "gen_ai.input.messages"
GEN_AI_OUTPUT_MESSAGES = "gen_ai.output.messages"
ERROR_TYPE = "error.type"

# trace_print keywords that describe the whole request: they go on the request span.
REQUEST_KEYWORDS: dict[str, str] = {
    "operation": GEN_AI_OPERATION_NAME,
    "model": GEN_AI_REQUEST_MODEL,
    "input_tokens": GEN_AI_USAGE_INPUT_TOKENS,
    "output_tokens": GEN_AI_USAGE_OUTPUT_TOKENS,
    "cached_tokens": GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS,
    "finish_reasons": GEN_AI_RESPONSE_FINISH_REASONS,
    "response_id": GEN_AI_RESPONSE_ID,
    "max_tokens": GEN_AI_REQUEST_MAX_TOKENS,
    "temperature": GEN_AI_REQUEST_TEMPERATURE,
    "top_p": GEN_AI_REQUEST_TOP_P,
}
# Keywords that carry prompt or completion text; dropped unless content capture is on.
CONTENT_KEYWORDS: dict[str, str] = {
    "prompt": GEN_AI_INPUT_MESSAGES,
    "completion": GEN_AI_OUTPUT_MESSAGES,
}
# Keywords of the cache events (and anything else) get the "fastdeploy." prefix.
_PREFIX = "fastdeploy."
_CACHE_KEYWORDS = {
    "matched_tokens": CACHE_MATCHED_TOKENS,
    "matched_blocks": CACHE_MATCHED_BLOCKS,
    "missed_tokens": CACHE_MISSED_TOKENS,
    "swapped_in_blocks": CACHE_SWAPPED_IN_BLOCKS,
    "swapped_in_bytes": CACHE_SWAPPED_IN_BYTES,
    "source_tier": CACHE_SOURCE_TIER,
}

AttributeValue = Any


_INT64 = (-(2**63), 2**63 - 1)


def text(value: object) -> str:
    """str(value) as a plain ``str``, even for an object whose __str__ raises: tracing must not fail
    on odd input, and a str subclass (which may format, compare or hash as it likes) never gets into
    a line or a key."""
    if type(value) is str:
        return value
    try:
        out = value if isinstance(value, str) else str(value)
        return out if type(out) is str else str.__str__(out)
    except Exception:
        return f"<unprintable {type(value).__name__}>"


# Values a client chooses (request id, user) are capped on spans as in trace.log: 256 characters.
MAX_CLIENT_VALUE_LEN = 256


def capped(value: str) -> str:
    """A client-chosen string as a span attribute: cut at MAX_CLIENT_VALUE_LEN and marked."""
    if len(value) <= MAX_CLIENT_VALUE_LEN:
        return value
    return f"{value[:MAX_CLIENT_VALUE_LEN]}...(+{len(value) - MAX_CLIENT_VALUE_LEN} chars)"


def clean(value: Any) -> AttributeValue:
    """An OTel-legal attribute value: str, bool, int64, float or a homogeneous list of them, of the
    builtin types themselves: a subclass (an application's IntEnum, a str subclass) would be pickled
    by its class, which the export process cannot import.  Never raises: what cannot be read is text."""
    kind = type(value)
    if kind is str or kind is bool or kind is float:
        return value
    if kind is int:
        return value if _INT64[0] <= value <= _INT64[1] else str(value)  # OTLP ints are int64
    try:
        if isinstance(value, int):
            return clean(int(value))
        if isinstance(value, float):
            return float(value)
        if isinstance(value, (list, tuple)):
            items = [clean(v) if isinstance(v, (str, bool, int, float)) else text(v) for v in value]
            if len({type(v) for v in items}) > 1:
                items = [text(v) for v in items]
            return items
    except Exception:  # an int or float subclass whose conversion raises, a list that cannot be read
        pass
    return text(value)


def clean_all(attributes: Any) -> dict[str, AttributeValue]:
    """Attributes from outside (a carrier, a caller of a span's API): string keys, legal values;
    anything else dropped."""
    if not isinstance(attributes, Mapping):
        return {}
    return {k: clean(v) for k, v in attributes.items() if isinstance(k, str) and v is not None}


def split_keywords(
    kwargs: dict[str, Any], capture_content: bool
) -> tuple[dict[str, AttributeValue], dict[str, AttributeValue]]:
    """Split trace_print keywords into (request-span attributes, event/span attributes)."""
    request: dict[str, AttributeValue] = {}
    local: dict[str, AttributeValue] = {}
    for key, value in kwargs.items():
        if value is None:
            continue
        if key in REQUEST_KEYWORDS:
            request[REQUEST_KEYWORDS[key]] = clean(value)
        elif key in CONTENT_KEYWORDS:
            if capture_content:
                request[CONTENT_KEYWORDS[key]] = clean(value)
        elif key.startswith("gen_ai."):
            request[key] = clean(value)
        elif key in _CACHE_KEYWORDS:
            local[_CACHE_KEYWORDS[key]] = clean(value)
        else:
            local[key if "." in key else _PREFIX + key] = clean(value)
    return request, local
