"""The OTLP side: the TracerProvider (ours, or the application's), the exporter, and span building.

Spans are built after the fact with the ids the assembler chose.  With a provider of our own they
go to our batch processors directly as ReadableSpans; with the application's provider (or when an
exception must go through ``span.record_exception``) they are replayed through an SDK Tracer whose
IdGenerator hands out the preset ids.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk import trace as sdk_trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    Decision,
    ParentBased,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import NonRecordingSpan, Span, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from . import _server_span
from ._channel import THREAD_PREFIX as _THREAD_PREFIX
from ._channel import ExportChannel, run_with_deadline
from ._limits import Limits
from ._records import SpanState
from ._selflog import get_logger
from ._wire import Rebuilder, WireSpan, wire_of_state
from .config import DEFAULT_SERVICE_NAME, Settings
from .version import __version__

logger = get_logger(__name__)

SCOPE = "fastdeploy_otel"
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
# FastDeploy's and SGLang's export cadence (FD_OTLP_EXPORTER_SCHEDULE_DELAY_MILLIS / _MAX_EXPORT_BATCH_SIZE):
# small, frequent batches keep each encoding burst short, which matters in a GIL-bound engine.
# OTEL_BSP_* variables override them.
_BSP_DEFAULTS = {"schedule_delay_millis": 500, "max_export_batch_size": 64, "max_queue_size": 8192}
_EXPORTER_LOGGERS = (
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
    """The OTLP exporters log every retry: on our export threads, pass their messages on at most once
    a minute.  Installed once per process; the application's own exporters are left alone."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.threadName or not record.threadName.startswith(_THREAD_PREFIX):
            return True
        if record.levelno >= logging.WARNING:
            logger.log(record.levelno, "OpenTelemetry SDK: %s", record.getMessage())
        return False


_quiet = _RateLimitFilter()


def _install_quiet() -> None:
    for name in _EXPORTER_LOGGERS:
        logger = logging.getLogger(name)
        if _quiet not in logger.filters:
            logger.addFilter(_quiet)


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
        exporter: SpanExporter = OTLPSpanExporter(**kwargs)
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

        if settings.endpoint:
            kwargs["endpoint"] = settings.endpoint  # config.py has added /v1/traces where the spec says so
        if settings.certificate:
            kwargs["certificate_file"] = settings.certificate
        exporter = HttpExporter(**kwargs)
    return exporter, export_target(settings)


def export_target(settings: Settings) -> str:
    """Where the OTLP exporter sends, for log lines: the endpoint, or its default."""
    return settings.endpoint or ("localhost:4317" if settings.protocol == "grpc" else "http://localhost:4318/v1/traces")


def make_sampler(settings: Settings) -> Sampler:
    """OTEL_TRACES_SAMPLER's names, built from the (validated) settings."""
    name = settings.sampler
    static: dict[str, Sampler] = {"always_on": ALWAYS_ON, "always_off": ALWAYS_OFF}
    base = static.get(name.replace("parentbased_", "")) or TraceIdRatioBased(settings.sampler_arg)
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


def make_resource_from(attributes: dict[str, Any], schema_url: str | None) -> Resource:
    """The serving process's resource, rebuilt in the export process (whose own pid is not the point)."""
    return _FixedResource(Resource(attributes, schema_url))


class OtelSink:
    """Builds finished spans and hands them to export channels; owns the provider when it made it.

    Nothing here blocks: with our own provider the spans go to our channels' bounded queues; with
    the application's provider they are replayed through its pipeline on a channel thread of ours,
    since its processors may export synchronously.
    """

    def __init__(
        self,
        settings: Settings,
        extra_exporters: Sequence[SpanExporter] = (),
        provider: TracerProvider | None = None,
        write_lines: Callable[[list], None] | None = None,
    ) -> None:
        """`write_lines`: the mirror's writer; with an export process, that process writes the lines."""
        current = provider if provider is not None else trace.get_tracer_provider()
        self.attached = isinstance(current, TracerProvider)
        self.settings = settings
        self.limits = Limits(
            settings.attribute_count_limit,
            settings.event_count_limit,
            settings.event_attribute_count_limit,
            settings.attribute_length_limit,
        )
        options: dict[str, Any] = {**_BSP_DEFAULTS, **settings.bsp, "max_batch_bytes": settings.max_export_batch_bytes}
        self.channels: list[Any] = []  # ExportChannels, and the ProcessChannel first when there is one
        self.process: Any = None  # the ProcessChannel: OTLP export from a side process
        self.provider: TracerProvider
        if isinstance(current, TracerProvider):
            # The application (e.g. `opentelemetry-instrument`) set up OTel: use its provider and pipeline.
            self.provider = current
        else:
            self.provider = TracerProvider(
                resource=make_resource(settings),
                sampler=make_sampler(settings),
                span_limits=self._span_limits(),
                shutdown_on_exit=False,  # api.py's exit hook stops us, within the shutdown deadline
            )
            if settings.exporter == "otlp" and settings.export_process:
                from ._export_process import ProcessChannel

                self.process = ProcessChannel(
                    settings, self.provider.resource, options, export_target(settings), write_lines
                )
                self.channels.append(self.process)
            elif settings.exporter != "none":
                exporter, target = make_exporter(settings)
                self.channels.append(ExportChannel(exporter, target, **options))
            _install_quiet()
        if settings.json_file:
            from ._otlp_json import OtlpJsonLinesExporter

            extra_exporters = [*extra_exporters, OtlpJsonLinesExporter(settings.json_file)]
        self.channels.extend(ExportChannel(x, type(x).__name__, **options) for x in extra_exporters)
        for channel in self.channels:
            self.provider.add_span_processor(channel)
        self._scope = InstrumentationScope(SCOPE, __version__)
        self._scope_key = (SCOPE, __version__)
        self._rebuild = Rebuilder(self.provider.resource, self.limits)
        self._span_channels = [c for c in self.channels if c is not self.process]  # those taking ReadableSpans
        self._ids = _PresetIds()
        self.tracer = self._preset_tracer()
        self.sampler = self.provider.sampler
        # The default sampler decides by the parent's flag alone: asked for every request, that
        # decision is taken here without the SDK's SamplingResult (about 3 us a call).
        self._by_parent = not self.attached and settings.sampler == "parentbased_always_on"
        self.built = 0
        # With the application's provider, its processors may block (SimpleSpanProcessor): replay there
        # from a thread of ours, behind the same bounded queue.
        self._replayer: ExportChannel | None = None
        if self.attached:
            self._replayer = ExportChannel(
                None,
                "application-provider",
                size_of=None,
                export=self._replay_all,
                **{**options, "schedule_delay_millis": 50},
            )

    def _span_limits(self) -> SpanLimits:
        lim = self.limits
        return SpanLimits(
            max_span_attributes=lim.attributes,
            max_events=lim.events,
            max_event_attributes=lim.event_attributes,
            max_attribute_length=SpanLimits.UNSET if lim.value_length is None else lim.value_length,
        )

    def _preset_tracer(self) -> sdk_trace.Tracer:
        """A tracer of the provider's pipeline whose ids are ours, leaving the provider untouched.

        get_tracer() would cache it in the provider, and swapping the provider's id generator,
        even briefly, could hand preset ids to another thread's tracer.
        """
        p = self.provider
        return sdk_trace.Tracer(
            p.sampler,
            p.resource,
            p._active_span_processor,
            self._ids,
            None,  # type: ignore[arg-type]  # instrumentation_info: deprecated; the scope below replaces it
            p._span_limits,  # the provider's private parts: there is no public way to build this tracer
            self._scope,
        )

    def should_sample(self, ctx: Context | None, trace_id: int) -> bool:
        if self._by_parent:
            parent = trace.get_current_span(ctx).get_span_context()
            return parent.trace_flags.sampled if parent.is_valid else True
        result = self.sampler.should_sample(ctx, trace_id, "fastdeploy.request", SpanKind.INTERNAL)
        return result.decision is Decision.RECORD_AND_SAMPLE

    def build_all(self, spans: list[SpanState]) -> None:
        """Hand a batch over (never blocks: a full queue drops and counts)."""
        if self._replayer is not None:
            for s in spans:
                self._replayer.on_end(s)
            return
        for span in spans:
            try:
                self.build(span)
            except Exception:
                logger.warning("building span %s failed; dropped", span.name, exc_info=True)

    def build(self, s: SpanState) -> None:
        if s.exceptions:  # through the SDK, so that span.record_exception makes the exception events
            self._replay(s)
        else:
            self._hand_over(s)
        self.built += 1

    def _hand_over(self, s: SpanState) -> None:
        self.offer_wire(wire_of_state(s, self._scope_key))

    def offer_wire(self, w: WireSpan) -> None:
        """A finished span of ours as plain values, to every exporter (any thread; never blocks)."""
        if self.process is not None:  # as it is: the export process applies the limits
            self.process.offer(w)
        if self._span_channels:
            span = self._rebuild(w)
            for channel in self._span_channels:
                channel.on_end(span)

    def start_server_span(self, name: str, context: Context | None, attributes: Mapping[str, Any] | None) -> Span:
        """A SERVER span through the pipeline (``_server_span``); an SDK span under an application's
        provider, whose processors must see it."""
        if self.attached:
            tracer = self.provider.get_tracer(SCOPE, __version__)
            return tracer.start_span(name, context=context, kind=SpanKind.SERVER, attributes=attributes)
        return _server_span.start(self.offer_wire, self.should_sample, self._scope_key, name, context, attributes)

    def offer_lines(self, records: list) -> bool:
        """Mirror lines to the export process to write; False: the caller writes them."""
        return self.process is not None and self.process.offer_lines(records)

    def pump(self) -> None:
        """Send what the export process has not had yet (the worker calls this at every flush)."""
        if self.process is not None:
            self.process.pump()

    def _replay_all(self, spans: Sequence[SpanState]) -> SpanExportResult:
        for s in spans:
            try:
                self._replay(s)
                self.built += 1
            except Exception:
                logger.warning("building span %s failed; dropped", s.name, exc_info=True)
        return SpanExportResult.SUCCESS

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

    # ---- deadlines ------------------------------------------------------------------------------------
    def _all_channels(self) -> list[ExportChannel]:
        return ([self._replayer] if self._replayer is not None else []) + self.channels

    def flush(self, timeout_s: float) -> bool:
        """Export what is queued, within `timeout_s`; False when the deadline passed first."""
        deadline = time.monotonic() + timeout_s
        done = True
        for channel in self._all_channels():
            done = channel.force_flush(int(max(0.0, deadline - time.monotonic()) * 1000)) and done
        if self.attached:
            done = run_with_deadline(self.provider.force_flush, deadline) and done
        return done

    def shutdown(self, deadline: float) -> int:
        """Stop within `deadline` (a time.monotonic() value); returns the spans lost at the deadline."""
        lost = 0
        if self._replayer is not None:
            self._replayer.begin_shutdown()
            lost += self._replayer.finish_shutdown(deadline)
        if self.attached:
            run_with_deadline(self.provider.force_flush, deadline)
        for channel in self.channels:
            channel.begin_shutdown()  # all at once: a slow collector must not eat the JSON file's time
        for channel in self.channels:
            lost += channel.finish_shutdown(deadline)
        return lost

    def counters(self) -> dict[str, int]:
        out = {"spans_built": self.built}
        chans = self._all_channels()
        out["spans_dropped_export_queue"] = sum(c.dropped for c in chans)
        out["spans_lost_at_shutdown"] = sum(c.lost for c in chans)
        out["spans_truncated"] = sum(c.truncated for c in chans)
        out["spans_export_queued"] = sum(c.queued for c in chans)
        if self.channels:
            out["spans_exported"] = self.channels[0].exported
            out["spans_export_failed"] = self.channels[0].failed
        return out
