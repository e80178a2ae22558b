"""The engine's request object; ``from_dict`` is how a task dict from the API server becomes one."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Request:
    request_id: str
    prompt: str = ""
    user: str = ""
    max_tokens: int = 4
    trace_carrier: Any = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> "Request":
        return cls(request_id=d["request_id"], prompt=d.get("prompt", ""), user=d.get("user", ""),
                   max_tokens=d.get("max_tokens", 4), trace_carrier=d.get("trace_carrier", {}),
                   metrics=dict(d.get("metrics") or {}))
