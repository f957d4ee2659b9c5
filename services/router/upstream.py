"""Calls into an inference replica over its OpenAI-compatible HTTP API, always streaming.

The router speaks to every pool the same way (our Ray Serve ingress, vLLM's server, or
any OpenAI-compatible server), so a pool is just a list of base URLs.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
from opentelemetry import propagate


class ReplicaFailed(Exception):
    """The replica could not answer (connection, 5xx, a broken stream): try another."""


class UpstreamRejected(Exception):
    """The replica refused the request itself (4xx): retrying elsewhere will not help."""

    def __init__(self, status: int, error: dict[str, Any]) -> None:
        super().__init__(error.get("message", f"HTTP {status}"))
        self.status = status
        self.error = error


@dataclass
class Piece:
    """Text for one choice, as it arrives."""

    index: int
    text: str
    finish_reason: str | None = None


@dataclass
class StreamEnd:
    model: str = ""
    usage: dict[str, int] = field(default_factory=dict)
    system_fingerprint: str | None = None


async def stream_generation(
    client: httpx.AsyncClient, base_url: str, path: str, body: dict[str, Any]
) -> AsyncIterator[Piece | StreamEnd]:
    """POST ``body`` with ``stream: true`` and yield the pieces, then one :class:`StreamEnd`.

    Raises:
        ReplicaFailed: the replica is unreachable, answered 5xx, or the stream broke.
        UpstreamRejected: the replica answered 4xx (the request itself is at fault).
    """
    end = StreamEnd()
    headers: dict[str, str] = {}
    propagate.inject(headers)  # the replica continues this trace
    try:
        async with client.stream("POST", base_url + path, json=body, headers=headers) as response:
            if response.status_code >= 400:
                raw = await response.aread()
                error = _error_of(raw, response.status_code)
                if response.status_code >= 500 or response.status_code == 429:
                    raise ReplicaFailed(f"HTTP {response.status_code}: {error.get('message')}")
                raise UpstreamRejected(response.status_code, error)
            finished = False
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    finished = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    raise ReplicaFailed(f"stream error: {chunk['error']}")
                end.model = chunk.get("model", end.model)
                end.system_fingerprint = chunk.get("system_fingerprint", end.system_fingerprint)
                if chunk.get("usage"):
                    end.usage = chunk["usage"]
                for choice in chunk.get("choices", ()):
                    delta = choice.get("delta")
                    text = (delta or {}).get("content") if delta is not None else choice.get("text")
                    yield Piece(
                        int(choice.get("index", 0)), text or "", choice.get("finish_reason")
                    )
            if not finished:
                raise ReplicaFailed("the stream ended without [DONE]")
    except httpx.HTTPError as error:
        raise ReplicaFailed(f"{type(error).__name__}: {error}") from error
    yield end


async def embed(client: httpx.AsyncClient, base_url: str, body: dict[str, Any]) -> dict[str, Any]:
    """POST ``/v1/embeddings``; the parsed response.

    Raises:
        ReplicaFailed, UpstreamRejected: as :func:`stream_generation`.
    """
    headers: dict[str, str] = {}
    propagate.inject(headers)
    try:
        response = await client.post(base_url + "/v1/embeddings", json=body, headers=headers)
    except httpx.HTTPError as error:
        raise ReplicaFailed(f"{type(error).__name__}: {error}") from error
    if response.status_code >= 400:
        problem = _error_of(response.content, response.status_code)
        if response.status_code >= 500 or response.status_code == 429:
            raise ReplicaFailed(f"HTTP {response.status_code}: {problem.get('message')}")
        raise UpstreamRejected(response.status_code, problem)
    result: dict[str, Any] = response.json()
    return result


def _error_of(raw: bytes, status: int) -> dict[str, Any]:
    try:
        body = json.loads(raw)
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict):
            return error
        if isinstance(body, dict) and "detail" in body:
            return {"message": str(body["detail"]), "type": "invalid_request_error"}
    except ValueError:
        pass
    return {"message": raw.decode(errors="replace")[:500] or f"HTTP {status}"}
