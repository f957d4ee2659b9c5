"""The embedded knowledge index: SQLite (documents, chunks, BM25) and vectors, in one folder.

Files under the index's directory:

- ``kb.sqlite3`` (WAL, synchronous commits) is the truth: documents, chunks with their
  text, ACL and embedding (a float32 BLOB), and an FTS5 table of each chunk's tokens.
- ``vectors.hnsw.npz``: a faiss HNSW graph over the vectors, only while the index holds
  more than ``exact_search_max`` chunks. It is a cache: built in a background thread
  (searches scan exactly meanwhile), then kept current by each upsert, and written after
  a build, after 10,000 additions (or a fifth of the index) and at
  :meth:`~SqliteKnowledgeIndex.close`. At open it
  is caught up from SQLite, or rebuilt when missing, unreadable or another database's.

Every chunk's vector and token count are also held in memory (about 1.5 KB a chunk).

BM25 tokens (:func:`bm25_tokens`): text is NFKC-normalized and case-folded; runs of Chinese
(and Japanese, Korean) characters become overlapping character bigrams (a lone character
stays a unigram), other words stay whole, with English plurals reduced (``policies`` →
``policy``). Measured against jieba word segmentation on a Chinese retrieval set, bigrams
ranked as well, tokenized 12 times faster, need no dictionary, work for Japanese and
Korean too, and match OpenSearch's built-in ``cjk`` analyzer. The FTS5 table gets the
tokens space-separated, under its ``ascii`` tokenizer (which keeps each token whole);
its postings are read through ``fts5vocab`` and scored here.

Scope before ranking: both rankers consider only the chunks that the :class:`Scope`
admits (an SQL condition on tenant, collection and ACL), and BM25's statistics (chunk
count, average length, document frequencies) are computed over those chunks alone, so
what lies outside a scope changes no result, rank or score inside it. Vector search
scans the admitted chunks' vectors exactly while there are at most ``exact_search_max``
of them (or they are under a tenth of the index); otherwise it walks the HNSW graph with
a filter that admits only them, and scans exactly if the walk finds too few.

Thread safety: one lock serializes every call, so a search sees a document's chunks
before an upsert or after it, never a mix.

One module (~920 lines): the embedded back end of
:class:`~services.retrieval.index.KnowledgeIndex`; its SQLite schema, FTS5 and the HNSW
cache are kept consistent under one lock, which splitting would spread across modules.
"""

from __future__ import annotations

import json
import math
import os
import re
import sqlite3
import threading
import time
import unicodedata
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np
import numpy.typing as npt

from services.retrieval.index import (
    Chunk,
    CollectionInfo,
    DocumentInfo,
    Scope,
    Scored,
    Vectors,
)
from shared.files import private_file
from shared.logging import get_logger

log = get_logger(__name__)
_T = TypeVar("_T")

DATABASE_FILE = "kb.sqlite3"
HNSW_FILE = "vectors.hnsw.npz"
SCHEMA_VERSION = "1"
TOKENIZER = f"cjk-bigram-1/unicode-{unicodedata.unidata_version}"
MAX_QUERY_TERMS = 64
_CATCH_UP_UNDER_LOCK = 4096  # vectors a graph may lack and still be caught up in a call

# --------------------------------------------------------------------------- tokens

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
_TOKEN_RUNS = re.compile(f"([{_CJK}]+)|([^\\W_{_CJK}]+)")
_ENGLISH_STOPWORDS = (
    "a an and are as at be by do does for from has have how i in is it its of on or that the "
    "this to was were what when where which who why will with you your"
)
_STOPWORDS = frozenset(_ENGLISH_STOPWORDS.split())


def bm25_tokens(text: str) -> list[str]:
    """The search tokens of ``text``, in order (see the module docstring)."""
    tokens: list[str] = []
    for match in _TOKEN_RUNS.finditer(unicodedata.normalize("NFKC", text).casefold()):
        run, word = match.groups()
        if word:
            tokens.append(_minimal_stem(word))
        elif len(run) == 1:
            tokens.append(run)
        else:
            tokens.extend(run[i : i + 2] for i in range(len(run) - 1))
    return tokens


def query_terms(query: str) -> list[str]:
    """The distinct tokens of ``query``, without English stopwords unless it has nothing
    else; at most :data:`MAX_QUERY_TERMS`."""
    terms = list(dict.fromkeys(bm25_tokens(query)))
    content = [term for term in terms if term not in _STOPWORDS]
    return (content or terms)[:MAX_QUERY_TERMS]


def _minimal_stem(word: str) -> str:
    """English plural to singular, as Lucene's EnglishMinimalStemmer does."""
    n = len(word)
    if n < 3 or word[-1] != "s" or not word.isascii() or not word.isalpha():
        return word
    if word[-2] in "us":
        return word
    if word[-2] == "e":
        if n > 3 and word[-3] == "i" and word[-4] not in "ae":
            return word[:-3] + "y"
        if word[-3] in "iaoe":
            return word
    return word[:-1]


# --------------------------------------------------------------------------- schema

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS documents (
    tenant TEXT NOT NULL,
    collection TEXT NOT NULL,
    document_id TEXT NOT NULL,
    title TEXT NOT NULL,
    content_sha256 TEXT NOT NULL,
    content_type TEXT NOT NULL,
    chunks INTEGER NOT NULL,
    acl TEXT NOT NULL,
    metadata TEXT NOT NULL,
    indexed_at_ns INTEGER NOT NULL,
    PRIMARY KEY (tenant, collection, document_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant TEXT NOT NULL,
    collection TEXT NOT NULL,
    document_id TEXT NOT NULL,
    ordinal INTEGER NOT NULL,
    chunk_id TEXT NOT NULL,
    title TEXT NOT NULL,
    text TEXT NOT NULL,
    acl TEXT NOT NULL,
    public INTEGER NOT NULL,
    metadata TEXT NOT NULL,
    length INTEGER NOT NULL,
    vector BLOB NOT NULL,
    UNIQUE (tenant, collection, document_id, ordinal)
);
CREATE INDEX IF NOT EXISTS chunks_scope ON chunks (tenant, collection, public);
CREATE TABLE IF NOT EXISTS chunk_acl (
    grp TEXT NOT NULL,
    chunk INTEGER NOT NULL,
    PRIMARY KEY (grp, chunk)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS chunk_acl_chunk ON chunk_acl (chunk);
CREATE VIRTUAL TABLE IF NOT EXISTS chunk_terms USING fts5(tokens, tokenize = 'ascii');
CREATE VIRTUAL TABLE IF NOT EXISTS chunk_term_instances USING fts5vocab(chunk_terms, 'instance');
"""

_CHUNK_COLUMNS = (
    "c.id, c.chunk_id, c.document_id, c.tenant, c.collection, c.title, c.text, c.ordinal,"
    " c.acl, c.metadata"
)


class SqliteKnowledgeIndex:
    """A :class:`~services.retrieval.index.KnowledgeIndex` in a local directory."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        dim: int = 384,
        exact_search_max: int = 50_000,
        hnsw_m: int = 32,
        hnsw_ef_construction: int = 200,
        hnsw_ef_search: int = 128,
        bm25_k1: float = 1.2,
        bm25_b: float = 0.75,
    ) -> None:
        """Open (or create) the index in ``directory``.

        Args:
            dim: the embedding dimensions; an existing index of another size is refused.
            exact_search_max: a scope with at most this many chunks is searched exactly;
                the HNSW graph exists only once the index holds more chunks than this.
                On 2 cores an exact scan of 50k vectors takes 5-15 ms; the graph answers
                in 2-3 ms but slows upserts about 2.5 times and takes minutes to build.
            hnsw_m, hnsw_ef_construction, hnsw_ef_search: the HNSW graph's parameters.
            bm25_k1, bm25_b: BM25's term-frequency saturation and length normalization.

        Raises:
            ValueError: ``dim`` differs from the stored index's, or the schema is unknown.
        """
        self.dim = dim
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._exact_search_max = exact_search_max
        self._hnsw = _HnswParams(hnsw_m, hnsw_ef_construction, hnsw_ef_search)
        self._k1, self._b = bm25_k1, bm25_b
        self._lock = threading.RLock()
        self._cache: dict[tuple[Any, ...], Any] = {}
        self._closing = threading.Event()
        self._builder: threading.Thread | None = None
        self._graph_failed = False
        self._db = sqlite3.connect(
            private_file(self.directory / DATABASE_FILE),
            check_same_thread=False,
            isolation_level=None,
        )
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = FULL")
        self._db.executescript(_SCHEMA)  # idempotent; executescript commits on its own
        with self._transaction():
            self._uuid = self._check_meta()
        self._rows = _Rows(dim)
        with self._lock:
            self._load_rows()

    # ------------------------------------------------------------------ writes

    def upsert(self, document: DocumentInfo, chunks: Sequence[Chunk], vectors: Vectors) -> None:
        """Store ``document`` with exactly ``chunks`` (``vectors`` row-aligned), replacing
        its earlier version atomically.

        Raises:
            ValueError: chunks of another document, duplicate ordinals, a count that is
                not ``document.chunks``, or vectors of the wrong shape or not finite.
        """
        matrix = self._validate(document, chunks, vectors)
        key = (document.tenant, document.collection, document.document_id)
        rows: list[tuple[Chunk, str, int, bytes]] = []
        for chunk, vector in zip(chunks, matrix, strict=True):
            tokens = bm25_tokens(f"{chunk.title}\n{chunk.text}")
            rows.append((chunk, " ".join(tokens), len(tokens), vector.tobytes()))
        with self._lock:
            with self._transaction():
                removed = self._delete_rows(*key)
                added = [self._insert_chunk(*row) for row in rows]
                self._insert_document(document, len(chunks))
            # memory follows the database once the change is committed, not before
            self._rows.remove(removed)
            self._rows.add(np.array(added, dtype=np.int64), matrix, [row[2] for row in rows])
            self._after_write()

    def delete(self, tenant: str, collection: str, document_id: str) -> bool:
        """Remove the document and its chunks; False when there was none."""
        with self._lock:
            with self._transaction():
                existed = self._db.execute(
                    "SELECT 1 FROM documents"
                    " WHERE tenant = ? AND collection = ? AND document_id = ?",
                    (tenant, collection, document_id),
                ).fetchone()
                removed = self._delete_rows(tenant, collection, document_id)
            self._rows.remove(removed)
            self._after_write()
            return existed is not None

    def _after_write(self) -> None:
        self._cache.clear()
        graph = self._rows.graph
        if graph is not None and graph.unsaved >= max(10_000, self._rows.size // 5):
            self._save_graph()
        self._plan_graph()

    def _insert_chunk(self, chunk: Chunk, tokens: str, length: int, vector: bytes) -> int:
        cursor = self._db.execute(
            "INSERT INTO chunks (tenant, collection, document_id, ordinal, chunk_id,"
            " title, text, acl, public, metadata, length, vector)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                chunk.tenant,
                chunk.collection,
                chunk.document_id,
                chunk.ordinal,
                chunk.chunk_id,
                chunk.title,
                chunk.text,
                json.dumps(list(chunk.acl)),
                int(not chunk.acl),
                json.dumps(dict(chunk.metadata), sort_keys=True),
                length,
                vector,
            ),
        )
        rowid = int(cursor.lastrowid or 0)
        self._db.execute("INSERT INTO chunk_terms (rowid, tokens) VALUES (?, ?)", (rowid, tokens))
        self._db.executemany(
            "INSERT INTO chunk_acl (grp, chunk) VALUES (?, ?)",
            [(group, rowid) for group in sorted(set(chunk.acl))],
        )
        return rowid

    def _insert_document(self, document: DocumentInfo, chunks: int) -> None:
        self._db.execute(
            "INSERT INTO documents (tenant, collection, document_id, title, content_sha256,"
            " content_type, chunks, acl, metadata, indexed_at_ns)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                document.tenant,
                document.collection,
                document.document_id,
                document.title,
                document.content_sha256,
                document.content_type,
                chunks,
                json.dumps(list(document.acl)),
                json.dumps(dict(document.metadata), sort_keys=True),
                document.indexed_at_ns or time.time_ns(),
            ),
        )

    def _delete_rows(self, tenant: str, collection: str, document_id: str) -> list[int]:
        key = (tenant, collection, document_id)
        where = "tenant = ? AND collection = ? AND document_id = ?"
        rowids = [int(r[0]) for r in self._db.execute(f"SELECT id FROM chunks WHERE {where}", key)]
        for start in range(0, len(rowids), 500):
            batch = rowids[start : start + 500]
            marks = ",".join("?" * len(batch))
            self._db.execute(f"DELETE FROM chunk_terms WHERE rowid IN ({marks})", batch)
            self._db.execute(f"DELETE FROM chunk_acl WHERE chunk IN ({marks})", batch)
        self._db.execute(f"DELETE FROM chunks WHERE {where}", key)
        self._db.execute(f"DELETE FROM documents WHERE {where}", key)
        return rowids

    def _validate(
        self, document: DocumentInfo, chunks: Sequence[Chunk], vectors: Vectors
    ) -> npt.NDArray[np.float32]:
        key = (document.tenant, document.collection, document.document_id)
        if not all(isinstance(part, str) and part for part in key):
            raise ValueError(f"tenant, collection and document_id must be non-empty: {key}")
        if document.chunks != len(chunks):
            raise ValueError(f"document.chunks is {document.chunks} but {len(chunks)} were given")
        for chunk in chunks:
            if (chunk.tenant, chunk.collection, chunk.document_id) != key:
                raise ValueError(f"chunk {chunk.chunk_id!r} is not of document {key}")
        ordinals = [chunk.ordinal for chunk in chunks]
        if len(set(ordinals)) != len(ordinals):
            raise ValueError(f"duplicate chunk ordinals in document {key}")
        matrix = np.asarray(vectors, dtype=np.float32)
        if not chunks and matrix.size == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        if matrix.shape != (len(chunks), self.dim):
            raise ValueError(f"vectors: expected {len(chunks)}x{self.dim}, got {np.shape(vectors)}")
        norms = np.linalg.norm(matrix, axis=1, keepdims=True)
        if not np.isfinite(matrix).all() or (norms == 0).any():
            raise ValueError("vectors must be finite and non-zero")
        return np.ascontiguousarray(matrix / norms, dtype=np.float32)

    # ------------------------------------------------------------------ reads

    def document(self, tenant: str, collection: str, document_id: str) -> DocumentInfo | None:
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM documents WHERE tenant = ? AND collection = ? AND document_id = ?",
                (tenant, collection, document_id),
            ).fetchone()
        return _document_info(row) if row else None

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
        readable, groups = _readable(readers)
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM documents WHERE tenant = ? AND collection = ? AND document_id > ?"
                f"{readable} ORDER BY document_id LIMIT ?",
                (tenant, collection, after or "", *groups, max(0, limit)),
            ).fetchall()
        return [_document_info(row) for row in rows]

    def collections(
        self, tenant: str, *, readers: Sequence[str] | None = None
    ) -> list[CollectionInfo]:
        readable, groups = _readable(readers)
        with self._lock:
            rows = self._db.execute(
                "SELECT collection, count(*), total(chunks) FROM documents WHERE tenant = ?"
                f"{readable} GROUP BY collection ORDER BY collection",
                (tenant, *groups),
            ).fetchall()
        return [CollectionInfo(tenant, name, int(docs), int(n)) for name, docs, n in rows]

    def search_bm25(self, scope: Scope, query: str, k: int) -> list[Scored]:
        """The ``k`` best chunks in ``scope`` for ``query`` by BM25 (Okapi, Lucene's IDF),
        with the statistics of ``scope``'s chunks only; best first."""
        terms = query_terms(query)
        if k <= 0 or not terms or not scope.collections:
            return []
        rows = self._rows
        with self._lock:
            admitted = self._admitted(scope)
            if admitted.size == 0:
                return []
            inside = self._cached(("mask", scope), lambda: rows.mask(admitted))
            lengths = rows.lengths[: rows.size]
            average_length = max(float(lengths[admitted].sum()) / admitted.size, 1.0)
            scores = np.zeros(rows.size, dtype=np.float64)
            for term in terms:
                instances = self._db.execute(
                    "SELECT doc FROM chunk_term_instances WHERE term = ?", (term,)
                ).fetchall()
                positions = rows.positions(np.array([r[0] for r in instances], dtype=np.int64))
                positions = positions[positions >= 0]
                matched, tf = np.unique(positions[inside[positions]], return_counts=True)
                if matched.size == 0:
                    continue
                idf = math.log(1 + (admitted.size - matched.size + 0.5) / (matched.size + 0.5))
                norm = self._k1 * (1 - self._b + self._b * lengths[matched] / average_length)
                scores[matched] += idf * tf * (self._k1 + 1) / (tf + norm)
            best = _top(scores, np.flatnonzero(scores), rows.rowids, k)
            chunks = self._chunks([rows.rowid_at(p) for p in best])
        return [Scored(chunks[rows.rowid_at(p)], float(scores[p])) for p in best]

    def search_vector(self, scope: Scope, vector: Vectors, k: int) -> list[Scored]:
        """The ``k`` chunks in ``scope`` nearest ``vector`` [D] by cosine, best first."""
        query = np.asarray(vector, dtype=np.float32).reshape(-1)
        if query.shape != (self.dim,):
            raise ValueError(f"the query vector must have {self.dim} dimensions")
        if k <= 0 or not scope.collections:
            return []
        rows = self._rows
        with self._lock:
            admitted = self._admitted(scope)
            if admitted.size == 0:
                return []
            found = None
            graph = rows.graph
            large = admitted.size > self._exact_search_max and admitted.size * 10 >= rows.live
            if graph is not None and large:
                inside = self._cached(("mask", scope), lambda: rows.mask(admitted))
                found = graph.search(
                    inside, query, k, self._hnsw.ef_for(k, admitted.size, rows.live)
                )
                if found[0].size < min(k, admitted.size):
                    found = None  # the walk ran out of admitted neighbours: scan instead
            if found is None:
                if admitted.size * 4 > rows.size:  # one pass over all beats a gather
                    scores = (rows.matrix[: rows.size] @ query)[admitted]
                else:
                    scores = rows.matrix[admitted] @ query
                order = _top(scores, np.arange(admitted.size), rows.rowids[admitted], k)
                found = (admitted[order], scores[order])
            rowids = [rows.rowid_at(p) for p in found[0]]
            chunks = self._chunks(rowids)
        return [Scored(chunks[r], float(s)) for r, s in zip(rowids, found[1], strict=True)]

    def _admitted(self, scope: Scope) -> npt.NDArray[np.int64]:
        """The positions of the chunks ``scope`` admits (from SQL; cached until a write)."""

        def compute() -> npt.NDArray[np.int64]:
            where, params = _scope_filter(scope)
            rowids = self._db.execute(f"SELECT c.id FROM chunks c WHERE {where}", params)
            return self._rows.positions(np.array([r[0] for r in rowids], dtype=np.int64))

        return self._cached(("admitted", scope), compute)

    def _chunks(self, rowids: list[int]) -> dict[int, Chunk]:
        chunks: dict[int, Chunk] = {}
        for start in range(0, len(rowids), 500):
            batch = rowids[start : start + 500]
            marks = ",".join("?" * len(batch))
            for row in self._db.execute(
                f"SELECT {_CHUNK_COLUMNS} FROM chunks c WHERE c.id IN ({marks})", batch
            ):
                chunks[int(row[0])] = _chunk(row)
        return chunks

    def _cached(self, key: tuple[Any, ...], compute: Callable[[], _T]) -> _T:
        if key not in self._cache:
            if len(self._cache) >= 256:
                self._cache.clear()
            self._cache[key] = compute()
        return cast(_T, self._cache[key])

    # ------------------------------------------------------------------ the HNSW graph

    def wait_for_graph(self, timeout: float | None = None) -> bool:
        """Wait until no graph build runs; True when the index now has a graph.

        Searches never wait for a build (they scan exactly meanwhile); benchmarks and
        tests that mean to measure the graph do.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while (builder := self._builder) is not None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            builder.join(left)  # a build may start another (rows renumbered meanwhile)
        return self._rows.graph is not None

    def _plan_graph(self) -> None:
        """Start building the graph in the background when the index has outgrown exact
        scans and has none. (Once built it is kept, even if the index shrinks.)"""
        rows = self._rows
        idle = rows.graph is None and self._builder is None and not self._graph_failed
        if idle and rows.live > self._exact_search_max:
            self._start_builder(None)

    def _start_builder(self, base: Any) -> None:
        """Add the vectors missing from ``base`` (or a new graph) in a thread, then
        attach it if the rows were not renumbered meanwhile."""
        rows = self._rows
        generation = rows.generation
        start = 0 if base is None else int(base.ntotal)
        snapshot = rows.matrix[start : rows.size].copy()

        def build() -> None:
            started = time.perf_counter()
            graph = None
            try:
                graph = base if base is not None else self._hnsw.new_index(self.dim)
                for offset in range(0, len(snapshot), 1024):  # close() can stop it between
                    if self._closing.is_set():
                        graph = None
                        break
                    graph.add(snapshot[offset : offset + 1024])
            except Exception:
                log.exception("building the HNSW graph failed; vector searches stay exact")
                self._graph_failed = True
                graph = None
            finally:
                with self._lock:
                    self._builder = None
                    if graph is not None and not self._closing.is_set():
                        self._attach_built(graph, generation, started)

        self._builder = threading.Thread(target=build, name="kb-hnsw-build", daemon=True)
        self._builder.start()

    def _attach_built(self, graph: Any, generation: int, started: float) -> None:
        rows = self._rows
        if rows.generation != generation:
            self._plan_graph()  # the rows were renumbered while it was built: again
            return
        if rows.size - int(graph.ntotal) > _CATCH_UP_UNDER_LOCK:
            self._start_builder(graph)  # many were added meanwhile: add them outside the lock
            return
        rows.attach(_Graph(graph))
        log.info(
            "the HNSW graph is ready",
            vectors=rows.size,
            seconds=round(time.perf_counter() - started, 2),
        )
        self._save_graph()

    def _save_graph(self) -> None:
        """Write the graph and its position -> rowid map to one file, atomically."""
        import faiss

        graph = self._rows.graph
        if graph is None:
            return
        path = self.directory / HNSW_FILE
        partial = path.with_suffix(".partial.npz")
        with partial.open("wb") as out:
            np.savez(
                out,
                index=faiss.serialize_index(graph.index),
                rowids=self._rows.rowids[: graph.index.ntotal],
                uuid=np.array(self._uuid),
            )
            out.flush()
            os.fsync(out.fileno())
        partial.replace(path)
        graph.unsaved = 0

    def _read_graph(self) -> tuple[Any, npt.NDArray[np.int64]] | None:
        path = self.directory / HNSW_FILE
        if not path.exists():
            return None
        try:
            return self._load_graph(path)
        except Exception as error:
            log.warning("ignoring the saved HNSW graph", path=str(path), error=str(error))
            return None

    def _load_graph(self, path: Path) -> tuple[Any, npt.NDArray[np.int64]]:
        import faiss

        with np.load(path, allow_pickle=False) as saved:
            if str(saved["uuid"]) != self._uuid:
                raise ValueError("it belongs to another database")
            rowids = saved["rowids"].astype(np.int64)
            index = faiss.deserialize_index(saved["index"])
        if index.ntotal != rowids.size or index.d != self.dim:
            raise ValueError("its size does not match its row map")
        return index, rowids

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Stop a graph build, save the graph if it changed, close the database."""
        with self._lock:
            graph = self._rows.graph
            if graph is not None and graph.unsaved:
                self._save_graph()
            self._closing.set()
        builder = self._builder
        if builder is not None:
            builder.join(timeout=60)
        with self._lock:
            self._db.close()

    def __enter__(self) -> SqliteKnowledgeIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _check_meta(self) -> str:
        meta = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
        if not meta:
            meta = {
                "schema": SCHEMA_VERSION,
                "dim": str(self.dim),
                "tokenizer": TOKENIZER,
                "uuid": uuid.uuid4().hex,
            }
            self._db.executemany("INSERT INTO meta VALUES (?, ?)", list(meta.items()))
        if meta["schema"] != SCHEMA_VERSION:
            raise ValueError(
                f"{self.directory / DATABASE_FILE} has schema {meta['schema']}; "
                f"this code reads {SCHEMA_VERSION}"
            )
        if int(meta["dim"]) != self.dim:
            raise ValueError(
                f"{self.directory / DATABASE_FILE} holds {meta['dim']}-dimensional vectors; "
                f"it was opened with dim={self.dim}"
            )
        if meta["tokenizer"] != TOKENIZER:
            self._retokenize(meta["tokenizer"])
        return str(meta["uuid"])

    def _retokenize(self, old: str) -> None:
        """Rebuild the BM25 tokens after a tokenizer change (or a Unicode data change)."""
        log.info("retokenizing the knowledge index", old=old, new=TOKENIZER)
        self._db.execute("DELETE FROM chunk_terms")
        rows = self._db.execute("SELECT id, title, text FROM chunks").fetchall()
        for rowid, title, text in rows:
            tokens = bm25_tokens(f"{title}\n{text}")
            self._db.execute(
                "INSERT INTO chunk_terms (rowid, tokens) VALUES (?, ?)", (rowid, " ".join(tokens))
            )
            self._db.execute("UPDATE chunks SET length = ? WHERE id = ?", (len(tokens), rowid))
        self._db.execute("UPDATE meta SET value = ? WHERE key = 'tokenizer'", (TOKENIZER,))

    def _load_rows(self) -> None:
        """Vectors and lengths from SQLite, in the saved graph's order when it is usable."""
        saved = self._read_graph()
        order = saved[1].tolist() if saved else []
        stored = {
            int(rowid): (blob, int(length))
            for rowid, blob, length in self._db.execute(
                "SELECT id, vector, length FROM chunks ORDER BY id"
            )
        }
        placeholder = (bytes(4 * self.dim), 0)  # for rows deleted since the graph was saved
        in_graph = set(order)
        rowids = [*order, *(rowid for rowid in stored if rowid not in in_graph)]
        if rowids:
            values = [stored.get(rowid, placeholder) for rowid in rowids]
            matrix = np.frombuffer(b"".join(blob for blob, _ in values), dtype=np.float32)
            self._rows.add(
                np.array(rowids, dtype=np.int64),
                matrix.reshape(-1, self.dim),
                [length for _, length in values],
            )
        self._rows.remove([rowid for rowid in order if rowid not in stored], compact=False)
        if saved is not None and self._rows.live > self._exact_search_max:
            if self._rows.size - int(saved[0].ntotal) <= _CATCH_UP_UNDER_LOCK:
                self._rows.attach(_Graph(saved[0]))
            else:
                self._start_builder(saved[0])
        self._plan_graph()


def _top(
    scores: npt.NDArray[Any],
    candidates: npt.NDArray[np.int64],
    tiebreak: npt.NDArray[np.int64],
    k: int,
) -> npt.NDArray[np.int64]:
    """The ``k`` of ``candidates`` (indices into ``scores``) with the highest scores, best
    first; equal scores in ``tiebreak`` order."""
    if candidates.size > k:
        candidates = candidates[np.argpartition(-scores[candidates], k - 1)[:k]]
    order = np.lexsort((tiebreak[candidates], -scores[candidates]))
    return candidates[order]


def _scope_filter(scope: Scope) -> tuple[str, list[Any]]:
    """SQL over chunks ``c`` admitting exactly the chunks ``scope`` admits."""
    collections = sorted(set(scope.collections))
    groups = sorted(set(scope.groups))
    where = f"c.tenant = ? AND c.collection IN ({','.join('?' * len(collections))})"
    params: list[Any] = [scope.tenant, *collections]
    if groups:
        where += (
            " AND (c.public = 1 OR c.id IN (SELECT chunk FROM chunk_acl"
            f" WHERE grp IN ({','.join('?' * len(groups))})))"
        )
        params += groups
    else:
        where += " AND c.public = 1"
    return where, params


def _chunk(row: Sequence[Any]) -> Chunk:
    _, chunk_id, document_id, tenant, collection, title, text, ordinal, acl, metadata = row
    return Chunk(
        chunk_id=chunk_id,
        document_id=document_id,
        tenant=tenant,
        collection=collection,
        title=title,
        text=text,
        ordinal=int(ordinal),
        acl=tuple(json.loads(acl)),
        metadata=_mapping(metadata),
    )


def _readable(readers: Sequence[str] | None) -> tuple[str, list[str]]:
    """An SQL condition on ``documents`` (and its parameters) admitting the documents whose
    ACL is empty or names one of ``readers``; no condition for None."""
    if readers is None:
        return "", []
    groups = list(dict.fromkeys(readers))
    if not groups:
        return " AND acl = '[]'", []
    marks = ", ".join("?" * len(groups))
    return (
        " AND (acl = '[]' OR EXISTS (SELECT 1 FROM json_each(documents.acl)"
        f" WHERE value IN ({marks})))",
        groups,
    )


def _document_info(row: Sequence[Any]) -> DocumentInfo:
    tenant, collection, document_id, title, sha, content_type, chunks, acl, metadata, at = row
    return DocumentInfo(
        tenant=tenant,
        collection=collection,
        document_id=document_id,
        title=title,
        content_sha256=sha,
        content_type=content_type,
        chunks=int(chunks),
        acl=tuple(json.loads(acl)),
        metadata=_mapping(metadata),
        indexed_at_ns=int(at),
    )


def _mapping(text: str) -> Mapping[str, str]:
    value = json.loads(text)
    return {str(k): str(v) for k, v in value.items()}


# --------------------------------------------------------------------------- in memory


class _HnswParams:
    def __init__(self, m: int, ef_construction: int, ef_search: int) -> None:
        self.m, self.ef_construction, self.ef_search = m, ef_construction, ef_search

    def new_index(self, dim: int) -> Any:
        import faiss

        index = faiss.IndexHNSWFlat(dim, self.m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = self.ef_construction
        index.hnsw.efSearch = self.ef_search
        return index

    def ef_for(self, k: int, admitted: int, live: int) -> int:
        """A wider beam when the filter admits a small part of the graph."""
        return max(self.ef_search, 2 * k, math.ceil(k * live / max(admitted, 1)))


class _Graph:
    """A faiss HNSW index whose ids are positions in :class:`_Rows`."""

    def __init__(self, index: Any, *, unsaved: int = 0) -> None:
        self.index = index
        self.unsaved = unsaved  # vectors added since it was last written

    def search(
        self, inside: npt.NDArray[np.bool_], query: npt.NDArray[np.float32], k: int, ef: int
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
        """The nearest admitted positions: the filter applies during the walk."""
        import faiss

        bitmap = np.packbits(inside, bitorder="little")  # inside: one flag per position
        selector = faiss.IDSelectorBitmap(inside.size, faiss.swig_ptr(bitmap))
        params = cast(Any, faiss).SearchParametersHNSW(sel=selector, efSearch=ef)
        scores, ids = self.index.search(query.reshape(1, -1), k, params=params)
        keep = ids[0] >= 0
        return ids[0][keep].astype(np.int64), scores[0][keep].astype(np.float32)


class _Rows:
    """Every chunk's vector and token count in memory, one row per position.

    Positions of removed chunks stay as holes (rowid -1) until more than half are holes;
    then the rows are renumbered (``generation`` changes) and the graph dropped.
    """

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.matrix = np.zeros((0, dim), dtype=np.float32)
        self.lengths = np.zeros(0, dtype=np.float64)
        self.rowids = np.zeros(0, dtype=np.int64)
        self._position = np.zeros(0, dtype=np.int64)  # rowid -> position, -1 for none
        self.size = 0
        self.live = 0
        self.generation = 0
        self.graph: _Graph | None = None

    def rowid_at(self, position: int) -> int:
        return int(self.rowids[position])

    def positions(self, rowids: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """Where each rowid's row is; -1 for rowids this store does not hold."""
        known = (rowids >= 0) & (rowids < self._position.size)
        found = np.full(rowids.size, -1, dtype=np.int64)
        found[known] = self._position[rowids[known]]
        return found

    def mask(self, positions: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
        inside = np.zeros(self.size, dtype=bool)
        inside[positions] = True
        return inside

    def add(
        self, rowids: npt.NDArray[np.int64], vectors: npt.NDArray[np.float32], lengths: list[int]
    ) -> None:
        if rowids.size == 0:
            return
        need = self.size + rowids.size
        if need > self.matrix.shape[0]:
            capacity = max(need, 2 * self.matrix.shape[0], 1024)
            self.matrix = _grow(self.matrix, capacity)
            self.lengths = _grow(self.lengths, capacity)
            self.rowids = _grow(self.rowids, capacity)
        top = int(rowids.max()) + 1
        if top > self._position.size:
            grown = np.full(max(top, 2 * self._position.size), -1, dtype=np.int64)
            grown[: self._position.size] = self._position
            self._position = grown
        self.matrix[self.size : need] = vectors
        self.lengths[self.size : need] = lengths
        self.rowids[self.size : need] = rowids
        self._position[rowids] = np.arange(self.size, need)
        self.size = need
        self.live += rowids.size
        if self.graph is not None:
            self.graph.index.add(self.matrix[self.graph.index.ntotal : self.size])
            self.graph.unsaved += rowids.size

    def remove(self, rowids: Sequence[int], *, compact: bool = True) -> None:
        if not len(rowids):
            return
        ids = np.array(rowids, dtype=np.int64)
        positions = self.positions(ids)
        held = positions >= 0
        self.rowids[positions[held]] = -1
        self._position[ids[held]] = -1
        self.live -= int(held.sum())
        if compact and self.size > 1024 and self.live * 2 < self.size:
            self._compact()

    def attach(self, graph: _Graph) -> None:
        """Use ``graph`` (its ids are positions), first adding the rows it lacks."""
        behind = self.size - int(graph.index.ntotal)
        if behind > 0:
            graph.index.add(self.matrix[graph.index.ntotal : self.size])
            graph.unsaved += behind
        self.graph = graph

    def _compact(self) -> None:
        keep = self.rowids[: self.size] >= 0
        self.matrix = np.ascontiguousarray(self.matrix[: self.size][keep])
        self.lengths = self.lengths[: self.size][keep]
        self.rowids = self.rowids[: self.size][keep]
        self.size = self.live = int(keep.sum())
        self._position[:] = -1
        self._position[self.rowids] = np.arange(self.size)
        self.generation += 1
        self.graph = None  # its ids were the old positions; rebuilt in the background


def _grow(array: npt.NDArray[Any], capacity: int) -> npt.NDArray[Any]:
    grown = np.zeros((capacity, *array.shape[1:]), dtype=array.dtype)
    grown[: array.shape[0]] = array
    return grown
