"""Bus benchmark on the embedded broker: one-hop latency, 1 KB throughput, idle broker cost.

Run from the repository root (needs the ``bench`` extra: FastStream and matplotlib)::

    python -m meshbench.bus_bench [--samples 300] [--events 20000]

It starts its own in-memory broker, so nothing else needs to run. Each latency case
gets a fresh one-partition topic and measures sequential pings: publish one event,
wait until the handler is entered, pause ~2 ms, publish the next. The embedded broker
(Tansu) does not wake a waiting fetch when data arrives; it re-reads storage after
sleeping half the remaining ``fetch_max_wait_ms``, so a hop costs about half the fetch
wait whatever the client library. That is why the cases are grouped by fetch wait,
and why the fair peer of our bus is raw aiokafka at the same 5 ms.

Results go to ``meshbench/results/bus.md`` and ``meshbench/results/bus_latency.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from meshbench.report import machine_lines, package_version, results_console
from shared import envelope
from shared.bus import Bus, EventContext, Publisher, kafka_compat
from shared.bus.admin import ensure_topics
from shared.bus.embedded import EmbeddedBroker, broker_binary
from shared.events.v1 import events_pb2 as ev
from shared.logging import configure_logging
from shared.settings import LogFormat, MeshSettings
from shared.telemetry import Telemetry
from shared.topics import Topic
from tests.procs.topics import scratch_topic

RESULTS_DIR = Path(__file__).resolve().parent / "results"
COMMAND = "python -m meshbench.bus_bench"

OUR_FETCH_WAIT_MS = 5  # MeshSettings.fetch_max_wait_ms on the embedded broker
AIOKAFKA_DEFAULT_FETCH_WAIT_MS = 500  # aiokafka's and FastStream's default
SLOW_FETCH_WAIT_MS = 100  # cases waiting this long per fetch get --slow-samples samples
PING_PAUSE_S = 0.002
IDLE_PAUSE_S = 0.05  # longer than a consumer stays awake after its last record
DEFAULT_CASE = "meshllm Bus (default settings)"
WARMUP_PINGS = 20
SLOW_WARMUP_PINGS = 3
JOIN_TIMEOUT_S = 60.0  # consumer group joins on Tansu take half the session timeout
HOP_TIMEOUT_S = 10.0
COMMENT_BYTES = 1024
IDLE_SUBSCRIBERS = 4
LATENCY_TARGET_RATIO = 1.5
PRODUCE_TARGET_PER_S = 20_000
PRODUCE_WARMUP = 1_000
BATCH = 500

Send = Callable[[bytes], Awaitable[object]]
EnqueueOne = Callable[[int], Awaitable[asyncio.Future[Any]]]


@dataclass(frozen=True)
class Env:
    """What every measurement needs: the broker, a scratch directory and the progress display."""

    bootstrap: str
    broker_pid: int
    data_dir: Path
    progress: Progress

    def settings(self, *, local_wakeup: bool | None = None, **kafka: Any) -> MeshSettings:
        """Our default settings against this broker, with optional Kafka overrides."""
        return MeshSettings(
            kafka={"bootstrap": self.bootstrap, **kafka},
            bus={"local_wakeup": local_wakeup},
            data_dir=self.data_dir,
        )

    async def fresh_topic(self, label: str, *, partitions: int = 1) -> Topic:
        """Create a topic no other measurement uses."""
        topic = scratch_topic(f"bench.{label}.{uuid.uuid4().hex[:8]}", partitions=partitions)
        await ensure_topics(self.bootstrap, [topic])
        return topic


@dataclass(frozen=True)
class Row:
    """One line of the results table; ``None`` renders as an empty cell."""

    case: str
    p50_ms: float | None = None
    p99_ms: float | None = None
    throughput: float | None = None
    note: str = ""


# --------------------------------------------------------------------------- latency


class PingProbe:
    """Times pings from just before publishing to the moment the handler is entered."""

    def __init__(self) -> None:
        self._waiting: dict[bytes, asyncio.Future[float]] = {}

    def arrived(self, ping_id: bytes | None) -> None:
        """Call first thing in a handler; pings nobody waits for any more are ignored."""
        now = time.perf_counter()
        waiter = self._waiting.pop(ping_id, None) if ping_id else None
        if waiter is not None and not waiter.done():
            waiter.set_result(now)

    async def hop_ms(self, send: Send, ping_id: bytes, timeout: float) -> float | None:
        """Milliseconds from publish to handler entry, or None if it did not arrive in time."""
        waiter: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._waiting[ping_id] = waiter
        started = time.perf_counter()
        await send(ping_id)
        try:
            async with asyncio.timeout(timeout):
                arrived = await waiter
        except TimeoutError:
            self._waiting.pop(ping_id, None)
            return None
        return (arrived - started) * 1000


Link = Callable[[Env, Topic, PingProbe], AbstractAsyncContextManager[Send]]


@dataclass(frozen=True)
class LatencyCase:
    """A publisher/subscriber pair: ``link`` wires them to a topic and yields the send call."""

    name: str
    fetch_max_wait_ms: int
    link: Link
    note: str
    pause_s: float = PING_PAUSE_S

    @property
    def slow(self) -> bool:
        return self.fetch_max_wait_ms >= SLOW_FETCH_WAIT_MS


def _fetch_wait(fetch_max_wait_ms: int | None) -> dict[str, Any]:
    """Keyword arguments that leave the library default alone when ``None``."""
    return {} if fetch_max_wait_ms is None else {"fetch_max_wait_ms": fetch_max_wait_ms}


@asynccontextmanager
async def bus_link(
    env: Env, topic: Topic, probe: PingProbe, *, local_wakeup: bool = True
) -> AsyncIterator[Send]:
    """Our bus: envelope, trace headers, SQLite dedup, commit per batch; with local
    wake-ups (the default on this broker) or polling every 5 ms."""
    settings = env.settings(local_wakeup=local_wakeup)
    bus = Bus(settings, service="bench-latency")

    async def handle(_event: ev.FeedbackEvent, ctx: EventContext) -> None:
        probe.arrived(ctx.key)

    bus.subscribe(topic, group=f"{topic.name}.bus")(handle)
    await bus.start()

    async def send(ping_id: bytes) -> None:
        await bus.publish(topic, ev.FeedbackEvent(request_id=ping_id.decode()))

    try:
        yield send
    finally:
        await bus.stop()


@asynccontextmanager
async def aiokafka_link(
    env: Env, topic: Topic, probe: PingProbe, *, fetch_max_wait_ms: int | None
) -> AsyncIterator[Send]:
    """Raw aiokafka: ``send_and_wait`` into a group consumer's ``getone`` loop, else defaults."""
    producer = AIOKafkaProducer(bootstrap_servers=env.bootstrap)
    consumer = AIOKafkaConsumer(
        topic.name,
        bootstrap_servers=env.bootstrap,
        group_id=f"{topic.name}.aiokafka",
        **_fetch_wait(fetch_max_wait_ms),
    )

    async def pump() -> None:
        while True:
            record = await consumer.getone()
            probe.arrived(record.key)

    async with AsyncExitStack() as stack:
        await producer.start()
        stack.push_async_callback(producer.stop)
        await consumer.start()
        stack.push_async_callback(consumer.stop)
        await stack.enter_async_context(_running(pump()))

        async def send(ping_id: bytes) -> None:
            await producer.send_and_wait(topic.name, ping_id, key=ping_id)

        yield send


@asynccontextmanager
async def faststream_link(
    env: Env, topic: Topic, probe: PingProbe, *, fetch_max_wait_ms: int | None
) -> AsyncIterator[Send]:
    """FastStream's KafkaBroker publisher and subscriber, defaults but for quiet access logs."""
    from faststream.kafka import KafkaBroker

    # Its own logger, quiet below WARNING: a line per message would time the terminal.
    quiet = logging.getLogger("bench.faststream")
    quiet.setLevel(logging.WARNING)
    broker = KafkaBroker(env.bootstrap, logger=quiet)
    group = f"{topic.name}.faststream"

    async def handle(body: bytes) -> None:
        probe.arrived(body)

    broker.subscriber(topic.name, group_id=group, **_fetch_wait(fetch_max_wait_ms))(handle)
    await broker.start()

    async def send(ping_id: bytes) -> None:
        await broker.publish(ping_id, topic.name, key=ping_id)

    try:
        yield send
    finally:
        await broker.stop()


@asynccontextmanager
async def _running(coroutine: Coroutine[Any, Any, None]) -> AsyncIterator[None]:
    """Run ``coroutine`` as a task for the duration of the block, then cancel it."""
    task = asyncio.create_task(coroutine)
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def latency_cases() -> list[LatencyCase]:
    """Our bus (woken and polling), fair peers (5 ms fetch wait), library defaults after."""
    fast, default = OUR_FETCH_WAIT_MS, AIOKAFKA_DEFAULT_FETCH_WAIT_MS
    return [
        LatencyCase(
            DEFAULT_CASE,
            fast,
            bus_link,
            "local wake-ups; envelope, trace headers, SQLite dedup, commit after handling",
        ),
        LatencyCase(
            "meshllm Bus, asleep between pings",
            fast,
            bus_link,
            f"as above, {IDLE_PAUSE_S * 1000:.0f} ms between pings: each hop wakes a "
            "sleeping consumer",
            pause_s=IDLE_PAUSE_S,
        ),
        LatencyCase(
            "meshllm Bus, polling every 5 ms",
            fast,
            functools.partial(bus_link, local_wakeup=False),
            "local wake-ups off (as on Apache Kafka, which wakes fetches itself)",
        ),
        LatencyCase(
            "raw aiokafka, fetch wait 5 ms",
            fast,
            functools.partial(aiokafka_link, fetch_max_wait_ms=fast),
            "fair peer: send_and_wait -> group getone",
        ),
        LatencyCase(
            "FastStream 0.7.8, fetch wait 5 ms",
            fast,
            functools.partial(faststream_link, fetch_max_wait_ms=fast),
            "KafkaBroker publish -> subscriber, logs at WARNING",
        ),
        LatencyCase(
            "raw aiokafka, defaults",
            default,
            functools.partial(aiokafka_link, fetch_max_wait_ms=None),
            "fetch_max_wait_ms=500",
        ),
        LatencyCase(
            "FastStream 0.7.8, defaults",
            default,
            functools.partial(faststream_link, fetch_max_wait_ms=None),
            "fetch_max_wait_ms=500",
        ),
    ]


async def _await_first_delivery(probe: PingProbe, send: Send) -> None:
    """Ping until one arrives: the group has joined and the consumer has its position."""
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    attempt = 0
    while time.monotonic() < deadline:
        attempt += 1
        if await probe.hop_ms(send, f"join-{attempt}".encode(), timeout=2.0) is not None:
            return
    raise TimeoutError(f"no ping got through within {JOIN_TIMEOUT_S:.0f}s")


async def measure_latency(env: Env, case: LatencyCase, samples: int) -> Row:
    """Warm up, then time ``samples`` sequential hops; report p50 and p99."""
    warmup = SLOW_WARMUP_PINGS if case.slow else WARMUP_PINGS
    task = env.progress.add_task(f"latency  {case.name}", total=warmup + samples)
    probe = PingProbe()
    topic = await env.fresh_topic("latency")
    hops: list[float] = []
    async with case.link(env, topic, probe) as send:
        await _await_first_delivery(probe, send)
        for index in range(warmup + samples):
            hop = await probe.hop_ms(send, f"ping-{index}".encode(), HOP_TIMEOUT_S)
            if hop is None:
                raise TimeoutError(f"{case.name}: ping {index} lost")
            if index >= warmup:
                hops.append(hop)
            env.progress.advance(task)
            await asyncio.sleep(case.pause_s)
    p50, p99 = percentiles(hops)
    note = f"{case.note}; n={samples}"
    return Row(case.name, p50, p99, note=note)


def percentiles(values: list[float]) -> tuple[float, float]:
    """p50 and p99 (inclusive method, so small samples stay within the observed range)."""
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return statistics.median(values), cuts[98]


# --------------------------------------------------------------------------- throughput


def feedback_events(count: int) -> list[ev.FeedbackEvent]:
    """``count`` distinct FeedbackEvents of about 1 KB, envelopes left for the publisher."""
    comment = "x" * COMMENT_BYTES
    return [ev.FeedbackEvent(request_id=f"r{i}", rating=1, comment=comment) for i in range(count)]


async def timed_produce(env: Env, label: str, count: int, enqueue: EnqueueOne) -> float:
    """Events/s from the first timed enqueue until every delivery future resolved.

    ``PRODUCE_WARMUP`` events go first, untimed, so connections and code paths are warm;
    ``enqueue`` is called with indexes ``0 .. PRODUCE_WARMUP + count - 1``.
    """
    task = env.progress.add_task(f"produce  {label}", total=count)
    await asyncio.gather(*[await enqueue(index) for index in range(PRODUCE_WARMUP)])
    started = time.perf_counter()
    deliveries = []
    for index in range(count):
        deliveries.append(await enqueue(PRODUCE_WARMUP + index))
        if index % 500 == 499:
            env.progress.update(task, completed=index + 1)
    await asyncio.gather(*deliveries)
    elapsed = time.perf_counter() - started
    env.progress.update(task, completed=count)
    return count / elapsed


async def produce_with_publisher(env: Env, topic: Topic, count: int) -> float:
    """Our Publisher.enqueue: envelope stamp, trace headers, acks=all, idempotent."""
    events = feedback_events(PRODUCE_WARMUP + count)
    publisher = Publisher(env.settings(), service="bench-produce")
    await publisher.start()
    try:
        return await timed_produce(
            env, "meshllm Publisher.enqueue", count, lambda i: publisher.enqueue(topic, events[i])
        )
    finally:
        await publisher.stop()


async def produce_with_publisher_batches(env: Env, topic: Topic, count: int) -> float:
    """Our Publisher.enqueue_many: as above, one PRODUCER span per batch of ``BATCH``."""
    events = feedback_events(PRODUCE_WARMUP + count)
    publisher = Publisher(env.settings(), service="bench-produce")
    await publisher.start()
    task = env.progress.add_task("produce  meshllm Publisher.enqueue_many", total=count)
    try:
        await asyncio.gather(*await publisher.enqueue_many(topic, events[:PRODUCE_WARMUP]))
        started = time.perf_counter()
        deliveries = []
        for start in range(PRODUCE_WARMUP, PRODUCE_WARMUP + count, BATCH):
            deliveries += await publisher.enqueue_many(topic, events[start : start + BATCH])
            env.progress.update(task, completed=start + BATCH - PRODUCE_WARMUP)
        await asyncio.gather(*deliveries)
        return count / (time.perf_counter() - started)
    finally:
        await publisher.stop()


async def produce_with_aiokafka(env: Env, topic: Topic, count: int) -> float:
    """Raw AIOKafkaProducer, acks=all and idempotent, the same bytes and keys."""
    kafka_compat.install()
    template = feedback_events(1)[0]
    template.envelope.event_id = str(uuid.uuid4())
    payload = template.SerializeToString()
    producer = AIOKafkaProducer(
        bootstrap_servers=env.bootstrap, acks="all", enable_idempotence=True
    )
    await producer.start()
    try:
        return await timed_produce(
            env,
            "raw aiokafka send",
            count,
            lambda i: producer.send(topic.name, payload, key=f"r{i}".encode()),
        )
    finally:
        await producer.stop()


class ArrivalCounter:
    """Counts consumed events and times them from partition assignment to the last one.

    aiokafka's ``start()`` returns once the group has assigned the partitions, and our
    ``Bus.start()`` once its consumer's ``start()`` did, so waiting right after start
    leaves the group join out and keeps the offset look-up and every fetch in.
    """

    def __init__(self) -> None:
        self.count = 0
        self._last_at = 0.0

    def hit(self, events: int = 1) -> None:
        self.count += events
        self._last_at = time.perf_counter()

    async def wait_for(self, env: Env, label: str, count: int) -> float:
        """Show progress until ``count`` events arrived; return events/s since the call."""
        started = time.perf_counter()
        task = env.progress.add_task(f"consume  {label}", total=count)
        deadline = time.monotonic() + 30 + count / 1000
        while self.count < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{label}: {self.count} of {count} events consumed")
            env.progress.update(task, completed=self.count)
            await asyncio.sleep(0.05)
        env.progress.update(task, completed=count)
        return self.count / (self._last_at - started)


async def consume_with_bus(env: Env, topic: Topic, count: int) -> float:
    """Our Bus subscriber, default settings, a handler that only counts."""
    counter = ArrivalCounter()
    bus = Bus(env.settings(), service="bench-consume")

    async def handle(_event: ev.FeedbackEvent, _ctx: EventContext) -> None:
        counter.hit()

    bus.subscribe(topic, group=f"{topic.name}.bus")(handle)
    await bus.start()
    try:
        return await counter.wait_for(env, "meshllm Bus subscriber", count)
    finally:
        await bus.stop()


async def consume_with_aiokafka(env: Env, topic: Topic, count: int) -> float:
    """Raw AIOKafkaConsumer in a group, ``getmany`` loop, counting records only."""
    counter = ArrivalCounter()
    consumer = AIOKafkaConsumer(
        topic.name,
        bootstrap_servers=env.bootstrap,
        group_id=f"{topic.name}.aiokafka",
        auto_offset_reset="earliest",
    )

    async def pump() -> None:
        while True:
            batch = await consumer.getmany(timeout_ms=100)
            if batch:
                counter.hit(sum(len(records) for records in batch.values()))

    await consumer.start()
    try:
        async with _running(pump()):
            return await counter.wait_for(env, "raw aiokafka getmany", count)
    finally:
        await consumer.stop()


async def measure_throughput(env: Env, count: int) -> list[Row]:
    """Produce ``count`` 1 KB events each way, then consume ours (warm-up included) each way."""
    stored = PRODUCE_WARMUP + count
    ours = await env.fresh_topic("produce-bus")
    raw = await env.fresh_topic("produce-raw")
    batched = await env.fresh_topic("produce-batch")
    sample = feedback_events(1)[0]
    envelope.stamp(sample, producer="bench-produce")
    size = len(sample.SerializeToString())
    return [
        Row(
            "produce: meshllm Publisher.enqueue",
            throughput=await produce_with_publisher(env, ours, count),
            note=f"{count} FeedbackEvents of {size} B after {PRODUCE_WARMUP} untimed; acks=all",
        ),
        Row(
            "produce: meshllm Publisher.enqueue_many",
            throughput=await produce_with_publisher_batches(env, batched, count),
            note=f"same events in batches of {BATCH}, one PRODUCER span per batch",
        ),
        Row(
            "produce: raw aiokafka send",
            throughput=await produce_with_aiokafka(env, raw, count),
            note="same bytes, acks=all, enable_idempotence=True",
        ),
        Row(
            "consume: meshllm Bus subscriber",
            throughput=await consume_with_bus(env, ours, stored),
            note=f"{stored} events; decode, SQLite dedup, span, commit per batch; no-op handler",
        ),
        Row(
            "consume: raw aiokafka getmany",
            throughput=await consume_with_aiokafka(env, ours, stored),
            note="group consumer, records counted only, auto-commit",
        ),
    ]


# --------------------------------------------------------------------------- idle cost


def process_cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process (all its threads), from /proc/<pid>/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()  # the command name may contain spaces
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of the whole line
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


async def _ignore(_event: ev.FeedbackEvent, _ctx: EventContext) -> None:
    return None


async def cpu_percent(env: Env, seconds: float, task: TaskID) -> tuple[float, float]:
    """CPU of the broker and of this process over ``seconds``, each as % of one core."""
    broker_before, client_before = process_cpu_seconds(env.broker_pid), time.process_time()
    started = time.monotonic()
    while (elapsed := time.monotonic() - started) < seconds:
        env.progress.update(task, completed=elapsed)
        await asyncio.sleep(0.1)
    elapsed = time.monotonic() - started
    env.progress.update(task, completed=seconds)
    broker = process_cpu_seconds(env.broker_pid) - broker_before
    client = time.process_time() - client_before
    return broker / elapsed * 100, client / elapsed * 100


async def measure_idle(
    env: Env, fetch_max_wait_ms: int | None, seconds: float, *, local_wakeup: bool = False
) -> Row:
    """Broker (and our process's) CPU while ``IDLE_SUBSCRIBERS`` subscribers get nothing.

    They sleep until woken with ``local_wakeup``, else poll every ``fetch_max_wait_ms``;
    ``None`` without wake-ups runs no subscribers at all: the broker's own baseline.
    """
    subscribers = 0 if fetch_max_wait_ms is None and not local_wakeup else IDLE_SUBSCRIBERS
    if local_wakeup:
        label = f"idle broker, {subscribers} subscribers, local wake-ups"
        settings = env.settings(local_wakeup=True)
    elif fetch_max_wait_ms is None:
        label = "idle broker, no subscribers"
        settings = env.settings()
    else:
        label = f"idle broker, {subscribers} subscribers polling @ {fetch_max_wait_ms} ms"
        settings = env.settings(local_wakeup=False, fetch_max_wait_ms=fetch_max_wait_ms)
    task = env.progress.add_task(f"idle     {label}", total=seconds)
    topic = await env.fresh_topic("idle")
    # Bus.start joins its subscribers' groups one after another (about 2 s each on this
    # broker), so each subscriber gets a bus of its own and they all start side by side.
    buses = [Bus(settings, service=f"bench-idle-{index}") for index in range(subscribers)]
    async with AsyncExitStack() as stack:
        for index, bus in enumerate(buses):
            bus.subscribe(topic, group=f"{topic.name}.{index}", durable_dedup=False)(_ignore)
            stack.push_async_callback(bus.stop)
        await asyncio.gather(*(bus.start() for bus in buses))
        await _until(lambda: all(bus.ready for bus in buses), f"{label}: assignment")
        await asyncio.sleep(0.5)  # let the joins' traffic settle
        broker, client = await cpu_percent(env, seconds, task)
    return Row(label, note=f"broker {broker:.1f}% of one core; client {client:.1f}%")


async def _until(condition: Callable[[], bool], what: str, timeout: float = JOIN_TIMEOUT_S) -> None:
    """Poll ``condition`` every millisecond until it holds; TimeoutError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.001)


# --------------------------------------------------------------------------- report


def _cell(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:,.{digits}f}"


def row_cells(row: Row) -> list[str]:
    return [
        row.case,
        _cell(row.p50_ms, 2),
        _cell(row.p99_ms, 2),
        _cell(row.throughput, 0),
        row.note,
    ]


HEADERS = ["case", "hop p50 ms", "hop p99 ms", "throughput events/s", "note"]


def rich_table(rows: list[Row]) -> Table:
    table = Table(title="meshllm bus on the embedded broker (Tansu, memory)")
    for index, header in enumerate(HEADERS):
        table.add_column(header, justify="right" if 0 < index < 4 else "left")
    for row in rows:
        table.add_row(*row_cells(row))
    return table


def markdown_table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "|".join(["---", *["---:"] * 3, "---"]) + "|"]
    lines += ["| " + " | ".join(row_cells(row)) + " |" for row in rows]
    return "\n".join(lines)


def verdicts(rows: list[Row]) -> list[tuple[str, bool]]:
    """The two targets, as a sentence each and whether it is met."""
    by_case = {row.case: row for row in rows}
    ours = by_case[DEFAULT_CASE].p50_ms or float("nan")
    peer = by_case["raw aiokafka, fetch wait 5 ms"].p50_ms or float("nan")
    produced = by_case["produce: meshllm Publisher.enqueue"].throughput or 0.0
    ratio = ours / peer
    return [
        (
            f"hop p50: ours {ours:.2f} ms vs raw aiokafka (fetch wait 5 ms) {peer:.2f} ms = "
            f"{ratio:.2f}x (target <= {LATENCY_TARGET_RATIO}x)",
            ratio <= LATENCY_TARGET_RATIO,
        ),
        (
            f"produced through Publisher.enqueue: {produced:,.0f} events/s "
            f"(target >= {PRODUCE_TARGET_PER_S:,})",
            produced >= PRODUCE_TARGET_PER_S,
        ),
    ]


def machine_info() -> list[str]:
    """What the numbers were measured on."""
    return [
        *machine_lines(),
        f"broker: {Path(broker_binary()).name}, memory storage",
        f"aiokafka {package_version('aiokafka')}, faststream {package_version('faststream')}",
    ]


def write_markdown(path: Path, rows: list[Row], args: argparse.Namespace, took_s: float) -> None:
    checks = "\n".join(f"- {'MET' if ok else 'NOT MET'}: {text}" for text, ok in verdicts(rows))
    machine = "\n".join(f"- {line}" for line in machine_info())
    path.write_text(
        f"""# Bus benchmark

Date: {datetime.now(UTC):%Y-%m-%d %H:%M UTC}, whole run {took_s:.0f} s.

Command (from the repository root):

```
just bench-bus
# which runs this, here with the options of this run:
{COMMAND} --samples {args.samples} --slow-samples {args.slow_samples} \\
    --events {args.events} --idle-seconds {args.idle_seconds:g}
```

Machine:

{machine}

{markdown_table(rows)}

Targets:

{checks}

How to read it:

- A hop is the time from just before publishing one event to the moment its handler
  is entered, pinged sequentially (send, wait, ~2 ms pause; {IDLE_PAUSE_S * 1000:.0f} ms in the
  "asleep" row) on a fresh one-partition topic after warm-up. The embedded broker never
  wakes a waiting fetch on new data: it re-reads storage after sleeping half the remaining
  `fetch_max_wait_ms`, so a polling client's hop costs about half the fetch wait. Our bus
  by default has the producer announce each acknowledged record to the topic's consumers
  on this machine (shared/bus/wakeup.py): an idle consumer sleeps, paused, until told,
  then fetches at once. The peers poll at 5 ms; the 500 ms rows (library defaults) take
  {args.slow_samples} samples to keep the run short.
- The meshllm rows run the full bus: envelope stamping and checks, W3C trace headers
  (an SDK tracer provider records spans; none are exported), durable SQLite
  idempotency, and an offset commit after each handled batch.
- Throughput events are `FeedbackEvent`s with a {COMMENT_BYTES}-byte comment on a
  one-partition topic. Producing is timed after {PRODUCE_WARMUP} untimed events, from the
  first timed enqueue until every delivery is acknowledged. Consuming reads all of them,
  timed from partition assignment (group join left out) to the last event handled.
- Idle rows: CPU of the broker process (`/proc/<pid>/stat` utime+stime) and of the
  benchmark process over {args.idle_seconds:g} s, as % of one core, while
  {IDLE_SUBSCRIBERS} Bus subscribers (each in its own group, on a bus of its own) wait on an
  empty topic: asleep until woken (the default), or polling with the given
  `fetch_max_wait_ms`.

![hop latency](bus_latency.png)
"""
    )


def write_plot(path: Path, rows: list[Row]) -> None:
    """Grouped bars of p50 and p99 per latency case, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    latency = [row for row in rows if row.p50_ms is not None and row.p99_ms is not None]
    positions = range(len(latency))
    figure, axes = plt.subplots(figsize=(10, 5))
    width = 0.38
    for offset, label, values in (
        (-width / 2, "p50", [row.p50_ms or 0.0 for row in latency]),
        (width / 2, "p99", [row.p99_ms or 0.0 for row in latency]),
    ):
        bars = axes.bar([p + offset for p in positions], values, width, label=label)
        axes.bar_label(bars, labels=[f"{v:.1f}" for v in values], fontsize=8)
    axes.set_yscale("log")
    axes.set_ylabel("publish -> handler entry, ms (log)")
    axes.set_xticks(list(positions), [row.case.replace(", ", "\n") for row in latency], fontsize=8)
    axes.set_title("One-hop latency on the embedded broker")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# --------------------------------------------------------------------------- main


async def run(args: argparse.Namespace, console: Console) -> list[Row]:
    """Start a broker and take every measurement against it, one at a time."""
    with tempfile.TemporaryDirectory(prefix="bus-bench-") as scratch:
        scratch_dir = Path(scratch)
        broker = EmbeddedBroker(log_file=scratch_dir / "broker.log")
        progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        )
        with progress:
            configure_logging("bench", "WARNING", LogFormat.CONSOLE)
            await broker.start(create_topics=False)
            assert broker.pid is not None
            env = Env(broker.bootstrap, broker.pid, scratch_dir / "data", progress)
            telemetry = Telemetry(env.settings(), "bench")
            telemetry.install()
            try:
                rows = [
                    await measure_latency(
                        env, case, args.slow_samples if case.slow else args.samples
                    )
                    for case in latency_cases()
                ]
                rows += await measure_throughput(env, args.events)
                rows.append(await measure_idle(env, None, args.idle_seconds, local_wakeup=True))
                for fetch_wait in (None, OUR_FETCH_WAIT_MS, AIOKAFKA_DEFAULT_FETCH_WAIT_MS):
                    rows.append(await measure_idle(env, fetch_wait, args.idle_seconds))
            finally:
                telemetry.shutdown()
                await broker.stop()
        return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m meshbench.bus_bench", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--samples",
        type=int,
        default=300,
        help="timed hops per case at 5 ms fetch wait (default 300)",
    )
    parser.add_argument(
        "--slow-samples",
        type=int,
        default=30,
        help="timed hops per case at the 500 ms default fetch wait (default 30)",
    )
    parser.add_argument(
        "--events",
        type=int,
        default=20_000,
        help="1 KB events produced and consumed per throughput case",
    )
    parser.add_argument(
        "--idle-seconds", type=float, default=5.0, help="length of each idle CPU measurement"
    )
    parser.add_argument(
        "--out", type=Path, default=RESULTS_DIR, help="directory for bus.md and bus_latency.png"
    )
    args = parser.parse_args(argv)
    if min(args.samples, args.slow_samples) < 2 or args.events < 2:
        parser.error("--samples, --slow-samples and --events need at least 2")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    console = results_console(150)
    started = time.monotonic()
    rows = asyncio.run(run(args, console))
    took = time.monotonic() - started
    console.print(rich_table(rows))
    for text, ok in verdicts(rows):
        console.print(f"[{'green' if ok else 'red'}]{'MET' if ok else 'NOT MET'}[/]: {text}")
    args.out.mkdir(parents=True, exist_ok=True)
    write_markdown(args.out / "bus.md", rows, args, took)
    write_plot(args.out / "bus_latency.png", rows)
    console.print(f"took {took:.0f} s; results in {args.out}/bus.md and bus_latency.png")


if __name__ == "__main__":
    main()
