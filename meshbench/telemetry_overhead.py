"""What the mesh's telemetry costs a request: metrics, span export and the ops loop on, and off.

Run from the repository root (``just bench-telemetry``)::

    python -m meshbench.telemetry_overhead [--quick]

Two meshes (router and gateway, each on an embedded broker of its own) in front of one
fake OpenAI-compatible backend (``tests/fakes/openai_backend.py``, no model, 8 tokens at
once), measured in one run, their rounds alternating so that drift of the machine hits
both alike:

- **on**: the defaults. Every service serves ``/metrics`` and this benchmark scrapes the
  gateway's, the router's and the ops service's every 5 s (a Prometheus at 15 s does a
  third of that); spans go to ``telemetry.spans``; the ops service reads them into its
  windows and runs its rules every 5 s.
- **off**: ``MESHLLM_TELEMETRY__PROMETHEUS=false``, ``MESHLLM_TELEMETRY__SPANS_TO_KAFKA=false``
  and no ops service. (Spans are still made in process; nothing exports them.)

Per mesh: requests/s and p50/p99 latency at concurrency 32 (whole answers, streams) and
1, and the CPU milliseconds per request of each process over the measured rounds (less
sensitive to the machine's drift than requests/s, and it says where the cost is). Target:
the "on" mesh within 3% of the "off" mesh's requests/s at concurrency 32.
Results: ``meshbench/results/telemetry_overhead.md`` and ``telemetry_overhead.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import sys
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
from rich.progress import Progress

from meshbench.mesh_bench import (
    Processes,
    Stats,
    admin_key,
    console,
    load,
    service_env,
    wait_ready,
)
from shared.bus.embedded import EmbeddedBroker, free_port

RESULTS_DIR = Path(__file__).resolve().parent / "results"
COMMAND = "python -m meshbench.telemetry_overhead"
SCRAPE_EVERY_S = 5.0
TARGET = 0.03
OFF = {"MESHLLM_TELEMETRY__PROMETHEUS": "false", "MESHLLM_TELEMETRY__SPANS_TO_KAFKA": "false"}
ON = {"MESHLLM_TELEMETRY__KAFKA_SPANS": "answers"}  # the default (service_env sets "all")


@dataclass
class Mesh:
    name: str
    url: str
    key: str
    metrics: list[str]
    pids: dict[str, int] = field(default_factory=dict)  # service (and broker) -> pid
    cpu_s: dict[str, float] = field(default_factory=dict)  # CPU seconds in measured rounds
    requests: int = 0  # requests of the measured rounds


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def start_mesh(
    name: str, processes: Processes, workdir: Path, fake_url: str, *, on: bool
) -> tuple[Mesh, EmbeddedBroker]:
    broker = EmbeddedBroker(log_file=workdir / f"broker-{name}.log")
    await broker.start()
    data_dir = workdir / name
    data_dir.mkdir()
    key = admin_key(data_dir)
    extra = ON if on else OFF
    pools = json.dumps([{"name": "cpu", "replicas": [fake_url], "max_concurrency": 64}])
    health = {service: free_port() for service in ("router", "gateway", "ops")}
    gateway_port = free_port()
    envs = {
        "router": {"MESHLLM_POOLS": pools},
        "gateway": {"MESHLLM_HTTP_PORT": str(gateway_port), "MESHLLM_MODELS": '["fake-model"]'},
        "ops": {},
    }
    services = ("router", "gateway", "ops") if on else ("router", "gateway")
    for service in services:
        processes.start(
            f"{service}-{name}",
            [sys.executable, "-m", f"services.{service}"],
            service_env(broker.bootstrap, data_dir, MESHLLM_HEALTH_PORT=str(health[service]),
                        **envs[service], **extra),
        )  # fmt: skip
    for service in services:
        url = f"http://127.0.0.1:{health[service]}/readyz"
        await wait_ready(url, processes, f"{service}-{name}", 60)
    metrics = [f"http://127.0.0.1:{health[s]}/metrics" for s in services] if on else []
    mesh = Mesh(name, f"http://127.0.0.1:{gateway_port}/v1", key, metrics)
    mesh.pids = {s: p.pid for n, p in processes.children for s in services if n == f"{s}-{name}"}
    mesh.pids["broker"] = broker.pid or 0
    return mesh, broker


async def scrape_forever(urls: list[str], scraped: list[int]) -> None:
    """A Prometheus' part: every service's /metrics every SCRAPE_EVERY_S."""
    async with httpx.AsyncClient(timeout=10) as client:
        while True:
            for url in urls:
                with contextlib.suppress(httpx.HTTPError):
                    scraped.append(len((await client.get(url)).content))
            await asyncio.sleep(SCRAPE_EVERY_S)


@dataclass
class Row:
    case: str
    mesh: str
    stats: Stats


CASES = (("c=32, whole", 32, False), ("c=32, stream", 32, True), ("c=1, whole", 1, False))


async def measure(meshes: list[Mesh], quick: bool, progress: Progress) -> list[Row]:
    rows = []
    for case, concurrency, stream in CASES:
        body = {
            "model": "fake-model",
            "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 8,
            "stream": stream,
        }
        count = (300 if quick else 1000) if concurrency > 1 else (100 if quick else 300)
        rounds = 2 if quick else 4
        results = {mesh.name: Stats() for mesh in meshes}
        task = progress.add_task(case, total=rounds * len(meshes))
        for mesh in meshes:  # warm-up
            headers = {"authorization": f"Bearer {mesh.key}"}
            await load(mesh.url + "/chat/completions", headers, [body], concurrency, concurrency)
        for turn in range(rounds):
            order = meshes if turn % 2 == 0 else list(reversed(meshes))
            for mesh in order:
                headers = {"authorization": f"Bearer {mesh.key}"}
                url = mesh.url + "/chat/completions"
                before = {s: cpu_seconds(pid) for s, pid in mesh.pids.items()}
                results[mesh.name].add(await load(url, headers, [body], concurrency, count))
                for service, pid in mesh.pids.items():
                    spent = cpu_seconds(pid) - before[service]
                    mesh.cpu_s[service] = mesh.cpu_s.get(service, 0.0) + spent
                mesh.requests += count
                progress.advance(task)
        progress.remove_task(task)
        rows += [Row(case, name, stats) for name, stats in results.items()]
    return rows


def cpu_table(meshes: list[Mesh]) -> list[str]:
    """CPU milliseconds per request, by process, over every measured round of each mesh
    (less sensitive to the machine's drift than requests/s; the ops service's work on a
    round's spans can finish after it, so its share is a lower bound)."""
    services = sorted({s for mesh in meshes for s in mesh.pids})
    lines = [
        "",
        "CPU milliseconds per request, by process, over all measured rounds "
        "(Linux /proc; lower is better):",
        "",
        "| mesh | " + " | ".join(services) + " | total |",
        "|---|" + "---|" * (len(services) + 1),
    ]
    for mesh in meshes:
        per = {s: mesh.cpu_s.get(s, 0.0) * 1000 / max(1, mesh.requests) for s in mesh.pids}
        cells = [f"{per[s]:.2f}" if s in per else "-" for s in services]
        lines.append(f"| {mesh.name} | " + " | ".join(cells) + f" | {sum(per.values()):.2f} |")
    return lines


def report(rows: list[Row], scraped: list[int], command: str) -> str:
    lines = [
        "# Telemetry overhead: metrics, span export and the ops loop, on and off",
        "",
        f"Produced by `{command}` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, "
        f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}. "
        "Load generator, brokers, services and the fake backend share the machine.",
        "",
        "- on: /metrics scraped every 5 s on the gateway, router and ops service; spans to "
        "telemetry.spans; the ops service reading them and running its rules every 5 s",
        "- off: MESHLLM_TELEMETRY__PROMETHEUS=false, MESHLLM_TELEMETRY__SPANS_TO_KAFKA=false, "
        "no ops service",
        f"- scrapes during the run: {len(scraped)}, "
        f"{(sum(scraped) / len(scraped) / 1024 if scraped else 0):.0f} KiB each on average",
        f"- target: on within {TARGET:.0%} of off in requests/s at concurrency 32",
        "",
        "![telemetry overhead](telemetry_overhead.png)",
        "",
        "| case | mesh | requests/s | p50 ms | p99 ms | errors |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        s = row.stats
        lines.append(
            f"| {row.case} | {row.mesh} | {s.rps:.1f} | {s.pct('total_s', 0.5):.1f} | "
            f"{s.pct('total_s', 0.99):.1f} | {s.errors} |"
        )
    lines += ["", "| case | on / off requests/s | verdict |", "|---|---|---|"]
    for case, concurrency, _ in CASES:
        on, off = (next(r.stats for r in rows if r.case == case and r.mesh == m)
                   for m in ("on", "off"))  # fmt: skip
        ratio = on.rps / off.rps if off.rps else float("nan")
        verdict = ("pass" if ratio >= 1 - TARGET else "FAIL") if concurrency > 1 else "-"
        lines.append(f"| {case} | {ratio:.3f} | {verdict} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [case for case, _, _ in CASES]
    figure, axis = plt.subplots(figsize=(7, 3.5))
    width = 0.38
    for offset, mesh in ((-width / 2, "off"), (width / 2, "on")):
        values = [next(r.stats.rps for r in rows if r.case == c and r.mesh == mesh) for c in cases]
        axis.bar([i + offset for i in range(len(cases))], values, width, label=f"telemetry {mesh}")
    axis.set_xticks(range(len(cases)), cases)
    axis.set_ylabel("requests/s")
    axis.set_title("Mesh requests/s with telemetry on and off (fake backend)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


async def main_async(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="telemetry-bench-"))
    processes = Processes(workdir)
    brokers: list[EmbeddedBroker] = []
    scraped: list[int] = []
    scraper: asyncio.Task[None] | None = None
    try:
        fake_port = free_port()
        processes.start(
            "fake",
            [sys.executable, "-m", "tests.fakes.openai_backend", "--port", str(fake_port)],
            service_env("127.0.0.1:1", workdir),
        )
        fake_url = f"http://127.0.0.1:{fake_port}"
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("starting two meshes", total=None)
            meshes = []
            for name, on in (("off", False), ("on", True)):
                mesh, broker = await start_mesh(name, processes, workdir, fake_url, on=on)
                meshes.append(mesh)
                brokers.append(broker)
            progress.remove_task(task)
            scraper = asyncio.create_task(scrape_forever(meshes[1].metrics, scraped))
            rows = await measure(meshes, args.quick, progress)
    finally:
        if scraper is not None:
            scraper.cancel()
        processes.stop()
        for broker in brokers:
            await broker.stop()
    command = COMMAND + (" --quick" if args.quick else "")
    RESULTS_DIR.mkdir(exist_ok=True)
    text = report(rows, scraped, command) + "\n".join(cpu_table(meshes)) + "\n"
    (RESULTS_DIR / "telemetry_overhead.md").write_text(text)
    plot(rows, RESULTS_DIR / "telemetry_overhead.png")
    console.print(text)
    console.print(f"wrote {RESULTS_DIR / 'telemetry_overhead.md'} (logs in {workdir})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    asyncio.run(main_async(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
