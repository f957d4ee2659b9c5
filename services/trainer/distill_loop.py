"""Distillation with structured pruning on a Ray Train worker: a student cut from the
teacher (:mod:`services.trainer.pruning`: whole layers and feed-forward channels removed,
chosen on the job's rows), then trained to match the teacher. The supervised loop of
:mod:`services.trainer.sft_loop` with these changes:

- **the model** trained is the student, every weight but the token embedding (tied to the
  output head, it stays the teacher's); the teacher is the base, frozen, in eval mode;
- **the loss** is ``ALPHA * T^2 * KL(teacher || student)`` over every real token's
  next-token distribution at temperature ``T``, plus ``(1 - ALPHA) *`` the cross-entropy of
  the answer tokens (the job's labels);
- **the result** adds what was cut (the layers kept and the FFN width; which channels
  were kept is not recorded) and the student's KL to the teacher on the held-out rows
  before and after training.

Data parallel (``ddp``) like a supervised job; the teacher runs on every worker.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from services.trainer.pruning import StudentShape, calibrate, choose_layers, cut_copy, top_channels
from services.trainer.sft import IGNORE, Encoded
from services.trainer.sft_loop import LoopConfig, SupervisedRun, collate

ALPHA = 0.5  # the distillation term's weight; the rest is the answers' cross-entropy
TEMPERATURE = 2.0
CALIBRATION_ROWS = 32


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The distillation loop; what Ray Train's ``TorchTrainer`` runs.

    Raises:
        ValueError: no ``distill`` settings, or a student shape the teacher cannot give.
    """
    from shared.logging import configure_logging

    configure_logging("trainer")
    run = _DistillRun(LoopConfig(**config))
    run.train()
    run.finish()


class _DistillRun(SupervisedRun):
    """A supervised run whose model is a pruned student trained on the teacher's logits."""

    teacher: Any
    kept: dict[str, Any]

    def _model(self, base: Any) -> Any:
        if not self.loop.distill:
            raise ValueError("distill: the loop was started without distillation settings")
        shape = StudentShape(
            layers=int(self.loop.distill["layers"]),
            ffn_keep=float(self.loop.distill.get("ffn_keep", 1.0)),
        )
        self.teacher = base
        calibration = self.train_rows[:CALIBRATION_ROWS]
        batches = [collate(calibration[i : i + 4], self.pad, "cpu")
                   for i in range(0, len(calibration), 4)]  # fmt: skip
        layer_scores, channel_scores = calibrate(base, batches)
        keep = choose_layers(layer_scores, shape.layers)
        intermediate = int(base.config.intermediate_size)
        count = shape.channels(intermediate)
        channels = None
        if count < intermediate:
            channels = [top_channels(channel_scores[i], count) for i in keep]
        student = cut_copy(base, keep, channels)
        for param in base.parameters():
            param.requires_grad_(False)
        base.eval()
        student.get_input_embeddings().weight.requires_grad_(False)  # tied to the output head
        self.kept = {
            "teacher_layers": len(layer_scores), "layers_kept": keep,
            "intermediate_size": count, "teacher_intermediate_size": intermediate,
        }  # fmt: skip
        self.layer_scores = [round(s, 5) for s in layer_scores]
        return student

    def _prepare(self, model: Any) -> Any:
        self.teacher.to(self.device)  # the student goes with Ray Train's prepare_model
        return super()._prepare(model)

    def _settings(self) -> dict[str, Any]:
        return {**super()._settings(), "distill": dict(self.loop.distill or {}), **self.kept}

    def _first_state(self) -> dict[str, Any]:
        state = super()._first_state()
        state["kl_before"] = self.kl_to_teacher(self.held_out)
        return state

    def _step(self, rows: Sequence[int]) -> tuple[float | None, int]:
        import torch

        batch = collate([self.train_rows[i] for i in rows], self.pad, self.device)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        with torch.no_grad():
            teacher = self.teacher(**inputs, use_cache=False).logits
        self.prepared.train()
        student = self.prepared(**inputs).logits
        loss = distill_loss(student, teacher, batch["labels"], batch["attention_mask"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(self.params.values()), self.hp.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach()), int(batch["attention_mask"].sum())

    def kl_to_teacher(self, rows: Sequence[Encoded]) -> float | None:
        """Mean KL(teacher || student) per real token over ``rows`` (temperature 1)."""
        import torch

        total = count = 0.0
        self.model.eval()
        with torch.no_grad():
            for i in range(0, len(rows), 4):
                batch = collate(rows[i : i + 4], self.pad, self.device)
                inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
                student = self.model(**inputs, use_cache=False).logits
                kl = token_kl(student, self.teacher(**inputs, use_cache=False).logits, 1.0)
                mask = batch["attention_mask"].float()
                total += float((kl * mask).sum())
                count += float(mask.sum())
        self.model.train()
        return total / count if count else None

    def _result(self) -> dict[str, Any]:
        return {
            "distill": {
                **self.kept, "layer_scores": self.layer_scores,
                "alpha": ALPHA, "temperature": TEMPERATURE,
                "kl_before": self.state["kl_before"], "kl_after": self.kl_to_teacher(self.held_out),
                "student_parameters": sum(p.numel() for p in self.model.parameters()),
                "teacher_parameters": sum(p.numel() for p in self.teacher.parameters()),
            }
        }  # fmt: skip

    def _compare_to_base(self) -> bool:
        return False  # the student's tensors are not the base's: no weight delta to report


def token_kl(student: Any, teacher: Any, temperature: float) -> Any:
    """KL(teacher || student) of each position's next-token distribution at ``temperature``
    (batch x tokens)."""
    import torch.nn.functional as F

    log_student = F.log_softmax(student.float() / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher.float() / temperature, dim=-1)
    return (log_teacher.exp() * (log_teacher - log_student)).sum(-1)


def distill_loss(student: Any, teacher: Any, labels: Any, mask: Any) -> Any:
    """``ALPHA * T^2 * KL`` over the real tokens plus ``(1 - ALPHA) *`` the answer tokens'
    cross-entropy (``labels``, shifted as for a causal model)."""
    import torch.nn.functional as F

    real = mask.float()
    kl = (token_kl(student, teacher, TEMPERATURE) * real).sum() / real.sum().clamp(min=1)
    targets = labels[:, 1:]
    ce = F.cross_entropy(
        student[:, :-1].transpose(1, 2).float(), targets.clamp(min=0), reduction="none"
    )
    trained = (targets != IGNORE).float()
    ce = (ce * trained).sum() / trained.sum().clamp(min=1)
    return ALPHA * TEMPERATURE**2 * kl + (1 - ALPHA) * ce
