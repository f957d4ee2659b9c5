"""The audit log: appends feed the tree, checkpoints sign it, proofs verify, retention purges."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.audit.checkpoint import CheckpointSigner, CheckpointVerifier
from services.audit.log import DAY_NS, AuditLog, LogIntegrityError
from services.audit.merkle import ProofError, leaf_hash, verify_consistency, verify_inclusion
from services.audit.proofs import RecordProof
from services.audit.sqlite_store import SqliteAuditStore
from services.audit.store import AuditStore
from services.audit.verify import ProblemKind, check_record_proof, verify_store
from tests.audit.conftest import StoreFactory
from tests.audit.helpers import T0, audit_event, raw_events


def test_appends_checkpoints_and_proofs(store: AuditStore, signer: CheckpointSigner) -> None:
    log = AuditLog(store, signer)
    assert log.checkpoint() is None  # nothing to sign yet
    log.append(raw_events(5))
    first = log.checkpoint()
    assert first is not None
    assert log.checkpoint() is None  # nothing new
    log.append(raw_events(8))
    second = log.checkpoint(timestamp_ns=T0)
    assert second is not None
    assert (first.tree_size, second.tree_size, second.timestamp_ns) == (5, 13, T0)
    assert store.checkpoints() == [first, second]
    signer.verifier().verify(second)

    for index in range(13):
        proof = log.inclusion_proof(index, 13)
        assert verify_inclusion(proof.leaf_hash, index, 13, proof.path, second.root_hash)
    proof = log.consistency_proof(5, 13)
    assert verify_consistency(5, 13, first.root_hash, second.root_hash, proof.path)
    with pytest.raises(ProofError):
        log.inclusion_proof(13)

    reopened = AuditLog(store, signer)
    assert (reopened.size, reopened.root()) == (13, second.root_hash)
    assert reopened.latest_checkpoint() == second


def test_a_record_proof_verifies_offline_with_the_public_key_only(
    store: AuditStore, signer: CheckpointSigner
) -> None:
    log = AuditLog(store, signer)
    event = audit_event(text="prove me")
    log.append([*raw_events(6), event, *raw_events(3)])
    with pytest.raises(ProofError, match="no signed checkpoint"):
        log.record_proof(leaf_index=6)
    log.checkpoint()
    bundle = log.record_proof(event_id=event.envelope.event_id)
    assert bundle.proof.leaf_index == 6
    shipped = RecordProof.from_json(json.loads(json.dumps(bundle.to_json())))
    verifier = CheckpointVerifier.from_pem(signer.public_key_pem())
    assert check_record_proof(shipped, verifier).ok

    forged = RecordProof(
        bundle.event_id, bundle.event.replace(b"prove me", b"prove it"),  # type: ignore[union-attr]
        bundle.checkpoint, bundle.proof,
    )  # fmt: skip
    report = check_record_proof(forged, verifier)
    assert [p.kind for p in report.problems][:1] == [ProblemKind.CONTENT_CHANGED]
    with pytest.raises(KeyError):
        log.record_proof(leaf_index=99)


def test_retention_purges_old_content_and_the_log_still_verifies(
    store: AuditStore, signer: CheckpointSigner
) -> None:
    log = AuditLog(store, signer)
    now = T0 + 100 * DAY_NS
    old = [audit_event(tenant=t, occurred_at_ns=T0) for t in ("acme", "globex", "initech")]
    new = [audit_event(tenant=t, occurred_at_ns=now - DAY_NS) for t in ("acme", "globex")]
    log.append([*old, *new])
    log.checkpoint()
    purged = log.apply_retention({"acme": 30, "globex": 365}, default_days=50, now_ns=now)
    assert purged == {"acme": 1, "initech": 1}
    assert [r.leaf_index for r in store.records() if r.purged] == [0, 2]

    report = verify_store(store, signer.verifier(), sealer=signer.sealer(store.log_id))
    assert report.ok, report.problems
    assert report.purged == 2
    bundle = log.record_proof(leaf_index=0)
    assert bundle.event is None
    result = check_record_proof(bundle, signer.verifier())
    assert result.ok
    assert "purged" in result.notes[0]
    assert AuditLog(store, signer).root() == log.root()


def test_opening_a_tampered_log_is_refused(tmp_path: Path, signer: CheckpointSigner) -> None:
    store = SqliteAuditStore(tmp_path / "audit.sqlite")
    log = AuditLog(store, signer)
    log.append(raw_events(4))
    log.checkpoint()
    store._db.execute(  # an attacker rewrites a leaf hash
        "UPDATE records SET leaf_hash = ? WHERE leaf_index = 1", (leaf_hash(b"forged"),)
    )
    with pytest.raises(LogIntegrityError, match="no longer have the root"):
        AuditLog(store, signer)
    store._db.execute("DELETE FROM records WHERE leaf_index = 3")
    with pytest.raises(LogIntegrityError, match="truncated"):
        AuditLog(store, signer)
    store._db.execute("DELETE FROM records WHERE leaf_index = 1")
    with pytest.raises(LogIntegrityError, match="leaf 1 is missing"):
        AuditLog(store, signer)


def test_a_log_follows_another_writer(sqlite_factory: StoreFactory) -> None:
    signer = CheckpointSigner.generate()
    mine, theirs = AuditLog(sqlite_factory(), signer), AuditLog(sqlite_factory(), signer)
    mine.append(raw_events(2))
    theirs.append(raw_events(3))  # indices 2..4, unknown to `mine`
    mine.append(raw_events(1))
    assert mine.size == 6
    assert mine.root() == AuditLog(sqlite_factory(), signer).root()
