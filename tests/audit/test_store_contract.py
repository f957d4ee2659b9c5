"""What every audit store promises, run against SQLite and OpenSearch (osmem-server)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from services.audit.checkpoint import CheckpointSigner
from services.audit.merkle import leaf_hash
from services.audit.records import AuditQuery, InvalidAuditEvent
from services.audit.store import AuditStore
from tests.audit.conftest import StoreFactory
from tests.audit.helpers import T0, audit_event, raw_events

SECOND = 1_000_000_000


def test_append_assigns_contiguous_indices_and_keeps_the_bytes(store: AuditStore) -> None:
    first = raw_events(3)
    second = raw_events(2)
    results = store.append(first) + store.append(second)
    assert [r.leaf_index for r in results] == [0, 1, 2, 3, 4]
    assert all(r.created and not r.conflict for r in results)
    assert store.size() == 5
    stored = list(store.records())
    assert [r.raw for r in stored] == first + second
    assert [h for _, h in store.leaf_hashes()] == [leaf_hash(raw) for raw in first + second]
    assert [i for i, _ in store.leaf_hashes(3)] == [3, 4]
    assert [r.leaf_index for r in store.records(1, 3)] == [1, 2]


def test_records_keep_the_columns_of_their_event(store: AuditStore) -> None:
    event = audit_event(tenant="globex", kind="policy", user="bob", model_version="v7")
    store.append([event])
    record = store.get_by_event_id(event.envelope.event_id)
    assert record is not None
    assert record == store.get(0)
    assert (record.tenant, record.kind, record.user, record.model_version) == (
        "globex",
        "policy",
        "bob",
        "v7",
    )
    assert record.raw == event.SerializeToString(deterministic=True)
    data = record.to_json()
    assert data["event"]["policy"]["reasons"] == ["hello"]
    assert data["event"]["envelope"]["event_id"] == event.envelope.event_id
    assert data["purged"] is False
    assert store.get(1) is None
    assert store.get_by_event_id("nope") is None


def test_redelivered_events_are_absorbed(store: AuditStore) -> None:
    events = raw_events(3)
    store.append(events[:2])
    results = store.append([events[1], events[2], events[2], events[0]])
    assert [(r.leaf_index, r.created) for r in results] == [
        (1, False),
        (2, True),
        (2, False),
        (0, False),
    ]
    assert store.size() == 3
    assert not any(r.conflict for r in results)


def test_the_same_event_id_with_other_bytes_is_flagged(store: AuditStore) -> None:
    event = audit_event(text="original")
    store.append([event])
    event.request.messages[0].content = "changed"
    (result,) = store.append([event])
    assert (result.leaf_index, result.created, result.conflict) == (0, False, True)
    record = store.get(0)
    assert record is not None
    assert b"original" in (record.raw or b"")


def test_a_bad_event_fails_the_whole_batch(store: AuditStore) -> None:
    store.append(raw_events(1))
    with pytest.raises(InvalidAuditEvent, match="batch position 1"):
        store.append([raw_events(1)[0], b"\xff\xff not protobuf", raw_events(1)[0]])
    no_envelope = audit_event()
    no_envelope.ClearField("envelope")
    with pytest.raises(InvalidAuditEvent, match="no envelope"):
        store.append([no_envelope])
    assert store.size() == 1
    assert store.append(raw_events(1))[0].leaf_index == 1


def test_the_log_id_survives_reopening(store_factory: StoreFactory) -> None:
    first = store_factory()
    first.append(raw_events(2))
    again = store_factory()
    assert again.log_id == first.log_id
    assert first.log_id.startswith("meshllm-audit/")
    assert again.append(raw_events(1))[0].leaf_index == 2


def _fill(store: AuditStore) -> list[str]:
    """Ten events over two tenants, two users, two model versions, four kinds."""
    kinds = ["request", "response", "routing", "policy"]
    events = [
        audit_event(
            tenant="acme" if i % 2 == 0 else "globex",
            user="alice" if i < 5 else "bob",
            api_key_id=f"key{i % 3}",
            model_version="v1" if i < 7 else "v2",
            kind=kinds[i % 4],
            request_id=f"req-{i // 2}",
            occurred_at_ns=T0 + i * SECOND,
        )
        for i in range(10)
    ]
    store.append(events)
    return [e.envelope.event_id for e in events]


def _indices(store: AuditStore, **filters: object) -> list[int]:
    page = store.query(AuditQuery(**filters, limit=1000))  # type: ignore[arg-type]
    assert page.next_cursor is None
    return [r.leaf_index for r in page.records]


def test_queries_filter_by_each_field(store: AuditStore) -> None:
    _fill(store)
    assert _indices(store) == list(range(10))
    assert _indices(store, tenant="acme") == [0, 2, 4, 6, 8]
    assert _indices(store, api_key_id="key1") == [1, 4, 7]
    assert _indices(store, user="bob") == [5, 6, 7, 8, 9]
    assert _indices(store, model_version="v2") == [7, 8, 9]
    assert _indices(store, request_id="req-2") == [4, 5]
    assert _indices(store, kind="routing") == [2, 6]
    assert _indices(store, tenant="globex", user="bob", model_version="v1") == [5]
    assert _indices(store, tenant="nobody") == []


def test_queries_filter_by_time_range(store: AuditStore) -> None:
    _fill(store)
    since = datetime.fromtimestamp((T0 + 3 * SECOND) / 1e9, UTC)
    until = datetime.fromtimestamp((T0 + 6 * SECOND) / 1e9, UTC)
    assert _indices(store, since=since) == [3, 4, 5, 6, 7, 8, 9]
    assert _indices(store, until=until) == [0, 1, 2, 3, 4, 5]
    assert _indices(store, since=since, until=until, tenant="acme") == [4]


def test_pagination_with_a_cursor(store: AuditStore) -> None:
    _fill(store)
    seen: list[int] = []
    cursor = None
    pages = 0
    while True:
        page = store.query(AuditQuery(tenant="acme", after=cursor, limit=2))
        seen += [r.leaf_index for r in page.records]
        pages += 1
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert seen == [0, 2, 4, 6, 8]
    assert pages == 3
    newest = store.query(AuditQuery(limit=3, descending=True))
    assert [r.leaf_index for r in newest.records] == [9, 8, 7]
    older = store.query(AuditQuery(limit=3, descending=True, after=newest.next_cursor))
    assert [r.leaf_index for r in older.records] == [6, 5, 4]
    assert store.query(AuditQuery(after=9)).records == []
    assert store.query(AuditQuery(limit=1000)).to_json()["next_cursor"] is None


def test_page_size_and_filters_are_checked() -> None:
    with pytest.raises(ValueError, match="limit"):
        AuditQuery(limit=1001)
    with pytest.raises(ValueError, match="limit"):
        AuditQuery(limit=0)
    with pytest.raises(ValueError, match="kind"):
        AuditQuery(kind="other")
    with pytest.raises(ValueError, match="timezone"):
        AuditQuery(since=datetime(2024, 1, 1))


def test_checkpoints_are_kept_in_size_order(store: AuditStore, signer: CheckpointSigner) -> None:
    assert store.checkpoints() == []
    assert store.latest_checkpoint() is None
    root = leaf_hash(b"x")
    later = signer.sign(store.log_id, 10, root, timestamp_ns=T0 + 2 * SECOND)
    earlier = signer.sign(store.log_id, 5, root, timestamp_ns=T0 + SECOND)
    resigned = signer.sign(store.log_id, 10, root, timestamp_ns=T0 + 3 * SECOND)
    for checkpoint in (later, earlier, resigned):
        store.add_checkpoint(checkpoint)
    assert store.checkpoints() == [earlier, later, resigned]
    assert store.latest_checkpoint() == resigned
    assert store.checkpoint_at(5) == earlier
    assert store.checkpoint_at(7) is None


def test_purge_erases_content_and_identities_but_keeps_leaf_hashes(store: AuditStore) -> None:
    ids = _fill(store)
    hashes = list(store.leaf_hashes())
    cutoff = T0 + 5 * SECOND
    assert store.purge("acme", cutoff, now_ns=T0 + 99) == 3
    assert store.purge("acme", cutoff, now_ns=T0 + 100) == 0
    assert list(store.leaf_hashes()) == hashes
    purged = store.get_by_event_id(ids[2])
    assert purged is not None
    assert purged.purged
    assert (purged.raw, purged.user, purged.api_key_id, purged.request_id) == (None, "", "", "")
    assert (purged.tenant, purged.kind, purged.purged_at_ns) == ("acme", "routing", T0 + 99)
    data = purged.to_json()
    assert data["purged"] is True
    assert data["event"] is None
    kept = store.get(6)
    assert kept is not None
    assert not kept.purged
    assert not store.get(1).purged  # type: ignore[union-attr]
    assert [r.leaf_index for r in store.records() if r.purged] == [0, 2, 4]
    (run,) = store.purges()
    assert (run.tenant, run.before_ns, run.count) == ("acme", cutoff, 3)
    assert store.tenants() == ["acme", "globex"]
    assert _indices(store, user="alice") == [1, 3]
