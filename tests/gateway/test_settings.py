"""The gateway's settings: defaults, the key database path, and JWT configuration."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from services.gateway.settings import GatewaySettings
from shared.settings import SettingsError, load_settings

SECRET = "a-shared-secret-of-at-least-32-bytes!!"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("MESHLLM_"):
            monkeypatch.delenv(name)


def test_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHLLM_DATA_DIR", str(tmp_path))
    settings = load_settings(GatewaySettings)
    assert settings.service_name == "gateway"
    assert (settings.http_host, settings.http_port) == ("127.0.0.1", 8080)
    assert settings.keys_db_path == tmp_path / "gateway" / "keys.sqlite"
    assert (settings.policy_dir / "authz.rego").is_file()
    assert (settings.policy_dir / "data.json").is_file()
    assert settings.jwt.verifier() is None
    assert not settings.jwt.enabled
    assert settings.limits.default_rpm == 600
    assert settings.limits.max_body_bytes == 1_048_576
    assert settings.request_timeout_s == 120


def test_overrides_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHLLM_KEYS_DB", str(tmp_path / "k.sqlite"))
    monkeypatch.setenv("MESHLLM_LIMITS__TENANT_TPM", "1000")
    monkeypatch.setenv("MESHLLM_JWT__ISSUER", "https://idp.example.test/")
    monkeypatch.setenv("MESHLLM_JWT__KEY", SECRET)
    monkeypatch.setenv("MESHLLM_JWT__ALGORITHMS", '["HS256"]')
    settings = load_settings(GatewaySettings)
    assert settings.keys_db_path == tmp_path / "k.sqlite"
    assert settings.limits.tenant_tpm == 1000
    verifier = settings.jwt.verifier()
    assert verifier is not None
    assert verifier.issuer == "https://idp.example.test/"
    assert SECRET not in repr(settings)


@pytest.mark.parametrize(
    ("env", "complaint"),
    [
        ({"MESHLLM_JWT__ISSUER": "https://idp/"}, "MESHLLM_JWT__KEY must be set"),
        ({"MESHLLM_JWT__KEY": SECRET}, "MESHLLM_JWT__ISSUER must be set"),
        ({"MESHLLM_JWT__ISSUER": "https://idp/", "MESHLLM_JWT__KEY": SECRET}, "PEM public key"),
        ({"MESHLLM_LIMITS__DEFAULT_RPM": "0"}, "MESHLLM_LIMITS__DEFAULT_RPM"),
        ({"MESHLLM_KEY_CACHE_TTL_S": "-1"}, "MESHLLM_KEY_CACHE_TTL_S"),
    ],
)
def test_bad_settings_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], complaint: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError, match=complaint) as raised:
        load_settings(GatewaySettings)
    assert SECRET not in str(raised.value)
