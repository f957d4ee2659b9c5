"""How many threads the engine runs, and how its stream hands out tokens that are ready
together: as one delta, with the same text and token ids, and never later than one."""

from __future__ import annotations

import os

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
