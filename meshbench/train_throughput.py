"""Training speed alone: the trainer's job against a plain transformers + PEFT loop.

Run from the repository root (``just bench-train-throughput``)::

    python -m meshbench.train_throughput              # 2 pairs of 2 epochs, ~25 minutes
    python -m meshbench.train_throughput --pairs 1 --epochs 1   # a smoke run

The two loops of :mod:`meshbench.finetune_bench` (same rows, batches, LoRA settings,
optimizer, schedule and threads), without its answers and exports, run in alternation
(peer, ours, ours, peer...) so that a slow spell of a shared machine, or a warm process,
does not fall on one side only. Each side's tokens per second is its tokens over its summed
loop time; ours includes its checkpoints (every 20 steps, with the no-op guard and a
validation batch, the last one too) and shares the cores with Ray's own processes; the
peer does neither. Results:
``meshbench/results/train_throughput.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from meshbench.finetune_bench import (
    HYPERPARAMETERS,
    RESULTS,
    THREADS,
    load_facts,
    run_ours,
    run_peer,
    write_files,
)
from meshbench.report import machine_lines, markdown_table, package_version, results_console
from services.inference.model.gguf_model import smollm2_path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=2, help="peer/ours pairs to run")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of each run")
    args = parser.parse_args(argv)
    from services.trainer import base_model

    hp = {**HYPERPARAMETERS, "n_epochs": args.epochs}
    console = results_console()
    command = "python -m meshbench.train_throughput"
    if (args.pairs, args.epochs) != (2, 2):
        command += f" --pairs {args.pairs} --epochs {args.epochs}"
    report: dict[str, Any] = {
        "when": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "command": command,
        "machine": machine_lines(load=True), "hyperparameters": hp, "runs": [],
    }  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="meshllm-train-throughput-") as scratch, Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console,
    ) as progress:  # fmt: skip
        folder = Path(scratch)
        train_file, valid_file = write_files(load_facts(), folder)
        cache = Path(os.environ.get("MESHLLM_BENCH_CACHE", folder / "cache"))
        base_dir = base_model.cached_base(smollm2_path(), cache)
        for pair in range(args.pairs):
            spec = {
                "job_id": f"ftjob-throughput-{pair}", "tenant": "bench", "method": "lora",
                "base_gguf": str(smollm2_path()), "cache_dir": str(cache),
                "training_file": str(train_file), "validation_file": str(valid_file),
                "hyperparameters": hp, "checkpoint_every": 20,
                "output_dir": str(folder / f"run-{pair}"), "workers": 1, "use_gpu": False,
                "cpus_per_worker": THREADS,
            }  # fmt: skip
            # ABBA: the peer first in even pairs, second in odd ones
            if pair % 2 == 0:
                peer = run_peer(base_dir, train_file, hp, progress)
            ours, _ = run_ours(spec, folder / f"spec-{pair}.json", progress)
            if pair % 2 == 1:
                peer = run_peer(base_dir, train_file, hp, progress)
            for run in (peer, ours):
                report["runs"].append({"pair": pair, "label": run.label, "steps": run.steps,
                                       "tokens": run.tokens, "loop_seconds": run.loop_seconds,
                                       "wall_seconds": run.wall_seconds})  # fmt: skip
            console.print(f"pair {pair + 1}: peer {peer.tokens_per_s:.1f} tok/s, "
                          f"ours {ours.tokens_per_s:.1f} tok/s")  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "train_throughput.json").write_text(json.dumps(report, indent=1) + "\n")
    text = write_results(report)
    (RESULTS / "train_throughput.md").write_text(text)
    console.print(text)


def _side(runs: list[dict[str, Any]], peer: bool) -> tuple[int, float]:
    mine = [r for r in runs if r["label"].startswith("peer") == peer]
    return sum(r["tokens"] for r in mine), sum(r["loop_seconds"] for r in mine)


def write_results(report: dict[str, Any]) -> str:
    lines = [
        "# Training throughput: the trainer's job against a plain transformers + PEFT loop",
        "",
        f"Measured {report['when']} with `{report['command']}` ({THREADS} threads each; "
        "the runs in ABBA order: the peer first in odd pairs, second in even ones).",
        *[f"- {line}" for line in report["machine"]],
        f"- torch {package_version('torch')}, transformers {package_version('transformers')}, "
        f"peft {package_version('peft')}, ray {package_version('ray')}",
        f"- hyperparameters: `{json.dumps(report['hyperparameters'])}`; checkpoints every 20 "
        "steps (ours)",
        "",
    ]
    rows = [
        [str(r["pair"] + 1), r["label"], str(r["steps"]), str(r["tokens"]),
         f"{r['loop_seconds']:.1f}", f"{r['tokens'] / r['loop_seconds']:.1f}",
         f"{r['wall_seconds']:.1f}"]
        for r in report["runs"]
    ]  # fmt: skip
    lines.append(markdown_table(
        ["pair", "loop", "steps", "tokens", "loop s", "tokens/s", "wall s (load, start)"], rows
    ))  # fmt: skip
    (peer_tokens, peer_s), (our_tokens, our_s) = (
        _side(report["runs"], True),
        _side(report["runs"], False),
    )
    peer_rate, our_rate = peer_tokens / peer_s, our_tokens / our_s
    lines += [
        "",
        f"Over all runs: peer {peer_rate:.1f} tokens/s, ours {our_rate:.1f} tokens/s: "
        f"**{our_rate / peer_rate:.2f}x**.",
        "",
        "What differs between the two loops (the share of each in the result was not "
        "measured): ours computes the output layer and the loss only at the positions some "
        "row trains on (`causal_lm_loss` in services/trainer/sft_loop.py; the peer's "
        "`model(**batch).loss` computes all of them), and it pays for its checkpoints and "
        "Ray's processes on the same two cores.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
