"""How long a rating takes to become a dataset candidate, and what a dataset build costs.

Run from the repository root (``just bench-feedback``)::

    python -m meshbench.feedback_bench [--quick]

One mesh on the embedded broker: gateway, router, audit and feedback services in front of
the fake OpenAI-compatible backend (``tests/fakes/openai_backend.py``; the model does not
matter here). Steps:

1. **Answers**: N chat requests through the gateway, each answer's ``x-request-id`` kept.
2. **Ratings**: each answer rated through ``POST /v1/feedback`` at a steady rate (a
   correction on every third), then read back with ``GET /v1/feedback?request_id=`` until
   it is there: the time from the POST to the stored example is when the rating becomes a
   candidate of the next dataset build. Target (the feedback issue's): p95 within 60 s.
3. **Build**: one ``POST /v1/datasets`` over all of them; its wall time and rows.

No peer runs here: no other open platform rates answers joined with a tamper-evident audit
log in the same way, so this is our own figure against the target, not a comparison.
Results: ``meshbench/results/feedback.md`` and ``feedback.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
from rich.progress import Progress

from meshbench.mesh_bench import Processes, admin_key, console, service_env, wait_ready
from shared.bus.embedded import EmbeddedBroker, free_port

RESULTS_DIR = Path(__file__).resolve().parent / "results"
COMMAND = "python -m meshbench.feedback_bench"
TARGET_P95_S = 60.0
SERVICES = ("router", "audit", "feedback", "gateway")


@dataclass
class Result:
    answers: int
    rate_per_s: float
    accepted: int = 0
    refused: dict[int, int] = field(default_factory=dict)
    latencies_s: list[float] = field(default_factory=list)
    build_s: float = 0.0
    build_rows: int = 0
    build_counts: dict[str, int] = field(default_factory=dict)


async def start(processes: Processes, bootstrap: str, data: Path, fake_url: str) -> tuple[str, str]:
    """The mesh's services; returns (gateway /v1 URL, an admin key)."""
    key = admin_key(data)
    audit_port, feedback_port, gateway_port = free_port(), free_port(), free_port()
    health = {name: free_port() for name in SERVICES}
    pools = json.dumps([{"name": "cpu", "replicas": [fake_url], "max_concurrency": 64}])
    shared = {
        "MESHLLM_AUDIT_API_PORT": str(audit_port),
        "MESHLLM_AUDIT_URL": f"http://127.0.0.1:{audit_port}",
        "MESHLLM_AUDIT__SERVICE_URL": f"http://127.0.0.1:{audit_port}",
        "MESHLLM_FEEDBACK_API_PORT": str(feedback_port),
        "MESHLLM_FEEDBACK__SERVICE_URL": f"http://127.0.0.1:{feedback_port}",
        "MESHLLM_TELEMETRY__KAFKA_SPANS": "answers",  # the default
    }
    extra = {
        "router": {"MESHLLM_POOLS": pools},
        "gateway": {"MESHLLM_HTTP_PORT": str(gateway_port), "MESHLLM_MODELS": '["fake-model"]'},
    }
    for name in SERVICES:
        env = service_env(bootstrap, data, MESHLLM_HEALTH_PORT=str(health[name]), **shared,
                          **extra.get(name, {}))  # fmt: skip
        processes.start(name, [sys.executable, "-m", f"services.{name}"], env)
    for name in SERVICES:
        await wait_ready(f"http://127.0.0.1:{health[name]}/readyz", processes, name, 90)
    return f"http://127.0.0.1:{gateway_port}/v1", key


async def answers(client: httpx.AsyncClient, count: int, progress: Progress) -> list[str]:
    """``count`` answers through the gateway; their request ids."""
    task = progress.add_task("answers", total=count)
    found: list[str] = []
    queue = iter(range(count))

    async def worker() -> None:
        for n in queue:
            question = {"role": "user", "content": f"question {n}: how do I reset it?"}
            body = {"model": "fake-model", "max_tokens": 8, "messages": [question]}
            reply = await client.post("/chat/completions", json=body)
            reply.raise_for_status()
            found.append(reply.headers["x-request-id"])
            progress.advance(task)

    await asyncio.gather(*(worker() for _ in range(16)))
    progress.remove_task(task)
    return found


async def rate_all(
    client: httpx.AsyncClient, request_ids: list[str], result: Result, progress: Progress
) -> None:
    """Rate each answer at ``result.rate_per_s`` and time it until it is stored."""
    task = progress.add_task("ratings stored", total=len(request_ids))
    begin = time.monotonic()

    async def one(n: int, request_id: str) -> None:
        await asyncio.sleep(max(0.0, begin + n / result.rate_per_s - time.monotonic()))
        body: dict[str, object] = {"request_id": request_id, "rating": "up" if n % 3 else "down"}
        if n % 3 == 0:
            body["correction"] = f"Open the portal and choose Reset ({n})."
        sent = time.monotonic()
        reply = await client.post("/feedback", json=body)
        if reply.status_code != 202:
            result.refused[reply.status_code] = result.refused.get(reply.status_code, 0) + 1
            progress.advance(task)
            return
        result.accepted += 1
        while True:
            seen = await client.get("/feedback", params={"request_id": request_id})
            if seen.status_code == 200 and seen.json()["data"]:
                result.latencies_s.append(time.monotonic() - sent)
                break
            if time.monotonic() - sent > 300:
                break  # counted as missing
            await asyncio.sleep(0.1)
        progress.advance(task)

    await asyncio.gather(*(one(n, rid) for n, rid in enumerate(request_ids)))
    progress.remove_task(task)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def report(result: Result, command: str) -> str:
    lat = result.latencies_s
    missing = result.accepted - len(lat)
    p95 = percentile(lat, 0.95)
    verdict = "pass" if lat and missing == 0 and p95 <= TARGET_P95_S else "FAIL"
    lines = [
        "# Feedback: from a rating to a dataset candidate, and a dataset build",
        "",
        f"Produced by `{command}` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, "
        f"{platform.machine()}, Python {platform.python_version()}. The load generator, the "
        "embedded broker and the gateway, router, audit and feedback services (SQLite store) "
        "share this machine; the answers come from the fake backend.",
        "",
        "No peer ran: this is our figure against the feedback issue's target (p95 within "
        f"{TARGET_P95_S:.0f} s), not a comparison.",
        "",
        "![feedback](feedback.png)",
        "",
        "| measure | value |",
        "|---|---|",
        f"| answers rated | {result.answers} at {result.rate_per_s:g} ratings/s |",
        f"| accepted (202) / refused | {result.accepted} / {sum(result.refused.values())} "
        f"{result.refused or ''} |",
        f"| stored / missing after 300 s | {len(lat)} / {missing} |",
        f"| rating to stored, p50 / p95 / p99 / max ms | {percentile(lat, 0.5) * 1000:.0f} / "
        f"{p95 * 1000:.0f} / {percentile(lat, 0.99) * 1000:.0f} / "
        f"{max(lat, default=float('nan')) * 1000:.0f} |",
        f"| mean ms | {statistics.fmean(lat) * 1000 if lat else float('nan'):.0f} |",
        f"| dataset build over every rating | {result.build_s:.2f} s, {result.build_rows} rows |",
        f"| build counts | {json.dumps(result.build_counts)} |",
        "",
        f"Target: p95 from rating to stored within {TARGET_P95_S:.0f} s, none missing: "
        f"**{verdict}**.",
        "",
    ]
    return "\n".join(lines)


def plot(result: Result, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    values = sorted(v * 1000 for v in result.latencies_s)
    if values:
        ax.plot(values, [(i + 1) / len(values) for i in range(len(values))], label="ours")
    ax.axvline(TARGET_P95_S * 1000, color="red", linestyle="--", label="target (p95)")
    ax.set_xscale("log")
    ax.set_xlabel("rating to stored example (ms, log)")
    ax.set_ylabel("share of ratings")
    ax.set_title(f"{result.accepted} ratings at {result.rate_per_s:g}/s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


async def main_async(args: argparse.Namespace) -> None:
    count, rate = (100, 10.0) if args.quick else (600, 20.0)
    workdir = Path(tempfile.mkdtemp(prefix="feedback-bench-"))
    processes = Processes(workdir)
    broker = EmbeddedBroker(log_file=workdir / "broker.log")
    result = Result(count, rate)
    await broker.start()
    try:
        fake_port = free_port()
        processes.start(
            "fake",
            [sys.executable, "-m", "tests.fakes.openai_backend", "--port", str(fake_port)],
            service_env("127.0.0.1:1", workdir),
        )
        with Progress(console=console, transient=True) as progress:
            starting = progress.add_task("starting the mesh", total=None)
            url, key = await start(processes, broker.bootstrap, workdir,
                                   f"http://127.0.0.1:{fake_port}")  # fmt: skip
            progress.remove_task(starting)
            headers = {"authorization": f"Bearer {key}"}
            limits = httpx.Limits(max_connections=256)
            async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120,
                                         limits=limits) as client:  # fmt: skip
                request_ids = await answers(client, count, progress)
                await rate_all(client, request_ids, result, progress)
                building = progress.add_task("building a dataset", total=None)
                began = time.monotonic()
                reply = await client.post("/datasets", json={"name": "bench", "min_rating": 1})
                result.build_s = time.monotonic() - began
                progress.remove_task(building)
                reply.raise_for_status()
                made = reply.json()
                result.build_rows = made["rows"]
                result.build_counts = {k: v for k, v in made["counts"].items() if v}
    finally:
        processes.stop()
        await broker.stop()
    command = COMMAND + (" --quick" if args.quick else "")
    RESULTS_DIR.mkdir(exist_ok=True)
    text = report(result, command)
    (RESULTS_DIR / "feedback.md").write_text(text)
    plot(result, RESULTS_DIR / "feedback.png")
    console.print(text)
    console.print(f"wrote {RESULTS_DIR / 'feedback.md'} (logs in {workdir})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="100 ratings at 10/s")
    asyncio.run(main_async(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
