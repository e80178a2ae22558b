"""FastDeploy's documented event sequences per role, as data (docs/online_serving/metrics.md, plus the
REQUEST_SCHEDULE_* pair the code prints).  The tests and the bench replay them."""

from __future__ import annotations

from typing import Any

from fastdeploy_otel.events import LoggingEventName as E

Lifecycle = list[tuple[E, dict[str, Any]]]

# Every START/END pair of a mixed (non-PD) request, plus the cache decisions and the first token.
MIXED: Lifecycle = [
    (E.PREPROCESSING_START, {"model": "tiny", "operation": "chat", "input_tokens": 48}),
    (E.PREPROCESSING_END, {}),
    (E.REQUEST_SCHEDULE_START, {}),
    (E.REQUEST_QUEUE_START, {}),
    (E.REQUEST_QUEUE_END, {}),
    (E.RESOURCE_ALLOCATE_START, {}),
    (E.PREPARE_PREFIX_CACHE_START, {}),
    (E.CACHE_HIT, {"matched_tokens": 16, "matched_blocks": 1, "source_tier": "gpu"}),
    (E.CACHE_SWAP_IN, {"swapped_in_blocks": 1, "swapped_in_bytes": 8192, "matched_tokens": 16, "source_tier": "cpu"}),
    (E.CACHE_MISS, {"missed_tokens": 16}),
    (E.PREPARE_PREFIX_CACHE_END, {}),
    (E.RESOURCE_ALLOCATE_END, {}),
    (E.REQUEST_SCHEDULE_END, {}),
    (E.INFERENCE_START, {}),
    (E.FIRST_TOKEN_GENERATED, {}),
    (E.DECODE_START, {}),
    (E.INFERENCE_END, {"output_tokens": 16, "finish_reasons": ["stop"]}),
    (E.POSTPROCESSING_START, {}),
    (E.WRITE_CACHE_TO_STORAGE_START, {}),
    (E.WRITE_CACHE_TO_STORAGE_END, {}),
    (E.POSTPROCESSING_END, {}),
]

# PD disaggregation, prefill instance.
PD_PREFILL: Lifecycle = [
    (E.PREPROCESSING_START, {}),
    (E.PREPROCESSING_END, {}),
    (E.REQUEST_SCHEDULE_START, {}),
    (E.REQUEST_QUEUE_START, {}),
    (E.REQUEST_QUEUE_END, {}),
    (E.ASK_DECODE_RESOURCE_START, {}),
    (E.ASK_DECODE_RESOURCE_END, {}),
    (E.RESOURCE_ALLOCATE_START, {}),
    (E.CACHE_MISS, {"missed_tokens": 48}),
    (E.RESOURCE_ALLOCATE_END, {}),
    (E.REQUEST_SCHEDULE_END, {}),
    (E.INFERENCE_START, {}),
    (E.PREFILL_INFERENCE_END, {}),
    (E.CHECK_CACHE_TRANSFER_START, {}),
    (E.CHECK_CACHE_TRANSFER_END, {}),
]

# PD disaggregation, decode instance (after the prefill instance sent the first token).
PD_DECODE: Lifecycle = [
    (E.REQUEST_SCHEDULE_START, {}),
    (E.REQUEST_QUEUE_START, {}),
    (E.REQUEST_QUEUE_END, {}),
    (E.REQUEST_SCHEDULE_END, {}),
    (E.DECODE_PROCESS_PREALLOCATE_REQUEST_START, {}),
    (E.DECODE_PROCESS_PREALLOCAT_REQUEST_END, {}),
    (E.DECODE_PROCESS_PREFILLED_REQUEST_START, {}),
    (E.DECODE_PROCESS_PREFILLED_REQUEST_END, {}),
    (E.INFERENCE_START, {}),
    (E.DECODE_INFERENCE_END, {}),
    (E.POSTPROCESSING_START, {}),
    (E.POSTPROCESSING_END, {}),
]
