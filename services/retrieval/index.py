"""What a knowledge-base index stores and answers, whatever the back end.

A tenant's documents live in named collections. A document is split into chunks; each
chunk is indexed twice, for BM25 (its words) and for kNN (its embedding vector). Every
search runs inside a :class:`Scope` (tenant, collections, the caller's groups), and the
back end applies the scope **before** ranking: a chunk outside it is never scored, so it
can appear in no result and change no count or score of one.

Back ends: :mod:`services.retrieval.sqlite_index` (embedded: SQLite FTS5 for BM25 and a
vector index file) and :mod:`services.retrieval.opensearch_index` (cluster).

Shapes: N chunks, D = embedding dimensions (384 for multilingual-e5-small).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

Vectors = npt.NDArray[np.float32]
"""Unit-length embeddings, float32 [N, D]; a dot product is the cosine."""


@dataclass(frozen=True)
class Chunk:
    """One indexed piece of a document."""

    chunk_id: str  # "<document_id>#<ordinal>"
    document_id: str
    tenant: str
    collection: str
    title: str
    text: str
    ordinal: int  # position in the document, from 0
    acl: tuple[str, ...] = ()  # groups or roles that may read it; empty: the whole tenant
    metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class DocumentInfo:
    """A stored document, without its chunks."""

    tenant: str
    collection: str
    document_id: str
    title: str
    content_sha256: str  # of the original bytes: re-ingesting the same bytes changes nothing
    content_type: str
    chunks: int
    acl: tuple[str, ...]
    metadata: Mapping[str, str]
    indexed_at_ns: int


@dataclass(frozen=True)
class CollectionInfo:
    tenant: str
    collection: str
    documents: int
    chunks: int


@dataclass(frozen=True)
class Scope:
    """Whose search this is; only chunks inside it are ever considered.

    A chunk is inside when its tenant is ``tenant``, its collection is one of
    ``collections``, and its ACL is empty or shares a name with ``groups``.
    """

    tenant: str
    collections: tuple[str, ...]
    groups: tuple[str, ...] = ()

    def admits(self, chunk: Chunk) -> bool:
        return (
            chunk.tenant == self.tenant
            and chunk.collection in self.collections
            and (not chunk.acl or bool(set(chunk.acl) & set(self.groups)))
        )


@dataclass(frozen=True)
class Scored:
    """A chunk and its score from one ranker (BM25 score, or cosine similarity)."""

    chunk: Chunk
    score: float


class KnowledgeIndex(Protocol):
    """A back end. Methods are synchronous and thread-safe (call them via a thread)."""

    dim: int

    def upsert(self, document: DocumentInfo, chunks: Sequence[Chunk], vectors: Vectors) -> None:
        """Store ``document`` with exactly these chunks (vectors row-aligned), replacing any
        earlier version of it atomically: a search sees the old chunks or the new, never
        a mix."""
        ...

    def delete(self, tenant: str, collection: str, document_id: str) -> bool:
        """Remove the document and all its chunks; False when there was none."""
        ...

    def document(self, tenant: str, collection: str, document_id: str) -> DocumentInfo | None: ...

    def documents(
        self,
        tenant: str,
        collection: str,
        *,
        after: str | None = None,
        limit: int = 100,
        readers: Sequence[str] | None = None,
    ) -> list[DocumentInfo]:
        """Documents of a collection ordered by id, ``limit`` after the id ``after``; with
        ``readers``, only those whose ACL is empty or names one of them."""
        ...

    def collections(
        self, tenant: str, *, readers: Sequence[str] | None = None
    ) -> list[CollectionInfo]:
        """The tenant's collections holding documents, with their counts; with ``readers``,
        only the documents whose ACL is empty or names one of them are counted."""
        ...

    def search_bm25(self, scope: Scope, query: str, k: int) -> list[Scored]:
        """The ``k`` best chunks in ``scope`` for ``query`` by BM25, best first."""
        ...

    def search_vector(self, scope: Scope, vector: Vectors, k: int) -> list[Scored]:
        """The ``k`` chunks in ``scope`` nearest ``vector`` [D] (cosine), best first."""
        ...

    def close(self) -> None: ...
