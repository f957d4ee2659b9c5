"""Reply chunks of one run: text that arrives while a publish is in flight goes into the
next chunk; the first text never waits; text and order stay exact."""

from __future__ import annotations

import asyncio
import random
from typing import Any

from services.router.chunks import ChunkStream
from shared.events.v1 import events_pb2 as ev


class Broker:
    """Takes chunks; acknowledges each when the test says so."""

    def __init__(self) -> None:
        self.chunks: list[ev.ReplyChunk] = []
        self.deliveries: list[asyncio.Future[Any]] = []

    async def send(self, chunk: ev.ReplyChunk) -> asyncio.Future[Any]:
        self.chunks.append(chunk)
        delivery: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.deliveries.append(delivery)
        return delivery

    def ack_all(self) -> None:
        for delivery in self.deliveries:
            if not delivery.done():
                delivery.set_result(None)

    def texts(self) -> list[str]:
        return [chunk.delta for chunk in self.chunks]


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_the_first_text_goes_at_once_and_the_rest_gathers_while_in_flight() -> None:
    broker = Broker()
    chunks = ChunkStream(broker.send, "r1", "run-a")

    await chunks.add(0, "a")
    assert broker.texts() == ["a"]  # published before any acknowledgement
    await chunks.add(0, "b")
    await chunks.add(0, "c")
    await settle()
    assert broker.texts() == ["a"]  # chunk 0 in flight: "b" and "c" wait together
    broker.ack_all()
    await settle()
    assert broker.texts() == ["a", "bc"]
    await chunks.add(0, "d")
    broker.ack_all()
    await settle()
    broker.ack_all()
    await chunks.close()
    assert broker.texts() == ["a", "bc", "d"]
    assert [c.sequence for c in broker.chunks] == [0, 1, 2]
    assert {(c.request_id, c.run, c.choice_index) for c in broker.chunks} == {("r1", "run-a", 0)}


async def test_nothing_in_flight_means_no_wait() -> None:
    broker = Broker()
    chunks = ChunkStream(broker.send, "r1", "run-a")
    await chunks.add(0, "a")
    broker.ack_all()
    await settle()  # acknowledged: nothing in flight any more
    await chunks.add(0, "b")
    assert broker.texts() == ["a", "b"]


async def test_choices_are_numbered_apart() -> None:
    broker = Broker()
    chunks = ChunkStream(broker.send, "r1", "run-a")
    await chunks.add(0, "x")
    await chunks.add(1, "p")
    await chunks.add(0, "y")
    await chunks.add(1, "q")
    broker.ack_all()
    await settle()
    broker.ack_all()
    await chunks.close()
    by_choice = {
        index: [(c.sequence, c.delta) for c in broker.chunks if c.choice_index == index]
        for index in (0, 1)
    }
    assert by_choice == {0: [(0, "x"), (1, "y")], 1: [(0, "pq")]}


async def test_text_and_order_stay_exact_whatever_the_timing() -> None:
    rng = random.Random(7)
    broker = Broker()
    chunks = ChunkStream(broker.send, "r1", "run-a")
    sent = [f"t{i} " for i in range(300)]

    async def acknowledge() -> None:
        while True:
            await asyncio.sleep(rng.random() * 0.002)
            broker.ack_all()

    acks = asyncio.create_task(acknowledge())
    try:
        for text in sent:
            await chunks.add(0, text)
            if rng.random() < 0.3:
                await asyncio.sleep(rng.random() * 0.001)
        await chunks.close()
    finally:
        acks.cancel()
    assert "".join(broker.texts()) == "".join(sent)
    assert [c.sequence for c in broker.chunks] == list(range(len(broker.chunks)))
    assert len(broker.chunks) < len(sent)  # gathered while in flight


async def test_a_lost_chunk_does_not_fail_the_run() -> None:
    broker = Broker()
    chunks = ChunkStream(broker.send, "r1", "run-a")
    await chunks.add(0, "a")
    await chunks.add(0, "b")
    broker.deliveries[0].set_exception(ConnectionError("not acknowledged"))
    await settle()
    broker.ack_all()
    await chunks.close()
    assert broker.texts() == ["a", "b"]


async def test_cancel_drops_what_was_not_published() -> None:
    broker = Broker()
    chunks = ChunkStream(broker.send, "r1", "run-a")
    await chunks.add(0, "a")
    await chunks.add(0, "b")
    chunks.cancel()
    broker.ack_all()
    await settle()
    assert broker.texts() == ["a"]


async def test_a_delivery_of_none_counts_as_acknowledged() -> None:
    sent: list[str] = []

    async def send(chunk: ev.ReplyChunk) -> None:
        sent.append(chunk.delta)

    chunks = ChunkStream(send, "r1", "run-a")  # type: ignore[arg-type]
    for text in "abc":
        await chunks.add(0, text)
    await chunks.close()
    assert "".join(sent) == "abc"
