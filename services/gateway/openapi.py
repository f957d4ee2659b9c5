"""The gateway's OpenAPI 3.1 document, served at ``GET /openapi.json``.

Written by hand from the same limits the gateway validates with (:mod:`shared.openai_protocol`,
:mod:`services.gateway.rag`), so that a body the document calls invalid is one the gateway
refuses (400), and every status and body shape the gateway answers with is declared. It is
what ``tests/security/test_gateway_fuzz.py`` generates requests from.

One module (~540 lines): the document is one literal, built route by route from the
limits the gateway validates with; splitting it would scatter one contract.
"""

from __future__ import annotations

from typing import Any

from services.gateway.audit_routes import EVENT_ID, MAX_TENANT_LENGTH, QUERY_PARAMS
from services.gateway.kb_routes import CONTENT_TYPES
from services.gateway.rag import MAX_COLLECTIONS, MAX_TOP_K
from services.gateway.settings import GatewaySettings
from shared import openai_protocol as p
from shared.kb_names import COLLECTION, DOCUMENT_ID

JSON = "application/json"
ERROR_STATUSES = {
    "400": "A field is missing, of the wrong type or out of range (`error.param` names it).",
    "401": "No credentials, or credentials that do not verify.",
    "403": "The policy does not allow this (model, priority, token limit, collection, tenant).",
    "404": "No such model, record or document.",
    "408": "The request body did not arrive in time.",
    "413": "The request body is too large.",
    "429": "A rate or concurrency limit; see Retry-After.",
    "500": "An unexpected failure; the message carries the request id.",
    "502": "The model server failed the request.",
    "503": "A service behind the gateway (broker, audit, knowledge base) cannot answer now.",
    "504": "No reply within the request deadline.",
}
SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
    "description": "One event: a chunk as JSON in `data`, an error body, or `[DONE]` last.",
}
BASE64_PATTERN = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"
COLLECTION_PATTERN = f"^{COLLECTION.pattern}$"
DOCUMENT_ID_PATTERN = f"^{DOCUMENT_ID.pattern}$"  # JSON Schema patterns search: anchored
AUTH_ONLY = ("400", "401", "403", "404", "408", "413", "429", "500", "503")


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def _off(*values: Any) -> dict[str, Any]:
    """A feature accepted only with its "off" value (or null)."""
    return {"enum": [None, *values], "description": "Not supported: only the off value."}


def _errors(statuses: tuple[str, ...]) -> dict[str, Any]:
    return {
        status: {
            "description": ERROR_STATUSES[status],
            "content": {JSON: {"schema": _ref("Error")}},
        }
        for status in statuses
    }


def _text(max_length: int | None = None, min_length: int = 0) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string", "minLength": min_length}
    if max_length is not None:
        schema["maxLength"] = max_length
    return schema


def _generation_fields() -> dict[str, Any]:
    integer = {"type": "integer"}
    return {
        "model": _nullable({**_text(p.MAX_NAME_LENGTH, 1), "pattern": r"\S"}),
        "max_tokens": _nullable({**integer, "minimum": 1, "maximum": p.MAX_TOKENS_LIMIT}),
        "temperature": _nullable({"type": "number", "minimum": 0, "maximum": p.TEMPERATURE_MAX}),
        "top_p": _nullable({"type": "number", "exclusiveMinimum": 0, "maximum": 1}),
        "top_k": _nullable({**integer, "minimum": 0, "maximum": p.MAX_TOP_K}),
        "seed": _nullable({**integer, "minimum": p.SEED_MIN, "maximum": p.SEED_MAX}),
        "n": _nullable({**integer, "minimum": 1, "maximum": p.MAX_N}),
        "stop": _nullable(
            {
                "anyOf": [
                    _text(p.MAX_STOP_LENGTH, 1),
                    {
                        "type": "array",
                        "maxItems": p.MAX_STOP_STRINGS,
                        "items": _text(p.MAX_STOP_LENGTH, 1),
                    },
                ]
            }
        ),
        "stream": _nullable({"type": "boolean"}),
        "stream_options": _nullable(
            {
                "type": "object",
                "additionalProperties": False,
                "properties": {"include_usage": {"type": "boolean"}},
                "description": "Only with stream: true.",
            }
        ),
        "user": _nullable(_text(p.MAX_NAME_LENGTH)),
        "ignore_eos": _nullable({"type": "boolean"}),
        "priority": _nullable({"enum": ["high", "normal", "low"]}),
        "presence_penalty": _off(0),
        "frequency_penalty": _off(0),
        "logit_bias": _nullable({"type": "object", "maxProperties": 0}),
    }


def _schemas() -> dict[str, Any]:
    text_part = {
        "type": "object",
        "required": ["type", "text"],
        "additionalProperties": False,
        "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
    }
    message = {
        "type": "object",
        "required": ["role", "content"],
        "additionalProperties": False,
        "properties": {
            "role": {"enum": ["system", "developer", "user", "assistant"]},
            "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": text_part}]},
        },
    }
    collections = {
        "type": "array",
        "minItems": 1,
        "maxItems": MAX_COLLECTIONS,
        "items": {"type": "string", "pattern": COLLECTION_PATTERN},
    }
    rag = {
        "type": "object",
        "required": ["collections"],
        "additionalProperties": False,
        "properties": {
            "collections": collections,
            "top_k": _nullable({"type": "integer", "minimum": 1, "maximum": MAX_TOP_K}),
        },
        "description": "meshllm: answer from these knowledge-base collections, with citations.",
    }
    generation = _generation_fields()
    chat = {
        "type": "object",
        "required": ["messages"],
        "additionalProperties": False,
        "properties": {
            **generation,
            "messages": {
                "type": "array",
                "minItems": 1,
                "maxItems": p.MAX_MESSAGES,
                "items": message,
            },
            "max_completion_tokens": generation["max_tokens"],
            "logprobs": _off(False),
            "top_logprobs": _off(0),
            "tools": _nullable({"type": "array", "maxItems": 0}),
            "functions": _nullable({"type": "array", "maxItems": 0}),
            "tool_choice": _off("none", "auto"),
            "function_call": _off("none", "auto"),
            "parallel_tool_calls": _nullable({"type": "boolean"}),
            "response_format": _nullable(
                {
                    "type": "object",
                    "required": ["type"],
                    "additionalProperties": False,
                    "properties": {"type": {"const": "text"}},
                }
            ),
            "store": _off(False),
            "metadata": _nullable({"type": "object", "maxProperties": 0}),
            "service_tier": _off("auto", "default"),
            "rag": rag,
        },
    }
    completion = {
        "type": "object",
        "required": ["prompt"],
        "additionalProperties": False,
        "description": f"n times the number of prompts must be at most {p.MAX_N}.",
        "properties": {
            **generation,
            "prompt": {
                "anyOf": [
                    {"type": "string"},
                    {
                        "type": "array",
                        "minItems": 1,
                        "maxItems": p.MAX_N,
                        "items": {"type": "string"},
                    },
                ]
            },
            "logprobs": _off(0),
            "echo": _off(False),
            "suffix": _off(""),
            "best_of": _off(1),
        },
    }
    embedding_text = _text(None, 1)
    embedding = {
        "type": "object",
        "required": ["input"],
        "additionalProperties": False,
        "properties": {
            "model": generation["model"],
            "input": {
                "anyOf": [
                    embedding_text,
                    {
                        "type": "array",
                        "minItems": 1,
                        "maxItems": p.MAX_EMBEDDING_INPUTS,
                        "items": embedding_text,
                    },
                ]
            },
            "encoding_format": _nullable({"enum": ["float", "base64"]}),
            "user": generation["user"],
            "priority": generation["priority"],
            "dimensions": _off(),
            "input_type": _off("query"),
        },
    }
    usage = {
        "type": "object",
        "required": ["prompt_tokens", "total_tokens"],
        "properties": {
            "prompt_tokens": {"type": "integer", "minimum": 0},
            "completion_tokens": {"type": "integer", "minimum": 0},
            "total_tokens": {"type": "integer", "minimum": 0},
        },
    }
    finish = _nullable({"type": "string"})
    return {
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["message", "type", "param", "code"],
                    "properties": {
                        "message": {"type": "string"},
                        "type": {"type": "string"},
                        "param": _nullable({"type": "string"}),
                        "code": _nullable({"type": "string"}),
                    },
                }
            },
        },
        "ChatCompletionRequest": chat,
        "CompletionRequest": completion,
        "EmbeddingRequest": embedding,
        "Usage": usage,
        "ChatCompletion": {
            "type": "object",
            "required": ["id", "object", "created", "model", "choices", "usage"],
            "properties": {
                "id": {"type": "string"},
                "object": {"const": "chat.completion"},
                "created": {"type": "integer"},
                "model": {"type": "string"},
                "choices": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["index", "message", "finish_reason"],
                        "properties": {
                            "index": {"type": "integer"},
                            "message": {
                                "type": "object",
                                "required": ["role", "content"],
                                "properties": {
                                    "role": {"const": "assistant"},
                                    "content": {"type": "string"},
                                },
                            },
                            "finish_reason": finish,
                        },
                    },
                },
                "usage": _ref("Usage"),
                "citations": {"type": "array", "items": {"type": "object"}},
            },
        },
        "Completion": {
            "type": "object",
            "required": ["id", "object", "created", "model", "choices", "usage"],
            "properties": {
                "id": {"type": "string"},
                "object": {"const": "text_completion"},
                "created": {"type": "integer"},
                "model": {"type": "string"},
                "choices": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["index", "text", "finish_reason"],
                        "properties": {
                            "index": {"type": "integer"},
                            "text": {"type": "string"},
                            "finish_reason": finish,
                        },
                    },
                },
                "usage": _ref("Usage"),
            },
        },
        "Embeddings": {
            "type": "object",
            "required": ["object", "data", "model", "usage"],
            "properties": {
                "object": {"const": "list"},
                "data": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["object", "index", "embedding"],
                        "properties": {
                            "object": {"const": "embedding"},
                            "index": {"type": "integer"},
                            "embedding": {
                                "anyOf": [
                                    {"type": "array", "items": {"type": "number"}},
                                    {"type": "string"},
                                ]
                            },
                        },
                    },
                },
                "model": {"type": "string"},
                "usage": _ref("Usage"),
            },
        },
        "Models": {
            "type": "object",
            "required": ["object", "data"],
            "properties": {
                "object": {"const": "list"},
                "data": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["id", "object"],
                        "properties": {"id": {"type": "string"}, "object": {"const": "model"}},
                    },
                },
            },
        },
        "KbSearchRequest": {
            "type": "object",
            "required": ["query", "collections"],
            "additionalProperties": False,
            "properties": {
                "query": {"type": "string"},
                "collections": collections,
                "top_k": {"type": "integer"},
                "mode": {"enum": ["hybrid", "bm25", "vector"]},
            },
        },
        "KbDocument": {
            "type": "object",
            "required": ["content_type"],
            "additionalProperties": False,
            "oneOf": [{"required": ["text"]}, {"required": ["content_base64"]}],
            "properties": {
                # null is taken as absent (the gateway makes an id; no title, ACL, metadata)
                "document_id": _nullable({"type": "string", "pattern": DOCUMENT_ID_PATTERN}),
                "title": _nullable(_text(500)),
                "content_type": {"enum": list(CONTENT_TYPES)},
                "text": {"type": "string", "pattern": r"\S"},
                "content_base64": {"type": "string", "pattern": BASE64_PATTERN},
                "acl": _nullable({"type": "array", "items": _text(128, 1), "maxItems": 64}),
                "metadata": _nullable(
                    {
                        "type": "object",
                        "maxProperties": 64,
                        "additionalProperties": {"type": "string", "maxLength": 1024},
                    }
                ),
            },
            "description": "Give the document as text or as content_base64 (one of them).",
        },
        "KbAccepted": {
            "type": "object",
            "required": ["document_id", "collection", "status", "status_url"],
            "properties": {
                name: {"type": "string"}
                for name in ("document_id", "collection", "status", "status_url")
            },
        },
        "Forwarded": {
            "type": "object",
            "description": "The answer of the service behind the gateway, as it gave it.",
        },
    }


def _generate(summary: str, request: str, response: str) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "requestBody": {"required": True, "content": {JSON: {"schema": _ref(request)}}},
            "responses": {
                "200": {
                    "description": "The answer (a stream of server-sent events with stream).",
                    "headers": {"x-request-id": {"schema": {"type": "string"}}},
                    "content": {
                        JSON: {"schema": _ref(response)},
                        "text/event-stream": {"schema": SSE_EVENT},
                    },
                },
                **_errors(tuple(ERROR_STATUSES)),
            },
        }
    }


def _forwarded(
    method: str,
    summary: str,
    *,
    parameters: list[dict[str, Any]] | None = None,
    body: str | None = None,
    status: str = "200",
    response: str = "Forwarded",
) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "summary": summary,
        "responses": {
            status: {"description": "OK", "content": {JSON: {"schema": _ref(response)}}},
            **_errors(AUTH_ONLY),
        },
    }
    if parameters:
        operation["parameters"] = parameters
    if body:
        operation["requestBody"] = {"required": True, "content": {JSON: {"schema": _ref(body)}}}
    return {method: operation}


def _query(name: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema or {"type": "string"}}


def _path(name: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": schema or {"type": "string"}}


def _paths() -> dict[str, Any]:
    tenant = _query("tenant", _text(MAX_TENANT_LENGTH))

    def audit(path: str, summary: str) -> dict[str, Any]:
        names = sorted(QUERY_PARAMS[path] - {"tenant"})
        event_id = _path("event_id", {"type": "string", "pattern": f"^{EVENT_ID.pattern}$"})
        path_params = [event_id] if "{event_id}" in path else []
        return _forwarded(
            "get", summary, parameters=[*path_params, tenant, *(_query(n) for n in names)]
        )

    collection = _path("collection", {"type": "string", "pattern": COLLECTION_PATTERN})
    document = _path("document_id", {"type": "string", "pattern": DOCUMENT_ID_PATTERN})
    docs = "/v1/kb/collections/{collection}/documents"
    return {
        "/v1/chat/completions": _generate(
            "Chat completion", "ChatCompletionRequest", "ChatCompletion"
        ),
        "/v1/completions": _generate("Text completion", "CompletionRequest", "Completion"),
        "/v1/embeddings": _generate("Embeddings", "EmbeddingRequest", "Embeddings"),
        "/v1/models": _forwarded("get", "The models the caller may use", response="Models"),
        "/v1/audit/records": audit("/v1/audit/records", "Audit records of a tenant"),
        "/v1/audit/records/{event_id}": audit("/v1/audit/records/{event_id}", "One record"),
        "/v1/audit/records/{event_id}/proof": audit(
            "/v1/audit/records/{event_id}/proof", "Inclusion proof of a record"
        ),
        "/v1/audit/checkpoints": audit("/v1/audit/checkpoints", "Signed checkpoints"),
        "/v1/audit/consistency": audit("/v1/audit/consistency", "Consistency proof"),
        "/v1/audit/public-key": audit("/v1/audit/public-key", "The checkpoint signing key"),
        "/v1/kb/search": _forwarded("post", "Search the knowledge base", body="KbSearchRequest"),
        "/v1/kb/collections": _forwarded("get", "Collections of the caller's tenant"),
        docs: {
            **_forwarded(
                "get",
                "Documents of a collection",
                parameters=[
                    collection,
                    _query("after"),
                    _query("limit", {"type": "integer", "minimum": 1, "maximum": 1000}),
                ],
            ),
            **_forwarded(
                "post",
                "Add or replace a document",
                parameters=[collection],
                body="KbDocument",
                status="202",
                response="KbAccepted",
            ),
        },
        docs + "/{document_id}": {
            **_forwarded("get", "A document's indexing status", parameters=[collection, document]),
            **_forwarded(
                "delete",
                "Delete a document",
                parameters=[collection, document],
                status="202",
                response="KbAccepted",
            ),
        },
    }


def openapi_document(settings: GatewaySettings) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the gateway's routes, for ``settings``."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "meshllm gateway",
            "version": "1",
            "description": "OpenAI-compatible chat, completion and embedding routes, the "
            "knowledge base and the audit trail. Every request needs a bearer API key or JWT. "
            f"Bodies of at most {settings.limits.max_body_bytes} bytes, received within "
            f"{settings.limits.body_timeout_s:g} s.",
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "paths": _paths(),
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
