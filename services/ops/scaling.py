"""Replica counts for the Serve deployments, decided from the SLIs and the queue. No I/O.

The policy, one per deployment (``ops.scaling`` in the settings):

- **Out** when, for ``out_for_s``, the P99 latency of the deployment's operations is above
  ``out_p99_s`` (over ``window_s``, with at least ``min_requests`` answers), or the
  unfinished requests in Kafka (the request topics' end offsets minus the router group's
  committed offsets: accepted by the gateway, queued or being answered; the router
  commits only up to its first unfinished one, so one long answer holds later ones in
  the count too) exceed ``out_waiting_per_replica`` per replica. P99 sees a slowdown
  after it happened; the queue sees demand before it reaches an engine, which Serve's own
  autoscaler (ongoing requests per replica) cannot. One replica more, or as many as the
  queue needs (at most twice as many).
- **In** by one when, for ``in_for_s``: the P99 is below ``in_p99_s`` (or there were too
  few answers to have one), and the requests in progress per replica are below
  ``in_concurrency_per_replica`` both on average over the window (the answers' summed
  durations over its length, Little's law) and now (the queue, which counts the requests
  being answered too: the router commits only up to its first unfinished one). An
  idle replica holds cores or a GPU for nothing: the seed's >70% utilisation target makes
  idleness a cost alarm too.
- Never outside ``[min_replicas, max_replicas]``; a count outside is brought back (after
  the cooldown). The inference service says how many replicas it would run (its own
  bounds, and what its machine can place); the scaler asks for no more than that, and
  none while a replica it asked for is still starting. A scale-out at most doubles.
- An unknown queue (the broker did not answer) is never read as an idle one.
- After a change, no scale-out for ``out_cooldown_s`` and no scale-in for
  ``in_cooldown_s``: a new replica needs time to load, and the windows time to show its
  effect (keep ``out_cooldown_s`` at least ``window_s``, or slow answers from before the
  change count twice).
- A deployment whose replica count is unknown (no status from the inference service
  yet) is left alone.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Reason = Literal["p99", "queue", "idle", "below_min", "above_max"]


class ScalingPolicy(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    deployment: str = Field(min_length=1, description="The Serve deployment it sizes.")
    operations: tuple[str, ...] = Field(
        min_length=1, description="The SLI operations this deployment answers."
    )
    min_replicas: int = Field(1, ge=1)
    max_replicas: int = Field(4, ge=1)
    window_s: float = Field(60.0, gt=0, description="The SLI window the policy reads.")
    min_requests: int = Field(20, ge=1, description="Fewer answers: no P99 to act on.")
    out_p99_s: float = Field(0.5, gt=0, description="Scale out above this P99 latency.")
    out_waiting_per_replica: float | None = Field(
        24.0, gt=0, description="Scale out above this many unfinished requests (queued or "
        "being answered) per replica: above a full batch (16) and then some; null: the queue "
        "is not read (a deployment the request topics do not feed)."
    )  # fmt: skip
    out_for_s: float = Field(15.0, ge=0)
    out_cooldown_s: float = Field(60.0, ge=0)
    in_p99_s: float = Field(0.25, gt=0, description="Scale in only below this P99.")
    in_concurrency_per_replica: float = Field(
        0.5, ge=0, description="Scale in below this many answers in progress per replica."
    )
    in_for_s: float = Field(300.0, ge=0)
    in_cooldown_s: float = Field(300.0, ge=0)

    @model_validator(mode="after")
    def _consistent(self) -> ScalingPolicy:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})"
            )
        if self.in_p99_s > self.out_p99_s:
            raise ValueError(f"in_p99_s ({self.in_p99_s}) exceeds out_p99_s ({self.out_p99_s})")
        return self


@dataclass(frozen=True)
class Demand:
    """What the policy reads about one deployment at one moment."""

    answers: int  # in the window
    p99_s: float | None
    concurrency: float  # answers in progress on average over the window
    waiting: int | None  # requests in Kafka not yet answered; None: unknown


@dataclass(frozen=True)
class Decision:
    deployment: str
    current: int
    target: int
    reason: Reason
    detail: str  # the numbers behind the reason, for people


@dataclass
class _Track:
    out_since: float | None = None
    in_since: float | None = None
    changed_at: float = -math.inf


class Scaler:
    """Keeps each deployment's pending conditions and last change between rounds."""

    def __init__(self, policies: Iterable[ScalingPolicy]) -> None:
        self.policies = {policy.deployment: policy for policy in policies}
        self._tracks = {name: _Track() for name in self.policies}

    def changed(self, deployment: str, at_s: float) -> None:
        """Note a change made at ``at_s`` (one decided here, or read back after a restart)."""
        track = self._tracks.get(deployment)
        if track is not None and at_s > track.changed_at:
            track.changed_at = at_s
            track.out_since = track.in_since = None

    def decide(
        self,
        deployment: str,
        now_s: float,
        current: int | None,
        demand: Demand,
        ceiling: int | None = None,
        *,
        settled: bool = True,
    ) -> Decision | None:
        """``ceiling``: the most replicas the deployment's owner would run (None: unsaid);
        it caps scale-out only: the owner enforces it itself, and a lower one (true or
        forged) never takes replicas away. ``settled``: every replica of the current
        count runs (no scale-out while one is still starting, or it would count twice)."""
        policy = self.policies[deployment]
        if current is None:
            return None
        track = self._tracks[deployment]
        since_change = now_s - track.changed_at
        if current < policy.min_replicas and since_change >= policy.out_cooldown_s:
            detail = f"bounds [{policy.min_replicas}, {policy.max_replicas}]"
            decision = Decision(deployment, current, policy.min_replicas, "below_min", detail)
            return self._change(decision, now_s)
        if current > policy.max_replicas and since_change >= policy.in_cooldown_s:
            detail = f"bounds [{policy.min_replicas}, {policy.max_replicas}]"
            decision = Decision(deployment, current, policy.max_replicas, "above_max", detail)
            return self._change(decision, now_s)
        highest = policy.max_replicas if ceiling is None else min(policy.max_replicas, ceiling)
        out = _out_reason(policy, current, demand)
        track.out_since = _since(track.out_since, now_s) if out else None
        idle = out is None and _idle(policy, current, demand)
        track.in_since = _since(track.in_since, now_s) if idle else None
        if (
            out is not None
            and settled
            and current < highest
            and now_s - _since(track.out_since, now_s) >= policy.out_for_s
            and since_change >= policy.out_cooldown_s
        ):
            reason, detail = out
            target = current + 1
            if reason == "queue" and demand.waiting and policy.out_waiting_per_replica:
                target = max(target, math.ceil(demand.waiting / policy.out_waiting_per_replica))
            # at most twice as many at once: a queue that grew for another reason (a stuck
            # router, a long answer holding the commits back) cannot jump to the maximum
            target = min(target, 2 * current, highest)
            return self._change(Decision(deployment, current, target, reason, detail), now_s)
        if (
            idle
            and current > policy.min_replicas
            and now_s - _since(track.in_since, now_s) >= policy.in_for_s
            and since_change >= policy.in_cooldown_s
        ):
            detail = (
                f"{demand.concurrency / current:.2f} answers in progress per replica "
                f"< {policy.in_concurrency_per_replica:g}"
            )
            return self._change(Decision(deployment, current, current - 1, "idle", detail), now_s)
        return None

    def _change(self, decision: Decision, now_s: float) -> Decision:
        self.changed(decision.deployment, now_s)
        return decision


def _since(since: float | None, now_s: float) -> float:
    return now_s if since is None else since


def _out_reason(policy: ScalingPolicy, current: int, demand: Demand) -> tuple[Reason, str] | None:
    limit = policy.out_waiting_per_replica
    if limit is not None and demand.waiting is not None and demand.waiting > limit * current:
        return "queue", f"{demand.waiting} requests waiting > {limit:g} per replica x {current}"
    enough = demand.p99_s is not None and demand.answers >= policy.min_requests
    if enough and demand.p99_s is not None and demand.p99_s > policy.out_p99_s:
        return "p99", f"P99 {demand.p99_s * 1000:.0f} ms > {policy.out_p99_s * 1000:.0f} ms"
    return None


def _idle(policy: ScalingPolicy, current: int, demand: Demand) -> bool:
    if demand.waiting is None and policy.out_waiting_per_replica is not None:
        return False  # the queue is unknown (the broker did not answer): not idle on a guess
    now = demand.waiting or 0
    if max(now, demand.concurrency) / current >= policy.in_concurrency_per_replica:
        return False
    enough = demand.p99_s is not None and demand.answers >= policy.min_requests
    return not (enough and demand.p99_s is not None and demand.p99_s >= policy.in_p99_s)
