"""The knowledge base end to end: documents in through the gateway and kb.ingest, grounded
answers with citations out through the OpenAI SDK, and nothing across tenants or ACLs.

The whole mesh runs: gateway, Kafka, retrieval (embedding through the inference service's
embeddings deployment), router, the real model, and audit.
"""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import httpx
import openai
import pytest

from tests.e2e.conftest import Mesh, scrape, total

pytestmark = [pytest.mark.kafka, pytest.mark.slow, pytest.mark.timeout(600)]

LEAVE = (
    "Paid leave policy. Every full-time employee receives 27 days of paid annual leave per "
    "calendar year. Unused leave days may be carried over until the end of March of the "
    "following year. Leave requests are approved by the line manager in the HR portal."
)
EXPENSES_ZH = (
    "差旅费用报销制度。员工出差产生的交通、住宿费用，应在出差结束后十五个工作日内提交报销申请。"
    "报销时需附上发票原件，并由部门负责人审批。超过期限提交的申请将不予受理。"
)
SECRET = (
    "Project Bluefinch is the codename of the next-generation storage appliance. Its launch "
    "date is confidential and known only to the engineering leadership."
)
WIFI = "Office Wi-Fi: connect to the network CorpNet with your employee account and password."


def headers(mesh: Mesh, key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {mesh.keys[key]}"}


async def ingest(mesh: Mesh, key: str, collection: str, **body: Any) -> httpx.Response:
    async with httpx.AsyncClient(timeout=30) as client:
        return await client.post(
            f"{mesh.base_url}/kb/collections/{collection}/documents",
            json=body,
            headers=headers(mesh, key),
        )


async def status(mesh: Mesh, collection: str, document_id: str) -> dict[str, Any]:
    """The document's last ingestion, once it has finished (indexed, unchanged or failed)."""
    async with httpx.AsyncClient(timeout=30) as client:
        for _ in range(300):
            reply = await client.get(
                f"{mesh.base_url}/kb/collections/{collection}/documents/{document_id}",
                headers=headers(mesh, "admin"),
            )
            if reply.status_code == 200:
                last = reply.json()["last_ingestion"]
                if last and last["state"] not in ("started", "queued"):
                    return dict(reply.json())
            await asyncio.sleep(0.2)
    pytest.fail(f"{document_id} was not ingested in time")


async def search(mesh: Mesh, key: str, query: str, collections: list[str]) -> httpx.Response:
    async with httpx.AsyncClient(timeout=60) as client:
        return await client.post(
            f"{mesh.base_url}/kb/search",
            json={"query": query, "collections": collections, "top_k": 5},
            headers=headers(mesh, key),
        )


@pytest.fixture(scope="module")
async def handbook(mesh: Mesh) -> Mesh:
    documents = [
        {"document_id": "leave-policy", "title": "Paid leave policy", "text": LEAVE},
        {"document_id": "expenses-zh", "title": "差旅费用报销制度", "text": EXPENSES_ZH},
        {"document_id": "wifi", "title": "Office Wi-Fi", "text": WIFI},
        {
            "document_id": "bluefinch",
            "title": "Project Bluefinch",
            "text": SECRET,
            "acl": ["developer"],
        },
    ]
    for document in documents:
        reply = await ingest(mesh, "admin", "handbook", content_type="text/plain", **document)
        assert reply.status_code == 202, reply.text
    for document in documents:
        outcome = await status(mesh, "handbook", str(document["document_id"]))
        assert outcome["last_ingestion"]["state"] == "indexed", outcome
    return mesh


async def test_a_grounded_answer_cites_the_right_document(handbook: Mesh) -> None:
    client = openai.AsyncOpenAI(
        base_url=handbook.base_url, api_key=handbook.keys["user"], max_retries=0
    )
    for question, expected in [
        ("How many days of paid annual leave do employees get?", "leave-policy"),
        ("出差回来后多少天内必须提交报销申请？", "expenses-zh"),
    ]:
        reply = await client.chat.completions.create(
            model="smollm2-135m-instruct",
            messages=[{"role": "user", "content": question}],
            temperature=0,
            max_tokens=40,
            extra_body={"rag": {"collections": ["handbook"], "top_k": 2}},
        )
        citations = reply.model_extra["citations"] if reply.model_extra else []
        assert citations, f"no citations for {question!r}"
        assert citations[0]["document_id"] == expected, citations
        assert citations[0]["collection"] == "handbook"
        assert reply.choices[0].message.content


async def test_streamed_rag_answers_carry_citations_too(handbook: Mesh) -> None:
    client = openai.AsyncOpenAI(
        base_url=handbook.base_url, api_key=handbook.keys["user"], max_retries=0
    )
    stream = await client.chat.completions.create(
        model="smollm2-135m-instruct",
        messages=[{"role": "user", "content": "How do I connect to the office Wi-Fi?"}],
        temperature=0,
        max_tokens=24,
        stream=True,
        extra_body={"rag": {"collections": ["handbook"], "top_k": 1}},
    )
    cited: list[dict[str, Any]] = []
    async for chunk in stream:
        if chunk.model_extra and chunk.model_extra.get("citations"):
            cited = chunk.model_extra["citations"]
    assert [c["document_id"] for c in cited] == ["wifi"]


async def test_nothing_crosses_tenants_or_acls(handbook: Mesh) -> None:
    question = "What is Project Bluefinch and how many days of paid leave are there?"
    foreign = await search(handbook, "globex-analyst", question, ["handbook"])
    assert foreign.status_code == 200, foreign.text
    assert foreign.json()["hits"] == []  # globex has no handbook of its own
    analyst = await search(handbook, "user", question, ["handbook"])
    ids = {hit["document_id"] for hit in analyst.json()["hits"]}
    assert "leave-policy" in ids
    assert "bluefinch" not in ids  # its ACL names developers only
    developer = await search(handbook, "developer", "Project Bluefinch codename", ["handbook"])
    assert developer.json()["hits"][0]["document_id"] == "bluefinch"
    # an auditor may not search at all
    denied = await search(handbook, "auditor", question, ["handbook"])
    assert denied.status_code == 403


async def test_retrieved_chunks_are_in_the_audit_trail(handbook: Mesh) -> None:
    async with httpx.AsyncClient(timeout=120) as client:
        reply = await client.post(
            f"{handbook.base_url}/chat/completions",
            json={
                "model": "smollm2-135m-instruct",
                "messages": [{"role": "user", "content": "How long can leave be carried over?"}],
                "max_tokens": 8,
                "temperature": 0,
                "rag": {"collections": ["handbook"], "top_k": 2},
            },
            headers=headers(handbook, "user"),
        )
        assert reply.status_code == 200, reply.text
        request_id = reply.headers["x-request-id"]
        cited = [c["chunk_id"] for c in reply.json()["citations"]]
        for _ in range(150):
            records = await client.get(
                f"{handbook.base_url}/audit/records",
                params={"request_id": request_id, "kind": "response"},
                headers=headers(handbook, "auditor"),
            )
            found = records.json()["records"]
            if found:
                break
            await asyncio.sleep(0.2)
    assert found[0]["event"]["response"]["retrieved_chunk_ids"] == cited


async def test_bad_documents_get_clear_errors_and_block_nothing(handbook: Mesh) -> None:
    cases = [
        ({"content_type": "application/msword", "text": "x"}, 400, "content_type"),
        ({"content_type": "text/plain", "text": "   "}, 400, "text"),
        ({"content_type": "text/plain", "text": "a", "content_base64": "YQ=="}, 400, "text"),
        ({"content_type": "text/plain", "content_base64": "%%%"}, 400, "content_base64"),
        ({"content_type": "text/plain", "text": "x", "owner": "me"}, 400, "owner"),
        ({"content_type": "text/plain", "text": "x" * (16 * 2**20)}, 413, None),
    ]
    for body, code, param in cases:
        reply = await ingest(handbook, "admin", "handbook", **body)
        assert reply.status_code == code, (body.keys(), reply.text[:300])
        if param:
            assert reply.json()["error"]["param"] == param
    bad_collection = await ingest(handbook, "admin", "no/such", content_type="text/plain", text="x")
    assert bad_collection.status_code in (400, 404)
    denied = await ingest(handbook, "user", "handbook", content_type="text/plain", text="x")
    assert denied.status_code == 403  # analysts read the knowledge base; they do not write it

    # a PDF that does not parse is reported as failed; the document after it is indexed
    broken = base64.b64encode(b"%PDF-1.7 this is not really a pdf").decode()
    first = await ingest(
        handbook, "admin", "handbook", document_id="broken-pdf",
        content_type="application/pdf", content_base64=broken,
    )  # fmt: skip
    second = await ingest(
        handbook, "admin", "handbook", document_id="after-broken",
        content_type="text/markdown", text="# Parking\n\nVisitors park in lot B.",
    )  # fmt: skip
    assert (first.status_code, second.status_code) == (202, 202)
    failed = await status(handbook, "handbook", "broken-pdf")
    assert failed["last_ingestion"]["state"] == "failed"
    assert failed["last_ingestion"]["error"]
    indexed = await status(handbook, "handbook", "after-broken")
    assert indexed["last_ingestion"]["state"] == "indexed"


async def test_reingesting_is_idempotent_and_delete_removes_everywhere(handbook: Mesh) -> None:
    again = await ingest(
        handbook, "admin", "handbook", document_id="wifi", title="Office Wi-Fi",
        content_type="text/plain", text=WIFI,
    )  # fmt: skip
    assert again.status_code == 202
    assert (await status(handbook, "handbook", "wifi"))["last_ingestion"]["state"] in (
        "unchanged",
        "indexed",
    )
    async with httpx.AsyncClient(timeout=30) as client:
        gone = await client.delete(
            f"{handbook.base_url}/kb/collections/handbook/documents/wifi",
            headers=headers(handbook, "admin"),
        )
    assert gone.status_code == 202
    for _ in range(100):
        hits = (await search(handbook, "user", "office Wi-Fi CorpNet", ["handbook"])).json()
        if all(hit["document_id"] != "wifi" for hit in hits["hits"]):
            break
        await asyncio.sleep(0.2)
    else:
        pytest.fail("the deleted document is still found")


async def test_retrieval_metrics_count_ingests_and_searches(handbook: Mesh) -> None:
    searched = "meshllm_retrieval_search_duration_seconds_count"
    before = total(await scrape(handbook, "retrieval"), searched)
    reply = await search(handbook, "user", "paid annual leave", ["handbook"])
    assert reply.status_code == 200, reply.text
    retrieval = await scrape(handbook, "retrieval")
    assert total(retrieval, searched, mode="hybrid") >= before + 1
    assert total(retrieval, "meshllm_retrieval_ingest_duration_seconds_count", state="indexed") >= 4
    assert total(retrieval, "meshllm_retrieval_chunks_indexed_total") >= 4
    assert total(retrieval, "messaging_client_consumed_messages_total", outcome="handled") >= 4


async def test_a_rated_sourced_answer_trains_on_the_prompt_the_model_was_given(
    handbook: Mesh,
) -> None:
    """The router's routing record holds the augmented prompt; the feedback service joins
    it, and the dataset row teaches answering from the same sources."""
    question = "How many days of paid leave do employees get?"
    async with httpx.AsyncClient(timeout=120) as client:
        reply = await client.post(
            f"{handbook.base_url}/chat/completions",
            json={"model": "smollm2-135m-instruct", "max_tokens": 8, "temperature": 0,
                  "messages": [{"role": "user", "content": question}],
                  "rag": {"collections": ["handbook"], "top_k": 2}},
            headers=headers(handbook, "user"),
        )  # fmt: skip
        assert reply.status_code == 200, reply.text
        request_id = reply.headers["x-request-id"]
        rated = await client.post(
            f"{handbook.base_url}/feedback",
            json={"request_id": request_id, "rating": "down", "labels": ["rag-e2e"],
                  "correction": "27 days a year [1]."},
            headers=headers(handbook, "user"),
        )  # fmt: skip
        assert rated.status_code == 202, rated.text
        for _ in range(300):
            mine = await client.get(
                f"{handbook.base_url}/feedback", params={"request_id": request_id},
                headers=headers(handbook, "user"),
            )  # fmt: skip
            if mine.status_code == 200 and mine.json()["data"]:
                break
            await asyncio.sleep(0.2)
        [example] = mine.json()["data"]
        assert example["messages"] == [{"role": "user", "content": question}]
        assert "27 days of paid annual leave" in example["prompt"][-1]["content"]
        routing = await client.get(
            f"{handbook.base_url}/audit/records",
            params={"request_id": request_id, "kind": "routing"},
            headers=headers(handbook, "auditor"),
        )
        [record] = routing.json()["records"]
        assert record["event"]["routing"]["prompt"] == example["prompt"]
        built = await client.post(
            f"{handbook.base_url}/datasets",
            json={"name": "rag-grounded", "labels": ["rag-e2e"], "min_rating": 1,
                  "eval_fraction": 0},
            headers=headers(handbook, "developer"),
        )  # fmt: skip
        assert built.status_code == 201, built.text
        assert built.json()["counts"]["with_sources"] == 1
        train = await client.get(
            f"{handbook.base_url}/datasets/{built.json()['id']}/files/train",
            headers=headers(handbook, "developer"),
        )
    [row] = [json.loads(line) for line in train.text.splitlines()]
    user_turn = row["messages"][-2]["content"]
    assert "<sources>" in user_turn
    assert "27 days of paid annual leave" in user_turn
    assert user_turn.endswith(f"Question: {question}")
    assert row["messages"][-1] == {"role": "assistant", "content": "27 days a year [1]."}
