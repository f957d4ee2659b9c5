"""Two processes over the real broker: trace context across the hop, and crash safety."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from shared.bus import Bus
from shared.bus.embedded import free_port
from shared.events.v1 import events_pb2 as ev
from shared.settings import MeshSettings
from shared.topics import TELEMETRY_SPANS, Topic
from tests.conftest import ROOT, poll_until, start_process

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(180)]


def effects(path: Path) -> list[tuple[str, int, int, str, str]]:
    if not path.exists():
        return []
    with sqlite3.connect(path) as db:
        try:
            return db.execute("SELECT * FROM effects").fetchall()
        except sqlite3.OperationalError:
            return []


async def wait_ready(port: int, process: asyncio.subprocess.Process, log: Path) -> None:
    async with httpx.AsyncClient() as client:
        for _ in range(300):
            if process.returncode is not None:
                pytest.fail(f"service exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if (await client.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
    pytest.fail(f"service never became ready:\n{log.read_text()[-3000:]}")


async def start_consumer(
    service_env: Callable[..., dict[str, str]],
    topic: Topic,
    effects_path: Path,
    log: Path,
    delay_ms: int = 0,
) -> asyncio.subprocess.Process:
    port = free_port()
    env = service_env(
        TEST_TOPIC=topic.name,
        TEST_GROUP="effects",
        TEST_EFFECTS=str(effects_path),
        TEST_DELAY_MS=str(delay_ms),
        MESHLLM_HEALTH_PORT=str(port),
        MESHLLM_TELEMETRY__KAFKA_SPANS="all",  # whole traces on the bus
    )
    process = await start_process("tests.procs.effect_consumer", env, log)
    await wait_ready(port, process, log)
    return process


async def exported_spans(bootstrap: str, trace_id: str) -> list[tuple[str, object]]:
    """(service name, span) pairs of one trace, read from telemetry.spans."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=5
    )
    await consumer.start()
    found = []
    try:
        partitions = [
            TopicPartition(TELEMETRY_SPANS.name, p) for p in range(TELEMETRY_SPANS.partitions)
        ]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)

        async def behind() -> bool:
            return any([await consumer.position(tp) < ends[tp] for tp in partitions])

        while await behind():
            batch = await consumer.getmany(timeout_ms=200)
            for records in batch.values():
                for record in records:
                    try:  # another test puts a record that is not OTLP there on purpose
                        request = ExportTraceServiceRequest.FromString(record.value)
                    except DecodeError:
                        continue
                    for resource_spans in request.resource_spans:
                        service = next(
                            a.value.string_value
                            for a in resource_spans.resource.attributes
                            if a.key == "service.name"
                        )
                        for scope in resource_spans.scope_spans:
                            found.extend(
                                (service, span)
                                for span in scope.spans
                                if span.trace_id.hex() == trace_id
                            )
    finally:
        await consumer.stop()
    return found


async def test_trace_context_crosses_processes(
    kafka_bootstrap: str,
    fresh_topic: Topic,
    service_env: Callable[..., dict[str, str]],
    tmp_path: Path,
) -> None:
    effects_path = tmp_path / "effects.sqlite"
    consumer = await start_consumer(service_env, fresh_topic, effects_path, tmp_path / "c.log")
    try:
        publisher = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.procs.publish_traced",
            cwd=ROOT,
            # whole traces on the bus (the default sends the answer spans only)
            env=service_env(
                TEST_TOPIC=fresh_topic.name, TEST_COUNT="1", MESHLLM_TELEMETRY__KAFKA_SPANS="all"
            ),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await publisher.communicate()
        assert publisher.returncode == 0, err.decode()[-2000:]
        trace_id = out.decode().split()[-1]

        await poll_until(lambda: effects(effects_path), message="the consumer's effect")
        assert effects(effects_path)[0][3] == trace_id

        async def both_sides() -> list[tuple[str, object]]:
            spans = await exported_spans(kafka_bootstrap, trace_id)
            services = {service for service, _ in spans}
            return spans if {"traced-publisher", "effect-consumer"} <= services else []

        spans: list[tuple[str, object]] = []
        for _ in range(100):
            spans = await both_sides()
            if spans:
                break
            await asyncio.sleep(0.1)
        assert spans, "spans of both processes never reached telemetry.spans"
        by_name = {(service, span.name): span for service, span in spans}  # type: ignore[attr-defined]
        publish = by_name[("traced-publisher", f"{fresh_topic.name} publish")]
        process = by_name[("effect-consumer", f"{fresh_topic.name} process")]
        root = by_name[("traced-publisher", "client request")]
        assert publish.parent_span_id == root.span_id
        assert process.parent_span_id == publish.span_id
        assert process.kind == process.SPAN_KIND_CONSUMER
        assert publish.kind == publish.SPAN_KIND_PRODUCER
    finally:
        consumer.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(consumer.wait(), 30) == 0


async def committed_offsets(bootstrap: str, topic: Topic, group: str) -> dict[int, int]:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        offsets = {}
        for partition in range(topic.partitions):
            committed = await consumer.committed(TopicPartition(topic.name, partition))
            offsets[partition] = committed or 0
        return offsets
    finally:
        await consumer.stop()


@pytest.mark.slow
async def test_sigkilled_consumer_loses_nothing_and_committed_only_what_it_processed(
    kafka_bootstrap: str,
    fresh_topic: Topic,
    service_env: Callable[..., dict[str, str]],
    tmp_path: Path,
) -> None:
    total = 300
    bus = Bus(
        MeshSettings(kafka={"bootstrap": kafka_bootstrap}, data_dir=tmp_path), service="tests"
    )
    await bus.start()
    sent = set()
    for i in range(total):
        event = ev.FeedbackEvent(request_id=f"r{i}")
        await bus.publisher.enqueue(fresh_topic, event)
        sent.add(event.envelope.event_id)
    await bus.stop()

    effects_path = tmp_path / "effects.sqlite"
    log = tmp_path / "consumer.log"
    for kill_after in (40, 140):
        consumer = await start_consumer(service_env, fresh_topic, effects_path, log, delay_ms=10)
        await poll_until(
            lambda n=kill_after: len(effects(effects_path)) >= n,
            timeout=60,
            message=f"{kill_after} effects",
        )
        os.kill(consumer.pid, signal.SIGKILL)
        await consumer.wait()

        processed = {(partition, offset) for _, partition, offset, _, _ in effects(effects_path)}
        for partition, committed in (
            await committed_offsets(kafka_bootstrap, fresh_topic, "effects")
        ).items():
            missing = [o for o in range(committed) if (partition, o) not in processed]
            assert not missing, f"partition {partition}: committed {committed} past {missing}"
        assert len(processed) < total, "the kill came too late to test anything"

    consumer = await start_consumer(service_env, fresh_topic, effects_path, log, delay_ms=0)
    try:
        await poll_until(
            lambda: {row[0] for row in effects(effects_path)} >= sent,
            timeout=60,
            message="every event processed",
        )
    finally:
        consumer.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(consumer.wait(), 30) == 0
    rows = effects(effects_path)
    assert {row[0] for row in rows} == sent
    # Only the event in flight at each kill can run twice.
    assert len(rows) - len(sent) <= 2
