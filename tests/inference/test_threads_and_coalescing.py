"""How many threads the engine runs, and how its stream hands out tokens that are ready
together: as one delta, with the same text and token ids, and never later than one."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import pytest
import torch

from services.inference.generation import Delta, EngineSettings, SamplingParams, Usage
from services.inference.model.engine import Engine
from services.inference.model.llama import Llama
from services.inference.model.tokenizer import Tokenizer
from services.inference.settings import InferenceSettings, available_cpus
from shared.settings import load_settings
from tests.conftest import poll_until
from tests.inference.conftest import chat_ids

pytestmark = pytest.mark.timeout(300)
GREEDY = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)


def test_torch_threads_default_to_the_cpus_this_process_may_use(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("MESHLLM_TORCH_THREADS", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # as Ray sets it for a 1-CPU replica
    settings = load_settings(InferenceSettings)
    assert settings.torch_threads == 0
    assert settings.engine_threads() == available_cpus() == len(os.sched_getaffinity(0))
    assert settings.engine.engine_settings(threads=settings.engine_threads()).threads == (
        available_cpus()
    )


def test_torch_threads_can_be_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHLLM_TORCH_THREADS", "3")
    assert load_settings(InferenceSettings).engine_threads() == 3


def test_embeddings_run_one_thread_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MESHLLM_EMBEDDING_THREADS", raising=False)
    settings = load_settings(InferenceSettings)
    assert settings.embedding_threads == 1
    assert settings.serve.embeddings_num_cpus < 1


def test_the_engine_thread_runs_the_threads_it_is_given(llama: Llama, tokenizer: Tokenizer) -> None:
    try:
        engine = Engine.launch(
            lambda: llama, tokenizer, EngineSettings(max_batch=1, max_seq_len=64, threads=1)
        )
        try:
            assert engine.threads == 1  # read on the engine's own thread
        finally:
            engine.stop()
    finally:
        torch.set_num_threads(2)  # what the other inference tests run


def test_joined_deltas_keep_text_ids_and_the_last_finish() -> None:
    pieces = [
        Delta("Hel", (1,)),
        Delta("", (2,)),
        Delta("lo é", (3, 4)),
        Delta("!", (5,), "length", Usage(3, 5)),
    ]
    joined = Delta.joined(pieces)
    assert joined == Delta("Hello é!", (1, 2, 3, 4, 5), "length", Usage(3, 5))
    assert Delta.joined(pieces[:1]) is pieces[0]


async def test_a_slow_reader_gets_the_ready_tokens_together_text_unchanged(
    engine: Engine, tokenizer: Tokenizer
) -> None:
    prompt = chat_ids(tokenizer, "Tell me about the sea.")
    whole = await engine.complete(prompt, GREEDY)
    deltas = []
    async for delta in engine.stream(prompt, GREEDY):
        deltas.append(delta)
        if len(deltas) == 1:  # the reader is away while the engine makes 5 more tokens
            target = engine.steps + 5
            await poll_until(lambda: engine.steps >= target, message="5 engine steps")  # noqa: B023
    assert len(deltas[1].token_ids) >= 5  # the tokens made meanwhile came as one delta
    assert len(deltas) < GREEDY.max_tokens
    assert "".join(d.text for d in deltas) == whole.text
    assert tuple(t for d in deltas for t in d.token_ids) == whole.token_ids
    assert deltas[-1].finish_reason == "length"
    assert [d.finish_reason for d in deltas[:-1]] == [None] * (len(deltas) - 1)


async def test_a_reader_that_keeps_up_gets_each_token_at_once(
    engine: Engine, tokenizer: Tokenizer
) -> None:
    prompt = chat_ids(tokenizer, "Tell me about the sea.")
    deltas = [delta async for delta in engine.stream(prompt, GREEDY)]
    # the reader waits on the queue: a token is handed out alone, as soon as it exists
    # (loosely counted: a loaded machine may let two pile up now and then)
    assert sum(len(d.token_ids) for d in deltas) == GREEDY.max_tokens
    assert len(deltas) > GREEDY.max_tokens // 2


# ------------------------------------------------------------------ pacing streams


async def _paced_from(
    items: list[tuple[int, Delta]], interval_s: float, gap_s: float = 0.0
) -> list[tuple[int, Delta]]:
    from services.inference.merging import paced

    async def source() -> AsyncIterator[tuple[int, Delta]]:
        for item in items:
            yield item
            await asyncio.sleep(gap_s)

    return [item async for item in paced(source(), interval_s)]


def _token(text: str, finish: str | None = None) -> Delta:
    return Delta(text, (len(text),), finish, None)


async def test_a_paced_stream_sends_the_first_text_at_once_and_gathers_the_rest() -> None:
    items = [(0, _token(word)) for word in ("a", "b", "c", "d")] + [(0, _token("e", "stop"))]
    out = await _paced_from(items, interval_s=60.0)
    assert [delta.text for _, delta in out] == ["a", "bcde"]
    assert out[-1][1].finish_reason == "stop"
    assert out[-1][1].token_ids == (1, 1, 1, 1)


async def test_pacing_keeps_each_choice_apart_and_loses_nothing() -> None:
    items = [(i % 2, _token(str(i))) for i in range(9)]
    out = await _paced_from(items, interval_s=60.0)
    for index in (0, 1):
        text = "".join(d.text for i, d in out if i == index)
        assert text == "".join(str(i) for i in range(9) if i % 2 == index)
    assert next(d.text for i, d in out if i == 0) == "0"  # first of each choice at once
    assert next(d.text for i, d in out if i == 1) == "1"


async def test_no_interval_sends_every_token() -> None:
    items = [(0, _token(word)) for word in ("a", "b", "c")]
    out = await _paced_from(items, interval_s=0.0)
    assert [delta.text for _, delta in out] == ["a", "b", "c"]


async def test_tokens_slower_than_the_interval_are_not_held() -> None:
    items = [(0, _token(word)) for word in ("a", "b", "c")]
    out = await _paced_from(items, interval_s=0.001, gap_s=0.01)
    assert [delta.text for _, delta in out] == ["a", "b", "c"]
