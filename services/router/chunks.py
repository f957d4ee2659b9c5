"""The reply chunks of one run, as few as the broker needs: text that arrives while a
publish is in flight is gathered into the next chunk instead of one event per token.

Worked example, a replica streaming ``a``, ``b``, ``c``, ``d``::

    add("a")  nothing in flight: chunk 0 "a" is published now (the first text never waits)
    add("b")  chunk 0 not acknowledged yet: "b" waits
    add("c")  still in flight: "bc" waits
              chunk 0 acknowledged: chunk 1 "bc" is published
    add("d")  chunk 1 in flight: "d" waits
    close()   chunk 1 acknowledged: chunk 2 "d"; close returns once it is acknowledged

So a stream sends at most one batch of chunks per broker round trip, whatever the token
rate, and a token waits at most for the round trip of the chunk before it. Chunks of a
choice are numbered from 0 in the order of their text (the gateway rebuilds the text from
the numbers: ``services/gateway/relay.py``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from shared.events.v1 import events_pb2 as ev
from shared.logging import get_logger

log = get_logger(__name__)

Send = Callable[[ev.ReplyChunk], Awaitable["asyncio.Future[Any] | None"]]
"""Buffers one chunk for the broker; returns its delivery (None: delivered already)."""


class ChunkStream:
    """The :class:`ReplyChunk` events of one run of one request.

    Args:
        send: buffers a chunk (``Publisher.enqueue`` for the reply topic).
        request_id: the request the chunks answer.
        run: this run's name (``ReplyChunk.run``).
    """

    def __init__(self, send: Send, request_id: str, run: str) -> None:
        self._send = send
        self._request_id = request_id
        self._run = run
        self._sequences: dict[int, int] = {}
        self._waiting: dict[int, list[str]] = {}
        self._in_flight: asyncio.Task[None] | None = None
        self.published = 0

    async def add(self, index: int, text: str) -> None:
        """Send ``text`` of choice ``index``: now when no chunk is in flight, else with the
        next chunk, once the broker has acknowledged the ones before it."""
        if not text:
            return
        self._waiting.setdefault(index, []).append(text)
        if self._in_flight is None:
            deliveries = await self._publish_waiting()
            self._in_flight = asyncio.create_task(self._publish_until_done(deliveries))

    async def close(self) -> None:
        """Return once every text added is published and acknowledged (or failed: logged)."""
        if self._in_flight is not None:
            await asyncio.shield(self._in_flight)

    def cancel(self) -> None:
        """Drop what was not published yet (the run failed, or the request was cancelled)."""
        self._waiting.clear()
        if self._in_flight is not None:
            self._in_flight.cancel()
            self._in_flight = None

    async def _publish_until_done(self, deliveries: list[asyncio.Future[Any]]) -> None:
        while True:
            await self._acknowledged(deliveries)
            if not self._waiting:
                self._in_flight = None  # no await from here on: add() sees it at once
                return
            deliveries = await self._publish_waiting()

    async def _publish_waiting(self) -> list[asyncio.Future[Any]]:
        waiting, self._waiting = self._waiting, {}
        deliveries = []
        for index, parts in waiting.items():
            sequence = self._sequences.get(index, 0)
            self._sequences[index] = sequence + 1
            chunk = ev.ReplyChunk(
                request_id=self._request_id,
                run=self._run,
                choice_index=index,
                sequence=sequence,
                delta="".join(parts),
            )
            delivery = await self._send(chunk)
            self.published += 1
            if delivery is not None:
                deliveries.append(delivery)
        return deliveries

    async def _acknowledged(self, deliveries: list[asyncio.Future[Any]]) -> None:
        for delivery in deliveries:
            try:
                await delivery
            except Exception as error:  # not fatal: the final reply carries the whole text
                log.warning(
                    "reply chunk not delivered",
                    request_id=self._request_id,
                    error=f"{type(error).__name__}: {error}",
                )
