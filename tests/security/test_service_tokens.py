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
