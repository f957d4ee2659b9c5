"""A load ramp with the ops loop's scaling: with the queue-driven scale-out, and without.

Run from the repository root (``just bench-ops-ramp``)::

    python -m meshbench.ops_ramp [--quick]

The mesh of :mod:`meshbench.ops_loop` (the real model, its engine slowed by fault
injection so that a second replica adds capacity on two cores; drill timings), run twice
with closed-loop streaming clients in steps of 1 → 8 → 32:

- **queue + P99**: the shipped policy: scale out on the router's backlog in Kafka
  (more than 8 requests per replica) or on P99;
- **P99 only**: ``MESHLLM_OPS__SCALING__CHAT__OUT_WAITING_PER_REPLICA=1000000``, a queue
  no ramp fills, so only the latency of answers already given can ask for a replica.

Per step and run: P99 time to first token, P99 latency, error rate, answers/s, and the
chat replicas at the step's end; plotted over time. Results:
``meshbench/results/ops_ramp.md``, ``ops_ramp.json`` and ``ops_ramp.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
from rich.progress import Progress

from meshbench.mesh_bench import Processes, console, one_request
from meshbench.ops_loop import MODEL, RESULTS_DIR, Drill, Event, read_events, start
from shared.bus.embedded import EmbeddedBroker

COMMAND = "python -m meshbench.ops_ramp"
STEPS = (1, 8, 32)
RUNS = {
    "queue + P99": {},
    # a queue no ramp fills: only the P99 can ask for a replica
    "P99 only": {"MESHLLM_OPS__SCALING__CHAT__OUT_WAITING_PER_REPLICA": "1000000"},
}


@dataclass
class Done:
    sent_s: float
    ttft_s: float
    total_s: float
    ok: bool


@dataclass
class Run:
    name: str
    step_s: float
    answers: list[Done] = field(default_factory=list)
    drill: Drill = field(default_factory=lambda: Drill([]))


async def ramp(run: Run, url: str, key: str, progress: Progress) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Name a colour."}],
            "max_tokens": 4, "temperature": 0, "ignore_eos": True, "stream": True}  # fmt: skip
    headers = {"authorization": f"Bearer {key}"}
    task = progress.add_task(run.name, total=run.step_s * len(STEPS))
    origin = time.perf_counter()
    run.drill.started_wall = time.time()
    limits = httpx.Limits(max_connections=128, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:

        async def client_loop(until_s: float) -> None:
            while (sent := time.perf_counter() - origin) < until_s:
                try:
                    sample = await one_request(client, f"{url}/chat/completions", headers, body)
                    run.answers.append(Done(sent, sample.ttft_s, sample.total_s, True))
                except httpx.HTTPError:
                    run.answers.append(Done(sent, 0.0, time.perf_counter() - origin - sent, False))
                progress.update(task, completed=min(time.perf_counter() - origin, until_s))

        loops: list[asyncio.Task[None]] = []
        for index, clients in enumerate(STEPS):
            until = run.step_s * len(STEPS)
            start_s = run.step_s * index
            run.drill.events.append(Event(start_s, "phase", f"{clients} clients"))
            while time.perf_counter() - origin < start_s:
                await asyncio.sleep(0.05)
            added = clients - (STEPS[index - 1] if index else 0)
            loops += [asyncio.create_task(client_loop(until)) for _ in range(added)]
        await asyncio.gather(*loops)
    progress.remove_task(task)


def per_step(run: Run) -> list[dict[str, float]]:
    rows = []
    for index, clients in enumerate(STEPS):
        low, high = run.step_s * index, run.step_s * (index + 1)
        part = [a for a in run.answers if low <= a.sent_s < high]
        ok = [a for a in part if a.ok]
        replicas = [int(e.text.rsplit(":", 1)[1]) for e in run.drill.events
                    if e.kind == "replicas" and e.at_s < high]  # fmt: skip
        rows.append({
            "clients": clients,
            "answers_per_s": len(ok) / (high - low),
            "error_rate": (len(part) - len(ok)) / len(part) if part else 0.0,
            "ttft_p99_ms": _p99([a.ttft_s for a in ok]),
            "p99_ms": _p99([a.total_s for a in ok]),
            "replicas_at_end": replicas[-1] if replicas else float("nan"),
        })  # fmt: skip
    return rows


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))] * 1000


def report(runs: list[Run], rows: dict[str, list[dict[str, float]]]) -> str:
    lines = [
        "# A load ramp with the ops loop's scaling: queue-driven scale-out, and without",
        "",
        f"Command: `{COMMAND}`, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.machine()}; "
        "the set-up is meshbench/ops_loop.py's (engine slowed by fault injection, drill "
        f"timings); closed-loop streaming clients, {runs[0].step_s:.0f} s per step.",
        "",
        "| policy | clients | answers/s | errors | TTFT P99 (ms) | P99 (ms) | replicas at end |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        for row in rows[run.name]:
            lines.append(
                f"| {run.name} | {row['clients']:.0f} | {row['answers_per_s']:.1f} | "
                f"{row['error_rate']:.1%} | {row['ttft_p99_ms']:.0f} | {row['p99_ms']:.0f} | "
                f"{row['replicas_at_end']:.0f} |"
            )
    for run in runs:
        lines += ["", f"## Events: {run.name}", "", "| at (s) | event | detail |", "|---:|---|---|"]
        lines += [f"| {e.at_s:.1f} | {e.kind} | {e.text} |" for e in run.drill.events]
    return "\n".join(lines) + "\n"


def plot(runs: list[Run], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (top, bottom) = plt.subplots(2, 1, figsize=(11, 6.5), sharex=True,
                                         height_ratios=[3, 1])  # fmt: skip
    for run, colour in zip(runs, ("tab:blue", "tab:orange"), strict=False):
        ok = sorted((a for a in run.answers if a.ok), key=lambda a: a.sent_s)
        buckets: dict[int, list[float]] = {}
        for a in ok:
            buckets.setdefault(int(a.sent_s // 5), []).append(a.ttft_s)
        xs = [k * 5 + 2.5 for k in sorted(buckets)]
        top.plot(xs, [_p99(buckets[k]) for k in sorted(buckets)], color=colour,
                 label=f"{run.name}: TTFT P99 per 5 s")  # fmt: skip
        counts = [(e.at_s, int(e.text.rsplit(":", 1)[1])) for e in run.drill.events
                  if e.kind == "replicas"]  # fmt: skip
        if counts:
            end = run.step_s * len(STEPS)
            bottom.step([c[0] for c in counts] + [end], [c[1] for c in counts] + [counts[-1][1]],
                        where="post", color=colour, label=run.name)  # fmt: skip
    for index, clients in enumerate(STEPS):
        top.axvline(runs[0].step_s * index, color="grey", linestyle=":", linewidth=1)
        top.text(runs[0].step_s * index + 1, 0.9, f"{clients} clients",
                 transform=top.get_xaxis_transform(), fontsize=8)  # fmt: skip
    top.set_yscale("log")
    top.set_ylabel("time to first token (ms)")
    top.legend(loc="upper left", fontsize=8)
    top.set_title("Load ramp: scale-out on the queue and P99, and on P99 only")
    bottom.set_ylabel("chat replicas")
    bottom.set_ylim(0, 3)
    bottom.set_xlabel("seconds since the ramp started")
    bottom.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


async def one_run(name: str, ops_env: dict[str, str], step_s: float, workdir: Path,
                  bar: Progress) -> Run:  # fmt: skip
    run = Run(name, step_s)
    workdir.mkdir(parents=True, exist_ok=True)
    broker = EmbeddedBroker(log_file=workdir / "broker.log")
    await broker.start()
    processes = Processes(workdir)
    try:
        task = bar.add_task(f"starting the mesh ({name})", total=None)
        url, key = await start(processes, workdir, broker.bootstrap, ops_env)
        bar.remove_task(task)
        await ramp(run, url, key, bar)
        await asyncio.sleep(5)
        await read_events(run.drill, broker.bootstrap)
    finally:
        processes.stop()
        await broker.stop()
    return run


async def main_async(args: argparse.Namespace) -> None:
    step_s = 40.0 if args.quick else 60.0
    runs = []
    with tempfile.TemporaryDirectory(prefix="ops-ramp-") as tmp, Progress(console=console) as bar:
        root = Path(args.workdir or tmp)
        for index, (name, env) in enumerate(RUNS.items()):
            runs.append(await one_run(name, env, step_s, root / f"run{index}", bar))
    rows = {run.name: per_step(run) for run in runs}
    text = report(runs, rows)
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / "ops_ramp.md").write_text(text)
    kept = {
        run.name: {
            "rows": rows[run.name],
            "answers": [asdict(a) for a in run.answers],
            "events": [asdict(e) for e in run.drill.events],
        }
        for run in runs
    }
    (RESULTS_DIR / "ops_ramp.json").write_text(json.dumps(kept, indent=1))
    plot(runs, RESULTS_DIR / "ops_ramp.png")
    console.print(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="40 s steps instead of 60 s")
    parser.add_argument("--workdir", help="keep the services' data and logs here (a new folder)")
    asyncio.run(main_async(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
