"""Stores of secrets and tenants' data are created readable by their owner alone, whatever
the process's umask, and older files are narrowed when opened."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.audit.sqlite_store import SqliteAuditStore
from services.gateway.auth import KeyStore
from services.retrieval.service import StatusStore
from services.retrieval.sqlite_index import SqliteKnowledgeIndex
from shared.bus.idempotency import SqliteIdempotencyStore


@pytest.fixture(autouse=True)
def open_umask() -> Iterator[None]:
    """The default umask of many systems: files group- and world-readable."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_key_store_and_its_journal_are_private(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "gateway" / "keys.sqlite")
    store.create("acme", ["admin"])
    for path in (tmp_path / "gateway").iterdir():  # the database, its WAL and shared memory
        assert mode(path) == 0o600, path.name
    assert mode(tmp_path / "gateway") == 0o700


def test_an_older_world_readable_key_store_is_narrowed(tmp_path: Path) -> None:
    path = tmp_path / "keys.sqlite"
    KeyStore(path).create("acme", ["admin"])
    path.chmod(0o644)
    KeyStore(path)
    assert mode(path) == 0o600


def test_the_audit_store_is_private(tmp_path: Path) -> None:
    SqliteAuditStore(tmp_path / "audit" / "audit.sqlite")
    assert mode(tmp_path / "audit" / "audit.sqlite") == 0o600


def test_the_consumers_idempotency_store_is_private(tmp_path: Path) -> None:
    SqliteIdempotencyStore(tmp_path / "bus" / "seen.sqlite")
    assert mode(tmp_path / "bus" / "seen.sqlite") == 0o600


def test_the_knowledge_index_and_ingestion_status_are_private(tmp_path: Path) -> None:
    SqliteKnowledgeIndex(tmp_path / "kb", dim=4)
    StatusStore(tmp_path / "kb" / "status.sqlite")
    for name in ("kb.sqlite3", "status.sqlite"):
        assert mode(tmp_path / "kb" / name) == 0o600, name
