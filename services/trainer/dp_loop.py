"""Differentially private LoRA fine-tuning (DP-SGD with Opacus) on a Ray Train worker: the
supervised loop of :mod:`services.trainer.sft_loop` with four things changed.

- **Batches** are Poisson samples (:func:`~services.trainer.privacy.poisson_rows`): each
  row joins a step with probability ``batch_size / n``, as the accountant assumes.
- **The adapters** go on the attention's query and value projections only
  (``DP_LORA_TARGETS``: on SmolLM2 a fifth of the default's adapter weights): the noise
  grows with the number of trainable weights.
- **The model** is wrapped in Opacus' ``GradSampleModule`` (per-example gradients of the
  trainable adapter weights; the frozen base has none) instead of DDP, and **the optimiser**
  in its ``DPOptimizer``: every example's gradient clipped to ``max_grad_norm``, Gaussian
  noise of ``noise_multiplier * max_grad_norm`` added, divided by the expected batch size.
  No other clipping. The loss is each row's mean over its trained tokens, averaged over the
  rows, so one row's gradient depends on that row alone.
- **The noise** is derived before the first step from the target ε at δ over the run's
  steps (:func:`~services.trainer.privacy.plan`); ``result.json`` holds the plan and the ε
  the accountant gives for the steps actually taken.

One worker only: Opacus' distributed optimiser would have to replace DDP's gradient
averaging, which is not built.

The randomness privacy rests on (which rows each step takes, the noise) comes from a secret
the run draws from the operating system at its start, kept only in its checkpoints (never
the job's seed, which the caller picks and the lineage shows); the noise has its own torch
generator, seeded from that secret and checkpointed, and is drawn in Opacus' ``secure_mode``
(four draws summed, against floating-point attacks). The generator is torch's Mersenne
Twister, not a cryptographic one: with its state secret that is the accepted practice, but
it is not a CSPRNG.

The guarantee covers the weights. The job's metrics (losses, the guard's probe, the
before/after evaluation) are computed on the owner's rows without noise: they are for the
data's owner, not for those who only get the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from services.trainer.privacy import Plan, plan, poisson_rows, spent_epsilon
from services.trainer.sft import IGNORE
from services.trainer.sft_loop import LoopConfig, SupervisedRun, collate
from shared.training_requests import Privacy

DP_LORA_TARGETS = ("q_proj", "v_proj")


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The DP-SGD loop; what Ray Train's ``TorchTrainer`` runs (see the module docstring).

    Raises:
        ValueError: more than one worker, a method other than LoRA, no ``privacy`` in the
            config, or a budget no noise level meets (PrivacyBudgetError).
    """
    import warnings

    from shared.logging import configure_logging

    configure_logging("trainer")
    # Opacus' hooks on a model whose inputs (frozen embeddings) need no gradient, and its
    # accountant's search over orders: both expected, neither actionable
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
    run = _PrivateRun(LoopConfig(**config))
    run.train()
    run.finish()


class _PrivateRun(SupervisedRun):
    """A supervised run with DP-SGD's sampling, clipping and noise."""

    # Adapters on the attention's query and value projections only, as in published DP
    # fine-tuning with LoRA (Yu et al., 2021): the noise added per step grows with the
    # square root of the trainable parameters, the signal does not.
    lora_targets = DP_LORA_TARGETS
    plan: Plan

    def _prepare(self, model: Any) -> Any:
        from opacus import GradSampleModule

        if self.world != 1:
            raise ValueError("dp: DP-SGD runs on one worker; this run has " + str(self.world))
        if self.hp.method != "lora":
            raise ValueError("dp: DP-SGD trains LoRA adapters only")
        if not self.loop.privacy:
            raise ValueError("dp: the loop was started without privacy settings")
        privacy = Privacy.from_mapping(self.loop.privacy)
        self.plan = plan(
            privacy, rows=len(self.train_rows), batch_size=self.hp.batch_size, steps=self.total
        )
        return GradSampleModule(model.to(self.device), batch_first=True, loss_reduction="mean")

    def _optimizer(self, optimizer: Any) -> Any:
        import torch
        from opacus.optimizers import DPOptimizer

        # the noise's own generator, seeded from the run's secret once the state is known
        self.noise = torch.Generator(device=self.device)
        return DPOptimizer(
            optimizer,
            noise_multiplier=self.plan.noise_multiplier,
            max_grad_norm=self.plan.max_grad_norm,
            expected_batch_size=min(self.hp.batch_size, len(self.train_rows)),
            loss_reduction="mean",
            generator=self.noise,
            secure_mode=True,  # noise robust to floating-point attacks (four draws summed)
        )

    def _settings(self) -> dict[str, Any]:
        return {**super()._settings(), "dp": self.plan.as_dict()}

    def _first_state(self) -> dict[str, Any]:
        import secrets

        return {**super()._first_state(), "dp_secret": secrets.randbits(62)}

    def _resume(self, checkpoint: Any) -> None:
        super()._resume(checkpoint)
        self.secret = int(self.state["dp_secret"])
        if "dp_noise" in self.state:  # resumed: the noise goes on where it stopped
            self.noise.set_state(self.state["dp_noise"])
        else:
            self.noise.manual_seed(self.secret)

    def _checkpoint_state(self) -> dict[str, Any]:
        return {"dp_noise": self.noise.get_state()}

    def _batch(self, epoch: int, index: int) -> list[int]:
        step = epoch * self.per_epoch + index
        return poisson_rows(len(self.train_rows), self.plan.sample_rate, self.secret, step)

    def _step(self, rows: Sequence[int]) -> tuple[float | None, int]:
        if not rows:  # nobody sampled: the step still adds its noise (and is accounted)
            empty_step(self.optimizer, self.params.values())
            return None, 0
        batch = collate([self.train_rows[i] for i in rows], self.pad, self.device)
        self.prepared.train()
        logits = self.prepared(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits
        loss = per_row_loss(logits, batch["labels"]).mean()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach()), int(batch["attention_mask"].sum())

    def _result(self) -> dict[str, Any]:
        steps = self.state["step"]
        spent = spent_epsilon(
            self.plan.noise_multiplier, self.plan.sample_rate, steps, self.plan.delta
        )
        return {"dp": {**self.plan.as_dict(), "steps_taken": steps, "epsilon_spent": spent}}


def empty_step(optimizer: Any, params: Any) -> None:
    """A DP-SGD step whose batch is empty: no gradient, only the noise (on each parameter's
    own device)."""
    import torch

    for param in params:
        param.grad_sample = torch.zeros((0, *param.shape), dtype=param.dtype, device=param.device)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def per_row_loss(logits: Any, labels: Any) -> Any:
    """Each row's mean next-token loss over its trained tokens (``labels`` not ``IGNORE``):
    a row's value, and so its gradient, depends on that row alone, whatever else is in the
    batch and however it is padded."""
    import torch.nn.functional as F

    targets = labels[:, 1:]
    trained = targets != IGNORE
    token_loss = F.cross_entropy(
        logits[:, :-1].transpose(1, 2).float(), targets.clamp(min=0), reduction="none"
    )
    return (token_loss * trained).sum(1) / trained.sum(1).clamp(min=1)
