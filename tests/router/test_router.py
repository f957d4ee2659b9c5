"""The router against the real broker and a fake model server: replies, retries, priorities."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from services.gateway.relay import Delta, ReplyRelay
from services.router.__main__ import build
from services.router.pools import Pools
from services.router.routing import derived_seed, upstream_body
from services.router.scheduling import priority_with_aging
from services.router.settings import PoolConfig, RouterSettings
from shared.bus import Bus, EventContext, Waiting
from shared.bus.embedded import free_port
from shared.events.v1 import events_pb2 as ev
from shared.health import HealthState
from shared.topics import AUDIT_EVENTS, CANCELLATIONS, REPLIES, REQUESTS_NORMAL
from tests.conftest import poll_until
from tests.fakes.openai_backend import FakeBackend

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(120)]


class Replies:
    """Reply chunks, final replies and routing decisions, by request id."""

    def __init__(self) -> None:
        self.chunks: dict[str, list[ev.ReplyChunk]] = defaultdict(list)
        self.finals: dict[str, list[ev.FinalReply]] = defaultdict(list)
        self.routing: dict[str, ev.RoutingDecision] = {}

    async def on_reply(self, reply: Any, ctx: EventContext) -> None:
        if isinstance(reply, ev.ReplyChunk):
            self.chunks[reply.request_id].append(reply)
        else:
            self.finals[reply.request_id].append(reply)

    async def on_audit(self, event: ev.AuditEvent, ctx: EventContext) -> None:
        if event.WhichOneof("record") == "routing":
            self.routing[event.request_id] = event.routing


@pytest.fixture
async def mesh(kafka_bootstrap: str, tmp_path: Path) -> AsyncIterator[tuple[Bus, Replies]]:
    """A test client bus reading replies and audit events from their ends."""
    replies = Replies()
    bus = Bus(_settings(kafka_bootstrap, tmp_path, []), service="tests")
    group = f"tests-{uuid.uuid4().hex[:8]}"
    bus.subscribe(REPLIES, group=group, durable_dedup=False, from_latest=True)(replies.on_reply)
    bus.subscribe(AUDIT_EVENTS, group=group, durable_dedup=False, from_latest=True)(
        replies.on_audit
    )
    await bus.start()
    await poll_until(lambda: bus.ready, message="test bus ready")
    yield bus, replies
    await bus.stop()


def _settings(bootstrap: str, data_dir: Path, pools: list[PoolConfig]) -> RouterSettings:
    return RouterSettings(
        kafka={"bootstrap": bootstrap},
        data_dir=data_dir,
        pools=pools or [PoolConfig(name="cpu", replicas=["http://127.0.0.1:1"])],
        replica_cooldown_s=30,
    )


@asynccontextmanager
async def running_router(bootstrap: str, data_dir: Path, *urls: str) -> AsyncIterator[Bus]:
    """The router service, built as its process builds it, with one pool of ``urls``."""
    settings = _settings(bootstrap, data_dir, [PoolConfig(name="cpu", replicas=list(urls))])
    bus = Bus(settings, service="router")
    await build(settings, bus, HealthState(service="router"))
    await bus.start()
    try:
        await poll_until(lambda: bus.ready, message="router ready")
        yield bus
    finally:
        # as the service stops: handlers still finishing (a final reply is published before
        # its handler returns) complete and commit, so no test's request reaches the next
        await bus.stop(drain=True)


async def answered(client: Bus, replies: Replies, event: ev.InferenceRequest) -> ev.FinalReply:
    """Publish ``event`` and wait for its (first) final reply."""
    await client.publish(REQUESTS_NORMAL, event)
    await poll_until(lambda: replies.finals.get(event.request_id), message="final reply")
    return replies.finals[event.request_id][0]


def request(stream: bool = True, max_tokens: int = 5, **fields: Any) -> ev.InferenceRequest:
    event = ev.InferenceRequest(
        request_id=uuid.uuid4().hex,
        kind=ev.REQUEST_KIND_CHAT,
        model="fake-model",
        priority=ev.PRIORITY_NORMAL,
        stream=stream,
        reply_topic=REPLIES.name,
        **fields,
    )
    event.messages.add(role="user", content="hello")
    event.sampling.temperature = 0
    event.sampling.top_p = 1
    event.sampling.max_tokens = max_tokens
    event.envelope.tenant = "acme"
    return event


async def test_streams_chunks_then_one_final_reply(
    kafka_bootstrap: str, tmp_path: Path, mesh: tuple[Bus, Replies]
) -> None:
    client, replies = mesh
    with FakeBackend(free_port()) as fake:
        async with running_router(kafka_bootstrap, tmp_path, fake.url):
            event = request(max_tokens=5)
            await client.publish(REQUESTS_NORMAL, event)
            await poll_until(lambda: replies.finals.get(event.request_id), message="final reply")
            await poll_until(lambda: event.request_id in replies.routing, message="routing audit")
    chunks = replies.chunks[event.request_id]
    # one chunk per broker round trip: pieces that came meanwhile share a chunk
    assert 1 <= len(chunks) <= 5
    assert [c.sequence for c in chunks] == list(range(len(chunks)))
    assert chunks[0].delta == "the "  # the first piece goes out alone, at once
    assert "".join(c.delta for c in chunks) == "the quick brown fox jumps "
    [final] = replies.finals[event.request_id]
    assert final.choices[0].text == "the quick brown fox jumps "
    assert final.choices[0].finish_reason == "length"
    assert final.usage.completion_tokens == 5
    assert replies.routing[event.request_id].pool == "cpu"
    assert replies.routing[event.request_id].replica == fake.url
    assert fake.behaviour.bodies[0]["messages"] == [{"role": "user", "content": "hello"}]


async def test_a_failed_replica_is_retried_once_on_another(
    kafka_bootstrap: str, tmp_path: Path, mesh: tuple[Bus, Replies]
) -> None:
    client, replies = mesh
    with FakeBackend(free_port()) as broken, FakeBackend(free_port()) as good:
        broken.behaviour.fail_status = 500
        async with running_router(kafka_bootstrap, tmp_path, broken.url, good.url):
            events = [request(stream=False) for _ in range(3)]
            for event in events:
                await client.publish(REQUESTS_NORMAL, event)
            for event in events:
                await poll_until(lambda e=event: replies.finals.get(e.request_id), message="reply")
            tried = broken.behaviour.calls
            later = request(stream=False)
            await client.publish(REQUESTS_NORMAL, later)
            await poll_until(lambda: replies.finals.get(later.request_id), message="later reply")
    for event in [*events, later]:
        [final] = replies.finals[event.request_id]
        assert not final.HasField("error"), final.error
        assert final.choices[0].text.startswith("the quick")
    assert good.behaviour.calls == 4
    assert broken.behaviour.calls == tried  # cooling down after its failure: passed over


async def test_a_replica_dying_mid_stream_is_rerun_on_another_and_relayed_once(
    kafka_bootstrap: str, tmp_path: Path, mesh: tuple[Bus, Replies]
) -> None:
    client, replies = mesh
    with FakeBackend(free_port()) as dying, FakeBackend(free_port()) as good:
        dying.behaviour.break_after = 3
        dying.behaviour.token_delay_s = 0.02
        async with running_router(kafka_bootstrap, tmp_path, dying.url, good.url):
            event = request(max_tokens=8)
            await answered(client, replies, event)
            await poll_until(lambda: event.request_id in replies.routing, message="routing audit")
    chunks = replies.chunks[event.request_id]
    runs = list(dict.fromkeys(c.run for c in chunks))
    assert len(runs) == 2  # the cut run, then the re-run, each naming itself
    [final] = replies.finals[event.request_id]
    cut = [c for c in chunks if c.run == runs[0]]
    rerun = [c for c in chunks if c.run == runs[1]]
    # numbered from 0 in each run; pieces that came while a chunk was in flight share one
    assert [c.sequence for c in cut] == list(range(len(cut)))
    assert [c.sequence for c in rerun] == list(range(len(rerun)))
    assert "".join(c.delta for c in cut) == "the quick brown "  # really cut mid-way
    assert "".join(c.delta for c in rerun) == final.choices[0].text
    assert final.choices[0].text == "the quick brown fox jumps over the lazy "
    assert replies.routing[event.request_id].attempt == 2
    assert replies.routing[event.request_id].replica == good.url
    # what a client is sent from these replies: each token once
    relay = ReplyRelay()
    pending = relay.open(event.request_id)
    for reply in [*chunks, final]:
        relay.accept(reply)
    sent = []
    while not pending.queue.empty():
        item = pending.queue.get_nowait()
        if isinstance(item, Delta):
            sent.append(item.text)
    assert "".join(sent) == final.choices[0].text


async def test_every_replica_failing_is_a_clear_error(
    kafka_bootstrap: str, tmp_path: Path, mesh: tuple[Bus, Replies]
) -> None:
    client, replies = mesh
    with FakeBackend(free_port()) as first, FakeBackend(free_port()) as second:
        first.behaviour.fail_status = second.behaviour.fail_status = 503
        async with running_router(kafka_bootstrap, tmp_path, first.url, second.url):
            event = request()
            await answered(client, replies, event)
    [final] = replies.finals[event.request_id]
    assert final.error.code == "inference_unavailable"
    assert "2 replica(s) of pool cpu" in final.error.message


async def test_a_rejected_request_is_not_retried(
    kafka_bootstrap: str, tmp_path: Path, mesh: tuple[Bus, Replies]
) -> None:
    client, replies = mesh
    with FakeBackend(free_port()) as first, FakeBackend(free_port()) as second:
        first.behaviour.fail_status = second.behaviour.fail_status = 400
        first.behaviour.reject_message = "max_tokens: too large"
        second.behaviour.reject_message = "max_tokens: too large"
        async with running_router(kafka_bootstrap, tmp_path, first.url, second.url):
            event = request()
            await answered(client, replies, event)
    [final] = replies.finals[event.request_id]
    assert final.error.type == "invalid_request_error"
    assert final.error.message == "max_tokens: too large"
    assert first.behaviour.calls + second.behaviour.calls == 1


async def test_cancellation_stops_the_generation(
    kafka_bootstrap: str, tmp_path: Path, mesh: tuple[Bus, Replies]
) -> None:
    client, replies = mesh
    with FakeBackend(free_port()) as slow:
        slow.behaviour.token_delay_s = 0.2
        async with running_router(kafka_bootstrap, tmp_path, slow.url):
            event = request(max_tokens=200)
            await client.publish(REQUESTS_NORMAL, event)
            await poll_until(lambda: replies.chunks.get(event.request_id), message="first chunk")
            await client.publish(CANCELLATIONS, ev.CancelRequest(request_id=event.request_id))
            await poll_until(lambda: slow.behaviour.cancelled == 1, message="upstream cancelled")
            await asyncio.sleep(0.5)
    assert replies.finals.get(event.request_id) is None
    assert len(replies.chunks[event.request_id]) < 50


async def test_an_expired_request_is_answered_with_a_timeout(
    kafka_bootstrap: str, tmp_path: Path, mesh: tuple[Bus, Replies]
) -> None:
    client, replies = mesh
    with FakeBackend(free_port()) as fake:
        async with running_router(kafka_bootstrap, tmp_path, fake.url):
            event = request()
            event.deadline.FromNanoseconds(time.time_ns() - 1)
            await client.publish(REQUESTS_NORMAL, event)
            await poll_until(lambda: replies.finals.get(event.request_id), message="final reply")
    assert replies.finals[event.request_id][0].error.code == "deadline_exceeded"
    assert fake.behaviour.calls == 0


def test_priority_with_aging_prefers_high_but_never_starves_low() -> None:
    choose = priority_with_aging(aging_s=2.0)

    def waiting(topic: str, waited_s: float) -> Waiting:
        item = Waiting(record=type("R", (), {"topic": topic})())
        item.fetched_at = time.monotonic() - waited_s
        return item

    fresh_high = waiting("llm.requests.high", 0.0)
    assert choose([waiting("llm.requests.low", 1.0), fresh_high]) is fresh_high
    assert choose([waiting("llm.requests.normal", 0.5), fresh_high]) is fresh_high
    old_low = waiting("llm.requests.low", 4.5)  # two levels of aging
    assert choose([old_low, fresh_high]) is old_low


def test_gpu_pool_first_when_healthy_then_cpu() -> None:
    pools = Pools(
        [
            PoolConfig(name="cpu", kind="cpu", replicas=["http://cpu:1"]),
            PoolConfig(name="gpu", kind="gpu", replicas=["http://gpu:1"], priorities=["high"]),
        ],
        cooldown_s=60,
    )
    assert pools.choose("high").name == "gpu"  # type: ignore[union-attr]
    assert pools.choose("low").name == "cpu"  # type: ignore[union-attr]
    gpu = pools.pools[1]
    gpu.failed(gpu.replicas[0])
    assert pools.choose("high").name == "cpu"  # type: ignore[union-attr]


def test_sampling_requests_get_a_seed_derived_from_their_id() -> None:
    event = request()
    event.sampling.temperature = 0.8
    _, body = upstream_body(event)
    assert body["seed"] == derived_seed(event.request_id)
    event.sampling.seed = 7
    assert upstream_body(event)[1]["seed"] == 7


def test_a_policy_cap_travels_as_a_cap_not_as_max_tokens() -> None:
    event = request(max_tokens=0)
    event.sampling.max_tokens_cap = 512
    _, body = upstream_body(event)
    assert body["max_tokens_cap"] == 512
    assert "max_tokens" not in body
    event.sampling.max_tokens = 20
    assert "max_tokens_cap" not in upstream_body(event)[1]
