"""Audit settings: the store by mode, default paths, and refused values named."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from services.audit.opensearch_store import OpenSearchAuditStore
from services.audit.settings import AuditSettings
from services.audit.sqlite_store import SqliteAuditStore
from services.audit.store import StoreError, open_store
from shared.settings import SettingsError, load_settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith("MESHLLM_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("MESHLLM_DATA_DIR", str(tmp_path))


def test_embedded_defaults(tmp_path: Path) -> None:
    settings = load_settings(AuditSettings)
    assert settings.store_kind == "sqlite"
    assert settings.db_path == tmp_path / "audit" / "audit.sqlite"
    assert settings.signing_key_path == tmp_path / "audit" / "signing-key.pem"
    with pytest.raises(StoreError, match="no audit store"):
        open_store(settings, read_only=True)
    store = open_store(settings)
    assert isinstance(store, SqliteAuditStore)
    store.close()
    open_store(settings, read_only=True).close()


def test_cluster_mode_uses_opensearch(monkeypatch: pytest.MonkeyPatch, osmem_url: str) -> None:
    monkeypatch.setenv("MESHLLM_MODE", "cluster")
    monkeypatch.setenv("MESHLLM_OPENSEARCH__HOSTS", f'["{osmem_url}"]')
    settings = load_settings(AuditSettings)
    assert settings.store_kind == "opensearch"
    with pytest.raises(StoreError, match="no audit store"):
        open_store(settings, read_only=True)
    store = open_store(settings)
    assert isinstance(store, OpenSearchAuditStore)
    assert open_store(settings, read_only=True).log_id == store.log_id


def test_bad_values_name_their_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHLLM_RETENTION_DAYS", '{"acme": 0}')
    with pytest.raises(SettingsError, match="MESHLLM_RETENTION_DAYS"):
        load_settings(AuditSettings)
    monkeypatch.delenv("MESHLLM_RETENTION_DAYS")
    monkeypatch.setenv("MESHLLM_OPENSEARCH__HOSTS", '["opensearch:9200"]')
    with pytest.raises(SettingsError, match="MESHLLM_OPENSEARCH__HOSTS"):
        load_settings(AuditSettings)
