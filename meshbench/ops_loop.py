"""The ops loop's drill: a load one chat replica cannot carry, alert, scale-out, recovery.

Run from the repository root (``just bench-ops-loop``)::

    python -m meshbench.ops_loop [--quick]

One mesh on an embedded broker: the real inference service (Ray Serve, SmolLM2, the torch
engine), router, gateway and the ops service. The engine is made slow on purpose with
the fault-injection setting ``MESHLLM_ENGINE__FAULT_STEP_DELAY_MS`` (each step waits
50 ms more) and a batch of 2, so that one replica's capacity is bounded by time rather
than by this machine's two cores, and a second replica really adds capacity. Requests
arrive open-loop (a fixed rate, whatever the answers do) through the gateway:

1. **calm** — a rate one replica carries;
2. **surge** — about 1.3x one replica's capacity: its queue grows, P99 passes 500 ms, the
   ``LatencyP99High`` alert fires after its ``for``, the scaler asks for a second chat
   replica (``ops.scaling``), the inference service starts it through Serve, P99 comes
   back and the alert resolves;
   100 s into the surge, with two replicas carrying it, one chat replica's process is
   killed (SIGKILL): the requests it held fail, ``ErrorRateHigh`` fires and resolves once
   they leave its window, and Serve starts a replacement;
3. **calm** again — the scaler takes the idle replica away.

The rules and the scaler's timings are compressed for a drill of minutes (``for`` 10 s,
windows 20-30 s, cooldowns 30 s, buckets 2 s; the shipped defaults are minutes): the
same code, faster clocks. The timeline comes from the events themselves (``ops.alerts``,
``ops.scaling``, ``model.status``) and the answers the load generator saw.

Results: ``meshbench/results/ops_loop.md``, ``ops_loop.json`` and ``ops_loop.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
from aiokafka import AIOKafkaConsumer
from rich.progress import Progress

from meshbench.mesh_bench import Processes, admin_key, console, service_env, wait_ready
from shared.bus.embedded import EmbeddedBroker, free_port
from shared.events.v1 import events_pb2 as ev
from shared.topics import MODEL_STATUS, OPS_ALERTS, OPS_SCALING, Topic

RESULTS_DIR = Path(__file__).resolve().parent / "results"
COMMAND = "python -m meshbench.ops_loop"
MODEL = "smollm2-135m-instruct"
MAX_TOKENS = 4
SLO_S = 0.5

RULES = """
rules:
  - name: LatencyP99High
    indicator: p99_s
    threshold: 0.5
    clear: 0.45
    for_s: 10
    clear_for_s: 20
    window_s: 30
    by: [model]
    min_requests: 10
    severity: page
    summary: P99 latency above 500 ms (drill timings)

  - name: ErrorRateHigh
    indicator: error_rate
    threshold: 0.001
    clear: 0.0005
    for_s: 5
    clear_for_s: 20
    window_s: 30
    by: [model]
    min_requests: 10
    severity: page
    summary: error rate above 0.1% (drill timings)
"""

ENGINE = {
    "MESHLLM_ENGINE__FAULT_STEP_DELAY_MS": "50",
    "MESHLLM_ENGINE__MAX_BATCH": "2",
    "MESHLLM_SERVE__CHAT_NUM_CPUS": "0.5",
    "MESHLLM_SERVE__CHAT_MAX_REPLICAS": "2",
    "MESHLLM_SERVE__EMBEDDINGS_REPLICAS": "0",
    "MESHLLM_TORCH_THREADS": "1",
}
OPS = {
    "MESHLLM_OPS__BUCKET_S": "2",
    "MESHLLM_OPS__KEEP_S": "120",
    "MESHLLM_OPS__EVALUATE_EVERY_S": "2",
    "MESHLLM_OPS__SCALING__CHAT__MAX_REPLICAS": "2",
    "MESHLLM_OPS__SCALING__CHAT__WINDOW_S": "20",
    "MESHLLM_OPS__SCALING__CHAT__MIN_REQUESTS": "10",
    "MESHLLM_OPS__SCALING__CHAT__OUT_WAITING_PER_REPLICA": "8",  # a batch of 2 here, not 16
    "MESHLLM_OPS__SCALING__CHAT__OUT_FOR_S": "6",
    "MESHLLM_OPS__SCALING__CHAT__OUT_COOLDOWN_S": "30",
    "MESHLLM_OPS__SCALING__CHAT__IN_P99_S": "0.4",
    "MESHLLM_OPS__SCALING__CHAT__IN_CONCURRENCY_PER_REPLICA": "1.0",
    "MESHLLM_OPS__SCALING__CHAT__IN_FOR_S": "30",
    "MESHLLM_OPS__SCALING__CHAT__IN_COOLDOWN_S": "30",
}


@dataclass
class Answer:
    sent_s: float  # since the load started
    seconds: float
    status: int


@dataclass
class Event:
    at_s: float  # since the load started
    kind: str
    text: str


@dataclass
class Drill:
    phases: list[tuple[str, float, float]]  # (name, rate per second, seconds)
    kill_at_s: float | None = None  # when one chat replica's process gets SIGKILL
    answers: list[Answer] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    started_wall: float = 0.0


async def start(
    processes: Processes, workdir: Path, bootstrap: str, ops_env: dict[str, str] | None = None
) -> tuple[str, str]:
    """The drill's mesh (``ops_env``: more settings of the ops service); (gateway URL, key)."""
    data_dir = workdir / "data"
    data_dir.mkdir()
    rules = workdir / "rules.yaml"
    rules.write_text(RULES)
    key = admin_key(data_dir)
    port = {name: free_port() for name in ("serve", "inference", "router", "gateway", "ops")}
    gateway_port = free_port()
    pools = json.dumps([{"name": "cpu", "replicas": [f"http://127.0.0.1:{port['serve']}"],
                         "max_concurrency": 256}])  # fmt: skip
    envs = {
        "inference": {"MESHLLM_SERVE__HTTP_PORT": str(port["serve"]), **ENGINE},
        "router": {"MESHLLM_POOLS": pools},
        "gateway": {"MESHLLM_HTTP_PORT": str(gateway_port), "MESHLLM_MODELS": json.dumps([MODEL])},
        "ops": {"MESHLLM_OPS__RULES_FILE": str(rules), **OPS, **(ops_env or {})},
    }
    for name, env in envs.items():
        processes.start(
            name,
            [sys.executable, "-m", f"services.{name}"],
            service_env(bootstrap, data_dir, MESHLLM_HEALTH_PORT=str(port[name]), **env),
        )
    for name in envs:
        timeout = 300 if name == "inference" else 60
        await wait_ready(f"http://127.0.0.1:{port[name]}/readyz", processes, name, timeout)
    return f"http://127.0.0.1:{gateway_port}/v1", key


async def run_load(drill: Drill, url: str, key: str, progress: Progress) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Name a colour."}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
    }
    headers = {"authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=256)
    total_s = sum(seconds for _, _, seconds in drill.phases)
    task = progress.add_task("drill", total=total_s)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        pending: set[asyncio.Task[None]] = set()
        origin = time.perf_counter()
        drill.started_wall = time.time()

        async def one(sent_s: float) -> None:
            started = time.perf_counter()
            try:
                status = (await client.post(f"{url}/chat/completions", json=body,
                                            headers=headers)).status_code  # fmt: skip
            except httpx.HTTPError:
                status = 0
            drill.answers.append(Answer(sent_s, time.perf_counter() - started, status))

        killer = asyncio.create_task(kill_a_replica(drill, origin))
        offset = 0.0
        for name, rate, seconds in drill.phases:
            drill.events.append(Event(offset, "phase", f"{name}: {rate:g} requests/s"))
            sent = 0
            while (now := time.perf_counter() - origin) < offset + seconds:
                due = offset + sent / rate
                if due > now:
                    await asyncio.sleep(due - now)
                    continue
                task_ = asyncio.create_task(one(due))
                pending.add(task_)
                task_.add_done_callback(pending.discard)
                sent += 1
                progress.update(task, completed=min(total_s, now))
            offset += seconds
        await asyncio.gather(*pending, killer)
    progress.remove_task(task)


async def kill_a_replica(drill: Drill, origin: float) -> None:
    """A failing replica: SIGKILL one chat replica's process (Serve starts another)."""
    if drill.kill_at_s is None:
        return
    await asyncio.sleep(max(0.0, drill.kill_at_s - (time.perf_counter() - origin)))
    found = await asyncio.create_subprocess_exec(
        "pgrep", "-f", "ServeReplica:inference:ChatDeployment", stdout=asyncio.subprocess.PIPE
    )
    out, _ = await found.communicate()
    pids = [int(pid) for pid in out.split()]
    at = time.perf_counter() - origin
    if not pids:
        drill.events.append(Event(at, "fault", "no chat replica process found to kill"))
        return
    os.kill(pids[0], signal.SIGKILL)
    drill.events.append(
        Event(at, "fault", f"chat replica killed (pid {pids[0]}, 1 of {len(pids)})")
    )


async def read_events(drill: Drill, bootstrap: str) -> None:
    """Every alert, scaling decision and replica count the mesh published."""
    topics: dict[str, Topic] = {t.name: t for t in (OPS_ALERTS, OPS_SCALING, MODEL_STATUS)}
    consumer = AIOKafkaConsumer(*topics, bootstrap_servers=bootstrap,
                                auto_offset_reset="earliest", enable_auto_commit=False)  # fmt: skip
    await consumer.start()
    last_count: int | None = None
    try:
        batches = await consumer.getmany(timeout_ms=5000, max_records=100_000)
        records = sorted((r for rs in batches.values() for r in rs), key=lambda r: r.timestamp)
        for record in records:
            message = topics[record.topic].messages[0]()
            message.ParseFromString(record.value)
            at = record.timestamp / 1000 - drill.started_wall
            if isinstance(message, ev.OpsAlert):
                state = "firing" if message.state == ev.ALERT_STATE_FIRING else "resolved"
                shown = (f"{message.value:.1%}" if message.rule == "ErrorRateHigh"
                         else f"{message.value * 1000:.0f} ms")  # fmt: skip
                text = f"{message.rule} {state} (value {shown})"
                drill.events.append(Event(at, f"alert {state}", text))
            elif isinstance(message, ev.ScalingDecision):
                text = (f"{message.deployment} {message.current_replicas} -> "
                        f"{message.target_replicas} ({message.reason})")  # fmt: skip
                drill.events.append(Event(at, "scaling", text))
            elif isinstance(message, ev.ModelStatus) and message.replicas != last_count:
                last_count = message.replicas
                drill.events.append(
                    Event(at, "replicas", f"{message.deployment}: {message.replicas}")
                )
    finally:
        await consumer.stop()
    drill.events.sort(key=lambda e: e.at_s)


def windows(drill: Drill, step_s: float = 5.0) -> list[dict[str, float]]:
    """Per ``step_s`` of send time: requests, errors, P50 and P99 as the client saw them."""
    rows = []
    end = max((a.sent_s for a in drill.answers), default=0.0)
    at = 0.0
    while at <= end:
        part = [a for a in drill.answers if at <= a.sent_s < at + step_s]
        ok = sorted(a.seconds for a in part if a.status == 200)
        row = {"at_s": at, "requests": len(part), "errors": len(part) - len(ok)}
        if ok:
            row["p50_ms"] = ok[len(ok) // 2] * 1000
            row["p99_ms"] = ok[min(len(ok) - 1, round(0.99 * (len(ok) - 1)))] * 1000
        rows.append(row)
        at += step_s
    return rows


def report(drill: Drill, rows: list[dict[str, float]]) -> str:
    lines = [
        "# The ops loop's drill: slowdown → alert → scale-out → recovery",
        "",
        f"Command: `{COMMAND}`, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.machine()}, "
        f"{platform.processor() or 'cpu'}; see the module's docstring for the set-up (engine "
        "slowed by fault injection, drill timings).",
        "",
        "## Timeline (seconds since the load started)",
        "",
        "| at (s) | event | detail |",
        "|---:|---|---|",
    ]
    lines += [f"| {e.at_s:.1f} | {e.kind} | {e.text} |" for e in drill.events]
    lines += [
        "",
        "## Answers per 5 s (client side, by send time)",
        "",
        "| at (s) | requests | errors | P50 (ms) | P99 (ms) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        p50, p99 = row.get("p50_ms"), row.get("p99_ms")
        lines.append(
            f"| {row['at_s']:.0f} | {row['requests']:.0f} | {row['errors']:.0f} | "
            f"{'' if p50 is None else f'{p50:.0f}'} | {'' if p99 is None else f'{p99:.0f}'} |"
        )
    return "\n".join(lines) + "\n"


def plot(drill: Drill, rows: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (top, bottom) = plt.subplots(2, 1, figsize=(11, 6.5), sharex=True,
                                         height_ratios=[3, 1])  # fmt: skip
    ok = [a for a in drill.answers if a.status == 200]
    top.scatter([a.sent_s for a in ok], [a.seconds * 1000 for a in ok], s=3, alpha=0.3,
                color="grey", label="answers")  # fmt: skip
    with_p99 = [r for r in rows if "p99_ms" in r]
    top.plot([r["at_s"] + 2.5 for r in with_p99], [r["p99_ms"] for r in with_p99],
             color="tab:red", label="P99 per 5 s")  # fmt: skip
    top.axhline(SLO_S * 1000, color="black", linestyle="--", linewidth=1, label="SLO 500 ms")
    last = max(a.sent_s for a in drill.answers)
    for rule, colour in (("LatencyP99High", "tab:red"), ("ErrorRateHigh", "tab:orange")):
        mine = [e for e in drill.events if e.text.startswith(rule + " ")]
        resolved = [e.at_s for e in mine if e.kind == "alert resolved"]
        for start in (e.at_s for e in mine if e.kind == "alert firing"):
            end = next((r for r in resolved if r > start), last)
            top.axvspan(start, end, color=colour, alpha=0.1)
    for event in drill.events:
        if event.kind in {"scaling", "phase"}:
            top.axvline(event.at_s, color="tab:blue" if event.kind == "scaling" else "grey",
                        linewidth=1, linestyle=":")  # fmt: skip
    top.set_yscale("log")
    top.set_ylabel("latency (ms)")
    top.legend(loc="upper left", fontsize=8)
    top.set_title("Ops loop drill: P99 over the SLO → alert (shaded) → scale-out (blue) → recovery")
    for event in drill.events:
        if event.kind == "fault":
            top.axvline(event.at_s, color="black", linewidth=1.5, label="replica killed")
    failed = [a for a in drill.answers if a.status != 200]
    if failed:
        top.scatter([a.sent_s for a in failed], [max(a.seconds, 0.01) * 1000 for a in failed],
                    s=12, marker="x", color="black", label="failed answers")  # fmt: skip
    top.legend(loc="upper right", fontsize=8)
    counts = [(e.at_s, int(e.text.rsplit(":", 1)[1])) for e in drill.events if e.kind == "replicas"]
    if counts:
        end = max(a.sent_s for a in drill.answers)
        xs = [c[0] for c in counts] + [end]
        ys = [c[1] for c in counts] + [counts[-1][1]]
        bottom.step(xs, ys, where="post", color="tab:blue")
    bottom.set_ylabel("chat replicas")
    bottom.set_xlabel("seconds since the load started")
    bottom.set_ylim(0, 3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


async def main_async(args: argparse.Namespace) -> None:
    scale = 0.6 if args.quick else 1.0
    phases: list[tuple[str, float, float]] = [
        ("calm", 3, 40 * scale),
        ("surge", 10, 150 * scale),
        ("calm", 3, 150 * scale),
    ]
    # a failing replica, while two carry the surge (each with requests in flight)
    drill = Drill(phases, kill_at_s=(40 + 100) * scale)
    RESULTS_DIR.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ops-drill-") as tmp, Progress(console=console) as bar:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        broker = EmbeddedBroker(log_file=workdir / "broker.log")
        await broker.start()
        processes = Processes(workdir)
        try:
            task = bar.add_task("starting the mesh (Ray Serve, model load)", total=None)
            url, key = await start(processes, workdir, broker.bootstrap)
            bar.remove_task(task)
            await run_load(drill, url, key, bar)
            await asyncio.sleep(5)  # the last evaluations
            await read_events(drill, broker.bootstrap)
        finally:
            processes.stop()
            await broker.stop()
    rows = windows(drill)
    text = report(drill, rows)
    (RESULTS_DIR / "ops_loop.md").write_text(text)
    (RESULTS_DIR / "ops_loop.json").write_text(json.dumps(
        {"answers": [asdict(a) for a in drill.answers], "events": [asdict(e) for e in drill.events],
         "phases": drill.phases}, indent=1))  # fmt: skip
    plot(drill, rows, RESULTS_DIR / "ops_loop.png")
    console.print(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter phases")
    parser.add_argument("--workdir", help="keep the services' data and logs here (a new folder)")
    asyncio.run(main_async(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
