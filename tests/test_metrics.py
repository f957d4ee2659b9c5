"""Metrics: the scrape a service answers, its buckets, and labels a caller cannot mint."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from services.gateway.metrics import GatewayMetrics
from services.inference.metrics import ReplicaStatuses
from shared.bus.metrics import lag_of
from shared.health import HealthServer, HealthState
from shared.instruments import get_meter
from shared.metrics import bounded
from shared.settings import MeshSettings
from shared.telemetry import Telemetry


def samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((sample.labels, sample.value))
    return found


async def test_the_health_port_serves_metrics_and_only_with_a_scrape() -> None:
    telemetry = Telemetry(MeshSettings(), "demo")
    get_meter("demo").create_counter("meshllm.demo.things").add(3, {"kind": "a"})
    assert telemetry.scrape is not None
    with_metrics = HealthServer(
        HealthState("demo"), "127.0.0.1", 0, metrics=telemetry.scrape.render
    )
    without = HealthServer(HealthState("demo"), "127.0.0.1", 0)
    await with_metrics.start()
    await without.start()
    try:
        async with httpx.AsyncClient() as client:
            reply = await client.get(f"http://127.0.0.1:{with_metrics.port}/metrics")
            assert reply.status_code == 200
            assert reply.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
            found = samples(reply.text)
            assert found["meshllm_demo_things_total"] == [({"kind": "a"}, 3.0)]
            assert found["target_info"][0][0]["service_name"] == "demo"
            refused = await client.post(f"http://127.0.0.1:{with_metrics.port}/metrics")
            assert refused.status_code == 405
            missing = await client.get(f"http://127.0.0.1:{without.port}/metrics")
            assert missing.status_code == 404
    finally:
        await with_metrics.stop()
        await without.stop()
        telemetry.shutdown()


def test_prometheus_can_be_turned_off() -> None:
    settings = MeshSettings.model_validate({"telemetry": {"prometheus": False}})
    telemetry = Telemetry(settings, "demo")
    assert telemetry.scrape is None
    telemetry.shutdown()


def test_a_model_name_from_the_caller_is_a_label_only_when_served() -> None:
    assert bounded("smollm2", {"smollm2"}) == "smollm2"
    assert bounded("anything-else", {"smollm2"}) == "other"
    metrics = GatewayMetrics(["smollm2"])
    assert metrics.model("x" * 10_000) == "other"
    assert metrics.model(None) == "other"


def test_replicas_not_heard_from_drop_out_of_the_metrics() -> None:
    now = [0.0]
    statuses = ReplicaStatuses(probe_interval_s=10, clock=lambda: now[0])
    statuses.note({"replica": "a", "model": "m:1", "engine": {"generated_tokens": 5}})
    now[0] = 20
    statuses.note({"replica": "b", "model": "m:1"})
    assert [labels["replica"] for labels, _ in statuses.current()] == ["a", "b"]
    now[0] = 31  # a: three probes without an answer
    assert [labels["replica"] for labels, _ in statuses.current()] == ["b"]


def test_consumer_lag_is_what_the_partition_end_is_ahead() -> None:
    assert lag_of([("t0", 110, 100), ("t1", 100, 100), ("t2", None, 7)]) == {
        "t0": 10,
        "t1": 0,
        "t2": 0,  # no fetch answered yet: nothing known to be behind
    }


def test_only_the_answer_spans_go_to_the_bus_unless_all_are_asked_for() -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from shared.telemetry import AnswersOnly

    kept = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(AnswersOnly(SimpleSpanProcessor(kept)))
    tracer = provider.get_tracer("test")
    with (
        tracer.start_as_current_span("POST /v1/chat/completions"),
        tracer.start_as_current_span("publish llm.requests.normal"),
    ):
        pass
    GatewayMetrics(["m"], tracer=tracer).answer(
        parent=None, tenant="acme", kind="chat", model="m", seconds=0.2, first_token_s=0.1,
        output_tokens=3, input_tokens=5, error=None,
    )  # fmt: skip
    assert [span.name for span in kept.get_finished_spans()] == ["chat m"]
    assert provider.force_flush()
    assert MeshSettings().telemetry.kafka_spans == "answers"
    assert MeshSettings(telemetry={"kafka_spans": "all"}).telemetry.kafka_spans == "all"
