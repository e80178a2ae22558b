"""The span plan: which lifecycle event opens, closes or decorates which span.

This table is the whole mapping from FastDeploy's flat events to the span tree::

    request span (fastdeploy.request)
    ├── PREPROCESSING
    ├── SCHEDULE            events: CACHE_HIT, CACHE_MISS, CACHE_SWAP_IN
    │   ├── REQUEST_QUEUE
    │   ├── ASK_DECODE_RESOURCE            (PD prefill instance)
    │   ├── RESOURCE_ALLOCATE
    │   └── PREPARE_PREFIX_CACHE
    ├── PREFILL             events: FIRST_TOKEN_GENERATED
    ├── DECODE              events: PREEMPTED, RESCHEDULED_INFERENCE_START
    │   ├── DECODE_PROCESS_PREALLOCATE_REQUEST   (PD decode instance)
    │   └── DECODE_PROCESS_PREFILLED_REQUEST     (PD decode instance)
    └── POSTPROCESSING
        ├── CHECK_CACHE_TRANSFER           (PD prefill instance)
        └── WRITE_CACHE_TO_STORAGE

A sub-stage or point event whose stage span is not open opens it implicitly; an implicitly
opened stage ends with its last activity instead of being reported as unterminated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from .events import EVENT_TO_STAGE_MAP, StageName
from .events import LoggingEventName as E

REQUEST_SPAN_NAME = "fastdeploy.request"

# Stage spans in lifecycle order; opening one ends any implicitly opened stage before it.
STAGE_ORDER: tuple[str, ...] = tuple(s.value for s in StageName)

# Stages that FastDeploy starts in one process and ends in another: inject() hands the open span
# (its id and start time) to the carrier, and the receiving process ends it.
CROSS_PROCESS_STAGES: frozenset[str] = frozenset({StageName.PREPROCESSING.value, StageName.POSTPROCESSING.value})


class Action(Enum):
    OPEN = "open"  # start the span `span`
    CLOSE = "close"  # end the span `span`
    POINT = "point"  # a span event on `span`
    POINT_CLOSE = "point+close"  # a span event on `span`, then end it


@dataclass(frozen=True)
class Step:
    """What one event does: `action` on the span named `span`, whose parent is `stage`
    (or the request span when `span` is itself a stage)."""

    action: Action
    span: str
    stage: str
    # For OPEN of a stage: when this span is open, the event is a point event on it instead.
    # (On a PD decode instance INFERENCE_START comes inside DECODE; it must not open a PREFILL.)
    unless_open: str | None = None
    # Extra spans this event also ends (INFERENCE_END ends a PREFILL left open).
    also_closes: tuple[str, ...] = ()

    # `span` is itself a stage: set from the fields, a plain attribute (a property is a call on every event)
    is_stage: bool = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "is_stage", self.span == self.stage)


def _pairs() -> dict[E, Step]:
    plan: dict[E, Step] = {}

    def stage(start: E, end: E, span: str) -> None:
        plan[start] = Step(Action.OPEN, span, span)
        plan[end] = Step(Action.CLOSE, span, span)

    def sub(start: E, end: E, span: str) -> None:
        st = EVENT_TO_STAGE_MAP[start].value
        plan[start] = Step(Action.OPEN, span, st)
        plan[end] = Step(Action.CLOSE, span, st)

    def point(event: E) -> None:
        st = EVENT_TO_STAGE_MAP[event].value
        plan[event] = Step(Action.POINT, st, st)

    stage(E.PREPROCESSING_START, E.PREPROCESSING_END, "PREPROCESSING")
    stage(E.REQUEST_SCHEDULE_START, E.REQUEST_SCHEDULE_END, "SCHEDULE")
    stage(E.DECODE_START, E.INFERENCE_END, "DECODE")
    stage(E.POSTPROCESSING_START, E.POSTPROCESSING_END, "POSTPROCESSING")
    plan[E.INFERENCE_START] = Step(Action.OPEN, "PREFILL", "PREFILL", unless_open="DECODE")
    plan[E.FIRST_TOKEN_GENERATED] = Step(Action.POINT_CLOSE, "PREFILL", "PREFILL")
    plan[E.PREFILL_INFERENCE_END] = Step(Action.CLOSE, "PREFILL", "PREFILL")
    plan[E.INFERENCE_END] = Step(Action.CLOSE, "DECODE", "DECODE", also_closes=("PREFILL",))
    plan[E.DECODE_INFERENCE_END] = Step(Action.CLOSE, "DECODE", "DECODE", also_closes=("PREFILL",))

    sub(E.REQUEST_QUEUE_START, E.REQUEST_QUEUE_END, "REQUEST_QUEUE")
    sub(E.RESOURCE_ALLOCATE_START, E.RESOURCE_ALLOCATE_END, "RESOURCE_ALLOCATE")
    sub(E.PREPARE_PREFIX_CACHE_START, E.PREPARE_PREFIX_CACHE_END, "PREPARE_PREFIX_CACHE")
    sub(E.ASK_DECODE_RESOURCE_START, E.ASK_DECODE_RESOURCE_END, "ASK_DECODE_RESOURCE")
    sub(E.CHECK_CACHE_TRANSFER_START, E.CHECK_CACHE_TRANSFER_END, "CHECK_CACHE_TRANSFER")
    sub(E.WRITE_CACHE_TO_STORAGE_START, E.WRITE_CACHE_TO_STORAGE_END, "WRITE_CACHE_TO_STORAGE")
    sub(
        E.DECODE_PROCESS_PREALLOCATE_REQUEST_START,
        E.DECODE_PROCESS_PREALLOCAT_REQUEST_END,
        "DECODE_PROCESS_PREALLOCATE_REQUEST",
    )
    sub(
        E.DECODE_PROCESS_PREFILLED_REQUEST_START,
        E.DECODE_PROCESS_PREFILLED_REQUEST_END,
        "DECODE_PROCESS_PREFILLED_REQUEST",
    )

    for ev in (E.CACHE_HIT, E.CACHE_MISS, E.CACHE_SWAP_IN, E.PREEMPTED, E.RESCHEDULED_INFERENCE_START):
        point(ev)
    return plan


PLAN: dict[E, Step] = _pairs()

assert set(PLAN) == set(E), "every event needs a step in the span plan"
