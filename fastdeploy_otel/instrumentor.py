"""``FastDeployInstrumentor``: the opentelemetry-python-contrib way to switch tracing on and off.

    FastDeployInstrumentor().instrument()          # = configure(), from the environment
    FastDeployInstrumentor().uninstrument()        # = shutdown(), flushing everything

Registered as an ``opentelemetry_instrumentor`` entry point, so ``opentelemetry-instrument`` turns
it on too; it then attaches to the provider that opentelemetry-instrument set up.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from opentelemetry.instrumentation.instrumentor import BaseInstrumentor  # type: ignore[attr-defined]

from . import api


class FastDeployInstrumentor(BaseInstrumentor):
    def instrumentation_dependencies(self) -> Collection[str]:
        return ()

    def _instrument(self, **kwargs: Any) -> None:
        kwargs.pop("tracer_provider", None)  # we attach to the global SDK provider when there is one
        api.configure(**kwargs)

    def _uninstrument(self, **kwargs: Any) -> None:
        api.shutdown()
