"""The A/B stage's verdict on a candidate version: roll back, advance, promote or hold.

Two kinds of evidence, read for the candidate and production over the same period:

- **Quality**: users' up/down ratings of each version's answers (the feedback service). The
  candidate may be at most ``margin`` worse than production in up-rate. A mixture
  sequential probability ratio test (mSPRT; Johari, Pekelis and Walsh, "Always valid
  inference", 2017) on the difference of the two up-rates, at the boundary
  ``d = -margin``, may be read after every rating without inflating its error rates:

  - *worse* when its statistic reaches ``1/alpha`` with the estimate below the boundary:
    a candidate exactly at the boundary is called worse with probability at most ``alpha``;
  - *not worse* when it reaches ``1/beta`` with the estimate above: a candidate at the
    boundary passes with probability at most ``beta`` (the risk of promoting a regression).

  The test uses the normal approximation of the difference (its variance from the
  Agresti-Caffo rates, so that 0 or 100% up-rates do not make it zero) and a normal
  mixture of width ``tau`` over the alternatives.
- **Guards** (the ops service's SLIs): the candidate's P99 latency and error rate against
  production's. A breach rolls back at once, whatever the ratings say.

Too little of either holds the release: below ``min_ratings`` ratings or ``min_requests``
requests a version, nothing is concluded, and without a *not worse* verdict the last step
never promotes (threshold-only canaries that pass on "no values found" are the failure
this avoids). The controller that applies these verdicts owns the I/O; this module has none.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

Quality = Literal["worse", "not_worse", "pending"]
Action = Literal["rollback", "advance", "promote", "hold"]


@dataclass(frozen=True)
class Ratings:
    """One version's rated answers in the release's period."""

    rated: int
    up: int

    def __post_init__(self) -> None:
        if self.rated < 0 or not 0 <= self.up <= self.rated:
            raise ValueError(f"ratings: up={self.up} of rated={self.rated} is impossible")


@dataclass(frozen=True)
class Slis:
    """One version's service levels in the release's period (ops service)."""

    requests: int
    errors: int
    p99_s: float | None  # None: no request finished in the window

    def __post_init__(self) -> None:
        if self.requests < 0 or not 0 <= self.errors <= self.requests:
            raise ValueError(f"slis: errors={self.errors} of requests={self.requests}")


@dataclass(frozen=True)
class QualityPolicy:
    margin: float = 0.05  # the candidate may be this much worse in up-rate (absolute)
    alpha: float = 0.05  # P(roll back a candidate at the margin)
    beta: float = 0.05  # P(pass a candidate at the margin)
    tau: float = 0.1  # width of the mixture over differences of up-rate
    min_ratings: int = 30  # per version, before any verdict

    def __post_init__(self) -> None:
        for name in ("margin", "alpha", "beta", "tau"):
            value = getattr(self, name)
            if not 0.0 < value < 1.0:
                raise ValueError(f"quality policy: {name} must be in (0, 1), got {value}")
        if self.min_ratings < 1:
            raise ValueError("quality policy: min_ratings must be at least 1")


@dataclass(frozen=True)
class GuardPolicy:
    max_p99_ratio: float = 1.25  # candidate P99 over production's
    p99_slack_s: float = 0.05  # absolute allowance on top (small P99s are noisy)
    max_error_rate_increase: float = 0.005  # candidate's error rate minus production's
    min_excess_errors: int = 3  # errors beyond production's rate before a breach counts
    min_requests: int = 50  # per version, before any verdict

    def __post_init__(self) -> None:
        if self.max_p99_ratio < 1.0:
            raise ValueError("guard policy: max_p99_ratio must be at least 1")
        if self.p99_slack_s < 0 or not 0 <= self.max_error_rate_increase < 1:
            raise ValueError("guard policy: p99_slack_s and max_error_rate_increase >= 0")
        if self.min_requests < 1 or self.min_excess_errors < 1:
            raise ValueError("guard policy: min_requests and min_excess_errors >= 1")


@dataclass(frozen=True)
class QualityVerdict:
    outcome: Quality
    difference: float | None  # candidate's up-rate minus production's
    statistic: float | None  # the mSPRT likelihood ratio at the margin
    reason: str


@dataclass(frozen=True)
class GuardVerdict:
    breached: bool
    enough: bool  # both versions had min_requests
    reason: str


@dataclass(frozen=True)
class Verdict:
    action: Action
    reason: str
    quality: QualityVerdict
    guards: GuardVerdict


def quality(candidate: Ratings, production: Ratings, policy: QualityPolicy) -> QualityVerdict:
    """The sequential test's verdict on the candidate's up-rate against production's."""
    low = min(candidate.rated, production.rated)
    if low < policy.min_ratings:
        return QualityVerdict(
            "pending", None, None,
            f"{low} rating(s) for a version; at least {policy.min_ratings} each are needed",
        )  # fmt: skip
    rate_c, rate_p = candidate.up / candidate.rated, production.up / production.rated
    difference = rate_c - rate_p
    adjusted_c = (candidate.up + 1) / (candidate.rated + 2)
    adjusted_p = (production.up + 1) / (production.rated + 2)
    variance = (
        adjusted_c * (1 - adjusted_c) / candidate.rated
        + adjusted_p * (1 - adjusted_p) / production.rated
    )
    ratio = msprt(difference, -policy.margin, variance, policy.tau)
    stated = f"up-rate {rate_c:.1%} against {rate_p:.1%} (difference {difference:+.1%})"
    if difference < -policy.margin and ratio >= 1 / policy.alpha:
        return QualityVerdict("worse", difference, ratio, f"users rate it worse: {stated}")
    if difference > -policy.margin and ratio >= 1 / policy.beta:
        return QualityVerdict("not_worse", difference, ratio, f"not worse: {stated}")
    return QualityVerdict("pending", difference, ratio, f"no verdict yet: {stated}")


def msprt(estimate: float, null: float, variance: float, tau: float) -> float:
    """The mixture likelihood ratio of a normal mean ``null`` against N(null, tau^2)
    alternatives, for an ``estimate`` with ``variance``; capped to stay finite."""
    total = variance + tau * tau
    log_ratio = 0.5 * math.log(variance / total) + (
        tau * tau * (estimate - null) ** 2 / (2 * variance * total)
    )
    return math.exp(min(log_ratio, 700.0))


def guards(candidate: Slis, production: Slis, policy: GuardPolicy) -> GuardVerdict:
    """Whether the candidate is slower or fails more than production allows."""
    low = min(candidate.requests, production.requests)
    if low < policy.min_requests:
        return GuardVerdict(
            False, False, f"{low} request(s) for a version; {policy.min_requests} each needed"
        )
    base_rate = production.errors / production.requests
    allowed = (base_rate + policy.max_error_rate_increase) * candidate.requests
    excess = candidate.errors - base_rate * candidate.requests
    if candidate.errors > allowed and excess >= policy.min_excess_errors:
        return GuardVerdict(
            True, True,
            f"error rate {candidate.errors / candidate.requests:.2%} against production's "
            f"{base_rate:.2%}",
        )  # fmt: skip
    if candidate.p99_s is None or production.p99_s is None:
        return GuardVerdict(False, False, "no P99 for a version yet")
    limit = production.p99_s * policy.max_p99_ratio + policy.p99_slack_s
    if candidate.p99_s > limit:
        return GuardVerdict(
            True, True,
            f"P99 {candidate.p99_s * 1000:.0f} ms against production's "
            f"{production.p99_s * 1000:.0f} ms (limit {limit * 1000:.0f} ms)",
        )  # fmt: skip
    return GuardVerdict(False, True, "within the guards")


def decide(
    *, candidate: tuple[Ratings, Slis], production: tuple[Ratings, Slis],
    last_step: bool, step_age_s: float, min_step_s: float,
    quality_policy: QualityPolicy, guard_policy: GuardPolicy,
) -> Verdict:  # fmt: skip
    """What the controller does now at a traffic step.

    A guard breach or a *worse* verdict rolls back at any step. A step lasts at least
    ``min_step_s`` and needs the guards' data before traffic moves on; the last step
    promotes only on a *not worse* verdict, and holds until there is one.
    """
    q = quality(candidate[0], production[0], quality_policy)
    g = guards(candidate[1], production[1], guard_policy)
    action: Action
    if g.breached or q.outcome == "worse":
        action, reason = "rollback", f"guard: {g.reason}" if g.breached else f"quality: {q.reason}"
    elif step_age_s < min_step_s:
        action, reason = "hold", f"the step has run {step_age_s:.0f} s of {min_step_s:.0f}"
    elif not g.enough:
        action, reason = "hold", f"guards: {g.reason}"
    elif not last_step:
        action, reason = "advance", "guards hold at this step"
    elif q.outcome == "not_worse":
        action, reason = "promote", f"quality: {q.reason}; guards: {g.reason}"
    else:
        action, reason = "hold", f"quality: {q.reason}"
    return Verdict(action, reason, q, g)
