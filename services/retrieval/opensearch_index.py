"""The knowledge base in OpenSearch (cluster mode), with the k-NN plugin for vectors.

Indices (``<prefix>`` from the constructor, ``meshllm-kb`` by default):

- ``<prefix>-chunks``: one document per chunk *per generation* (see below). ``text`` is
  analysed twice: the ``standard`` analyzer on ``text`` (words; CJK characters one by one)
  and the built-in ``cjk`` analyzer on ``text.cjk`` (overlapping bigrams of Chinese,
  Japanese and Korean characters), so Chinese matches without the ``smartcn`` or ``ik``
  plugins, which a cluster may lack. ``tenant``, ``collection``, ``document_id``, ``acl``,
  ``title`` are keywords, ``metadata`` a ``flat_object`` (OpenSearch's counterpart of
  Elasticsearch's ``flattened``), ``embedding`` a ``knn_vector`` (HNSW, ``cosinesimil``, the
  ``lucene`` engine by default or ``faiss``; both filter efficiently inside the graph search).
- ``<prefix>-documents``: one document per stored document (:class:`DocumentInfo` plus the
  generation of its chunks that is current).

Replacing a document. OpenSearch writes one document atomically, never a batch, so the
chunks of a version carry a fresh *generation* id and the document record names the current
one. :meth:`OpenSearchKnowledgeIndex.upsert`:

1. writes the new chunks under a new generation and waits until they are searchable
   (``refresh=wait_for``); no search returns them yet, their generation is not current;
2. flips the document record to the new generation: one write, conditional on the record
   being the one read before (``if_seq_no``), so of two writers racing on one document the
   later one fails, removes its chunks and starts over (three tries, then
   :class:`ConcurrentUpsertError`);
3. deletes the chunks of the generation it replaced, and any chunk of the document from a
   generation that never became current and was written more than ``orphan_grace_s`` before
   this upsert began (a writer that crashed between steps 1 and 2).

Every search keeps a hit only when its generation is the current one of its document, read
with a real-time multi-get of the document records after the search. So a search sees, per
document, the old chunks or the new, never a mix and never neither: the new chunks are
searchable before the flip, and the old ones are filtered out from the flip on. A document
whose record is missing (never flipped, or deleted) contributes nothing. Hits of a stale
generation take places in OpenSearch's top hits until step 3 removes them, so searches ask
for more than ``k`` and ask again, for more, when too many were stale.

What OpenSearch does *not* give:

- BM25 term statistics (document frequencies, average length) are per shard over every
  document in it, other tenants', other collections', ACL-hidden and not yet deleted stale
  chunks included. Filters (tenant, collections, ACL) decide which chunks can match and be
  returned, never the statistics: an out-of-scope chunk can shift the *value* of an in-scope
  score, not whether or where a chunk outside the scope appears. Strict isolation of scores
  needs an index per tenant, which this class does not do.
- Reads are near real time: ``documents`` and ``collections`` see a write after the index
  refreshes (1 s by default) unless the index was opened with ``refresh=True`` (tests), which
  waits for it on every write. ``document`` and the generation check are real time.
- ``upsert`` takes at least one refresh interval (step 1 waits for it).

Vector search modes (``vector_mode``):

- ``"knn"`` (default): approximate k-NN (HNSW) with the scope as an efficient filter; the
  engine searches the graph among in-scope chunks only (or exactly, when few match).
- ``"exact"``: a ``script_score`` over the scope's chunks with the k-NN plugin's Painless
  ``cosineSimilarity``: exact, cost linear in the scope's size.
- ``"scan"``: exact and client-side: fetches the scope's vectors (at most ``scan_limit``
  chunks, else :class:`ScopeTooLargeError`) and ranks them with numpy. For small scopes and
  for servers without the k-NN plugin (osmem-server, which the tests use).

Scores: BM25 as OpenSearch computes it; vector scores are cosine similarities in all modes
(``knn`` returns ``(1 + cos) / 2`` and is mapped back; ``exact`` returns ``1 + cos``).

One module (~800 lines): the OpenSearch back end of
:class:`~services.retrieval.index.KnowledgeIndex`, as :mod:`services.retrieval.sqlite_index`
is the embedded one; its tests (`tests/retrieval/test_opensearch_index.py`) check it
against the same behaviour.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, get_args

import numpy as np
from opensearchpy import OpenSearch
from opensearchpy.exceptions import ConflictError, NotFoundError, RequestError, TransportError
from opensearchpy.helpers import bulk

from services.retrieval.index import (
    Chunk,
    CollectionInfo,
    DocumentInfo,
    KnowledgeIndex,
    Scope,
    Scored,
    Vectors,
)
from shared.logging import get_logger

VectorMode = Literal["knn", "exact", "scan"]
Engine = Literal["lucene", "faiss"]

MAX_WINDOW = 10_000
"""OpenSearch's default ``index.max_result_window`` and the k-NN query's largest ``k``."""
MAX_QUERY_CHARS = 400
"""A BM25 query is cut to this many characters: every token of it, on each of the two fields,
is a clause, and OpenSearch refuses a query of more than ``indices.query.bool.max_clause_count``
clauses in all (1,024 by default in 2.x); a Chinese character is about one token per field."""
_PAGE = 1_000
_UPSERT_TRIES = 3
_COSINE_SCRIPT = "1.0 + cosineSimilarity(params.query_value, doc[params.field])"

_KEYWORD = {"type": "keyword"}
_LONG = {"type": "long"}
_TITLE = {"type": "keyword", "ignore_above": 1024}  # longer: kept, not indexed (not refused)

log = get_logger(__name__)


class OpenSearchIndexError(RuntimeError):
    """OpenSearch refused a request or cannot be reached."""


class ConcurrentUpsertError(OpenSearchIndexError):
    """Other writers kept replacing the same document while this one tried to."""


class ScopeTooLargeError(OpenSearchIndexError):
    """A ``scan`` vector search found more chunks in its scope than ``scan_limit``."""


def chunk_mappings(dim: int, engine: Engine) -> dict[str, Any]:
    """The chunks index's mappings for ``dim``-dimensional embeddings."""
    return {
        "dynamic": "strict",
        "properties": {
            "key": _KEYWORD,  # the OpenSearch _id, sortable (sorting on _id is not allowed)
            "doc_key": _KEYWORD,
            "generation": _KEYWORD,
            "written_at_ns": _LONG,
            "chunk_id": _KEYWORD,
            "document_id": _KEYWORD,
            "tenant": _KEYWORD,
            "collection": _KEYWORD,
            "title": _TITLE,
            "ordinal": {"type": "integer"},
            "acl": _KEYWORD,
            "metadata": {"type": "flat_object"},
            "text": {
                "type": "text",
                "analyzer": "standard",
                "fields": {"cjk": {"type": "text", "analyzer": "cjk"}},
            },
            "embedding": {
                "type": "knn_vector",
                "dimension": dim,
                "method": {
                    "name": "hnsw",
                    "space_type": "cosinesimil",
                    "engine": engine,
                    "parameters": {"m": 16, "ef_construction": 128},
                },
            },
        },
    }


DOCUMENT_MAPPINGS: dict[str, Any] = {
    "dynamic": "strict",
    "properties": {
        "tenant": _KEYWORD,
        "collection": _KEYWORD,
        "document_id": _KEYWORD,
        "title": _TITLE,
        "content_sha256": _KEYWORD,
        "content_type": _KEYWORD,
        "chunks": _LONG,
        "acl": _KEYWORD,
        "metadata": {"type": "object", "enabled": False},
        "indexed_at_ns": _LONG,
        "generation": _KEYWORD,
    },
}


def document_key(tenant: str, collection: str, document_id: str) -> str:
    """The ``_id`` of a document's record: any names, a fixed length, URL-safe."""
    return hashlib.sha256(json.dumps([tenant, collection, document_id]).encode()).hexdigest()


def scope_filter(scope: Scope) -> list[dict[str, Any]]:
    """Filter clauses admitting exactly the chunks :meth:`Scope.admits` admits."""
    public = {"bool": {"must_not": [{"exists": {"field": "acl"}}]}}
    readable: list[dict[str, Any]] = [public]
    if scope.groups:
        readable.append({"terms": {"acl": sorted(set(scope.groups))}})
    return [
        {"term": {"tenant": scope.tenant}},
        {"terms": {"collection": sorted(set(scope.collections))}},
        {"bool": {"should": readable, "minimum_should_match": 1}},
    ]


def bm25_body(scope: Scope, query: str, size: int) -> dict[str, Any]:
    """The search body of :meth:`OpenSearchKnowledgeIndex.search_bm25` for ``size`` hits."""
    return {
        "size": size,
        "_source": {"excludes": ["embedding"]},
        "query": {
            "bool": {
                "filter": scope_filter(scope),
                "must": [
                    {
                        "multi_match": {
                            "query": query,
                            "fields": ["text", "text.cjk"],
                            "type": "most_fields",
                        }
                    }
                ],
            }
        },
    }


def knn_body(scope: Scope, vector: Sequence[float], size: int) -> dict[str, Any]:
    """The search body of the ``knn`` vector mode: HNSW with the scope as efficient filter."""
    return {
        "size": size,
        "_source": {"excludes": ["embedding"]},
        "query": {
            "knn": {
                "embedding": {
                    "vector": list(vector),
                    "k": size,
                    "filter": {"bool": {"filter": scope_filter(scope)}},
                }
            }
        },
    }


def exact_body(scope: Scope, vector: Sequence[float], size: int) -> dict[str, Any]:
    """The search body of the ``exact`` vector mode: cosine over every chunk in scope."""
    return {
        "size": size,
        "_source": {"excludes": ["embedding"]},
        "query": {
            "script_score": {
                "query": {"bool": {"filter": scope_filter(scope)}},
                "script": {
                    "source": _COSINE_SCRIPT,
                    "params": {"field": "embedding", "query_value": list(vector)},
                },
            }
        },
    }


def _chunk_doc(
    chunk: Chunk, vector: Vectors, *, key: str, doc_key: str, generation: str
) -> dict[str, Any]:
    return {
        "key": key,
        "doc_key": doc_key,
        "generation": generation,
        "chunk_id": chunk.chunk_id,
        "document_id": chunk.document_id,
        "tenant": chunk.tenant,
        "collection": chunk.collection,
        "title": chunk.title,
        "ordinal": chunk.ordinal,
        "acl": list(chunk.acl),
        "metadata": dict(chunk.metadata),
        "text": chunk.text,
        "embedding": [float(x) for x in vector],
    }


def _record_doc(document: DocumentInfo, chunks: int, generation: str) -> dict[str, Any]:
    return {
        "tenant": document.tenant,
        "collection": document.collection,
        "document_id": document.document_id,
        "title": document.title,
        "content_sha256": document.content_sha256,
        "content_type": document.content_type,
        "chunks": chunks,
        "acl": list(document.acl),
        "metadata": dict(document.metadata),
        "indexed_at_ns": document.indexed_at_ns,
        "generation": generation,
    }


def _chunk(source: Mapping[str, Any]) -> Chunk:
    return Chunk(
        chunk_id=source["chunk_id"],
        document_id=source["document_id"],
        tenant=source["tenant"],
        collection=source["collection"],
        title=source.get("title", ""),
        text=source.get("text", ""),
        ordinal=int(source["ordinal"]),
        acl=tuple(source.get("acl") or ()),
        metadata={str(k): str(v) for k, v in (source.get("metadata") or {}).items()},
    )


def _document(source: Mapping[str, Any]) -> DocumentInfo:
    return DocumentInfo(
        tenant=source["tenant"],
        collection=source["collection"],
        document_id=source["document_id"],
        title=source.get("title", ""),
        content_sha256=source.get("content_sha256", ""),
        content_type=source.get("content_type", ""),
        chunks=int(source.get("chunks", 0)),
        acl=tuple(source.get("acl") or ()),
        metadata={str(k): str(v) for k, v in (source.get("metadata") or {}).items()},
        indexed_at_ns=int(source.get("indexed_at_ns", 0)),
    )


def _knn_cosine(score: float) -> float:
    return 2.0 * score - 1.0  # cosinesimil: score = (2 - (1 - cos)) / 2


def _exact_cosine(score: float) -> float:
    return score - 1.0  # the script adds 1: scores must not be negative


class OpenSearchKnowledgeIndex(KnowledgeIndex):
    """A :class:`KnowledgeIndex` in two OpenSearch indices (see the module notes).

    Thread-safe: it keeps no state but the client, whose connection pool is thread-safe.
    """

    def __init__(
        self,
        client: OpenSearch,
        *,
        dim: int,
        index_prefix: str = "meshllm-kb",
        vector_mode: VectorMode = "knn",
        engine: Engine = "lucene",
        create: bool = True,
        refresh: bool = False,
        scan_limit: int = 10_000,
        orphan_grace_s: float = 600.0,
    ) -> None:
        """Use ``client``'s cluster; ``create`` makes the indices when missing.

        Args:
            dim: embedding dimensions; must match an existing chunks index.
            index_prefix: the indices are ``<prefix>-chunks`` and ``<prefix>-documents``.
            vector_mode: how :meth:`search_vector` runs: ``knn``, ``exact`` or ``scan``.
            engine: the k-NN engine of a new chunks index (``lucene`` or ``faiss``).
            refresh: wait on every write until searches and listings see it (tests).
            scan_limit: the most chunks a ``scan`` vector search ranks (at most 100,000).
            orphan_grace_s: chunks of a generation that never became current are removed
                by the document's next upsert once older than this; it must exceed the
                longest upsert plus the clock skew between writers.

        Raises:
            ValueError: a bad setting (named).
            OpenSearchIndexError: the cluster cannot be reached, refuses the mappings
                (no k-NN plugin?), holds a chunks index of another dimension, or
                (``create`` False) holds no knowledge base under ``index_prefix``.
        """
        if dim < 1:
            raise ValueError(f"dim must be positive, not {dim}")
        if vector_mode not in get_args(VectorMode):
            raise ValueError(f"vector_mode must be one of {get_args(VectorMode)}: {vector_mode!r}")
        if engine not in get_args(Engine):
            raise ValueError(f"engine must be one of {get_args(Engine)}: {engine!r}")
        if not 1 <= scan_limit <= 100_000:
            raise ValueError(f"scan_limit must be within 1..100000, not {scan_limit}")
        if orphan_grace_s < 0:
            raise ValueError(f"orphan_grace_s must not be negative, not {orphan_grace_s}")
        self.dim = dim
        self.vector_mode: VectorMode = vector_mode
        self._client = client
        self._chunks = f"{index_prefix}-chunks"
        self._documents = f"{index_prefix}-documents"
        self._refresh = refresh
        self._scan_limit = scan_limit
        self._orphan_grace_ns = int(orphan_grace_s * 1e9)
        try:
            if create:
                self._create(self._chunks, chunk_mappings(dim, engine), {"index": {"knn": True}})
                self._create(self._documents, DOCUMENT_MAPPINGS, {})
            mapping = self._client.indices.get_mapping(index=self._chunks)
            self._client.indices.get(index=self._documents)
        except NotFoundError:
            raise OpenSearchIndexError(
                f"no knowledge base in OpenSearch under {index_prefix}-*"
            ) from None
        except TransportError as error:
            hint = " (is the k-NN plugin installed?)" if "knn" in str(error) else ""
            raise OpenSearchIndexError(f"OpenSearch: {error}{hint}") from None
        stored = next(iter(mapping.values()))["mappings"]["properties"]["embedding"]
        if int(stored.get("dimension", dim)) != dim:
            raise OpenSearchIndexError(
                f"{self._chunks} holds {stored['dimension']}-dimensional embeddings; "
                f"dim is {dim} (a different embedding model needs another index_prefix)"
            )

    @classmethod
    def connect(
        cls,
        hosts: Sequence[str],
        *,
        dim: int,
        username: str | None = None,
        password: str | None = None,
        verify_certs: bool = True,
        index_prefix: str = "meshllm-kb",
        vector_mode: VectorMode = "knn",
        engine: Engine = "lucene",
        create: bool = True,
        scan_limit: int = 10_000,
        orphan_grace_s: float = 600.0,
    ) -> OpenSearchKnowledgeIndex:
        """A client for ``hosts`` and an index on it (the other arguments: the constructor's)."""
        auth = (username, password) if username is not None and password is not None else None
        client = OpenSearch(
            hosts=list(hosts), http_auth=auth, verify_certs=verify_certs, timeout=30
        )
        return cls(
            client,
            dim=dim,
            index_prefix=index_prefix,
            vector_mode=vector_mode,
            engine=engine,
            create=create,
            scan_limit=scan_limit,
            orphan_grace_s=orphan_grace_s,
        )

    def _create(self, index: str, mappings: dict[str, Any], settings: dict[str, Any]) -> None:
        if self._client.indices.exists(index=index):
            return
        try:
            self._client.indices.create(
                index=index, body={"settings": settings, "mappings": mappings}
            )
        except RequestError as error:
            if "already_exists" not in str(error.error):  # else made meanwhile elsewhere
                raise

    def close(self) -> None:
        self._client.close()

    # -- writing ---------------------------------------------------------------------------

    def upsert(self, document: DocumentInfo, chunks: Sequence[Chunk], vectors: Vectors) -> None:
        """Store ``document`` with exactly ``chunks`` (see the module notes for how).

        Raises:
            ValueError: vectors not [len(chunks), dim], or a chunk of another document.
            ConcurrentUpsertError: other writers replaced the document on every try.
            OpenSearchIndexError: OpenSearch refused a write; the previous version stays.
        """
        self._check_upsert(document, chunks, vectors)
        doc_key = document_key(document.tenant, document.collection, document.document_id)
        try:
            for _ in range(_UPSERT_TRIES):
                if self._try_upsert(doc_key, document, chunks, vectors):
                    return
        except TransportError as error:
            raise OpenSearchIndexError(f"OpenSearch: {error}") from None
        raise ConcurrentUpsertError(
            f"document {document.document_id!r} of {document.tenant}/{document.collection} "
            f"was replaced by other writers {_UPSERT_TRIES} times while this one wrote it"
        )

    def _check_upsert(
        self, document: DocumentInfo, chunks: Sequence[Chunk], vectors: Vectors
    ) -> None:
        if vectors.shape != (len(chunks), self.dim):
            raise ValueError(
                f"vectors are {vectors.shape}, expected ({len(chunks)}, {self.dim}): one row "
                "per chunk"
            )
        owner = (document.tenant, document.collection, document.document_id)
        for chunk in chunks:
            if (chunk.tenant, chunk.collection, chunk.document_id) != owner:
                raise ValueError(f"chunk {chunk.chunk_id!r} belongs to another document")
        norms = np.linalg.norm(vectors, axis=1)
        if not (np.isfinite(norms).all() and (norms > 0).all()):
            raise ValueError("every vector must be finite and not zero (cosine)")
        if len({chunk.ordinal for chunk in chunks}) != len(chunks):
            raise ValueError(f"two chunks of {document.document_id!r} share an ordinal")

    def _try_upsert(
        self, doc_key: str, document: DocumentInfo, chunks: Sequence[Chunk], vectors: Vectors
    ) -> bool:
        """One try: False when another writer flipped the record first (nothing left)."""
        started = time.time_ns()
        previous = self._record(doc_key)
        generation = uuid.uuid4().hex
        mine = {"term": {"generation": generation}}
        try:
            self._write_chunks(doc_key, generation, started, chunks, vectors)
            self._flip(doc_key, _record_doc(document, len(chunks), generation), previous)
        except ConflictError:
            self._delete_chunks(doc_key, mine, quiet=True)
            return False
        except BaseException:
            self._delete_chunks(doc_key, mine, quiet=True)
            raise
        orphans = {
            "bool": {
                "must_not": [mine],
                "filter": [{"range": {"written_at_ns": {"lt": started - self._orphan_grace_ns}}}],
            }
        }
        stale: list[dict[str, Any]] = [orphans]
        if previous is not None:
            stale.append({"term": {"generation": previous["_source"]["generation"]}})
        self._delete_chunks(
            doc_key, {"bool": {"should": stale, "minimum_should_match": 1}}, quiet=True
        )
        return True

    def _write_chunks(
        self,
        doc_key: str,
        generation: str,
        now: int,
        chunks: Sequence[Chunk],
        vectors: Vectors,
    ) -> None:
        """Index the chunks of one generation and wait until searches see them."""
        actions = []
        for chunk, vector in zip(chunks, vectors, strict=True):
            key = f"{doc_key}.{generation}.{chunk.ordinal}"
            source = _chunk_doc(chunk, vector, key=key, doc_key=doc_key, generation=generation)
            source["written_at_ns"] = now
            actions.append(
                {"_op_type": "index", "_index": self._chunks, "_id": key, "_source": source}
            )
        _, errors = bulk(
            self._client, actions, raise_on_error=False, refresh="wait_for", chunk_size=500
        )
        if errors:
            raise OpenSearchIndexError(f"OpenSearch refused chunks: {str(errors)[:2000]}")

    def _flip(self, doc_key: str, record: dict[str, Any], previous: dict[str, Any] | None) -> None:
        """Write the record, provided it is still ``previous`` (ConflictError if not)."""
        condition: dict[str, Any] = (
            {"op_type": "create"}
            if previous is None
            else {"if_seq_no": previous["_seq_no"], "if_primary_term": previous["_primary_term"]}
        )
        self._client.index(
            index=self._documents,
            id=doc_key,
            body=record,
            refresh="wait_for" if self._refresh else "false",
            **condition,
        )

    def _record(self, doc_key: str) -> dict[str, Any] | None:
        try:
            found: dict[str, Any] = self._client.get(index=self._documents, id=doc_key)
        except NotFoundError:
            return None
        return found

    def _delete_chunks(
        self, doc_key: str, which: dict[str, Any] | None, *, quiet: bool = False
    ) -> None:
        """Delete chunks of one document (``which`` of them; None: all); ``quiet`` logs errors.

        Quiet deletions only tidy up: what they miss is invisible to searches (its generation
        is not current) and is removed by the document's next upsert or delete.
        """
        query: dict[str, Any] = {"bool": {"filter": [{"term": {"doc_key": doc_key}}]}}
        if which is not None:
            query["bool"]["filter"].append(which)
        try:
            self._client.delete_by_query(
                index=self._chunks,
                body={"query": query},
                conflicts="proceed",
                refresh=self._refresh,
            )
        except TransportError as error:
            if not quiet:
                raise
            log.warning("kb_chunk_cleanup_failed", doc_key=doc_key, error=str(error))

    def delete(self, tenant: str, collection: str, document_id: str) -> bool:
        """Remove the record (its chunks vanish from searches at once), then the chunks."""
        doc_key = document_key(tenant, collection, document_id)
        try:
            try:
                self._client.delete(
                    index=self._documents,
                    id=doc_key,
                    refresh="wait_for" if self._refresh else "false",
                )
                existed = True
            except NotFoundError:
                existed = False
            self._delete_chunks(doc_key, None)  # every generation, orphans included
        except TransportError as error:
            raise OpenSearchIndexError(f"OpenSearch: {error}") from None
        return existed

    # -- documents -------------------------------------------------------------------------

    def document(self, tenant: str, collection: str, document_id: str) -> DocumentInfo | None:
        try:
            found = self._record(document_key(tenant, collection, document_id))
        except TransportError as error:
            raise OpenSearchIndexError(f"OpenSearch: {error}") from None
        return None if found is None else _document(found["_source"])

    def documents(
        self,
        tenant: str,
        collection: str,
        *,
        after: str | None = None,
        limit: int = 100,
        readers: Sequence[str] | None = None,
    ) -> list[DocumentInfo]:
        if not 1 <= limit <= MAX_WINDOW:
            raise ValueError(f"limit must be within 1..{MAX_WINDOW}, not {limit}")
        filters: list[dict[str, Any]] = [
            {"term": {"tenant": tenant}},
            {"term": {"collection": collection}},
        ]
        if readers is not None:
            filters.append(scope_filter(Scope(tenant, (collection,), tuple(readers)))[-1])
        if after is not None:
            filters.append({"range": {"document_id": {"gt": after}}})
        body = {
            "size": limit,
            "query": {"bool": {"filter": filters}},
            "sort": [{"document_id": "asc"}],
        }
        reply = self._search(self._documents, body)
        return [_document(hit["_source"]) for hit in reply["hits"]["hits"]]

    def collections(
        self, tenant: str, *, readers: Sequence[str] | None = None
    ) -> list[CollectionInfo]:
        """The tenant's collections holding documents, by name, with their counts (of the
        documents ``readers`` may read, when given)."""
        filters: list[dict[str, Any]] = [{"term": {"tenant": tenant}}]
        if readers is not None:
            filters.append(scope_filter(Scope(tenant, ("-",), tuple(readers)))[-1])
        found: list[CollectionInfo] = []
        after: dict[str, Any] | None = None
        while True:
            composite: dict[str, Any] = {
                "size": _PAGE,
                "sources": [{"collection": {"terms": {"field": "collection"}}}],
            }
            if after is not None:
                composite["after"] = after
            body = {
                "size": 0,
                "query": {"bool": {"filter": filters}},
                "aggs": {
                    "collections": {
                        "composite": composite,
                        "aggs": {"chunks": {"sum": {"field": "chunks"}}},
                    }
                },
            }
            reply = self._search(self._documents, body)
            result = reply["aggregations"]["collections"]
            found.extend(
                CollectionInfo(
                    tenant=tenant,
                    collection=bucket["key"]["collection"],
                    documents=int(bucket["doc_count"]),
                    chunks=int(bucket["chunks"]["value"] or 0),
                )
                for bucket in result["buckets"]
            )
            after = result.get("after_key")
            if len(result["buckets"]) < _PAGE or after is None:
                return sorted(found, key=lambda info: info.collection)

    # -- searching -------------------------------------------------------------------------

    def search_bm25(self, scope: Scope, query: str, k: int) -> list[Scored]:
        """The ``k`` best chunks in ``scope`` for ``query``: BM25 on ``text`` and ``text.cjk``
        summed (``most_fields``), the scope in filter context (it never adds to a score)."""
        text = query.strip()[:MAX_QUERY_CHARS]
        if k <= 0 or not scope.collections or not text:
            return []
        return self._ranked(lambda size: bm25_body(scope, text, size), k, float)

    def search_vector(self, scope: Scope, vector: Vectors, k: int) -> list[Scored]:
        """The ``k`` chunks in ``scope`` nearest ``vector`` by cosine, in ``vector_mode``.

        Raises:
            ValueError: ``vector`` is not [dim], or is zero.
            ScopeTooLargeError: (``scan``) more than ``scan_limit`` chunks in the scope.
        """
        query = np.asarray(vector, dtype=np.float32).reshape(-1)
        if query.shape != (self.dim,):
            raise ValueError(f"the query vector has {query.size} dimensions, not {self.dim}")
        if not np.isfinite(query).all() or not np.any(query):
            raise ValueError("the query vector must be finite and not zero (cosine)")
        if k <= 0 or not scope.collections:
            return []
        values = [float(x) for x in query]
        if self.vector_mode == "knn":
            return self._ranked(lambda size: knn_body(scope, values, size), k, _knn_cosine)
        if self.vector_mode == "exact":
            return self._ranked(lambda size: exact_body(scope, values, size), k, _exact_cosine)
        return self._scan(scope, query, k)

    def _ranked(
        self,
        body: Callable[[int], dict[str, Any]],
        k: int,
        to_score: Callable[[float], float],
    ) -> list[Scored]:
        """The best ``k`` current hits of ``body(size)``, asking for more when some are stale."""
        k = min(k, MAX_WINDOW)
        size = min(max(2 * k, k + 10), MAX_WINDOW)
        while True:
            reply = self._search(self._chunks, body(size))
            hits = reply["hits"]["hits"]
            current = self._current(hits)
            if len(current) >= k or len(hits) < size or size >= MAX_WINDOW:
                return [
                    Scored(_chunk(hit["_source"]), to_score(float(hit["_score"])))
                    for hit in current[:k]
                ]
            size = min(size * 4, MAX_WINDOW)

    def _current(self, hits: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """``hits`` whose generation is the current one of their document (real time)."""
        hits = list(hits)
        generations = self._generations({hit["_source"]["doc_key"] for hit in hits})
        return [
            hit
            for hit in hits
            if generations.get(hit["_source"]["doc_key"]) == hit["_source"]["generation"]
        ]

    def _generations(self, doc_keys: Iterable[str]) -> dict[str, str]:
        keys = sorted(doc_keys)
        current: dict[str, str] = {}
        for start in range(0, len(keys), _PAGE):
            ids = keys[start : start + _PAGE]
            found = self._mget(self._documents, ids, _source_includes=["generation"])
            current.update((key, source["generation"]) for key, source in found.items())
        return current

    def _scan(self, scope: Scope, query: Vectors, k: int) -> list[Scored]:
        """Exact cosine, client-side, over the scope's current chunks (``scan_limit``)."""
        fields = ["key", "doc_key", "generation", "embedding"]
        rows: list[dict[str, Any]] = []
        after: list[Any] | None = None
        while True:
            body: dict[str, Any] = {
                "size": _PAGE,
                "_source": fields,
                "query": {"bool": {"filter": scope_filter(scope)}},
                "sort": [{"key": "asc"}],
            }
            if after is not None:
                body["search_after"] = after
            reply = self._search(self._chunks, body)
            hits = reply["hits"]["hits"]
            rows.extend(hit["_source"] for hit in hits)
            if len(rows) > self._scan_limit:
                raise ScopeTooLargeError(
                    f"more than scan_limit={self._scan_limit} chunks in the scope of tenant "
                    f"{scope.tenant!r}: use vector_mode 'knn' or 'exact', or a larger scan_limit"
                )
            if len(hits) < _PAGE:
                break
            after = hits[-1]["sort"]
        generations = self._generations({row["doc_key"] for row in rows})
        rows = [row for row in rows if generations.get(row["doc_key"]) == row["generation"]]
        if not rows:
            return []
        matrix = np.asarray([row["embedding"] for row in rows], dtype=np.float32)  # [N, D]
        norms = np.linalg.norm(matrix, axis=1) * float(np.linalg.norm(query))
        cosines = (matrix @ query) / np.where(norms > 0, norms, np.inf)  # [N]
        order = np.argsort(-cosines, kind="stable")[:k]
        keys = [rows[i]["key"] for i in order]
        sources = self._mget(self._chunks, keys, _source_excludes=["embedding"])
        return [
            Scored(_chunk(sources[rows[i]["key"]]), float(cosines[i]))
            for i in order
            if rows[i]["key"] in sources
        ]

    def _search(self, index: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            reply: dict[str, Any] = self._client.search(index=index, body=body)
        except TransportError as error:
            raise OpenSearchIndexError(f"OpenSearch: {error}") from None
        return reply

    def _mget(self, index: str, ids: list[str], **options: Any) -> dict[str, dict[str, Any]]:
        """The sources of those of ``ids`` that exist, by id (real time)."""
        try:
            reply = self._client.mget(index=index, body={"ids": ids}, realtime=True, **options)
        except TransportError as error:
            raise OpenSearchIndexError(f"OpenSearch: {error}") from None
        return {doc["_id"]: doc["_source"] for doc in reply["docs"] if doc.get("found")}
