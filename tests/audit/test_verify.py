"""Tampering with a stored log is detected, and the record (or the narrowest range) named.

The log: 40 records appended in batches of 5, a checkpoint signed after each batch, so the
signed sizes are 5, 10, ..., 40. Each test tampers the way an attacker with write access to
the store (but not the signing key) would, then verifies with the signing key (seals: exact
records) and with only the public key (signed roots: ranges between checkpoints).
"""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest
from opensearchpy import OpenSearch

from services.audit.checkpoint import CheckpointSigner, CheckpointVerifier
from services.audit.log import AuditLog
from services.audit.merkle import leaf_hash
from services.audit.opensearch_store import OpenSearchAuditStore
from services.audit.records import AuditRecord
from services.audit.sqlite_store import SqliteAuditStore
from services.audit.store import AuditStore
from services.audit.verify import (
    ProblemKind,
    StoreReport,
    verify_checkpoints,
    verify_record,
    verify_store,
)
from tests.audit.helpers import raw_events

SIZE, BATCH = 40, 5


def _fill(store: AuditStore, signer: CheckpointSigner) -> list[AuditRecord]:
    log = AuditLog(store, signer)
    for _ in range(SIZE // BATCH):
        log.append(raw_events(BATCH))
        log.checkpoint()
    return list(store.records())


@pytest.fixture
def sqlite_log(
    tmp_path: Path, signer: CheckpointSigner
) -> tuple[SqliteAuditStore, list[AuditRecord]]:
    store = SqliteAuditStore(tmp_path / "audit.sqlite")
    return store, _fill(store, signer)


def _db(store: SqliteAuditStore) -> sqlite3.Connection:
    return store._db


def _sealed(store: AuditStore, signer: CheckpointSigner) -> StoreReport:
    return verify_store(store, signer.verifier(), sealer=signer.sealer(store.log_id))


def _public(store: AuditStore, signer: CheckpointSigner) -> StoreReport:
    return verify_store(store, signer.verifier())


def _flip_byte(raw: bytes) -> bytes:
    """Change a byte of the message text at the end ("hello" -> "helmo")."""
    return raw[:-2] + bytes([raw[-2] ^ 0x01]) + raw[-1:]


def test_an_untouched_log_verifies(
    sqlite_log: tuple[SqliteAuditStore, list[AuditRecord]], signer: CheckpointSigner
) -> None:
    store, _ = sqlite_log
    for report in (_sealed(store, signer), _public(store, signer)):
        assert report.ok, report.problems
        assert (report.records, report.checkpoints_matched, report.covered_size) == (40, 8, 40)
    assert _sealed(store, signer).seals_checked == 40
    assert verify_record(store, signer.verifier(), leaf_index=17).ok
    assert verify_record(store, signer.verifier(), leaf_index=17, tree_size=20).ok
    assert verify_checkpoints(store, signer.verifier(), 15, 40).ok


def test_a_changed_byte_names_the_record(
    sqlite_log: tuple[SqliteAuditStore, list[AuditRecord]], signer: CheckpointSigner
) -> None:
    store, records = sqlite_log
    _db(store).execute(
        "UPDATE records SET event = ? WHERE leaf_index = 12", (_flip_byte(records[12].raw or b""),)
    )
    for report in (_sealed(store, signer), _public(store, signer)):
        first = report.first_problem
        assert first is not None
        assert (first.kind, first.leaf_index, first.event_id) == (
            ProblemKind.CONTENT_CHANGED,
            12,
            records[12].event_id,
        )
        assert "signed root at size 15 differs" in first.message
        assert [p.kind for p in report.problems] == [ProblemKind.CONTENT_CHANGED]
    record = verify_record(store, signer.verifier(), leaf_index=12)
    assert [p.kind for p in record.problems][:1] == [ProblemKind.CONTENT_CHANGED]


def test_a_changed_byte_with_its_leaf_hash_rewritten(
    sqlite_log: tuple[SqliteAuditStore, list[AuditRecord]], signer: CheckpointSigner
) -> None:
    store, records = sqlite_log
    forged = _flip_byte(records[12].raw or b"")
    _db(store).execute(
        "UPDATE records SET event = ?, leaf_hash = ? WHERE leaf_index = 12",
        (forged, leaf_hash(forged)),
    )
    sealed = _sealed(store, signer).first_problem
    assert sealed is not None
    assert (sealed.kind, sealed.leaf_index, sealed.event_id) == (
        ProblemKind.SEAL_MISMATCH,
        12,
        records[12].event_id,
    )

    public = _public(store, signer)
    first = public.first_problem
    assert first is not None
    assert (first.kind, first.leaf_index, first.end_index) == (ProblemKind.ROOT_MISMATCH, 10, 15)
    assert "leaves 10..14" in first.message
    assert any("later checkpoint" in note for note in public.notes)

    other = verify_record(store, signer.verifier(), leaf_index=3)
    assert [p.kind for p in other.problems] == [ProblemKind.BAD_PROOF]
    assert "proven by the checkpoint at size 5" in other.notes[0]
    assert not verify_checkpoints(store, signer.verifier(), 10, 40).ok
    assert verify_checkpoints(store, signer.verifier(), 5, 10).ok


def test_a_deleted_record_is_named_by_its_index(
    sqlite_log: tuple[SqliteAuditStore, list[AuditRecord]], signer: CheckpointSigner
) -> None:
    store, records = sqlite_log
    _db(store).execute("DELETE FROM records WHERE leaf_index = 12")
    for report in (_sealed(store, signer), _public(store, signer)):
        first = report.first_problem
        assert first is not None
        assert (first.kind, first.leaf_index) == (ProblemKind.MISSING, 12)
        assert records[11].event_id in first.message
        assert records[13].event_id in first.message
        assert report.problems == [first]


def test_a_deleted_record_with_the_rest_renumbered(
    sqlite_log: tuple[SqliteAuditStore, list[AuditRecord]], signer: CheckpointSigner
) -> None:
    store, records = sqlite_log
    db = _db(store)
    db.execute("DELETE FROM records WHERE leaf_index = 12")
    db.execute("UPDATE records SET leaf_index = -leaf_index WHERE leaf_index > 12")
    db.execute("UPDATE records SET leaf_index = -leaf_index - 1 WHERE leaf_index < 0")

    sealed = _sealed(store, signer)
    first = sealed.first_problem
    assert first is not None
    assert (first.kind, first.leaf_index, first.end_index) == (ProblemKind.SEAL_MISMATCH, 12, 39)
    assert records[13].event_id in first.message  # now at leaf 12
    assert ProblemKind.TRUNCATED in {p.kind for p in sealed.problems}

    public = _public(store, signer)
    kinds = {p.kind: p for p in public.problems}
    assert (
        kinds[ProblemKind.ROOT_MISMATCH].leaf_index,
        kinds[ProblemKind.ROOT_MISMATCH].end_index,
    ) == (10, 15)
    assert (kinds[ProblemKind.TRUNCATED].leaf_index, kinds[ProblemKind.TRUNCATED].end_index) == (
        39,
        40,
    )


def test_two_records_reordered(
    sqlite_log: tuple[SqliteAuditStore, list[AuditRecord]], signer: CheckpointSigner
) -> None:
    store, records = sqlite_log
    db = _db(store)
    db.execute("UPDATE records SET leaf_index = -1 WHERE leaf_index = 12")
    db.execute("UPDATE records SET leaf_index = 12 WHERE leaf_index = 17")
    db.execute("UPDATE records SET leaf_index = 17 WHERE leaf_index = -1")

    sealed = _sealed(store, signer)
    named = [(p.kind, p.leaf_index, p.event_id) for p in sealed.problems]
    assert named == [
        (ProblemKind.SEAL_MISMATCH, 12, records[17].event_id),
        (ProblemKind.SEAL_MISMATCH, 17, records[12].event_id),
    ]

    public = _public(store, signer)
    first = public.first_problem
    assert first is not None
    assert (first.kind, first.leaf_index, first.end_index) == (ProblemKind.ROOT_MISMATCH, 10, 15)
    assert "likely moved: leaf 12" in first.message  # appended in a later batch


def test_a_truncated_log(
    sqlite_log: tuple[SqliteAuditStore, list[AuditRecord]], signer: CheckpointSigner
) -> None:
    store, _ = sqlite_log
    _db(store).execute("DELETE FROM records WHERE leaf_index >= 33")
    for report in (_sealed(store, signer), _public(store, signer)):
        first = report.first_problem
        assert first is not None
        assert (first.kind, first.leaf_index, first.end_index) == (ProblemKind.TRUNCATED, 33, 40)
        assert "leaves 33..39 were removed" in first.message
    assert not verify_record(store, signer.verifier(), leaf_index=3).ok


def test_a_truncated_log_with_its_checkpoints_deleted_is_caught_by_an_exported_one(
    sqlite_log: tuple[SqliteAuditStore, list[AuditRecord]], signer: CheckpointSigner
) -> None:
    store, _ = sqlite_log
    exported = store.latest_checkpoint()
    assert exported is not None
    db = _db(store)
    db.execute("DELETE FROM records WHERE leaf_index >= 33")
    db.execute("DELETE FROM checkpoints WHERE tree_size > 30")
    assert _public(store, signer).ok
    report = verify_store(store, signer.verifier(), trusted=[exported])
    assert [p.kind for p in report.problems] == [ProblemKind.TRUNCATED]


def test_columns_changed_without_the_bytes(
    sqlite_log: tuple[SqliteAuditStore, list[AuditRecord]], signer: CheckpointSigner
) -> None:
    store, records = sqlite_log
    _db(store).execute("UPDATE records SET tenant = 'evil', user = 'mallory' WHERE leaf_index = 7")
    report = _public(store, signer)
    assert [(p.kind, p.leaf_index, p.event_id) for p in report.problems] == [
        (ProblemKind.COLUMNS_CHANGED, 7, records[7].event_id)
    ]
    assert "tenant, user" in report.problems[0].message


def test_content_erased_outside_retention(
    sqlite_log: tuple[SqliteAuditStore, list[AuditRecord]], signer: CheckpointSigner
) -> None:
    store, _ = sqlite_log
    _db(store).execute("UPDATE records SET event = NULL WHERE leaf_index = 5")
    report = _public(store, signer)
    assert [(p.kind, p.leaf_index) for p in report.problems] == [(ProblemKind.PURGE_UNACCOUNTED, 5)]


def test_forged_and_foreign_checkpoints(
    sqlite_log: tuple[SqliteAuditStore, list[AuditRecord]], signer: CheckpointSigner
) -> None:
    store, _ = sqlite_log
    latest = store.latest_checkpoint()
    assert latest is not None
    store.add_checkpoint(replace(latest, tree_size=41, timestamp_ns=latest.timestamp_ns + 1))
    store.add_checkpoint(CheckpointSigner.generate().sign(store.log_id, 40, latest.root_hash))
    store.add_checkpoint(signer.sign("meshllm-audit/another-log", 40, latest.root_hash))
    report = _public(store, signer)
    messages = [p.message for p in report.problems if p.kind is ProblemKind.BAD_CHECKPOINT]
    assert len(messages) == 3
    assert any("signature does not verify" in m for m in messages)
    assert any("unknown key" in m for m in messages)
    assert any("another-log" in m for m in messages)
    assert report.checkpoints_matched == 8


def test_two_signed_roots_for_one_size_are_a_fork(
    sqlite_log: tuple[SqliteAuditStore, list[AuditRecord]], signer: CheckpointSigner
) -> None:
    store, _ = sqlite_log
    store.add_checkpoint(signer.sign(store.log_id, 20, leaf_hash(b"another history")))
    kinds = [p.kind for p in _public(store, signer).problems]
    assert kinds == [ProblemKind.FORKED]


def test_records_after_the_last_checkpoint_are_reported_uncovered(
    sqlite_log: tuple[SqliteAuditStore, list[AuditRecord]], signer: CheckpointSigner
) -> None:
    store, _ = sqlite_log
    store.append(raw_events(3))
    report = _public(store, signer)
    assert report.ok
    assert "leaves 40..42 are not covered" in report.notes[-1]


@pytest.fixture
def opensearch_log(
    opensearch_client: tuple[OpenSearch, str], signer: CheckpointSigner
) -> tuple[OpenSearchAuditStore, list[AuditRecord], OpenSearch, str]:
    client, prefix = opensearch_client
    store = OpenSearchAuditStore(client, index_prefix=prefix, refresh=True)
    return store, _fill(store, signer), client, f"{prefix}-records"


def test_opensearch_tampering_is_named_too(
    opensearch_log: tuple[OpenSearchAuditStore, list[AuditRecord], OpenSearch, str],
    signer: CheckpointSigner,
) -> None:
    import base64

    store, records, client, index = opensearch_log
    assert _sealed(store, signer).ok
    forged = _flip_byte(records[21].raw or b"")
    client.update(
        index=index,
        id=records[21].event_id,
        body={"doc": {"event": base64.b64encode(forged).decode()}},
        refresh=True,
    )
    first = _public(store, signer).first_problem
    assert first is not None
    assert (first.kind, first.leaf_index) == (ProblemKind.CONTENT_CHANGED, 21)

    client.update(
        index=index,
        id=records[21].event_id,
        body={"doc": {"leaf_hash": leaf_hash(forged).hex()}},
        refresh=True,
    )
    first = _sealed(store, signer).first_problem
    assert first is not None
    assert (first.kind, first.leaf_index, first.event_id) == (
        ProblemKind.SEAL_MISMATCH,
        21,
        records[21].event_id,
    )
    first = _public(store, signer).first_problem
    assert first is not None
    assert (first.kind, first.leaf_index, first.end_index) == (ProblemKind.ROOT_MISMATCH, 20, 25)

    doc = client.get(index=index, id=records[33].event_id)["_source"]
    client.index(index=index, id="forged-event", body={**doc, "event_id": "forged-event"})
    client.indices.refresh(index=index)
    kinds = {p.kind: p.leaf_index for p in _public(store, signer).problems}
    assert kinds[ProblemKind.DUPLICATE_INDEX] == 33

    client.delete(index=index, id="forged-event", refresh=True)
    client.delete(index=index, id=records[30].event_id, refresh=True)
    kinds = {p.kind: p.leaf_index for p in _public(store, signer).problems}
    assert kinds[ProblemKind.MISSING] == 30


def test_a_rotated_key_is_told_apart_from_forged_seals(tmp_path: Path) -> None:
    old, new = CheckpointSigner.generate(), CheckpointSigner.generate()
    store = SqliteAuditStore(tmp_path / "audit.sqlite")
    for signer in (old, new):
        log = AuditLog(store, signer)
        log.append(raw_events(5))
        log.checkpoint()
    both = CheckpointVerifier([old.public_key, new.public_key])
    report = verify_store(store, both, sealer=new.sealer(store.log_id))
    assert report.ok, report.problems
    assert report.seals_checked == 5
    assert f"sealed by other keys were not seal-checked: {old.key_id} (5)" in report.notes[0]

    _db(store).execute(
        "UPDATE records SET seal = ? WHERE leaf_index = 7", (bytes.fromhex(new.key_id) + b"x" * 32,)
    )
    report = verify_store(store, both, sealer=new.sealer(store.log_id))
    assert [(p.kind, p.leaf_index) for p in report.problems] == [(ProblemKind.SEAL_MISMATCH, 7)]
