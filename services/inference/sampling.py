"""Sampling parameters, their validation, and choosing the next token from logits."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class InvalidRequest(ValueError):
    """A request the engine refuses; ``param`` names the field at fault."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param
        self.message = message


MAX_STOP_STRINGS = 4
MAX_STOP_LENGTH = 128


@dataclass(frozen=True)
class SamplingParams:
    """OpenAI-style sampling. ``temperature`` 0 is greedy decoding (deterministic)."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    # Keep going past the end-of-text token (benchmarks need a fixed output length).
    ignore_eos: bool = False

    def validate(self, max_tokens_limit: int) -> None:
        """Raise :class:`InvalidRequest` naming the first bad field."""
        if not 1 <= self.max_tokens <= max_tokens_limit:
            raise InvalidRequest(
                "max_tokens", f"must be between 1 and {max_tokens_limit}, got {self.max_tokens}"
            )
        if not 0.0 <= self.temperature <= 2.0:
            raise InvalidRequest("temperature", f"must be in [0, 2], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequest("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidRequest("top_k", f"must be 0 (off) or positive, got {self.top_k}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise InvalidRequest("seed", f"must be in [0, 2^63), got {self.seed}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidRequest("stop", f"at most {MAX_STOP_STRINGS} stop strings")
        for stop in self.stop:
            if not stop or len(stop) > MAX_STOP_LENGTH:
                raise InvalidRequest(
                    "stop", f"each stop string must have 1 to {MAX_STOP_LENGTH} characters"
                )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def needs_only_best(self, best: int) -> bool:
        """Whether picking a token needs only the ``best`` highest logits, not all of them."""
        return self.greedy or 0 < self.top_k <= best


class Sampler:
    """Picks tokens for one sequence; seeded sequences are reproducible."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self._generator: torch.Generator | None = None
        if not params.greedy:
            self._generator = torch.Generator()
            if params.seed is not None:
                self._generator.manual_seed(params.seed)
            else:
                self._generator.seed()

    def pick(self, logits: torch.Tensor) -> int:
        """``logits``: [V] for this sequence's next position."""
        p = self.params
        if p.greedy:
            return int(logits.argmax())
        scores = logits.float() / p.temperature
        if p.top_k:
            kth = torch.topk(scores, min(p.top_k, scores.numel())).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            cumulative = sorted_probs.cumsum(0)
            # keep the smallest prefix whose mass reaches top_p (always at least one token)
            drop = cumulative - sorted_probs >= p.top_p
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            choice = int(torch.multinomial(sorted_probs, 1, generator=self._generator))
            return int(order[choice])
        return int(torch.multinomial(probs, 1, generator=self._generator))
