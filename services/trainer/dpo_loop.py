"""Preference optimisation (DPO) on every Ray Train worker: :func:`train_loop_per_worker`,
run by the job process's ``TorchTrainer`` for a job whose method is ``dpo``.

The training itself is TRL's ``DPOTrainer`` (a library made for it): LoRA adapters on the
base, the reference being the same model with its adapters disabled (no second copy), the
sigmoid DPO loss at ``beta``. The rows are preference pairs (``prompt``, ``chosen``,
``rejected``; :func:`~services.trainer.sft.read_preference_rows`), e.g. a rated-down answer
and the correction a user gave for it. What this module adds around TRL is what the
trainer promises every job:

- progress to the job's stream at every logged step (``ray.train.report``), in the same
  shape as supervised jobs (step, total steps, loss, tokens per second, ETA);
- a checkpoint every ``checkpoint_every`` steps: TRL's own checkpoint folder, handed to Ray
  Train, from which a run started again after a crash resumes (same settings and data
  only: a fingerprint in the folder is checked);
- the no-op guard (:func:`~services.trainer.sft.check_update`) at every checkpoint and at
  the end;
- the held-out measure: on the validation pairs (else the first training pairs), the
  share of pairs whose preferred answer the model finds likelier than the other one (mean
  log-probability per token) and the mean margin, before and after;
- rank 0 writes the merged model, the adapter and ``result.json`` like a supervised run.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from services.trainer.sft import (
    HELD_OUT_ROWS,
    LORA_TARGETS,
    Hyperparameters,
    check_update,
    control_tokens,
    learning_rate_factor,
    read_preference_rows,
)
from services.trainer.sft_loop import (
    LoopConfig,
    measure_update,
    trainable_parameters,
    weight_sample,
)

FINGERPRINT = "meshllm-fingerprint.json"


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Run DPO on this worker (see the module docstring).

    Raises:
        NoOpUpdateError: the guard's verdict.
        ValueError: no pair to train on, or a checkpoint of another run's settings or data.
    """
    import ray.train
    import torch

    from services.trainer import base_model
    from shared.logging import configure_logging

    configure_logging("trainer")
    started = time.monotonic()
    loop = LoopConfig(**config)
    hp = Hyperparameters.from_mapping(loop.hyperparameters)
    if loop.num_threads:
        torch.set_num_threads(loop.num_threads)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    base = base_model.load_base(loop.base_dir)
    controls = control_tokens(base.tokenizer)
    train_rows, dropped = read_preference_rows(loop.training_file, controls)
    if not train_rows:
        raise ValueError("no preference pair left to train on")
    valid_rows = []
    if loop.validation_file:
        valid_rows = read_preference_rows(loop.validation_file, controls)[0]
    held_out = (valid_rows or train_rows)[:HELD_OUT_ROWS]
    before = preference_stats(base.model, base.tokenizer, held_out, hp.max_length)
    torch.manual_seed(hp.seed)  # the same adapter initialisation on every rank
    fingerprint = {
        "hyperparameters": {k: v for k, v in hp.as_dict().items() if k != "checkpoint_every"},
        "rows": len(train_rows), "world_size": world,
        "training_sha256": hashlib.sha256(Path(loop.training_file).read_bytes()).hexdigest(),
    }  # fmt: skip
    # TRL's own checkpoints, handed to Ray Train as they are written; removed at the end
    scratch = Path(loop.output_dir) / f"dpo-scratch-rank{rank}"
    try:
        _train(loop, hp, base, (train_rows, dropped, valid_rows, held_out, before), fingerprint,
               scratch=scratch, rank=rank, world=world, started=started)  # fmt: skip
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _train(
    loop: LoopConfig, hp: Hyperparameters, base: Any, data: tuple[Any, ...],
    fingerprint: dict[str, Any], *, scratch: Path, rank: int, world: int, started: float,
) -> None:  # fmt: skip
    """TRL's run, then (rank 0) the model and ``result.json``."""
    import ray.train
    import torch
    from datasets import Dataset
    from trl.trainer.dpo_config import DPOConfig
    from trl.trainer.dpo_trainer import DPOTrainer

    from services.trainer import base_model

    train_rows, dropped, valid_rows, held_out, before = data
    lora = base_model.lora_config(
        base.model, hp.lora_rank, hp.lora_alpha, hp.lora_dropout, LORA_TARGETS
    )
    args = DPOConfig(
        output_dir=str(scratch), per_device_train_batch_size=max(1, hp.batch_size // world),
        num_train_epochs=hp.n_epochs, learning_rate=hp.learning_rate, beta=hp.beta,
        weight_decay=hp.weight_decay, max_grad_norm=hp.max_grad_norm, seed=hp.seed,
        max_length=hp.max_length, logging_steps=1, save_strategy="steps",
        save_steps=hp.checkpoint_every, save_total_limit=1, report_to=[],
        use_cpu=not torch.cuda.is_available(), disable_tqdm=True, bf16=False,
        dataloader_num_workers=0,
    )  # fmt: skip
    # the reference is the same model with its adapters disabled (TRL does that for a new
    # adapter), so no second copy of the weights is held
    trainer = _with_our_schedule(DPOTrainer, hp)(
        model=base.model, args=args, train_dataset=Dataset.from_list(train_rows),
        processing_class=base.tokenizer, peft_config=lora,
    )  # fmt: skip
    model: Any = trainer.model
    relay = _Relay(model, rank=rank, fingerprint=fingerprint)
    trainer.add_callback(relay)
    resumed = _Resume(ray.train.get_checkpoint(), fingerprint)
    with resumed as folder:
        relay.tokens_before = resumed.tokens_before
        output = trainer.train(resume_from_checkpoint=folder)
    relay.check(trainer.state.global_step)
    after = preference_stats(model, base.tokenizer, held_out, hp.max_length)
    if rank != 0:
        return
    out = Path(loop.output_dir)
    written = base_model.save_trained(model, base.tokenizer, base.folder, out)
    seconds = float(output.metrics.get("train_runtime") or 0.0)  # this run's
    result = {
        "method": "dpo", "steps": trainer.state.global_step, "epochs": hp.n_epochs,
        "train_loss": output.training_loss, "valid_loss": None,
        "held_out_rows": len(held_out),
        "held_out_source": "validation" if valid_rows else "training",
        "preferred_before": before[0], "preferred_after": after[0],
        "margin_before": before[1], "margin_after": after[1],
        "reward_accuracy": relay.last.get("rewards/accuracies"),
        "reward_margin": relay.last.get("rewards/margins"),
        "tokens_seen": int(relay.tokens_before + relay.tokens),
        "tokens_per_s": relay.tokens / seconds if seconds else 0.0,
        "train_seconds": seconds, "wall_seconds": time.monotonic() - started,
        "resumed_from_step": relay.resumed_from,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "training_counts": {"rows": len(train_rows) + dropped, "kept": len(train_rows),
                            "dropped_control": dropped},
        "hyperparameters": hp.as_dict(), **written,
    }  # fmt: skip
    temporary = out / "result.json.tmp"
    temporary.write_text(json.dumps(result, indent=1) + "\n")
    temporary.replace(out / "result.json")


def _with_our_schedule(trainer_class: Any, hp: Hyperparameters) -> Any:
    """``trainer_class`` with the learning-rate schedule of supervised jobs
    (:func:`~services.trainer.sft.learning_rate_factor`): its warm-up starts above zero,
    where Hugging Face's spends the first step at a zero rate (a one-step run would then
    change nothing, and the guard would fail it)."""
    import torch

    class WithSchedule(trainer_class):  # type: ignore[misc]
        def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
            if getattr(self, "lr_scheduler", None) is None:
                warmup = math.ceil(hp.warmup_ratio * num_training_steps)
                self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                    optimizer or self.optimizer,
                    lambda step: learning_rate_factor(
                        step, num_training_steps, warmup, hp.scheduler
                    ),
                )
            return self.lr_scheduler

    return WithSchedule


class _Resume:
    """The folder of a checkpoint to resume from (None: start afresh), as a context."""

    def __init__(self, checkpoint: Any, fingerprint: dict[str, Any]) -> None:
        self.checkpoint, self.fingerprint = checkpoint, fingerprint
        self._context: Any = None
        self.tokens_before = 0.0  # trained on by the runs before this one

    def __enter__(self) -> str | None:
        if self.checkpoint is None:
            return None
        self._context = self.checkpoint.as_directory()
        folder = Path(self._context.__enter__())
        saved = json.loads((folder / FINGERPRINT).read_text())
        if saved.get("fingerprint") != self.fingerprint:
            raise ValueError("the checkpoint is of a run with other settings or data; not resuming")
        self.tokens_before = float(saved.get("tokens", 0.0))
        return str(folder)

    def __exit__(self, *exc: object) -> None:
        if self._context is not None:
            self._context.__exit__(*exc)


class _Relay(TrainerCallback):
    """TRL's logs and checkpoints to Ray Train, with the guard at every checkpoint."""

    def __init__(self, model: Any, *, rank: int, fingerprint: dict[str, Any]) -> None:
        self.model, self.rank, self.fingerprint = model, rank, fingerprint
        self.params = trainable_parameters(model)
        self.start = {name: weight_sample(p) for name, p in self.params.items()}
        self.tokens = 0.0  # TRL's count of tokens trained on (it counts this run only)
        self.tokens_before = 0.0  # the runs' before a resume (kept in each checkpoint)
        self.last: dict[str, Any] = {}  # TRL's last log
        self.reported: dict[str, Any] = {}  # and what it became
        self.resumed_from = 0
        self.began = time.monotonic()

    def on_train_begin(self, args: Any, state: Any, control: Any, **_: Any) -> None:
        self.resumed_from = int(state.global_step)
        self.began = time.monotonic()

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **_: Any) -> None:
        import ray.train

        logs = logs or {}
        if "loss" not in logs:  # the summary at the end
            return
        self.last = dict(logs)
        self.tokens = float(logs.get("num_tokens", self.tokens))
        step = int(state.global_step)
        elapsed = time.monotonic() - self.began
        done = max(1, step - self.resumed_from)
        self.reported = {
            "step": step, "total_steps": int(state.max_steps),
            "epoch": math.ceil(state.epoch or 0), "loss": float(logs["loss"]),
            "tokens_per_s": self.tokens / max(elapsed, 1e-9),
            "eta_s": (int(state.max_steps) - step) * elapsed / done,
            "learning_rate": logs.get("learning_rate"),
            "reward_margin": logs.get("rewards/margins"),
        }  # fmt: skip
        ray.train.report(self.reported)

    def on_save(self, args: Any, state: Any, control: Any, **_: Any) -> None:
        import ray.train

        step = int(state.global_step)
        self.check(step)
        folder = Path(args.output_dir) / f"checkpoint-{step}"
        metrics = {**self.reported, "step": step, "valid_loss": None}
        if self.rank != 0:
            ray.train.report(metrics)
            return
        saved = {"fingerprint": self.fingerprint, "tokens": self.tokens_before + self.tokens}
        (folder / FINGERPRINT).write_text(json.dumps(saved))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)))

    def check(self, step: int) -> None:
        """The guard: the adapters moved and change the output (probe: a fixed prompt)."""
        import torch

        probe = {"input_ids": torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])}
        device = next(self.model.parameters()).device
        probe = {k: v.to(device) for k, v in probe.items()}
        check_update(measure_update(
            step, model=self.model, params=self.params, start=self.start, probe=probe,
            method="lora", sharded=False,
        ))  # fmt: skip


def preference_stats(
    model: Any, tokenizer: Any, pairs: Sequence[dict[str, Any]], max_length: int
) -> tuple[float | None, float | None]:
    """Over ``pairs``: the share whose preferred answer has the higher mean log-probability
    per token under ``model``, and the mean difference of those means."""
    import torch

    if not pairs:
        return None, None
    wins, margins = 0, []
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        for pair in pairs:
            prompt = tokenizer.apply_chat_template(
                pair["prompt"], tokenize=False, add_generation_prompt=True
            )
            scores = [
                _mean_logprob(model, tokenizer, prompt, pair[k][0]["content"],
                              max_length=max_length, device=device)
                for k in ("chosen", "rejected")
            ]  # fmt: skip
            margins.append(scores[0] - scores[1])
            wins += scores[0] > scores[1]
    model.train()
    return wins / len(pairs), sum(margins) / len(margins)


def _mean_logprob(
    model: Any, tokenizer: Any, prompt: str, answer: str, *, max_length: int, device: Any
) -> float:
    import torch

    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    answer_ids = [*tokenizer.encode(answer, add_special_tokens=False), tokenizer.eos_token_id]
    ids = (prompt_ids + answer_ids)[:max_length]
    if len(ids) <= len(prompt_ids):
        return 0.0
    logits = model(input_ids=torch.tensor([ids], device=device)).logits[0, :-1]
    logprobs = torch.log_softmax(logits.float(), -1)
    targets = torch.tensor(ids[1:], device=device)
    picked = logprobs.gather(1, targets[:, None])[:, 0][len(prompt_ids) - 1 :]
    return float(picked.mean())
