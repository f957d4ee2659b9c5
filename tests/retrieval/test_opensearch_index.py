"""The OpenSearch knowledge index, against osmem-server (or ``MESHLLM_TEST_OPENSEARCH``).

osmem-server refuses ``knn`` queries and the k-NN plugin's scripts, so there the vector
searches run in the ``scan`` mode (exact, client-side), and the ``knn`` and ``exact`` modes are
checked through a test double that records the request bodies. With ``MESHLLM_TEST_OPENSEARCH``
(a URL of a cluster with the k-NN plugin) every test runs against that cluster, each under its
own index prefix, and the ``knn`` and ``exact`` modes also run for real.
"""

from __future__ import annotations

import os
import uuid
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pytest
from opensearchpy import OpenSearch

from services.retrieval.index import Chunk, CollectionInfo, DocumentInfo, Scope, Vectors
from services.retrieval.opensearch_index import (
    MAX_QUERY_CHARS,
    ConcurrentUpsertError,
    OpenSearchIndexError,
    OpenSearchKnowledgeIndex,
    ScopeTooLargeError,
    bm25_body,
    document_key,
    exact_body,
    knn_body,
)

DIM = 8
REAL_CLUSTER = os.environ.get("MESHLLM_TEST_OPENSEARCH")
needs_real_cluster = pytest.mark.skipif(
    not REAL_CLUSTER, reason="needs MESHLLM_TEST_OPENSEARCH (a cluster with the k-NN plugin)"
)


@pytest.fixture
def cluster(request: pytest.FixtureRequest) -> Iterator[tuple[OpenSearch, str]]:
    """A client and an index prefix no other test uses."""
    prefix = f"kb-{uuid.uuid4().hex[:8]}"
    if REAL_CLUSTER:
        client = OpenSearch(hosts=[REAL_CLUSTER])
        yield client, prefix
        client.indices.delete(index=f"{prefix}-chunks,{prefix}-documents", ignore_unavailable=True)
    else:
        clone = request.getfixturevalue("osmem_clone")
        client = OpenSearch(hosts=[clone.url])
        yield client, prefix
    client.close()


def open_index(
    cluster: tuple[OpenSearch, str], *, vector_mode: str = "scan", **options: Any
) -> OpenSearchKnowledgeIndex:
    client, prefix = cluster
    return OpenSearchKnowledgeIndex(
        client,
        dim=DIM,
        index_prefix=prefix,
        vector_mode=vector_mode,  # type: ignore[arg-type]
        refresh=True,
        **options,
    )


@pytest.fixture
def index(cluster: tuple[OpenSearch, str]) -> OpenSearchKnowledgeIndex:
    return open_index(cluster)


def unit(seed: int, n: int = 1) -> Vectors:
    rows = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    normed: Vectors = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return normed


def make_doc(
    document_id: str,
    texts: Sequence[str],
    *,
    tenant: str = "acme",
    collection: str = "handbook",
    acl: tuple[str, ...] = (),
    vectors: Vectors | None = None,
    sha: str = "0" * 64,
    title: str | None = None,
) -> tuple[DocumentInfo, list[Chunk], Vectors]:
    title = title or document_id.title()
    chunks = [
        Chunk(
            chunk_id=f"{document_id}#{ordinal}",
            document_id=document_id,
            tenant=tenant,
            collection=collection,
            title=title,
            text=text,
            ordinal=ordinal,
            acl=acl,
            metadata={"source": f"{document_id}.md"},
        )
        for ordinal, text in enumerate(texts)
    ]
    info = DocumentInfo(
        tenant=tenant,
        collection=collection,
        document_id=document_id,
        title=title,
        content_sha256=sha,
        content_type="text/markdown",
        chunks=len(chunks),
        acl=acl,
        metadata={"source": f"{document_id}.md"},
        indexed_at_ns=1_700_000_000_000_000_000,
    )
    if vectors is None:
        vectors = unit(zlib.crc32(f"{tenant}/{collection}/{document_id}".encode()), len(chunks))
    return info, chunks, vectors


def stored_chunks(cluster: tuple[OpenSearch, str]) -> list[dict[str, Any]]:
    """Every chunk document in the index, whatever its generation."""
    client, prefix = cluster
    client.indices.refresh(index=f"{prefix}-chunks")
    reply = client.search(
        index=f"{prefix}-chunks",
        body={"size": 1000, "query": {"match_all": {}}, "_source": {"excludes": ["embedding"]}},
    )
    return [hit["_source"] for hit in reply["hits"]["hits"]]


HANDBOOK = Scope("acme", ("handbook",))

# -- the indices ----------------------------------------------------------------------------


def test_indices_have_the_designed_mappings(
    index: OpenSearchKnowledgeIndex, cluster: tuple[OpenSearch, str]
) -> None:
    client, prefix = cluster
    mapping = client.indices.get_mapping(index=f"{prefix}-chunks")[f"{prefix}-chunks"]
    fields = mapping["mappings"]["properties"]
    assert fields["text"]["analyzer"] == "standard"
    assert fields["text"]["fields"]["cjk"] == {"type": "text", "analyzer": "cjk"}
    assert {fields[name]["type"] for name in ("tenant", "collection", "acl", "title")} == {
        "keyword"
    }
    assert fields["title"]["ignore_above"] == 1024
    assert fields["metadata"]["type"] == "flat_object"
    embedding = fields["embedding"]
    assert embedding["type"] == "knn_vector"
    assert embedding["dimension"] == DIM
    assert embedding["method"]["name"] == "hnsw"
    assert embedding["method"]["space_type"] == "cosinesimil"
    assert embedding["method"]["engine"] == "lucene"
    settings = client.indices.get_settings(index=f"{prefix}-chunks")
    assert settings[f"{prefix}-chunks"]["settings"]["index"]["knn"] == "true"
    tokens = client.indices.analyze(
        index=f"{prefix}-chunks", body={"field": "text.cjk", "text": "年假政策"}
    )
    assert [t["token"] for t in tokens["tokens"]] == ["年假", "假政", "政策"]


def test_reopening_checks_the_dimension_and_create_false_needs_the_indices(
    cluster: tuple[OpenSearch, str],
) -> None:
    client, prefix = cluster
    with pytest.raises(OpenSearchIndexError, match="no knowledge base"):
        OpenSearchKnowledgeIndex(client, dim=DIM, index_prefix=prefix, create=False)
    open_index(cluster).upsert(*make_doc("leave", ["Annual leave is 15 days."]))
    reader = OpenSearchKnowledgeIndex(client, dim=DIM, index_prefix=prefix, create=False)
    assert reader.document("acme", "handbook", "leave") is not None
    with pytest.raises(OpenSearchIndexError, match="8-dimensional embeddings; dim is 16"):
        OpenSearchKnowledgeIndex(client, dim=16, index_prefix=prefix)


def test_bad_settings_are_named(cluster: tuple[OpenSearch, str]) -> None:
    client, prefix = cluster
    with pytest.raises(ValueError, match="vector_mode"):
        OpenSearchKnowledgeIndex(client, dim=DIM, index_prefix=prefix, vector_mode="hnsw")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="scan_limit"):
        OpenSearchKnowledgeIndex(client, dim=DIM, index_prefix=prefix, scan_limit=0)
    with pytest.raises(ValueError, match="engine"):
        OpenSearchKnowledgeIndex(client, dim=DIM, index_prefix=prefix, engine="nmslib")  # type: ignore[arg-type]


# -- writing and listing --------------------------------------------------------------------


def test_upsert_then_document_documents_and_collections(
    index: OpenSearchKnowledgeIndex,
) -> None:
    for name in ("travel", "leave", "expenses"):
        index.upsert(*make_doc(name, [f"{name} policy part one", f"{name} policy part two"]))
    index.upsert(*make_doc("onboarding", ["Welcome!"], collection="hr"))
    index.upsert(*make_doc("leave", ["not acme's"], tenant="globex"))

    leave = index.document("acme", "handbook", "leave")
    assert leave is not None
    assert (leave.title, leave.chunks, leave.content_type) == ("Leave", 2, "text/markdown")
    assert leave.metadata == {"source": "leave.md"}
    assert index.document("acme", "handbook", "nope") is None
    assert index.document("acme", "hr", "leave") is None

    listed = [d.document_id for d in index.documents("acme", "handbook")]
    assert listed == ["expenses", "leave", "travel"]
    assert [d.document_id for d in index.documents("acme", "handbook", limit=2)] == [
        "expenses",
        "leave",
    ]
    assert [d.document_id for d in index.documents("acme", "handbook", after="leave")] == ["travel"]
    assert index.collections("acme") == [
        CollectionInfo("acme", "handbook", documents=3, chunks=6),
        CollectionInfo("acme", "hr", documents=1, chunks=1),
    ]
    assert index.collections("globex") == [CollectionInfo("globex", "handbook", 1, 1)]
    assert index.collections("initech") == []


def test_replacing_a_document_leaves_only_the_new_chunks(
    index: OpenSearchKnowledgeIndex, cluster: tuple[OpenSearch, str]
) -> None:
    index.upsert(*make_doc("leave", ["old alpha", "old beta", "old gamma"], sha="1" * 64))
    index.upsert(*make_doc("leave", ["new alpha", "new beta"], sha="2" * 64))

    info = index.document("acme", "handbook", "leave")
    assert info is not None
    assert (info.content_sha256, info.chunks) == ("2" * 64, 2)
    assert sorted(c["text"] for c in stored_chunks(cluster)) == ["new alpha", "new beta"]
    assert [s.chunk.text for s in index.search_bm25(HANDBOOK, "alpha", 10)] == ["new alpha"]
    assert index.search_bm25(HANDBOOK, "old", 10) == []
    assert {s.chunk.text for s in index.search_vector(HANDBOOK, unit(1)[0], 10)} == {
        "new alpha",
        "new beta",
    }
    assert index.collections("acme") == [CollectionInfo("acme", "handbook", 1, 2)]


def test_delete_removes_the_document_and_every_chunk(
    index: OpenSearchKnowledgeIndex, cluster: tuple[OpenSearch, str]
) -> None:
    index.upsert(*make_doc("leave", ["annual leave"]))
    index.upsert(*make_doc("travel", ["travel policy"]))

    assert index.delete("acme", "handbook", "leave") is True
    assert index.delete("acme", "handbook", "leave") is False
    assert index.document("acme", "handbook", "leave") is None
    assert [c["document_id"] for c in stored_chunks(cluster)] == ["travel"]
    assert index.search_bm25(HANDBOOK, "annual leave", 10) == []
    assert index.collections("acme") == [CollectionInfo("acme", "handbook", 1, 1)]


def test_connect_an_empty_document_and_a_long_title(
    cluster: tuple[OpenSearch, str], request: pytest.FixtureRequest
) -> None:
    url = REAL_CLUSTER or request.getfixturevalue("osmem_clone").url  # the cluster's
    index = OpenSearchKnowledgeIndex.connect(
        [url], dim=DIM, index_prefix=cluster[1], vector_mode="scan"
    )
    index.upsert(*make_doc("empty", []))
    index.upsert(*make_doc("long", ["some text"], title="T" * 5000))
    empty = index.document("acme", "handbook", "empty")
    assert empty is not None
    assert empty.chunks == 0
    [found] = index.search_bm25(HANDBOOK, "text", 5)
    assert found.chunk.title == "T" * 5000
    index.close()


def test_upsert_rejects_vectors_and_chunks_that_do_not_fit(
    index: OpenSearchKnowledgeIndex,
) -> None:
    info, chunks, vectors = make_doc("leave", ["a", "b"])
    with pytest.raises(ValueError, match="one row per chunk"):
        index.upsert(info, chunks, vectors[:1])
    with pytest.raises(ValueError, match="one row per chunk"):
        index.upsert(info, chunks, np.zeros((2, DIM + 1), dtype=np.float32))
    _, others, _ = make_doc("travel", ["c", "d"])
    with pytest.raises(ValueError, match="belongs to another document"):
        index.upsert(info, others, vectors)
    with pytest.raises(ValueError, match="not zero"):
        index.upsert(info, chunks, np.zeros((2, DIM), dtype=np.float32))
    assert index.document("acme", "handbook", "leave") is None


# -- atomic replacement ---------------------------------------------------------------------


def test_a_failed_flip_keeps_the_old_version_and_removes_the_new_chunks(
    index: OpenSearchKnowledgeIndex,
    cluster: tuple[OpenSearch, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    index.upsert(*make_doc("leave", ["old alpha", "old beta"], sha="1" * 64))

    def refuse(*args: object, **kwargs: object) -> None:
        raise OpenSearchIndexError("cluster went away")

    monkeypatch.setattr(index, "_flip", refuse)
    with pytest.raises(OpenSearchIndexError, match="went away"):
        index.upsert(*make_doc("leave", ["new alpha"], sha="2" * 64))

    info = index.document("acme", "handbook", "leave")
    assert info is not None
    assert info.content_sha256 == "1" * 64
    assert sorted(c["text"] for c in stored_chunks(cluster)) == ["old alpha", "old beta"]
    assert {s.chunk.text for s in index.search_bm25(HANDBOOK, "alpha beta", 10)} == {
        "old alpha",
        "old beta",
    }


def test_between_flip_and_cleanup_searches_see_only_the_new_version(
    index: OpenSearchKnowledgeIndex,
    cluster: tuple[OpenSearch, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Stale chunks outrank the new ones and outnumber k: searches still fill k."""
    old_texts = [f"policy policy policy old {i}" for i in range(30)]
    index.upsert(*make_doc("leave", old_texts, vectors=np.repeat(unit(7), 30, axis=0)))
    monkeypatch.setattr(index, "_delete_chunks", lambda *args, **kwargs: None)  # a crash
    new_texts = [f"policy new {i}" for i in range(5)]
    index.upsert(*make_doc("leave", new_texts, vectors=unit(8, 5)))

    assert len(stored_chunks(cluster)) == 35
    found = index.search_bm25(HANDBOOK, "policy", 3)
    assert len(found) == 3
    assert all(s.chunk.text.startswith("policy new") for s in found)
    nearest = index.search_vector(HANDBOOK, unit(7)[0], 5)
    assert sorted(s.chunk.text for s in nearest) == sorted(new_texts)


def test_a_writer_that_loses_the_race_rewrites_on_the_new_record(
    index: OpenSearchKnowledgeIndex,
    cluster: tuple[OpenSearch, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    index.upsert(*make_doc("leave", ["first version"], sha="1" * 64))
    other = open_index(cluster)
    write_chunks = index._write_chunks
    calls = {"n": 0}

    def interleave(*args: Any, **kwargs: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 1:  # another writer flips the record after we read it
            other.upsert(*make_doc("leave", ["second version"], sha="2" * 64))
        write_chunks(*args, **kwargs)

    monkeypatch.setattr(index, "_write_chunks", interleave)
    index.upsert(*make_doc("leave", ["third version"], sha="3" * 64))

    assert calls["n"] == 2
    info = index.document("acme", "handbook", "leave")
    assert info is not None
    assert info.content_sha256 == "3" * 64
    assert [c["text"] for c in stored_chunks(cluster)] == ["third version"]


def test_a_writer_that_always_loses_gives_up(
    index: OpenSearchKnowledgeIndex,
    cluster: tuple[OpenSearch, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    index.upsert(*make_doc("leave", ["first version"]))
    other = open_index(cluster)
    write_chunks = index._write_chunks

    def always_interleave(*args: Any, **kwargs: Any) -> None:
        other.upsert(*make_doc("leave", ["theirs"]))
        write_chunks(*args, **kwargs)

    monkeypatch.setattr(index, "_write_chunks", always_interleave)
    with pytest.raises(ConcurrentUpsertError, match="3 times"):
        index.upsert(*make_doc("leave", ["mine"]))
    assert [c["text"] for c in stored_chunks(cluster)] == ["theirs"]


def test_orphans_of_a_crashed_writer_are_invisible_then_swept(
    cluster: tuple[OpenSearch, str],
) -> None:
    index = open_index(cluster, orphan_grace_s=60)
    index.upsert(*make_doc("leave", ["live text"]))
    client, prefix = cluster
    key = document_key("acme", "handbook", "leave")
    orphan = {
        "key": f"{key}.dead.0",
        "doc_key": key,
        "generation": "dead",
        "written_at_ns": 1,
        "chunk_id": "leave#0",
        "document_id": "leave",
        "tenant": "acme",
        "collection": "handbook",
        "title": "Leave",
        "ordinal": 0,
        "acl": [],
        "metadata": {},
        "text": "orphan text",
        "embedding": unit(3)[0].tolist(),
    }
    client.index(index=f"{prefix}-chunks", id=orphan["key"], body=orphan, refresh=True)
    assert index.search_bm25(HANDBOOK, "orphan text", 10)[0].chunk.text == "live text"

    index.upsert(*make_doc("leave", ["next text"]))
    assert [c["text"] for c in stored_chunks(cluster)] == ["next text"]


# -- BM25 -----------------------------------------------------------------------------------


def test_bm25_english_and_chinese(index: OpenSearchKnowledgeIndex) -> None:
    index.upsert(*make_doc("expenses", ["员工报销流程说明:发票需在三十天内提交"]))
    index.upsert(*make_doc("sales", ["销售报告每月提交一次"]))
    index.upsert(*make_doc("leave", ["年假政策:每年十五天带薪休假", "Annual leave: 15 days"]))
    index.upsert(*make_doc("travel", ["Travel expenses are reimbursed within 30 days."]))

    reimburse = index.search_bm25(HANDBOOK, "报销", 5)
    # both chunks hold 报 and 销 (standard: one token per character); only one holds the
    # bigram 报销 (text.cjk), which puts it first
    assert [s.chunk.document_id for s in reimburse] == ["expenses", "sales"]
    assert reimburse[0].score > reimburse[1].score > 0

    assert [s.chunk.chunk_id for s in index.search_bm25(HANDBOOK, "年假", 1)] == ["leave#0"]
    english = index.search_bm25(HANDBOOK, "reimbursed travel expenses", 5)
    assert [s.chunk.document_id for s in english] == ["travel"]
    mixed = index.search_bm25(HANDBOOK, "annual leave 年假", 5)
    assert {s.chunk.chunk_id for s in mixed} == {"leave#0", "leave#1"}
    prompt = "请问" + "我们公司的年假政策是怎样规定的" * 200  # a whole prompt: cut, not refused
    assert index.search_bm25(HANDBOOK, prompt, 1)[0].chunk.chunk_id == "leave#0"
    assert index.search_bm25(HANDBOOK, "   ", 5) == []
    assert index.search_bm25(HANDBOOK, "报销", 0) == []


def test_bm25_chunk_fields_round_trip(index: OpenSearchKnowledgeIndex) -> None:
    info, chunks, vectors = make_doc("leave", ["annual leave"], acl=("hr",))
    index.upsert(info, chunks, vectors)
    [found] = index.search_bm25(Scope("acme", ("handbook",), ("hr",)), "leave", 5)
    assert found.chunk == chunks[0]


def test_scope_is_applied_before_ranking(index: OpenSearchKnowledgeIndex) -> None:
    """Many out-of-scope chunks match better; k=1 still finds the one in scope."""
    for i in range(30):
        index.upsert(*make_doc(f"g{i}", ["leave leave leave"], tenant="globex"))
        index.upsert(*make_doc(f"h{i}", ["leave leave leave"], collection="hr"))
        index.upsert(*make_doc(f"s{i}", ["leave leave leave"], acl=("managers",)))
    index.upsert(*make_doc("mine", ["leave is 15 days, and other words besides"]))
    assert [s.chunk.document_id for s in index.search_bm25(HANDBOOK, "leave", 1)] == ["mine"]
    query = unit(99)[0]
    assert [s.chunk.document_id for s in index.search_vector(HANDBOOK, query, 1)] == ["mine"]


def test_scope_isolation_matches_scope_admits(index: OpenSearchKnowledgeIndex) -> None:
    everything: list[tuple[Chunk, np.ndarray[Any, Any]]] = []
    layouts = [
        ("acme", "handbook", ()),
        ("acme", "handbook", ("hr",)),
        ("acme", "handbook", ("finance", "managers")),
        ("acme", "hr", ()),
        ("globex", "handbook", ()),
        ("globex", "handbook", ("hr",)),
    ]
    for n, (tenant, collection, acl) in enumerate(layouts):
        info, chunks, vectors = make_doc(
            f"doc{n}",
            [f"shared words chunk {i}" for i in range(3)],
            tenant=tenant,
            collection=collection,
            acl=acl,
            vectors=unit(100 + n, 3),
        )
        index.upsert(info, chunks, vectors)
        everything.extend(zip(chunks, vectors, strict=True))
    scopes = [
        Scope("acme", ("handbook",)),
        Scope("acme", ("handbook",), ("hr",)),
        Scope("acme", ("handbook", "hr"), ("managers",)),
        Scope("acme", ("hr",), ("hr", "finance")),
        Scope("globex", ("handbook", "hr"), ("hr",)),
        Scope("globex", ("other",), ("hr",)),
        Scope("initech", ("handbook",), ("hr",)),
        Scope("acme", ()),
    ]
    query = unit(5)[0]
    for scope in scopes:
        admitted = [(c, v) for c, v in everything if scope.admits(c)]
        expected = {c.chunk_id + c.tenant for c, _ in admitted}
        bm25 = index.search_bm25(scope, "shared words", 100)
        assert {s.chunk.chunk_id + s.chunk.tenant for s in bm25} == expected, scope
        vector = index.search_vector(scope, query, 100)
        assert [s.chunk.chunk_id + s.chunk.tenant for s in vector] == [
            c.chunk_id + c.tenant for c, _ in sorted(admitted, key=lambda cv: -float(cv[1] @ query))
        ], scope
        for scored in vector:
            [v] = [v for c, v in admitted if c == scored.chunk]
            assert scored.score == pytest.approx(float(v @ query), abs=1e-5)


# -- vectors --------------------------------------------------------------------------------


def test_scan_search_is_exact_cosine(index: OpenSearchKnowledgeIndex) -> None:
    vectors = unit(11, 40)
    info, chunks, _ = make_doc("big", [f"chunk {i}" for i in range(40)], vectors=vectors)
    index.upsert(info, chunks, vectors)
    query = unit(12)[0] * 3.0  # not unit length: cosine all the same
    found = index.search_vector(HANDBOOK, query, 7)
    cosines = vectors @ (query / np.linalg.norm(query))
    best = np.argsort(-cosines)[:7]
    assert [s.chunk.ordinal for s in found] == [int(i) for i in best]
    assert [s.score for s in found] == pytest.approx([float(cosines[i]) for i in best], abs=1e-5)


def test_scan_refuses_a_scope_over_its_limit(cluster: tuple[OpenSearch, str]) -> None:
    index = open_index(cluster, scan_limit=5)
    index.upsert(*make_doc("big", [f"chunk {i}" for i in range(6)]))
    with pytest.raises(ScopeTooLargeError, match="scan_limit=5"):
        index.search_vector(HANDBOOK, unit(1)[0], 3)
    assert len(index.search_vector(Scope("acme", ("other",)), unit(1)[0], 3)) == 0


def test_query_vectors_are_checked(index: OpenSearchKnowledgeIndex) -> None:
    with pytest.raises(ValueError, match="dimensions"):
        index.search_vector(HANDBOOK, np.ones(DIM + 1, dtype=np.float32), 3)
    with pytest.raises(ValueError, match="not zero"):
        index.search_vector(HANDBOOK, np.zeros(DIM, dtype=np.float32), 3)


# -- the knn and exact request bodies (osmem refuses both) -----------------------------------

ACL_CLAUSE = {
    "bool": {
        "should": [
            {"bool": {"must_not": [{"exists": {"field": "acl"}}]}},
            {"terms": {"acl": ["finance", "hr"]}},
        ],
        "minimum_should_match": 1,
    }
}
SCOPE = Scope("acme", ("policies", "handbook"), ("hr", "finance", "hr"))
FILTER = [
    {"term": {"tenant": "acme"}},
    {"terms": {"collection": ["handbook", "policies"]}},
    ACL_CLAUSE,
]


def test_a_long_query_is_cut_below_the_clause_limit() -> None:
    client = RecordingClient([], {})
    fake_index(client, "scan").search_bm25(SCOPE, "  " + "年" * 5000, 3)
    [body] = client.bodies
    sent = body["query"]["bool"]["must"][0]["multi_match"]["query"]
    assert sent == "年" * MAX_QUERY_CHARS
    assert 2 * MAX_QUERY_CHARS < 1024


def test_the_bm25_body() -> None:
    assert bm25_body(SCOPE, "年假 policy", 20) == {
        "size": 20,
        "_source": {"excludes": ["embedding"]},
        "query": {
            "bool": {
                "filter": FILTER,
                "must": [
                    {
                        "multi_match": {
                            "query": "年假 policy",
                            "fields": ["text", "text.cjk"],
                            "type": "most_fields",
                        }
                    }
                ],
            }
        },
    }


def test_the_knn_body() -> None:
    assert knn_body(SCOPE, [0.5, -0.5], 20) == {
        "size": 20,
        "_source": {"excludes": ["embedding"]},
        "query": {
            "knn": {
                "embedding": {
                    "vector": [0.5, -0.5],
                    "k": 20,
                    "filter": {"bool": {"filter": FILTER}},
                }
            }
        },
    }


def test_the_exact_body() -> None:
    assert exact_body(SCOPE, [0.5, -0.5], 20) == {
        "size": 20,
        "_source": {"excludes": ["embedding"]},
        "query": {
            "script_score": {
                "query": {"bool": {"filter": FILTER}},
                "script": {
                    "source": "1.0 + cosineSimilarity(params.query_value, doc[params.field])",
                    "params": {"field": "embedding", "query_value": [0.5, -0.5]},
                },
            }
        },
    }


def test_a_scope_without_groups_admits_public_chunks_only() -> None:
    body = bm25_body(Scope("acme", ("handbook",)), "x", 1)
    assert body["query"]["bool"]["filter"][2] == {
        "bool": {
            "should": [{"bool": {"must_not": [{"exists": {"field": "acl"}}]}}],
            "minimum_should_match": 1,
        }
    }


class _Indices:
    def get_mapping(self, index: str) -> dict[str, Any]:
        return {index: {"mappings": {"properties": {"embedding": {"dimension": 2}}}}}

    def get(self, index: str) -> dict[str, Any]:
        return {index: {}}


class RecordingClient:
    """Answers searches with canned hits and records every search body."""

    def __init__(self, hits: list[tuple[str, str, float]], current: dict[str, str]) -> None:
        self.indices = _Indices()
        self.bodies: list[dict[str, Any]] = []
        self._hits = hits  # (document_id, generation, score), best first
        self._current = current  # document_id -> current generation

    def search(self, index: str, body: dict[str, Any]) -> dict[str, Any]:
        self.bodies.append(body)
        hits = [
            {
                "_score": score,
                "_source": {
                    "doc_key": document_id,
                    "generation": generation,
                    "chunk_id": f"{document_id}#{n}",
                    "document_id": document_id,
                    "tenant": "acme",
                    "collection": "handbook",
                    "title": "",
                    "text": "",
                    "ordinal": n,
                    "acl": [],
                    "metadata": {},
                },
            }
            for n, (document_id, generation, score) in enumerate(self._hits)
        ]
        return {"hits": {"hits": hits[: body["size"]]}}

    def mget(self, index: str, body: dict[str, Any], **options: Any) -> dict[str, Any]:
        return {
            "docs": [
                {"_id": key, "found": True, "_source": {"generation": self._current[key]}}
                if key in self._current
                else {"_id": key, "found": False}
                for key in body["ids"]
            ]
        }


def fake_index(client: RecordingClient, vector_mode: str) -> OpenSearchKnowledgeIndex:
    return OpenSearchKnowledgeIndex(
        client,  # type: ignore[arg-type]
        dim=2,
        create=False,
        vector_mode=vector_mode,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(
    ("mode", "raw", "cosine"),
    [("knn", 0.9, 0.8), ("exact", 1.8, 0.8), ("knn", 0.25, -0.5), ("exact", 0.5, -0.5)],
)
def test_vector_modes_send_their_body_and_report_cosines(
    mode: str, raw: float, cosine: float
) -> None:
    client = RecordingClient([("a", "g1", raw)], {"a": "g1"})
    index = fake_index(client, mode)
    [found] = index.search_vector(SCOPE, np.array([0.6, -0.8], dtype=np.float32), 1)
    assert found.score == pytest.approx(cosine)
    builder = knn_body if mode == "knn" else exact_body
    query = [float(np.float32(0.6)), float(np.float32(-0.8))]
    assert client.bodies == [builder(SCOPE, query, 11)]


def test_stale_generations_make_the_search_ask_for_more() -> None:
    hits = [(f"d{i}", "old", 1.0 - i / 100) for i in range(30)]
    hits += [(f"n{i}", "new", 0.5 - i / 100) for i in range(5)]
    current = {f"d{i}": "new" for i in range(30)} | {f"n{i}": "new" for i in range(5)}
    client = RecordingClient(hits, current)
    index = fake_index(client, "knn")
    found = index.search_vector(SCOPE, np.array([1.0, 0.0], dtype=np.float32), 3)
    assert [s.chunk.document_id for s in found] == ["n0", "n1", "n2"]
    assert [body["size"] for body in client.bodies] == [13, 52]
    assert [body["query"]["knn"]["embedding"]["k"] for body in client.bodies] == [13, 52]


# -- a real cluster (MESHLLM_TEST_OPENSEARCH) ------------------------------------------------


@needs_real_cluster
@pytest.mark.parametrize("mode", ["knn", "exact"])
def test_server_side_vector_modes_agree_with_the_scan(
    cluster: tuple[OpenSearch, str], mode: str
) -> None:
    scan = open_index(cluster)
    server = open_index(cluster, vector_mode=mode)
    for n, acl in enumerate([(), ("hr",), ()]):
        scan.upsert(*make_doc(f"doc{n}", [f"c{i}" for i in range(20)], acl=acl))
    scan.upsert(*make_doc("other", [f"c{i}" for i in range(20)], tenant="globex"))
    scope = Scope("acme", ("handbook",), ("finance",))
    for seed in range(5):
        query = unit(200 + seed)[0]
        expected = {s.chunk: s.score for s in scan.search_vector(scope, query, 10)}
        found = server.search_vector(scope, query, 10)
        assert all(scope.admits(s.chunk) for s in found)
        common = [s for s in found if s.chunk in expected]
        if mode == "exact":
            assert [s.chunk for s in found] == list(expected)
        else:  # approximate: HNSW may miss a neighbour
            assert found[0].chunk == next(iter(expected))
            assert len(common) >= 8
        for scored in common:
            assert scored.score == pytest.approx(expected[scored.chunk], abs=1e-4)


def test_listing_for_readers_shows_only_what_their_groups_may_read(
    index: OpenSearchKnowledgeIndex,
) -> None:
    index.upsert(*make_doc("a-public", ["one"]))
    index.upsert(*make_doc("b-hr", ["two"], acl=("hr",)))
    index.upsert(*make_doc("c-hr-or-legal", ["three"], acl=("hr", "legal")))

    def listed(readers: tuple[str, ...] | None) -> list[str]:
        return [d.document_id for d in index.documents("acme", "handbook", readers=readers)]

    assert listed(None) == ["a-public", "b-hr", "c-hr-or-legal"]
    assert listed(()) == ["a-public"]
    assert listed(("hr",)) == ["a-public", "b-hr", "c-hr-or-legal"]
    assert listed(("legal",)) == ["a-public", "c-hr-or-legal"]
    assert [c.documents for c in index.collections("acme", readers=None)] == [3]
    assert [c.documents for c in index.collections("acme", readers=())] == [1]
    assert [c.documents for c in index.collections("acme", readers=("legal",))] == [2]
