"""What one metric recording costs: the mesh's instruments against the OpenTelemetry SDK and
prometheus_client, in one run.

Run from the repository root (``just bench-instruments``)::

    python -m meshbench.instruments_bench [--quick]

Each case records into a histogram with the SLO bucket bounds and into a counter, with the
four attributes a gateway request carries, inside a recording span (as the services do):

- **ours**: :mod:`shared.instruments` (``record(value, attributes)``);
- **OpenTelemetry SDK**: the SDK's instruments read by its Prometheus exporter, with its
  default exemplar filter (trace-based) and at its fastest, with exemplars off;
- **prometheus_client**: ``labels(...).observe(...)`` per recording, and at its fastest,
  with the labelled child looked up once and reused (a caller that knows its label values
  ahead of time; the services' labels come per request, so they would look it up each time).

Microseconds per recording, best of 5 repeats. Results: ``meshbench/results/instruments.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import timeit
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console

from shared.instruments import Meter, Registry
from shared.metrics import SECONDS_BUCKETS, histogram

RESULTS_DIR = Path(__file__).resolve().parent / "results"
COMMAND = "python -m meshbench.instruments_bench"
ATTRIBUTES = {"route": "/v1/chat/completions", "status": "200", "tenant": "acme",
              "model": "smollm2-135m-instruct"}  # fmt: skip
console = Console(stderr=True)


def _time(record: Callable[[], None], number: int) -> float:
    """Microseconds per call, best of 5 repeats (inside a recording span)."""
    from opentelemetry.sdk.trace import TracerProvider

    with TracerProvider().get_tracer("bench").start_as_current_span("request"):
        best = min(timeit.repeat(record, number=number, repeat=5))
    return best / number * 1e6


def cases() -> dict[str, tuple[Callable[[], None], Callable[[], None]]]:
    """(histogram recording, counter recording) per contender."""
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics._internal.exemplar import AlwaysOffExemplarFilter
    from prometheus_client import CollectorRegistry
    from prometheus_client import Counter as PromCounter
    from prometheus_client import Histogram as PromHistogram

    found: dict[str, tuple[Callable[[], None], Callable[[], None]]] = {}
    ours = Meter(Registry())
    latency = histogram(ours, "bench.duration", unit="s", description="d")
    requests = ours.create_counter("bench.requests")
    found["ours (shared.instruments)"] = (
        lambda: latency.record(0.1, ATTRIBUTES),
        lambda: requests.add(1, ATTRIBUTES),
    )
    for name, options in (("OpenTelemetry SDK, default exemplars", {}),
                          ("OpenTelemetry SDK, exemplars off",
                           {"exemplar_filter": AlwaysOffExemplarFilter()})):  # fmt: skip
        reader = PrometheusMetricReader(registry=CollectorRegistry(auto_describe=False))
        meter = MeterProvider(metric_readers=[reader], **options).get_meter("bench")
        sdk_latency = histogram(meter, "bench.duration", unit="s", description="d")  # type: ignore[arg-type]
        sdk_requests = meter.create_counter("bench.requests")
        found[name] = (
            lambda h=sdk_latency: h.record(0.1, ATTRIBUTES),
            lambda c=sdk_requests: c.add(1, ATTRIBUTES),
        )
    registry = CollectorRegistry()
    labels = list(ATTRIBUTES)
    prom_latency = PromHistogram("bench_duration_seconds", "d", labels, registry=registry,
                                 buckets=SECONDS_BUCKETS)  # fmt: skip
    prom_requests = PromCounter("bench_requests", "d", labels, registry=registry)
    found["prometheus_client, labels() each time"] = (
        lambda: prom_latency.labels(**ATTRIBUTES).observe(0.1),
        lambda: prom_requests.labels(**ATTRIBUTES).inc(),
    )
    bound_latency = prom_latency.labels(**ATTRIBUTES)
    bound_requests = prom_requests.labels(**ATTRIBUTES)
    found["prometheus_client, child reused"] = (
        lambda: bound_latency.observe(0.1),
        bound_requests.inc,
    )
    return found


def report(rows: list[tuple[str, float, float]], command: str) -> str:
    lines = [
        "# One metric recording: the mesh's instruments, the OpenTelemetry SDK, prometheus_client",
        "",
        f"Produced by `{command}` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, "
        f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}. "
        "Four attributes, SLO bucket bounds, inside a recording span; best of 5 repeats.",
        "",
        "| contender | histogram µs per recording | counter µs per recording |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {h:.2f} | {c:.2f} |" for name, h, c in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer recordings per repeat")
    args = parser.parse_args()
    number = 2_000 if args.quick else 20_000
    rows = []
    for name, (record_histogram, add_counter) in cases().items():
        rows.append((name, _time(record_histogram, number), _time(add_counter, number)))
        console.print(f"{name}: {rows[-1][1]:.2f} / {rows[-1][2]:.2f} µs")
    RESULTS_DIR.mkdir(exist_ok=True)
    command = COMMAND + (" --quick" if args.quick else "")
    (RESULTS_DIR / "instruments.md").write_text(report(rows, command))
    console.print(f"wrote {RESULTS_DIR / 'instruments.md'}")


if __name__ == "__main__":
    main()
