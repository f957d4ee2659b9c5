"""Audit store fixtures: SQLite in a temporary directory, OpenSearch on osmem-server.

``MESHLLM_TEST_OPENSEARCH`` (a URL) runs the OpenSearch tests against a real cluster, each
test under its own index prefix; unset, each test gets a fresh clone of the in-memory
osmem-server (the ``osmem_clone`` fixture of the osmem-server wheel's pytest plugin).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from opensearchpy import OpenSearch

from services.audit.checkpoint import CheckpointSigner
from services.audit.opensearch_store import OpenSearchAuditStore
from services.audit.sqlite_store import SqliteAuditStore
from services.audit.store import AuditStore

StoreFactory = Callable[[], AuditStore]


@pytest.fixture(scope="session")
def signer() -> CheckpointSigner:
    return CheckpointSigner.generate()


@pytest.fixture
def opensearch_client(request: pytest.FixtureRequest) -> Iterator[tuple[OpenSearch, str]]:
    """A client and an index prefix no other test uses."""
    given = os.environ.get("MESHLLM_TEST_OPENSEARCH")
    prefix = f"audit-{uuid.uuid4().hex[:8]}"
    if given:
        client = OpenSearch(hosts=[given])
        yield client, prefix
        client.indices.delete(index=f"{prefix}-*")
    else:
        clone = request.getfixturevalue("osmem_clone")
        client = OpenSearch(hosts=[clone.url])
        yield client, prefix
    client.close()


@pytest.fixture
def sqlite_factory(tmp_path: Path) -> StoreFactory:
    """Opens the same SQLite store each call (as another process would)."""
    return lambda: SqliteAuditStore(tmp_path / "audit.sqlite")


@pytest.fixture
def opensearch_factory(opensearch_client: tuple[OpenSearch, str]) -> StoreFactory:
    client, prefix = opensearch_client
    return lambda: OpenSearchAuditStore(client, index_prefix=prefix, refresh=True)


@pytest.fixture(params=["sqlite", "opensearch"])
def store_factory(request: pytest.FixtureRequest) -> StoreFactory:
    factory: StoreFactory = request.getfixturevalue(f"{request.param}_factory")
    return factory


@pytest.fixture
def store(store_factory: StoreFactory) -> Iterator[AuditStore]:
    opened = store_factory()
    yield opened
    if not isinstance(opened, OpenSearchAuditStore):  # the client belongs to the fixture
        opened.close()
