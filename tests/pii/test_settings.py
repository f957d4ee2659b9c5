"""Per-tenant, per-purpose policies and their keys, from the environment as services load them."""

from __future__ import annotations

import pytest
from pydantic import SecretStr, ValidationError

from shared.pii import (
    PiiConfigError,
    PiiMode,
    PiiPolicy,
    PiiType,
    Purpose,
    PurposePolicies,
    Redactor,
    TenantPiiSettings,
)
from shared.settings import MeshSettings, load_settings

SECRET = "acme-secret-0123456789abcdef"
FEEDBACK_TOKENIZES = '{"acme": {"feedback": {"default_mode": "tokenize", "key": "acme"}}}'


class ServiceSettings(MeshSettings):
    pii: TenantPiiSettings = TenantPiiSettings()


def test_defaults_per_purpose() -> None:
    settings = TenantPiiSettings()
    assert settings.policy_for(None, Purpose.LOGS).default_mode is PiiMode.MASK
    assert not settings.policy_for("acme", "audit").enabled  # audit keeps records intact
    assert settings.policy_for("acme", "feedback").default_mode is PiiMode.MASK
    assert settings.policy_for("acme", "training").default_mode is PiiMode.DROP
    with pytest.raises(ValueError, match="'metrics' is not a valid Purpose"):
        settings.policy_for("acme", "metrics")


def test_a_tenant_overrides_only_the_purposes_it_names() -> None:
    settings = TenantPiiSettings(
        tenants={"acme": {Purpose.AUDIT: PiiPolicy(default_mode=PiiMode.DROP)}}
    )
    assert settings.policy_for("acme", "audit").enabled
    assert settings.policy_for("acme", "audit").default_mode is PiiMode.DROP
    assert settings.policy_for("acme", "training") == settings.default.training
    assert not settings.policy_for("globex", "audit").enabled


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHLLM_PII__KEYS__ACME", SECRET)
    monkeypatch.setenv("MESHLLM_PII__TENANTS", FEEDBACK_TOKENIZES)
    settings = load_settings(ServiceSettings).pii
    policy = settings.policy_for("acme", "feedback")
    assert policy.default_mode is PiiMode.TOKENIZE
    assert policy.key == "acme"
    text = settings.redactor("acme", "feedback").redact("手机13812345678").text
    assert text.startswith("手机[PHONE:tok_")
    assert settings.redactor("acme", "feedback") is settings.redactor("acme", "feedback")
    assert SECRET not in repr(settings)
    assert SECRET not in settings.model_dump_json()


def test_a_missing_key_stops_start_up_naming_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHLLM_PII__TENANTS", FEEDBACK_TOKENIZES)
    with pytest.raises(PiiConfigError) as error:
        load_settings(ServiceSettings)
    message = str(error.value)
    assert "pii.tenants.acme.feedback tokenizes with key 'acme'" in message
    assert "MESHLLM_PII__KEYS__ACME" in message


def test_a_short_key_stops_start_up_without_showing_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHLLM_PII__KEYS__ACME", "tiny-secret")
    monkeypatch.setenv("MESHLLM_PII__TENANTS", FEEDBACK_TOKENIZES)
    with pytest.raises(PiiConfigError, match=r"pii\.keys\.acme is shorter than 16 bytes") as error:
        load_settings(ServiceSettings)
    assert "tiny-secret" not in str(error.value)


def test_a_tokenizing_policy_must_name_a_key() -> None:
    with pytest.raises(PiiConfigError, match=r"pii\.default\.training tokenizes but names no key"):
        TenantPiiSettings.model_validate(
            {"default": {"training": {"modes": {"phone": "tokenize"}}}}
        )


def test_a_policy_rejects_unknown_fields_and_types() -> None:
    with pytest.raises(ValidationError):
        PiiPolicy.model_validate({"mode": "mask"})
    with pytest.raises(ValidationError):
        PiiPolicy.model_validate({"types": ["phone", "ssn"]})
    assert PiiPolicy.model_validate({"types": ["phone"]}).types == {PiiType.PHONE}


def test_keys_are_bound_to_the_tenant() -> None:
    settings = TenantPiiSettings(
        default=PurposePolicies(training=PiiPolicy(default_mode=PiiMode.TOKENIZE, key="shared")),
        keys={"shared": SecretStr(SECRET)},
    )
    acme = settings.redactor("acme", "training").redact("手机13812345678").text
    globex = settings.redactor("globex", "training").redact("手机13812345678").text
    assert acme != globex
    assert isinstance(settings.redactor(None, "training"), Redactor)
