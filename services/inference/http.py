"""The inference service's HTTP face on Ray's proxy: OpenAI routes to the chat replica
it runs in and the embeddings deployment's handle, behind the mesh's service identity.

The routes are a Starlette application like every other service's. Ray's proxy hands the
ingress deployment a request and expects a response back, so :func:`asgi_response` runs
the application on the request and streams what it sends as that response.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Collection
from typing import Any, Protocol

from ray.serve.handle import DeploymentHandle
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message

from shared.http_body import read_json_body
from shared.logging import get_logger
from shared.openai_protocol import (
    InvalidRequestError,
    ModelNotFoundError,
    OpenAIError,
    RouteNotFoundError,
)
from shared.service_auth import ServiceGuard

log = get_logger(__name__)

Endpoint = Callable[[Request], Awaitable[Response]]
MAX_BODY_BYTES = 8 * 2**20
"""Largest body taken (the router sends what the gateway took, at most 1 MiB by default)."""
BODY_TIMEOUT_S = 30.0


class ChatBackend(Protocol):
    """The generation calls the routes make, in the process that serves them (no handle
    between: a token reaches the HTTP stream without another hop between actors)."""

    async def chat(self, request: dict[str, Any]) -> dict[str, Any]: ...

    def chat_stream(self, request: dict[str, Any]) -> AsyncGenerator[dict[str, Any], None]: ...

    async def complete(self, request: dict[str, Any]) -> dict[str, Any]: ...

    def complete_stream(self, request: dict[str, Any]) -> AsyncGenerator[dict[str, Any], None]: ...

    async def models(self) -> dict[str, Any]: ...


class HttpFrontend:
    """OpenAI routes onto a chat backend and the embeddings deployment's handle.

    Every route needs a mesh service identity (``Authorization: Bearer <token>``, see
    :mod:`shared.service_auth`), checked before the body is read: generation and
    ``/v1/models`` the router's, embeddings the router's or the retrieval service's; 401
    without a known token, 403 for another service.
    """

    GENERATION_CALLERS = frozenset({"router"})
    EMBEDDING_CALLERS = frozenset({"router", "retrieval"})

    def __init__(
        self,
        chat: ChatBackend,
        embeddings: DeploymentHandle[Any] | None,
        guard: ServiceGuard,
    ) -> None:
        self.chat = chat
        self.embeddings = embeddings
        self.guard = guard
        generation = self.GENERATION_CALLERS
        self.app = Starlette(
            routes=[
                Route(
                    "/v1/chat/completions",
                    self._guarded(generation, self._generate("chat", "chat_stream")),
                    methods=["POST"],
                ),
                Route(
                    "/v1/completions",
                    self._guarded(generation, self._generate("complete", "complete_stream")),
                    methods=["POST"],
                ),
                Route(
                    "/v1/embeddings",
                    self._guarded(self.EMBEDDING_CALLERS, self._embed),
                    methods=["POST"],
                ),
                Route("/v1/models", self._guarded(generation, self._models), methods=["GET"]),
            ],
            exception_handlers={OpenAIError: _error_response, 404: _not_found, 405: _not_allowed},
        )

    @classmethod
    def callers(cls) -> frozenset[str]:
        """Every service some route accepts."""
        return cls.GENERATION_CALLERS | cls.EMBEDDING_CALLERS

    async def handle(self, request: Request) -> Response:
        """The response to one HTTP request; errors become OpenAI error bodies."""
        return await asgi_response(self.app, request)

    def _guarded(self, callers: Collection[str], endpoint: Endpoint) -> Endpoint:
        async def guarded(request: Request) -> Response:
            self.guard.check(request.headers, callers)
            try:
                return await endpoint(request)
            except OpenAIError:
                raise
            except Exception as error:  # told as a 500 without its details, logged whole
                log.exception("request failed", error=f"{type(error).__name__}: {error}")
                raise InternalError(f"internal error ({type(error).__name__})") from None

        return guarded

    def _generate(self, method: str, stream_method: str) -> Endpoint:
        async def generate(request: Request) -> Response:
            body = await _json(request)
            if isinstance(body, dict) and body.get("stream") is True:
                return await _stream(getattr(self.chat, stream_method)(body))
            return JSONResponse(await getattr(self.chat, method)(body))

        return generate

    async def _embed(self, request: Request) -> Response:
        if self.embeddings is None:
            raise ModelNotFoundError("no embedding model is deployed")
        return JSONResponse(await self.embeddings.embed.remote(await _json(request)))

    async def _models(self, request: Request) -> Response:
        return JSONResponse(await self.chat.models())


class InternalError(OpenAIError):
    """500: something failed that the caller cannot mend; the log has the details."""


async def asgi_response(app: ASGIApp, request: Request) -> Response:
    """Run ``app`` on ``request`` and return what it answers as one streaming response.

    The body streams as ``app`` sends it; when the response's consumer stops reading (the
    client went away), ``app`` is cancelled, so a generation behind it stops too.
    """
    messages: asyncio.Queue[Message] = asyncio.Queue(maxsize=64)  # the app waits for a reader

    async def send(message: Message) -> None:
        await messages.put(message)

    running = asyncio.ensure_future(app(request.scope, request.receive, send))
    next_message = asyncio.ensure_future(messages.get())
    try:
        await asyncio.wait({running, next_message}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # the caller went away before the answer began: stop the work
        running.cancel()
        next_message.cancel()
        raise
    if not next_message.done():  # the app ended without answering: its error is ours
        next_message.cancel()
        running.result()
        raise RuntimeError("the HTTP application ended without a response")
    start = next_message.result()

    async def body() -> AsyncIterator[bytes]:
        try:
            while True:
                message = await messages.get()
                if message["type"] != "http.response.body":
                    continue
                if message.get("body"):
                    yield message["body"]
                if not message.get("more_body"):
                    return
        finally:
            if not running.done():
                running.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await running

    response = StreamingResponse(body(), status_code=start["status"])
    response.raw_headers = list(start.get("headers", []))
    return response


async def _json(request: Request) -> Any:
    return await read_json_body(request, MAX_BODY_BYTES, BODY_TIMEOUT_S)


async def _stream(chunks: AsyncGenerator[dict[str, Any], None]) -> Response:
    try:
        first = await anext(chunks)  # request errors become a plain JSON error
    except StopAsyncIteration:
        first = None

    async def events() -> AsyncIterator[bytes]:
        try:
            if first is not None:
                yield _sse(first)
                async for chunk in chunks:
                    yield _sse(chunk)
        except Exception as error:
            yield _sse(_error_body(error))
        finally:
            await chunks.aclose()  # the client went away: the generation stops
        yield _sse("[DONE]")

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _sse(item: dict[str, Any] | str) -> bytes:
    payload = item if isinstance(item, str) else json.dumps(item, ensure_ascii=False)
    return f"data: {payload}\n\n".encode()


def _error_body(error: BaseException) -> dict[str, Any]:
    if isinstance(error, OpenAIError):
        return error.to_dict()
    log.error("stream failed", error=f"{type(error).__name__}: {error}")
    return InternalError(f"internal error ({type(error).__name__})").to_dict()


async def _error_response(request: Request, error: Exception) -> Response:
    assert isinstance(error, OpenAIError)
    return JSONResponse(error.to_dict(), status_code=error.status)


async def _not_found(request: Request, error: Exception) -> Response:
    missing = RouteNotFoundError(f"no route {request.method} {request.url.path}", None, "not_found")
    return await _error_response(request, missing)


async def _not_allowed(request: Request, error: Exception) -> Response:
    refused = InvalidRequestError(f"{request.url.path} does not take {request.method}")
    return JSONResponse(refused.to_dict(), status_code=405)
