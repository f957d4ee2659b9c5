"""Metrics as Prometheus scrapes them: bucket bounds, instrument helpers, the scrape.

Every service records OpenTelemetry metrics (semantic-convention names where they exist:
``http.server.request.duration``, ``gen_ai.server.time_to_first_token``,
``messaging.process.duration``; ``meshllm.*`` for the rest) and serves them in
Prometheus' text format at ``/metrics`` on its health port, never on a public API port:
the labels name tenants and models. The OpenTelemetry Prometheus exporter turns
``gen_ai.server.request.duration`` (unit ``s``) into
``gen_ai_server_request_duration_seconds``; counters get ``_total``.

Histogram bounds are given by each instrument (OpenTelemetry's bucket advisory), chosen
so that every SLO threshold is a bound: a P99 below 500 ms is then read exactly from the
``le="0.5"`` bucket instead of interpolated between two others.

Labels whose values come from a caller (a model name in a request body) go through
:func:`bounded`, so a caller cannot make a series per value it sends.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from opentelemetry.metrics import Histogram, Meter
from opentelemetry.sdk.metrics import Counter, UpDownCounter
from opentelemetry.sdk.metrics import Histogram as SdkHistogram
from opentelemetry.sdk.metrics.export import MetricReader

SECONDS_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
)  # fmt: skip
"""Latencies: 0.5 s is the P99 SLO (``ops`` alerts), 0.1 s and 1 s bound TTFT panels."""

PER_TOKEN_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5,
)  # fmt: skip
"""Time per output token: GenAI's suggested bounds with finer ones below 10 ms (a CPU
engine decodes a small model at 5-10 ms a token)."""

TOKEN_BUCKETS: tuple[float, ...] = (
    1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576,
)  # fmt: skip
"""Token counts per request (GenAI's suggested powers of four)."""

BATCH_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)

SERIES_LIMIT = 2000
"""Most series one instrument exports per scrape; more fold into one overflow series."""

OTHER = "other"


def histogram(
    meter: Meter,
    name: str,
    *,
    unit: str,
    description: str,
    buckets: Sequence[float] = SECONDS_BUCKETS,
) -> Histogram:
    """A histogram with explicit bucket bounds (seconds and the SLO bounds by default)."""
    return meter.create_histogram(
        name,
        unit=unit,
        description=description,
        explicit_bucket_boundaries_advisory=list(buckets),
    )


def bounded(value: str, known: Collection[str]) -> str:
    """``value`` when it is one of ``known``, else ``"other"``: a label from a caller."""
    return value if value in known else OTHER


class PrometheusScrape:
    """The metric reader of a service and the ``/metrics`` body it answers with.

    Each service has a registry of its own (not prometheus_client's global one), so two
    meshes' services in one test process, or a library's collectors, do not mix.
    """

    def __init__(self) -> None:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import CollectorRegistry

        self.registry = CollectorRegistry(auto_describe=False)
        self.reader: MetricReader = PrometheusMetricReader(
            scope_info_enabled=False,
            registry=self.registry,
            cardinality_limits={
                Counter: SERIES_LIMIT,
                UpDownCounter: SERIES_LIMIT,
                SdkHistogram: SERIES_LIMIT,
            },
        )

    def render(self) -> bytes:
        """The current values, in the Prometheus text exposition format."""
        from prometheus_client import generate_latest

        return bytes(generate_latest(self.registry))
