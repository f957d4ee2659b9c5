"""The gateway's reply path on the real broker, with the real router and gateway services and
fake replicas that can be slowed, broken mid-stream or made to answer differently.

What is shown: the audit hold-back (the request's record before any answer, the end of a
stream only after the response's record, strict tenants held back whole, the spool when
Kafka does not take a record, an error instead of the end when nothing does); the 504
deadline; a client that goes away freeing the replica's slot; a replica dying mid-stream
(each token once), and a re-run that answers differently (never a spliced answer).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.gateway.__main__ import build_gateway
from services.gateway.app import Gateway
from services.gateway.audit import AuditSpool, AuditUnavailable
from services.gateway.auth import KeyStore
from services.gateway.settings import GatewaySettings
from services.router.__main__ import build as build_router
from services.router.settings import PoolConfig, RouterSettings
from shared.bus import Bus, EventContext, Publisher
from shared.bus.embedded import free_port
from shared.events.v1 import events_pb2 as ev
from shared.health import HealthState
from shared.http_server import HttpApi
from shared.settings import MeshSettings
from shared.topics import AUDIT_EVENTS
from tests.conftest import poll_until
from tests.fakes.openai_backend import WORDS, Behaviour, FakeBackend

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(120)]

STRICT_TENANT = "globex"
TIMEOUT_S = 20.0


class AuditLog:
    """Audit records read back from the broker, by request id."""

    def __init__(self) -> None:
        self.requests: dict[str, ev.AuditEvent] = {}
        self.responses: dict[str, list[ev.AuditEvent]] = defaultdict(list)

    async def on_audit(self, event: ev.AuditEvent, ctx: EventContext) -> None:
        kind = event.WhichOneof("record")
        if kind == "request":
            self.requests[event.request_id] = event
        elif kind == "response":
            self.responses[event.request_id].append(event)


@dataclass
class Mesh:
    url: str
    keys: dict[str, str]
    gateway: Gateway
    replicas: list[FakeBackend]
    audit: AuditLog
    data_dir: Path

    @property
    def first(self) -> Behaviour:
        return self.replicas[0].behaviour

    @property
    def second(self) -> Behaviour:
        return self.replicas[1].behaviour

    def break_audit(self, *, spool_too: bool) -> None:
        """Kafka stops taking the gateway's audit records (and the disk too, if asked)."""
        recorder = self.gateway.audit
        # a publisher that was never started fails every send, as a lost broker does
        recorder.publisher = Publisher(MeshSettings(data_dir=self.data_dir), service="gateway")
        if spool_too:
            blocked = self.data_dir / f"not-a-dir-{uuid.uuid4().hex[:6]}"
            blocked.write_text("a file where the spool's folder should be")
            recorder.spool = AuditSpool(blocked / "spool.jsonl")


@pytest.fixture(scope="module")
async def mesh(
    kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Mesh]:
    data = tmp_path_factory.mktemp("reply-path")
    with KeyStore(data / "gateway" / "keys.sqlite") as store:
        keys = {
            "acme": store.create("acme", ["admin"])[1],
            STRICT_TENANT: store.create(STRICT_TENANT, ["admin"])[1],
        }
    kafka = {"bootstrap": kafka_bootstrap}
    with FakeBackend(free_port()) as first, FakeBackend(free_port()) as second:
        router_settings = RouterSettings(
            kafka=kafka,
            data_dir=data,
            pools=[PoolConfig(name="cpu", replicas=[first.url, second.url])],
            replica_cooldown_s=0.01,  # every test starts on the first replica
        )
        router = Bus(router_settings, service="router")
        await build_router(router_settings, router, HealthState(service="router"))
        settings = GatewaySettings(
            kafka=kafka,
            data_dir=data,
            request_timeout_s=TIMEOUT_S,
            audit={"ack_timeout_s": 1.0, "strict_tenants": [STRICT_TENANT]},
        )
        gateway_bus = Bus(settings, service="gateway")
        gateway = build_gateway(settings, gateway_bus)
        audit = AuditLog()
        reader = Bus(MeshSettings(kafka=kafka, data_dir=data), service="tests")
        reader.subscribe(
            AUDIT_EVENTS,
            group=f"tests-{uuid.uuid4().hex[:8]}",
            durable_dedup=False,
            from_latest=True,
        )(audit.on_audit)
        buses = (router, gateway_bus, reader)
        for bus in buses:
            await bus.start()
        api = HttpApi(gateway.app(), name="gateway", host="127.0.0.1", port=0, settings_hint="")
        serving = asyncio.create_task(api.serve())
        try:
            await poll_until(lambda: all(bus.ready for bus in buses), message="buses ready")
            await poll_until(lambda: api.started, message="gateway listening")
            yield Mesh(f"{api.url}/v1", keys, gateway, [first, second], audit, data)
        finally:
            serving.cancel()
            await asyncio.gather(serving, return_exceptions=True)
            await gateway.audit.stop()
            for bus in reversed(buses):
                await bus.stop()


@pytest.fixture(autouse=True)
async def fresh(mesh: Mesh) -> AsyncIterator[None]:
    """Each test starts with idle, well-behaved replicas and a working audit path."""
    await poll_until(lambda: all(r.behaviour.in_flight == 0 for r in mesh.replicas), 30)
    recorder = mesh.gateway.audit
    publisher, spool = recorder.publisher, recorder.spool
    for replica in mesh.replicas:
        replica.behaviour.__init__()  # type: ignore[misc]
    mesh.gateway.settings.request_timeout_s = TIMEOUT_S
    yield
    recorder.publisher, recorder.spool = publisher, spool


@dataclass
class Streamed:
    """What a client read from one SSE response."""

    status: int
    request_id: str = ""
    text: dict[int, str] = field(default_factory=lambda: defaultdict(str))
    content_at: list[float] = field(default_factory=list)
    finish: dict[int, str] = field(default_factory=dict)
    errors: list[dict[str, Any]] = field(default_factory=list)
    done: bool = False
    body: dict[str, Any] | None = None


def chat(max_tokens: int = 8, stream: bool = True, **extra: Any) -> dict[str, Any]:
    return {
        "model": "smollm2-135m-instruct",
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
        **extra,
    }


async def stream(
    mesh: Mesh,
    body: dict[str, Any],
    *,
    tenant: str = "acme",
    stop_after: int | None = None,
    on_first_content: Callable[[], None] | None = None,
) -> Streamed:
    """POST ``body`` and read its SSE; hang up once ``stop_after`` words of text came, if set
    (the fake model's tokens are words; the router may send several in one chunk).
    ``on_first_content`` runs once, when the first text arrives."""
    headers = {"authorization": f"Bearer {mesh.keys[tenant]}"}
    async with (
        httpx.AsyncClient(timeout=60) as http,
        http.stream("POST", f"{mesh.url}/chat/completions", json=body, headers=headers) as reply,
    ):
        seen = Streamed(reply.status_code, reply.headers.get("x-request-id", ""))
        if reply.status_code != 200:
            seen.body = json.loads(await reply.aread())
            return seen
        async for line in reply.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                seen.done = True
                continue
            payload = json.loads(line[6:])
            if "error" in payload:
                seen.errors.append(payload["error"])
                continue
            for choice in payload["choices"]:
                content = choice["delta"].get("content")
                if content:
                    if on_first_content is not None and not seen.content_at:
                        on_first_content()
                    seen.text[choice["index"]] += content
                    seen.content_at.append(time.monotonic())
                if choice["finish_reason"]:
                    seen.finish[choice["index"]] = choice["finish_reason"]
            if stop_after is not None and len("".join(seen.text.values()).split()) >= stop_after:
                return seen  # leaving the block closes the connection mid-stream
    return seen


def words(count: int, vocabulary: list[str] = WORDS) -> str:
    return "".join(vocabulary[i % len(vocabulary)] + " " for i in range(count))


async def response_record(mesh: Mesh, request_id: str) -> ev.AuditEvent:
    await poll_until(lambda: mesh.audit.responses.get(request_id), message="response record")
    [record] = mesh.audit.responses[request_id]
    return record


async def slots_freed(mesh: Mesh) -> None:
    """Every replica's generation stopped (its slot is free again)."""
    await poll_until(
        lambda: all(r.behaviour.in_flight == 0 for r in mesh.replicas), message="slots freed"
    )


# ------------------------------------------------------------------ audit hold-back


async def test_a_stream_ends_only_with_its_response_record_holding_the_text(mesh: Mesh) -> None:
    seen = await stream(mesh, chat(max_tokens=6))
    assert seen.text[0] == words(6)
    assert seen.finish == {0: "length"}
    assert seen.done
    # the request's record was durable before the first token (the ordering itself is shown
    # by test_no_durable_request_record_no_answer_...); this test's reader may see it later
    await poll_until(lambda: seen.request_id in mesh.audit.requests, message="request record")
    record = await response_record(mesh, seen.request_id)
    assert record.response.status_code == 200
    assert record.response.choices[0].text == seen.text[0]


async def test_no_durable_request_record_no_answer_and_the_generation_stopped(
    mesh: Mesh,
) -> None:
    mesh.first.token_delay_s = 0.1
    mesh.break_audit(spool_too=True)
    seen = await stream(mesh, chat(max_tokens=30))
    assert seen.status == 503
    assert seen.body is not None
    assert "audit record could not be stored" in seen.body["error"]["message"]
    assert not seen.text
    await slots_freed(mesh)
    assert mesh.first.completed == 0  # cancelled, not generated to the end


async def test_no_durable_policy_record_no_answer(
    mesh: Mesh, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The policy decision's record is acknowledged before the request goes out: when it
    cannot be stored, the request is refused with 503 and never reaches a replica."""
    recorder = mesh.gateway.audit
    store = recorder.record

    async def policy_records_fail(event: ev.AuditEvent, *, key: str, tenant: str) -> None:
        if event.WhichOneof("record") == "policy":
            raise AuditUnavailable("the policy record was not stored")
        await store(event, key=key, tenant=tenant)

    monkeypatch.setattr(recorder, "record", policy_records_fail)
    # the request goes out beside its records (so a cancellation follows it): slow replicas
    # let the cancellation arrive before the answer is done
    mesh.first.token_delay_s = mesh.second.token_delay_s = 0.1
    seen = await stream(mesh, chat(max_tokens=30))
    assert seen.status == 503
    assert not seen.text
    await slots_freed(mesh)
    assert mesh.first.completed + mesh.second.completed == 0  # cancelled, never finished


async def test_the_end_of_a_stream_waits_for_its_record_and_an_unstored_one_is_an_error(
    mesh: Mesh,
) -> None:
    mesh.first.token_delay_s = 0.15
    # broken once the client holds text: the request's own record was durable by then
    seen = await stream(
        mesh, chat(max_tokens=8), on_first_content=lambda: mesh.break_audit(spool_too=True)
    )
    assert seen.text[0] == words(8)  # content went out as it was made...
    assert not seen.finish  # ...but not the end of the answer
    assert not seen.done
    [error] = seen.errors
    assert "withheld because its audit record could not be stored" in error["message"]


async def test_when_kafka_does_not_take_the_records_they_are_spooled(mesh: Mesh) -> None:
    mesh.break_audit(spool_too=False)
    complete = await stream(mesh, chat(max_tokens=5))
    assert complete.done
    mesh.first.token_delay_s = 0.1
    cut = await stream(mesh, chat(max_tokens=40), stop_after=3)
    await slots_freed(mesh)
    spooled: dict[str, ev.AuditEvent] = {}

    def spooled_responses() -> bool:
        for _, _, event in mesh.gateway.audit.spool.records():
            if event.WhichOneof("record") == "response":
                spooled[event.request_id] = event
        return cut.request_id in spooled

    await poll_until(spooled_responses, message="the cut stream's record spooled")
    whole = spooled[complete.request_id].response
    assert (whole.status_code, whole.choices[0].text) == (200, words(5))
    partial = spooled[cut.request_id].response
    assert partial.status_code == 499
    assert partial.choices[0].text == cut.text[0] == words(3)  # what the client was sent
    assert partial.choices[0].finish_reason == "interrupted"


class SilentBroker:
    """A publisher whose sends are never acked (a broker that stopped answering)."""

    async def enqueue(self, *args: Any, **kwargs: Any) -> asyncio.Future[None]:
        return asyncio.get_running_loop().create_future()


async def test_a_record_being_written_is_finished_when_the_caller_hangs_up(mesh: Mesh) -> None:
    mesh.gateway.audit.publisher = SilentBroker()  # type: ignore[assignment]
    # all the text arrives, then the caller leaves while the response's record is in the works
    seen = await stream(mesh, chat(max_tokens=6), stop_after=6)
    assert not seen.done

    def spooled() -> ev.AuditEvent | None:
        for _, _, event in mesh.gateway.audit.spool.records():
            if event.request_id == seen.request_id and event.WhichOneof("record") == "response":
                return event
        return None

    record = await poll_until(spooled, message="the response's record spooled")
    assert isinstance(record, ev.AuditEvent)
    assert record.response.status_code == 200
    assert record.response.choices[0].text == seen.text[0] == words(6)


async def test_a_strict_tenant_gets_the_answer_only_once_its_record_is_durable(
    mesh: Mesh,
) -> None:
    mesh.first.token_delay_s = 0.1
    started = time.monotonic()
    seen = await stream(mesh, chat(max_tokens=10), tenant=STRICT_TENANT)
    assert seen.text[0] == words(10)
    assert seen.done
    # held back whole: nothing before the generation (~1 s) ended, then one burst
    assert seen.content_at[0] - started > 0.9
    assert seen.content_at[-1] - seen.content_at[0] < 0.05
    record = await response_record(mesh, seen.request_id)
    assert record.response.choices[0].text == seen.text[0]


async def test_a_strict_tenant_whose_record_cannot_be_stored_gets_503_and_no_text(
    mesh: Mesh,
) -> None:
    mesh.first.token_delay_s = 0.05

    async def break_after_first_token() -> None:
        await poll_until(lambda: mesh.first.in_flight, message="generation started")
        mesh.break_audit(spool_too=True)

    breaking = asyncio.create_task(break_after_first_token())
    seen = await stream(mesh, chat(max_tokens=8), tenant=STRICT_TENANT)
    await breaking
    assert seen.status == 503
    assert not seen.text


# ------------------------------------------------------------------ deadline, disconnect


async def test_the_deadline_ends_a_stream_with_504_and_stops_the_generation(mesh: Mesh) -> None:
    mesh.first.token_delay_s = 0.2
    mesh.gateway.settings.request_timeout_s = 1.0
    seen = await stream(mesh, chat(max_tokens=50))
    [error] = seen.errors
    assert error["code"] == "deadline_exceeded"
    assert not seen.done
    assert 0 < len(seen.text[0]) < len(words(50))
    await slots_freed(mesh)
    assert mesh.first.cancelled == 1
    record = await response_record(mesh, seen.request_id)
    assert record.response.status_code == 504
    assert record.response.choices[0].text == seen.text[0]


async def test_the_deadline_of_a_whole_answer_is_504(mesh: Mesh) -> None:
    mesh.first.token_delay_s = 0.2
    mesh.gateway.settings.request_timeout_s = 1.0
    seen = await stream(mesh, chat(max_tokens=50, stream=False))
    assert seen.status == 504
    assert seen.body is not None
    assert seen.body["error"]["code"] == "deadline_exceeded"
    await slots_freed(mesh)
    assert mesh.first.cancelled == 1
    record = await response_record(mesh, seen.request_id)
    assert record.response.status_code == 504


async def test_a_client_that_hangs_up_mid_stream_frees_the_replica(mesh: Mesh) -> None:
    mesh.first.token_delay_s = 0.1
    seen = await stream(mesh, chat(max_tokens=100), stop_after=2)
    await poll_until(lambda: mesh.first.cancelled == 1, message="generation cancelled")
    await slots_freed(mesh)
    assert mesh.first.completed == 0
    record = await response_record(mesh, seen.request_id)
    assert record.response.status_code == 499
    assert record.response.choices[0].text == seen.text[0]


async def test_a_client_that_hangs_up_on_a_whole_answer_frees_the_replica(mesh: Mesh) -> None:
    mesh.first.token_delay_s = 0.1
    headers = {"authorization": f"Bearer {mesh.keys['acme']}"}
    async with httpx.AsyncClient(timeout=1.0) as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.post(
                f"{mesh.url}/chat/completions", json=chat(100, stream=False), headers=headers
            )
    await poll_until(lambda: mesh.first.cancelled == 1, message="generation cancelled")
    await slots_freed(mesh)
    assert mesh.first.completed == 0


# ------------------------------------------------------------------ failover mid-stream


async def test_a_replica_dying_mid_stream_is_retried_and_each_token_arrives_once(
    mesh: Mesh,
) -> None:
    mesh.first.break_after = 3
    mesh.first.token_delay_s = mesh.second.token_delay_s = 0.02
    seen = await stream(mesh, chat(max_tokens=9))
    assert (mesh.first.calls, mesh.second.calls) == (1, 1)  # cut on the first, re-run on the other
    assert seen.text[0] == words(9)
    assert seen.finish == {0: "length"}
    assert seen.done
    record = await response_record(mesh, seen.request_id)
    assert record.response.choices[0].text == seen.text[0]


async def test_a_rerun_that_answers_differently_is_never_spliced(mesh: Mesh) -> None:
    mesh.first.break_after = 3
    mesh.first.token_delay_s = 0.02
    mesh.second.words = ["a", "completely", "different", "answer"]
    mesh.second.token_delay_s = 0.2
    seen = await stream(mesh, chat(max_tokens=30))
    assert seen.text[0] == words(3)  # only what the first replica said
    [error] = seen.errors
    assert error["code"] == "stream_diverged"
    assert not seen.done
    assert not seen.finish
    await slots_freed(mesh)
    assert mesh.second.cancelled == 1  # the diverging re-run was stopped
    record = await response_record(mesh, seen.request_id)
    assert record.response.status_code == 502
    assert record.response.choices[0].text == words(3)


async def test_every_request_is_one_answer_span_however_it_ends(mesh: Mesh) -> None:
    """The ops service's error rate counts what the clients got: a whole answer past its
    deadline (504) and a request refused because its record could not be stored (503) are
    one answer each, with their status, as a good stream is."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from services.gateway.metrics import GatewayMetrics

    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "gateway"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    settings = mesh.gateway.settings
    kept = mesh.gateway.metrics
    mesh.gateway.metrics = GatewayMetrics(
        [*settings.models, *settings.embedding_models], tracer=provider.get_tracer("test")
    )
    try:
        assert (await stream(mesh, chat(max_tokens=3))).status == 200
        mesh.first.token_delay_s = 0.2
        settings.request_timeout_s = 1.0
        assert (await stream(mesh, chat(max_tokens=50, stream=False))).status == 504
        await slots_freed(mesh)
        settings.request_timeout_s = TIMEOUT_S
        mesh.break_audit(spool_too=True)
        assert (await stream(mesh, chat(max_tokens=3))).status == 503
        await poll_until(lambda: len(exporter.get_finished_spans()) >= 3, message="3 spans")
        spans = exporter.get_finished_spans()
        assert [s.attributes["http.response.status_code"] for s in spans] == [200, 504, 503]
        assert [s.attributes.get("error.type") for s in spans] == [
            None, "deadline_exceeded", "server_error",
        ]  # fmt: skip
        assert all(s.name == "chat smollm2-135m-instruct" for s in spans)
    finally:
        mesh.gateway.metrics = kept
        provider.shutdown()


async def test_a_request_the_broker_never_takes_is_503_at_its_deadline(mesh: Mesh) -> None:
    """A publish that never completes (a broker, or a producer buffer, that takes nothing)
    ends at the request's deadline with a 503 and gives the slot back; it does not hang."""
    from shared.topics import REQUESTS_NORMAL

    gateway = mesh.gateway
    real = gateway.publisher
    never = asyncio.Event()

    class Stuck:
        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        async def publish(self, topic: Any, event: Any, **options: Any) -> Any:
            if topic is REQUESTS_NORMAL:
                await never.wait()  # the request itself is never taken
            return await real.publish(topic, event, **options)

    gateway.publisher = Stuck()  # type: ignore[assignment]
    gateway.settings.request_timeout_s = 1.0
    try:
        started = time.monotonic()
        marker = f"never taken {uuid.uuid4().hex}"
        body = chat(max_tokens=3, stream=False)
        body["messages"] = [{"role": "user", "content": marker}]
        seen = await stream(mesh, body)
        assert seen.status == 503
        assert seen.body is not None
        assert "did not take the request" in seen.body["error"]["message"]
        assert time.monotonic() - started < 10
        asked = [b for r in mesh.replicas for b in r.behaviour.bodies]
        assert marker not in json.dumps(asked)  # it never reached a replica
    finally:
        gateway.publisher = real


async def test_a_stream_ends_with_chunks_naming_the_version_that_answered(mesh: Mesh) -> None:
    headers = {"authorization": f"Bearer {mesh.keys['acme']}"}
    body = chat(max_tokens=3, model="smollm2-135m-instruct:v7")
    models = []
    async with (
        httpx.AsyncClient(timeout=60) as http,
        http.stream("POST", f"{mesh.url}/chat/completions", json=body, headers=headers) as reply,
    ):
        async for line in reply.aiter_lines():
            if line.startswith("data: {"):
                models.append(json.loads(line[6:])["model"])
    # the content went out before the reply said which version it was; the end says it
    assert models[-1] == "smollm2-135m-instruct:v7"
