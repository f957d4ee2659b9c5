"""Internal APIs refuse callers without the mesh's service identity.

The audit (records and proofs) and retrieval (knowledge base) APIs run as real service
processes against the test broker; the inference HTTP front is the Ray Serve ingress's
:class:`HttpFrontend` over stand-in deployment handles (the real deployment is checked in
``tests/inference/test_serve.py``). For each: no token or an unknown token -> 401, another
service's token on a route not granted to it -> 403, the right service's token -> the
answer.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from shared.bus.embedded import free_port
from shared.service_auth import ensure_tokens
from shared.settings import ENV_PREFIX
from tests.conftest import ROOT
from tests.e2e.conftest import Service

WRONG = "Bearer " + "0" * 64


@dataclass
class Api:
    url: str
    tokens: dict[str, str]

    def auth(self, identity: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[identity]}"}


def read_tokens(directory: Path) -> dict[str, str]:
    return {path.stem: path.read_text().strip() for path in directory.glob("*.token")}


def env_of(kafka_bootstrap: str, data: Path, **extra: str) -> dict[str, str]:
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    return {
        **inherited,
        "PYTHONPATH": str(ROOT),
        "PYTHONUNBUFFERED": "1",
        "MESHLLM_KAFKA__BOOTSTRAP": kafka_bootstrap,
        "MESHLLM_DATA_DIR": str(data),
        "MESHLLM_LOG_FORMAT": "json",
        **extra,
    }


async def start(module: str, env: dict[str, str], data: Path, api_port: int) -> AsyncIterator[Api]:
    # what `meshllm up` does before it starts the services
    ensure_tokens(data / "run" / "service-tokens")
    service = Service(module, free_port(), env, data / f"{module}.log")
    await service.start()
    try:
        await service.ready(timeout=90)
        yield Api(f"http://127.0.0.1:{api_port}", read_tokens(data / "run" / "service-tokens"))
    finally:
        await service.stop()


@pytest.fixture(scope="module")
async def audit_api(
    kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Api]:
    data = tmp_path_factory.mktemp("audit-auth")
    port = free_port()
    env = env_of(kafka_bootstrap, data, MESHLLM_AUDIT_API_PORT=str(port))
    async for api in start("services.audit", env, data, port):
        yield api


@pytest.fixture(scope="module")
async def retrieval_api(
    kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Api]:
    data = tmp_path_factory.mktemp("retrieval-auth")
    port = free_port()
    env = env_of(
        kafka_bootstrap,
        data,
        MESHLLM_KB_API_PORT=str(port),
        # BM25 searches below never embed; nothing needs to listen there
        MESHLLM_EMBEDDINGS_URL=f"http://127.0.0.1:{free_port()}",
    )
    async for api in start("services.retrieval", env, data, port):
        yield api


AUDIT_ROUTES = (
    "/v1/audit/records",
    "/v1/audit/records?tenant=acme",
    "/v1/audit/records/some-event",
    "/v1/audit/records/some-event/proof",
    "/v1/audit/checkpoints",
    "/v1/audit/consistency?first=1",
    "/v1/audit/public-key",
)


@pytest.mark.kafka
@pytest.mark.parametrize("path", AUDIT_ROUTES)
async def test_audit_api_needs_the_gateway_identity(audit_api: Api, path: str) -> None:
    async with httpx.AsyncClient(base_url=audit_api.url, timeout=10) as client:
        bare = await client.get(path)
        assert bare.status_code == 401, bare.text
        assert bare.json()["error"]["type"] == "authentication_error"
        assert (await client.get(path, headers={"Authorization": WRONG})).status_code == 401
        lowercase = {"Authorization": "bearer " + audit_api.tokens["gateway"][:-1]}
        assert (await client.get(path, headers=lowercase)).status_code == 401
        for other in ("router", "retrieval", "inference", "audit"):
            denied = await client.get(path, headers=audit_api.auth(other))
            assert denied.status_code == 403, (other, denied.text)
            assert denied.json()["error"]["type"] == "permission_error"
        allowed = await client.get(path, headers=audit_api.auth("gateway"))
        assert allowed.status_code not in (401, 403), allowed.text


@pytest.mark.kafka
async def test_audit_records_of_every_tenant_are_not_dumped_to_other_services(
    audit_api: Api,
) -> None:
    """The finding: ``GET /v1/audit/records`` with no tenant answered every tenant's records
    to anyone who could reach the port."""
    async with httpx.AsyncClient(base_url=audit_api.url, timeout=10) as client:
        assert (await client.get("/v1/audit/records")).status_code == 401
        router = await client.get("/v1/audit/records", headers=audit_api.auth("router"))
        assert router.status_code == 403
        assert "records" not in router.json()
        gateway = await client.get("/v1/audit/records", headers=audit_api.auth("gateway"))
        assert gateway.status_code == 200
        assert "records" in gateway.json()


SEARCH = {"tenant": "acme", "collections": ["pub"], "query": "leave policy", "mode": "bm25"}


@pytest.mark.kafka
async def test_retrieval_search_takes_the_gateway_and_the_router(retrieval_api: Api) -> None:
    url = "/v1/kb/search"
    async with httpx.AsyncClient(base_url=retrieval_api.url, timeout=30) as client:
        bare = await client.post(url, json=SEARCH)
        assert bare.status_code == 401, bare.text
        assert "hits" not in bare.json()
        wrong = await client.post(url, json=SEARCH, headers={"Authorization": WRONG})
        assert wrong.status_code == 401
        for other in ("audit", "inference", "retrieval"):
            denied = await client.post(url, json=SEARCH, headers=retrieval_api.auth(other))
            assert denied.status_code == 403, (other, denied.text)
        for caller in ("gateway", "router"):
            found = await client.post(url, json=SEARCH, headers=retrieval_api.auth(caller))
            assert found.status_code == 200, found.text
            assert found.json() == {"hits": []}


LISTINGS = (
    "/v1/kb/collections?tenant=acme",
    "/v1/kb/collections/pub/documents?tenant=acme",
    "/v1/kb/collections/pub/documents/handbook?tenant=acme",
)


@pytest.mark.kafka
@pytest.mark.parametrize("path", LISTINGS)
async def test_retrieval_listings_are_the_gateways_only(retrieval_api: Api, path: str) -> None:
    async with httpx.AsyncClient(base_url=retrieval_api.url, timeout=30) as client:
        assert (await client.get(path)).status_code == 401
        assert (await client.get(path, headers={"Authorization": WRONG})).status_code == 401
        # the router searches; it has no reason to list or read documents
        for other in ("router", "audit", "inference"):
            denied = await client.get(path, headers=retrieval_api.auth(other))
            assert denied.status_code == 403, (other, denied.text)
        allowed = await client.get(path, headers=retrieval_api.auth("gateway"))
        assert allowed.status_code in (200, 404), allowed.text


# --------------------------------------------------------------------------- inference


class _Call:
    def __init__(self, answer: dict[str, Any]) -> None:
        self.answer = answer
        self.calls = 0

    async def remote(self, *args: Any) -> dict[str, Any]:
        self.calls += 1
        return self.answer


class StandInHandle:
    """The embeddings deployment handle's surface that :class:`HttpFrontend` uses."""

    def __init__(self) -> None:
        self.embed = _Call({"object": "list", "data": []})


class StandInChat:
    """The chat backend :class:`HttpFrontend` serves generation from (a test double)."""

    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": "m"}]}

    async def chat(self, request: dict[str, Any]) -> dict[str, Any]:
        return {"object": "chat.completion", "choices": []}

    async def complete(self, request: dict[str, Any]) -> dict[str, Any]:
        return {"object": "text_completion", "choices": []}


@pytest.fixture
async def inference_api(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, Api]]:
    from services.inference.http import HttpFrontend
    from shared.service_auth import ServiceGuard

    tokens = {name: f"{name:x<64}" for name in ("gateway", "router", "retrieval", "audit")}
    guard = ServiceGuard.of_tokens(tokens)
    front = HttpFrontend(StandInChat(), StandInHandle(), guard)  # type: ignore[arg-type]

    async def endpoint(request: Request) -> Response:
        return await front.handle(request)

    app = Starlette(routes=[Route("/{path:path}", endpoint, methods=["GET", "POST"])])
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://inference") as client:
        yield client, Api("http://inference", tokens)


INFERENCE_ROUTES = (
    ("POST", "/v1/chat/completions", {"model": "m", "messages": []}, ("router",)),
    ("POST", "/v1/completions", {"model": "m", "prompt": "x"}, ("router",)),
    ("GET", "/v1/models", None, ("router",)),
    ("POST", "/v1/embeddings", {"input": "hello"}, ("router", "retrieval")),
)


@pytest.mark.parametrize(("method", "path", "body", "allowed"), INFERENCE_ROUTES)
async def test_inference_http_needs_the_router_or_retrieval(
    inference_api: tuple[httpx.AsyncClient, Api],
    method: str,
    path: str,
    body: dict[str, Any] | None,
    allowed: tuple[str, ...],
) -> None:
    client, api = inference_api
    bare = await client.request(method, path, json=body)
    assert bare.status_code == 401, bare.text
    assert bare.json()["error"]["type"] == "authentication_error"
    wrong = await client.request(method, path, json=body, headers={"Authorization": WRONG})
    assert wrong.status_code == 401
    # the gateway is no caller of inference at all
    for other in {"gateway", "router", "retrieval", "audit"} - set(allowed):
        denied = await client.request(method, path, json=body, headers=api.auth(other))
        assert denied.status_code == 403, (other, denied.text)
    for caller in allowed:
        answered = await client.request(method, path, json=body, headers=api.auth(caller))
        assert answered.status_code == 200, (caller, answered.text)


NESTED = b"[" * 5000 + b"]" * 5000


async def test_internal_apis_refuse_hostile_bodies_from_a_known_caller(
    retrieval_api: Api, inference_api: tuple[httpx.AsyncClient, Api]
) -> None:
    """A caller with a valid token is still held to the body rules: JSON nested too deep, or
    too large, is a 400 or 413 naming why, never a 500."""
    async with httpx.AsyncClient(timeout=30) as client:
        nested = await client.post(
            f"{retrieval_api.url}/v1/kb/search",
            content=NESTED,
            headers=retrieval_api.auth("router"),
        )
        huge = await client.post(
            f"{retrieval_api.url}/v1/kb/search",
            content=b'{"query": "' + b"x" * 100_000 + b'"}',
            headers=retrieval_api.auth("router"),
        )
    assert nested.status_code == 400, nested.text
    assert "nested" in nested.json()["error"]["message"]
    assert huge.status_code == 413, huge.text
    inference, api = inference_api
    deep = await inference.post("/v1/chat/completions", content=NESTED, headers=api.auth("router"))
    assert deep.status_code == 400, deep.text
    assert "nested" in deep.json()["error"]["message"]
