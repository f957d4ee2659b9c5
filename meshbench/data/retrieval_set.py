"""The retrieval benchmark's labelled data set: documents, and queries with their relevant
documents, saved in ``retrieval_set.json``.

How it is made: :mod:`meshbench.data.make_retrieval_set`.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

DATA_FILE = Path(__file__).resolve().parent / "retrieval_set.json"
LANGUAGES = ("en", "zh")
KINDS = ("lexical", "paraphrase", "cross-lingual")


@dataclass(frozen=True)
class Document:
    doc_id: str
    language: str  # "en" or "zh"
    family: str
    title: str
    text: str


@dataclass(frozen=True)
class Query:
    query_id: str
    language: str
    kind: str  # one of KINDS
    family: str
    text: str
    relevant: tuple[str, ...]  # document ids


@dataclass(frozen=True)
class RetrievalSet:
    seed: int
    documents: tuple[Document, ...]
    queries: tuple[Query, ...]

    def to_json(self) -> str:
        body = {
            "seed": self.seed,
            "documents": [asdict(d) for d in self.documents],
            "queries": [asdict(q) for q in self.queries],
        }
        return json.dumps(body, ensure_ascii=False, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> RetrievalSet:
        body = json.loads(text)
        return cls(
            seed=body["seed"],
            documents=tuple(Document(**d) for d in body["documents"]),
            queries=tuple(
                Query(**{**q, "relevant": tuple(q["relevant"])}) for q in body["queries"]
            ),
        )

    @classmethod
    def load(cls, path: Path = DATA_FILE) -> RetrievalSet:
        return cls.from_json(path.read_text(encoding="utf-8"))

    def subset(self, queries: int, documents: int | None = None) -> RetrievalSet:
        """The first ``queries`` queries (they are in random order), over the whole corpus
        or over ``documents`` documents: their relevant ones and a seeded sample of the rest.
        """
        kept = self.queries[:queries]
        if documents is None:
            return RetrievalSet(self.seed, self.documents, kept)
        relevant = {doc_id for q in kept for doc_id in q.relevant}
        others = [d.doc_id for d in self.documents if d.doc_id not in relevant]
        sample = random.Random(self.seed).sample(others, max(0, documents - len(relevant)))
        chosen = relevant | set(sample)
        return RetrievalSet(self.seed, tuple(d for d in self.documents if d.doc_id in chosen), kept)


def describe(data: RetrievalSet) -> str:
    """One line of counts: documents and queries per language, queries per kind."""
    docs = Counter(d.language for d in data.documents)
    queries = Counter(q.language for q in data.queries)
    kinds = Counter(q.kind for q in data.queries)
    multi = sum(len(q.relevant) > 1 for q in data.queries)
    return (
        f"{len(data.documents)} documents ({docs['zh']} Chinese, {docs['en']} English); "
        f"{len(data.queries)} queries ({queries['zh']} Chinese, {queries['en']} English; "
        + ", ".join(f"{kinds[k]} {k}" for k in KINDS)
        + f"; {multi} with two relevant documents)"
    )
