"""The append-only audit store: what both back ends promise, and how to open the configured one.

Back ends: :class:`~services.audit.sqlite_store.SqliteAuditStore` (embedded mode, a SQLite file
under the data directory) and :class:`~services.audit.opensearch_store.OpenSearchAuditStore`
(cluster mode). Both pass the same contract tests (``tests/audit/test_store_contract.py``).

Leaf indices are contiguous from 0 in append order; an event id is stored once (a redelivery
gets the existing index back). Methods are synchronous and thread-safe; from asyncio, call
them with :func:`asyncio.to_thread`. ``append`` returns only once the batch is durable, so the
caller may commit its Kafka offsets after it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from services.audit.checkpoint import Checkpoint
from services.audit.records import (
    AppendResult,
    AuditQuery,
    AuditRecord,
    Page,
    ParsedEvent,
    PurgeRecord,
    Sealer,
    parse_event,
)
from shared.events.v1 import events_pb2 as ev

if TYPE_CHECKING:
    from services.audit.settings import AuditSettings

AppendInput = bytes | ev.AuditEvent | ParsedEvent


class StoreError(RuntimeError):
    """The store cannot do what was asked (missing, unreachable, or in an impossible state)."""


class ConcurrentWriterError(StoreError):
    """Another writer appended to the same log at the same time (see the back end's notes)."""


def parse_all(events: Sequence[AppendInput]) -> list[ParsedEvent]:
    """Parse a batch before any write, so one bad event fails the batch and changes nothing.

    Raises:
        InvalidAuditEvent: naming the batch position and why.
    """
    parsed = []
    for position, event in enumerate(events):
        if isinstance(event, ParsedEvent):
            parsed.append(event)
            continue
        try:
            parsed.append(parse_event(event))
        except ValueError as error:
            raise type(error)(f"batch position {position}: {error}") from None
    return parsed


class AuditStore(ABC):
    """An append-only log of audit records with signed checkpoints and per-tenant retention."""

    log_id: str
    """This log's identity, bound into every checkpoint (so one log's checkpoints cannot vouch
    for another's records)."""

    @abstractmethod
    def append(
        self, events: Sequence[AppendInput], *, seal: Sealer | None = None
    ) -> list[AppendResult]:
        """Append a batch, all or nothing; one result per input, in order.

        ``seal`` (from :meth:`CheckpointSigner.sealer`) tags each new record with its position.

        Raises:
            InvalidAuditEvent: an event is not storable (nothing was written).
        """

    @abstractmethod
    def size(self) -> int:
        """The next leaf index: the tree size when no record is missing."""

    @abstractmethod
    def leaf_hashes(self, start: int = 0) -> Iterator[tuple[int, bytes]]:
        """``(leaf_index, stored leaf hash)`` from ``start``, in index order."""

    @abstractmethod
    def records(self, start: int = 0, end: int | None = None) -> Iterator[AuditRecord]:
        """Every stored record with ``start <= leaf_index < end``, in index order."""

    @abstractmethod
    def get(self, leaf_index: int) -> AuditRecord | None: ...

    @abstractmethod
    def get_by_event_id(self, event_id: str) -> AuditRecord | None: ...

    @abstractmethod
    def query(self, query: AuditQuery) -> Page:
        """Records matching ``query``, a page at a time, in leaf-index order."""

    @abstractmethod
    def add_checkpoint(self, checkpoint: Checkpoint) -> None:
        """Keep a signed checkpoint (the caller signed it; the store does not check it)."""

    @abstractmethod
    def checkpoints(self) -> list[Checkpoint]:
        """Every kept checkpoint, by tree size then time."""

    def latest_checkpoint(self) -> Checkpoint | None:
        """The checkpoint of the largest tree (the latest one of that size)."""
        found = self.checkpoints()
        return found[-1] if found else None

    def checkpoint_at(self, tree_size: int) -> Checkpoint | None:
        """The latest checkpoint of exactly ``tree_size`` records."""
        found = [c for c in self.checkpoints() if c.tree_size == tree_size]
        return found[-1] if found else None

    @abstractmethod
    def tenants(self) -> list[str]:
        """Every tenant with at least one record."""

    @abstractmethod
    def purge(self, tenant: str, before_ns: int, *, now_ns: int | None = None) -> int:
        """Erase the content of ``tenant``'s records that occurred before ``before_ns``.

        The event bytes and the identifying columns (request id, API key id, user) are
        erased; the leaf index, event id, tenant, kind, model, times and the leaf hash stay,
        so the tree stays verifiable. The run is recorded (:meth:`purges`). Returns how many
        records were purged now.
        """

    @abstractmethod
    def purges(self) -> list[PurgeRecord]:
        """Every recorded retention run, oldest first."""

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> AuditStore:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def open_store(settings: AuditSettings, *, read_only: bool = False) -> AuditStore:
    """The store the settings name (SQLite in embedded mode, OpenSearch in cluster mode).

    ``read_only`` opens an existing store without creating anything (for verification).

    Raises:
        StoreError: the store does not exist (read-only) or cannot be reached.
    """
    if settings.store_kind == "sqlite":
        from services.audit.sqlite_store import SqliteAuditStore

        return SqliteAuditStore(settings.db_path, read_only=read_only)
    from services.audit.opensearch_store import OpenSearchAuditStore

    return OpenSearchAuditStore.connect(
        settings.opensearch.hosts,
        index_prefix=settings.opensearch.index_prefix,
        username=settings.opensearch.username,
        password=(
            settings.opensearch.password.get_secret_value()
            if settings.opensearch.password
            else None
        ),
        verify_certs=settings.opensearch.verify_certs,
        create=not read_only,
    )
