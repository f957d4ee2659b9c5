"""What a generation request and its output are, for every engine: sampling parameters, the
engine's batching settings, the deltas it streams, and the text assembly from tokens.

No torch here (nor anything that imports it): settings, the engine protocol and the vLLM
engine use these types without loading the CPU engine's model code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from services.inference.model.tokenizer import Tokenizer


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


@dataclass(frozen=True)
class EngineSettings:
    max_batch: int = 16
    max_wait_ms: float = 2.0
    max_tokens_in_flight: int = 32_768
    max_seq_len: int = 2048
    stuck_after_s: float = 30.0
    prefix_cache_mb: float = 128.0  # 0 turns the prefix (L1) cache off
    prefix_block: int = 32  # also the prefill chunk
    threads: int = 0  # torch threads of the engine's worker thread; 0: torch's own setting
    fault_step_delay_ms: float = 0.0  # fault injection: each step takes this much longer


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Delta:
    """A piece of one sequence's output; the last one has ``finish_reason`` and ``usage``."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None = None
    usage: Usage | None = None

    @staticmethod
    def joined(deltas: Sequence[Delta]) -> Delta:
        """One delta for consecutive ``deltas`` of a sequence (the last one's finish)."""
        if len(deltas) == 1:
            return deltas[0]
        last = deltas[-1]
        ids = tuple(token for delta in deltas for token in delta.token_ids)
        return Delta("".join(d.text for d in deltas), ids, last.finish_reason, last.usage)


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str
    usage: Usage


class TextAssembler:
    """Turns tokens into text deltas: whole UTF-8 characters only, stop strings cut out.

    Text that could be the start of a stop string is held back until it is known not
    to be one, so a stop string never reaches the caller, not even in part.

    Each token costs the same however long the text: only the tokens since the text last
    ended on a whole character are decoded (a byte-level BPE decodes piece by piece at such
    a boundary exactly as it decodes the whole), and stop strings are looked for only in
    text not yet emitted (one cannot start before it: that text would have been held).
    Decoding everything again at every token made a 1,000-token answer cost ~500,000
    token decodes.
    """

    def __init__(self, tokenizer: Tokenizer, stops: Sequence[str]) -> None:
        self._tokenizer = tokenizer
        self._stops = tuple(stops)
        self._pending: list[int] = []  # tokens whose bytes do not end a character yet
        self._text = ""
        self._emitted = 0

    def add(self, token_id: int) -> tuple[str, bool]:
        """Return (new text, whether a stop string ended the output)."""
        self._pending.append(token_id)
        piece = self._tokenizer.decode(self._pending)
        if piece.endswith("\ufffd"):
            return "", False  # a multi-byte character is not complete yet
        self._pending.clear()
        self._text += piece
        text = self._text
        found = (text.find(s, self._emitted) for s in self._stops)
        cut = min((i for i in found if i >= 0), default=-1)
        if cut >= 0:
            delta = text[self._emitted : cut]
            self._emitted = cut
            return delta, True
        hold = max(
            (k for s in self._stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0
        )
        safe = len(text) - hold
        delta = text[self._emitted : safe] if safe > self._emitted else ""
        self._emitted = max(self._emitted, safe)
        return delta, False

    def flush(self) -> str:
        delta = self._text[self._emitted :]
        self._emitted = len(self._text)
        return delta
