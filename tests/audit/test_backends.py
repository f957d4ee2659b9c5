"""What each back end does to keep a batch all-or-nothing and the leaf indices contiguous."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from opensearchpy import OpenSearch

from services.audit.opensearch_store import OpenSearchAuditStore
from services.audit.sqlite_store import SqliteAuditStore
from services.audit.store import StoreError
from tests.audit.helpers import raw_events


def _failing_seal(after: int):  # type: ignore[no-untyped-def]
    calls = {"n": 0}

    def seal(index: int, leaf: bytes) -> bytes:
        calls["n"] += 1
        if calls["n"] > after:
            raise OSError("disk full")
        return b"s" * 32

    return seal


def test_sqlite_rolls_back_a_batch_that_fails_midway(tmp_path: Path) -> None:
    store = SqliteAuditStore(tmp_path / "audit.sqlite")
    store.append(raw_events(2))
    batch = raw_events(5)
    with pytest.raises(OSError, match="disk full"):
        store.append(batch, seal=_failing_seal(after=3))
    assert store.size() == 2
    assert [r.leaf_index for r in store.append(batch)] == [2, 3, 4, 5, 6]


def test_sqlite_writers_sharing_a_file_never_overlap(tmp_path: Path) -> None:
    path = tmp_path / "audit.sqlite"
    SqliteAuditStore(path).close()

    def write() -> None:
        store = SqliteAuditStore(path)
        for _ in range(20):
            store.append(raw_events(5))
        store.close()

    threads = [threading.Thread(target=write) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    store = SqliteAuditStore(path, read_only=True)
    assert [i for i, _ in store.leaf_hashes()] == list(range(300))


def test_sqlite_read_only_needs_an_existing_store(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no audit store"):
        SqliteAuditStore(tmp_path / "nope.sqlite", read_only=True)
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database at all" * 100)
    with pytest.raises(StoreError, match="not an audit store"):
        SqliteAuditStore(junk)


def _store(client_prefix: tuple[OpenSearch, str]) -> OpenSearchAuditStore:
    client, prefix = client_prefix
    return OpenSearchAuditStore(client, index_prefix=prefix, refresh=True)


def test_opensearch_finishes_a_batch_claimed_before_a_crash(
    opensearch_client: tuple[OpenSearch, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    crashed = _store(opensearch_client)
    crashed.append(raw_events(2))
    batch = raw_events(3)

    def crash(journal: object) -> None:
        raise ConnectionError("process killed between claim and apply")

    monkeypatch.setattr(crashed, "_apply", crash)
    with pytest.raises(ConnectionError):
        crashed.append(batch)
    assert crashed.size() == 2  # claimed, not applied

    restarted = _store(opensearch_client)  # the next process; Kafka redelivers the batch
    results = restarted.append([batch[1], *raw_events(1), batch[0], batch[2]])
    assert [(r.leaf_index, r.created) for r in results] == [
        (3, False),
        (5, True),
        (2, False),
        (4, False),
    ]
    assert [r.raw for r in restarted.records(2, 5)] == batch
    assert [i for i, _ in restarted.leaf_hashes()] == list(range(6))


def test_opensearch_second_writer_is_fenced_not_interleaved(
    opensearch_client: tuple[OpenSearch, str],
) -> None:
    first, second = _store(opensearch_client), _store(opensearch_client)
    x, y, z = raw_events(3)
    first.append([x])
    second.append([y])  # reads the journal first: batch 1
    (result,) = first.append([z])  # claims batch 1 too, loses, re-reads, takes batch 2
    assert result.leaf_index == 2
    (again,) = second.append([x])
    assert (again.leaf_index, again.created) == (0, False)
    assert [r.raw for r in first.records()] == [x, y, z]


def test_opensearch_read_only_needs_an_existing_store(
    opensearch_client: tuple[OpenSearch, str],
) -> None:
    client, prefix = opensearch_client
    with pytest.raises(StoreError, match="no audit store"):
        OpenSearchAuditStore(client, index_prefix=prefix, create=False)
    _store(opensearch_client).append(raw_events(1))
    reader = OpenSearchAuditStore(client, index_prefix=prefix, create=False)
    assert reader.size() == 1
