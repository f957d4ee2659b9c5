"""The retrieval service's ingestion: kb.ingest events into the index, progress on kb.indexed.

Each document goes parse -> chunk -> embed (passage vectors) -> replace its chunks in the
index. Every outcome is reported on ``kb.indexed`` and remembered per document, so the
API can tell a caller what became of an upload:

- ``STARTED`` then ``INDEXED`` (with the chunk count) for a new or changed document;
- ``UNCHANGED`` when the same bytes, title, ACL and metadata are indexed already
  (re-ingesting is idempotent by document id and content hash);
- ``DELETED`` for a deletion (also of a document that was never there);
- ``FAILED`` with the reason for a document that cannot be indexed (unsupported type,
  empty, too large, too many pages, characters or chunks, over the tenant's chunk quota,
  unparseable). A failure is a result, not an error of the consumer: the offset moves on
  and the next document is not held up.

Parsing runs in a child process with time and memory limits
(:mod:`services.retrieval.sandbox`). A document that kills the parser (time, memory, a
crash) is reported ``FAILED`` like any other, and its event then goes to ``kb.ingest.dlq``
for an operator: the consumer's retries of it skip the parser, so it costs one parser run.

A stored document is replaced or deleted only by a writer its ACL admits (the event's
``writer_groups``) or by the collection's administrator (``writer_is_admin``); any other
write is refused on ``kb.indexed`` and leaves no trace in the document's status, which
readers outside its ACL cannot see anyway (:mod:`services.retrieval.access`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from services.retrieval import metrics as retrieval_metrics
from services.retrieval.access import Reader
from services.retrieval.chunking import chunk_text
from services.retrieval.embedder import EmbedderError, EmbedderUnavailable
from services.retrieval.index import Chunk, DocumentInfo, KnowledgeIndex, Vectors
from services.retrieval.parsing import ParsedDocument, ParseError, ParserKilled
from shared.bus import Publisher
from shared.bus.consumer import EventContext
from shared.events.v1 import events_pb2 as ev
from shared.files import private_file
from shared.kb_names import (
    COLLECTION_RULE,
    DOCUMENT_ID_RULE,
    valid_collection,
    valid_document_id,
)
from shared.logging import get_logger
from shared.topics import KB_INDEXED

log = get_logger(__name__)

STATE_NAMES = {
    ev.INDEX_STATE_STARTED: "started",
    ev.INDEX_STATE_INDEXED: "indexed",
    ev.INDEX_STATE_UNCHANGED: "unchanged",
    ev.INDEX_STATE_DELETED: "deleted",
    ev.INDEX_STATE_FAILED: "failed",
}

Embed = Callable[[list[str], str], Vectors]
Parse = Callable[[bytes, str, str | None], ParsedDocument]
"""(content, content type, title) -> the parsed document; raises ParseError (blocking)."""
_KILLED_REMEMBERED = 1024
EMBED_RETRY_S = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0)
"""Waits between tries while the embeddings service is unreachable (~1 minute in all)."""


class IngestRefused(ValueError):
    """A document that cannot be indexed; the message says why (it goes to kb.indexed)."""


class WriteForbidden(IngestRefused):
    """The stored document's ACL does not admit this writer; nothing is changed or recorded."""


class ParserStopped(IngestRefused):
    """The document killed the parser (time, memory, crash): reported, then dead-lettered."""


class DeadLetter(Exception):
    """Raised to the bus so that it dead-letters the event (after retries that skip the work)."""


def check_names(tenant: str, collection: str, document_id: str) -> None:
    """Raise :class:`IngestRefused` for a missing tenant or a malformed name."""
    if not tenant:
        raise IngestRefused("the event names no tenant (envelope.tenant)")
    if not valid_collection(collection):
        raise IngestRefused(f"collection {collection[:80]!r}: {COLLECTION_RULE}")
    if not valid_document_id(document_id):
        raise IngestRefused(f"document_id {document_id[:80]!r}: {DOCUMENT_ID_RULE}")


@dataclass(frozen=True)
class Status:
    state: str
    chunks: int
    content_sha256: str
    error: str
    updated_at_ns: int
    acl: tuple[str, ...] = ()  # the document's, so that only its readers see this status


class StatusStore:
    """The last outcome of each document, durable (a small SQLite file)."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(
            private_file(path), check_same_thread=False, isolation_level=None
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS status (tenant TEXT, collection TEXT, document_id TEXT,"
            " state TEXT, chunks INTEGER, sha256 TEXT, error TEXT, updated_ns INTEGER,"
            " PRIMARY KEY (tenant, collection, document_id))"
        )
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(status)")}
        if "acl" not in columns:  # a store from before statuses carried the document's ACL
            self._db.execute("ALTER TABLE status ADD COLUMN acl TEXT NOT NULL DEFAULT '[]'")
        self._lock = threading.Lock()

    def put(self, tenant: str, collection: str, document_id: str, status: Status) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO status (tenant, collection, document_id, state, chunks,"
                " sha256, error, updated_ns, acl) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    tenant,
                    collection,
                    document_id,
                    status.state,
                    status.chunks,
                    status.content_sha256,
                    status.error,
                    status.updated_at_ns,
                    json.dumps(list(status.acl)),
                ),
            )

    def get(self, tenant: str, collection: str, document_id: str) -> Status | None:
        with self._lock:
            row = self._db.execute(
                "SELECT state, chunks, sha256, error, updated_ns, acl FROM status"
                " WHERE tenant = ? AND collection = ? AND document_id = ?",
                (tenant, collection, document_id),
            ).fetchone()
        if row is None:
            return None
        state, chunks, sha256, error, updated_ns, acl = row
        return Status(state, chunks, sha256, error, updated_ns, tuple(json.loads(acl)))

    def close(self) -> None:
        self._db.close()


class Ingestor:
    """Turns kb.ingest events into index updates and kb.indexed reports."""

    def __init__(
        self,
        index: KnowledgeIndex,
        embed: Embed,
        publisher: Publisher,
        statuses: StatusStore,
        *,
        parse: Parse,
        max_document_bytes: int,
        max_chunks_per_document: int,
        max_chunks_per_tenant: int,
    ) -> None:
        self.index = index
        self.embed = embed
        self.publisher = publisher
        self.statuses = statuses
        self.parse = parse
        self.max_document_bytes = max_document_bytes
        self.max_chunks_per_document = max_chunks_per_document
        self.max_chunks_per_tenant = max_chunks_per_tenant
        self._write = asyncio.Lock()
        self._killed: dict[str, str] = {}  # event id -> why it killed the parser

    async def on_ingest(self, event: ev.KbIngest, ctx: EventContext) -> None:
        """Apply one kb.ingest event and report its outcome.

        Raises:
            DeadLetter: the document killed the parser (reported already); the bus
                retries, which raise at once, then moves the event to the DLQ.
        """
        event_id = ctx.envelope.event_id
        if event_id in self._killed:
            raise DeadLetter(self._killed[event_id])
        tenant = ctx.envelope.tenant
        started = time.monotonic()
        stopped: str | None = None
        report = ev.KbIndexed(document_id=event.document_id, collection=event.collection)
        acl: tuple[str, ...] | None = tuple(sorted(set(event.acl)))
        try:
            check_names(tenant, event.collection, event.document_id)
            async with self._write:  # one document at a time: replacements never interleave
                acl = await self._apply(tenant, event, report)
        except WriteForbidden as refused:
            report.state = ev.INDEX_STATE_FAILED
            report.error = str(refused)
            acl = None  # the stored document's status stays as its own writers left it
        except ParserStopped as refused:
            stopped = str(refused)
            report.state = ev.INDEX_STATE_FAILED
            report.error = f"{refused}; the document was set aside for an operator (kb.ingest.dlq)"
        except IngestRefused as refused:
            report.state = ev.INDEX_STATE_FAILED
            report.error = str(refused)
        except Exception as error:  # a bug or a broken store: report it, keep consuming
            log.exception("ingestion failed", document_id=event.document_id)
            report.state = ev.INDEX_STATE_FAILED
            report.error = f"internal error: {type(error).__name__}"
        await self._report(tenant, report, acl)
        state = STATE_NAMES.get(report.state, "?")
        retrieval_metrics.ingested(state, time.monotonic() - started, report.chunks)
        log.info(
            "document ingested",
            tenant=tenant,
            collection=event.collection,
            document_id=event.document_id,
            state=STATE_NAMES.get(report.state, "?"),
            chunks=report.chunks,
            error=report.error or None,
            seconds=round(time.monotonic() - started, 3),
        )
        if stopped is not None:
            if len(self._killed) >= _KILLED_REMEMBERED:
                self._killed.pop(next(iter(self._killed)))
            self._killed[event_id] = stopped
            raise DeadLetter(stopped)

    async def _apply(
        self, tenant: str, event: ev.KbIngest, report: ev.KbIndexed
    ) -> tuple[str, ...]:
        """Index or delete the event's document; returns the ACL its status is kept under.

        Raises:
            WriteForbidden: a stored document's ACL does not admit the writer.
            IngestRefused: the document cannot be indexed (the message says why).
        """
        existing = await asyncio.to_thread(
            self.index.document, tenant, event.collection, event.document_id
        )
        writer = Reader(tuple(event.writer_groups), event.writer_is_admin)
        if existing is not None and not writer.may_see(existing.acl):
            raise WriteForbidden(
                f"document {event.document_id!r} is restricted to other groups; only its "
                "readers or the collection's administrators may replace or delete it"
            )
        if event.delete:
            await asyncio.to_thread(self.index.delete, tenant, event.collection, event.document_id)
            report.state = ev.INDEX_STATE_DELETED
            return existing.acl if existing is not None else ()
        if len(event.content) > self.max_document_bytes:
            raise IngestRefused(
                f"the document has {len(event.content)} bytes; the limit is "
                f"{self.max_document_bytes}"
            )
        digest = hashlib.sha256(event.content).hexdigest()
        report.content_sha256 = digest
        acl, metadata = tuple(sorted(set(event.acl))), dict(sorted(event.metadata.items()))
        if (
            existing is not None
            and existing.content_sha256 == digest
            and existing.acl == acl
            and dict(existing.metadata) == metadata
            and existing.title == (event.title or existing.title)
        ):
            report.state = ev.INDEX_STATE_UNCHANGED
            report.chunks = existing.chunks
            return acl
        await self._report(
            tenant,
            ev.KbIndexed(
                document_id=event.document_id,
                collection=event.collection,
                state=ev.INDEX_STATE_STARTED,
                content_sha256=digest,
            ),
            acl,
        )
        try:
            parsed = await asyncio.to_thread(
                self.parse, event.content, event.content_type, event.title or None
            )
        except ParserKilled as error:
            raise ParserStopped(str(error)) from error
        except ParseError as error:
            raise IngestRefused(str(error)) from error
        texts = chunk_text(parsed.text)
        if not texts:
            raise IngestRefused("the document has no text to index")
        if len(texts) > self.max_chunks_per_document:
            raise IngestRefused(
                f"the document makes {len(texts):,} chunks; the limit is "
                f"{self.max_chunks_per_document:,}"
            )
        await self._check_quota(tenant, len(texts) - (existing.chunks if existing else 0))
        title = event.title or parsed.title or event.document_id
        chunks = [
            Chunk(
                chunk_id=f"{event.document_id}#{ordinal}",
                document_id=event.document_id,
                tenant=tenant,
                collection=event.collection,
                title=title,
                text=text,
                ordinal=ordinal,
                acl=acl,
                metadata=metadata,
            )
            for ordinal, text in enumerate(texts)
        ]
        # the title helps the vector find the chunk ("Leave policy: ..."), as in e5's training
        vectors = await self._embed([f"{title}: {c.text}" for c in chunks])
        info = DocumentInfo(
            tenant=tenant,
            collection=event.collection,
            document_id=event.document_id,
            title=title,
            content_sha256=digest,
            content_type=event.content_type,
            chunks=len(chunks),
            acl=acl,
            metadata=metadata,
            indexed_at_ns=time.time_ns(),
        )
        await asyncio.to_thread(self.index.upsert, info, chunks, vectors)
        report.state = ev.INDEX_STATE_INDEXED
        report.chunks = len(chunks)
        return acl

    async def _check_quota(self, tenant: str, added: int) -> None:
        """Refuse a document that would take the tenant past its chunk quota."""
        held = sum(c.chunks for c in await asyncio.to_thread(self.index.collections, tenant))
        if added > 0 and held + added > self.max_chunks_per_tenant:
            raise IngestRefused(
                f"the tenant's knowledge base holds {held:,} chunks; {added:,} more would pass "
                f"its limit of {self.max_chunks_per_tenant:,}"
            )

    async def _embed(self, texts: list[str]) -> Vectors:
        """Passage vectors; waits out an embeddings service that is down for a while."""
        for delay in EMBED_RETRY_S:
            try:
                return await asyncio.to_thread(self.embed, texts, "passage")
            except EmbedderUnavailable as error:
                log.warning("embeddings unavailable; retrying", retry_in_s=delay, error=str(error))
                await asyncio.sleep(delay)
            except EmbedderError as error:
                raise IngestRefused(f"the text could not be embedded: {error}") from error
        raise IngestRefused("the embeddings service stayed unavailable; ingest the document again")

    async def _report(self, tenant: str, report: ev.KbIndexed, acl: tuple[str, ...] | None) -> None:
        """Publish ``report``; remember it as the document's status under ``acl`` (not when
        None: a refused write must not overwrite the status its readers see)."""
        status = Status(
            STATE_NAMES.get(report.state, "unknown"),
            report.chunks,
            report.content_sha256,
            report.error,
            time.time_ns(),
            acl or (),
        )
        if acl is not None and report.collection and report.document_id:
            await asyncio.to_thread(
                self.statuses.put, tenant, report.collection, report.document_id, status
            )
        await self.publisher.publish(
            KB_INDEXED, report, key=report.document_id, tenant=tenant or None
        )
