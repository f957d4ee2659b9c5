"""Offline verification of an audit store, one record, or two checkpoints.

What a whole-store check (:func:`verify_store`) names, and how narrowly:

- **a changed byte** in a record: its bytes no longer hash to its stored leaf hash: the exact
  record (``content-changed``).
- **a changed byte whose leaf hash was rewritten to match**: the record's seal (an HMAC over
  log id, leaf index and leaf hash, keyed from the signing key) no longer matches: the exact
  record (``seal-mismatch``) when the verifier holds the signing key. With only the public key,
  the signed roots differ from the first checkpoint after the change: the range between the
  last checkpoint that still matches and that one (``root-mismatch``).
- **a deleted record**: the leaf index sequence has a hole: the exact index and the events on
  either side (``missing``). Deleted and the rest renumbered to close the hole: seals fail from
  that leaf on (exact), else the roots (range), and the log is shorter than its last
  checkpoint (``truncated``) unless records were added.
- **two records reordered**: both seals fail (exact), else the roots (range; records whose
  append time runs backwards are named as the likely ones).
- **a truncated log**: fewer records than the largest signed checkpoint: the missing range
  (``truncated``).
- also: columns that disagree with the bytes they were copied from (``columns-changed``),
  content erased without a recorded retention run (``purge-unaccounted``), checkpoints with a
  bad signature, an unknown key or another log's id (``bad-checkpoint``), two valid
  checkpoints of one size with different roots (``forked``), and two records at one leaf index
  (``duplicate-index``, possible in OpenSearch, whose documents are keyed by event id).

Limits: records appended after the latest checkpoint are covered by no signed root (the report
says how many): a rewrite there is caught by its seal, but dropping them is not. An attacker
who deletes checkpoints too is caught only against checkpoints kept elsewhere (``trusted`` here,
``--checkpoint`` on the command line). One who holds the signing key can rewrite anything.

One module (~810 lines): every check of the offline verifier, which must name what
changed as narrowly as the data allows; the checks share the walk over the records.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from services.audit.checkpoint import Checkpoint, CheckpointError, CheckpointVerifier
from services.audit.merkle import (
    CompactRange,
    MerkleTree,
    ProofError,
    leaf_hash,
    verify_consistency,
    verify_inclusion,
)
from services.audit.proofs import ConsistencyProof, InclusionProof, RecordProof
from services.audit.records import AuditRecord, InvalidAuditEvent, PurgeRecord, Sealer, parse_event
from services.audit.store import AuditStore

_HINTS = 20
_KEY_ID_BYTES = 8
_COLUMNS = (
    "event_id",
    "request_id",
    "tenant",
    "api_key_id",
    "user",
    "model",
    "model_version",
    "kind",
    "occurred_at_ns",
)


class ProblemKind(StrEnum):
    CONTENT_CHANGED = "content-changed"
    UNDECODABLE = "undecodable"
    COLUMNS_CHANGED = "columns-changed"
    MISSING = "missing"
    DUPLICATE_INDEX = "duplicate-index"
    SEAL_MISMATCH = "seal-mismatch"
    UNSEALED = "unsealed"
    PURGE_UNACCOUNTED = "purge-unaccounted"
    ROOT_MISMATCH = "root-mismatch"
    TRUNCATED = "truncated"
    BAD_CHECKPOINT = "bad-checkpoint"
    FORKED = "forked"
    BAD_PROOF = "bad-proof"
    NOT_FOUND = "not-found"


# Problems of one record that change the tree, so they explain a later root mismatch.
_CHANGES_ROOT = frozenset(
    {
        ProblemKind.CONTENT_CHANGED,
        ProblemKind.UNDECODABLE,
        ProblemKind.MISSING,
        ProblemKind.DUPLICATE_INDEX,
        ProblemKind.SEAL_MISMATCH,
        ProblemKind.UNSEALED,
        ProblemKind.PURGE_UNACCOUNTED,
    }
)


@dataclass
class Problem:
    """One finding. ``leaf_index`` is the first leaf concerned; ``end_index`` (exclusive) is
    set when the finding is a range rather than one record."""

    kind: ProblemKind
    message: str
    leaf_index: int | None = None
    end_index: int | None = None
    event_id: str | None = None

    @property
    def exact(self) -> bool:
        """Whether it names one record (or one hole) rather than a range."""
        return self.leaf_index is not None and self.end_index is None

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": str(self.kind),
            "message": self.message,
            "leaf_index": self.leaf_index,
            "end_index": self.end_index,
            "event_id": self.event_id,
        }


def _first(problems: Sequence[Problem]) -> Problem | None:
    """The problem that comes first in the log; a record beats a range that starts with it."""
    if not problems:
        return None
    return min(
        problems,
        key=lambda p: (p.leaf_index is None, p.leaf_index or 0, not p.exact),
    )


@dataclass
class StoreReport:
    """The outcome of :func:`verify_store`."""

    log_id: str
    records: int = 0
    tree_size: int = 0
    purged: int = 0
    seals_checked: int = 0
    checkpoints: int = 0
    checkpoints_valid: int = 0
    checkpoints_matched: int = 0
    covered_size: int = 0
    root: bytes = b""
    problems: list[Problem] = field(default_factory=list)
    problems_left_out: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def first_problem(self) -> Problem | None:
        return _first(self.problems)

    def to_json(self) -> dict[str, Any]:
        first = self.first_problem
        return {
            "ok": self.ok,
            "log_id": self.log_id,
            "records": self.records,
            "tree_size": self.tree_size,
            "root_hash": self.root.hex(),
            "purged": self.purged,
            "seals_checked": self.seals_checked,
            "checkpoints": self.checkpoints,
            "checkpoints_valid": self.checkpoints_valid,
            "checkpoints_matched": self.checkpoints_matched,
            "covered_size": self.covered_size,
            "first_problem": None if first is None else first.to_json(),
            "problems": [problem.to_json() for problem in self.problems],
            "problems_left_out": self.problems_left_out,
            "notes": self.notes,
        }


class _StoreCheck:
    """One pass over the records, in leaf order, keeping O(log n) hashes."""

    def __init__(
        self,
        store: AuditStore,
        verifier: CheckpointVerifier | None,
        sealer: Sealer | None,
        trusted: Sequence[Checkpoint],
        max_problems: int,
    ) -> None:
        self.store = store
        self.verifier = verifier
        self.sealer = sealer
        self.max_problems = max_problems
        self.report = StoreReport(log_id=store.log_id)
        self.tree = CompactRange()
        self.signed: dict[int, set[bytes]] = {}
        self.sizes: list[int] = []
        self.next_size = 0
        self.broken_at: int | None = None
        self.last_matched = 0
        self.first_mismatch: int | None = None
        self.later_mismatches = 0
        self.inversions: list[tuple[AuditRecord, AuditRecord]] = []
        self.previous: AuditRecord | None = None
        self.purge_runs: dict[str, list[PurgeRecord]] = {}
        self.other_seal_keys: Counter[str] = Counter()
        self._load_checkpoints([*store.checkpoints(), *trusted])
        for run in store.purges():
            self.purge_runs.setdefault(run.tenant, []).append(run)

    def add(self, problem: Problem) -> None:
        if len(self.report.problems) >= self.max_problems:
            self.report.problems_left_out += 1
        else:
            self.report.problems.append(problem)

    def _load_checkpoints(self, checkpoints: Iterable[Checkpoint]) -> None:
        seen: set[Checkpoint] = set()
        for checkpoint in checkpoints:
            if checkpoint in seen:
                continue
            seen.add(checkpoint)
            self.report.checkpoints += 1
            if checkpoint.log_id != self.store.log_id:
                self.add(
                    Problem(
                        ProblemKind.BAD_CHECKPOINT,
                        f"checkpoint at size {checkpoint.tree_size} is for log "
                        f"{checkpoint.log_id}, not {self.store.log_id}",
                    )
                )
                continue
            if self.verifier is not None:
                try:
                    self.verifier.verify(checkpoint)
                except CheckpointError as error:
                    self.add(Problem(ProblemKind.BAD_CHECKPOINT, str(error)))
                    continue
            self.report.checkpoints_valid += 1
            self.signed.setdefault(checkpoint.tree_size, set()).add(checkpoint.root_hash)
        for size, roots in sorted(self.signed.items()):
            if len(roots) > 1:
                self.add(
                    Problem(
                        ProblemKind.FORKED,
                        f"{len(roots)} validly signed checkpoints of size {size} have different "
                        "roots: the log was forked, or the signing key was misused",
                        leaf_index=None,
                    )
                )
        self.sizes = sorted(self.signed)
        if self.verifier is None:
            self.report.notes.append("no public key given: checkpoint signatures not checked")
        if not self.sizes:
            self.report.notes.append(
                "no valid signed checkpoint: only each record's self-consistency was checked"
            )

    def run(self) -> StoreReport:
        expected = 0
        for record in self.store.records():
            self._check_checkpoints()
            if record.leaf_index < expected:
                self._duplicate(record)
                continue
            if record.leaf_index > expected:
                self._missing(expected, record)
                expected = record.leaf_index
            value = self._check_record(record)
            if self.broken_at is None:
                self.tree.append(value)
            self.report.records += 1
            self.previous = record
            expected += 1
        self._check_checkpoints()
        self._finish(expected)
        return self.report

    def _duplicate(self, record: AuditRecord) -> None:
        other = self.previous
        self.add(
            Problem(
                ProblemKind.DUPLICATE_INDEX,
                f"leaf {record.leaf_index} is stored twice: event {record.event_id} and event "
                f"{other.event_id if other else '?'}: a record was inserted or renumbered",
                leaf_index=record.leaf_index,
                event_id=record.event_id,
            )
        )
        if self.broken_at is None:
            self.broken_at = record.leaf_index

    def _missing(self, expected: int, record: AuditRecord) -> None:
        after = (
            f"after leaf {self.previous.leaf_index} (event {self.previous.event_id})"
            if self.previous
            else "at the start of the log"
        )
        count = record.leaf_index - expected
        what = (
            f"leaf {expected} is"
            if count == 1
            else f"leaves {expected}..{record.leaf_index - 1} are"
        )
        self.add(
            Problem(
                ProblemKind.MISSING,
                f"{what} missing (deleted): {after}, before leaf {record.leaf_index} "
                f"(event {record.event_id})",
                leaf_index=expected,
            )
        )
        if self.broken_at is None:
            self.broken_at = expected

    def _check_record(self, record: AuditRecord) -> bytes:
        """Check one record; return the leaf hash that goes into the recomputed tree."""
        index, event_id = record.leaf_index, record.event_id
        previous = self.previous
        inverted = previous is not None and record.appended_at_ns < previous.appended_at_ns
        if previous is not None and inverted and len(self.inversions) < _HINTS:
            self.inversions.append((previous, record))
        if self.sealer is not None:
            if record.seal is None:
                self.add(
                    Problem(
                        ProblemKind.UNSEALED,
                        f"leaf {index} (event {event_id}) carries no seal: written without "
                        "the log's key, or its seal was removed",
                        leaf_index=index,
                        event_id=event_id,
                    )
                )
            else:
                expected = self.sealer(index, record.leaf_hash)
                if record.seal[:_KEY_ID_BYTES] != expected[:_KEY_ID_BYTES]:
                    self.other_seal_keys[record.seal[:_KEY_ID_BYTES].hex()] += 1
                elif record.seal != expected:
                    self._seal_mismatch(record)
                else:
                    self.report.seals_checked += 1
        if record.raw is None:
            self.report.purged += 1
            self._check_purge(record)
            return record.leaf_hash
        value = leaf_hash(record.raw)
        if value != record.leaf_hash:
            self.add(
                Problem(
                    ProblemKind.CONTENT_CHANGED,
                    f"leaf {index} (event {event_id}): the stored bytes no longer hash to the "
                    "stored leaf hash: its content was changed",
                    leaf_index=index,
                    event_id=event_id,
                )
            )
        try:
            parsed = parse_event(record.raw)
        except InvalidAuditEvent as error:
            self.add(
                Problem(
                    ProblemKind.UNDECODABLE,
                    f"leaf {index} (event {event_id}): the stored bytes are not a valid "
                    f"AuditEvent ({error})",
                    leaf_index=index,
                    event_id=event_id,
                )
            )
            return value
        differing = [name for name in _COLUMNS if getattr(parsed, name) != getattr(record, name)]
        if differing:
            self.add(
                Problem(
                    ProblemKind.COLUMNS_CHANGED,
                    f"leaf {index} (event {event_id}): column(s) {', '.join(differing)} differ "
                    "from the stored event they were copied from",
                    leaf_index=index,
                    event_id=event_id,
                )
            )
        return value

    def _seal_mismatch(self, record: AuditRecord) -> None:
        last = self.report.problems[-1] if self.report.problems else None
        index = record.leaf_index
        if (
            last is not None
            and last.kind is ProblemKind.SEAL_MISMATCH
            and last.leaf_index is not None
            and (last.end_index or last.leaf_index + 1) == index
        ):
            last.end_index = index + 1
            last.message = (
                f"leaves {last.leaf_index}..{index}: from leaf {last.leaf_index} (event "
                f"{last.event_id}) to leaf {index} (event {record.event_id}) no record is the "
                "one sealed at its position: they were rewritten, reordered, or renumbered "
                "after a record before them was removed"
            )
            return
        self.add(
            Problem(
                ProblemKind.SEAL_MISMATCH,
                f"leaf {index} (event {record.event_id}) is not the record sealed at this "
                "position: its leaf hash was rewritten, or it was moved here",
                leaf_index=index,
                event_id=record.event_id,
            )
        )

    def _check_purge(self, record: AuditRecord) -> None:
        runs = self.purge_runs.get(record.tenant, [])
        if not any(run.before_ns > record.occurred_at_ns for run in runs):
            self.add(
                Problem(
                    ProblemKind.PURGE_UNACCOUNTED,
                    f"leaf {record.leaf_index} (event {record.event_id}): its content is gone "
                    f"but no retention run of tenant {record.tenant!r} covers it",
                    leaf_index=record.leaf_index,
                    event_id=record.event_id,
                )
            )

    def _check_checkpoints(self) -> None:
        """Compare the recomputed root with every signed root of the current size."""
        size = self.tree.size
        while self.next_size < len(self.sizes) and self.sizes[self.next_size] <= size:
            signed_size = self.sizes[self.next_size]
            self.next_size += 1
            if self.broken_at is not None or signed_size != size:
                continue
            if self.tree.root() in self.signed[size]:
                self.report.checkpoints_matched += 1
                if self.first_mismatch is None:
                    self.last_matched = size
                    self.inversions.clear()
            elif self.first_mismatch is None:
                self.first_mismatch = size
                self._root_mismatch(self.last_matched, size)
            else:
                self.later_mismatches += 1

    def _root_mismatch(self, start: int, end: int) -> None:
        explained = [
            p
            for p in self.report.problems
            if p.kind in _CHANGES_ROOT and p.leaf_index is not None and start <= p.leaf_index < end
        ]
        if explained:
            explained[0].message += f"; the signed root at size {end} differs accordingly"
            return
        message = (
            f"the signed root at size {end} differs from the recomputed one while the one at "
            f"size {start} matches: a record in leaves {start}..{end - 1} was changed together "
            "with its leaf hash, reordered, inserted or removed"
        )
        likely = [pair for pair in self.inversions if start <= pair[1].leaf_index < end]
        if likely:
            names = "; ".join(
                f"leaf {a.leaf_index} (event {a.event_id}) or leaf {b.leaf_index} "
                f"(event {b.event_id})"
                for a, b in likely
            )
            message += f"; append times run backwards, so likely moved: {names}"
        if self.sealer is None:
            message += "; verify with the signing key to name the exact record (seals)"
        self.add(Problem(ProblemKind.ROOT_MISMATCH, message, leaf_index=start, end_index=end))

    def _finish(self, size: int) -> None:
        report = self.report
        report.tree_size = size
        report.root = self.tree.root() if self.broken_at is None else b""
        report.covered_size = self.last_matched
        beyond = [s for s in self.sizes if s > size]
        if beyond and self.broken_at is None:
            largest = max(beyond)
            report.problems.append(
                Problem(
                    ProblemKind.TRUNCATED,
                    f"the log has {size} records but a checkpoint signed {largest}: leaves "
                    f"{size}..{largest - 1} were removed (truncated)",
                    leaf_index=size,
                    end_index=largest,
                )
            )
        unchecked = len(
            [s for s in self.sizes if self.broken_at is not None and s > self.broken_at]
        )
        if unchecked:
            report.notes.append(
                f"{unchecked} checkpoint(s) past leaf {self.broken_at} not compared: records "
                "are missing there"
            )
        if self.later_mismatches:
            report.notes.append(
                f"{self.later_mismatches} later checkpoint(s) also differ (expected: a change "
                "alters every later root)"
            )
        signed_max = max(self.sizes, default=0)
        if size > signed_max:
            report.notes.append(
                f"leaves {signed_max}..{size - 1} are not covered by a signed checkpoint yet"
            )
        if self.other_seal_keys:
            keys = ", ".join(f"{key} ({n})" for key, n in self.other_seal_keys.most_common())
            report.notes.append(
                f"records sealed by other keys were not seal-checked: {keys}; give that key "
                "(--signing-key) if it was rotated out, else these seals are forged"
            )
        if report.problems_left_out:
            report.notes.append(f"{report.problems_left_out} more problem(s) not listed")


def verify_store(
    store: AuditStore,
    verifier: CheckpointVerifier | None,
    *,
    sealer: Sealer | None = None,
    trusted: Sequence[Checkpoint] = (),
    max_problems: int = 100,
) -> StoreReport:
    """Check every record and every signed checkpoint of ``store`` in one pass.

    Args:
        verifier: the trusted public keys; None skips signature checks (and says so).
        sealer: the log's seal function (from the signing key), to name exact records.
        trusted: checkpoints kept outside the store (exported earlier), checked too.
        max_problems: how many problems to list (the rest are counted).
    """
    return _StoreCheck(store, verifier, sealer, trusted, max_problems).run()


@dataclass
class ProofReport:
    """The outcome of a record or consistency check."""

    ok: bool
    problems: list[Problem]
    checkpoints: list[Checkpoint]
    inclusion: InclusionProof | None = None
    consistency: ConsistencyProof | None = None
    record: AuditRecord | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def first_problem(self) -> Problem | None:
        return _first(self.problems)

    def to_json(self) -> dict[str, Any]:
        first = self.first_problem
        return {
            "ok": self.ok,
            "first_problem": None if first is None else first.to_json(),
            "problems": [problem.to_json() for problem in self.problems],
            "checkpoints": [checkpoint.to_json() for checkpoint in self.checkpoints],
            "inclusion": None if self.inclusion is None else self.inclusion.to_json(),
            "consistency": None if self.consistency is None else self.consistency.to_json(),
            "record": None if self.record is None else self.record.to_json(),
            "notes": self.notes,
        }


def _tree(store: AuditStore, size: int) -> tuple[MerkleTree, Problem | None]:
    """The tree of the store's first ``size`` stored leaf hashes, or where that fails."""
    tree = MerkleTree()
    for index, value in store.leaf_hashes():
        if tree.size == size:
            break
        if index != tree.size:
            return tree, Problem(
                ProblemKind.MISSING,
                f"leaf {tree.size} is missing (deleted); run a whole-store verify",
                leaf_index=tree.size,
            )
        tree.append(value)
    if tree.size < size:
        return tree, Problem(
            ProblemKind.TRUNCATED,
            f"the log has {tree.size} records but the checkpoint signed {size}: leaves "
            f"{tree.size}..{size - 1} were removed (truncated)",
            leaf_index=tree.size,
            end_index=size,
        )
    return tree, None


def _find_checkpoint(
    store: AuditStore, trusted: Sequence[Checkpoint], size: int | None, above: int = -1
) -> Checkpoint | None:
    candidates = [*store.checkpoints(), *trusted]
    candidates = [c for c in candidates if c.log_id == store.log_id and c.tree_size > above]
    if size is not None:
        candidates = [c for c in candidates if c.tree_size == size]
    return max(candidates, key=lambda c: (c.tree_size, c.timestamp_ns), default=None)


def _signature_problem(
    verifier: CheckpointVerifier | None, checkpoint: Checkpoint
) -> Problem | None:
    if verifier is None:
        return None
    try:
        verifier.verify(checkpoint)
    except CheckpointError as error:
        return Problem(ProblemKind.BAD_CHECKPOINT, str(error))
    return None


def verify_record(
    store: AuditStore,
    verifier: CheckpointVerifier | None,
    *,
    leaf_index: int | None = None,
    event_id: str | None = None,
    tree_size: int | None = None,
    trusted: Sequence[Checkpoint] = (),
) -> ProofReport:
    """Prove one record is in the log a checkpoint signed (default: the latest checkpoint).

    The record's leaf hash is recomputed from its bytes (its stored hash once purged); the
    audit path comes from the store's other leaf hashes.
    """
    if event_id is not None:
        record = store.get_by_event_id(event_id)
    elif leaf_index is not None:
        record = store.get(leaf_index)
    else:
        raise ValueError("name the record: leaf_index or event_id")
    if record is None:
        name = f"event {event_id}" if event_id is not None else f"leaf {leaf_index}"
        problem = Problem(ProblemKind.NOT_FOUND, f"no record {name} in the store", leaf_index)
        return ProofReport(False, [problem], [])
    index = record.leaf_index
    checkpoint = _find_checkpoint(store, trusted, tree_size, above=index)
    if checkpoint is None:
        what = f"of size {tree_size}" if tree_size is not None else "yet"
        problem = Problem(
            ProblemKind.NOT_FOUND,
            f"no checkpoint {what} covers leaf {index} (event {record.event_id})",
            index,
            event_id=record.event_id,
        )
        return ProofReport(False, [problem], [], record=record)
    problems: list[Problem] = []
    notes: list[str] = []
    if bad := _signature_problem(verifier, checkpoint):
        problems.append(bad)
    if record.raw is None:
        value = record.leaf_hash
        notes.append("the record's content was purged: its stored leaf hash is proven")
    else:
        value = leaf_hash(record.raw)
        if value != record.leaf_hash:
            problems.append(
                Problem(
                    ProblemKind.CONTENT_CHANGED,
                    f"leaf {index} (event {record.event_id}): the stored bytes no longer hash "
                    "to the stored leaf hash: its content was changed",
                    index,
                    event_id=record.event_id,
                )
            )
    tree, broken = _tree(store, checkpoint.tree_size)
    if broken is not None:
        problems.append(broken)
        return ProofReport(False, problems, [checkpoint], record=record, notes=notes)
    path = tree.inclusion_proof(index, checkpoint.tree_size)
    proof = InclusionProof(index, checkpoint.tree_size, value, path)
    reached = verify_inclusion(value, index, checkpoint.tree_size, path, checkpoint.root_hash)
    if not reached and tree_size is None:
        notes += _earlier_proof(
            store, tree, trusted, index=index, value=value, failed_size=checkpoint.tree_size
        )
    if not reached and not problems:
        problems.append(
            Problem(
                ProblemKind.BAD_PROOF,
                f"the inclusion proof of leaf {index} (event {record.event_id}) does not "
                f"lead to the root signed at size {checkpoint.tree_size}: a record in "
                f"leaves 0..{checkpoint.tree_size - 1} differs from what was signed; run a "
                "whole-store verify to find it",
                0,
                end_index=checkpoint.tree_size,
            )
        )
    return ProofReport(
        not problems, problems, [checkpoint], inclusion=proof, record=record, notes=notes
    )


def _earlier_proof(
    store: AuditStore,
    tree: MerkleTree,
    trusted: Sequence[Checkpoint],
    *,
    index: int,
    value: bytes,
    failed_size: int,
) -> list[str]:
    """When the latest checkpoint fails, whether an earlier one still proves the record."""
    for checkpoint in sorted({*store.checkpoints(), *trusted}, key=lambda c: c.tree_size):
        size = checkpoint.tree_size
        if not index < size < failed_size or checkpoint.log_id != store.log_id:
            continue
        path = tree.inclusion_proof(index, size)
        if verify_inclusion(value, index, size, path, checkpoint.root_hash):
            return [
                f"leaf {index} itself is proven by the checkpoint at size {size}: what changed "
                "is elsewhere in the log"
            ]
    return []


def verify_checkpoints(
    store: AuditStore,
    verifier: CheckpointVerifier | None,
    old_size: int,
    new_size: int,
    *,
    trusted: Sequence[Checkpoint] = (),
) -> ProofReport:
    """Prove the checkpoint of ``old_size`` is a prefix of the one of ``new_size``, with a
    consistency proof built from the store's leaf hashes."""
    if old_size > new_size:
        old_size, new_size = new_size, old_size
    old = _find_checkpoint(store, trusted, old_size)
    new = _find_checkpoint(store, trusted, new_size)
    missing = [size for size, found in ((old_size, old), (new_size, new)) if found is None]
    if old is None or new is None:
        problem = Problem(
            ProblemKind.NOT_FOUND,
            f"no checkpoint of size {', '.join(map(str, missing))} in the store",
        )
        return ProofReport(False, [problem], [c for c in (old, new) if c is not None])
    problems = [p for p in (_signature_problem(verifier, c) for c in (old, new)) if p]
    tree, broken = _tree(store, new.tree_size)
    if broken is not None:
        return ProofReport(False, [*problems, broken], [old, new])
    path = tree.consistency_proof(old.tree_size, new.tree_size)
    proof = ConsistencyProof(old.tree_size, new.tree_size, path)
    if not verify_consistency(old.tree_size, new.tree_size, old.root_hash, new.root_hash, path):
        for checkpoint in (old, new):
            if tree.root(checkpoint.tree_size) != checkpoint.root_hash:
                problems.append(
                    Problem(
                        ProblemKind.ROOT_MISMATCH,
                        f"the store's leaves 0..{checkpoint.tree_size - 1} no longer have the "
                        f"root signed at size {checkpoint.tree_size}; run a whole-store verify "
                        "to find the record",
                        0,
                        end_index=checkpoint.tree_size,
                    )
                )
                break
    return ProofReport(not problems, problems, [old, new], consistency=proof)


def check_record_proof(bundle: RecordProof, verifier: CheckpointVerifier) -> ProofReport:
    """Check a record proof from the audit API with only the public key (no store)."""
    checkpoint, proof = bundle.checkpoint, bundle.proof
    problems: list[Problem] = []
    if bad := _signature_problem(verifier, checkpoint):
        problems.append(bad)
    if proof.tree_size != checkpoint.tree_size:
        problems.append(
            Problem(
                ProblemKind.BAD_PROOF,
                f"the proof is for size {proof.tree_size}, the checkpoint for "
                f"{checkpoint.tree_size}",
            )
        )
    value = proof.leaf_hash
    if bundle.event is not None:
        value = leaf_hash(bundle.event)
        if value != proof.leaf_hash:
            problems.append(
                Problem(
                    ProblemKind.CONTENT_CHANGED,
                    f"event {bundle.event_id}: its bytes do not hash to the proven leaf hash",
                    proof.leaf_index,
                    event_id=bundle.event_id,
                )
            )
        else:
            try:
                if parse_event(bundle.event).event_id != bundle.event_id:
                    problems.append(
                        Problem(
                            ProblemKind.COLUMNS_CHANGED,
                            f"the bytes are not event {bundle.event_id}",
                            proof.leaf_index,
                        )
                    )
            except InvalidAuditEvent as error:
                problems.append(Problem(ProblemKind.UNDECODABLE, str(error), proof.leaf_index))
    try:
        reached = verify_inclusion(
            value, proof.leaf_index, checkpoint.tree_size, proof.path, checkpoint.root_hash
        )
    except ProofError:
        reached = False
    if not reached:
        problems.append(
            Problem(
                ProblemKind.BAD_PROOF,
                f"the inclusion proof of leaf {proof.leaf_index} does not lead to the signed root",
                proof.leaf_index,
                event_id=bundle.event_id,
            )
        )
    notes = [] if bundle.event is not None else ["content purged: only the leaf hash is proven"]
    return ProofReport(not problems, problems, [checkpoint], inclusion=proof, notes=notes)
