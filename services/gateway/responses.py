"""OpenAI response bodies and stream chunks built from the router's replies."""

from __future__ import annotations

import base64
import struct
from typing import Any

from shared.events.v1 import events_pb2 as ev
from shared.logging import get_logger
from shared.openai_protocol import OpenAIError
from shared.openai_shapes import OpenAIShapes

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
        """The chunks that end a stream before ``[DONE]``: finish reasons, sources, usage."""
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
