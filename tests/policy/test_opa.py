"""The OPA server evaluator's own behaviour, through opa-python-client against the REST
API test double: what it loads and how, how it fails (always as a denial), and the
settings that choose it."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from services.gateway.settings import GatewaySettings
from shared.policy import (
    FAILED,
    AccessRequest,
    EmbeddedEvaluator,
    PolicyBundle,
    PolicyEngine,
    PolicyError,
    PolicySettings,
    Resource,
    Subject,
    load_evaluator,
)
from shared.policy.opa import OpaServerEvaluator
from shared.settings import SettingsError, load_settings
from tests.policy.conftest import POLICIES, ask, bundle
from tests.policy.opa_double import OpaDouble


@pytest.fixture
def server() -> Iterator[OpaDouble]:
    double = OpaDouble().start()
    yield double
    double.stop()


def test_policies_and_data_go_in_through_the_rest_api(server: OpaDouble) -> None:
    server.put_policy("meshllm.old", "package meshllm.old\nx := 1\n")
    server.put_policy("other.keep", "package other\ny := 2\n")
    evaluator = OpaServerEvaluator(server.url, bundle(), token="t0k")
    try:
        assert set(server.policies) == {"meshllm.authz", "other.keep"}  # the stale one went
        assert server.policies["meshllm.authz"] == (POLICIES / "authz.rego").read_text()
        # data beside the package meshllm.authz goes one level down, never over it
        assert sorted(server.data["meshllm"]) == ["aliases", "roles", "tenants"]
        writes = [(m, p) for m, p, _ in server.requests if m in {"PUT", "DELETE"}]
        assert writes == [
            ("PUT", "/v1/policies/meshllm.authz"),
            ("DELETE", "/v1/policies/meshllm.old"),
            ("PUT", "/v1/data/meshllm/roles"),
            ("PUT", "/v1/data/meshllm/aliases"),
            ("PUT", "/v1/data/meshllm/tenants"),
        ]
        assert ask(evaluator, "analyst", "read", "kb_collection").allow
        method, path, authorization = server.requests[-1]
        assert (method, path) == ("POST", "/v1/data/meshllm/authz/decision")
        assert authorization == "Bearer t0k"
    finally:
        evaluator.close()


def test_a_server_that_lost_its_policies_gets_them_again(server: OpaDouble) -> None:
    evaluator = OpaServerEvaluator(server.url, bundle(), repush_interval_s=0)
    server.restart_empty()
    assert ask(evaluator, "analyst", "read", "kb_collection").allow
    assert "meshllm.authz" in server.policies
    evaluator.close()


def test_pushes_again_at_most_once_per_interval(server: OpaDouble) -> None:
    evaluator = OpaServerEvaluator(server.url, bundle(), repush_interval_s=60)
    server.restart_empty()
    # pushed at start less than a minute ago: the undefined rule is a denial
    assert ask(evaluator, "analyst", "read", "kb_collection") == FAILED
    evaluator.close()


def test_without_push_the_server_is_only_asked(server: OpaDouble) -> None:
    OpaServerEvaluator(server.url, bundle()).close()
    before = len(server.policies)
    evaluator = OpaServerEvaluator(server.url, None, push=False)
    assert ask(evaluator, "auditor", "verify", "audit").allow
    assert not [m for m, _, _ in server.requests[-2:] if m == "PUT"]
    assert len(server.policies) == before
    server.restart_empty()
    assert ask(evaluator, "auditor", "verify", "audit") == FAILED
    evaluator.close()
    with pytest.raises(PolicyError, match="does not give a decision"):
        OpaServerEvaluator(server.url, None, push=False)


def test_an_unreachable_server_denies_every_decision(server: OpaDouble) -> None:
    evaluator = OpaServerEvaluator(server.url, bundle(), timeout_s=0.5)
    server.stop()
    started = time.monotonic()
    assert ask(evaluator, "admin", "chat", "model", name="smollm2") == FAILED
    assert time.monotonic() - started < 2
    evaluator.close()


def test_an_error_status_denies(server: OpaDouble, tmp_path: Path) -> None:
    rego = tmp_path / "authz.rego"
    rego.write_text(
        "package meshllm.authz\n\n"
        'limit := 1 if input.action == "complete"\n'
        'limit := 2 if input.action == "complete"\n\n'
        'decision := {"allow": true, "reasons": [], "max_tokens": limit, "priority": "normal"}'
        ' if input.action == "complete"\n'
        'else := {"allow": true, "reasons": [], "max_tokens": null, "priority": "normal"}\n'
    )
    evaluator = OpaServerEvaluator(server.url, PolicyBundle.load([rego]))
    assert ask(evaluator, "x", "chat", "model").allow
    assert ask(evaluator, "x", "complete", "model") == FAILED  # the server answers 500
    evaluator.close()


def test_start_fails_clearly(server: OpaDouble, tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match=r"OPA server http://127\.0\.0\.1:9 is unreachable"):
        OpaServerEvaluator("http://127.0.0.1:9", bundle(), timeout_s=0.5)
    with pytest.raises(PolicyError, match="OPA server URL 'opa:8181' is not an http"):
        OpaServerEvaluator("opa:8181", bundle())
    bad = tmp_path / "bad.rego"
    bad.write_text("package meshllm.authz\n\ndecision := {\n")
    with pytest.raises(PolicyError, match=re.escape(f"policy file {bad}: the OPA server")):
        OpaServerEvaluator(server.url, PolicyBundle.load([bad]))
    scalar = {"meshllm": {"roles": {}, "limit": 3}}
    with pytest.raises(PolicyError, match=r"data\.meshllm\.limit must be an object"):
        OpaServerEvaluator(server.url, PolicyBundle.load([POLICIES / "authz.rego"], scalar))


def test_both_evaluators_agree_on_requests_with_everything_set(server: OpaDouble) -> None:
    embedded = EmbeddedEvaluator(bundle())
    opa = OpaServerEvaluator(server.url, bundle())
    for roles in [("user", "batch"), ("auditor",), ("developer", "intern"), ()]:
        for priority in (None, "high", "low"):
            for max_tokens in (None, 10, 5000):
                args = {"name": "llama", "version": "2", "priority": priority}
                one = ask(embedded, roles, "chat", "model", max_tokens=max_tokens, **args)
                other = ask(opa, roles, "chat", "model", max_tokens=max_tokens, **args)
                assert one == other
    opa.close()


# --------------------------------------------------------------------------- settings


def test_the_settings_choose_the_evaluator(server: OpaDouble) -> None:
    embedded = load_evaluator(PolicySettings(), POLICIES)
    assert isinstance(embedded, EmbeddedEvaluator)
    opa = load_evaluator(PolicySettings(engine=PolicyEngine.OPA, opa_url=server.url), POLICIES)
    assert isinstance(opa, OpaServerEvaluator)
    assert ask(opa, "developer", "write", "kb_collection").allow
    opa.close()


def test_opa_needs_a_url(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError, match="MESHLLM_POLICY__OPA_URL must be set"):
        PolicySettings(engine=PolicyEngine.OPA)
    monkeypatch.setenv("MESHLLM_POLICY__ENGINE", "opa")
    with pytest.raises(SettingsError, match=r"MESHLLM_POLICY__OPA_URL: .*must be set"):
        load_settings(GatewaySettings)
    monkeypatch.setenv("MESHLLM_POLICY__OPA_URL", "http://opa:8181/v1")
    with pytest.raises(SettingsError, match=r"MESHLLM_POLICY__OPA_URL: .*without a path"):
        load_settings(GatewaySettings)
    monkeypatch.setenv("MESHLLM_POLICY__OPA_URL", "https://opa.internal")
    settings = load_settings(GatewaySettings)
    assert (settings.policy.engine, settings.policy.opa_url) == ("opa", "https://opa.internal")
    assert settings.policy_dir.name == "policies"  # MESHLLM_POLICY_DIR is another setting


async def test_decisions_in_an_event_loop_do_not_block_it(server: OpaDouble) -> None:
    """Ten decisions from a slow OPA (0.2 s each) overlap, and the loop keeps running
    meanwhile: a blocking call per decision would take 2 s and freeze everything else."""
    evaluator = OpaServerEvaluator(server.url, bundle())
    server.delay_s = 0.2
    gaps: list[float] = []

    async def heartbeat() -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    beating = asyncio.create_task(heartbeat())
    try:
        request = AccessRequest(
            subject=Subject("key:a", "acme", ("analyst",)),
            action="read",
            resource=Resource("kb_collection", "acme", "handbook", None),
        )
        started = time.monotonic()
        decisions = await asyncio.gather(*(evaluator.adecide(request) for _ in range(10)))
        took = time.monotonic() - started
    finally:
        beating.cancel()
        await evaluator.aclose()
    assert all(decision.allow for decision in decisions)
    assert took < 1.0, took
    assert max(gaps) < 0.15, max(gaps)


async def test_an_unreachable_server_denies_in_the_loop_too(server: OpaDouble) -> None:
    evaluator = OpaServerEvaluator(server.url, bundle(), timeout_s=0.5)
    server.stop()
    request = AccessRequest(
        subject=Subject("key:a", "acme", ("admin",)),
        action="read",
        resource=Resource("kb_collection", "acme", "handbook", None),
    )
    decision = await evaluator.adecide(request)
    await evaluator.aclose()
    assert not decision.allow
    assert decision.reasons[0].startswith("policy evaluation failed")
