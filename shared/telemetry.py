"""OpenTelemetry set-up: traces (to the telemetry.spans topic and/or OTLP) and the metrics
scrape (metrics are :mod:`shared.instruments`, served at ``/metrics``; an OTLP endpoint
gets traces only, and a Collector scrapes the metrics)."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Sequence

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.sampling import ParentBasedTraceIdRatio

from shared.bus.producer import Publisher
from shared.logging import get_logger
from shared.metrics import PrometheusScrape
from shared.settings import MeshSettings
from shared.topics import TELEMETRY_SPANS

log = get_logger(__name__)
ANSWER_ATTRIBUTE = "gen_ai.operation.name"  # only the gateway's answer spans carry it


class KafkaSpanExporter(SpanExporter):
    """Publishes finished spans as one OTLP ExportTraceServiceRequest per batch.

    Runs on the BatchSpanProcessor's thread and hands each batch to the service's
    event loop, where the shared producer lives; the record key is the service name,
    so one service's spans stay in order on one partition.
    """

    def __init__(
        self,
        publisher: Publisher,
        loop: asyncio.AbstractEventLoop,
        service: str,
        timeout: float = 10.0,
    ) -> None:
        self._publisher = publisher
        self._loop = loop
        self._key = service.encode()
        self._timeout = timeout

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if not spans or not self._publisher.started or self._loop.is_closed():
            return SpanExportResult.FAILURE if spans else SpanExportResult.SUCCESS
        payload = encode_spans(spans).SerializeToString()
        future = asyncio.run_coroutine_threadsafe(
            self._publisher.publish_raw(TELEMETRY_SPANS.name, payload, key=self._key, headers=[]),
            self._loop,
        )
        try:
            future.result(self._timeout)
        except (concurrent.futures.TimeoutError, Exception):
            log.warning("span export to Kafka failed", spans=len(spans), exc_info=True)
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


class AnswersOnly(SpanProcessor):
    """Passes on only the answer spans (GenAI's ``{operation} {model}`` spans, which carry
    ``gen_ai.operation.name``: one per answer, made by the gateway); the rest never reach
    the exporter, so they are never encoded."""

    def __init__(self, inner: SpanProcessor) -> None:
        self._inner = inner

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        return None

    def on_end(self, span: ReadableSpan) -> None:
        if span.attributes and ANSWER_ATTRIBUTE in span.attributes:
            self._inner.on_end(span)

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self._inner.force_flush(timeout_millis)


class Telemetry:
    """The tracer provider and the metrics scrape of one service process."""

    def __init__(self, settings: MeshSettings, service: str) -> None:
        resource = Resource.create(
            {"service.name": service, "service.instance.id": settings.instance_id or service}
        )
        self.tracer_provider = TracerProvider(
            resource=resource, sampler=ParentBasedTraceIdRatio(settings.telemetry.sample_ratio)
        )
        endpoint = settings.telemetry.otlp_endpoint
        if endpoint:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            self.tracer_provider.add_span_processor(
                BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{endpoint.rstrip('/')}/v1/traces"))
            )
            log.info("traces go to the OTLP endpoint; metrics are not pushed, scrape /metrics",
                     endpoint=endpoint)  # fmt: skip
        self.scrape: PrometheusScrape | None = None
        if settings.telemetry.prometheus:
            self.scrape = PrometheusScrape(resource=dict(resource.attributes))
        self._settings = settings
        self._service = service

    def install(self) -> None:
        """Make this tracer provider the process-wide one (once per process)."""
        trace.set_tracer_provider(self.tracer_provider)

    def export_spans_to_kafka(self, publisher: Publisher, loop: asyncio.AbstractEventLoop) -> None:
        telemetry = self._settings.telemetry
        if telemetry.spans_to_kafka:
            exporter = KafkaSpanExporter(publisher, loop, self._service)
            batch = BatchSpanProcessor(exporter, schedule_delay_millis=500)
            processor = batch if telemetry.kafka_spans == "all" else AnswersOnly(batch)
            self.tracer_provider.add_span_processor(processor)

    async def flush(self) -> None:
        """Export spans still buffered; runs off the loop so the exporter can use it."""
        await asyncio.to_thread(self.tracer_provider.force_flush, 10_000)

    def shutdown(self) -> None:
        self.tracer_provider.shutdown()
