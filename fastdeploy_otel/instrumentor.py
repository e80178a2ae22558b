"""``FastDeployInstrumentor``: trace a stock FastDeploy without editing it (opentelemetry-python-contrib style).

    FastDeployInstrumentor().instrument()      # before or after FastDeploy is imported
    FastDeployInstrumentor().uninstrument()    # every original back, tracing flushed and stopped

Registered as an ``opentelemetry_instrumentor`` entry point, so ``opentelemetry-instrument`` and
``fastdeploy-otel run`` turn it on too.  It replaces ``fastdeploy.trace.trace_logger.print`` and the
``fastdeploy.metrics.trace`` functions with ``_fd_takeover``'s, reads the carrier in
``Request.from_dict``, and puts ``_fd_errors``' handler on FastDeploy's loggers.  Tracing itself
(``configure()``: a worker thread, trace.log) starts only once a FastDeploy module is loaded, so a
process that never imports FastDeploy gets nothing: no thread, no directory, no file.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Collection
from types import ModuleType
from typing import Any

from opentelemetry.instrumentation.dependencies import DependencyConflict, get_dependency_conflicts
from opentelemetry.instrumentation.instrumentor import BaseInstrumentor  # type: ignore[attr-defined]

import fastdeploy_otel as fdt

from . import _fd_takeover as takeover
from ._fd_errors import Attachment
from ._fd_rebind import ImportHook, Patcher
from ._selflog import get_logger
from .package import _instruments, _instruments_any

logger = get_logger(__name__)

TRACE_LOGGER = "fastdeploy.trace.trace_logger"
CONSTANTS = "fastdeploy.trace.constants"
METRICS_TRACE = "fastdeploy.metrics.trace"
REQUEST = "fastdeploy.engine.request"


class FastDeployInstrumentor(BaseInstrumentor):
    """Takes over FastDeploy's tracing calls in this process (and, by inheritance, its forked children)."""

    _patcher: Patcher | None = None
    _hook: ImportHook | None = None
    _errors: Attachment | None = None
    _configure_kwargs: dict[str, Any] = {}
    _configured_by_us = False
    _lock = threading.RLock()

    def instrumentation_dependencies(self) -> Collection[str]:
        return _instruments + _instruments_any

    def _check_dependency_conflicts(self) -> DependencyConflict | None:
        # Any one FastDeploy distribution will do (they differ only by accelerator).
        return get_dependency_conflicts(_instruments, _instruments_any)

    # ---- switching on and off --------------------------------------------------------------------
    def _instrument(self, **kwargs: Any) -> None:
        kwargs.pop("skip_dep_check", None)
        self._configure_kwargs = kwargs  # tracer_provider and Settings overrides, used at the first FastDeploy import
        self._patcher = Patcher()
        self._errors = Attachment()
        takeover._on_init[:] = [self._ensure_configured]
        self._hook = ImportHook(
            {
                TRACE_LOGGER: self._guarded(self._patch_trace_logger),
                CONSTANTS: self._guarded(self._patch_constants),
                METRICS_TRACE: self._guarded(self._patch_metrics_trace),
                REQUEST: self._guarded(self._patch_request),
            }
        )
        self._hook.install()
        for name, patch in (
            (CONSTANTS, self._patch_constants),
            (TRACE_LOGGER, self._patch_trace_logger),
            (METRICS_TRACE, self._patch_metrics_trace),
            (REQUEST, self._patch_request),
        ):
            module = sys.modules.get(name)
            if module is not None:  # already imported: patch in place (copies of the names included)
                self._guarded(patch)(module)

    def _uninstrument(self, **kwargs: Any) -> None:
        with self._lock:
            if self._hook is not None:
                self._hook.remove()
            if self._patcher is not None:
                self._patcher.restore()
            if self._errors is not None:
                self._errors.detach()
            takeover._on_init.clear()
            takeover.reset()
            if self._configured_by_us:
                type(self)._configured_by_us = False
                fdt.shutdown()

    # ---- what happens when a FastDeploy module is loaded ----------------------------------------------
    def _guarded(self, patch: Callable[[ModuleType], None]) -> Callable[[ModuleType], None]:
        def run(module: ModuleType) -> None:
            try:
                with self._lock:
                    patch(module)
                    self._ensure_configured()
                    if self._errors is not None:
                        self._errors.attach()
            except Exception:
                logger.exception("could not take over %s; FastDeploy runs untraced there", module.__name__)

        return run

    def _patch(self) -> Patcher:
        if self._patcher is None:  # set by _instrument before any hook can run
            raise RuntimeError("FastDeployInstrumentor: not instrumented")
        return self._patcher

    def _patch_constants(self, module: ModuleType) -> None:
        events = getattr(module, "LoggingEventName", None)
        if events is not None:
            takeover.map_events(events)

    def _patch_trace_logger(self, module: ModuleType) -> None:
        constants = sys.modules.get(CONSTANTS)
        if constants is not None:
            self._patch_constants(constants)
        self._patch().replace(module, "print", takeover.trace_print)

    def _patch_metrics_trace(self, module: ModuleType) -> None:
        for name, replacement in takeover.METRICS_TRACE.items():
            if hasattr(module, name) or name in ("trace_slice", "get_trace_info_for_request"):
                self._patch().replace(module, name, replacement)

    def _patch_request(self, module: ModuleType) -> None:
        request_cls = getattr(module, "Request", None)
        original = request_cls.__dict__.get("from_dict") if request_cls is not None else None
        if isinstance(original, classmethod):
            self._patch().replace(request_cls, "from_dict", classmethod(takeover.from_dict_hook(original.__func__)))

    def _ensure_configured(self) -> None:
        """Start tracing the first time FastDeploy shows up, unless the application already did."""
        if fdt.settings() is not None or type(self)._configured_by_us:
            return
        fdt.configure(**self._configure_kwargs)
        type(self)._configured_by_us = True


def _reconfigure_after_fork() -> None:
    """A forked FastDeploy process (the engine, under multiprocessing's fork) traces on its own."""
    inst = FastDeployInstrumentor._instance
    if inst is not None and inst.is_instrumented_by_opentelemetry and FastDeployInstrumentor._configured_by_us:
        FastDeployInstrumentor._configured_by_us = False
        try:
            inst._ensure_configured()
        except Exception:
            logger.warning("could not start tracing in a forked FastDeploy process; it runs untraced", exc_info=True)


os.register_at_fork(after_in_child=_reconfigure_after_fork)
