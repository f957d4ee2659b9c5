"""A release's course: offline stages, prepare, the A/B steps, promote, roll back, abort;
what it tells model.deployments at each point; it never stays split or promotes unjudged."""

from __future__ import annotations

import pytest

from services.release.decision import GuardPolicy, QualityPolicy, Ratings, Slis, Verdict, decide
from services.release.plan import (
    Deployment,
    Release,
    ReleaseError,
    ReleasePolicy,
    abort,
    deployment,
    offline_result,
    on_verdict,
    prepared,
    start,
)

T0 = 1_800_000_000.0
HEALTHY = Slis(requests=500, errors=0, p99_s=0.40)
SLOW = Slis(requests=500, errors=0, p99_s=0.90)
GOOD = Ratings(400, 360)
BASE = Ratings(400, 350)
POLICY = ReleasePolicy(min_step_s=60, max_ab_s=3600)


def verdict(release: Release, now: float, candidate: tuple[Ratings, Slis]) -> Verdict:
    return decide(
        candidate=candidate, production=(BASE, HEALTHY),
        last_step=release.step == len(release.policy.steps) - 1,
        step_age_s=now - release.stage_started_at, min_step_s=release.policy.min_step_s,
        quality_policy=QualityPolicy(), guard_policy=GuardPolicy(),
    )  # fmt: skip


def at_ab(policy: ReleasePolicy = POLICY) -> Release:
    release = start("r1", "smollm2", "v2", production="v1", policy=policy, now=T0)
    for stage in ("tests", "quantize", "offline_eval"):
        assert release.stage == stage
        assert deployment(release) is None  # nothing loaded, nothing split
        release = offline_result(release, True, f"{stage} ok", T0 + 10)
    assert release.stage == "prepare"
    assert deployment(release) == Deployment("canary", 0)  # load it, send no one
    release = prepared(release, False, T0 + 20)
    assert release.stage == "prepare"
    return prepared(release, True, T0 + 30)


def test_a_good_candidate_goes_through_every_step_and_is_promoted() -> None:
    release = at_ab()
    now = T0 + 30
    shares = [release.percent]
    assert deployment(release) == Deployment("canary", 5)
    # within a step's minimum time nothing moves, whatever the data
    assert on_verdict(release, verdict(release, now + 10, (GOOD, HEALTHY)), now + 10) == release
    while not release.ended:
        now += 61
        release = on_verdict(release, verdict(release, now, (GOOD, HEALTHY)), now)
        shares.append(release.percent)
    assert release.stage == "promoted"
    assert shares == [5, 25, 50, 0]
    assert deployment(release) == Deployment("promote")
    outcomes = [(e.stage, e.outcome) for e in release.history]
    assert outcomes == [
        ("tests", "started"), ("tests", "passed"), ("quantize", "passed"),
        ("offline_eval", "passed"), ("prepare", "passed"), ("ab", "step"), ("ab", "step"),
        ("ab", "promoted"),
    ]  # fmt: skip


def test_an_offline_failure_rolls_back_with_its_stage_and_reason_and_nothing_to_undo() -> None:
    release = start("r1", "smollm2", "v2", production="v1", policy=POLICY, now=T0)
    release = offline_result(release, True, "golden prompts pass", T0 + 1)
    release = offline_result(release, False, "top-1 agreement 0.62 < 0.90", T0 + 2)
    assert release.stage == "rolled_back"
    assert release.reason == "quantize: top-1 agreement 0.62 < 0.90"
    assert deployment(release) is None


def test_a_candidate_never_served_is_rolled_back_after_the_prepare_timeout() -> None:
    release = start("r1", "smollm2", "v2", production="v1", policy=POLICY, now=T0)
    for _ in range(3):
        release = offline_result(release, True, "ok", T0)
    release = prepared(release, False, T0 + POLICY.prepare_timeout_s - 1)
    assert release.stage == "prepare"
    release = prepared(release, False, T0 + POLICY.prepare_timeout_s)
    assert release.stage == "rolled_back"
    assert release.reason.startswith("prepare: the candidate was not served")
    assert deployment(release) == Deployment("rollback")  # the replicas may have loaded it


def test_a_guard_breach_rolls_back_at_the_step_it_happens() -> None:
    release = at_ab()
    now = T0 + 100
    release = on_verdict(release, verdict(release, now, (GOOD, HEALTHY)), now)
    assert release.percent == 25
    now += 61
    release = on_verdict(release, verdict(release, now, (GOOD, SLOW)), now)
    assert release.stage == "rolled_back"
    assert release.reason.startswith("ab at 25%: guard:")
    assert deployment(release) == Deployment("rollback")


def test_without_ratings_the_last_step_holds_then_rolls_back_never_promotes() -> None:
    release = at_ab()
    now = T0 + 30
    for _ in range(2):
        now += 61
        release = on_verdict(release, verdict(release, now, (Ratings(0, 0), HEALTHY)), now)
    assert release.percent == 50
    while release.stage == "ab":  # it holds, then gives up at max_ab_s
        now += 61
        release = on_verdict(release, verdict(release, now, (Ratings(0, 0), HEALTHY)), now)
    assert now - (T0 + 30) >= POLICY.max_ab_s
    assert release.stage == "rolled_back"
    assert "no verdict within 3600 s" in release.reason


def test_an_abort_undoes_what_was_done_and_an_ended_release_takes_no_more_steps() -> None:
    release = abort(at_ab(), "operator asked", T0 + 40)
    assert (release.stage, release.reason) == ("aborted", "aborted: operator asked")
    assert deployment(release) == Deployment("rollback")
    with pytest.raises(ReleaseError, match="has ended"):
        abort(release, "again", T0 + 41)
    with pytest.raises(ReleaseError, match="not"):
        on_verdict(release, verdict(release, T0 + 50, (GOOD, HEALTHY)), T0 + 50)
    with pytest.raises(ReleaseError, match="not"):
        offline_result(release, True, "late", T0 + 50)
    early = abort(start("r2", "smollm2", "v2", production="v1", policy=POLICY, now=T0), "no", T0)
    assert deployment(early) is None


def test_a_release_of_the_production_version_or_with_a_bad_policy_is_refused() -> None:
    with pytest.raises(ReleaseError, match="production version already"):
        start("r1", "smollm2", "v1", production="v1", policy=POLICY, now=T0)
    for bad, field in [
        ({"steps": (25, 5)}, "steps"),
        ({"steps": (5, 150)}, "steps"),
        ({"steps": ()}, "steps"),
        ({"renew_s": 60.0, "lease_s": 60}, "renew_s"),
    ]:
        with pytest.raises(ValueError, match=field):
            ReleasePolicy(**bad)  # type: ignore[arg-type]
