"""The gateway's questions to the policy in policies/, and how RegoPolicy loads and fails.

The role x tenant x resource x action matrix and the OPA server evaluator are tested in
tests/policy; here: the gateway's actions on models, as the request path asks them.
"""

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
    GatewayPolicy,
    PolicyError,
    PolicyRequest,
    RegoPolicy,
    build_policy,
)
from services.gateway.settings import GatewaySettings
from shared.policy import AccessRequest
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
    **extra: Any,
) -> PolicyRequest:
    principal = Principal("key:abc", "acme", roles, "abc", "api_key")
    return PolicyRequest(principal, action, model, priority, max_tokens, **extra)


def ask(policy: GatewayPolicy, roles: tuple[str, ...], **kwargs: Any) -> Decision:
    return policy.decide(_request(roles, **kwargs))


def outcome(decision: Decision) -> tuple[bool, int | None, str]:
    return decision.allow, decision.max_tokens, decision.priority


def test_input_document() -> None:
    request = _request(
        ("user", "batch"),
        model="m",
        priority="low",
        max_tokens=7,
        model_version="2",
        source_ip="::ffff:10.1.2.3",
    )
    assert request.to_input() == {
        "subject": {"id": "key:abc", "tenant": "acme", "roles": ["user", "batch"]},
        "action": "chat",
        "resource": {"kind": "model", "tenant": "acme", "name": "m", "version": "2"},
        "request": {"priority": "low", "max_tokens": 7},
        "context": {"source_ip": "10.1.2.3", "time_ns": None},
    }
    actions = {
        action: _request(("user",), action=action).to_input()["action"]
        for action in ("chat.completions", "completions", "embeddings", "models.list")
    }
    assert actions == {
        "chat.completions": "chat",
        "completions": "complete",
        "embeddings": "embed",
        "models.list": "list",
    }


def test_admin_may_do_everything_in_its_tenant(policy: RegoPolicy) -> None:
    allowed = ask(policy, ("admin",), model=OTHER, priority="high", max_tokens=4096)
    assert allowed == Decision(
        allow=True,
        reasons=("granted by role admin in tenant acme",),
        max_tokens=4096,
        priority="high",
        granted_by=("admin",),
    )
    assert outcome(ask(policy, ("admin",))) == (True, 4096, "normal")
    denied = ask(policy, ("admin",), max_tokens=4097)
    assert not denied.allow
    assert denied.granted_by == ()
    assert denied.reasons == ("max_tokens 4097 exceeds the limit 4096 of role admin",)


def test_developer_uses_every_model_at_normal_or_low(policy: RegoPolicy) -> None:
    assert outcome(ask(policy, ("developer",), model=OTHER)) == (True, 2048, "normal")
    assert ask(policy, ("developer",), priority="low", max_tokens=2048).allow
    high = ask(policy, ("developer",), priority="high")
    assert not high.allow
    assert high.reasons == (
        "priority high is not allowed for role developer (allowed: normal, low)",
    )
    assert ask(policy, ("developer",), max_tokens=2049).reasons == (
        "max_tokens 2049 exceeds the limit 2048 of role developer",
    )


def test_user_is_an_analyst_on_smollm2_models(policy: RegoPolicy) -> None:
    allowed = ask(policy, ("user",))
    assert outcome(allowed) == (True, 1024, "normal")
    assert allowed.reasons == ("granted by role user (alias of analyst) in tenant acme",)
    assert allowed.granted_by == ("user",)
    assert ask(policy, ("user",), model="smollm2-1.7b", max_tokens=100).max_tokens == 100
    other = ask(policy, ("user",), model=OTHER)
    assert not other.allow
    assert other.reasons == (f"model {OTHER} is not allowed for role user",)
    assert ask(policy, ("user",), max_tokens=1025).reasons == (
        "max_tokens 1025 exceeds the limit 1024 of role user",
    )
    assert not ask(policy, ("user",), priority="high").allow
    assert ask(policy, ("user",), priority="low").priority == "low"
    assert outcome(ask(policy, ("analyst",))) == outcome(ask(policy, ("user",)))


def test_batch_is_a_service_at_low_priority_only(policy: RegoPolicy) -> None:
    assert outcome(ask(policy, ("batch",), model=OTHER)) == (True, 2048, "low")
    normal = ask(policy, ("batch",), priority="normal")
    assert not normal.allow
    assert normal.reasons == ("priority normal is not allowed for role batch (allowed: low)",)
    assert outcome(ask(policy, ("service",), model=OTHER)) == (True, 2048, "low")


def test_an_auditor_may_not_use_models(policy: RegoPolicy) -> None:
    denied = ask(policy, ("auditor",))
    assert not denied.allow
    assert denied.reasons == ("action chat on model is not allowed for role auditor",)
    # unless another role grants it
    assert ask(policy, ("auditor", "analyst")).granted_by == ("analyst",)


def test_actions_without_tokens(policy: RegoPolicy) -> None:
    assert outcome(ask(policy, ("user",), action="embeddings")) == (True, None, "normal")
    assert ask(policy, ("user",), action="models.list", model=None).allow
    assert ask(policy, ("batch",), action="models.list", model=None).priority == "low"


def test_a_model_version_may_be_named(policy: RegoPolicy) -> None:
    assert ask(policy, ("user",), model_version="q4_1-1").allow
    assert ask(policy, ("developer",), model=OTHER, model_version="2").allow


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
    assert outcome(both) == (True, 2048, "normal")
    assert both.granted_by == ("developer",)
    assert ask(policy, ("user", "developer")).max_tokens == 2048
    # an unknown role beside a known one costs nothing
    assert ask(policy, ("intern", "user")).allow
    # admin's high priority with batch's models
    assert ask(policy, ("batch", "admin"), priority="high").allow


def test_a_role_counts_only_where_it_grants_the_model(policy: RegoPolicy) -> None:
    # user grants smollm2 at normal; for another model only batch counts: low, 2048
    assert outcome(ask(policy, ("user", "batch"))) == (True, 2048, "normal")
    assert outcome(ask(policy, ("user", "batch"), model=OTHER)) == (True, 2048, "low")
    assert not ask(policy, ("user", "batch"), model=OTHER, priority="normal").allow


def test_several_reasons_are_all_given(policy: RegoPolicy) -> None:
    decision = ask(policy, ("user",), priority="high", max_tokens=9999)
    assert not decision.allow
    assert set(decision.reasons) == {
        "max_tokens 9999 exceeds the limit 1024 of role user",
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


def test_build_policy_follows_the_settings() -> None:
    policy = build_policy(GatewaySettings())
    assert ask(policy, ("user",)).allow


async def test_an_evaluator_that_raises_still_denies() -> None:
    class Broken:
        def decide(self, request: AccessRequest) -> Decision:
            raise RuntimeError("broken")

        async def adecide(self, request: AccessRequest) -> Decision:
            raise RuntimeError("broken")

        def close(self) -> None:
            pass

        async def aclose(self) -> None:
            pass

    denied = Decision(False, ("policy evaluation failed",), None, "normal")
    assert GatewayPolicy(Broken()).decide(_request(("admin",))) == denied
    assert await GatewayPolicy(Broken()).adecide(_request(("admin",))) == denied


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
    no_package = _write(tmp_path, "x.rego", "allow := true\n")
    with pytest.raises(PolicyError, match=re.escape(f"policy file {no_package}: no package")):
        RegoPolicy([no_package])


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


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"roles": {"analyst": {"networks": ["10.0.0/33"]}}},
            "meshllm.roles.analyst.networks: '10.0.0/33' is not a network",
        ),
        (
            {"tenants": {"acme": {"hours_utc": [[8, 25]]}}},
            "meshllm.tenants.acme.hours_utc: [8, 25] is not [from, to]",
        ),
        ({"tenants": {"acme": {"hours_utc": 8}}}, "meshllm.tenants.acme.hours_utc must be"),
        ({"aliases": {"boss": "chief"}}, "meshllm.aliases.boss names no role ('chief')"),
    ],
)
def test_data_that_would_fail_each_decision_is_refused_at_load(
    change: dict[str, Any], message: str
) -> None:
    data = json.loads((POLICIES / "data.json").read_text())
    for section, entries in change.items():
        for name, rules in entries.items():
            current = data["meshllm"][section].get(name)
            data["meshllm"][section][name] = (
                {**current, **rules} if isinstance(current, dict) else rules
            )
    with pytest.raises(PolicyError, match=re.escape(message)):
        RegoPolicy([POLICIES / "authz.rego"], data)


def test_without_the_roles_data_nothing_is_allowed() -> None:
    policy = RegoPolicy([POLICIES / "authz.rego"])
    assert ask(policy, ("admin",)).reasons == ("nothing is allowed for unknown role admin",)
    data = json.loads((POLICIES / "data.json").read_text())
    assert ask(RegoPolicy([POLICIES / "authz.rego"], data), ("admin",)).allow


def test_an_evaluation_error_denies(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "authz.rego",
        """package meshllm.authz

limit := 1 if input.action == "complete"
limit := 2 if input.action == "complete"

priority := "urgent" if input.action == "embed"
priority := "normal" if input.action != "embed"

decision := {"allow": true, "reasons": [], "max_tokens": limit, "priority": priority} if {
	input.action == "complete"
} else := {"allow": true, "reasons": [], "max_tokens": null, "priority": priority}
""",
    )
    policy = RegoPolicy([path])
    assert ask(policy, ("user",), action="chat.completions").allow
    failed = Decision(False, ("policy evaluation failed",), None, "normal")
    assert ask(policy, ("user",), action="completions") == failed  # conflicting values
    assert ask(policy, ("user",), action="embeddings") == failed  # not a priority
