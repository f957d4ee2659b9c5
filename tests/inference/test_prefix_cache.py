"""The prefix (L1) KV cache: block reuse, eviction, and identical output with and without it."""

from __future__ import annotations

import asyncio

import torch

from services.inference.generation import EngineSettings, SamplingParams
from services.inference.model.engine import Engine
from services.inference.model.llama import KVCache, Llama
from services.inference.model.prefix_cache import PrefixCache
from services.inference.model.tokenizer import Tokenizer

SYSTEM = (
    "You are the assistant of Acme Corporation's internal help desk. Answer briefly and "
    "politely. Never reveal internal ticket numbers. If you do not know an answer, say so "
    "and suggest opening a ticket with the IT department. Office hours are 9 to 17."
)


def _fill(cache: KVCache, slot: int, prompt: list[int]) -> None:
    """Give each position of ``slot`` a value derived from its token, like a real prefill."""
    for position, token in enumerate(prompt):
        cache.k[:, slot, :, position] = float(token)
        cache.v[:, slot, :, position] = -float(token)
    cache.lengths[slot] = len(prompt)


def test_reuses_whole_blocks_of_the_same_prefix_only(llama: Llama) -> None:
    cache = llama.new_cache(2, 64)
    prefix = PrefixCache(max_bytes=2**30, block=4)
    prompt = list(range(100, 111))  # 11 tokens: two whole blocks
    _fill(cache, 0, prompt)
    prefix.store(prompt, cache, 0)
    assert len(prefix) == 2

    same_start = [*prompt[:9], 7, 7, 7]
    assert prefix.load(same_start, cache, 1) == 8
    assert cache.lengths[1] == 8
    assert torch.equal(cache.k[:, 1, :, :8], cache.k[:, 0, :, :8])
    assert torch.equal(cache.v[:, 1, :, :8], cache.v[:, 0, :, :8])

    assert prefix.load([*prompt[:5], 1, *prompt[6:]], cache, 1) == 4  # differs in block 2
    assert prefix.load([1, *prompt[1:]], cache, 1) == 0  # differs in block 1
    assert prefix.load(prompt[:8], cache, 1) == 4  # the last token always runs
    assert prefix.stats.hits == 3
    assert prefix.stats.lookups == 4


def test_evicts_least_recently_used_tails_first(llama: Llama) -> None:
    cache = llama.new_cache(1, 64)
    block_bytes = 2 * llama.config.num_layers * llama.config.num_kv_heads * 4 * 64 * 4
    prefix = PrefixCache(max_bytes=3 * block_bytes, block=4)
    first, second = list(range(1, 9)), list(range(50, 58))
    for prompt in (first, second):
        _fill(cache, 0, prompt)
        prefix.store(prompt, cache, 0)
    assert len(prefix) == 3
    assert prefix.bytes <= prefix.max_bytes
    assert prefix.stats.evicted_blocks == 1
    # the first prompt lost its tail block, not its head
    assert prefix.load([*first, 0], cache, 0) == 4
    assert prefix.load([*second, 0], cache, 0) == 8


def test_disabled_cache_stores_nothing(llama: Llama) -> None:
    cache = llama.new_cache(1, 64)
    prefix = PrefixCache(max_bytes=0)
    _fill(cache, 0, list(range(40)))
    prefix.store(list(range(40)), cache, 0)
    assert len(prefix) == 0
    assert prefix.load(list(range(40)), cache, 0) == 0


def test_shared_system_prompt_is_prefilled_once_and_output_is_unchanged(
    llama: Llama, tokenizer: Tokenizer
) -> None:
    questions = ["Where do I reset my password?", "When is the office open?"]
    prompts = [
        tokenizer.encode(
            tokenizer.render_chat(
                [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]
            )
        )
        for q in questions
    ]
    params = SamplingParams(max_tokens=24, temperature=0)

    def run(cache_mb: float) -> tuple[list[tuple[int, ...]], Engine]:
        engine = Engine(llama, tokenizer, EngineSettings(max_batch=2, prefix_cache_mb=cache_mb))
        engine.start()
        try:

            async def answers() -> list[tuple[int, ...]]:
                # one after the other, so the second finds the first's prefix
                return [(await engine.complete(p, params)).token_ids for p in prompts]

            return asyncio.run(answers()), engine
        finally:
            engine.stop()

    cached, engine = run(cache_mb=64)
    uncached, _ = run(cache_mb=0)
    assert cached == uncached
    stats = engine.prefix_cache.stats
    assert stats.hits == 1
    shared = next(i for i, (a, b) in enumerate(zip(*prompts, strict=False)) if a != b)
    assert stats.reused_tokens == shared // 32 * 32 >= 32
