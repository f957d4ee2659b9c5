"""What the mesh costs a request: gateway + Kafka + router, against calling the model directly.

Run from the repository root (``just bench-mesh``)::

    python -m meshbench.mesh_bench [--quick] [--skip-model] [--skip-proxy]

Two parts, each measured in one run on this machine:

1. **Model** — the real inference service (Ray Serve, SmolLM2) called directly over its
   OpenAI API, and the same service behind the mesh (official-client-shaped HTTP to the
   gateway, Kafka, router). Streaming chat, greedy, 32 new tokens; time to first token
   and total time, p50/p99, at concurrency 1 and 8. Direct and mesh rounds alternate so
   drift of the machine hits both alike. Budget (the architecture's): the mesh adds at
   most 3 ms p50 and 10 ms p99.
2. **Proxy** — a fake OpenAI-compatible backend (``tests/fakes/openai_backend.py``,
   no model, 8 tokens at once) called directly, through the mesh (the router's pool
   points at it), and through LiteLLM's proxy (``litellm[proxy]``, installed into
   ``.venv-litellm`` for the benchmark only): requests/s and the latency each adds,
   at concurrency 1 and 32, streaming and not.

At concurrency 1 the proxy part also reads the services' spans (``telemetry.spans``) and
reports where the mesh's time goes, hop by hop (:mod:`meshbench.span_hops`). LiteLLM
runs as many workers as the mesh has Python processes on the request path (two).

Everything (load generator, broker, services, backends) shares this machine's cores,
as it would on one host. Results: ``meshbench/results/mesh.md`` and ``mesh.png``.
This module is over 500 lines because the load generator, the process handling, both
parts and their report belong to one command and are read together.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from meshbench.span_hops import HopRow, SpanCollector, breakdown
from shared.bus.embedded import EmbeddedBroker, free_port
from shared.service_auth import service_headers
from shared.settings import MeshSettings

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
COMMAND = "python -m meshbench.mesh_bench"
LITELLM_VENV = ROOT / ".venv-litellm"
# Python processes on the mesh's request path (gateway, router): LiteLLM gets as many workers
LITELLM_WORKERS = 2
LITELLM_KEY = "sk-meshllm-bench-0123456789abcdef0123456789abcdef"
MODEL = "smollm2-135m-instruct"
QUESTIONS = [
    "What is the capital of France?",
    "Name three programming languages.",
    "Give me a tip for better sleep.",
    "What is the boiling point of water?",
    "Who wrote Hamlet?",
    "Write a haiku about the sea.",
    "What is 17 times 23?",
    "Explain photosynthesis in one sentence.",
]
console = Console()


# --------------------------------------------------------------------------- load


@dataclass
class Sample:
    ttft_s: float
    total_s: float


@dataclass
class Stats:
    samples: list[Sample] = field(default_factory=list)
    errors: int = 0
    wall_s: float = 0.0

    def add(self, other: Stats) -> None:
        self.samples.extend(other.samples)
        self.errors += other.errors
        self.wall_s += other.wall_s

    def pct(self, attr: str, q: float) -> float:
        values = sorted(getattr(s, attr) for s in self.samples)
        if not values:
            return float("nan")
        return values[min(len(values) - 1, round(q * (len(values) - 1)))] * 1000

    @property
    def rps(self) -> float:
        return len(self.samples) / self.wall_s if self.wall_s else 0.0


async def one_request(
    client: httpx.AsyncClient, url: str, headers: dict[str, str], body: dict[str, Any]
) -> Sample:
    started = time.perf_counter()
    first = 0.0
    if not body.get("stream"):
        reply = await client.post(url, json=body, headers=headers)
        reply.raise_for_status()
        total = time.perf_counter() - started
        return Sample(total, total)
    async with client.stream("POST", url, json=body, headers=headers) as reply:
        reply.raise_for_status()
        async for line in reply.aiter_lines():
            compact = line.replace(" ", "")
            if (
                not first
                and compact.startswith("data:{")
                and '"content":"' in compact
                and '"content":""' not in compact
            ):
                first = time.perf_counter() - started
            if line == "data: [DONE]":
                break
    total = time.perf_counter() - started
    return Sample(first or total, total)


async def load(
    url: str,
    headers: dict[str, str],
    bodies: list[dict[str, Any]],
    concurrency: int,
    requests: int,
) -> Stats:
    stats = Stats()
    counter = iter(range(requests))
    limits = httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:

        async def worker() -> None:
            for i in counter:
                try:
                    stats.samples.append(
                        await one_request(client, url, headers, bodies[i % len(bodies)])
                    )
                except httpx.HTTPError as error:
                    stats.errors += 1
                    if stats.errors <= 3:
                        console.print(f"[red]request failed: {error}[/red]")

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        stats.wall_s = time.perf_counter() - started
    return stats


# --------------------------------------------------------------------------- processes


class Processes:
    """Child processes of the benchmark, stopped together."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.children: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        process = subprocess.Popen(argv, env=env, stdout=log, stderr=log, cwd=ROOT)
        self.children.append((name, process))
        return process

    def stop(self, name: str | None = None) -> None:
        for child_name, process in reversed(self.children):
            if (name is None or child_name == name) and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(60)
                except subprocess.TimeoutExpired:
                    process.kill()
        self.children = [(n, p) for n, p in self.children if name is not None and n != name]

    def log_tail(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""


async def wait_ready(url: str, processes: Processes, name: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=5) as client:
        while time.monotonic() < deadline:
            for child, process in processes.children:
                if child == name and process.poll() is not None:
                    raise RuntimeError(f"{name} exited: {processes.log_tail(name)}")
            try:
                if (await client.get(url)).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.3)
    raise TimeoutError(f"{name} not ready at {url}: {processes.log_tail(name)}")


def service_env(bootstrap: str, data_dir: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "PYTHONUNBUFFERED": "1",
        "MESHLLM_KAFKA__BOOTSTRAP": bootstrap,
        "MESHLLM_DATA_DIR": str(data_dir),
        "MESHLLM_LOG_FORMAT": "json",
        "MESHLLM_LOG_LEVEL": "WARNING",
        # the benchmark's own key may go as fast as the machine allows
        "MESHLLM_LIMITS__TENANT_RPM": "100000000",
        "MESHLLM_LIMITS__TENANT_TPM": "100000000000",
        "MESHLLM_LIMITS__MAX_CONCURRENT_PER_KEY": "1024",
        "MESHLLM_LIMITS__MAX_CONCURRENT_PER_TENANT": "1024",
        # every span on telemetry.spans: the hop-by-hop breakdown reads whole traces
        "MESHLLM_TELEMETRY__KAFKA_SPANS": "all",
        **extra,
    }


def admin_key(data_dir: Path) -> str:
    from services.gateway.auth import KeyStore

    with KeyStore(data_dir / "gateway" / "keys.sqlite") as store:
        return store.create("bench", ["admin"], rpm=100_000_000, tpm=100_000_000_000)[1]


async def start_mesh(
    processes: Processes, bootstrap: str, data_dir: Path, pool_url: str
) -> tuple[str, str]:
    """Router and gateway in front of ``pool_url``; returns (gateway base URL, API key)."""
    key = admin_key(data_dir)
    gateway_port, router_health, gateway_health = free_port(), free_port(), free_port()
    pools = json.dumps([{"name": "cpu", "replicas": [pool_url], "max_concurrency": 64}])
    python = sys.executable
    processes.start(
        "router",
        [python, "-m", "services.router"],
        service_env(
            bootstrap, data_dir, MESHLLM_POOLS=pools, MESHLLM_HEALTH_PORT=str(router_health)
        ),
    )
    processes.start(
        "gateway",
        [python, "-m", "services.gateway"],
        service_env(
            bootstrap,
            data_dir,
            MESHLLM_HTTP_PORT=str(gateway_port),
            MESHLLM_HEALTH_PORT=str(gateway_health),
            MESHLLM_MODELS=json.dumps([MODEL, "fake-model"]),
        ),
    )
    await wait_ready(f"http://127.0.0.1:{router_health}/readyz", processes, "router", 60)
    await wait_ready(f"http://127.0.0.1:{gateway_health}/readyz", processes, "gateway", 60)
    return f"http://127.0.0.1:{gateway_port}/v1", key


# --------------------------------------------------------------------------- part 1


@dataclass
class ModelRow:
    concurrency: int
    path: str
    stats: Stats


async def model_part(
    bootstrap: str, workdir: Path, quick: bool, progress: Progress
) -> list[ModelRow]:
    data_dir = workdir / "model"
    processes = Processes(workdir)
    inference_port, inference_health = free_port(), free_port()
    try:
        processes.start(
            "inference",
            [sys.executable, "-m", "services.inference"],
            service_env(
                bootstrap,
                data_dir,
                MESHLLM_SERVE__HTTP_PORT=str(inference_port),
                MESHLLM_SERVE__EMBEDDINGS_REPLICAS="0",
                MESHLLM_HEALTH_PORT=str(inference_health),
            ),
        )
        task = progress.add_task("starting inference (Ray Serve, model load)", total=None)
        await wait_ready(f"http://127.0.0.1:{inference_health}/readyz", processes, "inference", 300)
        direct_url = f"http://127.0.0.1:{inference_port}/v1/chat/completions"
        mesh_base, key = await start_mesh(
            processes, bootstrap, data_dir, f"http://127.0.0.1:{inference_port}"
        )
        progress.remove_task(task)
        bodies = [
            {
                "model": MODEL,
                "messages": [{"role": "user", "content": q}],
                "max_tokens": 32,
                "temperature": 0,
                "ignore_eos": True,
                "stream": True,
            }
            for q in QUESTIONS
        ]
        auth = {"authorization": f"Bearer {key}"}
        # the direct calls go where the router's do, with the router's service identity
        as_router = service_headers(MeshSettings(data_dir=data_dir, service_name="router"))
        rows = []
        for concurrency in (1, 8):
            per_round = (8 if quick else 16) * max(1, concurrency // 2)
            rounds = 2 if quick else 3
            direct, mesh = Stats(), Stats()
            task = progress.add_task(f"model, concurrency {concurrency}", total=2 * rounds)
            await load(direct_url, as_router, bodies, concurrency, concurrency)  # warm-up
            await load(mesh_base + "/chat/completions", auth, bodies, concurrency, concurrency)
            for _ in range(rounds):
                direct.add(await load(direct_url, as_router, bodies, concurrency, per_round))
                progress.advance(task)
                mesh.add(
                    await load(
                        mesh_base + "/chat/completions", auth, bodies, concurrency, per_round
                    )
                )
                progress.advance(task)
            progress.remove_task(task)
            rows += [ModelRow(concurrency, "direct", direct), ModelRow(concurrency, "mesh", mesh)]
        return rows
    finally:
        processes.stop()


# --------------------------------------------------------------------------- part 2


@dataclass
class ProxyRow:
    concurrency: int
    stream: bool
    path: str
    stats: Stats


@contextmanager
def litellm_config(fake_url: str) -> Iterator[Path]:
    config = {
        "model_list": [
            {
                "model_name": "fake-model",
                "litellm_params": {
                    "model": "openai/fake-model",
                    "api_base": fake_url + "/v1",
                    "api_key": "none",
                },
            }
        ],
        "litellm_settings": {"drop_params": True, "telemetry": False},
        # authenticated like the mesh (its fast path: one master key, no database)
        "general_settings": {"master_key": LITELLM_KEY},
    }
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as out:
        json.dump(config, out)  # JSON is YAML
    try:
        yield Path(out.name)
    finally:
        Path(out.name).unlink(missing_ok=True)


def ensure_litellm() -> Path:
    """LiteLLM's proxy in a virtual environment of its own (it pins its own dependencies)."""
    binary = LITELLM_VENV / "bin" / "litellm"
    if binary.exists():
        return binary
    console.print("installing litellm[proxy] into .venv-litellm (benchmark only) ...")
    subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True)
    subprocess.run(
        [str(LITELLM_VENV / "bin" / "pip"), "install", "--quiet", "litellm[proxy]"], check=True
    )
    return binary


def litellm_version() -> str:
    out = subprocess.run(
        [
            str(LITELLM_VENV / "bin" / "python"),
            "-c",
            "import importlib.metadata as m; print(m.version('litellm'))",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    return out.stdout.strip() or "?"


Hops = dict[bool, tuple[list[HopRow], int]]
"""Per stream flag: where the mesh's time goes at concurrency 1, and over how many traces."""


async def proxy_part(
    bootstrap: str, workdir: Path, quick: bool, progress: Progress
) -> tuple[list[ProxyRow], Hops]:
    data_dir = workdir / "proxy"
    processes = Processes(workdir)
    fake_port, litellm_port = free_port(), free_port()
    fake_url = f"http://127.0.0.1:{fake_port}"
    litellm = ensure_litellm()
    try:
        processes.start(
            "fake",
            [sys.executable, "-m", "tests.fakes.openai_backend", "--port", str(fake_port)],
            service_env(bootstrap, data_dir),
        )
        with litellm_config(fake_url) as config:
            processes.start(
                "litellm",
                [
                    str(litellm),
                    "--config",
                    str(config),
                    "--port",
                    str(litellm_port),
                    "--num_workers",
                    str(LITELLM_WORKERS),
                ],
                {**os.environ, "LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False"},
            )
            task = progress.add_task("starting fake backend, mesh and LiteLLM proxy", total=None)
            mesh_base, key = await start_mesh(processes, bootstrap, data_dir, fake_url)
            await wait_ready(
                f"http://127.0.0.1:{litellm_port}/health/liveliness", processes, "litellm", 180
            )
            progress.remove_task(task)
            collector = SpanCollector(bootstrap)
            await collector.start()
            windows: dict[bool, list[tuple[int, int]]] = {False: [], True: []}
            targets = {
                "direct": (f"{fake_url}/v1/chat/completions", {}),
                "mesh": (mesh_base + "/chat/completions", {"authorization": f"Bearer {key}"}),
                "litellm": (
                    f"http://127.0.0.1:{litellm_port}/v1/chat/completions",
                    {"authorization": f"Bearer {LITELLM_KEY}"},
                ),
            }
            rows = []
            for stream in (False, True):
                for concurrency in (1, 32):
                    body = {
                        "model": "fake-model",
                        "messages": [{"role": "user", "content": "hello"}],
                        "max_tokens": 8,
                        "stream": stream,
                    }
                    count = (
                        (100 if quick else 300) if concurrency == 1 else (400 if quick else 1200)
                    )
                    rounds = 2
                    results = {path: Stats() for path in targets}
                    label = (
                        f"proxy, {'stream' if stream else 'no stream'}, concurrency {concurrency}"
                    )
                    task = progress.add_task(label, total=rounds * len(targets))
                    for url, headers in targets.values():
                        await load(url, headers, [body], concurrency, concurrency * 2)  # warm-up
                    for _ in range(rounds):
                        for path, (url, headers) in targets.items():
                            began = time.time_ns()
                            results[path].add(
                                await load(url, headers, [body], concurrency, count // rounds)
                            )
                            if path == "mesh" and concurrency == 1:
                                windows[stream].append((began, time.time_ns()))
                            progress.advance(task)
                    progress.remove_task(task)
                    rows += [ProxyRow(concurrency, stream, p, s) for p, s in results.items()]
            await collector.stop()
            hops = {stream: breakdown(collector.within(w)) for stream, w in windows.items()}
            return rows, hops
    finally:
        processes.stop()


# --------------------------------------------------------------------------- report


def model_table(rows: list[ModelRow]) -> Table:
    table = Table(title="Model: direct call vs through the mesh (streaming chat, 32 tokens)")
    for column in ("concurrency", "path", "requests", "TTFT p50 ms", "TTFT p99 ms",
                   "total p50 ms", "total p99 ms", "added TTFT p50 / p99 ms"):  # fmt: skip
        table.add_column(column, justify="right" if column != "path" else "left")
    direct = {r.concurrency: r.stats for r in rows if r.path == "direct"}
    for r in rows:
        s = r.stats
        added = ""
        if r.path == "mesh":
            d = direct[r.concurrency]
            added = (
                f"{s.pct('ttft_s', 0.5) - d.pct('ttft_s', 0.5):+.1f} / "
                f"{s.pct('ttft_s', 0.99) - d.pct('ttft_s', 0.99):+.1f}"
            )
        failed = f" ({s.errors} failed)" if s.errors else ""
        table.add_row(
            str(r.concurrency), r.path, f"{len(s.samples)}{failed}",
            f"{s.pct('ttft_s', 0.5):.1f}", f"{s.pct('ttft_s', 0.99):.1f}",
            f"{s.pct('total_s', 0.5):.1f}", f"{s.pct('total_s', 0.99):.1f}", added,
        )  # fmt: skip
    return table


def proxy_table(rows: list[ProxyRow]) -> Table:
    table = Table(title="Proxy overhead in front of one fake OpenAI backend (8 tokens)")
    for column in ("stream", "concurrency", "path", "requests/s", "total p50 ms", "total p99 ms",
                   "TTFT p50 ms", "added p50 ms", "added p99 ms"):  # fmt: skip
        table.add_column(column, justify="left" if column in {"path", "stream"} else "right")
    direct = {(r.stream, r.concurrency): r.stats for r in rows if r.path == "direct"}
    for r in rows:
        s, d = r.stats, direct[(r.stream, r.concurrency)]
        added = r.path != "direct"
        failed = f" ({s.errors} failed)" if s.errors else ""
        table.add_row(
            "yes" if r.stream else "no", str(r.concurrency), r.path + failed,
            f"{s.rps:.0f}", f"{s.pct('total_s', 0.5):.1f}", f"{s.pct('total_s', 0.99):.1f}",
            f"{s.pct('ttft_s', 0.5):.1f}",
            f"{s.pct('total_s', 0.5) - d.pct('total_s', 0.5):+.1f}" if added else "",
            f"{s.pct('total_s', 0.99) - d.pct('total_s', 0.99):+.1f}" if added else "",
        )  # fmt: skip
    return table


def hops_table(hops: Hops) -> Table:
    counts = ", ".join(f"{'stream' if s else 'plain'} {n} traces" for s, (_, n) in hops.items())
    table = Table(
        title="Where the mesh's time goes: one request at a time, fake backend, from the "
        f"services' spans ({counts})"
    )
    for column in ("hop", "plain p50 ms", "plain p99 ms", "stream p50 ms", "stream p99 ms"):
        table.add_column(column, justify="left" if column == "hop" else "right")
    plain = {row.hop: row for row in hops.get(False, ([], 0))[0]}
    stream = {row.hop: row for row in hops.get(True, ([], 0))[0]}
    for hop in dict.fromkeys([*plain, *stream]):
        cells = []
        for side in (plain, stream):
            row = side.get(hop)
            cells += [f"{row.p50_ms:.2f}", f"{row.p99_ms:.2f}"] if row else ["", ""]
        table.add_row(hop, *cells)
    return table


def markdown(table: Table) -> str:
    headers = [str(c.header) for c in table.columns]
    lines = [f"**{table.title}**", "", "| " + " | ".join(headers) + " |",
             "|" + "|".join("---" for _ in headers) + "|"]  # fmt: skip
    cells = [list(c.cells) for c in table.columns]
    for row in zip(*cells, strict=True):
        lines.append("| " + " | ".join(str(x) for x in row) + " |")
    return "\n".join(lines)


def plot(model_rows: list[ModelRow], proxy_rows: list[ProxyRow], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    if proxy_rows:
        groups = sorted({(r.stream, r.concurrency) for r in proxy_rows})
        paths = ["mesh", "litellm"]
        width = 0.35
        for k, name in enumerate(paths):
            values = []
            for stream, conc in groups:
                direct = next(
                    r.stats
                    for r in proxy_rows
                    if (r.stream, r.concurrency, r.path) == (stream, conc, "direct")
                )
                mine = next(
                    r.stats
                    for r in proxy_rows
                    if (r.stream, r.concurrency, r.path) == (stream, conc, name)
                )
                values.append(mine.pct("total_s", 0.5) - direct.pct("total_s", 0.5))
            axes[0].bar([i + k * width for i in range(len(groups))], values, width, label=name)
        axes[0].set_xticks([i + width / 2 for i in range(len(groups))])
        axes[0].set_xticklabels([f"{'stream' if s else 'plain'}\nc={c}" for s, c in groups])
        axes[0].set_ylabel("added latency p50 (ms)")
        axes[0].set_title("Proxy overhead vs a fake backend (lower is better)")
        axes[0].legend()
    if model_rows:
        labels = [f"{r.path}\nc={r.concurrency}" for r in model_rows]
        axes[1].bar(labels, [r.stats.pct("ttft_s", 0.5) for r in model_rows], label="TTFT p50")
        p50 = [r.stats.pct("ttft_s", 0.5) for r in model_rows]
        p99 = [r.stats.pct("ttft_s", 0.99) for r in model_rows]
        extra = [high - low for high, low in zip(p99, p50, strict=True)]
        axes[1].bar(labels, extra, bottom=p50, alpha=0.4, label="to p99")
        axes[1].set_ylabel("time to first token (ms)")
        axes[1].set_title("Real model: direct vs through the mesh")
        axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    parser.add_argument("--skip-model", action="store_true", help="only the proxy part")
    parser.add_argument("--skip-proxy", action="store_true", help="only the model part")
    return parser.parse_args(argv)


async def main_async(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="mesh-bench-"))
    broker = EmbeddedBroker(log_file=workdir / "broker.log")
    await broker.start()
    model_rows: list[ModelRow] = []
    proxy_rows: list[ProxyRow] = []
    hops: Hops = {}
    try:
        with Progress(console=console, transient=True) as progress:
            if not args.skip_model:
                model_rows = await model_part(broker.bootstrap, workdir, args.quick, progress)
            if not args.skip_proxy:
                proxy_rows, hops = await proxy_part(broker.bootstrap, workdir, args.quick, progress)
    finally:
        await broker.stop()
    tables = []
    if model_rows:
        tables.append(model_table(model_rows))
    if proxy_rows:
        tables.append(proxy_table(proxy_rows))
        tables.append(hops_table(hops))
    for table in tables:
        console.print(table)
    RESULTS_DIR.mkdir(exist_ok=True)
    plot(model_rows, proxy_rows, RESULTS_DIR / "mesh.png")
    command = COMMAND + "".join(
        f" --{k.replace('_', '-')}" for k, v in vars(args).items() if v is True
    )
    header = [
        "# Mesh overhead",
        "",
        f"Produced by `{command}` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, "
        f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
        + (f", LiteLLM {litellm_version()}" if proxy_rows else "")
        + ". Load generator, broker, services and backends share the machine.",
        "",
        "Budget (model part): the mesh adds at most 3 ms p50 and 10 ms p99 to time to first "
        "token. Target (proxy part): lower added latency and more requests/s than LiteLLM's proxy.",
        "",
        "![mesh](mesh.png)",
        "",
        "",
    ]
    (RESULTS_DIR / "mesh.md").write_text(
        "\n".join(header) + "\n\n".join(markdown(t) for t in tables) + "\n"
    )
    console.print(f"wrote {RESULTS_DIR / 'mesh.md'} and mesh.png (logs in {workdir})")


def main(argv: list[str] | None = None) -> None:
    asyncio.run(main_async(parse_args(argv)))


if __name__ == "__main__":
    main()
