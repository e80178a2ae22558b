"""The OTLP side: the TracerProvider (ours, or the application's), the exporter, and span building.

Spans are built after the fact with the ids the assembler chose.  With a provider of our own they
go to our batch processors directly as ReadableSpans; with the application's provider (or when an
exception must go through ``span.record_exception``) they are replayed through an SDK Tracer whose
IdGenerator hands out the preset ids.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Sequence

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk import trace as sdk_trace
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    Decision,
    ParentBased,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from . import selflog
from .assembler import SpanState
from .config import DEFAULT_SERVICE_NAME, Settings

SCOPE = "fastdeploy_otel"
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_UNSET = Status(StatusCode.UNSET)
_MAX_EVENTS = 128  # the SDK's default span event limit
# FastDeploy's and SGLang's export cadence (FD_OTLP_EXPORTER_SCHEDULE_DELAY_MILLIS / _MAX_EXPORT_BATCH_SIZE):
# small, frequent batches keep each encoding burst short, which matters in a GIL-bound engine.
# OTEL_BSP_* variables override them.
_BSP_DEFAULTS = {"schedule_delay_millis": 500, "max_export_batch_size": 64, "max_queue_size": 8192}
_EXPORTER_LOGGERS = (
    "opentelemetry.sdk._shared_internal",  # the batch processor: "Queue full, dropping Span."
    "opentelemetry.exporter.otlp.proto.common._internal",
    "opentelemetry.exporter.otlp.proto.grpc.exporter",
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "opentelemetry.exporter.otlp.proto.http",
)


class _PresetIds(IdGenerator):
    """Hands out the ids the assembler chose; used only by our tracer, on the worker thread."""

    def __init__(self) -> None:
        self.trace_id = 0
        self.span_id = 0

    def generate_span_id(self) -> int:
        return self.span_id

    def generate_trace_id(self) -> int:
        return self.trace_id


class _RateLimitFilter(logging.Filter):
    """The OTLP exporters log every retry and the batch processor every dropped span: pass their
    messages on at most once a minute, and count the drops."""

    def __init__(self) -> None:
        super().__init__()
        self.dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith("Queue full"):
            self.dropped += 1
        selflog.report("otel-sdk:" + record.name, "OpenTelemetry SDK: %s", record.getMessage(), level=record.levelno)
        return False


class ReportingExporter(SpanExporter):
    """Counts what was exported and says once when export starts failing, and once when it recovers."""

    def __init__(self, inner: SpanExporter, target: str) -> None:
        self.inner = inner
        self.target = target
        self.exported = 0
        self.failed = 0
        self._down = False
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self.inner.export(spans)
        except Exception:  # an exporter bug must not kill the BSP thread
            selflog.report("export-crash", "OTLP exporter raised; spans dropped", exc_info=True)
            result = SpanExportResult.FAILURE
        with self._lock:
            if result is SpanExportResult.SUCCESS:
                self.exported += len(spans)
                if self._down:
                    self._down = False
                    selflog.logger.warning("OTLP export to %s recovered", self.target)
            else:
                self.failed += len(spans)
                if not self._down:
                    self._down = True
                    selflog.logger.warning(
                        "OTLP export to %s is failing; spans are dropped and counted (serving is not affected)",
                        self.target,
                    )
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


def make_exporter(settings: Settings) -> tuple[SpanExporter, str]:
    """The OTLP exporter for the configured protocol (or the console one); the exporters read the
    remaining env themselves."""
    if settings.exporter == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter(), "console"
    kwargs: dict = {}
    if settings.timeout_s is not None:
        kwargs["timeout"] = settings.timeout_s
    if settings.headers is not None:
        kwargs["headers"] = settings.headers
    if settings.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        if settings.endpoint:
            kwargs["endpoint"] = settings.endpoint
        if settings.insecure is not None:
            kwargs["insecure"] = settings.insecure
        if settings.certificate:
            import grpc

            with open(settings.certificate, "rb") as f:
                kwargs["credentials"] = grpc.ssl_channel_credentials(f.read())
        exporter = OTLPSpanExporter(**kwargs)
        target = settings.endpoint or "localhost:4317"
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        if settings.endpoint:
            kwargs["endpoint"] = settings.endpoint  # config.py has added /v1/traces where the spec says so
        if settings.certificate:
            kwargs["certificate_file"] = settings.certificate
        exporter = OTLPSpanExporter(**kwargs)
        target = kwargs.get("endpoint", "http://localhost:4318/v1/traces")
    return exporter, target


def make_sampler(settings: Settings) -> Sampler:
    """OTEL_TRACES_SAMPLER's names, built from the (validated) settings."""
    name = settings.sampler
    base = {"always_on": ALWAYS_ON, "always_off": ALWAYS_OFF}.get(name.replace("parentbased_", ""))
    if base is None:
        base = TraceIdRatioBased(settings.sampler_arg)
    return ParentBased(base) if name.startswith("parentbased_") else base


class _FixedResource(Resource):
    """A Resource whose hash is computed once: the OTLP encoder hashes the resource of every span,
    and Resource.__hash__ serialises all its attributes to JSON each time."""

    def __init__(self, resource: Resource) -> None:
        super().__init__(resource.attributes, resource.schema_url)
        self._hash = super().__hash__()

    def __hash__(self) -> int:
        return self._hash


def make_resource(settings: Settings) -> Resource:
    resource = Resource.create({"host.name": settings.host_name, "process.pid": os.getpid()})
    current = str(resource.attributes.get("service.name", ""))
    if settings.service_name != DEFAULT_SERVICE_NAME or current.startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": settings.service_name}))
    return _FixedResource(resource)


class OtelSink:
    """Builds finished spans through an SDK tracer and owns the provider when we created it."""

    def __init__(self, settings: Settings, extra_exporters: Sequence[SpanExporter] = ()) -> None:
        current = trace.get_tracer_provider()
        self.attached = isinstance(current, TracerProvider)
        self.reporter: ReportingExporter | None = None
        # The processors we created ourselves: finished spans go straight to them (see build()).
        self._own: list[SpanProcessor] = []
        self._quiet: _RateLimitFilter | None = None
        bsp = {**_BSP_DEFAULTS, **settings.bsp}
        if self.attached:
            # The application (e.g. `opentelemetry-instrument`) set up OTel: use its provider and pipeline.
            self.provider = current
        else:
            self.provider = TracerProvider(resource=make_resource(settings), sampler=make_sampler(settings))
            if settings.exporter != "none":
                exporter, target = make_exporter(settings)
                self.reporter = ReportingExporter(exporter, target)
                self._own.append(BatchSpanProcessor(self.reporter, **bsp))
            self._quiet = _RateLimitFilter()
            for name in _EXPORTER_LOGGERS:
                logging.getLogger(name).addFilter(self._quiet)
        if settings.json_file:
            from .otlp_json import OtlpJsonLinesExporter

            extra_exporters = [*extra_exporters, OtlpJsonLinesExporter(settings.json_file)]
        self._own.extend(BatchSpanProcessor(extra, **bsp) for extra in extra_exporters)
        for processor in self._own:
            self.provider.add_span_processor(processor)
        # With a provider of our own, its only processors are ours: a finished span can be handed to
        # them as a ReadableSpan, without replaying it through Tracer.start_span (several times faster).
        self._direct = self._own if not self.attached else []
        self._scope = InstrumentationScope(SCOPE)
        self._ids = _PresetIds()
        self.tracer = self._preset_tracer()
        self.sampler = self.provider.sampler
        self.built = 0
        self._queue_size = bsp["max_queue_size"]

    def _preset_tracer(self) -> sdk_trace.Tracer:
        """A tracer of the provider's pipeline whose ids are ours, leaving the provider untouched.

        get_tracer() would cache it in the provider, and swapping the provider's id generator,
        even briefly, could hand preset ids to another thread's tracer.
        """
        p = self.provider
        return sdk_trace.Tracer(
            p.sampler, p.resource, p._active_span_processor, self._ids,  # noqa: SLF001 - no public way
            None, p._span_limits, self._scope,  # noqa: SLF001 (instrumentation_info: deprecated)
        )

    def should_sample(self, ctx: Context | None, trace_id: int) -> bool:
        result = self.sampler.should_sample(ctx, trace_id, "fastdeploy.request", SpanKind.INTERNAL)
        return result.decision is Decision.RECORD_AND_SAMPLE

    def build_all(self, spans: list[SpanState]) -> None:
        """Build and hand over a batch; a batch larger than the export queue waits for it to drain
        (on the worker thread), so a burst is exported rather than dropped."""
        step = max(1, self._queue_size // 2)
        for i in range(0, len(spans), step):
            if i:
                self.provider.force_flush()
            for span in spans[i:i + step]:
                try:
                    self.build(span)
                except Exception:
                    selflog.report("build", "fastdeploy_otel: building span %s failed; dropped", span.name, exc_info=True)

    def build(self, s: SpanState) -> None:
        if self._direct and not s.exceptions:
            self._hand_over(s)
        else:  # the application's provider, or an exception to record with span.record_exception
            self._replay(s)
        self.built += 1

    def _hand_over(self, s: SpanState) -> None:
        span = ReadableSpan(
            s.name,
            SpanContext(s.trace_id, s.span_id, is_remote=False, trace_flags=_SAMPLED),
            SpanContext(s.trace_id, s.parent_id, is_remote=s.parent_remote, trace_flags=_SAMPLED) if s.parent_id else None,
            self.provider.resource,
            s.attributes,
            [Event(name, attrs, ts) for name, ts, attrs in s.events[:_MAX_EVENTS]],
            status=Status(StatusCode.ERROR, s.error) if s.error else _UNSET,
            start_time=s.start_ns,
            end_time=s.end_ns,
            instrumentation_scope=self._scope,
        )
        for processor in self._direct:
            processor.on_end(span)

    def _replay(self, s: SpanState) -> None:
        if s.parent_id:
            parent = SpanContext(s.trace_id, s.parent_id, is_remote=s.parent_remote, trace_flags=_SAMPLED)
            ctx = trace.set_span_in_context(NonRecordingSpan(parent))
        else:
            ctx = Context()
        self._ids.trace_id, self._ids.span_id = s.trace_id, s.span_id
        span = self.tracer.start_span(s.name, context=ctx, attributes=s.attributes, start_time=s.start_ns)
        for name, ts, attrs in s.events:
            span.add_event(name, attrs, ts)
        for exc, ts in s.exceptions:
            span.record_exception(exc, timestamp=ts)
        if s.error:
            span.set_status(Status(StatusCode.ERROR, s.error))
        span.end(s.end_ns)

    def shutdown(self) -> None:
        if self.attached:
            self.provider.force_flush()
            return
        self.provider.shutdown()  # flushes and shuts down every processor and exporter
        if self._quiet is not None:
            for name in _EXPORTER_LOGGERS:
                logging.getLogger(name).removeFilter(self._quiet)

    @property
    def dropped(self) -> int:
        """Spans the export queue dropped (counted from the SDK's own warnings)."""
        return self._quiet.dropped if self._quiet is not None else 0
