"""Choosing the next token from logits (the parameters: :mod:`services.inference.generation`)."""

from __future__ import annotations

import torch

from services.inference.generation import SamplingParams


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
