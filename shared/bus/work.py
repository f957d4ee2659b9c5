"""Consuming work items concurrently: many in flight, committed in order, with backpressure.

:class:`~shared.bus.consumer.Subscriber` handles a partition's events one after the
other, which is right for state changes and wrong for work that takes seconds and
runs best side by side (inference requests: the engine batches them). A
:class:`WorkConsumer` keeps the subscriber's contract (decode, dedupe, retries, DLQ,
a span per event, commit only what was handled) and changes how records run:

- up to ``max_in_flight`` handlers run at once; each partition's committed offset is
  the first offset not yet finished, so a crash redelivers exactly the unfinished ones;
- records wait in a small buffer per topic; a topic whose buffer is full is paused at
  the broker, so overload stays in Kafka as lag (backpressure), never dropped;
- which waiting record runs next is the ``choose`` function's call (priority, aging,
  fairness); by default the one fetched first.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from shared.bus import metrics as bus_metrics
from shared.bus.consumer import Subscriber
from shared.logging import get_logger

log = get_logger(__name__)


@dataclass(eq=False)
class Waiting:
    """A fetched record not yet started."""

    record: ConsumerRecord
    fetched_at: float = field(default_factory=time.monotonic)

    @property
    def topic(self) -> str:
        return str(self.record.topic)

    @property
    def waited_s(self) -> float:
        return time.monotonic() - self.fetched_at


Choose = Callable[[Sequence[Waiting]], Waiting]
"""Pick the record to start next among the oldest waiting record of each topic."""


def oldest_first(candidates: Sequence[Waiting]) -> Waiting:
    return min(candidates, key=lambda w: w.fetched_at)


class _PartitionProgress:
    """Offsets of one partition in fetch order; commits up to the first unfinished one."""

    def __init__(self) -> None:
        self.open: collections.deque[int] = collections.deque()
        self.finished: set[int] = set()
        self.commit_at: int | None = None

    def fetched(self, offset: int) -> None:
        self.open.append(offset)

    def finish(self, offset: int) -> None:
        self.finished.add(offset)
        while self.open and self.open[0] in self.finished:
            done = self.open.popleft()
            self.finished.discard(done)
            self.commit_at = done + 1


class WorkConsumer(Subscriber):
    """A consumer group member running many handlers at once (see the module docstring)."""

    def __init__(
        self,
        *args: object,
        max_in_flight: int,
        max_buffered: int = 64,
        choose: Choose = oldest_first,
        **kwargs: object,
    ) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self.max_in_flight = max_in_flight
        self._committed: dict[TopicPartition, int] = {}
        self.max_buffered = max(1, max_buffered)
        self._choose = choose
        self._buffers: dict[str, collections.deque[Waiting]] = {
            name: collections.deque() for name in self._topics
        }
        self._progress: dict[TopicPartition, _PartitionProgress] = {}
        self._in_flight: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Event()
        self._assigned: frozenset[TopicPartition] = frozenset()

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def buffered(self) -> dict[str, int]:
        return {name: len(buffer) for name, buffer in self._buffers.items()}

    async def _run(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        try:
            while not self._stopping.is_set() and self.failure is None:
                self._follow_assignment(consumer)
                await self._fetch(consumer)
                # set again by each handler that finishes from here on, which wakes _fetch
                self._changed.clear()
                self._dispatch()
                await self._commit(consumer)
            await self._finish_in_flight(consumer)
        except asyncio.CancelledError:
            for task in self._in_flight:
                task.cancel()
            raise
        except Exception as error:
            self.failure = error
            log.exception("work consumer stopped", group=self.group)
            raise
        if self.failure is not None:
            raise self.failure

    async def _fetch(self, consumer: AIOKafkaConsumer) -> None:
        self._apply_backpressure(consumer)
        if not self._has_room():
            # everything is paused: wait for a handler to finish instead of polling
            waiter = asyncio.ensure_future(self._changed.wait())
            stop = asyncio.ensure_future(self._stopping.wait())
            await asyncio.wait({waiter, stop}, timeout=0.5, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            stop.cancel()
            return
        # short polls while work is running, so freed slots are refilled quickly; a
        # consumer asleep for want of records wakes when a handler finishes, too
        timeout = 5 if self._in_flight else 100
        batch = await self._poll(
            consumer, timeout_ms=timeout, max_records=self.max_buffered, also=(self._changed,)
        )
        assigned = consumer.assignment()
        for tp, records in batch.items():
            if tp not in assigned:
                continue
            progress = self._progress.setdefault(tp, _PartitionProgress())
            for record in records:
                progress.fetched(record.offset)
                self._buffers[tp.topic].append(Waiting(record))

    def _follow_assignment(self, consumer: AIOKafkaConsumer) -> None:
        """After a rebalance, forget partitions this member lost and start fresh on new ones.

        Records of a lost partition that were buffered are dropped (the new owner reads
        them from the committed offset); ones already running finish, uncommitted here.
        """
        assigned = frozenset(consumer.assignment())
        if assigned == self._assigned:
            return
        for tp in self._assigned - assigned:
            self._progress.pop(tp, None)
        for tp in assigned - self._assigned:
            self._progress[tp] = _PartitionProgress()
        for name, buffer in self._buffers.items():
            kept = [w for w in buffer if TopicPartition(name, w.record.partition) in assigned]
            self._buffers[name] = collections.deque(kept)
        self._assigned = assigned

    def _has_room(self) -> bool:
        return any(len(b) < self.max_buffered for b in self._buffers.values())

    def _apply_backpressure(self, consumer: AIOKafkaConsumer) -> None:
        full: list[TopicPartition] = []
        open_: list[TopicPartition] = []
        for tp in consumer.assignment():
            buffer = self._buffers.get(tp.topic)
            if buffer is None:
                continue
            (full if len(buffer) >= self.max_buffered else open_).append(tp)
        paused = consumer.paused()
        if to_pause := [tp for tp in full if tp not in paused]:
            consumer.pause(*to_pause)
        if to_resume := [tp for tp in open_ if tp in paused]:
            consumer.resume(*to_resume)

    def _dispatch(self) -> None:
        while len(self._in_flight) < self.max_in_flight:
            heads = [buffer[0] for buffer in self._buffers.values() if buffer]
            if not heads:
                return
            chosen = self._choose(heads)
            self._buffers[chosen.topic].popleft()
            task = asyncio.create_task(self._work(chosen.record), name=f"work:{self.group}")
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)

    async def _work(self, record: ConsumerRecord) -> None:
        try:
            event_id = await self._handle_record(record)
            if event_id:
                self._idempotency.mark([event_id])
        except asyncio.CancelledError:
            raise  # not finished: its offset stays uncommitted and is redelivered
        except Exception as error:
            # _handle_record dead-letters handler failures itself; this is a bus failure
            log.exception("work item failed outside its handler", offset=record.offset)
            self.failure = error
            self._changed.set()
            return
        progress = self._progress.get(TopicPartition(record.topic, record.partition))
        if progress is not None:
            progress.finish(record.offset)
        self._changed.set()

    async def _commit(self, consumer: AIOKafkaConsumer) -> None:
        offsets = {}
        assigned = consumer.assignment()
        for tp, progress in self._progress.items():
            if progress.commit_at is not None and tp in assigned:
                offsets[tp] = progress.commit_at
                progress.commit_at = None
        if offsets:
            await consumer.commit(offsets)
            self._committed.update(offsets)
        # records behind each assigned partition's end: fetched-but-waiting ones count
        self.lag = bus_metrics.lag_of(
            (tp, consumer.highwater(tp), offset)
            for tp, offset in self._committed.items()
            if tp in assigned
        )

    async def _finish_in_flight(self, consumer: AIOKafkaConsumer) -> None:
        """On stop: let running handlers finish (until the drain deadline), then commit.

        Waiting records are not started; they stay uncommitted for the next member.
        """
        remaining = self._drain_deadline - asyncio.get_running_loop().time()
        if self._in_flight:
            _, pending = await asyncio.wait(set(self._in_flight), timeout=max(remaining, 0))
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await self._commit(consumer)
