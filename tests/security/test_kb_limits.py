"""``/v1/kb/*`` at the gateway: bounded work per request, rate and concurrency limits, and
every field checked before anything is charged, decided or forwarded.

The routes run in-process with the real policy (policies/) and the gateway's real
limiters; the retrieval service and the broker are test doubles (httpx's mock transport,
a list), which lets each test count policy decisions, audit records and forwarded calls.
The same routes against the real services: tests/security/test_kb_boundaries.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request

from services.gateway.app import _audit_unavailable
from services.gateway.audit import AuditUnavailable
from services.gateway.auth import Principal
from services.gateway.kb_routes import KbRoutes
from services.gateway.limits import ConcurrencyLimiter, LocalRateLimiter
from services.gateway.policy import RegoPolicy
from services.gateway.responses import error_response
from services.gateway.settings import KbSettings, LimitsConfig
from shared.events.v1 import events_pb2 as ev
from shared.openai_protocol import OpenAIError
from shared.policy import AccessRequest
from tests.conftest import ROOT

PRINCIPALS = {
    "analyst": Principal("key:an", "acme", ("analyst",), "an", "api_key"),
    "limited": Principal("key:li", "acme", ("analyst",), "li", "api_key", rpm=3),
    "developer": Principal("key:dev", "acme", ("developer",), "dev", "api_key"),
    "admin": Principal("key:adm", "acme", ("admin",), "adm", "api_key"),
}


@dataclass
class Rig:
    client: httpx.AsyncClient
    decisions: list[AccessRequest] = field(default_factory=list)
    audited: list[ev.AuditEvent] = field(default_factory=list)
    published: list[ev.KbIngest] = field(default_factory=list)
    forwarded: list[httpx.Request] = field(default_factory=list)
    slow: asyncio.Event | None = None
    failure: httpx.Response | None = None  # what retrieval answers instead, when set
    concurrency: ConcurrencyLimiter | None = None

    async def call(
        self, method: str, path: str, key: str = "analyst", **kwargs: Any
    ) -> httpx.Response:
        headers = {"authorization": key}
        return await self.client.request(method, path, headers=headers, **kwargs)


class CountingPolicy(RegoPolicy):
    """The real policy, counting what it is asked."""

    asked: list[AccessRequest]

    async def aauthorize(self, access: AccessRequest) -> Any:
        self.asked.append(access)
        return await super().aauthorize(access)


def gateway(app: Starlette) -> httpx.AsyncClient:
    # in the test's own thread and loop: the policy engine may not move between threads
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw")


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    policy = CountingPolicy.from_dir(ROOT / "policies")
    state = Rig(client=None)  # type: ignore[arg-type]
    policy.asked = state.decisions

    async def record(event: ev.AuditEvent, key: str, tenant: str) -> None:
        state.audited.append(event)

    class Publisher:
        async def publish(self, topic: Any, event: ev.KbIngest, **kwargs: Any) -> None:
            state.published.append(event)

    async def retrieval(request: httpx.Request) -> httpx.Response:
        state.forwarded.append(request)
        if state.slow is not None:
            await state.slow.wait()
        if state.failure is not None:
            return state.failure
        if request.url.path.endswith("/search"):
            return httpx.Response(200, json={"hits": []})
        if "/documents/" in request.url.path:
            return httpx.Response(404, json={"error": {"message": "no document 'x' in 'pub'"}})
        return httpx.Response(200, json={"documents": [], "collections": []})

    def authenticate(request: Request) -> Principal:
        return PRINCIPALS[request.headers["authorization"]]

    routes = KbRoutes(
        settings=KbSettings(service_url="http://kb.test"),
        authenticate=authenticate,
        policy=policy,
        publisher=Publisher(),  # type: ignore[arg-type]
        record=record,
        rate_limiter=LocalRateLimiter(),
        concurrency=ConcurrencyLimiter(per_key=2, per_tenant=100),
        limits=LimitsConfig(),
        headers={},
    )
    state.concurrency = routes.guard.concurrency  # type: ignore[assignment]
    routes._client = httpx.AsyncClient(transport=httpx.MockTransport(retrieval))
    app = Starlette(routes=routes.routes(), exception_handlers={OpenAIError: error_response})
    async with gateway(app) as client:
        state.client = client
        yield state


async def search(rig: Rig, collections: Any, key: str = "analyst") -> httpx.Response:
    body = {"query": "leave", "collections": collections}
    return await rig.call("POST", "/v1/kb/search", key, json=body)


async def test_a_search_is_deduplicated_before_it_is_decided(rig: Rig) -> None:
    reply = await search(rig, ["pub"] * 5000)  # ~40 KiB: fits the 64 KiB body limit
    assert reply.status_code == 200, reply.text
    assert len(rig.decisions) == 1
    assert len(rig.audited) == 1
    assert json.loads(rig.forwarded[0].content)["collections"] == ["pub"]


async def test_more_distinct_collections_than_the_cap_are_refused_before_any_decision(
    rig: Rig,
) -> None:
    names = [f"c{i}" for i in range(17)]
    reply = await search(rig, names)
    assert reply.status_code == 400
    assert reply.json()["error"]["param"] == "collections"
    assert "16" in reply.json()["error"]["message"]
    assert rig.decisions == []
    assert rig.audited == []
    assert rig.forwarded == []
    assert (await search(rig, names[:16])).status_code == 200  # the cap itself is fine


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"query": "", "collections": ["pub"]}, "query"),
        ({"query": "x" * 4001, "collections": ["pub"]}, "query"),
        ({"query": "x", "collections": ["pub"], "top_k": 0}, "top_k"),
        ({"query": "x", "collections": ["pub"], "top_k": 51}, "top_k"),
        ({"query": "x", "collections": ["pub"], "top_k": True}, "top_k"),
        ({"query": "x", "collections": ["pub"], "mode": "sql"}, "mode"),
        ({"query": "x", "collections": ["pub\n"]}, "collections"),
        ({"query": "x", "collections": ["../secret"]}, "collections"),
        ({"query": "x", "collections": []}, "collections"),
        ({"query": "x", "collections": ["pub"], "tenant": "globex"}, "tenant"),
    ],
)
async def test_bad_search_fields_are_named_and_cost_nothing(
    rig: Rig, body: dict[str, Any], param: str
) -> None:
    reply = await rig.call("POST", "/v1/kb/search", "limited", json=body)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param
    assert rig.decisions == []
    assert rig.forwarded == []
    for _ in range(3):  # the key's 3 requests a minute are all still there
        assert (await search(rig, ["pub"], "limited")).status_code == 200


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (
            {"content_type": "text/plain", "text": "x", "document_id": "a/../../secret"},
            "document_id",
        ),
        ({"content_type": "text/plain", "text": "x", "document_id": "x\n"}, "document_id"),
        ({"content_type": "text/plain", "text": "x", "document_id": ""}, "document_id"),
        ({"content_type": "text/plain", "text": "x", "acl": ["g"] * 65}, "acl"),
        ({"content_type": "text/plain", "text": "x", "metadata": {"k": "v" * 2000}}, "metadata"),
        # a falsy value of the wrong type is not taken as "empty"
        ({"content_type": "text/plain", "text": "x", "title": 0}, "title"),
        ({"content_type": "text/plain", "text": "x", "acl": False}, "acl"),
        ({"content_type": "text/plain", "text": "x", "metadata": ""}, "metadata"),
    ],
)
async def test_bad_ingest_fields_are_named_and_nothing_is_published(
    rig: Rig, body: dict[str, Any], param: str
) -> None:
    reply = await rig.call("POST", "/v1/kb/collections/pub/documents", "developer", json=body)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param
    assert rig.published == []
    assert rig.decisions == []


@pytest.mark.parametrize(
    ("path", "param"),
    [
        (
            "/v1/kb/collections/pub/documents/a%2F..%2F..%2F..%2Fsecret%2Fdocuments%2Fx",
            "document_id",
        ),
        ("/v1/kb/collections/pub/documents/x%0A", "document_id"),
        ("/v1/kb/collections/pub%0A/documents/x", "collection"),
        ("/v1/kb/collections/pub/documents?after=a%2Fb", "after"),
        ("/v1/kb/collections/pub/documents?limit=0", "limit"),
        ("/v1/kb/collections/pub/documents?tenant=globex", "tenant"),
        ("/v1/kb/collections/pub/documents/x?tenant=globex", "tenant"),
    ],
)
async def test_bad_names_in_the_path_are_refused_before_anything_is_forwarded(
    rig: Rig, path: str, param: str
) -> None:
    reply = await rig.call("GET", path)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param
    assert rig.forwarded == []
    assert rig.decisions == []


async def test_names_are_forwarded_as_single_encoded_path_segments(rig: Rig) -> None:
    await rig.call("GET", "/v1/kb/collections/pub/documents/mail:a@b.c")
    [sent] = rig.forwarded
    assert sent.url.raw_path.decode().startswith("/v1/kb/collections/pub/documents/mail%3Aa%40b.c?")


async def test_a_missing_or_hidden_document_is_one_and_the_same_404(rig: Rig) -> None:
    reply = await rig.call("GET", "/v1/kb/collections/pub/documents/payroll")
    assert reply.status_code == 404
    assert reply.json()["error"]["message"] == "no such document in this collection"
    sent = rig.forwarded[0].url.params
    assert sent.get_list("group") == ["analyst"]
    assert "admin" not in sent


async def test_every_kb_route_is_rate_limited(rig: Rig) -> None:
    calls = [
        ("POST", "/v1/kb/search", {"query": "x", "collections": ["pub"]}),
        ("GET", "/v1/kb/collections", None),
        ("GET", "/v1/kb/collections/pub/documents", None),
    ]
    for method, path, body in calls:  # the key's 3 requests a minute
        assert (await rig.call(method, path, "limited", json=body)).status_code in (200, 404)
    for method, path in [
        ("POST", "/v1/kb/search"),
        ("GET", "/v1/kb/collections"),
        ("GET", "/v1/kb/collections/pub/documents"),
        ("GET", "/v1/kb/collections/pub/documents/x"),
    ]:
        body = {"query": "x", "collections": ["pub"]} if method == "POST" else None
        reply = await rig.call(method, path, "limited", json=body)
        assert reply.status_code == 429, (path, reply.text)
        assert int(reply.headers["retry-after"]) >= 1
    assert len(rig.forwarded) == 3


async def test_writes_are_rate_limited_too() -> None:
    limits = LimitsConfig(default_rpm=2)
    principal = Principal("key:w", "acme", ("developer",), "w", "api_key")
    routes = KbRoutes(
        settings=KbSettings(service_url="http://kb.test"),
        authenticate=lambda request: principal,
        policy=RegoPolicy.from_dir(ROOT / "policies"),
        publisher=type("P", (), {"publish": lambda *a, **k: asyncio.sleep(0)})(),  # type: ignore[arg-type]
        record=lambda *a: asyncio.sleep(0),  # type: ignore[arg-type,return-value]
        rate_limiter=LocalRateLimiter(),
        concurrency=ConcurrencyLimiter(per_key=4, per_tenant=4),
        limits=limits,
        headers={},
    )
    app = Starlette(routes=routes.routes(), exception_handlers={OpenAIError: error_response})
    async with gateway(app) as client:
        body = {"content_type": "text/plain", "text": "x", "document_id": "d"}
        codes = [
            (await client.post("/v1/kb/collections/pub/documents", json=body)).status_code,
            (await client.delete("/v1/kb/collections/pub/documents/d")).status_code,
            (await client.post("/v1/kb/collections/pub/documents", json=body)).status_code,
            (await client.delete("/v1/kb/collections/pub/documents/d")).status_code,
        ]
    assert codes == [202, 202, 429, 429]


async def test_concurrent_kb_requests_are_bounded_per_key(rig: Rig) -> None:
    rig.slow = asyncio.Event()

    async def one() -> int:
        reply = await rig.call("GET", "/v1/kb/collections/pub/documents")
        return reply.status_code

    held = [asyncio.create_task(one()) for _ in range(2)]  # the key's 2 slots
    while len(rig.forwarded) < 2:
        await asyncio.sleep(0.01)
    assert await one() == 429
    rig.slow.set()
    assert await asyncio.gather(*held) == [200, 200]
    assert await one() == 200  # slots are given back


@pytest.mark.parametrize(
    ("status", "message"),
    [
        (500, "the query could not be embedded: http://inference:8000/v1/embeddings refused"),
        (503, "embedder at http://inference:8000 unavailable"),
        (401, "no service token"),  # the gateway's own identity refused: not the caller's 401
        (403, "gateway may not call /internal"),
    ],
)
async def test_a_failing_knowledge_base_is_a_503_that_names_nothing_internal(
    rig: Rig, status: int, message: str
) -> None:
    rig.failure = httpx.Response(status, json={"error": {"message": message}})
    reply = await rig.call("POST", "/v1/kb/search", json={"query": "leave", "collections": ["pub"]})
    assert reply.status_code == 503, reply.text
    assert "inference" not in reply.text
    assert message not in reply.text


async def test_an_unstorable_decision_record_is_a_503_not_a_500() -> None:
    """A kb decision is answered only once its audit record is stored; when neither Kafka nor
    the spool takes it the caller gets 503 (retry later), never a 500 with its reason."""
    principal = Principal("key:w", "acme", ("analyst",), "w", "api_key")

    async def unstorable(*args: Any) -> None:
        raise AuditUnavailable("spool /var/lib/meshllm/gateway/audit-spool.jsonl: disk full")

    routes = KbRoutes(
        settings=KbSettings(service_url="http://kb.test"),
        authenticate=lambda request: principal,
        policy=RegoPolicy.from_dir(ROOT / "policies"),
        publisher=type("P", (), {"publish": lambda *a, **k: asyncio.sleep(0)})(),  # type: ignore[arg-type]
        record=unstorable,
        rate_limiter=LocalRateLimiter(),
        concurrency=ConcurrencyLimiter(per_key=4, per_tenant=4),
        limits=LimitsConfig(),
        headers={},
    )
    app = Starlette(
        routes=routes.routes(),
        exception_handlers={OpenAIError: error_response, AuditUnavailable: _audit_unavailable},
    )
    async with gateway(app) as client:
        reply = await client.post("/v1/kb/search", json={"query": "q", "collections": ["pub"]})
    assert reply.status_code == 503, reply.text
    assert "/var/lib" not in reply.text


async def test_a_slow_body_holds_no_slot_of_the_key(rig: Rig) -> None:
    """The slot is taken once the request is read and checked: a caller trickling a body
    cannot hold its key's (or tenant's) concurrent slots meanwhile."""
    gate = asyncio.Event()

    async def trickle() -> AsyncIterator[bytes]:
        yield b'{"query": "leave", '
        await gate.wait()
        yield b'"collections": ["pub"]}'

    sending = asyncio.create_task(rig.call("POST", "/v1/kb/search", content=trickle()))
    await asyncio.sleep(0.3)
    assert rig.concurrency is not None
    assert rig.concurrency.in_flight() == 0
    gate.set()
    reply = await sending
    assert reply.status_code == 200, reply.text
    assert rig.concurrency.in_flight() == 0
