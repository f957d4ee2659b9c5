"""The attribute rules, on both evaluators: token limits and priorities per role, and the
hours and networks a role or a tenant may be restricted to."""

from __future__ import annotations

import copy
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from shared.policy import PolicyEvaluator
from tests.policy import expected as table
from tests.policy.conftest import ask, repo_data

SMOL = "smollm2-135m-instruct"
Make = Callable[[dict[str, Any]], PolicyEvaluator]


def at_hour(hour: int) -> datetime:
    return datetime(2026, 3, 2, hour, 30, tzinfo=UTC)


def with_rules(section: str, name: str, **rules: Any) -> dict[str, Any]:
    data = copy.deepcopy(repo_data())
    data["meshllm"][section][name] = {**data["meshllm"][section].get(name, {}), **rules}
    return data


# ----------------------------------------------------------------------------- tokens


@pytest.mark.parametrize("role", sorted(table.TOKEN_LIMITS))
def test_each_role_has_its_token_limit(evaluator: PolicyEvaluator, role: str) -> None:
    limit = table.TOKEN_LIMITS[role]
    priority = "low" if role == "service" else None
    at_limit = ask(evaluator, role, "chat", "model", name=SMOL, max_tokens=limit, priority=priority)
    assert (at_limit.allow, at_limit.max_tokens) == (True, limit)
    over = ask(evaluator, role, "complete", "model", name=SMOL, max_tokens=limit + 1)
    assert not over.allow
    assert f"max_tokens {limit + 1} exceeds the limit {limit} of role {role}" in over.reasons
    unasked = ask(evaluator, role, "chat", "model", name=SMOL)
    assert unasked.max_tokens == limit


def test_tokens_are_no_matter_for_actions_that_generate_nothing(
    evaluator: PolicyEvaluator,
) -> None:
    embed = ask(evaluator, "analyst", "embed", "model", name=SMOL, max_tokens=10**6)
    assert (embed.allow, embed.max_tokens) == (True, None)


def test_the_highest_limit_of_the_granting_roles_applies(evaluator: PolicyEvaluator) -> None:
    both = ask(evaluator, ("analyst", "developer"), "chat", "model", name=SMOL)
    assert both.max_tokens == 2048
    assert both.granted_by == ("analyst", "developer")
    # analyst does not grant this model, so its limit does not count either way
    other = ask(evaluator, ("analyst", "service"), "chat", "model", name="other", max_tokens=2048)
    assert (other.allow, other.granted_by, other.priority) == (True, ("service",), "low")


def test_a_role_without_a_token_limit_may_not_generate(make: Make) -> None:
    data = copy.deepcopy(repo_data())
    del data["meshllm"]["roles"]["analyst"]["max_tokens"]
    evaluator = make(data)
    denied = ask(evaluator, "analyst", "chat", "model", name=SMOL)
    assert denied.reasons == ("no token limit is set for role analyst",)
    assert ask(evaluator, "analyst", "embed", "model", name=SMOL).allow


# --------------------------------------------------------------------------- priority


@pytest.mark.parametrize("role", sorted(table.PRIORITIES))
def test_each_role_has_its_priorities(evaluator: PolicyEvaluator, role: str) -> None:
    allowed = table.PRIORITIES[role]
    for level in ("high", "normal", "low"):
        decision = ask(evaluator, role, "chat", "model", name=SMOL, priority=level)
        assert decision.allow == (level in allowed), (role, level)
        assert decision.priority == level
        if level not in allowed:
            assert decision.reasons == (
                f"priority {level} is not allowed for role {role} (allowed: {', '.join(allowed)})",
            )


def test_an_unknown_priority_is_denied(evaluator: PolicyEvaluator) -> None:
    decision = ask(evaluator, "admin", "chat", "model", name=SMOL, priority="urgent")
    assert not decision.allow
    assert decision.priority == "normal"
    assert decision.reasons == (
        "priority urgent is not allowed for role admin (allowed: high, normal, low)",
    )


def test_priority_is_no_matter_outside_models(evaluator: PolicyEvaluator) -> None:
    decision = ask(evaluator, "service", "submit", "feedback", priority="high")
    assert (decision.allow, decision.priority) == (True, "normal")


# ------------------------------------------------------------------------------ hours


@pytest.fixture
def make(evaluator_with: Make) -> Make:
    return evaluator_with


def test_a_role_limited_to_hours(make: Make) -> None:
    evaluator = make(with_rules("roles", "analyst", hours_utc=[[8, 18]]))
    for hour, allowed in [(7, False), (8, True), (17, True), (18, False), (23, False)]:
        decision = ask(evaluator, "analyst", "read", "kb_collection", at=at_hour(hour))
        assert decision.allow == allowed, hour
        if not allowed:
            assert decision.reasons == (
                f"role analyst is allowed only at hours 8-18 UTC (now {hour})",
            )
    # another role without hours still grants
    assert ask(
        evaluator, ("analyst", "developer"), "read", "kb_collection", at=at_hour(23)
    ).granted_by == ("developer",)


def test_hours_may_wrap_midnight_and_be_several(make: Make) -> None:
    evaluator = make(with_rules("roles", "service", hours_utc=[[22, 6], [12, 13]]))
    for hour, allowed in [(21, False), (22, True), (3, True), (6, False), (12, True)]:
        decision = ask(evaluator, "service", "embed", "model", name=SMOL, at=at_hour(hour))
        assert decision.allow == allowed, hour


def test_without_a_time_the_evaluator_clock_counts(make: Make) -> None:
    always = make(with_rules("roles", "analyst", hours_utc=[[0, 24]]))
    assert ask(always, "analyst", "read", "kb_collection").allow
    never = make(with_rules("roles", "analyst", hours_utc=[]))
    assert not ask(never, "analyst", "read", "kb_collection").allow


def test_a_tenant_limited_to_hours(make: Make) -> None:
    evaluator = make(with_rules("tenants", "acme", hours_utc=[[9, 17]]))
    assert ask(evaluator, "admin", "manage_keys", "admin", at=at_hour(10)).allow
    late = ask(evaluator, "admin", "manage_keys", "admin", at=at_hour(20))
    assert late.reasons == ("tenant acme allows access only at hours 9-17 UTC (now 20)",)
    # other tenants are not limited
    assert ask(evaluator, "admin", "manage_keys", "admin", tenant="beta", at=at_hour(20)).allow


# --------------------------------------------------------------------------- networks


def test_a_role_limited_to_networks(make: Make) -> None:
    evaluator = make(with_rules("roles", "service", networks=["10.0.0.0/8", "2001:db8::/32"]))
    for source, allowed in [
        ("10.1.2.3", True),
        ("::ffff:10.1.2.3", True),
        ("2001:db8::7", True),
        ("192.168.1.1", False),
        (None, False),
        ("not an address", False),
    ]:
        decision = ask(evaluator, "service", "submit", "feedback", source_ip=source)
        assert decision.allow == allowed, source
    outside = ask(evaluator, "service", "submit", "feedback", source_ip="192.168.1.1")
    assert outside.reasons == (
        "role service is allowed only from networks 10.0.0.0/8, 2001:db8::/32 (source 192.168.1.1)",
    )
    unknown = ask(evaluator, "service", "submit", "feedback", source_ip="not an address")
    assert unknown.reasons == (
        "role service is allowed only from networks 10.0.0.0/8, 2001:db8::/32 (source unknown)",
    )


def test_a_tenant_limited_to_networks(make: Make) -> None:
    evaluator = make(with_rules("tenants", "acme", networks=["192.168.0.0/16"]))
    assert ask(evaluator, "auditor", "read", "audit", source_ip="192.168.4.2").allow
    denied = ask(evaluator, "auditor", "read", "audit", source_ip="10.0.0.1")
    assert denied.reasons == (
        "tenant acme allows access only from networks 192.168.0.0/16 (source 10.0.0.1)",
    )
    # the rule follows the subject's tenant, also for platform-admin acting elsewhere
    assert not ask(
        evaluator, "platform-admin", "read", "audit", resource_tenant="beta", source_ip="10.0.0.1"
    ).allow


def test_hours_and_networks_together(make: Make) -> None:
    data = with_rules("roles", "developer", hours_utc=[[8, 18]], networks=["10.0.0.0/8"])
    evaluator = make(data)
    good = {"source_ip": "10.0.0.1", "at": at_hour(9)}
    assert ask(evaluator, "developer", "create", "training_job", **good).allow
    both_wrong = ask(
        evaluator, "developer", "create", "training_job", source_ip="8.8.8.8", at=at_hour(20)
    )
    assert set(both_wrong.reasons) == {
        "role developer is allowed only at hours 8-18 UTC (now 20)",
        "role developer is allowed only from networks 10.0.0.0/8 (source 8.8.8.8)",
    }
