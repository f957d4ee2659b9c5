"""HttpApi: a service's HTTP API listens, reports readiness, fails clearly on a taken port,
and on shutdown stops its background work and runs the service's own stop."""

from __future__ import annotations

import asyncio
import socket

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from shared.health import HealthState
from shared.http_server import HttpApi
from tests.conftest import poll_until

pytestmark = pytest.mark.timeout(60)


def app() -> Starlette:
    return Starlette(routes=[Route("/ping", lambda request: PlainTextResponse("pong"))])


async def test_serves_until_cancelled_then_stops_its_work() -> None:
    api = HttpApi(app(), name="test API", host="127.0.0.1", port=0, settings_hint="TEST_PORT")
    health = HealthState("test")
    api.report_readiness(health)
    assert health.readiness["http"]() == "HTTP not listening yet"
    background_cancelled = asyncio.Event()
    stopped: list[str] = []

    async def work() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            background_cancelled.set()
            raise

    async def on_stop() -> None:
        stopped.append("stopped")

    serving = asyncio.create_task(api.serve(background=[work()], on_stop=on_stop))
    await poll_until(lambda: api.started, message="listening")
    assert health.readiness["http"]() is None
    async with httpx.AsyncClient() as client:
        reply = await client.get(f"{api.url}/ping")
    assert reply.text == "pong"
    assert api.port > 0  # port 0 picked a free one
    serving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await serving
    assert background_cancelled.is_set()
    assert stopped == ["stopped"]


async def test_a_taken_port_fails_naming_the_settings() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        api = HttpApi(
            app(),
            name="test API",
            host="127.0.0.1",
            port=port,
            settings_hint="TEST_HOST, TEST_PORT",
        )
        refused = rf"test API cannot listen on 127.0.0.1:{port} \(TEST_HOST, TEST_PORT\)"
        with pytest.raises(RuntimeError, match=refused):
            await api.serve()
    with pytest.raises(RuntimeError, match="not listening yet"):
        _ = api.port
