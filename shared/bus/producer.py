"""Publishing events: protobuf in, idempotent ``acks=all`` writes out, trace context attached."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaProducer
from google.protobuf.message import Message

from shared import envelope
from shared.bus import kafka_compat
from shared.bus import metrics as bus_metrics
from shared.bus.security import client_options
from shared.bus.signing import SIGNATURE_HEADER, EventSigner, load_signer
from shared.bus.tracing import Headers, start_publish_span
from shared.bus.wakeup import Waker, wake_directory
from shared.settings import MeshSettings
from shared.topics import Topic

TYPE_HEADER = "meshllm-type"
MAX_REQUEST_BYTES = 16 * 1024 * 1024 + 64 * 1024

kafka_compat.install()


_TYPE_HEADERS: dict[str, bytes] = {}


def _type_header(event: Message) -> bytes:
    name = event.DESCRIPTOR.full_name
    value = _TYPE_HEADERS.get(name)
    if value is None:
        value = _TYPE_HEADERS[name] = name.encode()
    return value


def _key_of(topic: Topic, event: Message) -> bytes | None:
    field = event.DESCRIPTOR.fields_by_name.get(topic.key)
    if field is None:
        return None
    value = getattr(event, topic.key)
    return str(value).encode() if value else None


class Publisher:
    """One idempotent Kafka producer per process, shared by every publishing component."""

    def __init__(self, settings: MeshSettings, *, service: str) -> None:
        self._settings = settings
        self._service = service
        self._producer: AIOKafkaProducer | None = None
        self._signer: EventSigner | None = None
        self._waker: Waker | None = None

    @property
    def started(self) -> bool:
        return self._producer is not None

    async def start(self) -> None:
        kafka = self._settings.kafka
        # the mesh's key, where there is one: consumers may require signed events
        self._signer = load_signer(self._settings)
        producer = AIOKafkaProducer(
            bootstrap_servers=kafka.bootstrap,
            client_id=f"{kafka.client_id_prefix}-{self._service}",
            acks="all",
            enable_idempotence=True,
            linger_ms=kafka.linger_ms,
            request_timeout_ms=kafka.request_timeout_ms,
            max_request_size=MAX_REQUEST_BYTES,
            **client_options(kafka),
        )
        await producer.start()
        self._producer = producer
        directory = wake_directory(self._settings)
        self._waker = Waker(directory) if directory is not None else None

    async def stop(self) -> None:
        """Deliver everything already accepted, then close."""
        if self._producer is not None:
            producer, self._producer = self._producer, None
            await producer.flush()
            await producer.stop()
        if self._waker is not None:
            self._waker.close()
            self._waker = None

    def _require(self) -> AIOKafkaProducer:
        if self._producer is None:
            raise RuntimeError("publisher is not started")
        return self._producer

    async def enqueue(
        self,
        topic: Topic,
        event: Message,
        *,
        key: str | bytes | None = None,
        tenant: str | None = None,
        headers: Headers | None = None,
    ) -> asyncio.Future[Any]:
        """Buffer ``event`` for ``topic``; return a future that resolves once the broker acked.

        Raises:
            TypeError: the topic does not carry this message type.
        """
        self._check_type(topic, event)
        env = envelope.stamp(event, producer=self._service, tenant=tenant)
        all_headers: Headers = [(TYPE_HEADER, _type_header(event))]
        if headers:
            all_headers.extend(headers)
        span = start_publish_span(topic.name, env.event_id, all_headers)
        try:
            return await self._send(topic, event, key, all_headers)
        finally:
            span.end()

    async def enqueue_many(
        self,
        topic: Topic,
        events: Sequence[Message],
        *,
        tenant: str | None = None,
    ) -> list[asyncio.Future[Any]]:
        """Buffer a batch under one PRODUCER span (a bulk load, a replay); keys as in ``enqueue``.

        Each event keeps its own envelope; they share the trace context of the batch.
        """
        for event in events:
            self._check_type(topic, event)
        headers: Headers = []
        span = start_publish_span(topic.name, None, headers, batch_size=len(events))
        try:
            deliveries = []
            for event in events:
                envelope.stamp(event, producer=self._service, tenant=tenant)
                event_headers = [(TYPE_HEADER, _type_header(event)), *headers]
                deliveries.append(await self._send(topic, event, None, event_headers))
            return deliveries
        finally:
            span.end()

    @staticmethod
    def _check_type(topic: Topic, event: Message) -> None:
        if not topic.accepts(type(event)):
            allowed = ", ".join(m.DESCRIPTOR.full_name for m in topic.messages) or "none"
            raise TypeError(
                f"{topic.name} does not carry {event.DESCRIPTOR.full_name} (it carries {allowed})"
            )

    async def _send(
        self, topic: Topic, event: Message, key: str | bytes | None, headers: Headers
    ) -> asyncio.Future[Any]:
        record_key = key.encode() if isinstance(key, str) else key
        if record_key is None:
            record_key = _key_of(topic, event)
        value = event.SerializeToString()
        if self._signer is not None:
            signature = self._signer.signature(topic.name, _type_header(event), value)
            headers = [*headers, (SIGNATURE_HEADER, signature)]
        delivery: asyncio.Future[Any] = await self._require().send(
            topic.name, value, key=record_key, headers=headers
        )
        self._announce_when_acked(topic.name, delivery)
        return delivery

    def _announce_when_acked(self, topic: str, delivery: asyncio.Future[Any]) -> None:
        """Wake this machine's sleeping consumers of ``topic`` once the broker has the record
        (and count it, acknowledged or failed)."""
        delivery.add_done_callback(functools.partial(_count_sent, topic))
        if self._waker is not None:
            delivery.add_done_callback(functools.partial(self._announce, self._waker, topic))

    @staticmethod
    def _announce(waker: Waker, topic: str, delivery: asyncio.Future[Any]) -> None:
        if delivery.cancelled() or delivery.exception() is not None:
            return
        metadata = delivery.result()
        waker.announce(topic, metadata.partition, metadata.offset)

    async def publish(
        self,
        topic: Topic,
        event: Message,
        *,
        key: str | bytes | None = None,
        tenant: str | None = None,
        headers: Headers | None = None,
    ) -> Any:
        """Publish ``event`` and wait until the broker has it (all in-sync replicas)."""
        delivery = await self.enqueue(topic, event, key=key, tenant=tenant, headers=headers)
        return await delivery

    async def publish_raw(
        self, topic: str, value: bytes, *, key: bytes | None, headers: Headers
    ) -> Any:
        """Publish bytes as they are: dead letters and OTLP spans, which have no envelope."""
        delivery = await self._require().send(topic, value, key=key, headers=headers)
        self._announce_when_acked(topic, delivery)
        return await delivery


def _count_sent(topic: str, delivery: asyncio.Future[Any]) -> None:
    if delivery.cancelled():
        error: str | None = "cancelled"
    else:
        failure = delivery.exception()
        error = type(failure).__name__ if failure is not None else None
    extra = {"error.type": error} if error else {}
    bus_metrics.sent.add(1, bus_metrics.attributes(topic, **extra))
