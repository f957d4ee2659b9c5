"""The bus against the real broker: delivery, retries, dead letters, duplicates, bad input."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from shared.bus import Bus, EventContext
from shared.events.v1 import events_pb2 as ev
from shared.settings import MeshSettings
from shared.topics import Topic
from tests.conftest import poll_until
from tests.procs.topics import scratch_topic

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(120)]


def settings_for(bootstrap: str, data_dir: Path, **bus: object) -> MeshSettings:
    return MeshSettings(
        kafka={"bootstrap": bootstrap},
        bus={"retry_backoff_ms": 5, **bus},
        data_dir=data_dir,
    )


async def read_all(
    bootstrap: str, topic: str, expected: int, timeout: float = 20
) -> list[ConsumerRecord]:
    """Every record of a one-partition topic, from the start, once ``expected`` are there."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=5
    )
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        records: list[ConsumerRecord] = []
        async with asyncio.timeout(timeout):
            while len(records) < expected:
                batch = await consumer.getmany(tp, timeout_ms=200)
                records.extend(batch.get(tp, []))
        return records
    finally:
        await consumer.stop()


class Recorder:
    """A handler that records events and fails the first ``fail_times`` tries of chosen ones."""

    def __init__(self, fail_times: dict[str, int] | None = None) -> None:
        self.events: list[ev.FeedbackEvent] = []
        self.attempts: dict[str, int] = {}
        self._fail_times = fail_times or {}

    async def __call__(self, event: ev.FeedbackEvent, ctx: EventContext) -> None:
        self.attempts[event.request_id] = ctx.attempt
        if ctx.attempt <= self._fail_times.get(event.request_id, 0):
            raise RuntimeError(f"boom on {event.request_id} try {ctx.attempt}")
        self.events.append(event)


async def running_bus(
    settings: MeshSettings, topic: Topic, handler: Recorder, group: str = "tests"
) -> Bus:
    bus = Bus(settings, service="tests")
    bus.subscribe(topic, group=group)(handler)
    await bus.start()
    await poll_until(lambda: bus.ready, message="subscriber assignment")
    return bus


async def test_event_round_trip_keeps_envelope_and_key(
    kafka_bootstrap: str, fresh_topic: Topic, tmp_path: Path
) -> None:
    recorder = Recorder()
    bus = await running_bus(settings_for(kafka_bootstrap, tmp_path), fresh_topic, recorder)
    try:
        await bus.publish(fresh_topic, ev.FeedbackEvent(request_id="r1", rating=1), tenant="acme")
        await poll_until(lambda: recorder.events, message="delivery")
        event = recorder.events[0]
        assert event.request_id == "r1"
        assert event.envelope.tenant == "acme"
        assert event.envelope.schema_version == 1
        assert event.envelope.producer == "tests"
        assert len(event.envelope.event_id) == 36
    finally:
        await bus.stop()


async def test_publishing_a_type_the_topic_does_not_carry_is_refused(
    kafka_bootstrap: str, fresh_topic: Topic, tmp_path: Path
) -> None:
    bus = Bus(settings_for(kafka_bootstrap, tmp_path), service="tests")
    await bus.start()
    try:
        with pytest.raises(TypeError, match=r"does not carry meshllm\.events\.v1\.OpsAlert"):
            await bus.publish(fresh_topic, ev.OpsAlert(alert_id="a"))
    finally:
        await bus.stop()


async def test_failing_handler_retries_then_dead_letters_without_blocking(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    from shared.bus.admin import ensure_topics

    topic = scratch_topic(f"test.dlq.{tmp_path.name[-8:]}", partitions=1)
    await ensure_topics(kafka_bootstrap, [topic])
    recorder = Recorder(fail_times={"poison": 99, "flaky": 2})
    bus = await running_bus(
        settings_for(kafka_bootstrap, tmp_path, max_attempts=3), topic, recorder
    )
    try:
        for request_id in ("before", "poison", "flaky", "after"):
            await bus.publish(topic, ev.FeedbackEvent(request_id=request_id))
        await poll_until(lambda: len(recorder.events) == 3, message="three handled events")
        assert [e.request_id for e in recorder.events] == ["before", "flaky", "after"]
        assert recorder.attempts == {"before": 1, "poison": 3, "flaky": 3, "after": 1}

        [dead] = await read_all(kafka_bootstrap, topic.dlq, expected=1)
        headers = {k: v.decode() for k, v in dead.headers}
        assert headers["meshllm-dlq-reason"] == "handler_failed"
        assert headers["meshllm-dlq-error"] == "RuntimeError: boom on poison try 3"
        assert headers["meshllm-dlq-attempts"] == "3"
        assert headers["meshllm-dlq-topic"] == topic.name
        assert ev.FeedbackEvent.FromString(dead.value).request_id == "poison"
    finally:
        await bus.stop()


async def test_duplicate_event_is_handled_once(
    kafka_bootstrap: str, fresh_topic: Topic, tmp_path: Path
) -> None:
    recorder = Recorder()
    bus = await running_bus(settings_for(kafka_bootstrap, tmp_path), fresh_topic, recorder)
    try:
        event = ev.FeedbackEvent(request_id="twice")
        event.envelope.event_id = "0190f6d2-7b1a-7c3e-8f00-000000000001"
        await bus.publish(fresh_topic, event)
        await bus.publish(fresh_topic, event)
        await bus.publish(fresh_topic, ev.FeedbackEvent(request_id="marker"))
        await poll_until(
            lambda: any(e.request_id == "marker" for e in recorder.events), message="marker event"
        )
        assert [e.request_id for e in recorder.events].count("twice") == 1
    finally:
        await bus.stop()


async def test_redelivery_after_restart_is_absorbed(kafka_bootstrap: str, tmp_path: Path) -> None:
    """Handled but uncommitted events come back after a restart; none reach the handler twice."""
    from shared.bus.admin import ensure_topics

    topic = scratch_topic(f"test.redeliver.{tmp_path.name[-8:]}", partitions=1)
    await ensure_topics(kafka_bootstrap, [topic])
    settings = settings_for(kafka_bootstrap, tmp_path)
    first = Recorder()
    bus = await running_bus(settings, topic, first)
    for i in range(5):
        await bus.publish(topic, ev.FeedbackEvent(request_id=f"e{i}"))
    await poll_until(lambda: len(first.events) == 5, message="first pass")
    # Rewind the committed offset as a crash before commit would leave it.
    subscriber = bus.subscribers[0]
    consumer = subscriber._consumer
    assert consumer is not None
    await consumer.commit({TopicPartition(topic.name, 0): 0})
    await bus.stop()

    second = Recorder()
    bus = await running_bus(settings, topic, second)
    try:
        await bus.publish(topic, ev.FeedbackEvent(request_id="new"))
        await poll_until(lambda: second.events, message="the new event")
        assert [e.request_id for e in second.events] == ["new"]
    finally:
        await bus.stop()


@pytest.mark.parametrize(
    ("value", "headers", "reason_part"),
    [
        (
            b"\xff\xff\xff not protobuf",
            [("meshllm-type", b"meshllm.events.v1.FeedbackEvent")],
            "not a valid meshllm.events.v1.FeedbackEvent",
        ),
        (
            ev.FeedbackEvent(
                envelope=ev.Envelope(event_id="x", schema_version=2)
            ).SerializeToString(),
            [],
            "unsupported envelope.schema_version 2",
        ),
        (ev.FeedbackEvent(request_id="no envelope").SerializeToString(), [], "has no envelope"),
        (
            b"",
            [("meshllm-type", b"meshllm.events.v1.OpsAlert")],
            "does not carry message type 'meshllm.events.v1.OpsAlert'",
        ),
    ],
    ids=["garbage-bytes", "unknown-version", "no-envelope", "wrong-type"],
)
async def test_bad_events_go_to_the_dlq_and_the_consumer_keeps_going(
    kafka_bootstrap: str,
    tmp_path: Path,
    value: bytes,
    headers: list[tuple[str, bytes]],
    reason_part: str,
) -> None:
    from shared.bus.admin import ensure_topics

    topic = scratch_topic(f"test.bad.{tmp_path.name[-8:]}", partitions=1)
    await ensure_topics(kafka_bootstrap, [topic])
    recorder = Recorder()
    bus = await running_bus(settings_for(kafka_bootstrap, tmp_path), topic, recorder)
    raw = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await raw.start()
    try:
        await raw.send_and_wait(topic.name, value, headers=headers)
        await bus.publish(topic, ev.FeedbackEvent(request_id="good"))
        await poll_until(lambda: recorder.events, message="the good event after the bad one")
        [dead] = await read_all(kafka_bootstrap, topic.dlq, expected=1)
        dlq = {k: v.decode() for k, v in dead.headers}
        assert dlq["meshllm-dlq-reason"] == "undecodable"
        assert reason_part in dlq["meshllm-dlq-error"]
        assert dead.value == value
        assert bus.subscribers[0].running
    finally:
        await raw.stop()
        await bus.stop()


async def test_members_beyond_the_partition_count_are_ready_and_idle(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    from shared.bus.admin import ensure_topics

    topic = scratch_topic(f"test.members.{tmp_path.name[-8:]}", partitions=1)
    await ensure_topics(kafka_bootstrap, [topic])
    first, second = Recorder(), Recorder()
    buses = [
        await running_bus(settings_for(kafka_bootstrap, tmp_path / "a"), topic, first),
        await running_bus(settings_for(kafka_bootstrap, tmp_path / "b"), topic, second),
    ]
    try:
        await poll_until(lambda: all(b.ready for b in buses), message="both members ready")
        await buses[0].publish(topic, ev.FeedbackEvent(request_id="one"))
        await poll_until(lambda: first.events or second.events, message="delivery")
        assert len(first.events) + len(second.events) == 1
    finally:
        for bus in buses:
            await bus.stop()


async def test_a_batch_shares_one_trace_and_keeps_one_envelope_per_event(
    kafka_bootstrap: str, fresh_topic: Topic, tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    recorder = Recorder()
    traceparents: list[str] = []

    async def handler(event: ev.FeedbackEvent, ctx: EventContext) -> None:
        traceparents.append(dict(ctx.headers)["traceparent"].decode())
        await recorder(event, ctx)

    bus = Bus(settings_for(kafka_bootstrap, tmp_path), service="tests")
    bus.subscribe(fresh_topic, group="tests")(handler)
    await bus.start()
    try:
        await poll_until(lambda: bus.ready, message="subscriber assignment")
        events = [ev.FeedbackEvent(request_id=f"b{i}") for i in range(20)]
        await asyncio.gather(*await bus.publisher.enqueue_many(fresh_topic, events, tenant="t1"))
        await poll_until(lambda: len(recorder.events) == 20, message="the whole batch")
        assert len({e.envelope.event_id for e in recorder.events}) == 20
        assert {e.envelope.tenant for e in recorder.events} == {"t1"}
        trace_ids = {tp.split("-")[1] for tp in traceparents}
        assert len(trace_ids) == 1

        def finished(operation: str) -> list[Any]:
            # only this topic's: a late span of an earlier test's bus may land here too
            name = f"{fresh_topic.name} {operation}"
            return [s for s in spans.get_finished_spans() if s.name == name]

        # a process span ends just after its handler has recorded the event
        await poll_until(lambda: len(finished("process")) == 20, message="20 process spans")
        [batch] = finished("publish")
        assert batch.attributes is not None
        assert batch.attributes["messaging.batch.message_count"] == 20
        assert format(batch.context.trace_id, "032x") in trace_ids
        processed = finished("process")
        assert all(
            s.parent is not None and s.parent.span_id == batch.context.span_id for s in processed
        )
    finally:
        await bus.stop()
