"""The gateway's edge: every field of every route validated before anything is charged.

Each bad field gets 400 naming it (OpenAI's error body), before the rate limiter is asked,
so the caller's budget is untouched; the body is read only from an authenticated caller,
within a deadline; error bodies name no internal address or file.
"""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import time
from typing import Any

import httpx
import pytest

from services.gateway.responses import ReplyError
from shared.bus.embedded import free_port
from shared.events.v1 import events_pb2 as ev
from tests.security.conftest import BODY_TIMEOUT_S, MODEL, Edge

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(180)]

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
COMPLETION = {"model": MODEL, "prompt": "hi", "max_tokens": 4}
EMBEDDING = {"model": MODEL, "input": "hi"}
BASES = {
    "chat/completions": CHAT,
    "completions": COMPLETION,
    "embeddings": EMBEDDING,
}
SURROGATE = "\ud800"  # a lone surrogate: valid JSON (escaped), not valid UTF-8

# (route, fields over the route's valid body (None deletes), the field named by the 400)
BAD_FIELDS: list[tuple[str, dict[str, Any], str]] = [
    ("chat/completions", {"model": 5}, "model"),
    ("chat/completions", {"model": ""}, "model"),
    ("chat/completions", {"model": "m" * 300}, "model"),
    ("chat/completions", {"messages": None}, "messages"),
    ("chat/completions", {"messages": []}, "messages"),
    ("chat/completions", {"messages": "hi"}, "messages"),
    ("chat/completions", {"messages": [{"role": "user", "content": "x"}] * 2049}, "messages"),
    ("chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ("chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ("chat/completions", {"messages": [{"role": "user"}]}, "messages[0].content"),
    (
        "chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        "messages[0].content",
    ),
    (
        "chat/completions",
        {"messages": [{"role": "user", "content": SURROGATE}]},
        "messages[0].content",
    ),
    (
        "chat/completions",
        {"messages": [{"role": "user", "content": "x", "name": "bob"}]},
        "messages[0].name",
    ),
    ("chat/completions", {"max_tokens": -5}, "max_tokens"),
    ("chat/completions", {"max_tokens": 0}, "max_tokens"),
    ("chat/completions", {"max_tokens": 2**32}, "max_tokens"),
    ("chat/completions", {"max_tokens": "10"}, "max_tokens"),
    ("chat/completions", {"max_tokens": 1.5}, "max_tokens"),
    ("chat/completions", {"max_completion_tokens": 0}, "max_completion_tokens"),
    ("chat/completions", {"temperature": -1}, "temperature"),
    ("chat/completions", {"temperature": 2.5}, "temperature"),
    ("chat/completions", {"temperature": True}, "temperature"),
    ("chat/completions", {"top_p": 7}, "top_p"),
    ("chat/completions", {"top_p": 0}, "top_p"),
    ("chat/completions", {"top_p": 1e-50}, "top_p"),
    ("chat/completions", {"top_k": -1}, "top_k"),
    ("chat/completions", {"seed": 2**64}, "seed"),
    ("chat/completions", {"seed": -(2**63) - 1}, "seed"),
    ("chat/completions", {"n": 0}, "n"),
    ("chat/completions", {"n": 17}, "n"),
    ("chat/completions", {"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("chat/completions", {"stop": [""]}, "stop"),
    ("chat/completions", {"stop": [1]}, "stop"),
    ("chat/completions", {"stop": "s" * 129}, "stop"),
    ("chat/completions", {"stream": "yes"}, "stream"),
    ("chat/completions", {"stream_options": {"include_usage": True}}, "stream_options"),
    (
        "chat/completions",
        {"stream": True, "stream_options": {"include_usage": "yes"}},
        "stream_options.include_usage",
    ),
    ("chat/completions", {"stream": True, "stream_options": {"x": 1}}, "stream_options.x"),
    ("chat/completions", {"user": 7}, "user"),
    ("chat/completions", {"user": "u" * 257}, "user"),
    ("chat/completions", {"ignore_eos": "yes"}, "ignore_eos"),
    ("chat/completions", {"max_tokens_cap": 6}, "max_tokens_cap"),
    ("chat/completions", {"priority": "urgent"}, "priority"),
    ("chat/completions", {"priority": {"high": 1}}, "priority"),
    ("chat/completions", {"messages": [{"role": {}, "content": "x"}]}, "messages[0].role"),
    ("chat/completions", {"presence_penalty": 0.5}, "presence_penalty"),
    ("chat/completions", {"frequency_penalty": False}, "frequency_penalty"),
    ("chat/completions", {"logit_bias": {"50256": -100}}, "logit_bias"),
    ("chat/completions", {"logprobs": True}, "logprobs"),
    ("chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("chat/completions", {"tools": [{"type": "function"}]}, "tools"),
    ("chat/completions", {"tool_choice": "required"}, "tool_choice"),
    ("chat/completions", {"parallel_tool_calls": 1}, "parallel_tool_calls"),
    ("chat/completions", {"response_format": {"type": "json_object"}}, "response_format"),
    ("chat/completions", {"store": True}, "store"),
    ("chat/completions", {"metadata": {"a": "b"}}, "metadata"),
    ("chat/completions", {"service_tier": "flex"}, "service_tier"),
    ("chat/completions", {"temperatur": 1}, "temperatur"),
    ("chat/completions", {"rag": {"collections": []}}, "rag.collections"),
    ("completions", {"prompt": None}, "prompt"),
    ("completions", {"prompt": []}, "prompt"),
    ("completions", {"prompt": 5}, "prompt"),
    ("completions", {"prompt": [1, 2, 3]}, "prompt"),
    ("completions", {"prompt": [[1, 2], [3]]}, "prompt"),
    ("completions", {"prompt": ["a", 5]}, "prompt"),
    ("completions", {"prompt": ["p"] * 9, "n": 2}, "n"),
    ("completions", {"max_tokens": -5}, "max_tokens"),
    ("completions", {"seed": 2**64}, "seed"),
    ("completions", {"echo": True}, "echo"),
    ("completions", {"best_of": 2}, "best_of"),
    ("completions", {"suffix": "end"}, "suffix"),
    ("completions", {"logprobs": 1}, "logprobs"),
    ("completions", {"messages": [{"role": "user", "content": "x"}]}, "messages"),
    ("embeddings", {"input": None}, "input"),
    ("embeddings", {"input": ""}, "input"),
    ("embeddings", {"input": []}, "input"),
    ("embeddings", {"input": ["a", ""]}, "input"),
    ("embeddings", {"input": [1, 2, 3]}, "input"),
    ("embeddings", {"input": 5}, "input"),
    ("embeddings", {"input": ["a"] * 2049}, "input"),
    ("embeddings", {"input": SURROGATE}, "input"),
    ("embeddings", {"model": 5}, "model"),
    ("embeddings", {"encoding_format": "int8"}, "encoding_format"),
    ("embeddings", {"dimensions": 64}, "dimensions"),
    ("embeddings", {"input_type": "passage"}, "input_type"),
    ("embeddings", {"user": 5}, "user"),
    ("embeddings", {"max_tokens": 5}, "max_tokens"),
]


def _body(route: str, fields: dict[str, Any]) -> dict[str, Any]:
    body = dict(BASES[route])
    for name, value in fields.items():
        if value is None:
            body.pop(name, None)
        else:
            body[name] = value
    return body


def _case_id(case: tuple[str, dict[str, Any], str]) -> str:
    route, fields, param = case
    return f"{route.split('/')[0]}-{param}-{json.dumps(fields)[:40]}"


async def _post(edge: Edge, route: str, secret: str, content: bytes) -> httpx.Response:
    async with httpx.AsyncClient(timeout=30) as client:
        return await client.post(
            f"{edge.url}/v1/{route}",
            content=content,
            headers={"authorization": f"Bearer {secret}", "content-type": "application/json"},
        )


@pytest.mark.parametrize("case", BAD_FIELDS, ids=[_case_id(c) for c in BAD_FIELDS])
async def test_a_bad_field_is_refused_naming_it_and_charges_nothing(
    edge: Edge, case: tuple[str, dict[str, Any], str]
) -> None:
    route, fields, param = case
    key_id, secret = edge.new_key()
    content = json.dumps(_body(route, fields)).encode()
    reply = await _post(edge, route, secret, content)

    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param, error
    assert error["type"] == "invalid_request_error"
    assert set(error) == {"message", "type", "param", "code"}
    assert await edge.budget_untouched(key_id)


async def test_a_good_request_is_answered_and_charged(edge: Edge) -> None:
    """The check above can see a charge: an admitted request uses the key's one request."""
    for route, body in BASES.items():
        key_id, secret = edge.new_key()
        reply = await _post(edge, route, secret, json.dumps(body).encode())
        assert reply.status_code == 200, reply.text
        assert not await edge.budget_untouched(key_id)


async def test_the_role_cap_is_refused_before_charging(edge: Edge) -> None:
    """An analyst ("user") may ask for at most 1024 tokens: 403 naming max_tokens."""
    key_id, secret = edge.new_key()
    body = {**CHAT, "max_tokens": 1025}
    reply = await _post(edge, "chat/completions", secret, json.dumps(body).encode())
    assert reply.status_code == 403, reply.text
    assert reply.json()["error"]["param"] == "max_tokens"
    assert await edge.budget_untouched(key_id)


async def test_without_max_tokens_the_role_cap_travels(edge: Edge) -> None:
    """No max_tokens: the role's limit caps the answer (the router sends max_tokens_cap)."""
    bodies = edge.fake.behaviour.bodies
    before = len(bodies)
    reply = await _post(
        edge,
        "chat/completions",
        edge.keys["user"],
        json.dumps({**CHAT, "max_tokens": None}).encode(),
    )
    assert reply.status_code == 200, reply.text
    sent = bodies[before:]
    assert [b.get("max_tokens_cap") for b in sent] == [1024]


async def test_ignore_eos_travels_to_the_model_server(edge: Edge) -> None:
    bodies = edge.fake.behaviour.bodies
    before = len(bodies)
    body = {**CHAT, "ignore_eos": True, "seed": -1}
    reply = await _post(edge, "chat/completions", edge.keys["user"], json.dumps(body).encode())
    assert reply.status_code == 200, reply.text
    [sent] = bodies[before:]
    assert sent["ignore_eos"] is True
    assert sent["seed"] == 2**63 - 1  # a signed 64-bit seed runs modulo 2^63


@pytest.mark.parametrize(
    "content",
    [b"[" * 5_000 + b"]" * 5_000, b'{"a":' * 3_000 + b"1" + b"}" * 3_000],
    ids=["arrays", "objects"],
)
async def test_deeply_nested_json_is_refused(edge: Edge, content: bytes) -> None:
    key_id, secret = edge.new_key()
    reply = await _post(edge, "chat/completions", secret, content)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["type"] == "invalid_request_error"
    assert await edge.budget_untouched(key_id)
    for route in ("kb/search", "kb/collections/handbook/documents"):
        reply = await _post(edge, route, edge.keys["developer"], content)
        assert reply.status_code == 400, reply.text


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"1e999"])
async def test_non_finite_numbers_are_refused(edge: Edge, literal: bytes) -> None:
    key_id, secret = edge.new_key()
    content = json.dumps(CHAT).encode()[:-1] + b', "temperature": ' + literal + b"}"
    reply = await _post(edge, "chat/completions", secret, content)
    assert reply.status_code == 400, reply.text
    assert await edge.budget_untouched(key_id)


async def _raw(edge: Edge, head: str, body: bytes = b"", wait_s: float = 10.0) -> bytes:
    """Send ``head`` (and ``body``), then keep the connection open without sending more."""
    host, port = edge.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(head.encode() + body)
        await writer.drain()
        return await asyncio.wait_for(reader.read(65536), wait_s)
    finally:
        writer.close()


def _head(authorization: str | None, length: int, path: str = "/v1/chat/completions") -> str:
    lines = [
        f"POST {path} HTTP/1.1",
        "host: gateway",
        "content-type: application/json",
        f"content-length: {length}",
    ]
    if authorization:
        lines.append(f"authorization: Bearer {authorization}")
    return "\r\n".join(lines) + "\r\n\r\n"


@pytest.mark.parametrize(
    "path", ["/v1/chat/completions", "/v1/kb/search", "/v1/kb/collections/handbook/documents"]
)
async def test_an_unauthenticated_caller_is_refused_before_its_body_is_read(
    edge: Edge, path: str
) -> None:
    started = time.monotonic()
    answer = await _raw(edge, _head(None, 1000, path), b'{"model":', wait_s=BODY_TIMEOUT_S / 2)
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    assert time.monotonic() - started < BODY_TIMEOUT_S / 2


async def test_a_slow_body_gets_408_within_the_body_timeout(edge: Edge) -> None:
    key_id, secret = edge.new_key()
    started = time.monotonic()
    answer = await _raw(edge, _head(secret, 1000), b'{"model":', wait_s=BODY_TIMEOUT_S + 5)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert time.monotonic() - started < BODY_TIMEOUT_S + 3
    assert b'"request_timeout"' in answer
    assert await edge.budget_untouched(key_id)


async def test_a_failing_model_server_is_reported_without_internal_addresses(edge: Edge) -> None:
    """The router's error names the replica's URL; the client is told only what failed."""
    edge.fake.behaviour.fail_status = 500
    try:
        reply = await _post(edge, "chat/completions", edge.keys["user"], json.dumps(CHAT).encode())
    finally:
        edge.fake.behaviour.fail_status = None
    assert reply.status_code == 502, reply.text
    message = reply.json()["error"]["message"]
    assert "127.0.0.1" not in message
    assert "http" not in message
    assert reply.headers["x-request-id"] in message


async def test_an_unreachable_internal_service_is_not_named(
    edge: Edge, monkeypatch: pytest.MonkeyPatch
) -> None:
    unreachable = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setattr(edge.gateway.audit_routes, "service_url", unreachable)
    async with httpx.AsyncClient(timeout=30) as client:
        reply = await client.get(
            f"{edge.url}/v1/audit/records",
            headers={"authorization": f"Bearer {edge.keys['auditor']}"},
        )
    assert reply.status_code == 503, reply.text
    assert "127.0.0.1" not in reply.text


def test_a_server_error_of_the_mesh_is_told_without_its_details() -> None:
    info = ev.ErrorInfo(
        type="server_error",
        code="inference_unavailable",
        message="inference failed on 1 replica(s) of pool cpu: http://10.1.2.3:8000 refused",
    )
    error = ReplyError(info, "req123")
    assert error.status == 502
    assert "10.1.2.3" not in error.message
    assert "req123" in error.message
    assert error.code == "inference_unavailable"
    refused = ReplyError(ev.ErrorInfo(type="invalid_request_error", message="max_tokens: too many",
                                      param="max_tokens"), "req123")  # fmt: skip
    assert refused.message == "max_tokens: too many"


async def test_embeddings_travel_as_base64_when_asked(edge: Edge) -> None:
    """encoding_format is honoured at the edge (the SDK asks for base64 by default)."""
    body = {**EMBEDDING, "input": ["four", "sixteen"], "encoding_format": "base64"}
    reply = await _post(edge, "embeddings", edge.keys["user"], json.dumps(body).encode())
    assert reply.status_code == 200, reply.text
    vectors = [
        struct.unpack("<3f", base64.b64decode(item["embedding"])) for item in reply.json()["data"]
    ]
    assert vectors == [(4.0, 1.0, 0.5), (7.0, 1.0, 0.5)]  # the fake's [len(text), 1, 0.5]


async def test_the_openapi_document_is_published(edge: Edge) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        reply = await client.get(f"{edge.url}/openapi.json")
    assert reply.status_code == 200
    document = reply.json()
    assert document["openapi"].startswith("3.1")
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models",
                 "/v1/kb/search", "/v1/audit/records"):  # fmt: skip
        assert path in document["paths"], path
    chat = document["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert "max_tokens_cap" not in chat
    assert chat["top_p"]["anyOf"][0] == {"type": "number", "exclusiveMinimum": 0, "maximum": 1}


@pytest.mark.parametrize(
    ("path", "param"),
    [
        ("/v1/audit/records?colour=red", "colour"),
        ("/v1/audit/records/abc%01def", "event_id"),
        ("/v1/audit/records/a%20b/proof", "event_id"),
        ("/v1/audit/public-key?limit=1", "limit"),
        ("/v1/models?page=2", "page"),
    ],
    ids=["unknown-query", "control-character", "space", "no-query-here", "models-query"],
)
async def test_a_bad_query_or_path_is_refused_before_it_is_forwarded(
    edge: Edge, path: str, param: str
) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        reply = await client.get(
            edge.url + path, headers={"authorization": f"Bearer {edge.keys['auditor']}"}
        )
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param


async def test_a_request_over_the_concurrency_limit_charges_nothing(
    edge: Edge, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(edge.gateway.concurrency, "per_key", 0)  # every key is at its limit
    key_id, secret = edge.new_key()
    reply = await _post(edge, "chat/completions", secret, json.dumps(CHAT).encode())
    assert reply.status_code == 429, reply.text
    assert await edge.budget_untouched(key_id)


async def test_an_unexpected_failure_is_told_without_its_details(
    edge: Edge, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def explode(*args: object, **kwargs: object) -> None:
        raise RuntimeError("cannot open /var/lib/meshllm/policy.db via http://10.9.8.7:8181")

    monkeypatch.setattr(edge.gateway.policy, "adecide", explode)
    reply = await _post(edge, "chat/completions", edge.keys["user"], json.dumps(CHAT).encode())
    assert reply.status_code == 500
    error = reply.json()["error"]
    assert error["type"] == "server_error"
    assert "/var/lib" not in reply.text
    assert "10.9.8.7" not in reply.text
    assert reply.headers["x-request-id"] in error["message"]
