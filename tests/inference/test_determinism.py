"""Greedy output is bit-reproducible: alone or batched, whole prompt or after a prefix hit."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from services.inference.generation import EngineSettings, SamplingParams
from services.inference.model.engine import Engine
from services.inference.model.gguf_model import GgufModel
from services.inference.model.llama import Llama
from services.inference.model.quant import QuantMode
from services.inference.model.tokenizer import Tokenizer
from tests.inference.conftest import chat_ids

QUESTIONS = [
    "Count from 1 to 9.",
    "What is the capital of France?",
    "Write a haiku about autumn.",
    "Explain recursion to a child in one paragraph.",
    "List three uses of copper.",
    "Translate 'good morning' into Spanish and German.",
    "Why is the sky blue?",
    "Give me a name for a cat.",
]


@pytest.fixture(scope="module")
def int8_engine(gguf_model: GgufModel, tokenizer: Tokenizer) -> Iterator[Engine]:
    engine = Engine(
        Llama(gguf_model, QuantMode.INT8, keep_source=True),
        tokenizer,
        EngineSettings(max_batch=8, max_seq_len=512),
    )
    engine.start()
    yield engine
    engine.stop()


def test_int8_greedy_batched_equals_solo(int8_engine: Engine, tokenizer: Tokenizer) -> None:
    prompts = [chat_ids(tokenizer, q) for q in QUESTIONS]
    params = SamplingParams(max_tokens=40, temperature=0)

    async def solo() -> list[tuple[int, ...]]:
        return [(await int8_engine.complete(p, params)).token_ids for p in prompts]

    async def together() -> list[tuple[int, ...]]:
        done = await asyncio.gather(*(int8_engine.complete(p, params) for p in prompts))
        return [c.token_ids for c in done]

    alone = asyncio.run(solo())  # the second and later runs also hit the prefix cache
    assert asyncio.run(together()) == alone
    assert asyncio.run(together()) == alone
