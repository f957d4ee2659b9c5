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


@pytest.fixture(scope="module", params=["int8", "auto"], ids=["int8", "int4-default"])
def quantized_engine(
    request: pytest.FixtureRequest, gguf_model: GgufModel, tokenizer: Tokenizer
) -> Iterator[Engine]:
    """An engine on int8 weights, or on the service's default ("auto": int4 for Q4_1)."""
    llama = Llama(gguf_model, request.param, keep_source=True)
    if request.param == "auto":
        assert llama.quant == QuantMode.INT4  # the bundled file's precision, as served
    engine = Engine(llama, tokenizer, EngineSettings(max_batch=8, max_seq_len=512))
    engine.start()
    yield engine
    engine.stop()


def test_quantized_greedy_batched_equals_solo(
    quantized_engine: Engine, tokenizer: Tokenizer
) -> None:
    prompts = [chat_ids(tokenizer, q) for q in QUESTIONS]
    params = SamplingParams(max_tokens=40, temperature=0)

    async def solo() -> list[tuple[int, ...]]:
        return [(await quantized_engine.complete(p, params)).token_ids for p in prompts]

    async def together() -> list[tuple[int, ...]]:
        done = await asyncio.gather(*(quantized_engine.complete(p, params) for p in prompts))
        return [c.token_ids for c in done]

    alone = asyncio.run(solo())  # the second and later runs also hit the prefix cache
    assert asyncio.run(together()) == alone
    assert asyncio.run(together()) == alone


def test_quantized_seeded_sampling_batched_equals_solo(
    quantized_engine: Engine, tokenizer: Tokenizer
) -> None:
    """A seeded sample repeats among other requests too: what a re-run after a crash needs."""
    prompts = [chat_ids(tokenizer, q) for q in QUESTIONS[:4]]
    params = [SamplingParams(max_tokens=24, temperature=0.9, seed=11 + i) for i in range(4)]

    async def solo() -> list[tuple[int, ...]]:
        return [
            (await quantized_engine.complete(p, s)).token_ids
            for p, s in zip(prompts, params, strict=True)
        ]

    async def together() -> list[tuple[int, ...]]:
        done = await asyncio.gather(
            *(quantized_engine.complete(p, s) for p, s in zip(prompts, params, strict=True))
        )
        return [c.token_ids for c in done]

    alone = asyncio.run(solo())
    assert len(set(alone)) == len(alone)  # really sampled: different prompts, different text
    assert asyncio.run(together()) == alone
