"""A release under load: clients streaming through the gateway while a candidate is loaded
beside production, takes 5, 25 and 50 % of the callers, and is promoted.

Run from the repository root::

    python -m meshbench.release_load                # 16 clients, 20 s per step
    python -m meshbench.release_load --step-s 10    # shorter

It starts ``meshllm up`` on the embedded defaults (free ports, a temporary data
directory), makes ``--callers`` API keys, and runs ``--clients`` concurrent clients, each
streaming one chat answer after another with a key drawn at random. Meanwhile it plays
the release controller's part on ``model.deployments``: a CANARY at 0% (the replica loads
the candidate; traffic opens once it answers by name), then each step in turn (renewed
every few seconds, as a controller renews its lease), then the registry's ``latest``
moves to the candidate and PROMOTE (the replica makes the candidate's engine its current
one). The candidate is the bundled model's file registered as a new version: this
measures the mechanics of shifting and swapping (failed requests, latency, the share that
reached the candidate), not a better model.

Results: ``meshbench/results/release_load.md`` (and ``.json``), and a timeline plot
``release_load.png`` (each answer's version over time, latency by phase).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from meshbench.report import machine_lines, markdown_table
from meshbench.served_bench import Mesh

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MODEL = "smollm2-135m-instruct"
CANDIDATE = "candidate-1"
PROMPTS = [
    "Name a colour.",
    "Say hello in French.",
    "What is two plus two?",
    "Name a fruit.",
    "Give me one word for happy.",
]


@dataclass
class Answer:
    started: float  # seconds since the load began
    seconds: float
    ttft_s: float | None
    model: str
    phase: str  # the phase it started in
    key_id: str = ""
    error: str = ""


@dataclass
class Phase:
    name: str
    percent: int | None  # the candidate's share asked for; None: no split


class Release:
    """Publishes the decisions on ``model.deployments`` and renews the live one."""

    def __init__(self, bootstrap: str, data_dir: Path, lease_s: int = 30) -> None:
        from shared.bus import Publisher
        from shared.settings import KafkaSettings, MeshSettings

        # the mesh's data directory holds its event key: its consumers take signed events only
        settings = MeshSettings(kafka=KafkaSettings(bootstrap=bootstrap), data_dir=data_dir)
        self.publisher = Publisher(settings, service="release-bench")
        self.lease_s = lease_s
        self.percent: int | None = None
        self._renewing: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.publisher.start()
        self._renewing = asyncio.create_task(self._renew())

    async def canary(self, percent: int) -> None:
        self.percent = percent
        await self._publish_canary()

    async def promote(self) -> None:
        from shared.events.v1 import events_pb2 as ev
        from shared.topics import MODEL_DEPLOYMENTS

        self.percent = None
        event = ev.ModelDeployment(
            model=MODEL, version=CANDIDATE, action=ev.DEPLOYMENT_ACTION_PROMOTE,
            release_id="bench",
        )  # fmt: skip
        await self.publisher.publish(MODEL_DEPLOYMENTS, event)

    async def _publish_canary(self) -> None:
        from shared.events.v1 import events_pb2 as ev
        from shared.topics import MODEL_DEPLOYMENTS

        if self.percent is None:
            return
        event = ev.ModelDeployment(
            model=MODEL, version=CANDIDATE, action=ev.DEPLOYMENT_ACTION_CANARY,
            traffic_percent=self.percent, release_id="bench", lease_s=self.lease_s,
        )  # fmt: skip
        await self.publisher.publish(MODEL_DEPLOYMENTS, event)

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)
            await self._publish_canary()

    async def stop(self) -> None:
        if self._renewing is not None:
            self._renewing.cancel()
        await self.publisher.stop()


async def ask(client: Any, key_id: str, phase: list[str], t0: float, answers: list[Answer]) -> None:
    started = time.monotonic()
    started_in = phase[0]
    first: float | None = None
    model = ""
    try:
        stream = await client.chat.completions.create(
            model=MODEL, stream=True, temperature=0, max_tokens=12,
            messages=[{"role": "user", "content": random.choice(PROMPTS)}],
        )  # fmt: skip
        async for chunk in stream:
            model = chunk.model or model
            if first is None and any(c.delta.content for c in chunk.choices):
                first = time.monotonic()
        error = ""
    except Exception as failure:  # counted: the point is that there are none
        error = f"{type(failure).__name__}: {failure}"[:300]
    ended = time.monotonic()
    answers.append(
        Answer(started - t0, ended - started, first - started if first else None, model,
               started_in, key_id, error)
    )  # fmt: skip


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    import openai

    from services.inference.registry import ModelRegistry

    mesh = Mesh(workdir)
    print("starting meshllm up (Ray, model load) ...", flush=True)
    await mesh.start()
    release = Release(f"127.0.0.1:{mesh.broker_port}", mesh.data)
    try:
        keys = [await asyncio.to_thread(mesh.create_key) for _ in range(args.callers)]
        clients = [
            openai.AsyncOpenAI(base_url=mesh.base_url, api_key=key, max_retries=0, timeout=120)
            for key in keys
        ]
        registry = ModelRegistry(mesh.data / "models")
        production = registry.resolve(MODEL, None)
        registry.register(MODEL, CANDIDATE, production.path, copy=False, status="candidate")
        await release.start()
        answers: list[Answer] = []
        phase = ["production"]
        phases: list[tuple[float, str]] = []
        t0 = time.monotonic()
        stop = asyncio.Event()

        key_ids = [key.split("-")[1] for key in keys]

        async def client_loop() -> None:
            while not stop.is_set():
                i = random.randrange(len(clients))
                await ask(clients[i], key_ids[i], phase, t0, answers)

        def enter(name: str) -> None:
            phase[0] = name
            phases.append((time.monotonic() - t0, name))
            print(f"{time.monotonic() - t0:6.1f} s  {name}", flush=True)

        loops = [asyncio.create_task(client_loop()) for _ in range(args.clients)]
        enter("production")
        await asyncio.sleep(args.step_s)
        enter("prepare (candidate loading, 0%)")
        await release.canary(0)
        await served_by_name(clients[0], timeout=300)
        for percent in (5, 25, 50):
            enter(f"{percent}%")
            await release.canary(percent)
            await asyncio.sleep(args.step_s)
        registry.promote(MODEL, CANDIDATE)
        enter("promoted")
        await release.promote()
        await asyncio.sleep(args.step_s)
        stop.set()
        await asyncio.gather(*loops)
        return report(vars(args), [asdict(a) for a in answers], phases, production.version,
                      key_ids)  # fmt: skip
    finally:
        await release.stop()
        await asyncio.to_thread(mesh.stop)


async def served_by_name(client: Any, timeout: float) -> None:
    """Until the candidate answers when asked for by name (the replica has loaded it)."""
    import openai

    deadline = time.monotonic() + timeout
    while True:
        try:
            await client.chat.completions.create(
                model=f"{MODEL}:{CANDIDATE}", max_tokens=1,
                messages=[{"role": "user", "content": "Hi"}],
            )  # fmt: skip
            return
        except openai.NotFoundError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


def report(
    args: dict[str, Any], timeline: list[dict[str, Any]], phases: list[tuple[float, str]],
    production: str, key_ids: list[str], *, run_at: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The results: per phase (an answer counts in the phase it started in), the answers,
    failures, the share the candidate answered, and how many callers the router's own hash
    sends there at that step."""
    from shared.release_split import bucket

    rows = []
    for _, name in phases:
        percent = int(name.split("%")[0]) if name[0].isdigit() else None
        hashed = (
            sum(bucket(MODEL, "bench", f"key:{k}") < percent for k in key_ids)
            if percent is not None
            else None
        )
        mine = [a for a in timeline if a["phase"] == name]
        done = [a for a in mine if not a["error"]]
        on_candidate = sum(a["model"].endswith(f":{CANDIDATE}") for a in done)
        latencies = sorted(a["seconds"] for a in done)
        ttfts = sorted(a["ttft_s"] for a in done if a["ttft_s"] is not None)
        rows.append({
            "phase": name,
            "answers": len(mine),
            "failed": len(mine) - len(done),
            "on_candidate": on_candidate,
            "candidate_share": on_candidate / len(done) if done else None,
            "callers_hashed_to_candidate": hashed,
            "latency_p50_s": statistics.median(latencies) if latencies else None,
            # nearest rank: below 100 answers, the slowest
            "latency_p99_s": latencies[max(0, math.ceil(0.99 * len(latencies)) - 1)]
            if latencies else None,
            "ttft_p50_s": statistics.median(ttfts) if ttfts else None,
        })  # fmt: skip
    return {
        "run_at": run_at or time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": _commit(),
        "clients": args["clients"],
        "callers": args["callers"],
        "step_s": args["step_s"],
        "production_version": production,
        "candidate_version": CANDIDATE,
        "answers": len(timeline),
        "failed": sum(bool(a["error"]) for a in timeline),
        "errors": sorted({a["error"] for a in timeline if a["error"]})[:10],
        "phases": rows,
        "phase_starts": phases,
        "key_ids": key_ids,
        "timeline": timeline,
        "machine": machine_lines(),
    }


def _commit() -> str:
    import subprocess

    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=RESULTS_DIR.parent,
                          capture_output=True, text=True, check=False)  # fmt: skip
    return done.stdout.strip() or "unknown"


def write(results: dict[str, Any]) -> None:
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / "release_load.json").write_text(json.dumps(results, indent=1) + "\n")

    def fmt(value: float | None, scale: float = 1.0, digits: int = 2) -> str:
        return "—" if value is None else f"{value * scale:.{digits}f}"

    table = markdown_table(
        ["phase", "answers", "failed", "on candidate", "share", "callers sent there",
         "p50 s", "p99 s", "TTFT p50 s"],
        [
            [r["phase"], str(r["answers"]), str(r["failed"]), str(r["on_candidate"]),
             fmt(r["candidate_share"], 100, 0) + ("%" if r["candidate_share"] is not None else ""),
             "—" if r["callers_hashed_to_candidate"] is None
             else f"{r['callers_hashed_to_candidate']} of {results['callers']}",
             fmt(r["latency_p50_s"]), fmt(r["latency_p99_s"]), fmt(r["ttft_p50_s"])]
            for r in results["phases"]
        ],
    )  # fmt: skip
    lines = [
        "# A release under load",
        "",
        f"`python -m meshbench.release_load --clients {results['clients']} --callers "
        f"{results['callers']} --step-s {results['step_s']:g}`: `meshllm up` on the embedded "
        f"defaults; {results['clients']} clients stream 12-token chat answers through the "
        f"gateway, one after another, each with one of {results['callers']} API keys drawn at "
        "random; the release is moved on model.deployments as a controller would "
        "(0% while the candidate loads, then 5, 25, 50%, then promote). The candidate is "
        "the bundled model's file registered as a new version (the mechanics, not a better "
        "model). Failed requests must be 0.",
        "",
        f"Run at {results['run_at']} (commit {results['commit']})."
        + (f" Note: {results['note']}." if results.get("note") else ""),
        "",
        f"**{results['answers']} answers, {results['failed']} failed.**",
        "",
        table,
        "",
        "The share is of callers, not of requests: a caller (an API key) stays on one "
        "version for the whole release, so the share of answers follows how many of the "
        'callers the hash put below the step ("callers sent there", computed from the '
        "keys with the router's own hash), not the step itself. An answer counts in the "
        "phase it started in. p99 is the nearest rank: below 100 answers it is the slowest.",
        "",
        *[f"- {line}" for line in results["machine"]],
    ]
    if results["errors"]:
        lines += ["", "Errors:", *[f"- `{e}`" for e in results["errors"]]]
    (RESULTS_DIR / "release_load.md").write_text("\n".join(lines) + "\n")
    plot(results, RESULTS_DIR / "release_load.png")


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timeline = results["timeline"]
    figure, (share_axis, latency_axis) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for version, colour in ((CANDIDATE, "tab:orange"), (results["production_version"], "tab:blue")):
        mine = [a for a in timeline if not a["error"] and a["model"].endswith(f":{version}")]
        latency_axis.scatter([a["started"] for a in mine], [a["seconds"] for a in mine], s=6,
                             color=colour, label=version)  # fmt: skip
    failed = [a for a in timeline if a["error"]]
    if failed:
        latency_axis.scatter([a["started"] for a in failed], [0] * len(failed), marker="x",
                             color="red", label="failed")  # fmt: skip
    width = 5.0
    end = max((a["started"] for a in timeline), default=0.0)
    bins = [i * width for i in range(int(end / width) + 1)]
    shares = []
    for start in bins:
        done = [a for a in timeline if start <= a["started"] < start + width and not a["error"]]
        on = sum(a["model"].endswith(f":{CANDIDATE}") for a in done)
        shares.append(100 * on / len(done) if done else float("nan"))
    share_axis.step(bins, shares, where="post", color="tab:orange")
    for at, name in results["phase_starts"]:
        for axis in (share_axis, latency_axis):
            axis.axvline(at, color="grey", linewidth=0.6, linestyle="--")
        share_axis.text(at, 102, name.split(" ")[0], fontsize=7, rotation=30)
    share_axis.set_ylabel("answers by the candidate (%)")
    share_axis.set_ylim(0, 110)
    latency_axis.set_ylabel("answer latency (s)")
    latency_axis.set_xlabel("seconds since the load began")
    latency_axis.legend(loc="upper left", fontsize=7)
    figure.suptitle(f"A release under load: {results['clients']} clients, "
                    f"{results['failed']} failed of {results['answers']}")  # fmt: skip
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--callers", type=int, default=64, help="API keys the clients draw from")
    parser.add_argument("--step-s", type=float, default=20.0, help="seconds per phase")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="release-load-") as workdir:
        results = asyncio.run(run(args, Path(workdir)))
    write(results)
    print(f"{results['answers']} answers, {results['failed']} failed; "
          f"results in {RESULTS_DIR / 'release_load.md'}")  # fmt: skip


if __name__ == "__main__":
    main()
