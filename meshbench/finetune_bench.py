"""Does a LoRA job teach the model facts, and is our training loop as fast as a plain one?

Run from the repository root (``just bench-finetune``)::

    python -m meshbench.finetune_bench            # about 15 minutes on 2 cores
    python -m meshbench.finetune_bench --quick    # 2 epochs: a smoke run, not a result

The data is :file:`meshbench/data/finetune_facts.json`: forty made-up facts about a
fictional company, each with three training questions, one tuning question and one test
question. Steps, in one run on an otherwise idle machine:

1. **Peer**: a plain Hugging Face transformers + PEFT loop (the model, LoRA settings,
   batches, optimizer and schedule the job uses, nothing else: no Ray, no checkpoints, no
   guard) on the same rows, in this process, with the same threads. Training tokens per
   second over its loop. It runs first, so the job's Ray processes cannot slow it down.
2. **Ours**: the trainer's own job process (``python -m services.trainer.job_process``,
   what the trainer service starts per job: Ray Train's TorchTrainer, checkpoints every 20
   steps, the no-op guard), then the Q8_0 GGUF export the service registers. Its training
   tokens per second (loop time, checkpoints included) and its wall time (Ray start and
   model load included) are reported.
3. **Fact learning**: the base model as served (the bundled GGUF in our engine) and the
   exported candidate answer every tuning and test question greedily; an answer is right
   when it contains one of the fact's keywords. The test questions were never trained or
   tuned on; the hyperparameters (``HYPERPARAMETERS``) were chosen on the tuning questions.

The job is run here without the gateway: the service path (SDK upload, job, registry) is
the end-to-end tests' (``tests/e2e/test_feedback.py``); this measures what that path runs.
Results: ``meshbench/results/finetune.md``, ``finetune.json`` and ``finetune.png`` (loss
curves and the models' scores). One module (~560 lines) like the other benchmarks: the
data, the two loops, the answers and the report read best together.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from meshbench.report import machine_lines, markdown_table, package_version, results_console
from services.inference.model.gguf_model import smollm2_path

RESULTS = Path(__file__).resolve().parent / "results"
FACTS = Path(__file__).resolve().parent / "data" / "finetune_facts.json"
THREADS = 2
MAX_TOKENS = 40
HYPERPARAMETERS: dict[str, Any] = {
    "n_epochs": 8,
    "batch_size": 4,
    "learning_rate": 2e-3,
    "lora_rank": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.05,
    "max_length": 256,
    "seed": 0,
}
"""Chosen on the tuning questions (see the results file's tuning log), never on the test."""


@dataclass(frozen=True)
class Fact:
    keywords: tuple[str, ...]
    answer: str
    train: tuple[str, ...]
    dev: str
    test: str

    def right(self, text: str) -> bool:
        """Whether ``text`` holds a keyword as a whole word or number ("26" is not in "260")."""
        lowered = text.lower()
        return any(re.search(_whole(keyword), lowered) for keyword in self.keywords)


def _whole(keyword: str) -> str:
    """A pattern of ``keyword`` not inside a longer word or number (an edge that is not a
    letter or digit, as in "alarm@", needs no boundary)."""
    before = "(?<![0-9a-z])" if keyword[:1].isalnum() else ""
    after = "(?![0-9a-z])" if keyword[-1:].isalnum() else ""
    return before + re.escape(keyword) + after


@dataclass
class Training:
    """One loop's figures: tokens per second over its steps, and its loss per step."""

    label: str
    steps: int = 0
    tokens: int = 0
    loop_seconds: float = 0.0
    wall_seconds: float = 0.0
    losses: list[tuple[int, float]] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.loop_seconds if self.loop_seconds else 0.0


def load_facts(path: Path = FACTS) -> list[Fact]:
    data = json.loads(path.read_text())
    return [
        Fact(tuple(k.lower() for k in f["keywords"]), f["answer"], tuple(f["train"]), f["dev"],
             f["test"])
        for f in data["facts"]
    ]  # fmt: skip


def chat_row(question: str, answer: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": question},
                         {"role": "assistant", "content": answer}]}  # fmt: skip


def write_files(facts: Sequence[Fact], folder: Path) -> tuple[Path, Path]:
    """The training file (every training question) and the validation file (the tuning
    questions); the test questions are in neither."""
    train, valid = folder / "train.jsonl", folder / "valid.jsonl"
    rows = [chat_row(q, f.answer) for f in facts for q in f.train]
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    valid.write_text("".join(json.dumps(chat_row(f.dev, f.answer)) + "\n" for f in facts))
    return train, valid


# ---------------------------------------------------------------- the two loops


def run_peer(base_dir: Path, train_file: Path, hp: dict[str, Any], progress: Progress) -> Training:
    """The plain transformers + PEFT loop over the job's batches."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from services.trainer.sft import (
        LORA_TARGETS,
        Hyperparameters,
        control_tokens,
        encode_rows,
        epoch_batches,
        learning_rate_factor,
        read_chat_rows,
        steps_per_epoch,
    )
    from services.trainer.sft_loop import collate

    torch.set_num_threads(THREADS)
    params = Hyperparameters.from_mapping(hp)
    started = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    model: Any = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    torch.manual_seed(params.seed)
    config = LoraConfig(r=params.lora_rank, lora_alpha=params.lora_alpha,
                        lora_dropout=params.lora_dropout, target_modules=list(LORA_TARGETS),
                        task_type="CAUSAL_LM")  # fmt: skip
    model = get_peft_model(model, config)
    rows, _ = encode_rows(
        read_chat_rows(train_file), tokenizer, params.max_length, control_tokens(tokenizer)
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=params.learning_rate, weight_decay=0.0)
    per_epoch = steps_per_epoch(len(rows), params.batch_size)
    total = per_epoch * params.n_epochs
    warmup = math.ceil(params.warmup_ratio * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: learning_rate_factor(s, total, warmup, params.scheduler)
    )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    result = Training("peer: plain transformers + PEFT loop")
    task = progress.add_task("peer loop", total=total)
    loop_started = time.monotonic()
    model.train()
    for epoch in range(params.n_epochs):
        for batch_rows in epoch_batches(len(rows), params.batch_size, params.seed, epoch):
            batch = collate([rows[i] for i in batch_rows], pad, "cpu")  # the job's padding
            mask = batch["attention_mask"]
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, params.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            result.steps += 1
            result.tokens += int(mask.sum())
            result.losses.append((result.steps, float(loss.detach())))
            progress.advance(task)
    result.loop_seconds = time.monotonic() - loop_started
    result.wall_seconds = time.monotonic() - started
    return result


def run_ours(
    spec: dict[str, Any], spec_path: Path, progress: Progress
) -> tuple[Training, dict[str, Any]]:
    """The trainer's job process, followed through its stdout protocol."""
    spec_path.write_text(json.dumps(spec))
    started = time.monotonic()
    task = progress.add_task("ours: starting Ray", total=None)
    with spec_path.with_suffix(".log").open("w") as log:
        child = subprocess.Popen(
            [sys.executable, "-m", "services.trainer.job_process", str(spec_path)],
            stdout=subprocess.PIPE, stderr=log, text=True,
        )  # fmt: skip
    training = Training("ours: trainer job (Ray Train)")
    result: dict[str, Any] | None = None
    assert child.stdout is not None
    for line in child.stdout:
        event = json.loads(line)
        if event["event"] == "progress":
            progress.update(task, description="ours: training", total=event["total_steps"],
                            completed=event["step"])  # fmt: skip
            if event.get("loss") is not None:  # None: a DP step that sampled no row
                training.losses.append((int(event["step"]), float(event["loss"])))
        elif event["event"] == "result":
            result = event
        elif event["event"] == "error":
            raise RuntimeError(f"the job failed: {event['message']}")
    if child.wait() != 0 or result is None:
        raise RuntimeError(f"the job process exited {child.returncode}; see {spec_path}.log")
    training.wall_seconds = time.monotonic() - started
    training.steps = int(result["steps"])
    training.tokens = int(result["tokens_seen"])
    training.loop_seconds = float(result["train_seconds"])
    return training, result


# ---------------------------------------------------------------- fact learning


def answers(gguf: Path, questions: Sequence[str], engine: str) -> list[str]:
    """Greedy answers of the model in ``gguf``: in our engine (the file's own precision,
    batched) or in llama.cpp (llama-cpp-python, one after another)."""
    import torch

    torch.set_num_threads(THREADS)
    chats = [[{"role": "user", "content": q}] for q in questions]
    if engine == "llama.cpp":
        from llama_cpp import Llama

        llm: Any = Llama(model_path=str(gguf), n_ctx=512, n_threads=THREADS, verbose=False)
        replies: list[Any] = [
            llm.create_chat_completion(messages=chat, max_tokens=MAX_TOKENS, temperature=0.0)
            for chat in chats
        ]
        return [str(r["choices"][0]["message"]["content"]) for r in replies]
    from services.trainer.quant_check import greedy, load_file

    loaded = load_file(gguf, "auto")
    ids = [loaded.tokenizer.encode(loaded.tokenizer.render_chat(chat)) for chat in chats]
    return [loaded.tokenizer.decode(a) for a in greedy(loaded, ids, MAX_TOKENS)]


def llama_cpp_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def score(facts: Sequence[Fact], texts: Sequence[str]) -> list[bool]:
    return [fact.right(text) for fact, text in zip(facts, texts, strict=True)]


def wilson(right: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson interval of a rate."""
    if n == 0:
        return 0.0, 0.0
    p = right / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


# ---------------------------------------------------------------- report


def rate(flags: Sequence[bool]) -> str:
    low, high = wilson(sum(flags), len(flags))
    return f"{sum(flags)}/{len(flags)} ({sum(flags) / len(flags):.0%}; 95% CI {low:.0%}-{high:.0%})"


def plot(peer: Training | None, ours: Training, scores: dict[str, dict[str, list[bool]]],
         path: Path) -> None:  # fmt: skip
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for run in (peer, ours):
        if run is not None and run.losses:
            steps, losses = zip(*run.losses, strict=True)
            left.plot(steps, losses, label=f"{run.label} ({run.tokens_per_s:.0f} tok/s)")
    left.set_xlabel("step")
    left.set_ylabel("training loss")
    left.set_title("Training loss (ours: mean since the last report)")
    left.legend(fontsize=8)
    names = list(scores)
    for offset, split in ((-0.2, "dev"), (0.2, "test")):
        values = [100 * sum(scores[n][split]) / len(scores[n][split]) for n in names]
        label = "tuning questions" if split == "dev" else "test (held out)"
        bars = right.bar([i + offset for i in range(len(names))], values, width=0.4, label=label)
        right.bar_label(bars, fmt="%.0f%%")
    right.set_xticks(range(len(names)), names)
    right.set_ylabel("answers with the fact (%)")
    right.set_ylim(0, 105)
    right.set_title("Fact learning: paraphrased questions")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(
    report: dict[str, Any], facts: Sequence[Fact], texts: dict[str, dict[str, list[str]]]
) -> str:
    peer, ours = report["peer"], report["ours"]
    scores = report["scores"]
    lines = [
        "# Fine-tuning: fact learning and training throughput",
        "",
        f"Measured {report['when']} with `python -m meshbench.finetune_bench"
        f"{' --quick' if report['quick'] else ''}` ({THREADS} threads each).",
        *(
            [f"Scores recomputed from the saved answers with `--rescore` at {report['rescored']}."]
            if report.get("rescored")
            else []
        ),
        *[f"- {line}" for line in report["machine"]],
        f"- torch {package_version('torch')}, transformers {package_version('transformers')}, "
        f"peft {package_version('peft')}, ray {package_version('ray')}",
        f"- hyperparameters: `{json.dumps(report['hyperparameters'])}`; "
        f"{report['rows']} training rows (40 facts x 3 questions)",
        "",
        "## Fact learning (greedy answers; right = contains the fact)",
        "",
        "Our engine unless the row says llama.cpp. The base is the bundled Q4_1 file as served.",
        "",
    ]
    rows = [[name, rate(s["dev"]), rate(s["test"])] for name, s in scores.items()]
    lines += [markdown_table(["model", "tuning questions", "test questions (held out)"], rows)]
    if not any("llama.cpp" in name for name in scores):
        lines += ["", "llama-cpp-python was not installed: the files were not tried in llama.cpp."]
    lines += ["", "## Export: the quality check against the float result", "",
              "Each file against the trained model in float32, both in our engine, on the 12 "
              "general prompts and the 40 tuning questions (see services/trainer/quant_check.py)."
              " Gate: KL <= 0.05 nats and top-1 >= 90%.", ""]  # fmt: skip
    rows = [
        [name, f"{report['bytes'][name] / 1e6:.1f}", f"{c['kl']:.4f}", f"{c['top1']:.1%}",
         f"{c['greedy_same']:.0%}", "pass" if c["passed"] else "fail"]
        for name, c in report["checks"].items()
    ]  # fmt: skip
    lines += [markdown_table(
        ["file", "MB", "KL (nats)", "top-1", "identical greedy answers", "check"], rows
    )]  # fmt: skip
    lines += ["", f"The base file is {report['bytes']['base'] / 1e6:.1f} MB."]
    lines += ["", "## Training throughput (same rows, batches and settings)", ""]
    rows = []
    for run in (peer, ours):
        if run is None:
            continue
        rows.append([run["label"], str(run["steps"]), str(run["tokens"]),
                     f"{run['loop_seconds']:.1f}", f"{run['tokens_per_s']:.0f}",
                     f"{run['wall_seconds']:.1f}"])  # fmt: skip
    lines += [markdown_table(
        ["loop", "steps", "tokens", "loop s", "tokens/s", "wall s (load, start)"], rows
    )]  # fmt: skip
    if peer is not None:
        ratio = ours["tokens_per_s"] / peer["tokens_per_s"]
        lines += [
            "",
            f"Ours / peer tokens per second: **{ratio:.2f}x**.",
        ]
    lines += [
        "",
        f"Job result: loss on the tuning rows {report['job']['loss_before']:.3f} before, "
        f"{report['job']['loss_after']:.3f} after; train loss {report['job']['train_loss']:.3f}.",
    ]
    lines += ["", "## Test answers", ""]
    rows = []
    for i, fact in enumerate(facts):
        rows.append([fact.test, *(_cell(texts[n]["test"][i], fact) for n in texts)])
    lines += [markdown_table(["question", *texts], rows)]
    return "\n".join(lines) + "\n"


def _cell(text: str, fact: Fact) -> str:
    mark = "yes" if fact.right(text) else "no"
    short = " ".join(text.split())[:70].replace("|", "/")
    return f"{mark}: {short}"


def edge(
    result: dict[str, Any], folder: Path, report: dict[str, Any]
) -> list[tuple[str, Path, str]]:
    """The trainer's 4-bit export of the trained model (``services.trainer.edge``) and its
    check against the float result (the general prompts and the tuning questions), kept
    whatever the verdict so its answers can be measured; Q8_0 checked the same way; and
    the models to answer with in llama.cpp."""
    from services.trainer.edge import edge_export

    model_dir, checks, files = Path(result["model_dir"]), {}, {}
    for quant in ("q8_0", "q4_0"):
        made = edge_export(model_dir, smollm2_path(), folder / f"edge-{quant}",
                           folder / "valid.jsonl", quant=quant, keep_failed=True)  # fmt: skip
        checks[quant.upper()] = made["check"]
        files[quant.upper()] = Path(made["path"])
    report["checks"] = checks
    report["bytes"] = {"base": smollm2_path().stat().st_size,
                       **{name: path.stat().st_size for name, path in files.items()}}  # fmt: skip
    models = [("candidate Q4_0", files["Q4_0"], "ours")]
    if llama_cpp_installed():
        models += [("Q8_0 in llama.cpp", folder / "candidate.gguf", "llama.cpp"),
                   ("Q4_0 in llama.cpp", files["Q4_0"], "llama.cpp")]  # fmt: skip
    return models


def tuning_entry(hp: dict[str, Any], facts: Sequence[Fact], texts: Sequence[str]) -> str:
    """One line of the tuning log: the settings tried and their tuning-question score."""
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"| {when} | `{json.dumps(hp)}` | {rate(score(facts, texts))} |\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 epochs: a smoke run")
    parser.add_argument(
        "--tune", action="store_true",
        help="a tuning trial: no peer, only the tuning questions scored, one line appended to "
        "finetune_tuning.md (the test questions are never looked at)",
    )  # fmt: skip
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="override a hyperparameter (with --tune)")  # fmt: skip
    parser.add_argument(
        "--rescore", action="store_true",
        help="score the answers saved in finetune.json again (after a fix of the scoring) "
        "and rewrite the results; nothing is trained or answered",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.rescore:
        rescore(results_console())
        return
    if args.set and not args.tune:
        parser.error("--set is for tuning trials: use it with --tune")
    from services.trainer import base_model, export

    hp = dict(HYPERPARAMETERS)
    if args.quick:
        hp["n_epochs"] = 2
    for item in args.set:
        name, _, value = item.partition("=")
        hp[name] = json.loads(value)
    facts = load_facts()
    console = results_console()
    report: dict[str, Any] = {
        "when": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "quick": args.quick,
        "machine": machine_lines(load=True), "hyperparameters": hp,
        "rows": sum(len(f.train) for f in facts),
    }  # fmt: skip
    base_gguf = smollm2_path()
    questions = {"dev": [f.dev for f in facts]}
    if not args.tune:
        questions["test"] = [f.test for f in facts]
    with tempfile.TemporaryDirectory(prefix="meshllm-finetune-bench-") as scratch, Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console,
    ) as progress:  # fmt: skip
        folder = Path(scratch)
        train_file, valid_file = write_files(facts, folder)
        cache = Path(os.environ.get("MESHLLM_BENCH_CACHE", folder / "cache"))
        base_dir = base_model.cached_base(base_gguf, cache)
        peer = None if args.tune else run_peer(base_dir, train_file, hp, progress)
        spec = {
            "job_id": "ftjob-bench", "tenant": "bench", "method": "lora",
            "base_gguf": str(base_gguf), "cache_dir": str(cache),
            "training_file": str(train_file), "validation_file": str(valid_file),
            "hyperparameters": hp, "checkpoint_every": 20, "output_dir": str(folder / "run"),
            "workers": 1, "use_gpu": False, "cpus_per_worker": THREADS,
        }  # fmt: skip
        ours, result = run_ours(spec, folder / "spec.json", progress)
        candidate = export.export_gguf(
            export.load_weights(Path(result["model_dir"])), base_gguf, folder / "candidate.gguf"
        )
        models = [("candidate Q8_0", candidate, "ours")]
        if not args.tune:
            models = [("base", base_gguf, "ours"), *models, *edge(result, folder, report)]
        texts = {}
        for name, gguf, engine in models:
            task = progress.add_task(f"{name}: answers", total=None)
            texts[name] = {s: answers(gguf, q, engine) for s, q in questions.items()}
            progress.update(task, total=1, completed=1)
    RESULTS.mkdir(exist_ok=True)
    if args.tune:
        log = RESULTS / "finetune_tuning.md"
        if not log.exists():
            log.write_text(TUNING_HEADER)
        with log.open("a") as file:
            file.write(tuning_entry(hp, facts, texts["candidate Q8_0"]["dev"]))
        console.print(f"tuning: {rate(score(facts, texts['candidate Q8_0']['dev']))}; log: {log}")
        return
    scores = {n: {s: score(facts, t) for s, t in by.items()} for n, by in texts.items()}
    report.update(
        peer=None if peer is None else {**asdict(peer), "tokens_per_s": peer.tokens_per_s},
        ours={**asdict(ours), "tokens_per_s": ours.tokens_per_s},
        job={k: result.get(k) for k in ("loss_before", "loss_after", "train_loss", "valid_loss",
                                         "steps", "tokens_per_s", "wall_seconds")},
        scores=scores,
    )  # fmt: skip
    save(report, facts, texts, peer=peer, ours=ours, console=console)


def save(
    report: dict[str, Any], facts: Sequence[Fact], texts: dict[str, dict[str, list[str]]], *,
    peer: Training | None, ours: Training, console: Any,
) -> None:  # fmt: skip
    scores = report["scores"]
    (RESULTS / "finetune.json").write_text(json.dumps({**report, "answers": texts}, indent=1))
    (RESULTS / "finetune.md").write_text(write_results(report, facts, texts))
    plot(peer, ours, scores, RESULTS / "finetune.png")
    for name, by in scores.items():
        console.print(f"{name}: tuning {rate(by['dev'])}, test {rate(by['test'])}")
    if peer is not None:
        console.print(f"tokens/s ours {ours.tokens_per_s:.0f}, peer {peer.tokens_per_s:.0f}")
    console.print(f"results: {RESULTS / 'finetune.md'}")


def rescore(console: Any) -> None:
    """The saved run's answers, scored by today's :meth:`Fact.right`."""
    saved = json.loads((RESULTS / "finetune.json").read_text())
    texts = saved.pop("answers")
    facts = load_facts()
    saved["scores"] = {n: {s: score(facts, t) for s, t in by.items()} for n, by in texts.items()}
    saved["rescored"] = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    runs = [None if saved[k] is None else _training(saved[k]) for k in ("peer", "ours")]
    assert runs[1] is not None
    save(saved, facts, texts, peer=runs[0], ours=runs[1], console=console)


def _training(saved: dict[str, Any]) -> Training:
    fields = ("label", "steps", "tokens", "loop_seconds", "wall_seconds")
    run = Training(**{k: saved[k] for k in fields})
    run.losses = [(int(step), float(loss)) for step, loss in saved["losses"]]
    return run


TUNING_HEADER = """# Fine-tuning benchmark: tuning log

Trials of `python -m meshbench.finetune_bench --tune --set NAME=VALUE ...`: each line is the
settings tried and the candidate's score on the tuning questions only (the validation file). The
test questions are never answered in a trial; `HYPERPARAMETERS` in the benchmark is the best line.

| when | hyperparameters | tuning questions right |
|---|---|---|
"""


if __name__ == "__main__":
    main()
