"""The ops service killed -9 comes back with its windows recomputed from the spans of the
last ``keep_s`` (not empty), and raises no alert on the way."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from pathlib import Path

import httpx
import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from prometheus_client.parser import text_string_to_metric_families

from services.gateway.metrics import GatewayMetrics
from shared.bus import Bus
from shared.bus.embedded import free_port
from shared.events.v1 import events_pb2 as ev
from shared.settings import MeshSettings
from shared.telemetry import KafkaSpanExporter
from shared.topics import OPS_ALERTS
from tests.conftest import ROOT, poll_until, start_process

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(240)]


async def p99_of(port: int, model: str) -> float | None:
    """The ops service's 5-minute P99 for ``model``, from its /metrics (None: not there)."""
    try:
        async with httpx.AsyncClient() as http:
            text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
    except httpx.TransportError:
        return None
    wanted = {"model": model, "indicator": "p99_s", "window": "300s"}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "meshllm_ops_sli" and wanted.items() <= sample.labels.items():
                return float(sample.value)
    return None


async def test_a_killed_ops_service_recomputes_its_windows(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    settings = MeshSettings(kafka={"bootstrap": kafka_bootstrap}, data_dir=tmp_path / "client")
    client = Bus(settings, service="tests")
    alerts: list[ev.OpsAlert] = []

    async def on_alert(alert: ev.OpsAlert, ctx: object) -> None:
        alerts.append(alert)

    client.subscribe(OPS_ALERTS, group=f"tests-{uuid.uuid4().hex[:8]}", durable_dedup=False,
                     from_latest=True)(on_alert)  # fmt: skip
    await client.start()
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MESHLLM_KAFKA__BOOTSTRAP": kafka_bootstrap,
           "MESHLLM_DATA_DIR": str(tmp_path / "ops"), "MESHLLM_HEALTH_PORT": str(port),
           "MESHLLM_LOG_FORMAT": "json"}  # fmt: skip
    log = tmp_path / "ops.log"
    ops = await start_process("services.ops", env, log)
    provider = TracerProvider(resource=Resource.create({"service.name": "gateway"}))
    try:
        await poll_until(lambda: client.ready, message="client bus")
        model = f"model-{uuid.uuid4().hex[:8]}"
        exporter = KafkaSpanExporter(client.publisher, asyncio.get_running_loop(), "gateway")
        provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=50))
        gateway = GatewayMetrics([model], tracer=provider.get_tracer("meshllm.gateway"))
        for i in range(30):  # fast answers, 10 to 300 ms: nothing to alert on
            gateway.answer(parent=None, tenant="acme", kind="chat", model=model,
                           seconds=0.01 * (i + 1), first_token_s=0.005, output_tokens=4,
                           input_tokens=3, error=None)  # fmt: skip
        await asyncio.to_thread(provider.force_flush, 10_000)

        async def settled() -> float:
            """The P99 once every answer is in: the 99th of 30 (lower rank) is the 29th, 290 ms."""
            deadline = asyncio.get_running_loop().time() + 90
            while (value := await p99_of(port, model)) != pytest.approx(0.29, rel=0.01):
                assert ops.returncode is None, log.read_text()[-2000:]
                assert asyncio.get_running_loop().time() < deadline, (
                    value,
                    log.read_text()[-2000:],
                )
                await asyncio.sleep(0.5)
            return value

        before = await settled()
        ops.send_signal(signal.SIGKILL)
        await ops.wait()
        ops = await start_process("services.ops", env, log)
        after = await settled()  # from the spans read again, none sent since
        assert after == pytest.approx(before, rel=1e-9)
        assert "rewound" in log.read_text()
        await asyncio.sleep(2)  # a few evaluations
        assert [a for a in alerts if a.labels.get("model") == model] == []
    finally:
        provider.shutdown()
        if ops.returncode is None:
            ops.send_signal(signal.SIGTERM)
            await asyncio.wait_for(ops.wait(), 60)
        await client.stop()
