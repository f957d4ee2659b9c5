"""Proofs as data: what the audit API hands out and an offline verifier checks.

Hashes travel as lowercase hex, event bytes as base64. A :class:`RecordProof` is
self-contained: with the log's public key alone, :func:`services.audit.verify.check_record_proof`
shows that the record's bytes are in the log the checkpoint signed.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

from services.audit.checkpoint import Checkpoint, CheckpointError


def _hashes(values: Any) -> list[bytes]:
    return [bytes.fromhex(value) for value in values]


@dataclass(frozen=True)
class InclusionProof:
    """The audit path of leaf ``leaf_index`` in the tree of ``tree_size`` leaves."""

    leaf_index: int
    tree_size: int
    leaf_hash: bytes
    path: list[bytes]

    def to_json(self) -> dict[str, Any]:
        return {
            "leaf_index": self.leaf_index,
            "tree_size": self.tree_size,
            "leaf_hash": self.leaf_hash.hex(),
            "path": [value.hex() for value in self.path],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> InclusionProof:
        return cls(
            int(data["leaf_index"]),
            int(data["tree_size"]),
            bytes.fromhex(data["leaf_hash"]),
            _hashes(data["path"]),
        )


@dataclass(frozen=True)
class ConsistencyProof:
    """The proof that the tree of ``old_size`` leaves is a prefix of the ``new_size`` one."""

    old_size: int
    new_size: int
    path: list[bytes]

    def to_json(self) -> dict[str, Any]:
        return {
            "old_size": self.old_size,
            "new_size": self.new_size,
            "path": [value.hex() for value in self.path],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ConsistencyProof:
        return cls(int(data["old_size"]), int(data["new_size"]), _hashes(data["path"]))


@dataclass(frozen=True)
class RecordProof:
    """A record's bytes (None once purged), a signed checkpoint and the path between them."""

    event_id: str
    event: bytes | None
    checkpoint: Checkpoint
    proof: InclusionProof

    def to_json(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id,
            "event": None if self.event is None else base64.b64encode(self.event).decode(),
            "checkpoint": self.checkpoint.to_json(),
            "inclusion": self.proof.to_json(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RecordProof:
        """Raises:
        CheckpointError: the data is not a record proof.
        """
        try:
            event = data["event"]
            return cls(
                event_id=str(data["event_id"]),
                event=None if event is None else base64.b64decode(event, validate=True),
                checkpoint=Checkpoint.from_json(data["checkpoint"]),
                proof=InclusionProof.from_json(data["inclusion"]),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(f"not a record proof: {error!r}") from None
