"""The router's routing decision is an audit record the broker must acknowledge: one it
did not take fails the request's handling, so the bus dead-letters it with the reason
instead of committing past a decision nobody recorded."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from services.router.pools import Pools
from services.router.routing import Router
from services.router.settings import PoolConfig
from shared.bus import EventContext
from shared.bus.embedded import free_port
from shared.events.v1 import events_pb2 as ev
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
