"""Prefix cache (L1): time to first token with a long shared prefix, cold against warm.

Run from the repository root::

    python -m meshbench.prefix_cache_bench            # 12 pairs
    python -m meshbench.prefix_cache_bench --pairs 4  # quicker

Our engine in its default weight mode, as the service loads it, with 2 threads. Every
request is a chat whose system message is the same ~640-token document, followed by one of
several short questions. A *cold* request's document starts with a line of its own, so no
block of it is cached; a *warm* request's document was prefilled by an earlier request and
only the question is new. Cold and warm requests alternate, so a noisy neighbour slows
both alike. Results go to meshbench/results/prefix_cache.md.

The peer for the engine's speed is in ``inference_bench``; this one measures what the cache
saves, which has no peer figure: llama-cpp-python reuses only the previous prompt of its
one context, not a pool of prefixes shared by concurrent requests.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from meshbench.report import cpu_model, markdown_table, results_console, rich_table

RESULTS = Path(__file__).resolve().parent / "results"
THREADS = 2
QUESTIONS = [
    "How many days of leave do new employees get?",
    "Who approves travel above the limit?",
    "What is the deadline for expense reports?",
    "May I work from another country?",
    "Which laptop do engineers receive?",
    "How is overtime paid?",
]
SECTION = (
    "Section {n}. Employees submit expense reports within thirty days of the expense, with "
    "receipts attached; the manager approves them within five working days, and finance pays "
    "approved reports in the next monthly run. Travel above the limit of the grade needs the "
    "director's approval before booking. "
)


@dataclass(frozen=True)
class Measured:
    mode: str
    prompt_tokens: int
    cold: list[float]  # seconds to the first token
    warm: list[float]


def document(tokens_wanted: int, count_tokens: Callable[[str], int], head: str) -> str:
    """A handbook of whole sections, about ``tokens_wanted`` tokens, starting with ``head``."""
    text = head
    n = 1
    while count_tokens(text) < tokens_wanted:
        text += SECTION.format(n=n)
        n += 1
    return text


def run(pairs: int, prefix_tokens: int) -> Measured:
    import torch

    from services.inference.generation import EngineSettings, SamplingParams
    from services.inference.model.engine import Engine
    from services.inference.model.gguf_model import load_gguf, smollm2_path
    from services.inference.model.llama import Llama
    from services.inference.model.quant import resolve_mode
    from services.inference.model.tokenizer import Tokenizer

    torch.set_num_threads(THREADS)
    gguf = load_gguf(smollm2_path())
    tokenizer = Tokenizer(gguf.tokenizer)
    mode = resolve_mode("auto", gguf.tensor_types).value
    settings = EngineSettings(max_batch=16, max_seq_len=2048)
    engine = Engine.launch(lambda: Llama(gguf, mode), tokenizer, settings)

    def count(text: str) -> int:
        return len(tokenizer.encode(text))

    def prompt(doc: str, question: str) -> list[int]:
        messages = [{"role": "system", "content": doc}, {"role": "user", "content": question}]
        return tokenizer.encode(tokenizer.render_chat(messages))

    shared = document(prefix_tokens, count, "Company handbook.\n")

    async def ttft(ids: list[int]) -> float:
        params = SamplingParams(max_tokens=1, temperature=0)
        started = time.perf_counter()
        async for _ in engine.stream(ids, params):
            return time.perf_counter() - started
        raise RuntimeError("the engine gave no token")

    async def main() -> Measured:
        await ttft(prompt(document(64, count, "warm-up\n"), QUESTIONS[0]))
        await ttft(prompt(shared, QUESTIONS[0]))  # the shared prefix enters the cache
        cold: list[float] = []
        warm: list[float] = []
        for i in range(pairs):
            question = QUESTIONS[i % len(QUESTIONS)]
            unique = document(prefix_tokens, count, f"Handbook copy {i} of {time.time_ns()}.\n")
            cold.append(await ttft(prompt(unique, question)))
            warm.append(await ttft(prompt(shared, question)))
        return Measured(mode, len(prompt(shared, QUESTIONS[0])), cold, warm)

    try:
        return asyncio.run(main())
    finally:
        engine.stop()


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=12, help="cold/warm request pairs")
    parser.add_argument("--prefix-tokens", type=int, default=640)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    console = results_console()
    load_before = os.getloadavg()[0]
    started = time.monotonic()
    with console.status("loading the model and timing cold and warm prefixes ..."):
        measured = run(args.pairs, args.prefix_tokens)
    cold, warm = measured.cold, measured.warm
    cold_ms, warm_ms = median(cold) * 1000, median(warm) * 1000
    header = ["prefix", "TTFT p50 (ms)", "TTFT min (ms)", "TTFT max (ms)", "requests"]
    rows = [
        ["cold (nothing cached)", f"{cold_ms:.0f}", f"{min(cold) * 1000:.0f}",
         f"{max(cold) * 1000:.0f}", str(len(cold))],
        ["warm (document cached)", f"{warm_ms:.0f}", f"{min(warm) * 1000:.0f}",
         f"{max(warm) * 1000:.0f}", str(len(warm))],
    ]  # fmt: skip
    console.print(rich_table("prefix cache: time to first token", header, rows))
    ratio = cold_ms / warm_ms
    console.print(f"warm is {ratio:.1f}x faster to the first token")
    took = time.monotonic() - started
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prefix_cache.md").write_text(
        f"""# Prefix cache: time to first token, cold against warm

Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC. Command: `python -m meshbench.prefix_cache_bench \
--pairs {args.pairs} --prefix-tokens {args.prefix_tokens}`. Took {took:.0f} s.
Machine: {cpu_model()}, {THREADS} threads, Python {platform.python_version()}, 1-minute load \
average {load_before:.1f} before the run and {os.getloadavg()[0]:.1f} after; our engine in its \
default mode ({measured.mode}), the engine's default prefix cache settings.

Each prompt is {measured.prompt_tokens} tokens: a system message of about \
{args.prefix_tokens} tokens (the same handbook for warm requests; a copy with a line of its own \
for cold ones) and a short question. Cold and warm requests alternate.

{markdown_table(header, rows)}

**Warm is {ratio:.1f}x faster to the first token** (p50 against p50).
"""
    )
    console.print(f"took {took:.0f} s; results in {args.out}/prefix_cache.md")


if __name__ == "__main__":
    main()
