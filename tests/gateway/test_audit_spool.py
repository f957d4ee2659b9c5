"""The gateway's audit durability: Kafka's ack, else an fsync'd spool replayed later."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer

from services.gateway.audit import (
    AuditRecorder,
    AuditSettings,
    AuditSpool,
    AuditUnavailable,
    SpoolFull,
)
from shared.bus import Publisher
from shared.events.v1 import events_pb2 as ev
from shared.pii import PiiPolicy, Purpose, TenantPiiSettings
from shared.settings import MeshSettings
from shared.topics import AUDIT_EVENTS
from tests.conftest import poll_until

SETTINGS = AuditSettings(ack_timeout_s=1.0, replay_every_s=0.1)


def _event(request_id: str) -> ev.AuditEvent:
    event = ev.AuditEvent(request_id=request_id, model="smollm2-135m-instruct")
    event.response.status_code = 200
    return event


def test_spool_keeps_records_in_order_and_skips_a_torn_line(tmp_path: Path) -> None:
    spool = AuditSpool(tmp_path / "spool.jsonl")
    spool.append("r1", "acme", _event("r1"))
    spool.append("r2", "acme", _event("r2"))
    with spool.path.open("a") as raw:
        raw.write('{"key": "r3", "tenant": "acme", "ev')  # a crash mid-write
    assert [key for key, _, _ in spool.records()] == ["r1", "r2"]
    spool.remove(1)
    assert [(key, event.request_id) for key, _, event in spool.records()] == [("r2", "r2")]


async def test_a_record_kafka_does_not_take_is_spooled(tmp_path: Path) -> None:
    # a publisher that was never started fails every send, as a lost broker does
    publisher = Publisher(MeshSettings(data_dir=tmp_path), service="gateway")
    recorder = AuditRecorder(
        publisher, AuditSpool(tmp_path / "spool.jsonl"), SETTINGS, producer="gw"
    )
    event = _event("r1")
    await recorder.record(event, key="r1", tenant="acme")
    [(key, tenant, spooled)] = recorder.spool.records()
    assert (key, tenant) == ("r1", "acme")
    assert spooled.envelope.event_id == event.envelope.event_id  # stamped before spooling
    await recorder.stop()


async def test_no_broker_and_no_disk_is_an_error(tmp_path: Path) -> None:
    publisher = Publisher(MeshSettings(data_dir=tmp_path), service="gateway")
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("a file where the spool's folder should be")
    recorder = AuditRecorder(
        publisher, AuditSpool(blocked / "spool.jsonl"), SETTINGS, producer="gw"
    )
    with pytest.raises(AuditUnavailable, match="could not be stored"):
        await recorder.record(_event("r1"), key="r1", tenant="acme")


@pytest.mark.kafka
@pytest.mark.timeout(90)
async def test_the_spool_is_replayed_to_kafka_with_the_same_event_ids(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    spool = AuditSpool(tmp_path / "spool.jsonl")
    offline = AuditRecorder(
        Publisher(MeshSettings(data_dir=tmp_path), service="gateway"),
        spool,
        SETTINGS,
        producer="gw",
    )
    events = [_event(f"replay-{i}") for i in range(3)]
    for event in events:
        await offline.record(event, key=event.request_id, tenant="acme")
    await offline.stop()
    assert len(spool) == 3

    publisher = Publisher(
        MeshSettings(kafka={"bootstrap": kafka_bootstrap}, data_dir=tmp_path), service="gateway"
    )
    await publisher.start()
    online = AuditRecorder(publisher, spool, SETTINGS, producer="gw")
    try:
        online.start()  # a restarted gateway replays what is left
        await poll_until(lambda: len(spool) == 0, timeout=30, message="the spool to drain")
        wanted = {event.envelope.event_id for event in events}
        assert wanted <= await _audit_event_ids(kafka_bootstrap, wanted)
    finally:
        await online.stop()
        await publisher.stop()


async def _audit_event_ids(bootstrap: str, wanted: set[str], timeout: float = 20) -> set[str]:
    """Event ids on audit.events, read from the start until ``wanted`` are all seen."""
    consumer = AIOKafkaConsumer(
        AUDIT_EVENTS.name,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        fetch_max_wait_ms=50,
    )
    await consumer.start()
    seen: set[str] = set()
    try:
        async with asyncio.timeout(timeout):
            while not wanted <= seen:
                batches = await consumer.getmany(timeout_ms=200)
                for records in batches.values():
                    for record in records:
                        seen.add(ev.AuditEvent.FromString(record.value).envelope.event_id)
    finally:
        await consumer.stop()
    return seen


async def test_audit_text_is_redacted_only_for_tenants_that_ask(tmp_path: Path) -> None:
    pii = TenantPiiSettings(tenants={"acme": {Purpose.AUDIT: PiiPolicy(enabled=True)}})
    publisher = Publisher(MeshSettings(data_dir=tmp_path), service="gateway")
    recorder = AuditRecorder(
        publisher, AuditSpool(tmp_path / "spool.jsonl"), SETTINGS, producer="gw", pii=pii
    )
    for tenant in ("acme", "globex"):
        event = ev.AuditEvent(request_id=f"r-{tenant}")
        event.request.messages.add(role="user", content="call me at 13812345678")
        event.request.inputs.append("mail zhang.wei@example.com")
        await recorder.record(event, key=event.request_id, tenant=tenant)
    stored = {event.request_id: event for _, _, event in recorder.spool.records()}
    redacted, kept = stored["r-acme"].request, stored["r-globex"].request
    assert "13812345678" not in redacted.messages[0].content
    assert "[PHONE:" in redacted.messages[0].content
    assert "zhang.wei@example.com" not in redacted.inputs[0]
    assert kept.messages[0].content == "call me at 13812345678"  # audit keeps text by default
    await recorder.stop()


def test_the_spool_is_private_and_bounded(tmp_path: Path) -> None:
    """0600 whatever the umask; past its bound a record is refused, not the disk filled."""
    previous = os.umask(0o022)
    try:
        spool = AuditSpool(tmp_path / "spool.jsonl", max_bytes=2_000)
        spool.append("r1", "acme", _event("r1"))
        assert stat.S_IMODE((tmp_path / "spool.jsonl").stat().st_mode) == 0o600
        refusal = None
        for number in range(2, 100):
            try:
                spool.append(f"r{number}", "acme", _event(f"r{number}"))
            except SpoolFull as full:
                refusal = str(full)
                break
        assert refusal is not None, "the spool took 100 records past its bound"
        assert "MESHLLM_AUDIT__SPOOL_MAX_BYTES" in refusal
    finally:
        os.umask(previous)
    assert 1 < len(spool) < 100  # what fitted is kept


def test_a_replay_is_not_a_rewrite_and_a_drained_spool_is_emptied(tmp_path: Path) -> None:
    """Removing replayed records moves an offset: the spool file is never rewritten (its
    inode and bytes stay), and once everything is replayed it is truncated."""
    path = tmp_path / "spool.jsonl"
    spool = AuditSpool(path)
    for name in ("r1", "r2", "r3"):
        spool.append(name, "acme", _event(name))
    inode, size = path.stat().st_ino, path.stat().st_size
    spool.remove(2)
    assert (path.stat().st_ino, path.stat().st_size) == (inode, size)
    assert [key for key, _, _ in spool.records()] == ["r3"]
    assert [key for key, _, _ in AuditSpool(path).records()] == ["r3"]  # after a restart too
    spool.append("r4", "acme", _event("r4"))
    assert [key for key, _, _ in spool.records(limit=1)] == ["r3"]
    spool.remove(2)
    assert path.stat().st_size == 0
    assert spool.records() == []


def test_a_torn_last_line_does_not_swallow_the_next_record(tmp_path: Path) -> None:
    path = tmp_path / "spool.jsonl"
    spool = AuditSpool(path)
    spool.append("r1", "acme", _event("r1"))
    with path.open("a") as torn:
        torn.write('{"key": "half')  # a crash in the middle of a write
    spool.append("r2", "acme", _event("r2"))
    assert [key for key, _, _ in spool.records()] == ["r1", "r2"]


def test_the_bound_counts_what_waits_and_a_long_spool_drops_its_replayed_head(
    tmp_path: Path,
) -> None:
    """Replayed records do not count against the bound, and a spool that never drains
    whole is compacted once its replayed head passes half the bound."""
    path = tmp_path / "spool.jsonl"
    probe = AuditSpool(tmp_path / "probe.jsonl")
    probe.append("r0", "acme", _event("r0"))
    line = (tmp_path / "probe.jsonl").stat().st_size + 8  # one record's line, and a margin
    spool = AuditSpool(path, max_bytes=line * 8)
    for number in range(6):
        spool.append(f"r{number}", "acme", _event(f"r{number}"))
    spool.remove(5)  # replayed; r5 still waits, so the file is kept but compacted
    assert [key for key, _, _ in spool.records()] == ["r5"]
    assert path.stat().st_size < line * 2
    for number in range(6, 12):  # fits again: only r5 was waiting
        spool.append(f"r{number}", "acme", _event(f"r{number}"))
    assert [key for key, _, _ in AuditSpool(path).records()] == [f"r{n}" for n in range(5, 12)]
