"""Tenant isolation, on both evaluators: a subject acts only on its own tenant's resources;
only platform-admin crosses tenants and acts on platform-wide ones."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from shared.policy import (
    PLATFORM_TENANT,
    AccessRequest,
    PolicyEvaluator,
    Resource,
    ResourceKind,
    Subject,
)
from tests.policy.conftest import ask, repo_data

ACTIONS: list[tuple[str, ResourceKind]] = [
    ("chat", "model"),
    ("write", "kb_collection"),
    ("read", "audit"),
    ("verify", "audit"),
    ("read", "feedback"),
    ("promote", "training_job"),
    ("manage_keys", "admin"),
    ("deploy", "admin"),
]


@pytest.mark.parametrize(("action", "kind"), ACTIONS)
def test_an_admin_acts_only_in_its_tenant(
    evaluator: PolicyEvaluator, action: str, kind: ResourceKind
) -> None:
    assert ask(evaluator, "admin", action, kind, name="smollm2-135m-instruct").allow
    other = ask(evaluator, "admin", action, kind, resource_tenant="beta", name="smollm2")
    assert not other.allow
    assert other.reasons == ("tenant acme may not act on resources of tenant beta (role admin)",)


@pytest.mark.parametrize(("action", "kind"), ACTIONS)
def test_a_platform_admin_acts_in_every_tenant(
    evaluator: PolicyEvaluator, action: str, kind: ResourceKind
) -> None:
    for tenant in ("ops", "acme", "beta", PLATFORM_TENANT):
        decision = ask(
            evaluator, "platform-admin", action, kind, tenant="ops", resource_tenant=tenant
        )
        assert decision.allow, tenant
        assert decision.granted_by == ("platform-admin",)
    across = ask(evaluator, "platform-admin", action, kind, tenant="ops", resource_tenant="acme")
    assert across.reasons == ("granted by role platform-admin across tenants",)


def test_platform_wide_resources_are_platform_admin_only(evaluator: PolicyEvaluator) -> None:
    for action in ("manage_policies", "manage_tenants", "deploy"):
        denied = ask(evaluator, "admin", action, "admin", resource_tenant=PLATFORM_TENANT)
        assert denied.reasons == (
            "tenant acme may not act on platform-wide resources (role admin)",
        )
        assert ask(
            evaluator, "platform-admin", action, "admin", resource_tenant=PLATFORM_TENANT
        ).allow


def test_no_combination_of_tenant_roles_crosses_tenants(evaluator: PolicyEvaluator) -> None:
    roles = ("admin", "developer", "analyst", "auditor", "service", "user", "batch")
    for action, kind in ACTIONS:
        assert not ask(evaluator, roles, action, kind, resource_tenant="beta").allow


def test_the_audit_question(evaluator: PolicyEvaluator) -> None:
    """What the audit query API asks: may this principal read tenant T's audit records?"""

    def may_read_audit(tenant: str, roles: tuple[str, ...], of: str) -> bool:
        request = AccessRequest(Subject("key:1", tenant, roles), "read", Resource("audit", of))
        return evaluator.decide(request).allow

    assert may_read_audit("acme", ("auditor",), "acme")
    assert not may_read_audit("acme", ("auditor",), "beta")
    assert not may_read_audit("acme", ("developer",), "acme")
    assert may_read_audit("ops", ("platform-admin",), "beta")


def test_a_resource_of_no_tenant_is_denied_to_everyone(evaluator: PolicyEvaluator) -> None:
    for role in ("platform-admin", "admin"):
        decision = ask(evaluator, role, "read", "audit", resource_tenant="")
        assert decision.reasons == ("the resource names no tenant",)


def test_an_alias_of_platform_admin_stays_in_its_tenant(
    evaluator_with: Callable[[dict[str, Any]], PolicyEvaluator],
) -> None:
    data = copy.deepcopy(repo_data())
    data["meshllm"]["aliases"]["root"] = "platform-admin"
    evaluator = evaluator_with(data)
    assert ask(evaluator, "root", "read", "audit").allow
    denied = ask(evaluator, "root", "read", "audit", resource_tenant="beta")
    assert denied.reasons == ("tenant acme may not act on resources of tenant beta (role root)",)


def test_without_a_resource_tenant_nothing_is_allowed(embedded: PolicyEvaluator) -> None:
    from shared.policy.embedded import EmbeddedEvaluator

    assert isinstance(embedded, EmbeddedEvaluator)
    document = AccessRequest(
        Subject("key:1", "acme", ("platform-admin",)), "read", Resource("audit", "acme")
    ).to_input()
    del document["resource"]["tenant"]
    result = embedded._evaluate(document)
    assert result["allow"] is False
    assert result["reasons"] == ["the resource names no tenant"]
