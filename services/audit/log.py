"""The audit log: a store, its Merkle tree in memory, and the key that signs its checkpoints.

This is what the audit service builds on: the consumer calls :meth:`AuditLog.append` then
commits its offsets, a timer calls :meth:`AuditLog.checkpoint`, the query API reads
``log.store`` and hands out proofs. Every method is synchronous and thread-safe; from asyncio
use :func:`asyncio.to_thread`.

Opening a log loads every stored leaf hash (about 64 bytes of memory per record) and refuses
to go on when the store no longer matches its own latest signed checkpoint, so the service
never signs over a tampered log; ``meshllm audit verify`` then says what changed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence

from services.audit.checkpoint import Checkpoint, CheckpointSigner
from services.audit.merkle import MerkleTree, ProofError
from services.audit.proofs import ConsistencyProof, InclusionProof, RecordProof
from services.audit.records import AppendResult, ParsedEvent
from services.audit.store import AppendInput, AuditStore, parse_all

DAY_NS = 86_400 * 1_000_000_000


class LogIntegrityError(RuntimeError):
    """The stored log contradicts itself or its latest signed checkpoint."""


class AuditLog:
    """Appends, checkpoints and proofs over one :class:`AuditStore`."""

    def __init__(self, store: AuditStore, signer: CheckpointSigner, *, check: bool = True) -> None:
        """Load the tree from ``store``.

        Raises:
            LogIntegrityError: (``check``) a leaf index is missing, or the store is smaller
                than, or has another root than, its latest checkpoint signed by this key.
        """
        self.store = store
        self.signer = signer
        self.log_id = store.log_id
        self._seal = signer.sealer(store.log_id)
        self._lock = threading.RLock()
        self._tree = MerkleTree()
        self._latest: Checkpoint | None = None
        self.reload(check=check)

    def reload(self, *, check: bool = True) -> None:
        """Re-read every leaf hash from the store (after another writer appended)."""
        with self._lock:
            tree = MerkleTree()
            for index, value in self.store.leaf_hashes():
                if index != tree.size:
                    if check:
                        raise LogIntegrityError(
                            f"audit log {self.log_id}: leaf {tree.size} is missing or stored "
                            f"twice (the next stored leaf is {index}); run `meshllm audit verify`"
                        )
                    break
                tree.append(value)
            latest = self.store.latest_checkpoint()
            if check and latest is not None:
                self._check_against(tree, latest)
            self._tree, self._latest = tree, latest

    def _check_against(self, tree: MerkleTree, latest: Checkpoint) -> None:
        if latest.key_id == self.signer.key_id:
            self.signer.verifier().verify(latest)
        if latest.tree_size > tree.size:
            raise LogIntegrityError(
                f"audit log {self.log_id} has {tree.size} records but its checkpoint signed "
                f"{latest.tree_size}: it was truncated; run `meshllm audit verify`"
            )
        if tree.root(latest.tree_size) != latest.root_hash:
            raise LogIntegrityError(
                f"audit log {self.log_id}: the records up to {latest.tree_size} no longer have "
                "the root their checkpoint signed; run `meshllm audit verify`"
            )

    @property
    def size(self) -> int:
        with self._lock:
            return self._tree.size

    def root(self, tree_size: int | None = None) -> bytes:
        with self._lock:
            return self._tree.root(tree_size)

    def append(self, events: Sequence[AppendInput]) -> list[AppendResult]:
        """Store a batch (all or nothing) and add its new records to the tree.

        Raises:
            InvalidAuditEvent: an event is not storable; nothing was written.
        """
        parsed: list[ParsedEvent] = parse_all(events)
        hashes = {event.event_id: event.leaf_hash for event in parsed}
        with self._lock:
            results = self.store.append(parsed, seal=self._seal)
            created = sorted((r.leaf_index, r.event_id) for r in results if r.created)
            if created and created[0][0] != self._tree.size:
                self.reload()  # another writer appended meanwhile
                return results
            for index, event_id in created:
                if index != self._tree.size:
                    raise LogIntegrityError(f"the store skipped leaf {self._tree.size}")
                self._tree.append(hashes[event_id])
        return results

    def checkpoint(self, *, timestamp_ns: int | None = None) -> Checkpoint | None:
        """Sign and keep the current tree head, unless the latest checkpoint already has this
        size (or the log is empty). Returns the new checkpoint, or None."""
        with self._lock:
            size = self._tree.size
            if size == 0 or (self._latest is not None and self._latest.tree_size == size):
                return None
            checkpoint = self.signer.sign(self.log_id, size, self._tree.root(), timestamp_ns)
            self.store.add_checkpoint(checkpoint)
            self._latest = checkpoint
            return checkpoint

    def latest_checkpoint(self) -> Checkpoint | None:
        with self._lock:
            return self._latest

    def inclusion_proof(self, leaf_index: int, tree_size: int | None = None) -> InclusionProof:
        """Raises:
        ProofError: the leaf is not in a tree of that size, or the size is beyond the log.
        """
        with self._lock:
            size = self._tree.size if tree_size is None else tree_size
            path = self._tree.inclusion_proof(leaf_index, size)
            return InclusionProof(leaf_index, size, self._tree.leaf(leaf_index), path)

    def consistency_proof(self, old_size: int, new_size: int | None = None) -> ConsistencyProof:
        """Raises:
        ProofError: ``old_size`` > ``new_size`` or ``new_size`` is beyond the log.
        """
        with self._lock:
            size = self._tree.size if new_size is None else new_size
            return ConsistencyProof(old_size, size, self._tree.consistency_proof(old_size, size))

    def record_proof(
        self,
        *,
        leaf_index: int | None = None,
        event_id: str | None = None,
        checkpoint: Checkpoint | None = None,
    ) -> RecordProof:
        """A self-contained proof of one record against ``checkpoint`` (default: the latest).

        Raises:
            ValueError: neither ``leaf_index`` nor ``event_id`` was given.
            KeyError: no such record.
            ProofError: no checkpoint covers the record yet (sign one first).
        """
        if event_id is not None:
            record = self.store.get_by_event_id(event_id)
        elif leaf_index is not None:
            record = self.store.get(leaf_index)
        else:
            raise ValueError("name the record: leaf_index or event_id")
        if record is None:
            raise KeyError(f"no audit record {event_id or leaf_index}")
        with self._lock:
            checkpoint = checkpoint or self._latest
            if checkpoint is None or checkpoint.tree_size <= record.leaf_index:
                raise ProofError(f"no signed checkpoint covers leaf {record.leaf_index} yet")
            proof = self.inclusion_proof(record.leaf_index, checkpoint.tree_size)
        return RecordProof(record.event_id, record.raw, checkpoint, proof)

    def apply_retention(
        self,
        retention_days: Mapping[str, int],
        default_days: int | None = None,
        *,
        now_ns: int | None = None,
    ) -> dict[str, int]:
        """Purge the content of records older than their tenant's retention.

        Returns:
            Records purged now, per tenant (tenants with none purged are left out).
        """
        now_ns = time.time_ns() if now_ns is None else now_ns
        purged: dict[str, int] = {}
        for tenant in self.store.tenants():
            days = retention_days.get(tenant, default_days)
            if days is None:
                continue
            count = self.store.purge(tenant, now_ns - days * DAY_NS, now_ns=now_ns)
            if count:
                purged[tenant] = count
        return purged
