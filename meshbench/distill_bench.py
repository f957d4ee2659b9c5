"""Distillation with structured pruning: how much faster is the student in our engine, and
how much closer to its teacher does training bring it?

Run from the repository root (``just bench-distill``)::

    python -m meshbench.distill_bench            # about 15 minutes on 2 cores
    python -m meshbench.distill_bench --quick    # 1 epoch: a smoke run, not a result

One run, on an otherwise idle machine:

1. **The job**: the trainer's job process with ``method: distill`` cuts a student from the
   bundled SmolLM2-135M (30 layers to ``LAYERS``, each layer's feed-forward channels to
   ``FFN_KEEP``, chosen on the first training rows) and trains it on the teacher's outputs.
   Training rows: the IT tickets of ``meshbench/data/dp_tickets.json`` and the training
   questions of ``finetune_facts.json`` with their answers; the learning rate is the
   product's default for distillation (nothing was tuned).
2. **Closeness**: the mean per-token KL(teacher || student) on held-out rows (the tickets'
   and the facts' test prompts with their answers, never trained on), for the student as
   cut (rebuilt here with the job's own pruning code; its layers are checked against the
   job's) and as trained. float32, in transformers.
3. **Speed**: teacher and student, both exported to Q8_0 GGUF the way the trainer
   registers models, decode ``NEW_TOKENS`` tokens greedily (the end token ignored) after a
   chat prompt in our engine, one sequence, two threads: tokens per second between the
   first and the last token, the best of three timed runs after a warm-up.

Results: ``meshbench/results/distill.md``, ``distill.json`` and ``distill.png``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from meshbench.dp_bench import load_tickets
from meshbench.finetune_bench import THREADS, load_facts, run_ours
from meshbench.report import machine_lines, markdown_table, results_console
from services.inference.model.gguf_model import smollm2_path

RESULTS = Path(__file__).resolve().parent / "results"
LAYERS, FFN_KEEP = 20, 0.75
NEW_TOKENS = 64
HYPERPARAMETERS: dict[str, Any] = {
    "n_epochs": 2, "batch_size": 8, "learning_rate": 1e-4, "max_length": 160, "seed": 0,
}  # fmt: skip
PROMPT = "Write a short note to the team about the new printer on the third floor."


def rows() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The training rows and the held-out rows (chat rows with their answers)."""
    system, train, test = load_tickets()

    def ticket(text: str, category: str) -> dict[str, Any]:
        return {"messages": [{"role": "system", "content": system},
                             {"role": "user", "content": text},
                             {"role": "assistant", "content": category}]}  # fmt: skip

    def fact(question: str, answer: str) -> dict[str, Any]:
        return {"messages": [{"role": "user", "content": question},
                             {"role": "assistant", "content": answer}]}  # fmt: skip

    facts = load_facts()
    training = [ticket(t.text, t.category) for t in train]
    training += [fact(q, f.answer) for f in facts for q in f.train]
    held_out = [ticket(t.text, t.category) for t in test] + [fact(f.test, f.answer) for f in facts]
    return training, held_out


def closeness(
    base_dir: Path, model_dir: Path, training: Sequence[dict[str, Any]],
    held_out: Sequence[dict[str, Any]], kept: Sequence[int],
) -> dict[str, float]:  # fmt: skip
    """KL(teacher || student) per token on ``held_out``: the student as cut and as trained."""
    import torch
    from transformers import AutoModelForCausalLM

    from services.trainer import base_model
    from services.trainer.distill_loop import CALIBRATION_ROWS, token_kl
    from services.trainer.pruning import StudentShape, calibrate, choose_layers, prune, top_channels
    from services.trainer.sft import control_tokens, encode_rows
    from services.trainer.sft_loop import collate

    torch.set_num_threads(THREADS)
    base = base_model.load_base(base_dir)
    tokenizer, teacher = base.tokenizer, base.model.eval()
    controls = control_tokens(tokenizer)
    max_length = HYPERPARAMETERS["max_length"]
    train_rows, _ = encode_rows([r["messages"] for r in training], tokenizer, max_length, controls)
    test_rows, _ = encode_rows([r["messages"] for r in held_out], tokenizer, max_length, controls)
    pad = tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    calibration = train_rows[:CALIBRATION_ROWS]
    batches = [collate(calibration[i : i + 4], pad, "cpu") for i in range(0, len(calibration), 4)]
    layer_scores, channel_scores = calibrate(teacher, batches)
    layers = choose_layers(layer_scores, LAYERS)
    if list(layers) != list(kept):
        raise RuntimeError(f"rebuilt student keeps layers {layers}, the job kept {list(kept)}")
    count = StudentShape(LAYERS, FFN_KEEP).channels(int(teacher.config.intermediate_size))
    cut = prune(copy.deepcopy(teacher), layers,
                [top_channels(channel_scores[i], count) for i in layers]).eval()  # fmt: skip
    trained: Any = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    trained.eval()
    totals = {"cut": 0.0, "trained": 0.0}
    tokens = 0.0
    with torch.no_grad():
        for i in range(0, len(test_rows), 8):
            batch = collate(test_rows[i : i + 8], pad, "cpu")
            inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
            mask = batch["attention_mask"].float()
            reference = teacher(**inputs).logits
            for name, model in (("cut", cut), ("trained", trained)):
                kl = token_kl(model(**inputs).logits, reference, 1.0)
                totals[name] += float((kl * mask).sum())
            tokens += float(mask.sum())
    return {name: total / tokens for name, total in totals.items()} | {"tokens": tokens}


def speed(gguf: Path) -> dict[str, float]:
    """Decode speed in our engine: tokens per second between the first and the last of
    ``NEW_TOKENS`` generated tokens (the end token ignored, so both models make as many),
    best of three after a warm-up; and the time to the first token."""
    import asyncio

    import torch

    from services.inference.generation import EngineSettings, SamplingParams
    from services.inference.model.engine import Engine
    from services.trainer.quant_check import load_file

    torch.set_num_threads(THREADS)
    loaded = load_file(gguf, "auto")
    prompt = loaded.tokenizer.encode(
        loaded.tokenizer.render_chat([{"role": "user", "content": PROMPT}])
    )

    async def run() -> dict[str, float]:
        engine = Engine(loaded.llama, loaded.tokenizer, EngineSettings(max_batch=1))
        engine.start()

        async def timed(tokens: int) -> tuple[float, float, int]:
            params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
            started = time.perf_counter()
            first = last = 0.0
            count = 0
            async for delta in engine.stream(prompt, params):
                now = time.perf_counter() - started
                count += len(delta.token_ids)
                first = first or now
                last = now
            return first, last, count

        try:
            await timed(8)  # warm-up
            runs = [await timed(NEW_TOKENS) for _ in range(3)]
        finally:
            engine.stop()
        rates = [(count - 1) / (last - first) for first, last, count in runs]
        return {"tokens_per_s": max(rates), "ttft_s": min(r[0] for r in runs),
                "tokens": runs[0][2], "prompt_tokens": len(prompt),
                "file_bytes": gguf.stat().st_size}  # fmt: skip

    return asyncio.run(run())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 epoch: a smoke run")
    args = parser.parse_args(argv)
    from services.trainer import base_model, export

    hp = dict(HYPERPARAMETERS) | ({"n_epochs": 1} if args.quick else {})
    training, held_out = rows()
    console = results_console()
    report: dict[str, Any] = {
        "when": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "quick": args.quick,
        "machine": machine_lines(load=True), "hyperparameters": hp, "rows": len(training),
        "held_out_rows": len(held_out), "student": {"layers": LAYERS, "ffn_keep": FFN_KEEP},
    }  # fmt: skip
    base_gguf = smollm2_path()
    with tempfile.TemporaryDirectory(prefix="meshllm-distill-bench-") as scratch, Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console,
    ) as progress:  # fmt: skip
        folder = Path(scratch)
        train_file = folder / "train.jsonl"
        train_file.write_text("".join(json.dumps(r) + "\n" for r in training))
        cache = Path(os.environ.get("MESHLLM_BENCH_CACHE", folder / "cache"))
        base_dir = base_model.cached_base(base_gguf, cache)
        spec = {
            "job_id": "ftjob-distill-bench", "tenant": "bench", "method": "distill",
            "base_gguf": str(base_gguf), "cache_dir": str(cache),
            "training_file": str(train_file), "validation_file": None,
            "hyperparameters": hp, "checkpoint_every": 1000, "output_dir": str(folder / "run"),
            "workers": 1, "use_gpu": False, "cpus_per_worker": THREADS,
            "distill": {"layers": LAYERS, "ffn_keep": FFN_KEEP},
        }  # fmt: skip
        training_run, result = run_ours(spec, folder / "spec.json", progress)
        task = progress.add_task("held-out KL", total=None)
        kept = result["distill"]["layers_kept"]
        report["kl"] = closeness(base_dir, Path(result["model_dir"]), training, held_out, kept)
        progress.update(task, total=1, completed=1)
        task = progress.add_task("speed in our engine", total=None)
        teacher_q8 = export.export_gguf(
            export.load_weights(base_dir), base_gguf, folder / "teacher.Q8_0.gguf"
        )
        student_q8 = export.export_gguf(
            export.load_weights(Path(result["model_dir"])), base_gguf, folder / "student.gguf",
            layers=len(kept), ffn=result["distill"]["intermediate_size"],
        )  # fmt: skip
        report["speed"] = {"teacher": speed(teacher_q8), "student": speed(student_q8)}
        progress.update(task, total=1, completed=1)
    report["job"] = {**result["distill"], "steps": result["steps"],
                     "tokens_per_s": result["tokens_per_s"],
                     "wall_seconds": training_run.wall_seconds}  # fmt: skip
    report["training"] = asdict(training_run)
    save(report, console)


def save(report: dict[str, Any], console: Any) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "distill.json").write_text(json.dumps(report, indent=1) + "\n")
    plot(report, RESULTS / "distill.png")
    text = results_text(report)
    (RESULTS / "distill.md").write_text(text)
    console.print(text)


def results_text(report: dict[str, Any]) -> str:
    job, kl, fast = report["job"], report["kl"], report["speed"]
    teacher, student = fast["teacher"], fast["student"]
    hp = report["hyperparameters"]
    rows = [
        ["teacher (SmolLM2-135M, Q8_0)", f"{job['teacher_layers']}",
         f"{job['teacher_intermediate_size']}", f"{job['teacher_parameters'] / 1e6:.1f} M",
         f"{teacher['file_bytes'] / 1e6:.0f} MB", f"{teacher['tokens_per_s']:.1f}", "1.00x",
         "-"],
        ["student as cut", f"{len(job['layers_kept'])}", f"{job['intermediate_size']}",
         f"{job['student_parameters'] / 1e6:.1f} M", "", "", "", f"{kl['cut']:.3f}"],
        ["student as trained (Q8_0)", f"{len(job['layers_kept'])}",
         f"{job['intermediate_size']}", f"{job['student_parameters'] / 1e6:.1f} M",
         f"{student['file_bytes'] / 1e6:.0f} MB", f"{student['tokens_per_s']:.1f}",
         f"{student['tokens_per_s'] / teacher['tokens_per_s']:.2f}x", f"{kl['trained']:.3f}"],
    ]  # fmt: skip
    headers = ["model", "layers", "FFN width", "parameters", "file", "decode tokens/s (ours)",
               "speed", "KL to teacher (held-out, nats/token)"]  # fmt: skip
    lines = [
        "# Distillation with structured pruning: speed and closeness to the teacher",
        "",
        f"Measured {report['when']} with `python -m meshbench.distill_bench"
        f"{' --quick' if report['quick'] else ''}` ({THREADS} threads).",
        *(f"- {line}" for line in report["machine"]),
        "",
        f"The trainer's distillation job cut SmolLM2-135M to {len(job['layers_kept'])} of "
        f"{job['teacher_layers']} layers (kept: {', '.join(map(str, job['layers_kept']))}) and "
        f"each layer's feed-forward width to {job['intermediate_size']}, then trained it for "
        f"{job['steps']} steps ({hp['n_epochs']} epochs of {report['rows']} rows, batch "
        f"{hp['batch_size']}, learning rate {hp['learning_rate']:g}: the product's default, "
        f"not tuned) at {job['tokens_per_s']:.0f} training tokens/s. KL is over "
        f"{report['held_out_rows']} held-out rows ({kl['tokens']:.0f} tokens) never trained "
        f"on. Speed: decoding {NEW_TOKENS} tokens (the end token ignored) after a "
        f"{teacher['prompt_tokens']}-token chat prompt, one sequence, best of three; time to "
        f"first token {1000 * teacher['ttft_s']:.0f} ms (teacher) and "
        f"{1000 * student['ttft_s']:.0f} ms (student).",
        "",
        markdown_table(headers, rows),
        "",
        "![KL and speed](distill.png)",
        "",
    ]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    losses = report["training"]["losses"]
    if losses:
        steps, values = zip(*losses, strict=True)
        left.plot(steps, values)
    left.set(xlabel="step", ylabel="distillation loss", title="Training")
    kl = report["kl"]
    bars = right.bar(["as cut", "as trained"], [kl["cut"], kl["trained"]])
    right.bar_label(bars, fmt="%.3f")
    right.set(ylabel="KL to teacher (nats/token)", title="Held-out closeness to the teacher")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
