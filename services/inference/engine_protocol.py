"""What the serving layer needs from a text-generation engine, whichever backend runs it.

:class:`~services.inference.model.engine.Engine` (torch, CPU) and
:class:`~services.inference.vllm_engine.VllmEngine` (vLLM, GPU) both satisfy
:class:`TextEngine`; :mod:`services.inference.serve_app` uses nothing else.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Protocol

from services.inference.generation import Delta, InvalidRequest, SamplingParams


class TextEngine(Protocol):
    """A running engine that streams completions of token-id prompts."""

    @property
    def max_seq_len(self) -> int:
        """Prompt + completion tokens one sequence may have."""
        ...

    @property
    def active(self) -> int:
        """Sequences being generated now."""
        ...

    @property
    def waiting(self) -> int:
        """Sequences accepted but not generating yet."""
        ...

    def start(self) -> None:
        """Start serving (blocking until the engine takes requests)."""
        ...

    def stop(self) -> None:
        """Stop serving; requests still in flight fail."""
        ...

    def stuck(self) -> str | None:
        """Why the engine is unhealthy, or None when it is fine."""
        ...

    def check(self, prompt: Sequence[int], params: SamplingParams) -> None:
        """Raise :class:`InvalidRequest` naming the field if this request can never run."""
        ...

    def stream(self, prompt: Sequence[int], params: SamplingParams) -> AsyncIterator[Delta]:
        """An async generator of the completion's deltas; the last one has ``finish_reason``.

        Closing it early (``aclose``) cancels the sequence in the engine.
        """
        ...


def check_request(prompt: Sequence[int], params: SamplingParams, max_seq_len: int) -> None:
    """Raise :class:`InvalidRequest` if ``prompt`` with ``params`` cannot fit ``max_seq_len``."""
    params.validate(max_seq_len - 1)
    if not prompt:
        raise InvalidRequest("prompt", "is empty")
    if len(prompt) + params.max_tokens > max_seq_len:
        raise InvalidRequest(
            "max_tokens" if len(prompt) < max_seq_len else "prompt",
            f"the prompt has {len(prompt)} tokens; with max_tokens {params.max_tokens} "
            f"it exceeds the context length of {max_seq_len} tokens",
        )
