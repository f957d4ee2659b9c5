"""The ops service on the real broker: the gateway's answer spans, exported to
telemetry.spans as the services export them, raise and resolve an alert on ops.alerts; a
record that is not OTLP is dead-lettered and blocks nothing."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from services.gateway.metrics import GatewayMetrics
from services.ops.__main__ import build
from services.ops.settings import OpsSettings
from shared.bus import Bus
from shared.events.v1 import events_pb2 as ev
from shared.health import HealthState
from shared.telemetry import KafkaSpanExporter
from shared.topics import OPS_ALERTS, TELEMETRY_SPANS
from tests.conftest import poll_until

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(120)]

RULES = """
rules:
  - name: LatencyP99High
    indicator: p99_s
    threshold: 0.5
    clear: 0.4
    for_s: 0
    clear_for_s: 0
    window_s: 3
    by: [model]
    min_requests: 5
    summary: P99 latency above 500 ms
"""


@pytest.fixture
async def ops(kafka_bootstrap: str, tmp_path: Path) -> AsyncIterator[tuple[Bus, list]]:  # type: ignore[type-arg]
    """The ops service as its process builds it, and a reader of ops.alerts."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    settings = OpsSettings(
        kafka={"bootstrap": kafka_bootstrap},
        data_dir=tmp_path,
        ops={"rules_file": rules, "bucket_s": 1, "keep_s": 60, "evaluate_every_s": 0.2},
    )
    bus = Bus(settings, service="ops")
    evaluating = asyncio.ensure_future(await build(settings, bus, HealthState("ops")))
    alerts: list[ev.OpsAlert] = []
    reader = Bus(settings, service="tests")
    group = f"tests-{uuid.uuid4().hex[:8]}"
    reader.subscribe(OPS_ALERTS, group=group, durable_dedup=False, from_latest=True)(
        lambda alert, ctx: _append(alerts, alert)
    )
    await bus.start()
    await reader.start()
    await poll_until(lambda: bus.ready and reader.ready, message="buses ready")
    try:
        yield reader, alerts
    finally:
        evaluating.cancel()
        await reader.stop()
        await bus.stop(drain=True)


async def _append(alerts: list[ev.OpsAlert], alert: ev.OpsAlert) -> None:
    alerts.append(alert)


async def test_slow_answers_fire_the_latency_alert_and_it_resolves(
    ops: tuple[Bus, list[ev.OpsAlert]],
) -> None:
    client, alerts = ops
    model = f"model-{uuid.uuid4().hex[:8]}"  # this test's answers only
    provider = TracerProvider(resource=Resource.create({"service.name": "gateway"}))
    exporter = KafkaSpanExporter(client.publisher, asyncio.get_running_loop(), "gateway")
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=50))
    gateway = GatewayMetrics([model], tracer=provider.get_tracer("meshllm.gateway"))
    for _ in range(8):  # P99 0.9 s: over the 500 ms threshold
        gateway.answer(parent=None, tenant="acme", kind="chat", model=model, seconds=0.9,
                       first_token_s=0.2, output_tokens=10, input_tokens=5, error=None)  # fmt: skip
    await asyncio.to_thread(provider.force_flush, 10_000)

    def ours(state: int) -> list[ev.OpsAlert]:
        return [a for a in alerts if a.labels.get("model") == model and a.state == state]

    await poll_until(lambda: ours(ev.ALERT_STATE_FIRING), timeout=30, message="alert fired")
    [fired] = ours(ev.ALERT_STATE_FIRING)
    assert fired.rule == "LatencyP99High"
    assert fired.value == pytest.approx(0.9, rel=0.02)
    assert fired.threshold == 0.5
    assert fired.envelope.event_id  # a signed, enveloped event like any other
    # the slow answers leave the 3 s window: the group has no value, the alert resolves
    await poll_until(lambda: ours(ev.ALERT_STATE_RESOLVED), timeout=30, message="resolved")
    [resolved] = ours(ev.ALERT_STATE_RESOLVED)
    assert resolved.alert_id == fired.alert_id
    assert len(ours(ev.ALERT_STATE_FIRING)) == 1  # fired once
    provider.shutdown()


async def test_a_record_that_is_not_otlp_goes_to_the_dead_letter_topic(
    ops: tuple[Bus, list[ev.OpsAlert]], kafka_bootstrap: str
) -> None:
    client, _ = ops
    marker = f"not spans {uuid.uuid4().hex}".encode()
    dlq = AIOKafkaConsumer(
        TELEMETRY_SPANS.dlq,
        bootstrap_servers=kafka_bootstrap,
        group_id=f"tests-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
    )
    await dlq.start()
    try:
        await client.publisher.publish_raw(TELEMETRY_SPANS.name, b"\xff" + marker, key=b"gateway",
                                           headers=[])  # fmt: skip
        found = None
        async with asyncio.timeout(60):
            while found is None:
                batch = await dlq.getmany(timeout_ms=500)
                found = next(
                    (r for rs in batch.values() for r in rs if marker in (r.value or b"")), None
                )
        reasons = {k: v.decode() for k, v in found.headers}
        # refused by the handler at once: not tried again
        assert reasons["meshllm-dlq-reason"] == "rejected"
        assert reasons["meshllm-dlq-attempts"] == "1"
        assert "not an OTLP trace export" in reasons["meshllm-dlq-error"]
    finally:
        await dlq.stop()
