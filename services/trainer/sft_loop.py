"""The fine-tuning loop that Ray Train's ``TorchTrainer`` runs on every worker (the job
process, :mod:`services.trainer.job_process`, starts it): :func:`train_loop_per_worker`.

It imports torch, transformers, PEFT and Ray when called. The model goes through
``ray.train.torch.prepare_model`` (DDP or FSDP with several workers, see
:func:`~services.trainer.sft.parallel_config`). The rows do not go through
``prepare_data_loader``: its ``DistributedSampler`` would have to be replayed to skip the
batches a resumed run already did, while :func:`~services.trainer.sft.epoch_batches` gives
each rank its batches of any step directly. The data, the hyperparameters and the guard it
uses are in :mod:`services.trainer.sft`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from services.trainer.loop_checkpoint import report_checkpoint, restore
from services.trainer.sft import (
    CHECKPOINT_VALID_ROWS,
    HELD_OUT_ROWS,
    IGNORE,
    LORA_TARGETS,
    EncodeCounts,
    Encoded,
    Hyperparameters,
    UpdateCheck,
    check_update,
    control_tokens,
    encode_rows,
    epoch_batches,
    learning_rate_factor,
    read_chat_rows,
    steps_per_epoch,
)


@dataclass(frozen=True)
class LoopConfig:
    """``train_loop_per_worker``'s config, as the job process builds it (plain JSON)."""

    base_dir: str  # the cached Hugging Face folder of the base (base_model.cached_base)
    training_file: str
    output_dir: str
    hyperparameters: dict[str, Any]
    validation_file: str | None = None
    parallel: dict[str, Any] = field(default_factory=dict)  # parallel_config's result
    num_threads: int | None = None
    progress_interval_s: float = 2.0
    privacy: dict[str, Any] | None = None  # DP-SGD's settings (services.trainer.dp_loop)
    distill: dict[str, Any] | None = None  # the student's shape (services.trainer.distill_loop)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Fine-tune on this worker's share of the rows; what Ray Train's ``TorchTrainer`` runs.

    Resumes from ``ray.train.get_checkpoint()`` when there is one (same data order, the
    steps done skipped). Reports progress metrics about every ``progress_interval_s`` and,
    every ``checkpoint_every`` steps and at the last step, metrics with a checkpoint once
    the guard (:func:`check_update`) passed. Rank 0 then writes the merged model, the
    adapter and ``result.json`` into ``output_dir``.

    Raises:
        NoOpUpdateError: the guard's verdict.
        ValueError: no row to train on, or a checkpoint of another run's settings or data.
    """
    from shared.logging import configure_logging

    configure_logging("trainer")
    run = SupervisedRun(LoopConfig(**config))
    run.train()
    run.finish()


class SupervisedRun:
    """One worker's training run (set up by the constructor, which resumes if it can)."""

    lora_targets: tuple[str, ...] = LORA_TARGETS  # the modules that get adapters

    def __init__(self, loop: LoopConfig) -> None:
        import ray.train
        import torch
        from ray.train import torch as ray_torch

        from services.trainer import base_model

        self.started = time.monotonic()
        self.loop, self.hp = loop, Hyperparameters.from_mapping(loop.hyperparameters)
        hp = self.hp
        if loop.num_threads:
            torch.set_num_threads(loop.num_threads)
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.base = base_model.load_base(loop.base_dir)
        tokenizer = self.base.tokenizer
        controls = control_tokens(tokenizer)
        self.train_rows, self.train_counts = encode_rows(
            read_chat_rows(loop.training_file), tokenizer, hp.max_length, controls
        )
        if not self.train_rows:
            raise ValueError("no training row keeps a trained token within max_length")
        self.valid_rows: list[Encoded] = []
        self.valid_counts: EncodeCounts | None = None
        if loop.validation_file:
            self.valid_rows, self.valid_counts = encode_rows(
                read_chat_rows(loop.validation_file), tokenizer, hp.max_length, controls
            )
        self.held_out = (self.valid_rows or self.train_rows)[:HELD_OUT_ROWS]
        pad = tokenizer.pad_token_id
        self.pad = tokenizer.eos_token_id if pad is None else pad
        torch.manual_seed(hp.seed)  # the same adapter initialisation on every rank
        model = self._model(self.base.model)
        self.model = model
        torch.manual_seed(hp.seed + 7919 * self.rank)  # each rank its own dropout masks
        self.device = ray_torch.get_device()
        self.per_epoch = steps_per_epoch(len(self.train_rows), hp.batch_size, self.world)
        self.total = self.per_epoch * hp.n_epochs
        self._epoch_order: tuple[int, list[list[int]]] = (-1, [])  # (epoch, its batches)
        self.prepared: Any = self._prepare(model)
        self.sharded = loop.parallel.get("parallel_strategy") == "fsdp" and self.world > 1
        self.params = trainable_parameters(self.prepared)
        self.optimizer = self._optimizer(
            torch.optim.AdamW(
                list(self.params.values()), lr=hp.learning_rate, weight_decay=hp.weight_decay
            )
        )
        warmup = math.ceil(hp.warmup_ratio * self.total)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: learning_rate_factor(s, self.total, warmup, hp.scheduler)
        )
        self.evaluate = _Evaluator(
            self.prepared if self.sharded else model, pad=self.pad, device=self.device,
            batch_rows=max(1, hp.batch_size // self.world), rank=self.rank, world=self.world,
            sharded=self.sharded,
        )  # fmt: skip
        self._resume(ray.train.get_checkpoint())

    # --- what a variant of the loop (dp_loop, distill_loop) changes

    def _model(self, base: Any) -> Any:
        """The model to train, made from the base: the base with LoRA adapters, or itself."""
        from services.trainer import base_model

        hp = self.hp
        if hp.method != "lora":
            return base
        return base_model.with_lora(
            base, hp.lora_rank, hp.lora_alpha, hp.lora_dropout, self.lora_targets
        )

    def _first_state(self) -> dict[str, Any]:
        """The loop state of a run that starts from step 0."""
        before = self.evaluate(self.held_out)
        return {"step": 0, "tokens": 0, "seconds": 0.0, "losses": [], "before": before}

    def _compare_to_base(self) -> bool:
        """Whether the result reports the trained weights' distance to the base's."""
        return True

    def _checkpoint_state(self) -> dict[str, Any]:
        """What the variant keeps in each checkpoint beside the loop state."""
        return {}

    def _prepare(self, model: Any) -> Any:
        """The model the steps run: DDP- or FSDP-wrapped by Ray Train."""
        from ray.train import torch as ray_torch

        return ray_torch.prepare_model(model, **_resolve_parallel(self.loop.parallel, model))

    def _optimizer(self, optimizer: Any) -> Any:
        return optimizer

    def _settings(self) -> dict[str, Any]:
        """What must not change for a checkpoint to be resumed (how often to checkpoint may)."""
        settings = {k: v for k, v in self.hp.as_dict().items() if k != "checkpoint_every"}
        return {"hyperparameters": settings, "rows": len(self.train_rows), "world_size": self.world}

    def _batch(self, epoch: int, index: int) -> list[int]:
        """The rows of this rank's batch at ``index`` in ``epoch``."""
        if index == 0 or self._epoch_order[0] != epoch:
            order = epoch_batches(
                len(self.train_rows), self.hp.batch_size, self.hp.seed, epoch,
                rank=self.rank, world_size=self.world,
            )  # fmt: skip
            self._epoch_order = (epoch, order)
        return self._epoch_order[1][index]

    def _step(self, rows: Sequence[int]) -> tuple[float | None, int]:
        """One optimisation step on ``rows``: its loss and the tokens it saw."""
        import torch

        batch = collate([self.train_rows[i] for i in rows], self.pad, self.device)
        self.prepared.train()
        loss = causal_lm_loss(self.prepared, batch)
        loss.backward()
        if hasattr(self.prepared, "clip_grad_norm_"):  # FSDP clips across its shards
            self.prepared.clip_grad_norm_(self.hp.max_grad_norm)
        else:
            torch.nn.utils.clip_grad_norm_(list(self.params.values()), self.hp.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach()), int(batch["attention_mask"].sum())

    def _result(self) -> dict[str, Any]:
        """What the variant adds to ``result.json``."""
        return {}

    # ---

    def _resume(self, checkpoint: Any) -> None:
        self.fingerprint = self._settings()
        state = restore(
            checkpoint, self.fingerprint, params=self.params, optimizer=self.optimizer,
            scheduler=self.scheduler, rank=self.rank, sharded=self.sharded,
        )  # fmt: skip
        if state is None:
            state = self._first_state()
        self.state = state
        self.resumed_from, self.resumed_seconds = state["step"], state["seconds"]
        self.trainable_count = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        _log().info(
            "training", rank=self.rank, world=self.world, rows=len(self.train_rows),
            steps=self.total, method=self.hp.method, trainable=self.trainable_count,
            resumed_from=self.resumed_from, counts=asdict(self.train_counts),
        )  # fmt: skip

    def train(self) -> None:
        """Run the steps left, reporting and checkpointing on the way."""
        state = self.state
        self.start_sample = {name: weight_sample(p) for name, p in self.params.items()}
        self.probe = collate(self.held_out[:1], self.pad, self.device)
        self.probed = False  # this run's first checkpoint probes the output, and its last
        self.loop_started = self.last_report = time.monotonic()
        self.loop_tokens, self.window = 0, []
        while state["step"] < self.total:
            epoch, index = divmod(state["step"], self.per_epoch)
            loss, tokens = self._step(self._batch(epoch, index))
            self.scheduler.step()
            state["step"] += 1
            self.loop_tokens += tokens
            state["tokens"] += tokens
            if loss is not None:  # None: a step that saw no row (DP-SGD's sampling)
                self.window.append(loss)
                state["losses"] = (state["losses"] + [loss])[-self.per_epoch :]
            self._maybe_report(epoch + 1)

    def _maybe_report(self, epoch: int) -> None:
        import ray.train

        step = self.state["step"]
        at_checkpoint = step % self.hp.checkpoint_every == 0 or step == self.total
        due = time.monotonic() - self.last_report >= self.loop.progress_interval_s
        # every rank must make the same number of reports: they agree on whether it is time
        if not at_checkpoint and not _all_sum([float(due)], self.world, self.device)[0]:
            return
        elapsed = time.monotonic() - self.loop_started
        rate = _all_sum([self.loop_tokens / max(elapsed, 1e-9)], self.world, self.device)[0]
        metrics: dict[str, Any] = {
            "step": step, "total_steps": self.total, "epoch": epoch,
            "loss": sum(self.window) / len(self.window) if self.window else None,
            "tokens_per_s": rate,
            "eta_s": (self.total - step) * elapsed / (step - self.resumed_from),
            "learning_rate": self.scheduler.get_last_lr()[0],
            "tokens_seen": self.state["tokens"] * self.world,
        }  # fmt: skip
        self.window, self.last_report = [], time.monotonic()
        if not at_checkpoint:
            ray.train.report(metrics)
            return
        checkpoint_started = time.monotonic()
        # the weight deltas at every checkpoint; the effect on a held-out row (two forward
        # passes, more than half a step's time) at the run's first checkpoint, so that an
        # adapter the forward pass ignores fails early, and before the result is saved
        probe = not self.probed or step == self.total
        change = measure_update(
            step, model=self.model, params=self.params, start=self.start_sample,
            probe=self.probe if probe else None, method=self.hp.method, sharded=self.sharded,
        )  # fmt: skip
        self.probed = True
        check_update(change)
        metrics["relative_change"] = change.relative_change
        # a sample, as OpenAI's checkpoint valid_loss is (the whole file is scored at the end)
        sample = self.valid_rows[:CHECKPOINT_VALID_ROWS]
        metrics["valid_loss"] = self.evaluate(sample) if sample else None
        self.state["seconds"] = self.resumed_seconds + elapsed
        self.state["fingerprint"] = self.fingerprint
        self.state.update(self._checkpoint_state())
        evaluated = time.monotonic()
        report_checkpoint(
            metrics, self.state, params=self.params, optimizer=self.optimizer,
            scheduler=self.scheduler, rank=self.rank, sharded=self.sharded,
        )  # fmt: skip
        _log().info(
            "checkpoint", step=step, check_s=round(evaluated - checkpoint_started, 2),
            write_s=round(time.monotonic() - evaluated, 2),
        )  # fmt: skip

    def finish(self) -> None:
        """Evaluate; rank 0 writes the model, the adapter and ``result.json``."""
        from services.trainer import base_model

        # the loop's time to here, its last checkpoint included
        seconds = self.resumed_seconds + time.monotonic() - self.loop_started
        after = self.evaluate(self.held_out)
        valid_loss = self.evaluate(self.valid_rows) if self.valid_rows else None
        trained = self._whole_model()
        if self.rank != 0:
            return
        output, state, world = Path(self.loop.output_dir), self.state, self.world
        written = base_model.save_trained(
            trained,
            self.base.tokenizer,
            self.base.folder if self._compare_to_base() else None,
            output,
        )
        losses = state["losses"]
        result = {
            "method": self.hp.method,
            "steps": state["step"],
            "epochs": self.hp.n_epochs,
            "train_loss": sum(losses) / len(losses) if losses else None,
            "valid_loss": valid_loss,
            "held_out_rows": len(self.held_out),
            "held_out_source": "validation" if self.valid_rows else "training",
            "loss_before": state["before"],
            "loss_after": after,
            "tokens_seen": state["tokens"] * world,
            "tokens_per_s": state["tokens"] * world / max(seconds, 1e-9),
            "train_seconds": seconds,
            "wall_seconds": time.monotonic() - self.started,
            "resumed_from_step": self.resumed_from,
            "trainable_parameters": self.trainable_count,
            "training_counts": asdict(self.train_counts),
            "validation_counts": asdict(self.valid_counts) if self.valid_counts else None,
            "hyperparameters": self.hp.as_dict(),
            **self._result(),
            **written,
        }
        temporary = output / "result.json.tmp"
        temporary.write_text(json.dumps(result, indent=1) + "\n")
        temporary.replace(output / "result.json")
        _log().info("training finished", steps=state["step"], loss_after=after)

    def _whole_model(self) -> Any:
        """The trained model, whole, on rank 0. Under FSDP every rank holds a shard: the full
        state is gathered to rank 0 (every rank must call) and loaded into a fresh CPU copy."""
        if not self.sharded:
            return self.model
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        from services.trainer import base_model

        gather = FullStateDictConfig(offload_to_cpu=True, rank0_only=True)
        with FSDP.state_dict_type(self.prepared, StateDictType.FULL_STATE_DICT, gather):
            state = self.prepared.state_dict()
        if self.rank != 0:
            return None
        fresh = base_model.load_base(self.loop.base_dir).model
        if self.hp.method == "lora":
            hp = self.hp
            fresh = base_model.with_lora(
                fresh, hp.lora_rank, hp.lora_alpha, hp.lora_dropout, self.lora_targets
            )
        fresh.load_state_dict(state)
        return fresh


def _log() -> Any:
    from shared.logging import get_logger

    return get_logger(__name__)


def _resolve_parallel(parallel: Mapping[str, Any], model: Any) -> dict[str, Any]:
    """:func:`parallel_config`'s result with FSDP's wrap policy resolved against ``model``."""
    kwargs = dict(parallel.get("parallel_strategy_kwargs", {}))
    if kwargs.pop("auto_wrap", None) == "decoder_layers":
        import functools

        from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

        layers = {type(m) for m in model.modules() if type(m).__name__.endswith("DecoderLayer")}
        kwargs["auto_wrap_policy"] = functools.partial(
            transformer_auto_wrap_policy, transformer_layer_cls=layers
        )
    strategy = parallel.get("parallel_strategy", "ddp")
    return {"parallel_strategy": strategy, "parallel_strategy_kwargs": kwargs}


def trainable_parameters(module: Any) -> dict[str, Any]:
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


def weight_sample(tensor: Any) -> Any:
    """A fixed strided sample of a parameter (at most 4096 values): enough to see whether
    it moved without keeping a second copy of a fully trained model."""
    flat = tensor.detach().reshape(-1)
    return flat[:: max(1, flat.numel() // 4096)][:4096].float().cpu().clone()


def collate(rows: Sequence[Encoded], pad: int, device: Any) -> dict[str, Any]:
    import torch

    width = max(len(row.input_ids) for row in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row.input_ids)] = torch.tensor(row.input_ids)
        labels[i, : len(row.labels)] = torch.tensor(row.labels)
        mask[i, : len(row.input_ids)] = 1
    return {
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
        "labels": labels.to(device),
    }


def causal_lm_loss(model: Any, batch: Mapping[str, Any]) -> Any:
    """The mean next-token loss over the batch's trained tokens, as ``model(**batch).loss``
    computes it, with logits only at the positions some row of the batch trains on.

    The output layer and the softmax over the whole vocabulary (49k entries for SmolLM2) are a
    fifth of a small model's work per position, and a chat row trains only on its answer;
    ``logits_to_keep`` skips the prompt positions (a forward argument, so it passes through
    the DDP and FSDP wrappers).
    """
    import torch.nn.functional as F

    targets = batch["labels"][:, 1:]  # position i predicts token i + 1
    keep = (targets != IGNORE).any(dim=0).nonzero().squeeze(1)
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep
    ).logits
    picked = targets[:, keep]
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), picked.reshape(-1), ignore_index=IGNORE
    )


def _all_sum(values: list[float], world: int, device: Any) -> list[float]:
    if world == 1:
        return values
    import torch
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return [float(v) for v in tensor.tolist()]


class _Evaluator:
    """Mean loss per trained token over rows, split across ranks (FSDP: every rank runs every
    row, as its forward passes are collective)."""

    def __init__(
        self, model: Any, *, pad: int, batch_rows: int, device: Any, rank: int, world: int,
        sharded: bool,
    ) -> None:  # fmt: skip
        self.model, self.pad, self.batch_rows = model, pad, batch_rows
        self.device, self.rank, self.world, self.sharded = device, rank, world, sharded

    def __call__(self, rows: Sequence[Encoded]) -> float | None:
        import torch

        mine = rows if self.sharded else rows[self.rank :: self.world]
        total = count = 0.0
        self.model.eval()
        with torch.no_grad():
            for i in range(0, len(mine), self.batch_rows):
                batch = collate(mine[i : i + self.batch_rows], self.pad, self.device)
                n = int((batch["labels"][:, 1:] != IGNORE).sum())
                if n:
                    total += float(causal_lm_loss(self.model, batch)) * n
                    count += n
        self.model.train()
        if not self.sharded:
            total, count = _all_sum([total, count], self.world, self.device)
        return total / count if count else None


def measure_update(
    step: int, *, model: Any, params: Mapping[str, Any], start: Mapping[str, Any],
    probe: Mapping[str, Any] | None, method: str, sharded: bool,
) -> UpdateCheck:  # fmt: skip
    """The guard's measurements (:class:`UpdateCheck`) of the weights now; the adapters'
    effect on the output only with a ``probe`` (two forward passes)."""
    import torch

    moved = size = 0.0
    for name, param in params.items():
        now, before = weight_sample(param), start[name]
        moved += float((now - before).pow(2).sum())
        size += float(before.pow(2).sum())
    relative = (moved / size) ** 0.5 if size else (math.inf if moved else 0.0)
    if method != "lora":
        return UpdateCheck(step, relative)
    b_matrices = [p for name, p in params.items() if "lora_B" in name and p.numel()]
    nonzero = sum(1 for p in b_matrices if bool(p.detach().abs().max() > 0))
    change = None
    if probe is not None and not sharded:
        inputs = {k: v for k, v in probe.items() if k != "labels"}
        model.eval()
        with torch.no_grad():
            tuned = model(**inputs).logits
            with model.disable_adapter():
                plain = model(**inputs).logits
        model.train()
        change = float((tuned - plain).abs().max())
    return UpdateCheck(step, relative, nonzero, len(b_matrices), change)
