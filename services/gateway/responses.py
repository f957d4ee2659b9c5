"""What the gateway answers: OpenAI bodies and stream chunks from the router's replies, a
strict tenant's stream, and its errors (OpenAI's error shape, never an internal detail)."""

from __future__ import annotations

import base64
import json
import struct
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from services.gateway.relay import Diverged
from shared.events.v1 import events_pb2 as ev
from shared.logging import get_logger
from shared.openai_protocol import OpenAIError, RateLimitError, ServiceUnavailableError
from shared.openai_shapes import OpenAIShapes

if TYPE_CHECKING:
    from services.gateway.admission import Admitted

log = get_logger(__name__)

# FinalReply.error.type -> HTTP status (OpenAI's statuses for these error types)
STATUS_OF_TYPE = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "rate_limit_error": 429,
    "timeout": 504,
    "server_error": 502,
}


class ReplyError(OpenAIError):
    """An error the router reported for a request, with the status its type maps to.

    A refusal of the request (4xx) is told as the mesh gave it. A failure of the mesh (5xx)
    is told by its code and ``request_id`` only: the router's message names replicas and
    services by their internal addresses, so it is logged here instead.
    """

    def __init__(self, info: ev.ErrorInfo, request_id: str | None = None) -> None:
        error_type = info.type or "server_error"
        status = STATUS_OF_TYPE.get(error_type, 502)
        if info.code == "model_not_found":
            status = 404
        message = info.message or "the request failed"
        if status >= 500:
            log.warning("the mesh failed a request", request_id=request_id, code=info.code,
                        error=message)  # fmt: skip
            message = f"the mesh could not answer ({info.code or error_type})"
            if request_id:
                message += f"; request id {request_id}"
        super().__init__(message, info.param or None, info.code or None)
        self.error_type = error_type  # type: ignore[misc]
        self.status = status  # type: ignore[misc]


def model_name(reply: ev.FinalReply) -> str:
    return f"{reply.model}:{reply.model_version}" if reply.model_version else reply.model


class ResponseBuilder:
    """One chat or completion response from the mesh's reply events, in OpenAI's shapes
    (:class:`~shared.openai_shapes.OpenAIShapes`), with the sources of a RAG answer."""

    def __init__(self, kind: str, request_id: str, model: str) -> None:
        self.shapes = OpenAIShapes(kind, request_id, model)

    def whole(self, reply: ev.FinalReply) -> dict[str, Any]:
        self.shapes.model = model_name(reply) or self.shapes.model
        choices = [(c.index, c.text, c.finish_reason) for c in reply.choices]
        body = self.shapes.response(choices, usage(reply))
        if reply.citations:
            body["citations"] = citations(reply)
        return body

    def chunk(
        self, index: int, text: str | None, finish: str | None = None, *, role: bool = False
    ) -> dict[str, Any]:
        return self.shapes.chunk(index, text, finish, role=role)

    def ending(self, reply: ev.FinalReply, *, include_usage: bool) -> list[dict[str, Any]]:
        """The chunks that end a stream before ``[DONE]``: finish reasons, sources, usage.

        They name the version that answered (``name:version``, as a whole response does):
        the content chunks before them went out before the reply said which it was."""
        self.shapes.model = model_name(reply) or self.shapes.model
        chunks = [self.chunk(c.index, None, c.finish_reason or "stop") for c in reply.choices]
        if reply.citations:  # an extension: a chunk with no choices carries the sources
            chunks.append({**self.shapes.envelope("chat.completion.chunk", []),
                           "citations": citations(reply)})  # fmt: skip
        if include_usage:
            chunks.append(self.shapes.usage_chunk(usage(reply)))
        return chunks


def citations(reply: ev.FinalReply) -> list[dict[str, Any]]:
    """The sources of a RAG answer: ``[n]`` in the answer is the n-th entry (from 1)."""
    return [
        {
            "index": number,
            "document_id": c.document_id,
            "title": c.title,
            "collection": c.collection,
            "chunk_id": c.chunk_id,
            "score": round(float(c.score), 6),
        }
        for number, c in enumerate(reply.citations, start=1)
    ]


def usage(reply: ev.FinalReply) -> dict[str, int]:
    prompt, completion = reply.usage.prompt_tokens, reply.usage.completion_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def embeddings_body(reply: ev.FinalReply, encoding_format: str = "float") -> dict[str, Any]:
    """OpenAI's embeddings response; ``base64``: each vector's little-endian float32 bytes."""

    def vector(values: Any) -> list[float] | str:
        if encoding_format == "base64":
            return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()
        return list(values)

    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": e.index, "embedding": vector(e.values)}
            for e in reply.embeddings
        ],
        "model": model_name(reply),
        "usage": {
            "prompt_tokens": reply.usage.prompt_tokens,
            "total_tokens": reply.usage.prompt_tokens,
        },
    }


class StreamDiverged(OpenAIError):
    """A re-run after a failure mid-stream did not repeat the text already sent."""

    status = 502
    error_type = "server_error"


def audit_failure(error: BaseException, request_id: str = "") -> ServiceUnavailableError:
    # the reason names spool files and broker addresses: logged, not told
    log.error("audit record not durable", error=f"{type(error).__name__}: {error}")
    failure = ServiceUnavailableError(
        "the answer is withheld because its audit record could not be stored; retry later"
    )
    failure.request_id = request_id  # type: ignore[attr-defined]
    return failure


def diverged_error(item: Diverged) -> StreamDiverged:
    log.warning(
        "a re-run diverged from the streamed text; the stream ends",
        choice=item.choice_index,
        sent_chars=len(item.sent),
    )
    return StreamDiverged(
        "the answer was interrupted: a replica failed mid-stream and its re-run did not "
        "repeat the text already sent; discard the partial answer and retry",
        None,
        "stream_diverged",
    )


async def strict_stream(
    admitted: Admitted, reply: ev.FinalReply, body: dict[str, Any]
) -> AsyncIterator[str]:
    """A strict tenant's stream: the whole answer at once, after its record is durable."""
    builder = ResponseBuilder(admitted.kind, admitted.request_id, admitted.event.model)
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    for choice in reply.choices:
        if admitted.kind == "chat":
            yield sse(builder.chunk(choice.index, "", role=True))
        if choice.text:
            yield sse(builder.chunk(choice.index, choice.text))
    for payload in builder.ending(reply, include_usage=include_usage):
        yield sse(payload)
    yield "data: [DONE]\n\n"


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


async def error_response(request: Request, error: Exception) -> Response:
    assert isinstance(error, OpenAIError)
    headers = {"retry-after": str(error.retry_after)} if isinstance(error, RateLimitError) else {}
    trace_id = getattr(error, "trace_id", None)
    if trace_id:
        headers["x-trace-id"] = trace_id
    request_id = getattr(error, "request_id", None) or getattr(request.state, "request_id", None)
    if request_id:  # an admitted request's error names it, as its answer would
        headers["x-request-id"] = request_id
    return JSONResponse(error.to_dict(), status_code=error.status, headers=headers)


async def not_found(request: Request, error: Exception) -> Response:
    body = {"error": {"message": f"no route {request.url.path}", "type": "invalid_request_error",
                      "param": None, "code": "not_found"}}  # fmt: skip
    return JSONResponse(body, status_code=404)


async def not_allowed(request: Request, error: Exception) -> Response:
    body = {"error": {"message": f"{request.method} is not allowed on {request.url.path}",
                      "type": "invalid_request_error", "param": None, "code": None}}  # fmt: skip
    return JSONResponse(body, status_code=405)


async def internal_error(request: Request, error: Exception) -> Response:
    """A failure no handler expected: logged in full, told only with the request id."""
    request_id = getattr(request.state, "request_id", None) or uuid.uuid4().hex
    log.error(
        "request failed", request_id=request_id, path=request.url.path,
        error=f"{type(error).__name__}: {error}", exc_info=error,
    )  # fmt: skip
    body = {"error": {"message": f"internal error; request id {request_id}",
                      "type": "server_error", "param": None, "code": None}}  # fmt: skip
    return JSONResponse(body, status_code=500, headers={"x-request-id": request_id})
