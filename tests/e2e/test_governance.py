"""Governance end to end: every request's audit trail, who may read it, and what never leaks.

Requests go through the real gateway, router and model; the audit service stores their
records from Kafka; auditors read them back through the gateway, where the policy decides.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.audit.checkpoint import CheckpointVerifier
from services.audit.proofs import RecordProof
from services.audit.verify import check_record_proof
from tests.e2e.conftest import Mesh

pytestmark = [pytest.mark.kafka, pytest.mark.slow, pytest.mark.timeout(600)]

PHONE, EMAIL, CARD = "13812345678", "li.na@example.com", "6222020200112233446"


def headers(mesh: Mesh, key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {mesh.keys[key]}"}


async def chat(mesh: Mesh, key: str, content: str, **extra: Any) -> httpx.Response:
    body = {
        "model": "smollm2-135m-instruct",
        "messages": [{"role": "user", "content": content}],
        "temperature": 0,
        "max_tokens": 12,
        **extra,
    }
    async with httpx.AsyncClient(timeout=120) as client:
        return await client.post(
            f"{mesh.base_url}/chat/completions", json=body, headers=headers(mesh, key)
        )


async def audit_get(
    mesh: Mesh, key: str, path: str, params: dict[str, str] | None = None
) -> httpx.Response:
    async with httpx.AsyncClient(timeout=30) as client:
        return await client.get(
            f"{mesh.base_url}/audit/{path}", params=params, headers=headers(mesh, key)
        )


async def trail(mesh: Mesh, request_id: str, kinds: set[str]) -> dict[str, dict[str, Any]]:
    """The request's audit records by kind, once all of ``kinds`` are stored."""
    found: dict[str, dict[str, Any]] = {}

    async def complete() -> bool:
        reply = await audit_get(mesh, "auditor", "records", {"request_id": request_id})
        assert reply.status_code == 200, reply.text
        found.clear()
        found.update({record["kind"]: record for record in reply.json()["records"]})
        return kinds <= set(found)

    for _ in range(150):
        if await complete():
            return found
        await asyncio.sleep(0.2)
    pytest.fail(f"audit records of {request_id}: only {sorted(found)} of {sorted(kinds)}")


async def test_a_request_leaves_its_whole_trail_readable_only_by_its_auditors(mesh: Mesh) -> None:
    reply = await chat(mesh, "user", "What is the capital of France? Answer in one sentence.")
    assert reply.status_code == 200, reply.text
    request_id = reply.headers["x-request-id"]
    answer = reply.json()["choices"][0]["message"]["content"]

    records = await trail(mesh, request_id, {"policy", "request", "response", "routing"})
    request = records["request"]["event"]["request"]
    assert (
        request["messages"][0]["content"]
        == "What is the capital of France? Answer in one sentence."
    )
    response = records["response"]["event"]["response"]
    assert response["choices"][0]["text"] == answer
    assert response["status_code"] == 200
    assert records["routing"]["event"]["routing"]["pool"] == "cpu"
    policy = records["policy"]["event"]["policy"]
    assert policy["allow"] is True
    assert any("granted by role user" in reason for reason in policy["reasons"])
    assert {r["tenant"] for r in records.values()} == {"acme"}
    assert records["request"]["api_key_id"] == mesh.keys["user"].split("-")[1]

    # an analyst of the same tenant, and another tenant's auditor, may not read it
    denied = await audit_get(mesh, "analyst", "records", {"request_id": request_id})
    assert denied.status_code == 403
    assert denied.json()["error"]["code"] == "policy_denied"
    foreign = await audit_get(
        mesh, "globex-auditor", "records", {"request_id": request_id, "tenant": "acme"}
    )
    assert foreign.status_code == 403
    # in its own tenant the other auditor sees nothing of acme's
    own = await audit_get(mesh, "globex-auditor", "records", {"request_id": request_id})
    assert own.status_code == 200
    assert own.json()["records"] == []
    one = await audit_get(mesh, "globex-auditor", f"records/{records['request']['event_id']}")
    assert one.status_code == 404

    # the denials are audited too
    async def denial_recorded() -> bool:
        reply = await audit_get(mesh, "auditor", "records", {"kind": "policy", "order": "desc"})
        return any(
            r["event"]["policy"].get("action") == "audit.read"
            and r["event"]["policy"].get("allow") is not True
            for r in reply.json()["records"]
        )

    for _ in range(100):
        if await denial_recorded():
            break
        await asyncio.sleep(0.2)
    else:
        pytest.fail("the analyst's denied audit read was not audited")


async def test_a_record_proves_its_inclusion_in_a_signed_checkpoint(mesh: Mesh) -> None:
    reply = await chat(mesh, "user", "Name a colour.")
    request_id = reply.headers["x-request-id"]
    records = await trail(mesh, request_id, {"request", "response"})
    event_id = records["response"]["event_id"]
    key = (await audit_get(mesh, "auditor", "public-key")).json()["public_key"]

    for _ in range(150):  # a checkpoint covers the record within the interval (1 s here)
        bundle = await audit_get(mesh, "auditor", f"records/{event_id}/proof")
        if bundle.status_code != 409:
            break
        await asyncio.sleep(0.2)
    assert bundle.status_code == 200, bundle.text
    verifier = CheckpointVerifier.from_pem(key.encode())
    report = check_record_proof(RecordProof.from_json(bundle.json()), verifier)
    assert report.ok, report.to_json()


async def test_bad_audit_queries_are_refused_with_the_parameter_named(mesh: Mesh) -> None:
    cases = {
        "limit": {"limit": "100000"},
        "until": {"since": "2026-11-02T00:00:00Z", "until": "2026-11-01T00:00:00Z"},
        "since": {"since": "yesterday"},
        "colour": {"colour": "blue"},
        "cursor": {"cursor": "-3"},
    }
    for param, query in cases.items():
        reply = await audit_get(mesh, "auditor", "records", query)
        assert reply.status_code == 400, (param, reply.text)
        assert reply.json()["error"]["param"] == param


async def test_pii_redaction_and_no_credentials_anywhere(mesh: Mesh) -> None:
    secret_prompt = f"My phone is {PHONE}, mail {EMAIL}, card {CARD}. Say hi."
    for key in ("user", "initech"):
        reply = await chat(mesh, key, secret_prompt)
        assert reply.status_code == 200, reply.text
    redacted_id = reply.headers["x-request-id"]  # initech: audit text redacted by its policy

    # a wrong key and a denied request: their error bodies never echo a key
    wrong = mesh.keys["user"][:-4] + "AAAA"
    async with httpx.AsyncClient(timeout=30) as client:
        refused = await client.post(
            f"{mesh.base_url}/chat/completions",
            json={"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "x"}]},
            headers={"authorization": f"Bearer {wrong}"},
        )
    assert refused.status_code == 401
    forbidden = await chat(mesh, "user", "hi", model="gpt-4o")
    assert forbidden.status_code == 403
    bodies = refused.text + forbidden.text

    # the acme auditor may not read initech's records
    denied = await audit_get(
        mesh, "auditor", "records", {"request_id": redacted_id, "tenant": "initech"}
    )
    assert denied.status_code == 403

    stored = _stored_events(mesh.data_dir)
    initech = [e for e in stored if e["tenant"] == "initech" and e["kind"] == "request"]
    assert initech, "initech's request was not audited"
    assert all(PHONE not in e["text"] and EMAIL not in e["text"] for e in initech)
    assert any("[PHONE:" in e["text"] for e in initech)
    acme = [e for e in stored if e["tenant"] == "acme" and PHONE in e["text"]]
    assert acme, "acme keeps its audit text (no redaction configured)"

    logs = mesh.logs()
    for secret in (PHONE, EMAIL, CARD):
        assert secret not in logs
    everything = logs + bodies + "".join(e["text"] for e in stored)
    for key in mesh.keys.values():
        assert key.split("-", 2)[2] not in everything  # no key's secret part, anywhere


def _stored_events(data_dir: Path) -> list[dict[str, Any]]:
    """Every record in the audit store (read directly: the test sees all tenants)."""
    from services.audit.sqlite_store import SqliteAuditStore

    store = SqliteAuditStore(data_dir / "audit" / "audit.sqlite", read_only=True)
    try:
        return [
            {
                "tenant": r.tenant,
                "kind": r.kind,
                "text": json.dumps(r.to_json(), ensure_ascii=False),
            }
            for r in store.records()
        ]
    finally:
        store.close()


async def test_the_audit_names_the_authenticated_caller_not_the_body_user(mesh: Mesh) -> None:
    """The body's `user` is the client's own word: audit keeps it apart from who called."""
    reply = await chat(mesh, "user", "Name a colour.", user="alice")
    assert reply.status_code == 200, reply.text
    records = await trail(mesh, reply.headers["x-request-id"], {"policy", "request", "response"})
    key_id = mesh.keys["user"].split("-")[1]
    assert {record["user"] for record in records.values()} == {f"key:{key_id}"}
    assert records["request"]["event"]["client_user"] == "alice"
    assert records["response"]["event"]["client_user"] == "alice"

    # embeddings carry the caller too
    async with httpx.AsyncClient(timeout=120) as client:
        embedded = await client.post(
            f"{mesh.base_url}/embeddings",
            json={"model": "multilingual-e5-small", "input": "hello"},
            headers=headers(mesh, "admin"),
        )
    assert embedded.status_code == 200, embedded.text
    records = await trail(mesh, embedded.headers["x-request-id"], {"request", "response"})
    admin_id = mesh.keys["admin"].split("-")[1]
    assert {record["user"] for record in records.values()} == {f"key:{admin_id}"}
