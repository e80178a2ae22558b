"""FastDeploy's lifecycle event vocabulary: the events, the stages, and which stage each event belongs to.

Names and values are FastDeploy's (``fastdeploy/trace/constants.py``), so existing ``trace_print``
call sites keep working.  ``CACHE_SWAP_IN`` is new here.
"""

from __future__ import annotations

from enum import Enum


class StageName(str, Enum):
    PREPROCESSING = "PREPROCESSING"
    SCHEDULE = "SCHEDULE"
    PREFILL = "PREFILL"
    DECODE = "DECODE"
    POSTPROCESSING = "POSTPROCESSING"


class LoggingEventName(str, Enum):
    PREPROCESSING_START = "PREPROCESSING_START"
    PREPROCESSING_END = "PREPROCESSING_END"
    REQUEST_SCHEDULE_START = "REQUEST_SCHEDULE_START"
    REQUEST_QUEUE_START = "REQUEST_QUEUE_START"
    REQUEST_QUEUE_END = "REQUEST_QUEUE_END"
    RESOURCE_ALLOCATE_START = "RESOURCE_ALLOCATE_START"
    PREPARE_PREFIX_CACHE_START = "PREPARE_PREFIX_CACHE_START"
    PREPARE_PREFIX_CACHE_END = "PREPARE_PREFIX_CACHE_END"
    RESOURCE_ALLOCATE_END = "RESOURCE_ALLOCATE_END"
    REQUEST_SCHEDULE_END = "REQUEST_SCHEDULE_END"
    CACHE_HIT = "CACHE_HIT"
    CACHE_MISS = "CACHE_MISS"
    CACHE_SWAP_IN = "CACHE_SWAP_IN"
    INFERENCE_START = "INFERENCE_START"
    FIRST_TOKEN_GENERATED = "FIRST_TOKEN_GENERATED"
    DECODE_START = "DECODE_START"
    PREEMPTED = "PREEMPTED"
    RESCHEDULED_INFERENCE_START = "RESCHEDULED_INFERENCE_START"
    INFERENCE_END = "INFERENCE_END"
    WRITE_CACHE_TO_STORAGE_START = "WRITE_CACHE_TO_STORAGE_START"
    WRITE_CACHE_TO_STORAGE_END = "WRITE_CACHE_TO_STORAGE_END"
    POSTPROCESSING_START = "POSTPROCESSING_START"
    POSTPROCESSING_END = "POSTPROCESSING_END"
    # PD disaggregation, prefill instance
    ASK_DECODE_RESOURCE_START = "ASK_DECODE_RESOURCE_START"
    ASK_DECODE_RESOURCE_END = "ASK_DECODE_RESOURCE_END"
    CHECK_CACHE_TRANSFER_START = "CHECK_CACHE_TRANSFER_START"
    CHECK_CACHE_TRANSFER_END = "CHECK_CACHE_TRANSFER_END"
    PREFILL_INFERENCE_END = "PREFILL_INFERENCE_END"
    # PD disaggregation, decode instance
    DECODE_PROCESS_PREALLOCATE_REQUEST_START = "DECODE_PROCESS_PREALLOCATE_REQUEST_START"
    # FastDeploy's own spelling (missing the final "E"); the corrected spelling is an alias, see ALIASES.
    DECODE_PROCESS_PREALLOCAT_REQUEST_END = "DECODE_PROCESS_PREALLOCAT_REQUEST_END"
    DECODE_PROCESS_PREFILLED_REQUEST_START = "DECODE_PROCESS_PREFILLED_REQUEST_START"
    DECODE_PROCESS_PREFILLED_REQUEST_END = "DECODE_PROCESS_PREFILLED_REQUEST_END"
    DECODE_INFERENCE_END = "DECODE_INFERENCE_END"


E, S = LoggingEventName, StageName

EVENT_TO_STAGE_MAP: dict[LoggingEventName, StageName] = {
    E.PREPROCESSING_START: S.PREPROCESSING,
    E.PREPROCESSING_END: S.PREPROCESSING,
    E.REQUEST_SCHEDULE_START: S.SCHEDULE,
    E.REQUEST_QUEUE_START: S.SCHEDULE,
    E.REQUEST_QUEUE_END: S.SCHEDULE,
    E.RESOURCE_ALLOCATE_START: S.SCHEDULE,
    E.PREPARE_PREFIX_CACHE_START: S.SCHEDULE,
    E.PREPARE_PREFIX_CACHE_END: S.SCHEDULE,
    E.RESOURCE_ALLOCATE_END: S.SCHEDULE,
    E.REQUEST_SCHEDULE_END: S.SCHEDULE,
    E.CACHE_HIT: S.SCHEDULE,
    E.CACHE_MISS: S.SCHEDULE,
    E.CACHE_SWAP_IN: S.SCHEDULE,
    E.INFERENCE_START: S.PREFILL,
    E.FIRST_TOKEN_GENERATED: S.PREFILL,
    E.DECODE_START: S.DECODE,
    E.PREEMPTED: S.DECODE,
    E.RESCHEDULED_INFERENCE_START: S.DECODE,
    E.INFERENCE_END: S.DECODE,
    E.WRITE_CACHE_TO_STORAGE_START: S.POSTPROCESSING,
    E.WRITE_CACHE_TO_STORAGE_END: S.POSTPROCESSING,
    E.POSTPROCESSING_START: S.POSTPROCESSING,
    E.POSTPROCESSING_END: S.POSTPROCESSING,
    E.ASK_DECODE_RESOURCE_START: S.SCHEDULE,
    E.ASK_DECODE_RESOURCE_END: S.SCHEDULE,
    E.CHECK_CACHE_TRANSFER_START: S.POSTPROCESSING,
    E.CHECK_CACHE_TRANSFER_END: S.POSTPROCESSING,
    E.PREFILL_INFERENCE_END: S.PREFILL,
    E.DECODE_PROCESS_PREALLOCATE_REQUEST_START: S.DECODE,
    E.DECODE_PROCESS_PREALLOCAT_REQUEST_END: S.DECODE,
    E.DECODE_PROCESS_PREFILLED_REQUEST_START: S.DECODE,
    E.DECODE_PROCESS_PREFILLED_REQUEST_END: S.DECODE,
    E.DECODE_INFERENCE_END: S.DECODE,
}

# Other spellings accepted for an event (FastDeploy's docs spell this one correctly; its code does not).
ALIASES: dict[str, LoggingEventName] = {
    "DECODE_PROCESS_PREALLOCATE_REQUEST_END": E.DECODE_PROCESS_PREALLOCAT_REQUEST_END,
}

# One dict for the hot path: an enum member or its string (or an alias) -> the member.
_LOOKUP: dict[object, LoggingEventName] = {m: m for m in E}
_LOOKUP.update({m.value: m for m in E})
_LOOKUP.update(ALIASES)


class UnknownEventError(ValueError):
    """An event name that is not in FastDeploy's vocabulary."""


def lookup(event: object) -> LoggingEventName | None:
    """The event for an enum member, its name or an alias; None when unknown."""
    try:
        return _LOOKUP.get(event)
    except Exception:  # unhashable input, or a __hash__/__eq__ that raises
        return None


def parse_event(event: object) -> LoggingEventName:
    """Like lookup, but an unknown name is an error that lists what is accepted."""
    found = lookup(event)
    if found is None:
        try:
            shown = repr(event)[:64]
        except Exception:
            shown = f"<unprintable {type(event).__name__}>"
        raise UnknownEventError(
            f"unknown FastDeploy trace event {shown}; expected a LoggingEventName "
            f"(e.g. 'PREPROCESSING_START') or one of the aliases {sorted(ALIASES)}"
        )
    return found
