"""Metrics as Prometheus scrapes them: bucket bounds, instrument helpers, the scrape.

Every service records metrics on OpenTelemetry's instrument API (:mod:`shared.instruments`)
with semantic-convention names where they exist (``http.server.request.duration``,
``gen_ai.server.time_to_first_token``, ``messaging.process.duration``; ``meshllm.*`` for
the rest) and serves them in Prometheus' text format at ``/metrics`` on its health port,
never on a public API port: the labels name tenants and models. Names follow the
OpenTelemetry Prometheus exporter: ``gen_ai.server.request.duration`` (unit ``s``) becomes
``gen_ai_server_request_duration_seconds``; counters get ``_total``.

Histogram bounds are given by each instrument (OpenTelemetry's bucket advisory), chosen
so that every SLO threshold is a bound: a P99 below 500 ms is then read exactly from the
``le="0.5"`` bucket instead of interpolated between two others.

Labels whose values come from a caller (a model name in a request body) go through
:func:`bounded`, so a caller cannot make a series per value it sends.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

from shared.instruments import (
    REGISTRY,
    SERIES_LIMIT,
    Collector,
    Histogram,
    Meter,
    Registry,
    get_meter,
)

__all__ = ["SERIES_LIMIT", "Histogram", "Meter", "PrometheusScrape", "bounded", "get_meter"]

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
    """The ``/metrics`` body of a service: its instruments in the Prometheus text format.

    Each scrape has a prometheus_client registry of its own (not the library's global one),
    holding only the mesh's instruments and ``target_info``.
    """

    def __init__(
        self, registry: Registry | None = None, resource: Mapping[str, Any] | None = None
    ) -> None:
        from prometheus_client import CollectorRegistry

        self.instruments = registry if registry is not None else REGISTRY
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(Collector(self.instruments, resource))

    def render(self) -> bytes:
        """The current values, in the Prometheus text exposition format."""
        from prometheus_client import generate_latest

        return bytes(generate_latest(self.registry))
