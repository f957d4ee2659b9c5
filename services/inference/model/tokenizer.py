"""The tokenizer stored in a GGUF file, rebuilt as a fast ``tokenizers`` BPE tokenizer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from services.inference.model.gguf_model import ModelLoadError, TokenizerSpec

CONTROL_TOKEN = 3
# GGUF "pre" names whose pre-tokenizer is: single digits, then the GPT-2 byte-level regex.
DIGIT_SPLITTING_PRE = {"smollm", "default", "gpt-2", "gpt2"}


def _merge_pair(merge: str) -> tuple[str, str]:
    left, _, right = merge.partition(" ")
    return left, right


class Tokenizer:
    """Encodes text to token ids and back; renders chat messages with the model's template."""

    def __init__(self, spec: TokenizerSpec) -> None:
        from tokenizers import AddedToken, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as HfTokenizer

        if spec.model != "gpt2":
            raise ModelLoadError(f"tokenizer model {spec.model!r} is not supported (only gpt2 BPE)")
        vocab = {token: index for index, token in enumerate(spec.tokens)}
        merges = [_merge_pair(m) for m in spec.merges]
        bpe = HfTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if spec.pre in DIGIT_SPLITTING_PRE and spec.pre not in {"gpt-2", "gpt2"}:
            bpe.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Digits(individual_digits=True), byte_level]
            )
        else:
            bpe.pre_tokenizer = byte_level
        bpe.decoder = decoders.ByteLevel()
        specials = [
            AddedToken(token, special=True, normalized=False)
            for token, kind in zip(spec.tokens, spec.token_types, strict=False)
            if kind == CONTROL_TOKEN
        ]
        bpe.add_special_tokens(specials)
        self._tokenizer = bpe
        self.special_ids = {bpe.token_to_id(t.content) for t in specials}
        self.bos_id = spec.bos_id
        self.eos_id = spec.eos_id
        self.add_bos = spec.add_bos
        self.vocab_size = len(spec.tokens)
        self._chat_template = spec.chat_template
        self._compiled_template: Any = None  # compiled on first use (~5 ms; once, not per call)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = self._tokenizer.encode(text, add_special_tokens=False).ids
        if self.add_bos and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        text: str = self._tokenizer.decode(list(ids), skip_special_tokens=skip_special)
        return text

    def token_text(self, token_id: int) -> str:
        return self.decode([token_id], skip_special=False)

    def render_chat(
        self, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = True
    ) -> str:
        """The prompt the model was trained on for these messages (its own Jinja template)."""
        if not self._chat_template:
            raise ModelLoadError("this model has no chat template; use a completion prompt")
        if self._compiled_template is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            self._compiled_template = environment.from_string(self._chat_template)
        rendered: str = self._compiled_template.render(
            messages=list(messages), add_generation_prompt=add_generation_prompt
        )
        return rendered
