"""A fake OpenAI-compatible model server: a test double for the router's pools.

Answers chat, completion and embedding requests with deterministic text, streaming
or not, at a configurable pace, and can be told to fail. It stands beside the real
inference service in the tests (which also run the real path) and is the fixed
backend of the gateway/router overhead benchmark.

    python -m tests.fakes.openai_backend --port 9100 --token-delay-ms 0
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog"]


@dataclass
class Behaviour:
    """What the fake does; tests change it while it runs."""

    token_delay_s: float = 0.0
    fail_status: int | None = None  # answer every request with this status
    break_after: int | None = None  # drop the connection after this many chunks
    reject_message: str = "bad request"
    words: list[str] = field(default_factory=lambda: list(WORDS))  # the answer cycles these
    max_words: int | None = None  # answer with at most this many words, whatever max_tokens
    calls: int = 0
    cancelled: int = 0
    completed: int = 0
    in_flight: int = 0  # streams being generated now (a freed slot shows here)
    bodies: list[dict[str, Any]] = field(default_factory=list)
    unserved: set[str] = field(default_factory=set)  # model names answered with a 404


def reply_words(
    body: dict[str, Any], words: list[str] = WORDS, max_words: int | None = None
) -> list[str]:
    """The answer: ``max_tokens`` words (default 8, at most ``max_words``) cycling through
    ``words``."""
    count = int(body.get("max_tokens") or 8)
    if max_words is not None:
        count = min(count, max_words)
    return [words[i % len(words)] + " " for i in range(count)]


def build_app(behaviour: Behaviour) -> Starlette:
    async def generate(request: Request) -> Response:
        body = await request.json()
        behaviour.calls += 1
        behaviour.bodies.append(body)
        if body.get("model") in behaviour.unserved:
            error = {
                "message": f"version of {body['model']!r} is registered but not served now",
                "type": "invalid_request_error",
                "code": "model_not_found",
                "param": "model",
            }
            return JSONResponse({"error": error}, status_code=404)
        if behaviour.fail_status is not None:
            error = {"message": behaviour.reject_message, "type": "invalid_request_error"}
            if behaviour.fail_status >= 500:
                error = {"message": "replica exploded", "type": "server_error"}
            return JSONResponse({"error": error}, status_code=behaviour.fail_status)
        chat = request.url.path.endswith("/chat/completions")
        words = reply_words(body, behaviour.words, behaviour.max_words)
        model = str(body.get("model") or "fake")
        n = int(body.get("n") or 1)
        usage = {"prompt_tokens": 5, "completion_tokens": len(words) * n,
                 "total_tokens": 5 + len(words) * n}  # fmt: skip
        if not body.get("stream"):
            await asyncio.sleep(behaviour.token_delay_s * len(words))
            behaviour.completed += 1
            text = "".join(words)
            choices = [
                {"index": i, "message": {"role": "assistant", "content": text},
                 "finish_reason": "length"} if chat else
                {"index": i, "text": text, "finish_reason": "length"}
                for i in range(n)
            ]  # fmt: skip
            return JSONResponse({"id": "fake", "object": "chat.completion", "model": model,
                                 "choices": choices, "usage": usage})  # fmt: skip

        async def events() -> AsyncIterator[str]:
            sent = 0
            behaviour.in_flight += 1
            try:
                for position, word in enumerate(words):
                    for index in range(n):
                        if behaviour.break_after is not None and sent >= behaviour.break_after:
                            raise ConnectionError("fake replica dropped the stream")
                        finish = "length" if position == len(words) - 1 else None
                        choice = (
                            {"index": index, "delta": {"content": word}, "finish_reason": finish}
                            if chat
                            else {"index": index, "text": word, "finish_reason": finish}
                        )
                        chunk = {"id": "fake", "model": model, "choices": [choice]}
                        yield f"data: {json.dumps(chunk)}\n\n"
                        sent += 1
                    if behaviour.token_delay_s:
                        await asyncio.sleep(behaviour.token_delay_s)
                last = {"id": "fake", "model": model, "choices": [], "usage": usage}
                yield f"data: {json.dumps(last)}\n\n"
                yield "data: [DONE]\n\n"
                behaviour.completed += 1
            except asyncio.CancelledError:
                behaviour.cancelled += 1
                raise
            finally:
                behaviour.in_flight -= 1

        return StreamingResponse(events(), media_type="text/event-stream")

    async def embeddings(request: Request) -> Response:
        body = await request.json()
        behaviour.calls += 1
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        data = [
            {"object": "embedding", "index": i, "embedding": [float(len(text)), 1.0, 0.5]}
            for i, text in enumerate(inputs)
        ]
        usage = {"prompt_tokens": len(inputs), "total_tokens": len(inputs)}
        return JSONResponse({"object": "list", "data": data, "model": "fake-embed", "usage": usage})

    return Starlette(
        routes=[
            Route("/v1/chat/completions", generate, methods=["POST"]),
            Route("/v1/completions", generate, methods=["POST"]),
            Route("/v1/embeddings", embeddings, methods=["POST"]),
        ]
    )


class FakeBackend:
    """The fake served by uvicorn on a thread of its own, for in-process tests."""

    def __init__(self, port: int, behaviour: Behaviour | None = None) -> None:
        self.behaviour = behaviour or Behaviour()
        self.url = f"http://127.0.0.1:{port}"
        config = uvicorn.Config(
            build_app(self.behaviour), host="127.0.0.1", port=port, log_level="warning"
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def __enter__(self) -> FakeBackend:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise TimeoutError("the fake backend did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--token-delay-ms", type=float, default=0.0)
    args = parser.parse_args()
    behaviour = Behaviour(token_delay_s=args.token_delay_ms / 1000)
    uvicorn.run(build_app(behaviour), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
