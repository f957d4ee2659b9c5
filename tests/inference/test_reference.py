"""Our engine against transformers on the same GGUF file: tokens and greedy output."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from services.inference.generation import SamplingParams
from services.inference.model.engine import Engine
from services.inference.model.gguf_model import smollm2_path
from services.inference.model.tokenizer import Tokenizer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "List three prime numbers above 1000 and explain 42+17.",
    "你好，请介绍一下你自己。",
    "def fibonacci(n):",
    "Translate 'good morning' into German, French and Spanish.",
]
NEW_TOKENS = 40


@pytest.fixture(scope="module")
def reference() -> tuple[Any, Any]:
    transformers = pytest.importorskip("transformers")  # a dev dependency; always present in CI
    path = smollm2_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model, tokenizer


@pytest.mark.parametrize("question", PROMPTS)
async def test_tokens_and_greedy_output_match_transformers(
    reference: tuple[Any, Any], engine: Engine, tokenizer: Tokenizer, question: str
) -> None:
    model, reference_tokenizer = reference
    text = tokenizer.render_chat([{"role": "user", "content": question}])
    ids = tokenizer.encode(text)
    assert ids == reference_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert text == reference_tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )

    with torch.inference_mode():
        expected = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False)[
            0, len(ids) :
        ].tolist()
    ours = await engine.complete(ids, SamplingParams(max_tokens=NEW_TOKENS, temperature=0))
    produced = list(ours.token_ids)
    if ours.finish_reason == "stop":
        produced.append(tokenizer.eos_id)  # transformers returns the end token too
    assert produced == expected[: len(produced)]
    assert len(produced) == len(expected)
