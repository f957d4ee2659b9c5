"""Every role x tenant x resource x action cell, on both evaluators and on rego-cpp, against
the table of ``expected.py`` (written from the roles' descriptions, not from the Rego).

Both evaluators of the product run regorus (the OPA path against a double that evaluates
with regorus); rego-cpp (regopy) is an independent Rego implementation, so the matrix shows
two engines agreeing, not one engine agreeing with itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from shared.policy import RESOURCE_KINDS, PolicyEvaluator, ResourceKind
from tests.policy import expected as table
from tests.policy.conftest import ask, bundle, repo_data
from tests.policy.rego_cpp import RegoCppEvaluator

SUBJECT_TENANT = "acme"
TENANTS = {"own": "acme", "other": "beta", "platform-wide": "*"}
ROLES = [*table.ROLE_ACTIONS, *table.ALIASES, "intern"]
# the resources acted on: (kind, name); models by a granted and an other name
RESOURCES: list[tuple[ResourceKind, str | None]] = [
    ("model", "smollm2-135m-instruct"),
    ("model", "llama-3.1-8b-instruct"),
    ("kb_collection", "handbook"),
    ("audit", None),
    ("feedback", None),
    ("dataset", "support-v1"),
    ("training_job", "job-1"),
    ("admin", None),
]
UNKNOWN_ACTION = "delete_everything"


@dataclass(frozen=True)
class Cell:
    role: str
    tenant: str
    kind: ResourceKind
    name: str | None
    action: str

    def __str__(self) -> str:
        where = f"{self.kind} {self.name}" if self.name else self.kind
        return f"{self.role} of {SUBJECT_TENANT}: {self.action} on {where} of {self.tenant}"


def cells(role: str, tenant: str) -> list[Cell]:
    return [
        Cell(role, tenant, kind, name, action)
        for kind, name in RESOURCES
        for action in sorted(table.KIND_ACTIONS[kind] | {UNKNOWN_ACTION})
    ]


def test_the_table_covers_the_policy() -> None:
    assert set(table.KIND_ACTIONS) == set(RESOURCE_KINDS)
    assert {kind for kind, _ in RESOURCES} == set(RESOURCE_KINDS)
    data = repo_data()["meshllm"]
    assert set(data["roles"]) == set(table.ROLE_ACTIONS)
    assert data["aliases"] == table.ALIASES


@pytest.fixture(scope="module")
def rego_cpp() -> RegoCppEvaluator:
    return RegoCppEvaluator(bundle())


@pytest.fixture(params=["embedded", "opa", "rego_cpp"])
def engine(request: pytest.FixtureRequest) -> PolicyEvaluator:
    """regorus in process, the OPA server path, and rego-cpp."""
    chosen: PolicyEvaluator = request.getfixturevalue(request.param)
    return chosen


@pytest.mark.parametrize("tenant", list(TENANTS.values()), ids=list(TENANTS))
@pytest.mark.parametrize("role", ROLES)
def test_every_cell(engine: PolicyEvaluator, role: str, tenant: str) -> None:
    wrong = []
    for cell in cells(role, tenant):
        want = table.expected(
            role,
            cell.kind,
            cell.action,
            subject_tenant=SUBJECT_TENANT,
            resource_tenant=tenant,
            model=cell.name,
        )
        got = ask(engine, role, cell.action, cell.kind, resource_tenant=tenant, name=cell.name)
        if (
            got.allow != want.allow
            or not any(want.reason in reason for reason in got.reasons)
            or got.granted_by != ((role,) if want.allow else ())
            or (got.max_tokens, got.priority) != (want.max_tokens, want.priority)
        ):
            wrong.append(f"{cell}: expected {want}, got {got}")
    assert not wrong, "\n".join(wrong)


def test_the_matrix_is_complete() -> None:
    total = sum(len(cells(role, tenant)) for role in ROLES for tenant in TENANTS.values())
    per_subject = sum(len(table.KIND_ACTIONS[kind]) + 1 for kind, _ in RESOURCES)
    assert total == len(ROLES) * len(TENANTS) * per_subject == 918
