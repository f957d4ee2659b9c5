"""Service tokens: made once and private, required in cluster mode, sent only to the mesh."""

from __future__ import annotations

import stat
from pathlib import Path

import httpx
import pytest

from services.audit.settings import AuditSettings
from shared.service_auth import (
    IDENTITIES,
    ServiceAuthError,
    ServiceGuard,
    ServiceTokenAuth,
    ensure_tokens,
    own_token,
)
from shared.settings import Mode, ServiceAuthSettings


def test_tokens_are_made_once_private_and_random(tmp_path: Path) -> None:
    directory = tmp_path / "run" / "service-tokens"
    ensure_tokens(directory)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    first = {name: (directory / f"{name}.token").read_text() for name in IDENTITIES}
    for name in IDENTITIES:
        assert stat.S_IMODE((directory / f"{name}.token").stat().st_mode) == 0o600
        assert len(first[name].strip()) == 64
    assert len(set(first.values())) == len(IDENTITIES)
    ensure_tokens(directory)  # a second `meshllm up` keeps them
    assert first == {name: (directory / f"{name}.token").read_text() for name in IDENTITIES}
    assert not [p for p in directory.iterdir() if p.name.startswith(".")]
    directory.chmod(0o755)  # an older or hand-made folder others may enter
    ensure_tokens(directory)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700


def test_embedded_mode_makes_the_tokens_it_needs(tmp_path: Path) -> None:
    settings = AuditSettings(data_dir=tmp_path, service_name="audit")
    token = own_token(settings)
    assert (tmp_path / "run" / "service-tokens" / "audit.token").read_text().strip() == token
    guard = ServiceGuard.load(settings, {"gateway"})
    gateway = (tmp_path / "run" / "service-tokens" / "gateway.token").read_text().strip()
    assert guard.identify(f"Bearer {gateway}") == "gateway"
    assert guard.identify(f"Bearer {token}") == "audit"
    assert guard.identify("Bearer " + "f" * 64) is None
    assert guard.identify(gateway) is None  # no scheme
    assert guard.identify(f"Basic {gateway}") is None


def test_cluster_mode_refuses_to_start_without_tokens(tmp_path: Path) -> None:
    settings = AuditSettings(data_dir=tmp_path, mode=Mode.CLUSTER, service_name="audit")
    with pytest.raises(ServiceAuthError, match="MESHLLM_SERVICE_AUTH__TOKEN"):
        own_token(settings)
    with pytest.raises(ServiceAuthError, match=r"MESHLLM_SERVICE_AUTH__TOKENS_DIR.*gateway"):
        ServiceGuard.load(settings, {"gateway"})
    assert not (tmp_path / "run").exists(), "cluster mode makes no tokens"
    short = settings.model_copy(update={"service_auth": ServiceAuthSettings(token="abc")})
    with pytest.raises(ServiceAuthError, match="at least 64"):
        own_token(short)


def test_split_tokens_give_each_service_its_own_file_and_the_digests(tmp_path: Path) -> None:
    ensure_tokens(tmp_path, split=True)
    digests = tmp_path / "digests"
    settings = AuditSettings(
        mode=Mode.CLUSTER,
        service_name="audit",
        service_auth=ServiceAuthSettings(
            token_file=tmp_path / "audit" / "audit.token", tokens_dir=digests
        ),
    )
    guard = ServiceGuard.load(settings, {"gateway"})
    gateway = (tmp_path / "gateway" / "gateway.token").read_text().strip()
    assert guard.identify(f"Bearer {gateway}") == "gateway"
    assert own_token(settings) == (tmp_path / "audit" / "audit.token").read_text().strip()
    assert sorted(p.name for p in digests.iterdir()) == sorted(f"{n}.sha256" for n in IDENTITIES)
    assert not list(digests.glob("*.token"))


async def test_the_token_goes_to_mesh_services_only() -> None:
    seen: dict[str, str | None] = {}

    def answer(request: httpx.Request) -> httpx.Response:
        seen[str(request.url)] = request.headers.get("authorization")
        return httpx.Response(200, json={})

    auth = ServiceTokenAuth("t" * 64, ["http://inference:8000", "http://retrieval:8091/"])
    transport = httpx.MockTransport(answer)
    async with httpx.AsyncClient(transport=transport, auth=auth) as client:
        await client.post("http://inference:8000/v1/chat/completions", json={})
        await client.post("http://retrieval:8091/v1/kb/search", json={})
        await client.post("http://vllm.example.com:8000/v1/chat/completions", json={})
        await client.post("http://inference:9000/v1/chat/completions", json={})
    assert seen == {
        "http://inference:8000/v1/chat/completions": "Bearer " + "t" * 64,
        "http://retrieval:8091/v1/kb/search": "Bearer " + "t" * 64,
        "http://vllm.example.com:8000/v1/chat/completions": None,
        "http://inference:9000/v1/chat/completions": None,
    }


async def test_the_router_keeps_its_token_from_pools_run_by_others(tmp_path: Path) -> None:
    from services.router.__main__ import service_auth
    from services.router.settings import PoolConfig, RagConfig, RouterSettings

    settings = RouterSettings(
        data_dir=tmp_path,
        pools=[
            PoolConfig(name="cpu", replicas=["http://inference:8000"]),
            PoolConfig(name="hosted", replicas=["https://llm.example.com"], service_token=False),
        ],
        rag=RagConfig(retrieval_url="http://retrieval:8091"),
    )
    seen: dict[str, str | None] = {}

    def answer(request: httpx.Request) -> httpx.Response:
        seen[request.url.host] = request.headers.get("authorization")
        return httpx.Response(200, json={})

    transport = httpx.MockTransport(answer)
    async with httpx.AsyncClient(transport=transport, auth=service_auth(settings)) as client:
        for url in ("http://inference:8000/v1/chat/completions",
                    "http://retrieval:8091/v1/kb/search",
                    "https://llm.example.com/v1/chat/completions"):  # fmt: skip
            await client.post(url, json={})
    router = (tmp_path / "run" / "service-tokens" / "router.token").read_text().strip()
    assert seen == {
        "inference": f"Bearer {router}",
        "retrieval": f"Bearer {router}",
        "llm.example.com": None,
    }


async def test_a_refused_gateway_identity_is_no_client_error() -> None:
    """When the audit service refuses the gateway's token (a misconfiguration), the client
    gets 503, not a 401 it would blame on its own API key."""
    from starlette.applications import Starlette

    from services.gateway.audit_routes import AuditRoutes
    from services.gateway.auth import Principal
    from shared.openai_protocol import OpenAIError
    from shared.policy.decision import Decision

    class Allow:
        async def aauthorize(self, access: object) -> Decision:
            return Decision(allow=True, reasons=("auditor",), max_tokens=None, priority="normal")

    async def record(*args: object) -> None:
        pass

    principal = Principal("ann", "acme", ("auditor",), "k1", "api_key")
    routes = AuditRoutes(
        service_url="http://audit:8090",
        authenticate=lambda request: principal,
        policy=Allow(),  # type: ignore[arg-type]
        record=record,
        headers={"Authorization": "Bearer " + "0" * 64},
    )
    refused = httpx.Response(401, json={"error": {"message": "token", "type": "x"}})
    routes._client = httpx.AsyncClient(transport=httpx.MockTransport(lambda r: refused))

    async def on_error(request: object, error: Exception) -> httpx.Response:
        from starlette.responses import JSONResponse

        assert isinstance(error, OpenAIError)
        return JSONResponse(error.to_dict(), status_code=error.status)  # type: ignore[return-value]

    app = Starlette(routes=routes.routes(), exception_handlers={OpenAIError: on_error})
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
        reply = await c.get("/v1/audit/records")
    assert reply.status_code == 503
    assert "service identity" in reply.json()["error"]["message"]
