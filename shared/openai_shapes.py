"""The shapes of OpenAI chat and completion answers: whole bodies, stream chunks, usage.

One builder for the two places that make them: the inference service (from engine
deltas) and the gateway (from the mesh's reply events). Both give the same ids, objects
and fields, so a client sees the same answer whichever it talks to.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Literal

Kind = Literal["chat", "completion"]


class OpenAIShapes:
    """The ids and shapes of one chat or completion response.

    Args:
        kind: ``chat`` or ``completion``.
        suffix: what follows ``chatcmpl-`` / ``cmpl-`` in the response id.
        model: the ``model`` the response names.
        fingerprint: ``system_fingerprint``, where the server has one.
    """

    def __init__(self, kind: str, suffix: str, model: str, fingerprint: str | None = None) -> None:
        self.kind = kind
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + suffix
        self.created = int(time.time())
        self.model = model
        self.fingerprint = fingerprint

    @property
    def object(self) -> str:
        return "chat.completion" if self.kind == "chat" else "text_completion"

    @property
    def chunk_object(self) -> str:
        return "chat.completion.chunk" if self.kind == "chat" else "text_completion"

    def envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        """The fields every body and chunk of this response carries."""
        body: dict[str, Any] = {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
        }
        if self.fingerprint is not None:
            body["system_fingerprint"] = self.fingerprint
        body["choices"] = choices
        return body

    def choice(self, index: int, text: str, finish: str | None) -> dict[str, Any]:
        """One choice of a whole answer."""
        if self.kind == "chat":
            return {
                "index": index,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish,
            }
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}

    def response(
        self, choices: Sequence[tuple[int, str, str | None]], usage: dict[str, int]
    ) -> dict[str, Any]:
        """A whole answer: ``choices`` as (index, text, finish reason)."""
        body = self.envelope(self.object, [self.choice(*choice) for choice in choices])
        body["usage"] = usage
        return body

    def chunk(
        self, index: int, text: str | None, finish: str | None = None, *, role: bool = False
    ) -> dict[str, Any]:
        """A stream chunk of choice ``index``: ``text`` (None: none), its finish reason, and
        for chat the assistant's role (a stream's first chunk of a choice)."""
        if self.kind == "completion":
            choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
            return self.envelope(self.chunk_object, [choice])
        delta: dict[str, Any] = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        return self.envelope(self.chunk_object, [choice])

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        """The chunk with no choices that carries the usage (``stream_options``)."""
        return {**self.envelope(self.chunk_object, []), "usage": usage}
