"""The mesh's instruments export what the OpenTelemetry SDK and its Prometheus exporter
exported for the same measurements: names, units, labels, buckets and values."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import pytest
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from shared.instruments import SERIES_LIMIT, Meter, Registry
from shared.metrics import (
    PER_TOKEN_BUCKETS,
    SECONDS_BUCKETS,
    TOKEN_BUCKETS,
    PrometheusScrape,
    histogram,
)

Sample = tuple[str, str, tuple[tuple[str, str], ...], float]


def _samples(text: str) -> set[Sample]:
    """(family type, sample name, labels, value) of every sample."""
    return {
        (family.type, sample.name, tuple(sorted(sample.labels.items())), sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _queue(options: CallbackOptions) -> Iterable[Observation]:
    yield Observation(7, {"topic": "inference.requests.high"})
    yield Observation(0, {"topic": "inference.requests.low"})


def _served(options: CallbackOptions) -> Iterable[Observation]:
    yield Observation(1234, {"replica": "a", "ready": True})


def _record(meter: Any) -> None:
    """The same measurements, whichever meter takes them."""
    requests = meter.create_counter("meshllm.gateway.requests", unit="{request}",
                                    description="Requests by route and status.")  # fmt: skip
    requests.add(1, {"route": "/v1/chat/completions", "status": 200, "tenant": "acme"})
    requests.add(2, {"tenant": "acme", "status": 200, "route": "/v1/chat/completions"})
    requests.add(1, {"route": "/v1/embeddings", "status": 400, "tenant": "globex"})
    requests.add(-5, {"route": "/v1/embeddings", "status": 400, "tenant": "globex"})
    requests.add(1, {"route": "/v1/models"})  # fewer labels: the others are ""
    plain = meter.create_counter("meshllm.bus.dead_letters", description="Dead letters.")
    plain.add(3)
    duration = histogram(meter, "gen_ai.server.request.duration", unit="s",
                         description="Answer latency.")  # fmt: skip
    for value in (0.001, 0.005, 0.0051, 0.499, 0.5, 0.501, 130.0):
        duration.record(value, {"gen_ai.operation.name": "chat", "streamed": False})
    tokens = histogram(meter, "gen_ai.client.token.usage", unit="{token}",
                       description="Tokens.", buckets=TOKEN_BUCKETS)  # fmt: skip
    for value in (1, 3, 4, 5000, 2_000_000):
        tokens.record(value, {"gen_ai.token.type": "input"})
    per_token = histogram(meter, "gen_ai.server.time_per_output_token", unit="s",
                          description="Per token.", buckets=PER_TOKEN_BUCKETS)  # fmt: skip
    per_token.record(0.0075, {"model": "m"})
    sizes = meter.create_histogram("meshllm.audit.batch", unit="By", description="Bytes.")
    sizes.record(512.5)
    sizes.record(-1.0)  # dropped, as a negative value is by the SDK
    duration.record(float("nan"))
    meter.create_observable_gauge("meshllm.router.buffered", callbacks=[_queue],
                                  unit="{request}", description="Buffered.")  # fmt: skip
    meter.create_observable_counter("meshllm.inference.generated", callbacks=[_served],
                                    unit="{token}", description="Tokens made.")  # fmt: skip
    meter.create_counter("meshllm.ops.ratio", unit="1", description="A ratio.").add(0.25)


def test_the_scrape_is_what_the_opentelemetry_exporter_gave() -> None:
    exported = CollectorRegistry(auto_describe=False)
    reference = PrometheusMetricReader(scope_info_enabled=False, registry=exported)
    resource = Resource.create({"service.name": "demo", "service.instance.id": "demo-1"})
    _record(MeterProvider(resource=resource, metric_readers=[reference]).get_meter("test"))
    expected = _samples(generate_latest(exported).decode())

    registry = Registry()
    _record(Meter(registry))
    ours = _samples(PrometheusScrape(registry, dict(resource.attributes)).render().decode())
    assert ours == expected
    assert any(name == "target_info" for _, name, _, _ in ours)
    assert len(ours) > 60  # every bucket of every series


def test_a_value_on_a_bound_is_in_that_bucket() -> None:
    assert {0.1, 0.5, 1.0} <= set(SECONDS_BUCKETS)
    registry = Registry()
    latency = histogram(Meter(registry), "gen_ai.server.request.duration", unit="s",
                        description="d")  # fmt: skip
    latency.record(0.5)
    latency.record(0.501)
    found = {
        labels: value
        for kind, name, labels, value in _samples(PrometheusScrape(registry).render().decode())
        if name == "gen_ai_server_request_duration_seconds_bucket"
    }
    assert found[(("le", "0.5"),)] == 1
    assert found[(("le", "1.0"),)] == 2


def test_series_past_the_limit_fold_into_one_overflow_series() -> None:
    registry = Registry()
    counter = Meter(registry).create_counter("meshllm.test.callers")
    for number in range(SERIES_LIMIT + 100):
        counter.add(1, {"caller": f"c{number}"})
    counter.add(1, {"caller": "c0"})  # a series kept before the limit still counts
    values = {
        labels: value
        for _, name, labels, value in _samples(PrometheusScrape(registry).render().decode())
        if name == "meshllm_test_callers_total"
    }
    assert len(values) == SERIES_LIMIT + 1
    assert values[(("caller", ""), ("otel_metric_overflow", "true"))] == 100
    assert values[(("caller", "c0"), ("otel_metric_overflow", ""))] == 2


def test_unhashable_attribute_values_are_labels_as_json() -> None:
    registry = Registry()
    Meter(registry).create_counter("meshllm.test.lists").add(1, {"groups": ["a", "b"]})
    [(_, _, labels, value)] = _samples(PrometheusScrape(registry).render().decode())
    assert (labels, value) == ((("groups", '["a", "b"]'),), 1.0)


@pytest.mark.parametrize("create", [Meter.create_counter, Meter.create_histogram])
def test_an_instrument_made_twice_is_one_instrument(create: Callable[..., Any]) -> None:
    meter = Meter(Registry())
    assert create(meter, "meshllm.test.twice") is create(meter, "meshllm.test.twice")


def _fails(options: CallbackOptions) -> Iterable[Observation]:
    raise RuntimeError("the state this gauge reads is gone")


def _odd(options: CallbackOptions) -> Iterable[Observation]:
    yield Observation(float("inf"), {"kind": "infinite"})
    yield Observation(2, {"groups": ["a", "b"]})


def test_a_failing_callback_leaves_the_rest_of_the_scrape() -> None:
    registry = Registry()
    meter = Meter(registry)
    meter.create_observable_gauge("meshllm.test.broken", callbacks=[_fails])
    meter.create_observable_gauge("meshllm.test.odd", callbacks=[_odd])
    meter.create_counter("meshllm.test.fine").add(1)
    found = {name: (labels, value) for _, name, labels, value in
             _samples(PrometheusScrape(registry).render().decode())}  # fmt: skip
    assert found["meshllm_test_fine_total"] == ((), 1.0)
    assert found["meshllm_test_odd"] == ((("groups", '["a", "b"]'),), 2.0)  # not the infinite one
    assert not any(name.startswith("meshllm_test_broken") for name in found)


def test_folded_series_are_not_remembered() -> None:
    counter = Meter(Registry()).create_counter("meshllm.test.minted")
    for number in range(SERIES_LIMIT + 5000):
        counter.add(1, {"caller": f"c{number}"})
    assert len(counter._series) <= SERIES_LIMIT  # the memory this bounds


def test_a_name_is_one_kind_of_instrument() -> None:
    meter = Meter(Registry())
    meter.create_counter("meshllm.test.kind")
    with pytest.raises(ValueError, match="another kind"):
        meter.create_histogram("meshllm.test.kind")
