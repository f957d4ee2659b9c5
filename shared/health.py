"""Liveness, readiness and metrics over HTTP, on a port of their own in every service.

``GET /healthz`` answers 200 while the event loop runs and no component has failed;
``GET /readyz`` answers 200 once every readiness check passes, 503 (with the
failing checks) otherwise. Both return JSON. ``GET /metrics`` answers the service's
metrics in Prometheus' text format (:mod:`shared.metrics`); it is here and not on a
service's API port because its labels name tenants and models.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field

Check = Callable[[], str | None]
"""Returns None when fine, else a short reason."""


@dataclass
class HealthState:
    service: str
    liveness: dict[str, Check] = field(default_factory=dict)
    readiness: dict[str, Check] = field(default_factory=dict)

    def report(self, checks: dict[str, Check]) -> tuple[bool, dict[str, str]]:
        results = {}
        for name, check in checks.items():
            try:
                problem = check()
            except Exception as error:
                problem = f"check raised {type(error).__name__}: {error}"
            results[name] = problem or "ok"
        return all(v == "ok" for v in results.values()), results


class HealthServer:
    def __init__(
        self,
        state: HealthState,
        host: str,
        port: int,
        *,
        metrics: Callable[[], bytes] | None = None,
    ) -> None:
        self._state = state
        self._metrics = metrics
        self._host = host
        self._port = port
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self._host, self._port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
            parts = request_line.decode(errors="replace").split()
            path = parts[1] if len(parts) >= 2 else ""
            status, content_type, payload = self._answer(parts[0] if parts else "", path)
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
                + payload
            )
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    def _answer(self, method: str, path: str) -> tuple[str, str, bytes]:
        """(status line, content type, body) for one request."""
        if method != "GET":
            return _json("405 Method Not Allowed", {"error": "only GET is served"})
        route = path.split("?", maxsplit=1)[0]
        if route == "/metrics" and self._metrics is not None:
            try:
                return "200 OK", PROMETHEUS_TEXT, self._metrics()
            except Exception as error:  # a collector's bug must not take the port down
                return _json("500 Internal Server Error", {"error": f"metrics: {error}"})
        checks = {"/healthz": self._state.liveness, "/readyz": self._state.readiness}.get(route)
        if checks is None:
            paths = "/healthz, /readyz" + (" or /metrics" if self._metrics else "")
            return _json("404 Not Found", {"error": f"no such path {path[:200]!r}; try {paths}"})
        ok, results = self._state.report(checks)
        body: dict[str, object] = {
            "service": self._state.service,
            "status": "ok" if ok else "failing",
            "checks": results,
        }
        return _json("200 OK" if ok else "503 Service Unavailable", body)


PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


def _json(status: str, body: dict[str, object]) -> tuple[str, str, bytes]:
    return status, "application/json", json.dumps(body).encode()
