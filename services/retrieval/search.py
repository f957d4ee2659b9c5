"""Hybrid search: BM25 and vector rankings of one scope, fused.

Each ranker fetches more candidates than asked for (``candidates`` times ``k``, at least
20), then the lists are fused:

- ``"zscore"`` (default): each list's scores standardized (BM25 is unbounded and
  query-dependent; e5 puts most cosines between 0.7 and 0.9), then
  ``w * vector + (1 - w) * bm25`` with ``w = 0.7``.
- ``"minmax"``: each list's scores scaled to [0, 1], then weighted the same way.
- ``"rrf"``: reciprocal rank fusion, ``sum(1 / (rrf_k + rank))`` with ``rrf_k = 60``.

In both score fusions a chunk missing from one list gets that list's lowest scaled score.
The defaults (z-score, ``w = 0.7``, ``candidates = 2``) won on the labelled bilingual set of
``meshbench/retrieval_bench.py``: rank fusion gives a chunk that both lists hold deep down
more than one that a single list ranks first, so on queries where one ranker only returns
noise (BM25 on a paraphrase) that noise pushes the answer down; score fusion keeps the size
of the lead.
Both rankers run inside the same :class:`~services.retrieval.index.Scope`, so fusion
never sees a chunk the caller may not read.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, cast, get_args

import numpy as np

from services.retrieval.index import Chunk, KnowledgeIndex, Scope, Scored, Vectors

Embed = Callable[[list[str], str], Vectors]
"""``(texts, input_type)`` -> unit vectors [N, D]; input_type is "query" or "passage"."""

Mode = Literal["hybrid", "bm25", "vector"]
Fusion = Literal["rrf", "minmax", "zscore"]
MODES: tuple[str, ...] = get_args(Mode)
FUSIONS: tuple[str, ...] = get_args(Fusion)


@dataclass(frozen=True)
class Hit:
    chunk: Chunk
    score: float  # the fused score in hybrid mode; else the ranker's own (BM25 or cosine)
    bm25_rank: int | None  # 1-based rank among the BM25 candidates; None: not among them
    vector_rank: int | None
    bm25_score: float | None = None
    vector_score: float | None = None


class HybridSearcher:
    """Searches a :class:`KnowledgeIndex` by BM25, by vector, or both fused."""

    def __init__(
        self,
        index: KnowledgeIndex,
        embed: Embed,
        *,
        fusion: Fusion = "zscore",
        rrf_k: int = 60,
        vector_weight: float = 0.7,
        candidates: int = 2,
    ) -> None:
        """
        Args:
            index: the back end, searched inside each call's scope.
            embed: embeds the query (``input_type="query"``).
            fusion: the default fusion (each search may name another).
            rrf_k: the constant of reciprocal rank fusion.
            vector_weight: the vector list's weight in score fusion (BM25 gets the rest).
            candidates: each ranker fetches this many times ``k`` (at least 20).

        Raises:
            ValueError: an unknown fusion or a value out of range.
        """
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {', '.join(FUSIONS)}, got {fusion!r}")
        if rrf_k < 0 or not 0 <= vector_weight <= 1 or candidates < 1:
            raise ValueError("rrf_k >= 0, 0 <= vector_weight <= 1 and candidates >= 1 required")
        self.index = index
        self.embed = embed
        self.fusion: Fusion = fusion
        self.rrf_k = rrf_k
        self.vector_weight = vector_weight
        self.candidates = candidates

    def search(
        self,
        scope: Scope,
        query: str,
        k: int = 8,
        mode: Mode | str = "hybrid",
        *,
        fusion: Fusion | str | None = None,
    ) -> list[Hit]:
        """The ``k`` best chunks of ``scope`` for ``query``, best first.

        ``mode`` is one of :data:`MODES` and ``fusion`` one of :data:`FUSIONS` (checked
        here, so values from a request can be passed as they come).

        Raises:
            ValueError: an empty query, ``k`` < 1, or an unknown mode or fusion.
            Exception: whatever ``embed`` raises (modes "hybrid" and "vector").
        """
        if not query.strip():
            raise ValueError("the query is empty")
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        chosen = fusion or self.fusion
        if chosen not in FUSIONS:
            raise ValueError(f"fusion must be one of {', '.join(FUSIONS)}, got {chosen!r}")
        if mode == "bm25":
            return [
                Hit(s.chunk, s.score, rank, None, bm25_score=s.score)
                for rank, s in enumerate(self.index.search_bm25(scope, query, k), start=1)
            ]
        vector = np.asarray(self.embed([query], "query"), dtype=np.float32)[0]
        if mode == "vector":
            return [
                Hit(s.chunk, s.score, None, rank, vector_score=s.score)
                for rank, s in enumerate(self.index.search_vector(scope, vector, k), start=1)
            ]
        depth = max(self.candidates * k, 20)
        lexical = self.index.search_bm25(scope, query, depth)
        semantic = self.index.search_vector(scope, vector, depth)
        return fuse(
            lexical,
            semantic,
            k,
            fusion=cast(Fusion, chosen),
            rrf_k=self.rrf_k,
            vector_weight=self.vector_weight,
        )


def fuse(
    lexical: Sequence[Scored],
    semantic: Sequence[Scored],
    k: int,
    *,
    fusion: Fusion = "rrf",
    rrf_k: int = 60,
    vector_weight: float = 0.5,
) -> list[Hit]:
    """The ``k`` best of two rankings (each best first) by ``fusion``; ties go to the
    chunk ranked higher by either list, then by chunk id."""
    ranks: dict[tuple[str, str], dict[str, tuple[int, float]]] = {}
    chunks: dict[tuple[str, str], Chunk] = {}
    for name, ranking in (("bm25", lexical), ("vector", semantic)):
        for rank, scored in enumerate(ranking, start=1):
            key = (scored.chunk.collection, scored.chunk.chunk_id)
            chunks.setdefault(key, scored.chunk)
            ranks.setdefault(key, {}).setdefault(name, (rank, scored.score))
    if fusion == "rrf":
        fused = {
            key: sum(1.0 / (rrf_k + rank) for rank, _ in entry.values())
            for key, entry in ranks.items()
        }
    else:
        scale = _minmax if fusion == "minmax" else _zscore
        weights = {"bm25": 1.0 - vector_weight, "vector": vector_weight}
        fused = dict.fromkeys(ranks, 0.0)
        for name, ranking in (("bm25", lexical), ("vector", semantic)):
            if not ranking:
                continue
            scaled = scale([s.score for s in ranking])
            floor = min(scaled)
            for key, entry in ranks.items():
                value = scaled[entry[name][0] - 1] if name in entry else floor
                fused[key] += weights[name] * value

    def order(key: tuple[str, str]) -> tuple[float, int, str, str]:
        best_rank = min(rank for rank, _ in ranks[key].values())
        return (-fused[key], best_rank, *key)

    hits = []
    for key in sorted(fused, key=order)[:k]:
        bm25 = ranks[key].get("bm25")
        vector = ranks[key].get("vector")
        hits.append(
            Hit(
                chunks[key],
                fused[key],
                bm25[0] if bm25 else None,
                vector[0] if vector else None,
                bm25_score=bm25[1] if bm25 else None,
                vector_score=vector[1] if vector else None,
            )
        )
    return hits


def _minmax(scores: list[float]) -> list[float]:
    low, high = min(scores), max(scores)
    if high - low <= 1e-12:
        return [1.0] * len(scores)
    return [(s - low) / (high - low) for s in scores]


def _zscore(scores: list[float]) -> list[float]:
    mean = sum(scores) / len(scores)
    std = math.sqrt(sum((s - mean) ** 2 for s in scores) / len(scores))
    if std <= 1e-12:
        return [0.0] * len(scores)
    return [(s - mean) / std for s in scores]
