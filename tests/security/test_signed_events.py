"""Signed events against the real broker: a subscriber that requires the mesh's signature
handles what the mesh's producers wrote and dead-letters what any other client wrote or
altered (a tenant rewritten in the envelope), without stopping."""

from __future__ import annotations

from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from shared.bus import Bus
from shared.bus.admin import ensure_topics
from shared.bus.signing import SIGNATURE_HEADER, ensure_key, key_path
from shared.events.v1 import events_pb2 as ev
from shared.settings import MeshSettings, Mode, SettingsError
from tests.conftest import poll_until
from tests.procs.topics import scratch_topic
from tests.test_bus import Recorder, read_all, running_bus, settings_for

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(120)]
TYPE = b"meshllm.events.v1.FeedbackEvent"


async def test_unsigned_and_forged_events_are_dead_lettered(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    topic = scratch_topic(f"test.signed.{tmp_path.name[-8:]}", partitions=1)
    await ensure_topics(kafka_bootstrap, [topic])
    mesh = settings_for(kafka_bootstrap, tmp_path / "mesh", require_signed=True)
    ensure_key(key_path(mesh))  # what `meshllm up` makes
    recorder = Recorder()
    bus = await running_bus(mesh, topic, recorder)
    outsider = Bus(settings_for(kafka_bootstrap, tmp_path / "outsider"), service="tests")
    raw = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await outsider.start()
    await raw.start()
    try:
        # a Kafka client without the mesh's key: well-formed, but unsigned
        await outsider.publish(topic, ev.FeedbackEvent(request_id="unsigned"), tenant="globex")
        # a signed event of tenant acme, replayed with its tenant rewritten
        signed = ev.FeedbackEvent(request_id="forged")
        signed.envelope.event_id = "0190d4a2-0000-7000-8000-000000000001"
        signed.envelope.schema_version = 1
        signed.envelope.tenant = "acme"
        signature = bus.publisher._signer.signature(topic.name, TYPE, signed.SerializeToString())  # type: ignore[union-attr]
        signed.envelope.tenant = "globex"
        headers = [("meshllm-type", TYPE), (SIGNATURE_HEADER, signature)]
        await raw.send_and_wait(topic.name, signed.SerializeToString(), headers=headers)
        await bus.publish(topic, ev.FeedbackEvent(request_id="good"), tenant="acme")
        await poll_until(lambda: recorder.events, message="the signed event after the others")
        assert [e.request_id for e in recorder.events] == ["good"]
        dead = await read_all(kafka_bootstrap, topic.dlq, expected=2)
        reasons = [{k: v.decode() for k, v in record.headers} for record in dead]
        assert [r["meshllm-dlq-reason"] for r in reasons] == ["unverified", "unverified"]
        assert "unsigned event" in reasons[0]["meshllm-dlq-error"]
        assert "forged or altered" in reasons[1]["meshllm-dlq-error"]
        assert bus.subscribers[0].running
    finally:
        await raw.stop()
        await outsider.stop()
        await bus.stop()


async def test_requiring_signatures_without_a_key_stops_start_up(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    settings = MeshSettings(
        kafka={"bootstrap": kafka_bootstrap}, bus={"require_signed": True}, data_dir=tmp_path
    )
    bus = Bus(settings, service="tests")
    bus.subscribe(scratch_topic("test.nokey"), group="tests")(Recorder())
    with pytest.raises(SettingsError, match="MESHLLM_BUS__SIGNING_KEY_FILE"):
        await bus.start()
    await bus.stop()


def test_cluster_mode_requires_signed_events_unless_told_otherwise(tmp_path: Path) -> None:
    """In a cluster any Kafka client can write to the topics: consumers there trust a tenant
    or an ACL group only on a signed event, unless an operator turns it off on purpose."""
    assert MeshSettings(mode=Mode.CLUSTER, data_dir=tmp_path).signatures_required
    assert not MeshSettings(data_dir=tmp_path).signatures_required  # embedded: meshllm up's job
    explicit = MeshSettings(mode=Mode.CLUSTER, data_dir=tmp_path, bus={"require_signed": False})
    assert not explicit.signatures_required
