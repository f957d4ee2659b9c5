"""The RBAC policy in policies/, evaluated by RegoPolicy, and how RegoPolicy loads and fails."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from services.gateway.auth import Principal
from services.gateway.policy import (
    Action,
    Decision,
    PolicyError,
    PolicyRequest,
    RegoPolicy,
)
from tests.conftest import ROOT

POLICIES = ROOT / "policies"
SMOL = "smollm2-135m-instruct"
OTHER = "llama-3.1-8b-instruct"


@pytest.fixture(scope="module")
def policy() -> RegoPolicy:
    return RegoPolicy.from_dir(POLICIES)


def _request(
    roles: tuple[str, ...],
    action: Action = "chat.completions",
    model: str | None = SMOL,
    priority: str | None = None,
    max_tokens: int | None = None,
) -> PolicyRequest:
    principal = Principal("key:abc", "acme", roles, "abc", "api_key")
    return PolicyRequest(principal, action, model, priority, max_tokens)


def ask(policy: RegoPolicy, roles: tuple[str, ...], **kwargs: Any) -> Decision:
    return policy.decide(_request(roles, **kwargs))


def test_input_document() -> None:
    request = _request(("user", "batch"), model="m", priority="low", max_tokens=7)
    assert request.to_input() == {
        "subject": "key:abc",
        "tenant": "acme",
        "roles": ["user", "batch"],
        "action": "chat.completions",
        "model": "m",
        "priority": "low",
        "max_tokens": 7,
    }


def test_admin_may_do_everything(policy: RegoPolicy) -> None:
    assert ask(policy, ("admin",), model=OTHER, priority="high", max_tokens=4096) == Decision(
        allow=True, reasons=(), max_tokens=4096, priority="high"
    )
    assert ask(policy, ("admin",)) == Decision(True, (), 4096, "normal")
    denied = ask(policy, ("admin",), max_tokens=4097)
    assert not denied.allow
    assert denied.reasons == ("max_tokens 4097 exceeds the limit 4096 of role admin",)


def test_developer_uses_every_model_at_normal_or_low(policy: RegoPolicy) -> None:
    assert ask(policy, ("developer",), model=OTHER) == Decision(True, (), 2048, "normal")
    assert ask(policy, ("developer",), priority="low", max_tokens=2048).allow
    high = ask(policy, ("developer",), priority="high")
    assert not high.allow
    assert high.reasons == (
        "priority high is not allowed for role developer (allowed: normal, low)",
    )
    assert ask(policy, ("developer",), max_tokens=2049).reasons == (
        "max_tokens 2049 exceeds the limit 2048 of role developer",
    )


def test_user_gets_smollm2_models_only(policy: RegoPolicy) -> None:
    assert ask(policy, ("user",)) == Decision(True, (), 512, "normal")
    assert ask(policy, ("user",), model="smollm2-1.7b", max_tokens=100).max_tokens == 100
    other = ask(policy, ("user",), model=OTHER)
    assert not other.allow
    assert other.reasons == (f"model {OTHER} is not allowed for role user",)
    assert ask(policy, ("user",), max_tokens=513).reasons == (
        "max_tokens 513 exceeds the limit 512 of role user",
    )
    assert not ask(policy, ("user",), priority="high").allow
    assert ask(policy, ("user",), priority="low").priority == "low"


def test_batch_runs_at_low_priority_only(policy: RegoPolicy) -> None:
    assert ask(policy, ("batch",), model=OTHER) == Decision(True, (), 2048, "low")
    normal = ask(policy, ("batch",), priority="normal")
    assert not normal.allow
    assert normal.reasons == ("priority normal is not allowed for role batch (allowed: low)",)


def test_actions_without_tokens(policy: RegoPolicy) -> None:
    assert ask(policy, ("user",), action="embeddings") == Decision(True, (), None, "normal")
    assert ask(policy, ("user",), action="models.list", model=None).allow
    assert ask(policy, ("batch",), action="models.list", model=None).priority == "low"


@pytest.mark.parametrize(
    ("roles", "reason"),
    [
        (("intern",), "nothing is allowed for unknown role intern"),
        (("intern", "guest"), "nothing is allowed for unknown roles intern, guest"),
        ((), "nothing is allowed without a role"),
    ],
)
def test_unknown_roles_grant_nothing(
    policy: RegoPolicy, roles: tuple[str, ...], reason: str
) -> None:
    for action in ("chat.completions", "embeddings", "models.list"):
        decision = ask(policy, roles, action=action)
        assert not decision.allow
        assert decision.reasons == (reason,)


def test_several_roles_hold_the_union(policy: RegoPolicy) -> None:
    # developer grants any model and the higher limit
    both = ask(policy, ("user", "developer"), model=OTHER, max_tokens=2048)
    assert both == Decision(True, (), 2048, "normal")
    assert ask(policy, ("user", "developer")).max_tokens == 2048
    # an unknown role beside a known one costs nothing
    assert ask(policy, ("intern", "user")).allow
    # admin's high priority with batch's models
    assert ask(policy, ("batch", "admin"), priority="high").allow


def test_a_role_counts_only_where_it_grants_the_model(policy: RegoPolicy) -> None:
    # user grants smollm2 at normal; for another model only batch counts: low, 2048
    assert ask(policy, ("user", "batch")) == Decision(True, (), 2048, "normal")
    assert ask(policy, ("user", "batch"), model=OTHER) == Decision(True, (), 2048, "low")
    assert not ask(policy, ("user", "batch"), model=OTHER, priority="normal").allow


def test_several_reasons_are_all_given(policy: RegoPolicy) -> None:
    decision = ask(policy, ("user",), priority="high", max_tokens=9999)
    assert not decision.allow
    assert set(decision.reasons) == {
        "max_tokens 9999 exceeds the limit 512 of role user",
        "priority high is not allowed for role user (allowed: normal, low)",
    }


def test_decisions_from_many_threads(policy: RegoPolicy) -> None:
    cases = [
        (("user",), SMOL, True),
        (("user",), OTHER, False),
        (("developer",), OTHER, True),
        (("intern",), SMOL, False),
    ] * 100

    def decide(case: tuple[tuple[str, ...], str, bool]) -> bool:
        roles, model, expected = case
        return ask(policy, roles, model=model).allow == expected

    with ThreadPoolExecutor(max_workers=4) as pool:
        assert all(pool.map(decide, cases))


# --------------------------------------------------------------------------- loading


def _write(directory: Path, name: str, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(text)
    return path


def test_a_broken_rego_file_is_named(tmp_path: Path) -> None:
    good = _write(tmp_path, "a.rego", "package meshllm.authz\nok := true\n")
    bad = _write(tmp_path, "b.rego", "package meshllm.authz\n\ndecision := {\n")
    with pytest.raises(PolicyError, match=re.escape(f"policy file {bad}")) as raised:
        RegoPolicy([good, bad])
    assert "Stack backtrace" not in str(raised.value)
    with pytest.raises(PolicyError, match=r"b\.rego"):
        RegoPolicy.from_dir(tmp_path)


def test_missing_files_and_empty_directories_are_named(tmp_path: Path) -> None:
    with pytest.raises(
        PolicyError, match=re.escape(f"policy file {tmp_path / 'nope.rego'} does not exist")
    ):
        RegoPolicy([tmp_path / "nope.rego"])
    with pytest.raises(PolicyError, match=r"holds no \.rego files"):
        RegoPolicy([tmp_path])
    with pytest.raises(PolicyError, match="no policy files"):
        RegoPolicy([])


def test_a_policy_without_the_decision_rule_fails_at_load(tmp_path: Path) -> None:
    path = _write(tmp_path, "other.rego", "package other\nallow := true\n")
    with pytest.raises(
        PolicyError, match=r"data\.meshllm\.authz\.decision does not give a decision"
    ):
        RegoPolicy([path])


def test_bad_data_json_is_named(tmp_path: Path) -> None:
    (tmp_path / "authz.rego").write_text((POLICIES / "authz.rego").read_text())
    (tmp_path / "data.json").write_text("{not json")
    with pytest.raises(PolicyError, match=re.escape(f"policy data {tmp_path / 'data.json'}")):
        RegoPolicy.from_dir(tmp_path)
    (tmp_path / "data.json").write_text("[1, 2]")
    with pytest.raises(PolicyError, match="must be a JSON object"):
        RegoPolicy.from_dir(tmp_path)


def test_without_the_roles_data_nothing_is_allowed(tmp_path: Path) -> None:
    policy = RegoPolicy([POLICIES / "authz.rego"])
    assert not ask(policy, ("admin",)).allow
    data = json.loads((POLICIES / "data.json").read_text())
    assert ask(RegoPolicy([POLICIES / "authz.rego"], data), ("admin",)).allow


def test_an_evaluation_error_denies(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "authz.rego",
        """package meshllm.authz

limit := 1 if input.action == "completions"
limit := 2 if input.action == "completions"

priority := "urgent" if input.action == "embeddings"
priority := "normal" if input.action != "embeddings"

decision := {"allow": true, "reasons": [], "max_tokens": limit, "priority": priority} if {
	input.action == "completions"
} else := {"allow": true, "reasons": [], "max_tokens": null, "priority": priority}
""",
    )
    policy = RegoPolicy([path])
    assert ask(policy, ("user",), action="chat.completions").allow
    failed = Decision(False, ("policy evaluation failed",), None, "normal")
    assert ask(policy, ("user",), action="completions") == failed  # conflicting values
    assert ask(policy, ("user",), action="embeddings") == failed  # not a priority
