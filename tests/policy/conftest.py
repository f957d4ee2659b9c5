"""Both evaluators on the repository's policy: embedded (regorus) and an OPA server (the
REST API test double of ``opa_double.py``), and helpers to ask them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest

from shared.policy import (
    AccessRequest,
    Decision,
    EmbeddedEvaluator,
    PolicyBundle,
    PolicyEvaluator,
    Resource,
    ResourceKind,
    Subject,
)
from shared.policy.opa import OpaServerEvaluator
from tests.conftest import ROOT
from tests.policy.opa_double import OpaDouble

POLICIES = ROOT / "policies"


def repo_data() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((POLICIES / "data.json").read_text())
    return data


def bundle(data: dict[str, Any] | None = None) -> PolicyBundle:
    """The repository's policy, with ``data`` instead of its data.json when given."""
    return PolicyBundle.load([POLICIES], repo_data() if data is None else data)


def ask(
    evaluator: PolicyEvaluator,
    roles: tuple[str, ...] | str,
    action: str,
    kind: ResourceKind,
    *,
    tenant: str = "acme",
    resource_tenant: str | None = None,
    name: str | None = None,
    version: str | None = None,
    priority: str | None = None,
    max_tokens: int | None = None,
    source_ip: str | None = None,
    at: datetime | None = None,
) -> Decision:
    """The decision on a subject of ``tenant`` with ``roles`` doing ``action`` on a resource
    of ``resource_tenant`` (default: the subject's)."""
    held = (roles,) if isinstance(roles, str) else roles
    return evaluator.decide(
        AccessRequest(
            subject=Subject(f"key:{'-'.join(held) or 'none'}", tenant, held),
            action=action,
            resource=Resource(
                kind, tenant if resource_tenant is None else resource_tenant, name, version
            ),
            priority=priority,
            max_tokens=max_tokens,
            source_ip=source_ip,
            at=at,
        )
    )


@pytest.fixture(scope="session")
def opa_server() -> Iterator[OpaDouble]:
    double = OpaDouble().start()
    yield double
    double.stop()


@pytest.fixture(scope="session")
def embedded() -> EmbeddedEvaluator:
    return EmbeddedEvaluator(bundle())


@pytest.fixture(scope="session")
def opa(opa_server: OpaDouble) -> Iterator[OpaServerEvaluator]:
    evaluator = OpaServerEvaluator(opa_server.url, bundle(), timeout_s=5.0)
    yield evaluator
    evaluator.close()


@pytest.fixture(params=["embedded", "opa"])
def evaluator(request: pytest.FixtureRequest) -> PolicyEvaluator:
    """Each evaluator in turn, on the repository's policy and data."""
    chosen: PolicyEvaluator = request.getfixturevalue(request.param)
    return chosen


@pytest.fixture(params=["embedded", "opa"])
def evaluator_with(request: pytest.FixtureRequest) -> Iterator[Any]:
    """Make an evaluator of each kind on the repository's policy with other data."""
    made: list[PolicyEvaluator] = []
    servers: list[OpaDouble] = []

    def make(data: dict[str, Any]) -> PolicyEvaluator:
        evaluator: PolicyEvaluator
        if request.param == "embedded":
            evaluator = EmbeddedEvaluator(bundle(data))
        else:
            server = OpaDouble().start()
            servers.append(server)
            evaluator = OpaServerEvaluator(server.url, bundle(data), timeout_s=5.0)
        made.append(evaluator)
        return evaluator

    yield make
    for evaluator in made:
        evaluator.close()
    for server in servers:
        server.stop()
