"""Consuming events: decode, dedupe, handle with retries, dead-letter, then commit.

Delivery contract, per consumer group:
- an offset is committed only after its event was handled (or dead-lettered) and
  marked processed, so a crash loses nothing (at-least-once from Kafka);
- an event id already marked processed is skipped, so redeliveries and
  duplicate publishes reach the handler once;
- an event that cannot be decoded, or whose envelope is unusable, goes straight to
  ``<topic>.dlq`` with the reason; so does one whose handler raises
  :class:`PoisonEvent` (reason ``rejected``: the record itself is unusable, no retry);
  one whose handler keeps failing goes there after ``max_attempts`` tries; either way
  the partition moves on.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError
from google.protobuf.message import DecodeError, Message
from opentelemetry import trace

from shared import envelope
from shared.bus import kafka_compat
from shared.bus import metrics as bus_metrics
from shared.bus.idempotency import IdempotencyStore
from shared.bus.producer import TYPE_HEADER, Publisher
from shared.bus.security import client_options
from shared.bus.signing import SIGNATURE_HEADER, EventSigner, UnverifiedEvent, load_signer
from shared.bus.tracing import process_span
from shared.bus.wakeup import WakeListener, wake_directory
from shared.events.v1 import events_pb2 as ev
from shared.logging import get_logger
from shared.settings import MeshSettings
from shared.topics import Topic

log = get_logger(__name__)

DLQ_HEADER_PREFIX = "meshllm-dlq-"

# With local wake-ups: a fetch waits this long at the broker (a sleeping consumer's last
# fetch must end soon, so a wake-up's fetch is not queued behind it); a consumer told of
# records it has not got waits this long for them before it checks again; an idle poll
# looks this long for records nobody announced.
WAKE_FETCH_MAX_WAIT_MS = 1
WAKE_FETCH_WAIT_MS = 5
WAKE_IDLE_LOOK_MS = 5
WAKE_IDLE_LOOK_LIMIT_S = 2.0

kafka_compat.install()


@dataclass(frozen=True)
class EventContext:
    """What a handler may want to know about the record behind an event."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    headers: Sequence[tuple[str, bytes]]
    envelope: ev.Envelope
    attempt: int


Handler = Callable[[Any, EventContext], Awaitable[None]]
Batch = Any  # aiokafka's getmany: dict[TopicPartition, list[ConsumerRecord]], untyped


class _Membership(ConsumerRebalanceListener):  # type: ignore[misc]
    joined = False

    def __init__(self, on_assigned: Callable[[list[TopicPartition]], Awaitable[None]]) -> None:
        self._on_assigned = on_assigned

    def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        self.joined = False

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        await self._on_assigned(assigned)
        self.joined = True


class PoisonEvent(Exception):
    """A record that no retry can make processable (bad bytes, type or envelope)."""


class UnsignedEvent(PoisonEvent):
    """A record without the mesh's signature where signatures are required."""


class Subscriber:
    """A consumer group member that feeds one handler from one or more topics."""

    def __init__(
        self,
        settings: MeshSettings,
        publisher: Publisher,
        *,
        topics: Sequence[Topic],
        group: str,
        handler: Handler,
        idempotency: IdempotencyStore,
        max_attempts: int | None = None,
        client_id: str = "meshllm",
        from_latest: bool = False,
        rewind_s: float | None = None,
    ) -> None:
        """``rewind_s``: a partition this member is given for the first time is read from
        the records of the last ``rewind_s`` seconds, whatever the group committed (for
        consumers whose state is the recent past, such as the ops service's windows)."""
        if not topics:
            raise ValueError("a subscriber needs at least one topic")
        self._settings = settings
        self._publisher = publisher
        self._topics = {topic.name: topic for topic in topics}
        self.group = group
        self._handler = handler
        self._idempotency = idempotency
        self._max_attempts = max_attempts or settings.bus.max_attempts
        self._signer: EventSigner | None = None
        self._client_id = client_id
        # a new group starts at the log end (live streams: replies, cancellations)
        self._offset_reset = "latest" if from_latest else "earliest"
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._drain_deadline = 0.0
        self._drain_targets: dict[TopicPartition, int] | None = None
        self.failure: BaseException | None = None
        self._membership = _Membership(self._on_assigned)
        self._rewind_s = rewind_s
        self._rewound: set[TopicPartition] = set()
        self._wake: WakeListener | None = None
        self.lag: dict[TopicPartition, int] = {}  # records behind, at the last commit
        bus_metrics.watch_lag(self)

    @property
    def ready(self) -> bool:
        """True while this member holds its share of the group (possibly no partitions,
        when the group has more members than the topics have partitions)."""
        return self.running and self._membership.joined

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        kafka = self._settings.kafka
        if self._settings.signatures_required:
            self._signer = load_signer(self._settings, required=True)
        self._wake = self._open_wake_listener()
        fetch_max_wait_ms = self._settings.fetch_max_wait_ms
        if self._wake is not None and kafka.fetch_max_wait_ms is None:
            fetch_max_wait_ms = WAKE_FETCH_MAX_WAIT_MS
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=kafka.bootstrap,
            group_id=self.group,
            client_id=self._client_id,
            enable_auto_commit=False,
            auto_offset_reset=self._offset_reset,
            fetch_max_wait_ms=fetch_max_wait_ms,
            session_timeout_ms=self._settings.session_timeout_ms,
            # a third of the session, as Kafka's own defaults (3 s of 10 s)
            heartbeat_interval_ms=max(100, self._settings.session_timeout_ms // 3),
            request_timeout_ms=kafka.request_timeout_ms,
            **client_options(kafka),
        )
        self._consumer.subscribe(list(self._topics), listener=self._membership)
        await self._consumer.start()
        self._task = asyncio.create_task(self._run(), name=f"subscriber:{self.group}")

    async def _on_assigned(self, assigned: list[TopicPartition]) -> None:
        consumer = self._consumer
        fresh = [tp for tp in assigned if tp not in self._rewound]
        if self._rewind_s is None or consumer is None or not fresh:
            return
        since_ms = int((time.time() - self._rewind_s) * 1000)
        found = await consumer.offsets_for_times(dict.fromkeys(fresh, since_ms))
        for tp in fresh:
            at = found.get(tp)
            if at is None:  # nothing that recent: from the end
                await consumer.seek_to_end(tp)
            else:
                consumer.seek(tp, at.offset)
            self._rewound.add(tp)
        log.info("rewound", group=self.group, seconds=self._rewind_s, partitions=len(fresh))

    def _open_wake_listener(self) -> WakeListener | None:
        directory = wake_directory(self._settings)
        if directory is None:
            return None
        listener = WakeListener(
            directory, self._topics, forget_after_s=self._settings.bus.idle_poll_ms / 1000
        )
        try:
            listener.open()
        except OSError as error:
            log.warning("local wake-ups off: this group polls", group=self.group, error=str(error))
            return None
        return listener

    async def stop(self, drain_timeout_s: float = 0.0) -> None:
        """Stop consuming, commit what was handled, and leave the group.

        With ``drain_timeout_s`` > 0, first keep handling until this member has reached
        the end its partitions had when ``stop`` was called (or the time runs out), so
        events the broker already accepted are not left behind.
        """
        self._drain_deadline = asyncio.get_running_loop().time() + drain_timeout_s
        self._stopping.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None
        if self._wake is not None:
            self._wake.close()
            self._wake = None
        self._idempotency.close()

    async def _poll(
        self,
        consumer: AIOKafkaConsumer,
        *,
        timeout_ms: int,
        max_records: int,
        also: tuple[asyncio.Event, ...] = (),
    ) -> Batch:
        """The next records, waiting up to ``timeout_ms`` for some.

        With local wake-ups, a consumer that got nothing and has read every announced
        record pauses its partitions and sleeps until an announcement, one of ``also``,
        a stop, or ``bus.idle_poll_ms``; it returns nothing then, and the caller polls again.
        """
        wake = self._wake
        if wake is None:
            return await consumer.getmany(timeout_ms=timeout_ms, max_records=max_records)
        if self._stopping.is_set():  # draining: read on, awake
            return await consumer.getmany(
                timeout_ms=min(timeout_ms, WAKE_FETCH_WAIT_MS), max_records=max_records
            )
        batch = await consumer.getmany(timeout_ms=0, max_records=max_records)
        if batch:
            return batch
        paused = consumer.paused()
        awake = [tp for tp in consumer.assignment() if tp not in paused]
        positions = {tp: await consumer.position(tp) for tp in awake}
        # behind the log end the last fetch saw (a backlog from before this consumer
        # started, or records nobody announced), or told of records not here yet
        lagging = any((consumer.highwater(tp) or 0) > pos for tp, pos in positions.items())
        if lagging or wake.behind(positions):
            # wait for the fetch that brings them
            return await consumer.getmany(
                timeout_ms=min(timeout_ms, WAKE_FETCH_WAIT_MS), max_records=max_records
            )
        consumer.pause(*awake)
        try:
            woken = await wake.sleep(self._settings.bus.idle_poll_ms / 1000, self._stopping, *also)
        finally:
            assigned = consumer.assignment()
            consumer.resume(*(tp for tp in awake if tp in assigned))
        if woken:
            return batch
        # the idle poll: look for records nobody announced until a fetch made after
        # resuming has answered (a busy machine may take longer than one short look)
        resumed_ms = int(time.time() * 1000)
        deadline = time.monotonic() + WAKE_IDLE_LOOK_LIMIT_S
        while True:
            batch = await consumer.getmany(timeout_ms=WAKE_IDLE_LOOK_MS, max_records=max_records)
            assigned = consumer.assignment()
            answered = all(
                (consumer.last_poll_timestamp(tp) or 0) >= resumed_ms
                for tp in awake
                if tp in assigned
            )
            if batch or answered or time.monotonic() > deadline or self._stopping.is_set():
                return batch

    async def _run(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        try:
            while not (self._stopping.is_set() and await self._drained(consumer)):
                batch = await self._poll(
                    consumer, timeout_ms=100, max_records=self._settings.bus.max_batch
                )
                if not batch:
                    continue
                committed = await asyncio.gather(
                    *(self._handle_partition(tp, records) for tp, records in batch.items())
                )
                await consumer.commit(dict(committed))
                assigned = consumer.assignment()  # a revoked partition is another's to report
                self.lag = {tp: n for tp, n in self.lag.items() if tp in assigned} | (
                    bus_metrics.lag_of((tp, consumer.highwater(tp), next_offset)
                                       for tp, next_offset in committed)
                )  # fmt: skip
        except asyncio.CancelledError:
            raise
        except Exception as error:
            self.failure = error
            log.exception("subscriber stopped", group=self.group)
            raise

    async def _drained(self, consumer: AIOKafkaConsumer) -> bool:
        if asyncio.get_running_loop().time() >= self._drain_deadline:
            return True
        if self._drain_targets is None:
            assignment = list(consumer.assignment())
            ends = await consumer.end_offsets(assignment) if assignment else {}
            # The embedded broker's ListOffsets can trail the log end; the high
            # watermark of the latest fetch response does not.
            self._drain_targets = {
                tp: max(ends.get(tp, 0), consumer.highwater(tp) or 0) for tp in assignment
            }
        for tp, end in self._drain_targets.items():
            if await consumer.position(tp) < end:
                return False
        return True

    async def _handle_partition(
        self, tp: TopicPartition, records: list[ConsumerRecord]
    ) -> tuple[TopicPartition, int]:
        for record in records:
            event_id = await self._handle_record(record)
            if event_id:
                # Marked at once, not per batch: a crash then re-runs at most the
                # event in flight, never the ones already handled.
                self._idempotency.mark([event_id])
        return tp, records[-1].offset + 1

    async def _handle_record(self, record: ConsumerRecord) -> str | None:
        """Handle one record; return its event id to mark processed (None if nothing to mark)."""
        topic = self._topics[record.topic]
        headers = list(record.headers or ())
        try:
            event = self._decode(topic, record.value, headers)
        except PoisonEvent as poison:
            reason = "unverified" if isinstance(poison, UnsignedEvent) else "undecodable"
            await self._dead_letter(record, headers, reason=reason, error=poison, attempts=0)
            self._consumed(topic.name, "dead_letter")
            return None
        env: ev.Envelope | None = event.envelope if topic.enveloped else None
        event_id = env.event_id if env is not None else None
        if event_id and self._idempotency.seen(event_id):
            self._consumed(topic.name, "duplicate")
            log.debug("duplicate event skipped", event_id=event_id, topic=topic.name)
            return None
        with process_span(
            topic.name,
            self.group,
            headers,
            partition=record.partition,
            offset=record.offset,
            event_id=event_id,
        ) as span:
            outcome = await self._call_with_retries(record, headers, event, env, span)
        self._consumed(topic.name, outcome)
        return event_id

    def _consumed(self, topic: str, outcome: str) -> None:
        bus_metrics.consumed.add(
            1,
            bus_metrics.attributes(
                topic, **{"messaging.consumer.group.name": self.group, "outcome": outcome}
            ),
        )

    def _decode(self, topic: Topic, value: bytes | None, headers: list[tuple[str, bytes]]) -> Any:
        if not topic.enveloped:
            return value
        type_name = next((v.decode(errors="replace") for k, v in headers if k == TYPE_HEADER), None)
        if type_name is None:
            if len(topic.messages) != 1:
                raise PoisonEvent(f"no {TYPE_HEADER} header on a topic with several message types")
            message_type: type[Message] | None = topic.messages[0]
        else:
            message_type = topic.message_by_name(type_name)
        if message_type is None:
            raise PoisonEvent(f"{topic.name} does not carry message type {type_name!r}")
        if self._signer is not None:
            signature = next((v for k, v in headers if k == SIGNATURE_HEADER), None)
            signed_type = message_type.DESCRIPTOR.full_name.encode()
            try:
                self._signer.verify(topic.name, signed_type, value or b"", signature)
            except UnverifiedEvent as error:
                raise UnsignedEvent(str(error)) from None
        event = message_type()
        try:
            event.ParseFromString(value or b"")
        except DecodeError as error:
            raise PoisonEvent(f"not a valid {message_type.DESCRIPTOR.full_name}: {error}") from None
        try:
            envelope.check(event)
        except envelope.EnvelopeError as error:
            raise PoisonEvent(str(error)) from None
        return event

    async def _call_with_retries(
        self,
        record: ConsumerRecord,
        headers: list[tuple[str, bytes]],
        event: Any,
        env: ev.Envelope | None,
        span: trace.Span,
    ) -> str:
        backoff = self._settings.bus.retry_backoff_ms / 1000
        for attempt in range(1, self._max_attempts + 1):
            context = EventContext(
                topic=record.topic,
                partition=record.partition,
                offset=record.offset,
                key=record.key,
                headers=headers,
                envelope=env if env is not None else ev.Envelope(),
                attempt=attempt,
            )
            started = time.perf_counter()
            try:
                await self._handler(event, context)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                span.record_exception(error)
                log.warning(
                    "handler failed",
                    topic=record.topic,
                    offset=record.offset,
                    attempt=attempt,
                    max_attempts=self._max_attempts,
                    error=f"{type(error).__name__}: {error}",
                )
                # a handler that found the record unusable (PoisonEvent) is not asked again
                poison = isinstance(error, PoisonEvent)
                if attempt == self._max_attempts or poison:
                    self._processed_in(record.topic, started, type(error).__name__)
                    span.set_status(trace.StatusCode.ERROR, f"dead-lettered: {error}")
                    reason = "rejected" if poison else "handler_failed"
                    await self._dead_letter(
                        record, headers, reason=reason, error=error, attempts=attempt
                    )
                    return "dead_letter"
                await asyncio.sleep(backoff * 2 ** (attempt - 1))
            else:
                self._processed_in(record.topic, started)
                return "handled"
        raise AssertionError("unreachable: the loop returns on success or last attempt")

    def _processed_in(self, topic: str, started: float, error: str | None = None) -> None:
        more = {"messaging.consumer.group.name": self.group}
        if error is not None:
            more["error.type"] = error
        bus_metrics.process_duration.record(
            time.perf_counter() - started, bus_metrics.attributes(topic, **more)
        )

    async def _dead_letter(
        self,
        record: ConsumerRecord,
        headers: list[tuple[str, bytes]],
        *,
        reason: str,
        error: BaseException,
        attempts: int,
    ) -> None:
        topic = self._topics[record.topic]
        dlq_headers = [(k, v) for k, v in headers if not k.startswith(DLQ_HEADER_PREFIX)]
        for name, value in {
            "reason": reason,
            "error": f"{type(error).__name__}: {error}",
            "topic": record.topic,
            "partition": str(record.partition),
            "offset": str(record.offset),
            "group": self.group,
            "attempts": str(attempts),
            "at": datetime.now(UTC).isoformat(),
        }.items():
            dlq_headers.append((DLQ_HEADER_PREFIX + name, value.encode()))
        bus_metrics.dead_letters.add(1, bus_metrics.attributes(topic.dlq, reason=reason))
        log.error(
            "event dead-lettered",
            topic=record.topic,
            offset=record.offset,
            reason=reason,
            error=str(error),
            dlq=topic.dlq,
        )
        while True:
            try:
                await self._publisher.publish_raw(
                    topic.dlq, record.value or b"", key=record.key, headers=dlq_headers
                )
                return
            except KafkaError:
                # Committing past an event that is in neither topic would lose it.
                log.exception("dead-letter publish failed; retrying", dlq=topic.dlq)
                await asyncio.sleep(1)
