"""What the serving layer needs from a text-generation engine, whichever backend runs it.

:class:`~services.inference.model.engine.Engine` (torch, CPU) and
:class:`~services.inference.vllm_engine.VllmEngine` (vLLM, GPU) both satisfy
:class:`TextEngine`; :mod:`services.inference.serve_app` uses nothing else.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from services.inference.generation import Delta, InvalidRequest, SamplingParams


@dataclass(frozen=True)
class EngineStats:
    """Counters since the engine started, and its cache use now (for metrics).

    A figure the backend does not know is 0 (``kv_capacity_tokens`` 0: unknown).
    """

    generated_tokens: int = 0
    prompt_tokens: int = 0  # computed in prefill (prefix-cache hits not included)
    steps: int = 0
    busy_s: float = 0.0  # time spent in steps: busy_s / steps is the mean step time
    kv_used_tokens: int = 0
    kv_capacity_tokens: int = 0
    prefix_lookups: int = 0
    prefix_hits: int = 0
    prefix_reused_tokens: int = 0


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

    def stats(self) -> EngineStats:
        """Its counters and cache use (read from any thread)."""
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
