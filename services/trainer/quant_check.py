"""Does a quantized file still answer like the model it came from? The check that stands
between a fine-tuned model and its 4-bit export.

Both files are loaded in our engine. The reference answers every check prompt greedily;
on those answers (the tokens the model would actually produce, where a fine-tune's effect
lives), the quantized model is teacher-forced and compared position by position:

- ``kl``: mean KL(reference || quantized) of the next-token distributions, in nats;
- ``top1``: the share of positions where the quantized model's top token is the reference's;
- ``greedy_same``: the share of prompts the quantized model answers identically, token for
  token, on its own (reported, not gated: at 4 bits one early tie-break makes two whole
  answers differ while both are right, so it is too noisy to decide on).

The file passes when ``kl <= max_kl`` and ``top1 >= min_top1`` (:class:`Thresholds`).
Re-quantizing a LoRA fine-tune to 4 bits was seen to erase its effect while general text
still looked fine, which is why the check prompts should include the fine-tune's own
held-out prompts (a validation file), not only the general ones (:data:`GENERAL_PROMPTS`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

GENERAL_PROMPTS = (
    "What is the capital of France?",
    "Explain in two sentences why the sky is blue.",
    "Write a Python function that returns the square of a number.",
    "Give me three tips for writing a clear email.",
    "What is 12 times 7?",
    "Translate 'good morning' into Spanish.",
    "Summarise the water cycle in one sentence.",
    "What should I do if I forget my password?",
    "Name three planets of the solar system.",
    "How do I make a cup of tea?",
    "What is a large language model?",
    "Write a haiku about autumn.",
)
"""A fixed general set: everyday questions, arithmetic, code, a translation."""


@dataclass(frozen=True)
class Thresholds:
    """When a quantized file is close enough to its reference (see the module docstring)."""

    max_kl: float = 0.05
    min_top1: float = 0.9

    def __post_init__(self) -> None:
        if not self.max_kl > 0:
            raise ValueError(f"max_kl must be above 0; got {self.max_kl!r}")
        if not 0 < self.min_top1 <= 1:
            raise ValueError(f"min_top1 must be above 0 and at most 1; got {self.min_top1!r}")


@dataclass(frozen=True)
class QuantCheck:
    """The verdict on one quantized file against its reference."""

    prompts: int
    positions: int
    kl: float
    top1: float
    greedy_same: float
    thresholds: Thresholds

    @property
    def passed(self) -> bool:
        return (
            self.positions > 0
            and self.kl <= self.thresholds.max_kl
            and self.top1 >= self.thresholds.min_top1
        )

    def reasons(self) -> list[str]:
        """Why it failed (empty when it passed)."""
        why = [] if self.positions else ["no answer position was compared"]
        if self.kl > self.thresholds.max_kl:
            why.append(f"KL {self.kl:.4f} nats is above max_kl {self.thresholds.max_kl}")
        if self.top1 < self.thresholds.min_top1:
            floor = self.thresholds.min_top1
            why.append(f"top-1 agreement {self.top1:.1%} is below min_top1 {floor:.0%}")
        return why

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


def divergence(reference: Any, other: Any) -> tuple[float, int]:
    """Summed KL(reference || other) over positions and the count of positions whose top
    token agrees, from two log-probability tensors [positions, vocabulary]."""
    kl = (reference.exp() * (reference - other)).sum(-1)
    same = reference.argmax(-1) == other.argmax(-1)
    return float(kl.clamp_min(0).sum()), int(same.sum())


MAX_PROMPT_CHARS = 8_000  # a longer prompt of a job's file is left out of the check


def check_prompts(path: Path | None = None) -> list[list[dict[str, str]]]:
    """The check's conversations: :data:`GENERAL_PROMPTS`, then each row of ``path`` (an
    OpenAI fine-tuning JSONL, e.g. a job's validation file): a chat row up to its last
    assistant turn, a preference row's ``input.messages``; rows longer than
    :data:`MAX_PROMPT_CHARS` are left out.

    Raises:
        ValueError: ``path`` is not a fine-tuning file (the message names the line).
    """
    prompts = [[{"role": "user", "content": text}] for text in GENERAL_PROMPTS]
    if path is None:
        return prompts
    from shared.finetune_format import PreferenceRow, rows

    for _, _, row in rows(Path(path).read_bytes()):
        if isinstance(row, PreferenceRow):
            turns = list(row.prompt)
        else:
            messages = row.messages
            last = max((i for i, m in enumerate(messages) if m.role == "assistant"), default=0)
            turns = list(messages[:last])
        if turns and sum(len(m.content) for m in turns) <= MAX_PROMPT_CHARS:
            prompts.append([{"role": m.role, "content": m.content} for m in turns])
    return prompts


@dataclass
class LoadedFile:
    llama: Any
    tokenizer: Any


def load_file(path: Path, quant: str) -> LoadedFile:
    from services.inference.loading import build_llama
    from services.inference.model.gguf_model import load_gguf
    from services.inference.model.tokenizer import Tokenizer

    model = load_gguf(path)
    tokenizer = Tokenizer(model.tokenizer)
    return LoadedFile(build_llama(model, quant), tokenizer)


def greedy(
    loaded: LoadedFile, prompts: Sequence[Sequence[int]], max_tokens: int
) -> list[list[int]]:
    """Greedy answers (their end token included when they stopped), batched in one engine."""
    from services.inference.generation import EngineSettings, SamplingParams
    from services.inference.model.engine import Engine

    eos = loaded.tokenizer.eos_id

    async def run() -> list[list[int]]:
        engine = Engine(
            loaded.llama, loaded.tokenizer, EngineSettings(max_batch=16, max_wait_ms=50)
        )
        engine.start()
        params = SamplingParams(max_tokens=max_tokens, temperature=0)

        async def one(ids: Sequence[int]) -> list[int]:
            done = await engine.complete(ids, params)
            stopped = done.usage.completion_tokens > len(done.token_ids)
            return [*done.token_ids, eos] if stopped and eos is not None else list(done.token_ids)

        try:
            return list(await asyncio.gather(*(one(p) for p in prompts)))
        finally:
            engine.stop()

    return asyncio.run(run())


def forced_logprobs(loaded: LoadedFile, prompt: Sequence[int], answer: Sequence[int]) -> Any:
    """Log-probabilities [len(answer), V] of each answer position given what precedes it."""
    import torch

    llama = loaded.llama
    cache = llama.new_cache(1, len(prompt) + len(answer))
    rows = [llama.forward(torch.tensor([list(prompt)]), [0], cache)[0]]
    rows += [llama.forward(torch.tensor([[t]]), [0], cache)[0] for t in answer[:-1]]
    return torch.log_softmax(torch.stack(rows).float(), -1)


def run_check(
    reference: Path,
    candidate: Path,
    prompts: Sequence[Sequence[dict[str, str]]],
    *,
    thresholds: Thresholds | None = None,
    reference_quant: str = "auto",
    candidate_quant: str = "auto",
    max_tokens: int = 32,
) -> QuantCheck:
    """Compare ``candidate`` with ``reference`` on ``prompts`` (see the module docstring).

    ``reference_quant`` is how the reference is loaded: ``auto`` serves a file at its own
    precision; ``fp32`` keeps an F32 file exact (the float result of a training run).
    """
    import torch

    from services.inference.generation import EngineSettings

    ref = load_file(reference, reference_quant)
    encoded = [ref.tokenizer.encode(ref.tokenizer.render_chat(list(p))) for p in prompts]
    room = EngineSettings().max_seq_len - max_tokens  # a longer prompt is left out
    ids = [prompt for prompt in encoded if len(prompt) <= room]
    answers = greedy(ref, ids, max_tokens)
    cand = load_file(candidate, candidate_quant)
    own = greedy(cand, ids, max_tokens)
    kl_sum, same, positions = 0.0, 0, 0
    with torch.inference_mode():
        for prompt, answer in zip(ids, answers, strict=True):
            if not answer:
                continue
            kl, agree = divergence(
                forced_logprobs(ref, prompt, answer), forced_logprobs(cand, prompt, answer)
            )
            kl_sum, same, positions = kl_sum + kl, same + agree, positions + len(answer)
    identical = sum(a == b for a, b in zip(answers, own, strict=True))
    return QuantCheck(
        prompts=len(ids),
        positions=positions,
        kl=kl_sum / positions if positions else 0.0,
        top1=same / positions if positions else 1.0,
        greedy_same=identical / len(ids) if ids else 1.0,
        thresholds=thresholds or Thresholds(),
    )
