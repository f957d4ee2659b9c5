"""A locally served gateway on the real broker, with the real router in front of a fake model.

The gateway is built as its process builds it (``build_gateway``: real API keys, policy,
limits, audit recorder) and served by uvicorn on a free port, so requests cross real HTTP.
Requests it admits travel over the broker to the real router, which answers them from the
fake OpenAI backend of ``tests/fakes`` (a test double for the inference service, whose own
tests run the real model). The audit and retrieval services behind ``/v1/audit/*`` and
``/v1/kb/*`` are a stub that answers every call with an empty JSON object: these tests are
about the gateway's own checks (the services' real answers are tested end to end in
``tests/e2e``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from services.gateway.__main__ import build_gateway
from services.gateway.app import Gateway
from services.gateway.auth import KeyStore
from services.gateway.limits import Limit
from services.gateway.settings import GatewaySettings
from services.router.__main__ import build as build_router
from services.router.settings import PoolConfig, RouterSettings
from shared.bus import Bus
from shared.bus.embedded import free_port
from shared.health import HealthState
from shared.http_server import HttpApi
from tests.conftest import poll_until
from tests.fakes.openai_backend import FakeBackend

MODEL = "smollm2-135m-instruct"
TENANT = "edge-tests"  # its own tenant: what the fuzzer ingests reaches no other test
BODY_TIMEOUT_S = 1.0
KEY_RPM, KEY_TPM = 1, 50_000
"""The allowance of a key made by :meth:`Edge.new_key`: one request a minute."""


@dataclass
class Edge:
    url: str
    gateway: Gateway
    keys: dict[str, str]
    keys_db: Path
    fake: FakeBackend
    services_url: str
    """Where the stub of the audit and retrieval services listens."""

    def new_key(self, roles: tuple[str, ...] = ("user",)) -> tuple[str, str]:
        """A fresh key (id, secret) allowed KEY_RPM requests and KEY_TPM tokens a minute."""
        with KeyStore(self.keys_db) as store:
            record, secret = store.create(TENANT, roles, rpm=KEY_RPM, tpm=KEY_TPM)
        return record.key_id, secret

    async def budget_untouched(self, key_id: str) -> bool:
        """Whether the key's whole minute (its request and every token) is still there.

        Asking the gateway's own rate limiter for the full allowance charges it when it is
        there, so a key is checked once.
        """
        wait = await self.gateway.rate_limiter.admit(
            key_id, TENANT, Limit(KEY_RPM, KEY_TPM), Limit(None, None), KEY_TPM
        )
        return wait is None


@pytest.fixture(scope="module")
async def edge(
    kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Edge]:
    data = tmp_path_factory.mktemp("edge")
    keys_db = data / "gateway" / "keys.sqlite"
    with KeyStore(keys_db) as store:
        keys = {
            "user": store.create(TENANT, ["user"])[1],
            "admin": store.create(TENANT, ["admin"])[1],
            "auditor": store.create(TENANT, ["auditor"])[1],
            "developer": store.create(TENANT, ["developer"])[1],
        }
    services = HttpApi(_services_stub(), name="services stub", host="127.0.0.1", port=0,
                       settings_hint="-")  # fmt: skip
    stub = asyncio.create_task(services.serve())
    await poll_until(lambda: services.started, 30, message="services stub listening")
    settings = GatewaySettings(
        kafka={"bootstrap": kafka_bootstrap},
        data_dir=data,
        request_timeout_s=20,
        limits={"body_timeout_s": BODY_TIMEOUT_S, "default_rpm": 100_000,
                "default_tpm": 100_000_000, "tenant_rpm": 1_000_000,
                "tenant_tpm": 1_000_000_000},
        audit={"service_url": services.url},
        kb={"service_url": services.url},
    )  # fmt: skip
    with FakeBackend(free_port()) as fake:
        router_settings = RouterSettings(
            kafka={"bootstrap": kafka_bootstrap},
            data_dir=data,
            pools=[PoolConfig(name="cpu", replicas=[fake.url])],
            replica_cooldown_s=1,
            rag={"retrieval_url": services.url},
        )
        router_bus = Bus(router_settings, service="router")
        await build_router(router_settings, router_bus, HealthState(service="router"))
        bus = Bus(settings, service="gateway")
        gateway = build_gateway(settings, bus)
        gateway.audit.start()
        server = HttpApi(gateway.app(), name="gateway", host="127.0.0.1", port=0, settings_hint="-")
        await router_bus.start()
        await bus.start()
        serving = asyncio.create_task(server.serve())
        try:
            await poll_until(lambda: bus.ready and router_bus.ready, 60, message="buses ready")
            await poll_until(lambda: server.started, 30, message="gateway listening")
            yield Edge(server.url, gateway, keys, keys_db, fake, services.url)
        finally:
            serving.cancel()
            stub.cancel()
            await asyncio.gather(serving, stub, return_exceptions=True)
            await gateway.audit.stop()
            await bus.stop()
            await router_bus.stop()


def _services_stub() -> Starlette:
    async def answer(request: Request) -> Response:
        # a search finds nothing; every other call gets an empty object
        return JSONResponse({"hits": []} if request.url.path == "/v1/kb/search" else {})

    return Starlette(routes=[Route("/{path:path}", answer, methods=["GET", "POST", "DELETE"])])
