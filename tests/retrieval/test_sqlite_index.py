"""SqliteKnowledgeIndex: storage, durability, BM25 and vector search, and scope isolation."""

from __future__ import annotations

import itertools
import sqlite3
import threading
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from services.retrieval.index import Chunk, DocumentInfo, Scope, Vectors
from services.retrieval.sqlite_index import (
    DATABASE_FILE,
    HNSW_FILE,
    SqliteKnowledgeIndex,
    _Graph,
    _HnswParams,
    bm25_tokens,
    query_terms,
)
from tests.retrieval.corpus import DOCUMENTS

DIM = 16
ACME = Scope("acme", ("policies",))


def unit(seed: int | str, dim: int = DIM) -> Vectors:
    rng = np.random.default_rng(zlib.crc32(seed.encode()) if isinstance(seed, str) else seed)
    vector = rng.standard_normal(dim).astype(np.float32)
    return vector / np.linalg.norm(vector)


def put(
    index: SqliteKnowledgeIndex,
    document_id: str,
    texts: Sequence[str],
    *,
    tenant: str = "acme",
    collection: str = "policies",
    title: str = "",
    acl: tuple[str, ...] = (),
    vectors: Vectors | None = None,
    sha: str = "sha",
) -> list[Chunk]:
    chunks = [
        Chunk(
            chunk_id=f"{document_id}#{n}",
            document_id=document_id,
            tenant=tenant,
            collection=collection,
            title=title or document_id,
            text=text,
            ordinal=n,
            acl=acl,
            metadata={"source": "test"},
        )
        for n, text in enumerate(texts)
    ]
    if vectors is None:
        vectors = np.stack([unit(f"{tenant}/{document_id}/{t}", index.dim) for t in texts])
    document = DocumentInfo(
        tenant=tenant,
        collection=collection,
        document_id=document_id,
        title=title or document_id,
        content_sha256=sha,
        content_type="text/plain",
        chunks=len(chunks),
        acl=acl,
        metadata={"source": "test"},
        indexed_at_ns=1,
    )
    index.upsert(document, chunks, vectors.reshape(len(texts), index.dim))
    return chunks


@pytest.fixture
def index(tmp_path: Path) -> Iterator[SqliteKnowledgeIndex]:
    with SqliteKnowledgeIndex(tmp_path / "kb", dim=DIM) as opened:
        yield opened


def ids(results: Sequence[object]) -> list[str]:
    return [r.chunk.chunk_id for r in results]  # type: ignore[attr-defined]


# ------------------------------------------------------------------ tokens


def test_tokens_chinese_bigrams_english_words() -> None:
    assert bm25_tokens("员工年假 Policies for VPN-Access 2024") == [
        "员工",
        "工年",
        "年假",
        "policy",
        "for",
        "vpn",
        "access",
        "2024",
    ]
    assert bm25_tokens("猫。ＡＢＣ　Ｄays") == ["猫", "abc", "day"]  # NFKC: full-width forms
    assert bm25_tokens("ひらがなとカタカナ 한국어") == [
        "ひら", "らが", "がな", "なと", "とカ", "カタ", "タカ", "カナ", "한국", "국어"
    ]  # fmt: skip
    assert query_terms("What is the policy for the policies?") == ["policy"]
    assert query_terms("the who") == ["the", "who"]  # only stopwords: keep them


# ------------------------------------------------------------------ storage


def test_upsert_get_list_and_collections(index: SqliteKnowledgeIndex) -> None:
    put(index, "b-doc", ["one", "two"])
    put(index, "a-doc", ["three"], title="A title", acl=("hr",))
    put(index, "c-doc", ["four"], collection="other")
    put(index, "z-doc", ["five"], tenant="globex")
    info = index.document("acme", "policies", "a-doc")
    assert info is not None
    assert (info.title, info.chunks, info.acl, dict(info.metadata)) == (
        "A title",
        1,
        ("hr",),
        {"source": "test"},
    )
    assert index.document("acme", "policies", "nope") is None
    assert index.document("globex", "policies", "a-doc") is None
    assert [d.document_id for d in index.documents("acme", "policies")] == ["a-doc", "b-doc"]
    assert [d.document_id for d in index.documents("acme", "policies", after="a-doc")] == ["b-doc"]
    assert [d.document_id for d in index.documents("acme", "policies", limit=1)] == ["a-doc"]
    assert [(c.collection, c.documents, c.chunks) for c in index.collections("acme")] == [
        ("other", 1, 1),
        ("policies", 2, 3),
    ]
    assert [c.collection for c in index.collections("globex")] == ["policies"]
    assert index.collections("nobody") == []


def test_upsert_replaces_all_chunks_and_is_idempotent(index: SqliteKnowledgeIndex) -> None:
    put(index, "doc", ["old alpha text", "old beta text", "old gamma text"], sha="v1")
    put(index, "doc", ["new delta text"], sha="v2")
    put(index, "doc", ["new delta text"], sha="v2")
    info = index.document("acme", "policies", "doc")
    assert info is not None
    assert (info.chunks, info.content_sha256) == (1, "v2")
    assert index.search_bm25(ACME, "alpha beta gamma", 10) == []
    assert ids(index.search_bm25(ACME, "delta", 10)) == ["doc#0"]
    found = index.search_vector(ACME, unit("acme/doc/new delta text"), 10)
    assert [(s.chunk.text, round(s.score, 5)) for s in found] == [("new delta text", 1.0)]
    assert index.collections("acme")[0].chunks == 1


def test_delete(index: SqliteKnowledgeIndex) -> None:
    put(index, "doc", ["removable text"])
    put(index, "keep", ["kept text"])
    assert index.delete("acme", "policies", "doc") is True
    assert index.delete("acme", "policies", "doc") is False
    assert index.document("acme", "policies", "doc") is None
    assert ids(index.search_bm25(ACME, "removable text", 10)) == ["keep#0"]
    assert ids(index.search_vector(ACME, unit(1), 10)) == ["keep#0"]
    assert index.delete("acme", "policies", "keep") is True
    assert index.collections("acme") == []
    assert index.search_vector(ACME, unit(1), 10) == []


def test_invalid_upserts_are_refused_and_change_nothing(index: SqliteKnowledgeIndex) -> None:
    put(index, "doc", ["original"])
    chunk = Chunk("x#0", "x", "acme", "policies", "t", "text", 0)
    document = DocumentInfo("acme", "policies", "x", "t", "s", "text/plain", 1, (), {}, 0)
    with pytest.raises(ValueError, match=r"vectors: expected 1x16, got \(3, 16\)"):
        index.upsert(document, [chunk], np.ones((3, DIM), dtype=np.float32))
    with pytest.raises(ValueError, match="finite and non-zero"):
        index.upsert(document, [chunk], np.zeros((1, DIM), dtype=np.float32))
    with pytest.raises(ValueError, match="finite and non-zero"):
        index.upsert(document, [chunk], np.full((1, DIM), np.nan, dtype=np.float32))
    wrong = DocumentInfo("acme", "policies", "doc", "t", "s", "text/plain", 1, (), {}, 0)
    with pytest.raises(ValueError, match="not of document"):
        index.upsert(wrong, [chunk], unit(0).reshape(1, DIM))
    with pytest.raises(ValueError, match=r"document\.chunks is 2"):
        index.upsert(
            DocumentInfo("acme", "policies", "x", "t", "s", "text/plain", 2, (), {}, 0),
            [chunk],
            unit(0).reshape(1, DIM),
        )
    with pytest.raises(ValueError, match="query vector"):
        index.search_vector(ACME, np.ones(DIM + 1, dtype=np.float32), 3)
    assert ids(index.search_bm25(ACME, "original", 5)) == ["doc#0"]


def test_a_failed_upsert_leaves_the_old_version(
    index: SqliteKnowledgeIndex, monkeypatch: pytest.MonkeyPatch
) -> None:
    put(index, "doc", ["first version"], sha="v1")

    def broken(*args: object) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(index, "_insert_document", broken)
    with pytest.raises(sqlite3.OperationalError):
        put(index, "doc", ["second version", "more"], sha="v2")
    monkeypatch.undo()
    info = index.document("acme", "policies", "doc")
    assert info is not None
    assert info.content_sha256 == "v1"
    assert [s.chunk.text for s in index.search_bm25(ACME, "version", 5)] == ["first version"]
    assert [s.chunk.text for s in index.search_vector(ACME, unit(0), 5)] == ["first version"]


def test_durable_across_reopen(tmp_path: Path) -> None:
    directory = tmp_path / "kb"
    with SqliteKnowledgeIndex(directory, dim=DIM) as first:
        put(first, "doc", ["年假需要提前两周申请", "vacation requests need two weeks"])
        put(first, "gone", ["deleted later"])
        first.delete("acme", "policies", "gone")
        before = (
            first.search_bm25(ACME, "年假申请", 5),
            first.search_vector(ACME, unit(3), 5),
            first.documents("acme", "policies"),
        )
    with SqliteKnowledgeIndex(directory, dim=DIM) as second:
        after = (
            second.search_bm25(ACME, "年假申请", 5),
            second.search_vector(ACME, unit(3), 5),
            second.documents("acme", "policies"),
        )
    assert after == before
    assert [s.chunk.text for s in after[0]][:1] == ["年假需要提前两周申请"]


def test_committed_writes_survive_without_close(tmp_path: Path) -> None:
    crashed = SqliteKnowledgeIndex(tmp_path / "kb", dim=DIM)
    put(crashed, "doc", ["written before the crash"])
    reopened = SqliteKnowledgeIndex(tmp_path / "kb", dim=DIM)  # the first was never closed
    assert ids(reopened.search_bm25(ACME, "crash", 5)) == ["doc#0"]
    assert len(reopened.search_vector(ACME, unit(0), 5)) == 1
    reopened.close()
    crashed.close()


def test_reopening_with_another_dimension_is_refused(tmp_path: Path) -> None:
    SqliteKnowledgeIndex(tmp_path / "kb", dim=DIM).close()
    with pytest.raises(ValueError, match="holds 16-dimensional vectors; it was opened with dim=8"):
        SqliteKnowledgeIndex(tmp_path / "kb", dim=8)


def test_a_tokenizer_change_retokenizes_at_open(tmp_path: Path) -> None:
    with SqliteKnowledgeIndex(tmp_path / "kb", dim=DIM) as first:
        put(first, "doc", ["报销单必须在三十天内提交"])
    db = sqlite3.connect(tmp_path / "kb" / DATABASE_FILE)
    db.execute("UPDATE meta SET value = 'an-older-tokenizer' WHERE key = 'tokenizer'")
    db.execute("DELETE FROM chunk_terms")  # as if the old tokens were unusable
    db.commit()
    db.close()
    with SqliteKnowledgeIndex(tmp_path / "kb", dim=DIM) as second:
        assert ids(second.search_bm25(ACME, "报销", 5)) == ["doc#0"]


# ------------------------------------------------------------------ BM25


@pytest.fixture
def corpus(index: SqliteKnowledgeIndex) -> SqliteKnowledgeIndex:
    for document_id, (title, text) in DOCUMENTS.items():
        put(index, document_id, [text], title=title)
    return index


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("数据库多久备份一次", "backup-zh"),
        ("年假可以顺延到明年吗", "annual-leave-zh"),
        ("采购超过五万元", "procurement-zh"),
        ("食堂", "canteen-zh"),
        ("陪产假", "maternity-zh"),
        ("how many vacation days per year", "vacation"),
        ("hotel receipts reimbursed", "expenses"),
        ("VPN token", "remote-access"),
        ("Report Phish button", "phishing"),
        ("visitors day pass", "parking"),
    ],
)
def test_bm25_finds_chinese_and_english(
    corpus: SqliteKnowledgeIndex, query: str, expected: str
) -> None:
    results = corpus.search_bm25(ACME, query, 3)
    assert results[0].chunk.document_id == expected
    assert all(a.score >= b.score for a, b in itertools.pairwise(results))


def test_bm25_matches_the_title_and_single_characters(corpus: SqliteKnowledgeIndex) -> None:
    assert corpus.search_bm25(ACME, "Annual leave", 1)[0].chunk.document_id == "vacation"
    put(corpus, "cat", ["我的猫很可爱"])
    assert "cat#0" not in ids(corpus.search_bm25(ACME, "猫", 5))  # inside a run: bigrams only
    put(corpus, "cat2", ["猫 是 动物"])
    assert ids(corpus.search_bm25(ACME, "猫", 5)) == ["cat2#0"]


def test_bm25_nothing_to_match(corpus: SqliteKnowledgeIndex) -> None:
    assert corpus.search_bm25(ACME, "zebra", 5) == []
    assert corpus.search_bm25(ACME, "?!", 5) == []
    assert corpus.search_bm25(ACME, "VPN", 0) == []
    assert corpus.search_bm25(Scope("acme", ()), "VPN", 5) == []


# ------------------------------------------------------------------ vectors


def test_vector_search_is_exact_cosine(index: SqliteKnowledgeIndex) -> None:
    rng = np.random.default_rng(7)
    vectors = rng.standard_normal((50, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    put(index, "many", [f"chunk {n}" for n in range(50)], vectors=vectors)
    query = unit(99)
    found = index.search_vector(ACME, query, 7)
    expected = np.argsort(-(vectors @ query))[:7]
    assert [s.chunk.ordinal for s in found] == expected.tolist()
    assert [s.score for s in found] == pytest.approx((vectors @ query)[expected].tolist(), abs=1e-5)
    assert len(index.search_vector(ACME, query, 500)) == 50


def graph_searches(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts searches that walk the HNSW graph."""
    calls: list[int] = []
    original = _Graph.search

    def counted(self: _Graph, *args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(_Graph, "search", counted)
    return calls


def test_vector_search_through_the_hnsw_graph(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    walks = graph_searches(monkeypatch)
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((300, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    query = unit(5)
    with SqliteKnowledgeIndex(tmp_path / "kb", dim=DIM, exact_search_max=100) as index:
        put(index, "few", [f"c{n}" for n in range(100)], vectors=vectors[:100])
        assert not index.wait_for_graph(timeout=30)  # exact scans suffice: no graph
        put(index, "many", [f"c{n}" for n in range(200)], vectors=vectors[100:])
        assert index.wait_for_graph(timeout=30)
        truth = np.argsort(-(vectors @ query))[:10].tolist()
        found = index.search_vector(ACME, query, 10)
        ordinals = [s.chunk.ordinal + (100 if s.chunk.document_id == "many" else 0) for s in found]
        assert len(set(ordinals) & set(truth)) >= 9
        assert walks == [1]
    assert (tmp_path / "kb" / HNSW_FILE).exists()
    with SqliteKnowledgeIndex(tmp_path / "kb", dim=DIM, exact_search_max=100) as reopened:
        assert reopened._rows.graph is not None  # loaded from the file, no rebuild
        assert reopened._builder is None
        put(reopened, "late", ["added after the save"], vectors=query.reshape(1, DIM))
        assert reopened._rows.graph.index.ntotal == reopened._rows.size
        assert reopened.search_vector(ACME, query, 1)[0].chunk.document_id == "late"
        assert walks == [1, 1]


def test_searches_do_not_wait_for_the_graph(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    walks = graph_searches(monkeypatch)
    release = threading.Event()
    original = _HnswParams.new_index

    def slow(self: _HnswParams, dim: int) -> Any:
        assert release.wait(30)
        return original(self, dim)

    monkeypatch.setattr(_HnswParams, "new_index", slow)
    with SqliteKnowledgeIndex(tmp_path / "kb", dim=DIM, exact_search_max=0) as index:
        put(index, "doc", ["a", "b", "c"])
        assert not index.wait_for_graph(timeout=0.1)  # still building
        best = index.search_vector(ACME, unit("acme/doc/b"), 3)
        assert [s.chunk.text for s in best][:1] == ["b"]
        assert walks == []  # answered by an exact scan meanwhile
        release.set()
        assert index.wait_for_graph(timeout=30)
        assert index.search_vector(ACME, unit("acme/doc/b"), 1)[0].chunk.text == "b"
        assert walks == [1]


def test_a_foreign_or_broken_graph_file_is_ignored(tmp_path: Path) -> None:
    with SqliteKnowledgeIndex(tmp_path / "a", dim=DIM, exact_search_max=0) as first:
        put(first, "doc", ["x", "y"])
        assert first.wait_for_graph(timeout=30)
    with SqliteKnowledgeIndex(tmp_path / "b", dim=DIM, exact_search_max=0) as other:
        put(other, "other", ["z"])
        assert other.wait_for_graph(timeout=30)
    (tmp_path / "a" / HNSW_FILE).replace(tmp_path / "b" / HNSW_FILE)
    for damage in (None, b"not a graph"):
        if damage:
            (tmp_path / "b" / HNSW_FILE).write_bytes(damage)
        with SqliteKnowledgeIndex(tmp_path / "b", dim=DIM, exact_search_max=0) as reopened:
            assert ids(reopened.search_vector(ACME, unit(1), 5)) == ["other#0"]
            assert reopened.wait_for_graph(timeout=30)  # rebuilt from SQLite
            assert ids(reopened.search_vector(ACME, unit(1), 5)) == ["other#0"]


def test_vectors_compact_after_mass_deletion(index: SqliteKnowledgeIndex) -> None:
    put(index, "big", [f"c{n}" for n in range(1500)])
    put(index, "small", ["s0", "s1"])
    put(index, "big", ["only one left"])
    assert index._rows.size == 3  # the 1500 holes were compacted away
    query = unit("acme/small/s1")
    assert index.search_vector(ACME, query, 1)[0].chunk.chunk_id == "small#1"
    assert len(index.search_vector(ACME, query, 10)) == 3


# ------------------------------------------------------------------ scope isolation


@pytest.fixture(params=["exact", "hnsw"])
def shared(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SqliteKnowledgeIndex]:
    """Two tenants, two collections and ACL'd documents; the secret text is the best match."""
    limit = 20_000 if request.param == "exact" else 0
    with SqliteKnowledgeIndex(tmp_path / "kb", dim=DIM, exact_search_max=limit) as index:
        secret = "merger plan 并购计划 confidential"
        target = unit("query")
        put(index, "public", ["company picnic 公司野餐 schedule"])
        put(index, "hr-only", [secret], acl=("hr",), vectors=target)
        put(index, "board", [secret], acl=("board", "execs"), vectors=target)
        put(index, "other-coll", [secret], collection="finance", vectors=target)
        put(index, "globex", [secret, secret], tenant="globex", vectors=np.stack([target] * 2))
        assert index.wait_for_graph(timeout=30) == (request.param == "hnsw")
        yield index


@pytest.mark.parametrize(
    ("scope", "visible"),
    [
        (Scope("acme", ("policies",)), {"public"}),
        (Scope("acme", ("policies",), ("hr",)), {"public", "hr-only"}),
        (Scope("acme", ("policies",), ("execs", "sales")), {"public", "board"}),
        (Scope("acme", ("policies", "finance")), {"public", "other-coll"}),
        (Scope("globex", ("policies",), ("hr",)), {"globex"}),
        (Scope("initech", ("policies",), ("hr", "board")), set()),
        (Scope("acme", ()), set()),
    ],
)
def test_only_the_scope_is_ever_seen(
    shared: SqliteKnowledgeIndex, scope: Scope, visible: set[str]
) -> None:
    for k in (1, 3, 100):  # k beyond the visible set returns only the visible set
        by_vector = shared.search_vector(scope, unit("query"), k)
        by_words = shared.search_bm25(scope, "merger plan 并购计划 confidential picnic", k)
        for results in (by_vector, by_words):
            assert {s.chunk.document_id for s in results} <= visible
            assert all(scope.admits(s.chunk) for s in results)
        assert len(by_vector) == min(k, sum(d.chunks for d in docs(shared, scope, visible)))
    if visible:
        best = shared.search_vector(scope, unit("query"), 1)[0].chunk.document_id
        assert best == (sorted(visible - {"public"}) or ["public"])[0]


def docs(index: SqliteKnowledgeIndex, scope: Scope, names: set[str]) -> list[DocumentInfo]:
    found = [index.document(scope.tenant, c, n) for c in scope.collections for n in names]
    return [d for d in found if d is not None]


def test_bm25_scores_ignore_everything_outside_the_scope(tmp_path: Path) -> None:
    """Statistics come from the scope alone: the same scores as an index holding only it."""
    texts = {name: text for name, (_, text) in DOCUMENTS.items()}
    with (
        SqliteKnowledgeIndex(tmp_path / "alone", dim=DIM) as alone,
        SqliteKnowledgeIndex(tmp_path / "crowded", dim=DIM) as crowded,
    ):
        for name, text in texts.items():
            put(alone, name, [text])
            put(crowded, name, [text])
            put(crowded, name, [text + " 年假 vacation"] * 3, tenant="globex")
            put(crowded, f"{name}-secret", [text], acl=("hr",))
            put(crowded, name, ["年假 vacation days"], collection="elsewhere")
        for query in ("年假可以顺延吗", "vacation days per year", "数据库备份"):
            assert crowded.search_bm25(ACME, query, 5) == alone.search_bm25(ACME, query, 5)


def test_concurrent_readers_see_a_document_whole(index: SqliteKnowledgeIndex) -> None:
    versions = [[f"version {v} part {n} text" for n in range(8)] for v in range(2)]
    put(index, "doc", versions[0])
    errors: list[str] = []
    stop = threading.Event()

    def write() -> None:
        for round_ in range(30):
            put(index, "doc", versions[round_ % 2])
        stop.set()

    def read() -> None:
        while not stop.is_set():
            found = index.search_bm25(ACME, "version text part", 20)
            seen = {s.chunk.text.split()[1] for s in found}
            if len(found) != 8 or len(seen) != 1:
                errors.append(f"{len(found)} chunks of versions {seen}")

    threads = [threading.Thread(target=write), *(threading.Thread(target=read) for _ in range(2))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []


def test_listing_for_readers_shows_only_what_their_groups_may_read(
    index: SqliteKnowledgeIndex,
) -> None:
    put(index, "a-public", ["one"])
    put(index, "b-hr", ["two"], acl=("hr",))
    put(index, "c-hr-or-legal", ["three"], acl=("hr", "legal"))
    put(index, "d-legal", ["four"], acl=("legal",))

    def listed(readers: tuple[str, ...] | None, **kwargs: object) -> list[str]:
        found = index.documents("acme", "policies", readers=readers, **kwargs)  # type: ignore[arg-type]
        return [d.document_id for d in found]

    assert listed(None) == ["a-public", "b-hr", "c-hr-or-legal", "d-legal"]  # no filter
    assert listed(()) == ["a-public"]
    assert listed(("hr",)) == ["a-public", "b-hr", "c-hr-or-legal"]
    assert listed(("legal", "x")) == ["a-public", "c-hr-or-legal", "d-legal"]
    assert listed(("legal",), after="a-public", limit=1) == ["c-hr-or-legal"]  # pages hold 1

    def counted(readers: tuple[str, ...] | None) -> list[tuple[str, int, int]]:
        found = index.collections("acme", readers=readers)
        return [(c.collection, c.documents, c.chunks) for c in found]

    assert counted(None) == [("policies", 4, 4)]
    assert counted(()) == [("policies", 1, 1)]
    assert counted(("hr",)) == [("policies", 3, 3)]
