"""Request bodies as every HTTP API of the mesh reads them: within a size and a time limit,
as strict JSON of bounded depth, each way of failing a 4xx naming what is wrong."""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

from starlette.requests import Request

from shared.openai_protocol import InvalidRequestError, RequestTimeoutError, RequestTooLargeError

MAX_JSON_DEPTH = 32


async def read_json_body(request: Request, limit: int, timeout_s: float) -> Any:
    """A request's body as JSON, read within ``limit`` bytes and ``timeout_s`` seconds.

    Raises:
        RequestTooLargeError: 413, over ``limit`` (declared or read).
        RequestTimeoutError: 408, not all there within ``timeout_s``.
        InvalidRequestError: 400, not JSON (NaN and Infinity are not), or nested deeper
            than MAX_JSON_DEPTH.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestTooLargeError(f"the request body is larger than {limit} bytes")
    try:
        async with asyncio.timeout(timeout_s):
            raw = await _read_body(request, limit)
    except TimeoutError:
        raise RequestTimeoutError(
            f"the request body did not arrive within {timeout_s:g} s", None, "request_timeout"
        ) from None
    return parse_json(raw)


async def _read_body(request: Request, limit: int) -> bytes:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestTooLargeError(f"the request body is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_json(raw: bytes) -> Any:
    """``raw`` as strict JSON nested at most MAX_JSON_DEPTH deep.

    Raises:
        InvalidRequestError: 400, with the parser's reason.
    """
    try:
        value = json.loads(raw, parse_constant=_refuse_constant)
    except RecursionError:
        raise InvalidRequestError(f"the body is nested deeper than {MAX_JSON_DEPTH}") from None
    except ValueError as error:
        raise InvalidRequestError(f"the body is not valid JSON ({error})") from None
    pending: list[tuple[Any, int]] = [(value, 1)]
    while pending:  # iterative: the depth check must not recurse either
        item, depth = pending.pop()
        children = (
            item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        )
        for child in children:
            if isinstance(child, dict | list):
                if depth >= MAX_JSON_DEPTH:
                    raise InvalidRequestError(f"the body is nested deeper than {MAX_JSON_DEPTH}")
                pending.append((child, depth + 1))
            elif isinstance(child, float) and not math.isfinite(child):
                raise InvalidRequestError("the body has a number out of range")
    return value
