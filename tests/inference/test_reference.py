"""Our engine against transformers on the same GGUF file: tokens and greedy output, in fp32
and in the int4 the service runs by default."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from services.inference.generation import EngineSettings, SamplingParams
from services.inference.model.engine import Engine
from services.inference.model.gguf_model import load_gguf, smollm2_path
from services.inference.model.llama import Llama
from services.inference.model.quant import AUTO, QuantMode
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


NEAR_TIE = 0.7
"""Logits apart in the reference within which int4 arithmetic may pick the other token.

Teacher-forced on these prompts' reference answers (158 steps), int4 moved the gap between
the reference's two best tokens by 0.09 logits at the median, 0.39 at p99 and 0.43 at most
with the AVX-512 VNNI build of the kernels, by 0.11, 0.52 and 0.55 with the AVX2 build and
by 0.11, 0.63 and 0.69 with the plain C++ one (both on an AVX2-only machine). The builds'
products agree to float rounding (1e-6 relative), but each row of activations is rounded to
int8 codes: a 1e-7 difference flips a code at a rounding boundary, and a layer with a
large activation carries it on, so each build's int4 output is its own sample of the
quantization error. A flip at a 0.5 gap is that error, not a defect; 0.7 (the best token
about twice as likely as the one picked) covers every build measured."""

AGREEMENT = 0.9
"""Share of teacher-forced steps at which int4's best token must be the reference's (0.96
measured with the AVX2 kernels). Teacher forcing keeps one flip from changing every later
step, which makes this steadier than counting whole answers that match: one near tie early
in an answer changes the rest of it."""


@pytest.fixture(scope="module")
def default_engine(tokenizer: Tokenizer) -> Iterator[Engine]:
    """The engine as the service builds it by default: "auto", int4 for the Q4_1 file."""
    llama = Llama(load_gguf(smollm2_path()), AUTO)
    assert llama.quant == QuantMode.INT4
    engine = Engine(llama, tokenizer, EngineSettings(max_batch=8, max_seq_len=512))
    engine.start()
    yield engine
    engine.stop()


async def test_the_int4_default_follows_transformers_except_at_near_ties(
    reference: tuple[Any, Any], default_engine: Engine, tokenizer: Tokenizer
) -> None:
    """Greedy int4 output equals transformers' on the same file (dequantized to fp32), or
    leaves it only where the reference's two best tokens are within ``NEAR_TIE`` logits
    and it takes the reference's runner-up (how often is the teacher-forced test's)."""
    model, _ = reference
    identical = 0
    for question in PROMPTS:
        ids = tokenizer.encode(tokenizer.render_chat([{"role": "user", "content": question}]))
        with torch.inference_mode():
            out = model.generate(
                torch.tensor([ids]),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                output_scores=True,
                return_dict_in_generate=True,
            )
        expected = out.sequences[0, len(ids) :].tolist()
        ours = await default_engine.complete(
            ids, SamplingParams(max_tokens=NEW_TOKENS, temperature=0)
        )
        produced = list(ours.token_ids)
        if ours.finish_reason == "stop":
            produced.append(tokenizer.eos_id)
        if produced == expected:
            identical += 1
            continue
        pairs = enumerate(zip(produced, expected, strict=False))
        step = next((i for i, (a, b) in pairs if a != b), min(len(produced), len(expected)))
        scores = out.scores[step][0]
        best, runner_up = torch.topk(scores, 2).indices.tolist()
        gap = float(scores[best] - scores[runner_up])
        assert produced[step] == runner_up, (question, step)
        assert gap < NEAR_TIE, (question, step, gap)
    assert identical >= 1  # not every answer may leave the reference


async def test_teacher_forced_int4_picks_the_reference_token_except_at_near_ties(
    reference: tuple[Any, Any], tokenizer: Tokenizer
) -> None:
    """On the reference's own greedy answers, step by step: int4's best token is the
    reference's at :data:`AGREEMENT` of the steps, and where it is not, the reference's two
    best tokens are within :data:`NEAR_TIE` logits."""
    model, _ = reference
    llama = Llama(load_gguf(smollm2_path()), AUTO)
    agree = steps = 0
    for question in PROMPTS:
        ids = tokenizer.encode(tokenizer.render_chat([{"role": "user", "content": question}]))
        with torch.inference_mode():
            sequence = model.generate(
                torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False
            )[0].tolist()
            expected = model(torch.tensor([sequence])).logits[0]
            cache = llama.new_cache(1, len(sequence))
            ours = [llama.forward(torch.tensor([[t]]), [0], cache)[0] for t in sequence[:-1]]
        for position in range(len(ids) - 1, len(sequence) - 1):
            best = int(expected[position].argmax())
            picked = int(ours[position].argmax())
            steps += 1
            if picked == best:
                agree += 1
                continue
            # the token int4 picked was nearly as likely as the best in the reference
            gap = float(expected[position][best] - expected[position][picked])
            assert gap < NEAR_TIE, (question, position, gap)
    assert agree / steps >= AGREEMENT, (agree, steps)
