"""A release's traffic split: stable buckets per caller, pins, leases, refused decisions."""

from __future__ import annotations

import math
from typing import Any

import pytest

from shared.events.v1 import events_pb2 as ev
from shared.release_split import (
    CANDIDATE,
    PINNED_CANDIDATE,
    PINNED_PRODUCTION,
    PRODUCTION,
    Choice,
    InvalidDecision,
    Splits,
    bucket,
)

NOW = 1_800_000_000.0


def canary(
    percent: int = 25, *, at: float = NOW, lease_s: int = 60, **fields: Any
) -> ev.ModelDeployment:
    event = ev.ModelDeployment(
        model=fields.pop("model", "smollm2"),
        version=fields.pop("version", "v2"),
        action=ev.DEPLOYMENT_ACTION_CANARY,
        traffic_percent=percent,
        release_id=fields.pop("release_id", "rel-1"),
        lease_s=lease_s,
        **fields,
    )
    event.envelope.occurred_at.FromNanoseconds(int(at * 1e9))
    return event


def ended(action: int, version: str = "v2") -> ev.ModelDeployment:
    return ev.ModelDeployment(model="smollm2", version=version, action=action)  # type: ignore[arg-type]


def asking(
    key: str = "", *, tenant: str = "acme", model: str = "smollm2", version: str = ""
) -> ev.InferenceRequest:
    request = ev.InferenceRequest(
        request_id=f"r-{key}", model=model, model_version=version, api_key_id=key
    )
    request.envelope.tenant = tenant
    return request


def chosen(splits: Splits, request: ev.InferenceRequest, now: float = NOW) -> Choice:
    choice = splits.choose(request, now)
    assert choice is not None, "no live split concerns the request"
    return choice


def split_at(percent: int, **fields: Any) -> Splits:
    splits = Splits(max_lease_s=300)
    assert splits.apply(canary(percent, **fields), NOW) == "split"
    return splits


def test_the_share_on_the_candidate_is_the_asked_percent_within_sampling_error() -> None:
    callers = 20_000
    for percent in (5, 25, 50):
        splits = split_at(percent)
        on_candidate = sum(chosen(splits, asking(f"k{i}")).version == "v2" for i in range(callers))
        p = percent / 100
        assert abs(on_candidate / callers - p) < 4 * math.sqrt(p * (1 - p) / callers)


def test_a_caller_keeps_its_version_and_stays_on_the_candidate_as_the_share_grows() -> None:
    keys = [f"k{i}" for i in range(2_000)]
    by_step = []
    for percent in (5, 25, 50, 100):
        splits = split_at(percent)
        by_step.append({k for k in keys if chosen(splits, asking(k)).arm == CANDIDATE})
        # the same caller asking again gets the same answer
        assert all(chosen(splits, asking(k)).arm == CANDIDATE for k in by_step[-1])
    assert by_step[0] < by_step[1] < by_step[2] < by_step[3] == set(keys)


def test_a_new_release_reshuffles_who_goes_first() -> None:
    keys = [f"k{i}" for i in range(2_000)]
    first = {k for k in keys if bucket("smollm2", "rel-1", f"key:{k}") < 10}
    second = {k for k in keys if bucket("smollm2", "rel-2", f"key:{k}") < 10}
    assert first
    assert second
    assert len(first & second) < len(first) / 2


def test_pins_win_over_the_hash_and_production_wins_over_candidate() -> None:
    splits = split_at(
        0,
        candidate_callers=["tenant:testers", "key:k-both"],
        production_callers=["tenant:bank", "key:k-both"],
    )
    assert chosen(splits, asking("k1")).arm == PRODUCTION
    tester = splits.choose(asking("k1", tenant="testers"), NOW)
    assert tester is not None
    assert (tester.version, tester.arm) == ("v2", PINNED_CANDIDATE)
    split = split_at(100, production_callers=["tenant:bank"])
    banker = split.choose(asking("k1", tenant="bank"), NOW)
    assert banker is not None
    assert (banker.version, banker.arm) == ("", PINNED_PRODUCTION)
    both = splits.choose(asking("k-both", tenant="testers"), NOW)
    assert both is not None
    assert both.arm == PINNED_PRODUCTION


def test_a_request_naming_a_version_or_another_model_is_left_alone() -> None:
    splits = split_at(100)
    assert splits.choose(asking("k1", version="v1"), NOW) is None
    assert splits.choose(asking("k1", model="other"), NOW) is None
    assert chosen(splits, asking("k1")).version == "v2"


def test_a_split_nobody_renews_ends_at_its_lease_and_a_renewal_extends_it() -> None:
    splits = split_at(100, lease_s=60)
    assert splits.choose(asking("k1"), NOW + 59) is not None
    assert splits.choose(asking("k1"), NOW + 60) is None  # all to production
    assert splits.apply(canary(100, at=NOW + 50, lease_s=60), NOW + 50) == "split"
    assert chosen(splits, asking("k1"), NOW + 100).version == "v2"
    # the earlier decision, redelivered after the renewal, does not shorten it
    assert splits.apply(canary(100, at=NOW, lease_s=60), NOW + 51) == "stale"
    assert splits.choose(asking("k1"), NOW + 100) is not None


@pytest.mark.parametrize("action", [ev.DEPLOYMENT_ACTION_PROMOTE, ev.DEPLOYMENT_ACTION_ROLLBACK])
def test_promote_and_rollback_end_the_split(action: int) -> None:
    splits = split_at(50)
    assert splits.apply(ended(action), NOW) == "ended"
    assert splits.choose(asking("k1"), NOW) is None
    assert splits.apply(ended(action), NOW) == "no split"


@pytest.mark.parametrize(
    "action",
    [ev.DEPLOYMENT_ACTION_PROMOTE, ev.DEPLOYMENT_ACTION_ROLLBACK, ev.DEPLOYMENT_ACTION_RETIRE],
)
def test_a_decision_about_another_version_leaves_the_split(action: int) -> None:
    splits = split_at(50)
    assert splits.apply(ended(action, version="v0"), NOW) == "no split"
    assert splits.live("smollm2", NOW) is not None
    assert splits.apply(ended(action, version="v2"), NOW) == "ended"


def test_a_later_decision_with_a_shorter_lease_takes_over() -> None:
    """Ramping down in a hurry: 0% on a short lease after 5% on a long one."""
    splits = split_at(5, lease_s=300)
    assert splits.apply(canary(0, at=NOW + 10, lease_s=60), NOW + 10) == "split"
    assert chosen(splits, asking("k1"), NOW + 11).arm == PRODUCTION
    assert splits.live("smollm2", NOW + 71) is None


def test_a_clock_ahead_cannot_lengthen_a_lease_and_a_future_decision_is_refused() -> None:
    splits = Splits(max_lease_s=300)
    assert splits.apply(canary(50, at=NOW + 30, lease_s=60), NOW) == "split"
    assert splits.live("smollm2", NOW + 61) is None  # counted from now, not from NOW + 30
    with pytest.raises(InvalidDecision, match="in the future"):
        splits.apply(canary(50, at=NOW + 3600, lease_s=60), NOW)


@pytest.mark.parametrize(
    ("event", "field"),
    [
        (canary(101), "traffic_percent"),
        (canary(lease_s=0), "lease_s"),  # a split that never ends by itself
        (canary(lease_s=301), "lease_s"),
        (canary(version=""), "version"),
        (canary(version="v2:evil"), "version"),
        (canary(model="x" * 200), "model"),
        (canary(release_id=""), "release_id"),
        (canary(candidate_callers=["everyone"]), "candidate_callers"),
        (canary(production_callers=["tenant:"]), "production_callers"),
        (ev.ModelDeployment(model="smollm2", action=99), "action"),  # type: ignore[arg-type]
    ],
)
def test_a_decision_that_cannot_be_applied_is_refused_and_changes_nothing(
    event: ev.ModelDeployment, field: str
) -> None:
    splits = split_at(10)
    with pytest.raises(InvalidDecision, match=field):
        splits.apply(event, NOW)
    live = splits.live("smollm2", NOW)
    assert live is not None
    assert live.percent == 10


def test_a_decision_without_a_time_is_refused() -> None:
    event = canary()
    event.envelope.ClearField("occurred_at")
    with pytest.raises(InvalidDecision, match="occurred_at"):
        Splits(max_lease_s=300).apply(event, NOW)


def test_the_bucket_is_uniform_enough_for_small_shares() -> None:
    below = sum(bucket("m", "r", f"key:{i}") < 1 for i in range(50_000))
    assert abs(below / 50_000 - 0.01) < 4 * math.sqrt(0.01 * 0.99 / 50_000)


def test_a_late_renewal_of_an_ended_release_does_not_reopen_its_split() -> None:
    splits = split_at(50)
    rollback = ended(ev.DEPLOYMENT_ACTION_ROLLBACK)
    rollback.envelope.occurred_at.FromNanoseconds(int((NOW + 10) * 1e9))
    assert splits.apply(rollback, NOW + 10) == "ended"
    assert splits.apply(canary(50, at=NOW + 5), NOW + 11) == "stale"  # sent before the end
    assert splits.live("smollm2", NOW + 11) is None


def test_a_decision_from_a_clock_ahead_does_not_make_the_next_ones_stale() -> None:
    splits = Splits(max_lease_s=300)
    assert splits.apply(canary(50, at=NOW + 30), NOW) == "split"  # 30 s ahead of ours
    assert splits.apply(canary(0, at=NOW + 5), NOW + 5) == "split"  # the ramp-down holds
    assert chosen(splits, asking("k1"), NOW + 6).arm == PRODUCTION
