"""Differentially private fine-tuning (DP-SGD): the privacy settings and their accounting.

A DP-SGD step clips each example's gradient to ``max_grad_norm``, sums them, adds Gaussian
noise of standard deviation ``noise_multiplier * max_grad_norm`` and divides by the
expected batch size. The guarantee is per training row (a row is the unit of privacy: a
person with many rows is protected per row, not as a whole).

- :class:`~shared.training_requests.Privacy` is what a job asks for: a target ε at δ, and
  the clipping norm. δ defaults to ``min(1e-5, 1/(10 n))`` for n training rows and must be
  below ``1/n``: at ``δ = 1/n`` a mechanism that publishes one random row outright would
  qualify, so the guarantee would say little.
- :func:`poisson_rows` is each step's batch: every row taken independently with
  probability ``sample_rate`` (the sampling the accountant's analysis assumes; a fixed-size
  shuffled batch would not match it). A function of the run's secret and the step only, so
  a resumed run draws the same batches; the secret is drawn from the operating system's
  random source and kept only in the run's private checkpoints (never the job's seed,
  which the caller chooses and the lineage records: with it anyone could recompute which
  rows each step took).
- :func:`plan` derives the noise multiplier that spends the target ε over the run's steps,
  and :func:`spent_epsilon` is what the accountant says was spent after some steps. Both use
  Opacus' accountants (the PRV accountant, Opacus' default, which gives a tighter ε than RDP
  for the same noise).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any

from shared.training_requests import Privacy

ACCOUNTANT = "prv"


class PrivacyBudgetError(ValueError):
    """No noise level spends as little as the requested ε over the run."""


@dataclass(frozen=True)
class Plan:
    """How a run spends its budget: the noise for ``steps`` steps at ``sample_rate``."""

    epsilon: float  # the target
    delta: float
    max_grad_norm: float
    sample_rate: float
    steps: int
    noise_multiplier: float
    accountant: str = ACCOUNTANT

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def sample_rate(batch_size: int, rows: int) -> float:
    """The probability a row is in a step's batch: the expected batch is ``batch_size``."""
    if rows <= 0:
        raise ValueError("no training rows")
    return min(1.0, batch_size / rows)


def default_delta(rows: int) -> float:
    """δ when the job names none: well below ``1/n``."""
    return min(1e-5, 1.0 / (10 * rows))


def poisson_rows(rows: int, rate: float, secret: int, step: int) -> list[int]:
    """Step ``step``'s batch: each of ``rows`` rows independently with probability ``rate``
    (possibly none; a step with an empty batch still adds its noise). ``secret``: the run's
    secret (see the module docstring), not the job's seed."""
    draw = random.Random(f"dp-{secret}-{step}").random
    return [i for i in range(rows) if draw() < rate]


def plan(privacy: Privacy, *, rows: int, batch_size: int, steps: int) -> Plan:
    """The noise multiplier that spends ``privacy.epsilon`` over ``steps`` steps.

    Raises:
        PrivacyBudgetError: a δ not below ``1/n``, or a budget even the largest noise Opacus
            searches overspends.
    """
    from opacus.accountants.utils import get_noise_multiplier

    delta = privacy.delta if privacy.delta is not None else default_delta(rows)
    if delta >= 1.0 / rows:
        raise PrivacyBudgetError(
            f"dp.delta {delta:g} must be below 1/n = {1.0 / rows:.3g} for {rows} training rows"
        )
    rate = sample_rate(batch_size, rows)
    try:
        noise = get_noise_multiplier(
            target_epsilon=privacy.epsilon, target_delta=delta, sample_rate=rate, steps=steps,
            accountant=ACCOUNTANT,
        )  # fmt: skip
    except ValueError as error:
        raise PrivacyBudgetError(
            f"dp.epsilon {privacy.epsilon:g} cannot be met in {steps} steps at sample rate "
            f"{rate:.4g} ({error}); ask for a larger epsilon, fewer epochs or more rows"
        ) from None
    return Plan(privacy.epsilon, delta, privacy.max_grad_norm, rate, steps, float(noise))


def spent_epsilon(noise_multiplier: float, rate: float, steps: int, delta: float) -> float:
    """The ε the accountant gives for ``steps`` steps of this noise and sampling, at δ."""
    from opacus.accountants import create_accountant

    if steps == 0:
        return 0.0
    accountant = create_accountant(mechanism=ACCOUNTANT)
    accountant.history = [(noise_multiplier, rate, steps)]
    return float(accountant.get_epsilon(delta=delta))
