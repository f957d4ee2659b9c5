"""Liveness and readiness over HTTP for services that have no web server of their own.

``GET /healthz`` answers 200 while the event loop runs and no component has failed;
``GET /readyz`` answers 200 once every readiness check passes, 503 (with the
failing checks) otherwise. Both return JSON.
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
    def __init__(self, state: HealthState, host: str, port: int) -> None:
        self._state = state
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
            status, body = self._answer(parts[0] if parts else "", path)
            payload = json.dumps(body).encode()
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
                + payload
            )
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    def _answer(self, method: str, path: str) -> tuple[str, dict[str, object]]:
        if method != "GET":
            return "405 Method Not Allowed", {"error": "only GET is served"}
        checks = {"/healthz": self._state.liveness, "/readyz": self._state.readiness}.get(
            path.split("?", maxsplit=1)[0]
        )
        if checks is None:
            return "404 Not Found", {"error": f"no such path {path!r}; try /healthz or /readyz"}
        ok, results = self._state.report(checks)
        body: dict[str, object] = {
            "service": self._state.service,
            "status": "ok" if ok else "failing",
            "checks": results,
        }
        return ("200 OK" if ok else "503 Service Unavailable"), body
