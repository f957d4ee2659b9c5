"""Local wake-ups: idle consumers sleep paused, producers' announcements wake them.

The unit part drives :class:`Waker` and :class:`WakeListener` directly; the broker part
shows that a sleeping subscriber gets an announced event at once (its idle poll is set
far beyond the test's patience), that one from a producer that announces nothing still
arrives by the idle poll, and that bad datagrams on a consumer's socket change nothing.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer, TopicPartition

from shared.bus import Bus, EventContext
from shared.bus.wakeup import WakeListener, Waker, wake_directory
from shared.events.v1 import events_pb2 as ev
from shared.settings import MeshSettings, Mode
from shared.topics import Topic
from tests.conftest import poll_until

# ------------------------------------------------------------------------- unit


def test_wake_ups_follow_the_setting(tmp_path: Path) -> None:
    assert MeshSettings(data_dir=tmp_path).local_wakeup  # on with the embedded broker
    assert MeshSettings(data_dir=tmp_path, bus={"local_wakeup": True}).local_wakeup
    cluster = MeshSettings(mode=Mode.CLUSTER, data_dir=tmp_path, bus={"require_signed": False})
    assert not cluster.local_wakeup
    assert wake_directory(cluster) is None
    off = MeshSettings(data_dir=tmp_path, bus={"local_wakeup": False})
    assert wake_directory(off) is None


def test_the_directory_is_private_to_this_user(tmp_path: Path) -> None:
    settings = MeshSettings(
        data_dir=tmp_path, kafka={"bootstrap": "127.0.0.1:1"}, bus={"local_wakeup": True}
    )
    directory = wake_directory(settings)
    assert directory is not None
    for path in (directory, directory.parent):
        assert path.stat().st_uid == os.getuid()
        assert path.stat().st_mode & 0o077 == 0


def test_a_directory_open_to_others_turns_wake_ups_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    base = tmp_path / f"meshllm-{os.getuid()}"
    base.mkdir(mode=0o777)
    base.chmod(0o777)  # someone else could plant sockets here
    settings = MeshSettings(
        data_dir=tmp_path, kafka={"bootstrap": "127.0.0.1:2"}, bus={"local_wakeup": True}
    )
    assert wake_directory(settings) is None
    base.chmod(0o700)
    assert wake_directory(settings) is not None


def test_a_symlinked_directory_turns_wake_ups_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    (tmp_path / f"meshllm-{os.getuid()}").symlink_to(target)
    settings = MeshSettings(data_dir=tmp_path, bus={"local_wakeup": True})
    assert wake_directory(settings) is None


async def test_announcements_reach_the_listener_and_are_forgotten_once_read(
    tmp_path: Path,
) -> None:
    listener = WakeListener(tmp_path, ["topic.a", "topic.b"], forget_after_s=30)
    listener.open()
    waker = Waker(tmp_path)
    try:
        tp = TopicPartition("topic.a", 0)
        sleeper = asyncio.create_task(listener.sleep(30))
        await asyncio.sleep(0)
        waker.announce("topic.a", 0, 41)
        waker.announce("topic.a", 0, 42)  # the same turn: one datagram, the highest offset
        waker.announce("topic.c", 0, 7)  # nobody listens: nothing sent, nothing fails
        async with asyncio.timeout(5):
            await sleeper
        assert listener.behind({tp: 40})
        assert listener.behind({tp: 42})
        assert not listener.behind({tp: 43})  # read past it: forgotten
        assert not listener.behind({tp: 0})
    finally:
        listener.close()
        waker.close()
    assert not list((tmp_path / "topic.a").iterdir())  # its sockets are removed


async def test_announcements_expire_and_bad_datagrams_are_ignored(tmp_path: Path) -> None:
    listener = WakeListener(tmp_path, ["topic.a"], forget_after_s=0.05)
    listener.open()
    try:
        (path,) = (tmp_path / "topic.a").iterdir()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
            sender.sendto(b"garbage", str(path))
            sender.sendto(b"\x00" * 4 + b"\x7f" + b"\xff" * 7, str(path))  # an absurd offset
        async with asyncio.timeout(5):
            await listener.sleep(5)
        tp = TopicPartition("topic.a", 0)
        assert listener.behind({tp: 10})  # believed for a while ...
        await asyncio.sleep(0.1)
        assert not listener.behind({tp: 10})  # ... then forgotten
    finally:
        listener.close()


async def test_a_dead_consumers_socket_is_tidied_away(tmp_path: Path) -> None:
    folder = tmp_path / "topic.a"
    folder.mkdir()
    stale = folder / "123-dead.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(stale))
    sock.close()  # bound once, nobody reads: as after a crash
    waker = Waker(tmp_path)
    try:
        waker.announce("topic.a", 0, 1)
        await asyncio.sleep(0.01)
    finally:
        waker.close()
    assert not stale.exists()


# ------------------------------------------------------------------------- broker


def _settings(bootstrap: str, data_dir: Path, idle_poll_ms: int) -> MeshSettings:
    return MeshSettings(
        kafka={"bootstrap": bootstrap},
        bus={"local_wakeup": True, "idle_poll_ms": idle_poll_ms},
        data_dir=data_dir,
    )


async def _sleeping_subscriber(
    settings: MeshSettings, topic: Topic, received: asyncio.Queue[tuple[str, float]]
) -> Bus:
    bus = Bus(settings, service="tests")

    async def handle(event: ev.FeedbackEvent, ctx: EventContext) -> None:
        received.put_nowait((event.request_id, time.monotonic()))

    bus.subscribe(topic, group=f"{topic.name}.wake", durable_dedup=False)(handle)
    await bus.start()
    await poll_until(lambda: bus.ready, message="subscriber assignment")
    return bus


def _asleep(bus: Bus) -> bool:
    consumer = bus.subscribers[0]._consumer
    return (
        consumer is not None
        and bool(consumer.assignment())
        and consumer.paused() == (consumer.assignment())
    )


@pytest.mark.kafka
@pytest.mark.timeout(120)
async def test_a_sleeping_subscriber_is_woken_by_an_announced_event(
    kafka_bootstrap: str, fresh_topic: Topic, tmp_path: Path
) -> None:
    # an idle poll of a minute: only the announcement can bring these events in time
    settings = _settings(kafka_bootstrap, tmp_path, idle_poll_ms=60_000)
    received: asyncio.Queue[tuple[str, float]] = asyncio.Queue()
    consumer_bus = await _sleeping_subscriber(settings, fresh_topic, received)
    producer_bus = Bus(settings, service="tests-producer")
    await producer_bus.start()
    try:
        for index in range(5):
            await poll_until(lambda: _asleep(consumer_bus), message="the consumer asleep")
            sent = time.monotonic()
            await producer_bus.publish(fresh_topic, ev.FeedbackEvent(request_id=f"r{index}"))
            async with asyncio.timeout(10):
                request_id, arrived = await received.get()
            assert request_id == f"r{index}"
            assert arrived - sent < 5  # far below the minute of the idle poll
    finally:
        await producer_bus.stop()
        await consumer_bus.stop()


@pytest.mark.kafka
@pytest.mark.timeout(120)
async def test_an_unannounced_record_arrives_by_the_idle_poll(
    kafka_bootstrap: str, fresh_topic: Topic, tmp_path: Path
) -> None:
    settings = _settings(kafka_bootstrap, tmp_path, idle_poll_ms=200)
    received: asyncio.Queue[tuple[str, float]] = asyncio.Queue()
    consumer_bus = await _sleeping_subscriber(settings, fresh_topic, received)
    publisher = Bus(
        MeshSettings(
            kafka={"bootstrap": kafka_bootstrap}, data_dir=tmp_path, bus={"local_wakeup": False}
        ),
        service="tests-remote",
    )
    await publisher.start()
    try:
        await poll_until(lambda: _asleep(consumer_bus), message="the consumer asleep")
        await publisher.publish(fresh_topic, ev.FeedbackEvent(request_id="quiet"))
        async with asyncio.timeout(10):
            request_id, _ = await received.get()
        assert request_id == "quiet"
    finally:
        await publisher.stop()
        await consumer_bus.stop()


@pytest.mark.kafka
@pytest.mark.timeout(120)
async def test_forged_wake_ups_neither_lose_nor_duplicate_events(
    kafka_bootstrap: str, fresh_topic: Topic, tmp_path: Path
) -> None:
    settings = _settings(kafka_bootstrap, tmp_path, idle_poll_ms=300)
    received: asyncio.Queue[tuple[str, float]] = asyncio.Queue()
    consumer_bus = await _sleeping_subscriber(settings, fresh_topic, received)
    directory = wake_directory(settings)
    assert directory is not None
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        await poll_until(lambda: _asleep(consumer_bus), message="the consumer asleep")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
            for path in (directory / fresh_topic.name).iterdir():
                for payload in (b"x", b"\x00\x00\x00\x00" + b"\x7f" + b"\xff" * 7, b""):
                    sender.sendto(payload, str(path))
        # a raw record that is not an event: dead-lettered, never handled
        await producer.send_and_wait(fresh_topic.name, b"\x00not protobuf")
        publisher = Bus(settings, service="tests-producer")
        await publisher.start()
        await publisher.publish(fresh_topic, ev.FeedbackEvent(request_id="after"))
        await publisher.stop()
        async with asyncio.timeout(10):
            request_id, _ = await received.get()
        assert request_id == "after"
        await poll_until(lambda: _asleep(consumer_bus), message="asleep again", timeout=10)
        assert received.empty()
    finally:
        await producer.stop()
        await consumer_bus.stop()


async def test_a_datagram_carries_every_partition_of_a_turn(tmp_path: Path) -> None:
    listener = WakeListener(tmp_path, ["topic.a"], forget_after_s=30)
    listener.open()
    waker = Waker(tmp_path)
    try:
        sleeper = asyncio.create_task(listener.sleep(30))
        await asyncio.sleep(0)
        for partition in range(12):  # more than a socket's datagram queue holds
            waker.announce("topic.a", partition, 100 + partition)
        async with asyncio.timeout(5):
            await sleeper
        for partition in range(12):
            tp = TopicPartition("topic.a", partition)
            assert listener.behind({tp: 100 + partition})
            assert not listener.behind({tp: 101 + partition})
    finally:
        listener.close()
        waker.close()


async def test_a_busy_consumer_still_gets_the_last_announcement(tmp_path: Path) -> None:
    folder = tmp_path / "topic.a"
    folder.mkdir()
    busy = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # bound, not read for a while
    busy.bind(str(folder / "busy.sock"))
    busy.setblocking(False)
    waker = Waker(tmp_path)
    try:
        queue = int(Path("/proc/sys/net/unix/max_dgram_qlen").read_text())
        last = queue + 20
        for offset in range(last + 1):  # one turn each: more datagrams than its queue holds
            waker.announce("topic.a", 0, offset)
            await asyncio.sleep(0)
        received = []
        while True:  # the consumer gets round to reading ...
            try:
                received.append(busy.recv(64))
            except BlockingIOError:
                break
        await asyncio.sleep(0.05)  # ... and the announcement it missed is sent again
        while True:
            try:
                received.append(busy.recv(64))
            except BlockingIOError:
                break
        offsets = [struct.unpack(">iq", payload)[1] for payload in received]
        assert len(offsets) < last + 1  # the queue was full: not every datagram got there
        assert max(offsets) == last
    finally:
        busy.close()
        waker.close()
