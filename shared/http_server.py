"""An HTTP API served inside a mesh service's lifetime (uvicorn, driven by the service).

The gateway, audit and retrieval services each serve an ASGI app beside their bus
subscribers. :class:`HttpApi` runs it the way :func:`shared.service.serve` expects a
service's work to run: it listens until cancelled, then stops taking connections,
finishes the open requests and runs the service's own shutdown, and a port it cannot bind
fails the service with the setting to change instead of exiting the process.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine, Generator, Iterable
from typing import Any

import uvicorn

from shared.health import HealthState
from shared.logging import get_logger

log = get_logger("shared.http_server")


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the service's shutdown drives it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class HttpApi:
    """One ASGI app on ``host:port`` for the lifetime of a service."""

    def __init__(
        self,
        app: Any,
        *,
        name: str,
        host: str,
        port: int,
        settings_hint: str,
        graceful_shutdown_s: float | None = None,
    ) -> None:
        """
        Args:
            app: the ASGI application.
            name: what is listening, for logs and errors ("gateway", "audit API").
            host, port: where to listen; port 0 picks a free one (see :attr:`port`).
            settings_hint: the settings that choose host and port, named when the port
                cannot be bound.
            graceful_shutdown_s: how long open requests may take to finish at shutdown;
                None waits for them.
        """
        self.name = name
        self.host = host
        self.settings_hint = settings_hint
        self._server = _Server(
            uvicorn.Config(
                app,
                host=host,
                port=port,
                log_level="warning",
                # uvicorn's own handlers would print plain text past the PII and credential
                # filters of our logging
                log_config=None,
                lifespan="off",
                timeout_graceful_shutdown=(
                    None if graceful_shutdown_s is None else max(1, int(graceful_shutdown_s))
                ),
            )
        )

    @property
    def started(self) -> bool:
        return bool(self._server.started)

    @property
    def port(self) -> int:
        """The port listened on (the one picked, when configured as 0)."""
        if not self._server.started:
            raise RuntimeError(f"the {self.name} is not listening yet")
        return int(self._server.servers[0].sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def report_readiness(self, health: HealthState) -> None:
        """Not ready until the port is bound."""
        health.readiness["http"] = lambda: None if self.started else "HTTP not listening yet"

    async def serve(
        self,
        *,
        background: Iterable[Coroutine[Any, Any, None]] = (),
        on_stop: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Serve, with the ``background`` work beside it, until cancelled or the server
        fails; then stop listening, finish open requests, cancel the background work and
        await ``on_stop``, in that order.

        Raises:
            RuntimeError: the port cannot be bound (the message names ``settings_hint``).
        """
        tasks = [asyncio.create_task(work) for work in background]
        listening = asyncio.create_task(self._listen(), name=self.name)
        try:
            while not self._server.started and not listening.done():
                await asyncio.sleep(0.05)
            if self._server.started:
                log.info(f"{self.name} listening", url=self.url)
            await asyncio.shield(listening)
        finally:
            self._server.should_exit = True
            await asyncio.gather(listening, return_exceptions=True)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if on_stop is not None:
                await on_stop()

    async def _listen(self) -> None:
        try:
            await self._server.serve()
        except SystemExit:  # uvicorn exits the process when it cannot bind
            raise RuntimeError(
                f"the {self.name} cannot listen on {self.host}:{self._server.config.port} "
                f"({self.settings_hint})"
            ) from None
