"""The carrier that crosses processes: W3C ``traceparent`` plus the stage spans handed over.

A carrier is a flat ``dict[str, str]`` (FastDeploy's ``trace_carrier``), so it fits a ZMQ message,
a JSON body or HTTP headers alike::

    traceparent        00-<trace_id>-<request span id>-<flags>
    fastdeploy-stages  [{"n": "PREPROCESSING", "s": "<span id hex>", "t": <start ns>, "a": {...}, "e": [...]}]
    fastdeploy-error   <exception type>   (only after record_error)
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .attributes import clean_all, text
from .span_plan import CROSS_PROCESS_STAGES

TRACEPARENT = "traceparent"
STAGES = "fastdeploy-stages"
ERROR = "fastdeploy-error"
MAX_STAGES_LEN = 16_384  # a carrier bigger than this drops the handed-over attributes and events

_TRACEPARENT_RE = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
# Made once: json.dumps with options builds an encoder per call, a third of the carrier's cost.
_dumps = json.JSONEncoder(separators=(",", ":"), default=str).encode
_SPAN_ID_RE = re.compile(r"^[0-9a-f]{16}$")


def _time(value: Any) -> int:
    """A carried timestamp: epoch ns that fits OTLP's fixed64 and is not absurd (after 2000, before 2262)."""
    ns = int(value)
    if not 946_684_800_000_000_000 <= ns < 2**63:
        raise ValueError("timestamp out of range")
    return ns


class CarrierError(ValueError):
    """A carrier that cannot be read; the message says which part."""


@dataclass
class HandedSpan:
    """A stage span opened in one process and ended in another."""

    name: str
    span_id: int
    start_ns: int
    attributes: dict[str, Any] = field(default_factory=dict)
    events: list[tuple[str, int, dict[str, Any]]] = field(default_factory=list)


@dataclass
class Carried:
    trace_id: int
    span_id: int
    sampled: bool
    stages: list[HandedSpan]
    error: str | None


def encode(trace_id: int, span_id: int, sampled: bool, stages: list[HandedSpan], error: str | None) -> dict[str, str]:
    carrier = {TRACEPARENT: f"00-{trace_id:032x}-{span_id:016x}-{'01' if sampled else '00'}"}
    if stages:
        items = []
        for s in stages:  # an empty "a" or "e" is left out (decode reads a missing one as empty)
            item: dict[str, Any] = {"n": s.name, "s": f"{s.span_id:016x}", "t": s.start_ns}
            if s.attributes:
                item["a"] = s.attributes
            if s.events:
                item["e"] = s.events
            items.append(item)
        text = _dumps(items)
        if len(text) > MAX_STAGES_LEN:
            text = _dumps([{"n": s.name, "s": f"{s.span_id:016x}", "t": s.start_ns} for s in stages])
        carrier[STAGES] = text
    if error:
        carrier[ERROR] = error[:128]
    return carrier


def decode(carrier: Mapping[str, Any]) -> Carried:
    """Read a carrier; raises CarrierError naming the bad part."""
    if not isinstance(carrier, Mapping):
        raise CarrierError(f"carrier is a {type(carrier).__name__}, not a mapping")
    tp = carrier.get(TRACEPARENT)
    m = None
    if isinstance(tp, str):  # as written (the common case), else as W3C allows it to arrive
        m = _TRACEPARENT_RE.match(tp) or _TRACEPARENT_RE.match(tp.strip().lower())
    if m is None:
        raise CarrierError("traceparent is missing or malformed")
    trace_id, span_id, flags = int(m.group(1), 16), int(m.group(2), 16), int(m.group(3), 16)
    if trace_id == 0 or span_id == 0:
        raise CarrierError("traceparent has an all-zero id")
    stages: list[HandedSpan] = []
    raw = carrier.get(STAGES)
    if raw is not None:
        try:
            items = json.loads(raw) if isinstance(raw, str) and len(raw) <= 4 * MAX_STAGES_LEN else None
            if not isinstance(items, list):
                raise ValueError
            for it in items:
                name, sid, start = it["n"], it["s"], _time(it["t"])
                if (
                    name not in CROSS_PROCESS_STAGES
                    or not isinstance(sid, str)
                    or not _SPAN_ID_RE.match(sid)
                    or sid == "0" * 16
                ):
                    raise ValueError
                events = [(text(n), _time(t), clean_all(a)) for n, t, a in it.get("e") or []]
                stages.append(HandedSpan(name, int(sid, 16), start, clean_all(it.get("a")), events))
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise CarrierError(f"{STAGES} is malformed") from exc
    error = carrier.get(ERROR)
    return Carried(trace_id, span_id, bool(flags & 1), stages, str(error)[:128] if error else None)
