"""A release's course through its stages, as a pure state machine (no I/O).

A release takes a candidate version of a model from ``tests`` to production or back out::

    tests -> quantize -> offline_eval -> prepare -> ab (steps) -> promoted
                \\___________\\_______________\\__________\\______-> rolled_back
    any stage that has not ended -> aborted (an operator's abort)

- The offline stages (``tests``, ``quantize``, ``offline_eval``) pass or fail on their own
  checks; a failure rolls the release back with the stage and the reason.
- ``prepare``: the replicas load the candidate beside production and nobody is sent to
  it (a CANARY at 0%, pins excepted). The controller moves on once the candidate answers
  by name, or rolls back when it has not within ``prepare_timeout_s``.
- ``ab``: the traffic share goes through ``steps`` (5, 25, 50 % by default); at each step
  the verdict of :func:`services.release.decision.decide` advances, promotes, rolls back
  or holds. A release that holds longer than ``max_ab_s`` rolls back: it never stays
  split for ever, and never promotes without a verdict.

:func:`deployment` gives the decision to publish on ``model.deployments`` for a release's
state; the controller publishes it again every ``renew_s`` while the release runs (the
routers' lease), so a release whose controller is gone ends by itself.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from services.release.decision import Verdict

Stage = Literal[
    "tests", "quantize", "offline_eval", "prepare", "ab", "promoted", "rolled_back", "aborted"
]
OFFLINE: tuple[Stage, ...] = ("tests", "quantize", "offline_eval")
ENDED: frozenset[Stage] = frozenset({"promoted", "rolled_back", "aborted"})
Action = Literal["canary", "promote", "rollback"]


class ReleaseError(ValueError):
    """A step that does not apply to the release in its current state."""


@dataclass(frozen=True)
class ReleasePolicy:
    steps: tuple[int, ...] = (5, 25, 50)
    min_step_s: float = 300.0
    max_ab_s: float = 24 * 3600.0
    prepare_timeout_s: float = 600.0
    lease_s: int = 60
    renew_s: float = 20.0
    candidate_callers: tuple[str, ...] = ()
    production_callers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.steps or any(not 0 < s <= 100 for s in self.steps):
            raise ValueError(f"steps: {self.steps} must be percents within 1..100")
        if list(self.steps) != sorted(set(self.steps)):
            raise ValueError(f"steps: {self.steps} must increase")
        if not 0 < self.renew_s < self.lease_s:
            raise ValueError(f"renew_s: {self.renew_s} must be below lease_s {self.lease_s}")


@dataclass(frozen=True)
class Event:
    """One entry of a release's history (what ``model.releases`` and audit carry)."""

    at: float
    stage: Stage
    outcome: str  # "started", "passed", "failed", "step", "hold", "promoted", ...
    detail: str = ""


@dataclass(frozen=True)
class Release:
    release_id: str
    model: str
    candidate: str
    production: str
    policy: ReleasePolicy
    stage: Stage
    started_at: float
    stage_started_at: float
    step: int = 0  # index into policy.steps while in ab
    ab_started_at: float = 0.0
    reason: str = ""
    history: tuple[Event, ...] = field(default_factory=tuple)

    @property
    def ended(self) -> bool:
        return self.stage in ENDED

    @property
    def percent(self) -> int:
        """The candidate's traffic share now."""
        return self.policy.steps[self.step] if self.stage == "ab" else 0


@dataclass(frozen=True)
class Deployment:
    """The decision to publish on ``model.deployments`` (None from :func:`deployment`: none)."""

    action: Action
    percent: int = 0


def start(
    release_id: str, model: str, candidate: str, *, production: str, policy: ReleasePolicy,
    now: float,
) -> Release:  # fmt: skip
    if candidate == production:
        raise ReleaseError(f"candidate {candidate!r} is the production version already")
    return Release(
        release_id, model, candidate, production, policy, "tests", now, now,
        history=(Event(now, "tests", "started"),),
    )  # fmt: skip


def _to(release: Release, stage: Stage, now: float, event: Event, **changes: object) -> Release:
    return dataclasses.replace(
        release,
        stage=stage,
        stage_started_at=now if stage != release.stage else release.stage_started_at,
        history=(*release.history, event),
        **changes,  # type: ignore[arg-type]
    )


def _running(release: Release, *stages: Stage) -> None:
    if release.stage not in stages:
        raise ReleaseError(f"release {release.release_id} is at {release.stage}, not {stages}")


def offline_result(release: Release, passed: bool, detail: str, now: float) -> Release:
    """The current offline stage passed (on to the next, or ``prepare``) or failed."""
    _running(release, *OFFLINE)
    stage = release.stage
    if not passed:
        reason = f"{stage}: {detail}"
        return _to(release, "rolled_back", now, Event(now, stage, "failed", detail), reason=reason)
    following: Stage = (*OFFLINE, "prepare")[OFFLINE.index(stage) + 1]
    return _to(release, following, now, Event(now, stage, "passed", detail))


def prepared(release: Release, serving: bool, now: float) -> Release:
    """Whether the replicas answer the candidate by name yet: A/B at the first step, or a
    rollback once ``prepare_timeout_s`` has passed without it."""
    _running(release, "prepare")
    if serving:
        percent = release.policy.steps[0]
        event = Event(now, "prepare", "passed", f"step {percent}%")
        return _to(release, "ab", now, event, step=0, ab_started_at=now)
    if now - release.stage_started_at >= release.policy.prepare_timeout_s:
        detail = f"the candidate was not served within {release.policy.prepare_timeout_s:.0f} s"
        return _to(
            release, "rolled_back", now, Event(now, "prepare", "failed", detail),
            reason=f"prepare: {detail}",
        )  # fmt: skip
    return release


def on_verdict(release: Release, verdict: Verdict, now: float) -> Release:
    """Apply the A/B stage's verdict at the current step."""
    _running(release, "ab")
    if verdict.action == "rollback":
        return _to(
            release, "rolled_back", now, Event(now, "ab", "failed", verdict.reason),
            reason=f"ab at {release.percent}%: {verdict.reason}",
        )  # fmt: skip
    if verdict.action == "promote":
        if release.step != len(release.policy.steps) - 1:
            raise ReleaseError("a promote verdict before the last step")
        return _to(release, "promoted", now, Event(now, "ab", "promoted", verdict.reason))
    if verdict.action == "advance" and release.step < len(release.policy.steps) - 1:
        step = release.step + 1
        event = Event(now, "ab", "step", f"{release.policy.steps[step]}%: {verdict.reason}")
        return dataclasses.replace(
            release, step=step, stage_started_at=now, history=(*release.history, event)
        )
    if now - release.ab_started_at >= release.policy.max_ab_s:
        detail = f"no verdict within {release.policy.max_ab_s:.0f} s ({verdict.reason})"
        return _to(
            release, "rolled_back", now, Event(now, "ab", "failed", detail),
            reason=f"ab: {detail}",
        )  # fmt: skip
    return release  # hold


def abort(release: Release, reason: str, now: float) -> Release:
    """An operator's abort: traffic back to production, the candidate not promoted."""
    if release.ended:
        raise ReleaseError(f"release {release.release_id} has ended ({release.stage})")
    return _to(release, "aborted", now, Event(now, release.stage, "aborted", reason),
               reason=f"aborted: {reason}")  # fmt: skip


def deployment(release: Release) -> Deployment | None:
    """What ``model.deployments`` must say for ``release`` now (renewed while it runs)."""
    if release.stage in ("prepare", "ab"):
        return Deployment("canary", release.percent)
    if release.stage == "promoted":
        return Deployment("promote")
    if release.stage in ("rolled_back", "aborted") and any(
        e.stage in ("prepare", "ab") for e in release.history
    ):
        return Deployment("rollback")  # the replicas loaded it; the routers may split
    return None
