"""The CPU engine on the real SmolLM2 model: answers, batching, sampling, limits."""

from __future__ import annotations

import asyncio
import random
import threading

import pytest

from services.inference.generation import (
    EngineSettings,
    InvalidRequest,
    SamplingParams,
    TextAssembler,
)
from services.inference.model.engine import Engine
from services.inference.model.gguf_model import GgufModel
from services.inference.model.llama import Llama
from services.inference.model.quant import HEAD_REFINE_TOP
from services.inference.model.tokenizer import Tokenizer
from tests.conftest import poll_until
from tests.inference.conftest import chat_ids

pytestmark = pytest.mark.timeout(300)
GREEDY = SamplingParams(max_tokens=24, temperature=0)


async def test_greedy_answer_is_sensible(engine: Engine, tokenizer: Tokenizer) -> None:
    completion = await engine.complete(
        chat_ids(tokenizer, "What is the capital of France?"), GREEDY
    )
    assert "Paris" in completion.text
    assert completion.finish_reason == "stop"
    assert completion.usage.completion_tokens == len(completion.token_ids) + 1  # + end token


@pytest.mark.parametrize("quant", ["int8", "int4"])
async def test_quantized_models_answer_the_same_question(
    quant: str, gguf_model: GgufModel, tokenizer: Tokenizer
) -> None:
    # The bare question is a near tie for this model ("The" leads "L" by 0.08 nats in
    # fp32, and int4 answers "L'Étoile, ..."); asking for a sentence leaves a wide margin.
    question = "What is the capital of France? Answer in one sentence."
    built_on: list[threading.Thread] = []

    def build() -> Llama:
        built_on.append(threading.current_thread())
        return Llama(gguf_model, quant, keep_source=True)

    engine = Engine.launch(build, tokenizer, EngineSettings(max_batch=2))
    assert built_on == [engine._thread]  # built on the thread that runs it: one OpenMP team
    try:
        completion = await engine.complete(chat_ids(tokenizer, question), GREEDY)
    finally:
        engine.stop()
    assert "Paris" in completion.text


async def test_streaming_yields_pieces_that_add_up(engine: Engine, tokenizer: Tokenizer) -> None:
    prompt = chat_ids(tokenizer, "What is the capital of France?")
    pieces = [delta async for delta in engine.stream(prompt, GREEDY)]
    assert len([p for p in pieces if p.text]) > 3
    assert pieces[-1].finish_reason == "stop"
    whole = await engine.complete(prompt, GREEDY)
    assert "".join(p.text for p in pieces) == whole.text


async def test_sixteen_concurrent_streams_equal_their_solo_runs(
    engine: Engine, tokenizer: Tokenizer
) -> None:
    prompts = [chat_ids(tokenizer, f"Give me one fact about the number {i}.") for i in range(16)]
    solo = [await engine.complete(p, GREEDY) for p in prompts]
    together = await asyncio.gather(*(engine.complete(p, GREEDY) for p in prompts))
    for alone, batched in zip(solo, together, strict=True):
        assert batched.token_ids == alone.token_ids
    assert len({c.text for c in together}) > 8  # different prompts, different answers


async def test_seeded_sampling_is_reproducible(engine: Engine, tokenizer: Tokenizer) -> None:
    prompt = chat_ids(tokenizer, "Write a short poem about the sea.")
    params = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, top_k=50, seed=7)
    first = await engine.complete(prompt, params)
    again = await engine.complete(prompt, params)
    others = [
        await engine.complete(prompt, SamplingParams(max_tokens=20, temperature=1.0, seed=s))
        for s in (1, 2, 3)
    ]
    assert first.token_ids == again.token_ids
    assert any(o.token_ids != first.token_ids for o in others)


async def test_stop_strings_end_the_output_and_are_not_returned(
    engine: Engine, tokenizer: Tokenizer
) -> None:
    prompt = chat_ids(tokenizer, "What is the capital of France?")
    completion = await engine.complete(
        prompt, SamplingParams(max_tokens=24, temperature=0, stop=(" Paris",))
    )
    assert completion.finish_reason == "stop"
    assert completion.text == "The capital of France is"


async def test_max_tokens_ends_with_length(engine: Engine, tokenizer: Tokenizer) -> None:
    completion = await engine.complete(
        chat_ids(tokenizer, "Tell me a long story about dragons."),
        SamplingParams(max_tokens=5, temperature=0),
    )
    assert completion.finish_reason == "length"
    assert completion.usage.completion_tokens == 5
    assert len(completion.token_ids) == 5


async def test_a_caller_that_goes_away_frees_its_slot(engine: Engine, tokenizer: Tokenizer) -> None:
    prompt = chat_ids(tokenizer, "Tell me a long story about dragons.")
    received = 0
    async for _ in engine.stream(prompt, SamplingParams(max_tokens=500, temperature=0)):
        received += 1
        if received == 3:
            break
    await poll_until(lambda: engine.active == 0, timeout=10, message="slot freed")
    assert engine.stuck() is None


@pytest.mark.parametrize(
    ("params", "prompt_length", "param"),
    [
        (SamplingParams(max_tokens=0), 10, "max_tokens"),
        (SamplingParams(max_tokens=100_000), 10, "max_tokens"),
        (SamplingParams(temperature=-1), 10, "temperature"),
        (SamplingParams(temperature=2.5), 10, "temperature"),
        (SamplingParams(top_p=0), 10, "top_p"),
        (SamplingParams(top_k=-3), 10, "top_k"),
        (SamplingParams(seed=-1), 10, "seed"),
        (SamplingParams(stop=("",)), 10, "stop"),
        (SamplingParams(stop=("a", "b", "c", "d", "e")), 10, "stop"),
        (SamplingParams(max_tokens=100), 1000, "max_tokens"),
        (SamplingParams(max_tokens=1), 1024, "prompt"),
        (SamplingParams(max_tokens=1), 0, "prompt"),
    ],
)
async def test_bad_requests_are_refused_naming_the_field(
    engine: Engine, params: SamplingParams, prompt_length: int, param: str
) -> None:
    with pytest.raises(InvalidRequest) as refused:
        async for _ in engine.stream([42] * prompt_length, params):
            pass
    assert refused.value.param == param
    assert engine.stuck() is None


def test_text_assembler_holds_back_a_possible_stop_string(tokenizer: Tokenizer) -> None:
    assembler = TextAssembler(tokenizer, ["END"])
    ids = tokenizer.encode("alpha beta EN")
    streamed = "".join(assembler.add(i)[0] for i in ids)
    assert streamed == "alpha beta "  # "EN" may start "END": held back
    rest, stopped = assembler.add(tokenizer.encode("D")[0])
    assert (rest, stopped) == ("", True)


def test_text_assembler_emits_whole_characters_only(tokenizer: Tokenizer) -> None:
    assembler = TextAssembler(tokenizer, [])
    pieces = [assembler.add(i)[0] for i in tokenizer.encode("你好，世界 🌍")]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == "你好，世界 🌍"


def test_text_assembler_streams_what_decoding_the_whole_answer_gives(tokenizer: Tokenizer) -> None:
    """Decoding only the tokens since the last whole character gives, piece by piece, the
    text of decoding every token at once: on real text, and on random ids from the whole
    vocabulary (lone and split UTF-8 bytes, special tokens)."""
    rng = random.Random(7)
    answers = [tokenizer.encode("Ça coûte 5 €; 你好，世界 🌍 — naïve café\n\tend")]
    answers += [[rng.randrange(tokenizer.vocab_size) for _ in range(300)] for _ in range(20)]
    for ids in answers:
        assembler = TextAssembler(tokenizer, [])
        streamed = "".join(assembler.add(i)[0] for i in ids) + assembler.flush()
        whole = tokenizer.decode(ids)
        assert streamed == whole.removesuffix("\ufffd") or streamed == whole


def test_text_assembler_finds_a_stop_string_split_across_many_tokens(tokenizer: Tokenizer) -> None:
    assembler = TextAssembler(tokenizer, ["<|stop here|>"])
    ids = tokenizer.encode("before <|stop here|> after")
    pieces = []
    for i in ids:
        piece, stopped = assembler.add(i)
        pieces.append(piece)
        if stopped:
            break
    assert stopped
    assert "".join(pieces) == "before "


@pytest.mark.parametrize(
    ("params", "only_best"),
    [
        (SamplingParams(temperature=0), True),
        (SamplingParams(temperature=0.7, top_k=1), True),
        (SamplingParams(temperature=0.7, top_k=16), True),
        (SamplingParams(temperature=0.7, top_k=17), False),
        (SamplingParams(temperature=0.7), False),
        (SamplingParams(temperature=0.7, top_p=0.9), False),
    ],
)
def test_only_greedy_and_small_top_k_use_the_screened_head(
    params: SamplingParams, only_best: bool
) -> None:
    # sampling from the whole distribution must see every logit, not just the candidates
    assert params.needs_only_best(HEAD_REFINE_TOP) is only_best


def test_a_model_that_fails_to_build_fails_the_launch(tokenizer: Tokenizer) -> None:
    def build() -> Llama:
        raise ValueError("unknown quantization 'int3'")

    with pytest.raises(ValueError, match="int3"):
        Engine.launch(build, tokenizer, EngineSettings(max_batch=1))
