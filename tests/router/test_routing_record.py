"""The router's routing decision is an audit record the broker must acknowledge: one it
did not take fails the request's handling, so the bus dead-letters it with the reason
instead of committing past a decision nobody recorded."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from services.router import rag
from services.router.pools import Pools
from services.router.routing import Router
from services.router.settings import PoolConfig, RagConfig
from shared.bus import EventContext
from shared.bus.embedded import free_port
from shared.events.v1 import events_pb2 as ev
from shared.pii import PiiPolicy, Purpose, TenantPiiSettings
from shared.topics import AUDIT_EVENTS, REPLIES, REQUESTS_NORMAL
from tests.fakes.openai_backend import FakeBackend


class Publisher:
    """Takes replies; refuses audit records, as a broker that lost the audit topic would."""

    def __init__(self) -> None:
        self.replies: list[Any] = []

    async def publish(self, topic: Any, event: Any, **kwargs: Any) -> None:
        if topic is AUDIT_EVENTS:
            raise ConnectionError("audit.events: not acknowledged")
        self.replies.append(event)

    async def enqueue(self, topic: Any, event: Any, **kwargs: Any) -> Any:
        if topic is AUDIT_EVENTS:  # buffered: the failure would only show in its future
            future: Any = asyncio.get_running_loop().create_future()
            future.set_exception(ConnectionError("audit.events: not acknowledged"))
            return future
        self.replies.append(event)
        return None


async def test_a_routing_record_the_broker_did_not_take_fails_the_handling() -> None:
    with FakeBackend(free_port()) as replica:
        publisher = Publisher()
        async with httpx.AsyncClient() as client:
            router = Router(
                publisher,  # type: ignore[arg-type]
                Pools([PoolConfig(name="cpu", replicas=[replica.url])], 1.0),
                client,
                default_deadline_s=10,
            )
            request = ev.InferenceRequest(
                request_id="r1",
                kind=ev.REQUEST_KIND_CHAT,
                model="smollm2-135m-instruct",
                priority=ev.PRIORITY_NORMAL,
                reply_topic=REPLIES.name,
            )
            request.messages.add(role="user", content="hello")
            request.sampling.max_tokens = 3
            context = EventContext(REQUESTS_NORMAL.name, 0, 0, b"r1", (), ev.Envelope(), 1)
            with pytest.raises(ConnectionError, match="not acknowledged"):
                await router.handle(request, context)
    assert any(isinstance(reply, ev.FinalReply) for reply in publisher.replies)


class Recorder:
    """Takes every event, as a broker that acknowledges all of them would."""

    def __init__(self) -> None:
        self.audited: list[ev.AuditEvent] = []

    async def publish(self, topic: Any, event: Any, **kwargs: Any) -> None:
        if topic is AUDIT_EVENTS:
            self.audited.append(event)

    async def enqueue(self, topic: Any, event: Any, **kwargs: Any) -> None:
        return None


def _kb(restricted: bool) -> httpx.MockTransport:
    hit = {"chunk_id": "doc-1#0", "document_id": "doc-1", "title": "Contacts", "score": 1.0,
           "collection": "handbook", "text": "IT help desk: call 13812345678.",
           "restricted": restricted}  # fmt: skip
    return httpx.MockTransport(lambda http: httpx.Response(200, json={"hits": [hit]}))


async def _route(rag_collections: list[str], *, restricted: bool = False) -> ev.AuditEvent:
    pii = TenantPiiSettings(tenants={"acme": {Purpose.AUDIT: PiiPolicy()}})
    with FakeBackend(free_port()) as replica:
        recorder = Recorder()
        mounts = {"http://kb.test": _kb(restricted)}
        async with httpx.AsyncClient(mounts=mounts) as client:
            router = Router(
                recorder,  # type: ignore[arg-type]
                Pools([PoolConfig(name="cpu", replicas=[replica.url])], 1.0),
                client,
                default_deadline_s=10,
                rag=RagConfig(retrieval_url="http://kb.test"),
                pii=pii,
            )
            request = ev.InferenceRequest(
                request_id="r2", kind=ev.REQUEST_KIND_CHAT, model="smollm2-135m-instruct",
                priority=ev.PRIORITY_NORMAL, reply_topic=REPLIES.name,
            )  # fmt: skip
            request.envelope.tenant = "acme"
            request.envelope.occurred_at.GetCurrentTime()
            request.messages.add(role="user", content="Who do I call? I am ann@example.com")
            request.rag_collections.extend(rag_collections)
            request.sampling.max_tokens = 3
            context = EventContext(REQUESTS_NORMAL.name, 0, 0, b"r2", (), ev.Envelope(), 1)
            await router.handle(request, context)
    (routing,) = [e for e in recorder.audited if e.WhichOneof("record") == "routing"]
    return routing


async def test_the_routing_record_keeps_the_augmented_prompt_redacted_for_audit() -> None:
    routing = await _route(["handbook"])
    prompt = [(m.role, m.content) for m in routing.routing.prompt]
    assert [role for role, _ in prompt] == ["system", "user"]
    assert prompt[0][1].startswith(rag.INSTRUCTIONS)
    user_turn = prompt[1][1]
    assert rag.SOURCES_OPEN in user_turn
    assert "IT help desk: call" in user_turn
    assert "Question: Who do I call?" in user_turn
    # the tenant's audit policy masks PII in the sources and in the caller's words alike
    assert "13812345678" not in user_turn
    assert "ann@example.com" not in user_turn
    assert not routing.routing.prompt_restricted


async def test_a_prompt_with_a_source_only_some_groups_may_read_says_so() -> None:
    routing = await _route(["handbook"], restricted=True)
    assert routing.routing.prompt
    assert routing.routing.prompt_restricted


async def test_a_prompt_the_router_did_not_change_is_not_recorded_twice() -> None:
    routing = await _route([])
    assert list(routing.routing.prompt) == []
