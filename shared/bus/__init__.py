"""The bus: how services declare what they publish and consume over Kafka.

bus = Bus(settings, service="router")

@bus.subscribe(topics.REQUESTS_HIGH, group="router")
async def on_request(event: InferenceRequest, ctx: EventContext) -> None: ...

await bus.start()
await bus.publish(topics.AUDIT_EVENTS, audit_event)
...
await bus.stop()
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from google.protobuf.message import Message

from shared.bus.consumer import EventContext, Handler, Subscriber
from shared.bus.idempotency import (
    IdempotencyStore,
    MemoryIdempotencyStore,
    SqliteIdempotencyStore,
)
from shared.bus.producer import Publisher
from shared.bus.tracing import Headers
from shared.bus.work import Choose, Waiting, WorkConsumer, oldest_first
from shared.settings import MeshSettings
from shared.topics import Topic

__all__ = ["Bus", "EventContext", "Publisher", "Subscriber", "Waiting", "WorkConsumer"]


class Bus:
    """One publisher and any number of subscribers of a service process."""

    def __init__(self, settings: MeshSettings, *, service: str) -> None:
        self.settings = settings
        self.service = service
        self.publisher = Publisher(settings, service=service)
        self.subscribers: list[Subscriber] = []
        self._started = False

    def subscribe(
        self,
        *topics: Topic,
        group: str,
        max_attempts: int | None = None,
        durable_dedup: bool = True,
        from_latest: bool = False,
        rewind_s: float | None = None,
    ) -> Callable[[Handler], Handler]:
        """Register the decorated coroutine as the handler of ``topics`` for ``group``.

        ``durable_dedup`` keeps processed event ids in a SQLite file under the data
        directory, so redeliveries after a restart are recognised too. ``from_latest``
        makes a group without committed offsets start at the end of the log instead of
        the beginning (for per-instance groups reading a live stream). ``rewind_s``
        reads each partition from the last ``rewind_s`` seconds when this member first
        gets it (see :class:`~shared.bus.consumer.Subscriber`).
        """

        def register(handler: Handler) -> Handler:
            self.add_subscriber(
                topics,
                group=group,
                handler=handler,
                max_attempts=max_attempts,
                idempotency=self._idempotency_store(group, durable_dedup),
                from_latest=from_latest,
                rewind_s=rewind_s,
            )
            return handler

        return register

    def add_subscriber(
        self,
        topics: tuple[Topic, ...] | list[Topic],
        *,
        group: str,
        handler: Handler,
        idempotency: IdempotencyStore,
        max_attempts: int | None = None,
        from_latest: bool = False,
        rewind_s: float | None = None,
    ) -> Subscriber:
        subscriber = Subscriber(
            self.settings,
            self.publisher,
            topics=topics,
            group=group,
            handler=handler,
            idempotency=idempotency,
            max_attempts=max_attempts,
            client_id=f"{self.settings.kafka.client_id_prefix}-{self.service}",
            from_latest=from_latest,
            rewind_s=rewind_s,
        )
        self.subscribers.append(subscriber)
        return subscriber

    def add_worker(
        self,
        topics: Sequence[Topic],
        *,
        group: str,
        handler: Handler,
        max_in_flight: int,
        max_buffered: int = 64,
        choose: Choose = oldest_first,
        max_attempts: int | None = None,
        durable_dedup: bool = True,
    ) -> WorkConsumer:
        """Like :meth:`subscribe`, with up to ``max_in_flight`` handlers running at once."""
        worker = WorkConsumer(
            self.settings,
            self.publisher,
            topics=list(topics),
            group=group,
            handler=handler,
            idempotency=self._idempotency_store(group, durable_dedup),
            max_attempts=max_attempts,
            client_id=f"{self.settings.kafka.client_id_prefix}-{self.service}",
            max_in_flight=max_in_flight,
            max_buffered=max_buffered,
            choose=choose,
        )
        self.subscribers.append(worker)
        return worker

    def _idempotency_store(self, group: str, durable: bool) -> IdempotencyStore:
        window = self.settings.bus.idempotency_window
        if not durable:
            return MemoryIdempotencyStore(window=window)
        path = Path(self.settings.data_dir) / self.service / f"processed-{group}.sqlite"
        return SqliteIdempotencyStore(path, window=window)

    @property
    def ready(self) -> bool:
        return self.publisher.started and all(s.ready for s in self.subscribers)

    def failure(self) -> BaseException | None:
        return next((s.failure for s in self.subscribers if s.failure is not None), None)

    async def start(self) -> None:
        await self.publisher.start()
        await asyncio.gather(*(s.start() for s in self.subscribers))
        self._started = True

    async def stop(self, drain: bool = False) -> None:
        """Stop consuming (committing what was handled), then flush and close the producer.

        ``drain`` first handles what the broker already holds for this service's
        partitions, for up to ``bus.drain_timeout_ms``.
        """
        drain_timeout_s = self.settings.bus.drain_timeout_ms / 1000 if drain else 0.0
        await asyncio.gather(*(s.stop(drain_timeout_s) for s in self.subscribers))
        await self.publisher.stop()
        self._started = False

    async def publish(
        self,
        topic: Topic,
        event: Message,
        *,
        key: str | bytes | None = None,
        tenant: str | None = None,
        headers: Headers | None = None,
    ) -> Any:
        return await self.publisher.publish(topic, event, key=key, tenant=tenant, headers=headers)
