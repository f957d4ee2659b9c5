"""``/v1/kb/*`` at the gateway: the knowledge base, behind the policy.

- ``POST /v1/kb/search`` ``{"query", "collections", "top_k", "mode"}``: ``read`` on each
  collection; the retrieval service searches only the caller's tenant and the chunks
  whose ACL names one of the caller's roles (or has none).
- ``GET /v1/kb/collections``, ``GET /v1/kb/collections/{c}/documents[/{id}]``: ``read``.
- ``POST /v1/kb/collections/{c}/documents`` ``{"document_id"?, "title"?, "content_type",
  "text" | "content_base64", "acl"?, "metadata"?}``: ``write``; the document goes to
  ``kb.ingest`` and the answer is 202 with where to follow its indexing.
- ``DELETE /v1/kb/collections/{c}/documents/{id}``: ``write``; 202.

Each decision is audited like the gateway's other decisions.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from services.gateway.auth import Principal
from services.gateway.policy import Policy
from services.gateway.rag import COLLECTION
from services.gateway.settings import KbSettings
from shared.bus import Publisher
from shared.events.v1 import events_pb2 as ev
from shared.openai_protocol import (
    InvalidRequestError,
    OpenAIError,
    ServiceUnavailableError,
    invalid_field,
    reject_unknown,
)
from shared.policy import AccessRequest, Resource, Subject
from shared.topics import KB_INGEST

CONTENT_TYPES = ("text/plain", "text/markdown", "text/html", "application/pdf")
DOCUMENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@/-]{0,199}$")
INGEST_FIELDS = frozenset(
    {"document_id", "title", "content_type", "text", "content_base64", "acl", "metadata"}
)
SEARCH_FIELDS = frozenset({"query", "collections", "top_k", "mode"})


class KbDenied(OpenAIError):
    status = 403
    error_type = "permission_error"


class DocumentTooLarge(OpenAIError):
    status = 413
    error_type = "invalid_request_error"


class KbRoutes:
    def __init__(
        self,
        *,
        settings: KbSettings,
        authenticate: Callable[[Request], Principal],
        policy: Policy,
        publisher: Publisher,
        record: Callable[[ev.AuditEvent, str, str], Awaitable[None]],
        headers: dict[str, str],
    ) -> None:
        """``headers`` name the gateway to the retrieval service (its service token)."""
        self.settings = settings
        self.authenticate = authenticate
        self.policy = policy
        self.publisher = publisher
        self.record = record
        self._client = httpx.AsyncClient(timeout=30, headers=headers)

    def routes(self) -> list[Route]:
        documents = "/v1/kb/collections/{collection}/documents"
        return [
            Route("/v1/kb/search", self.search, methods=["POST"]),
            Route("/v1/kb/collections", self.collections, methods=["GET"]),
            Route(documents, self.documents, methods=["GET"]),
            Route(documents, self.ingest, methods=["POST"]),
            Route(documents + "/{document_id:path}", self.document, methods=["GET"]),
            Route(documents + "/{document_id:path}", self.delete, methods=["DELETE"]),
        ]

    # ------------------------------------------------------------------ decisions

    async def _allow(self, request: Request, action: str, collection: str | None) -> Principal:
        principal = self.authenticate(request)
        decision = self.policy.authorize(
            AccessRequest(
                Subject(principal.subject, principal.tenant, principal.roles),
                action,
                Resource("kb_collection", principal.tenant, collection),
                source_ip=request.client.host if request.client else None,
            )
        )
        request_id = uuid.uuid4().hex
        event = ev.AuditEvent(request_id=request_id, api_key_id=principal.key_id or "")
        event.user = principal.subject
        event.policy.allow = decision.allow
        event.policy.reasons.extend(decision.reasons)
        event.policy.action = f"kb.{action}"
        event.policy.resource = f"kb_collection:{collection or '*'}"
        event.policy.roles.extend(principal.roles)
        await self.record(event, request_id, principal.tenant)
        if not decision.allow:
            reason = "; ".join(decision.reasons) or "denied by policy"
            raise KbDenied(reason, "collection", "policy_denied")
        return principal

    @staticmethod
    def _collection(request: Request) -> str:
        name = str(request.path_params["collection"])
        if not COLLECTION.match(name):
            raise invalid_field(
                "collection", "use 1-64 letters, digits, '_', '.' or '-', starting with a letter"
            )
        return name

    @staticmethod
    def _document_id(value: Any) -> str:
        if not isinstance(value, str) or not DOCUMENT_ID.match(value):
            raise invalid_field("document_id", "use 1-200 letters, digits and _ . : @ / -")
        return value

    # ------------------------------------------------------------------ reads

    async def search(self, request: Request) -> Response:
        body = await self._json(request, 64 * 1024)
        reject_unknown(body, SEARCH_FIELDS)
        collections = body.get("collections")
        if not isinstance(collections, list) or not collections:
            raise invalid_field("collections", "must be a non-empty list of collection names")
        principal: Principal | None = None
        for name in collections:
            if not isinstance(name, str) or not COLLECTION.match(name):
                raise invalid_field("collections", f"{str(name)[:80]!r} is not a collection name")
            principal = await self._allow(request, "read", name)
        assert principal is not None
        forwarded = {**body, "tenant": principal.tenant, "groups": list(principal.roles)}
        return await self._forward("POST", "/v1/kb/search", json_body=forwarded)

    async def collections(self, request: Request) -> Response:
        principal = await self._allow(request, "read", None)
        return await self._forward("GET", "/v1/kb/collections", {"tenant": principal.tenant})

    async def documents(self, request: Request) -> Response:
        collection = self._collection(request)
        principal = await self._allow(request, "read", collection)
        params = {**request.query_params, "tenant": principal.tenant}
        return await self._forward("GET", request.url.path, params)

    async def document(self, request: Request) -> Response:
        collection = self._collection(request)
        self._document_id(request.path_params["document_id"])
        principal = await self._allow(request, "read", collection)
        return await self._forward("GET", request.url.path, {"tenant": principal.tenant})

    # ------------------------------------------------------------------ writes

    async def ingest(self, request: Request) -> Response:
        collection = self._collection(request)
        limit = self.settings.max_document_bytes
        body = await self._json(request, limit * 4 // 3 + 64 * 1024)  # base64 and fields
        reject_unknown(body, INGEST_FIELDS)
        content_type = body.get("content_type")
        if content_type not in CONTENT_TYPES:
            raise invalid_field(
                "content_type", f"unsupported; use one of {', '.join(CONTENT_TYPES)}"
            )
        content = _content(body)
        if not content.strip():
            raise invalid_field(
                "text" if "text" in body else "content_base64", "the document is empty"
            )
        if len(content) > limit:
            raise DocumentTooLarge(f"the document has {len(content)} bytes; the limit is {limit}")
        document_id = self._document_id(body.get("document_id") or uuid.uuid4().hex)
        title = body.get("title") or ""
        if not isinstance(title, str) or len(title) > 500:
            raise invalid_field("title", "must be text of at most 500 characters")
        acl = body.get("acl") or []
        if not isinstance(acl, list) or not all(
            isinstance(g, str) and 0 < len(g) <= 128 for g in acl
        ):
            raise invalid_field("acl", "must be a list of group or role names")
        metadata = body.get("metadata") or {}
        if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            raise invalid_field("metadata", "must be an object of string values")
        principal = await self._allow(request, "write", collection)
        event = ev.KbIngest(
            document_id=document_id,
            collection=collection,
            title=title,
            content_type=content_type,
            content=content,
        )
        event.acl.extend(acl)
        event.metadata.update(metadata)
        await self._publish(event, principal.tenant)
        return self._accepted(collection, document_id, "queued")

    async def delete(self, request: Request) -> Response:
        collection = self._collection(request)
        document_id = self._document_id(request.path_params["document_id"])
        principal = await self._allow(request, "write", collection)
        event = ev.KbIngest(document_id=document_id, collection=collection, delete=True)
        await self._publish(event, principal.tenant)
        return self._accepted(collection, document_id, "deletion queued")

    # ------------------------------------------------------------------ plumbing

    async def _publish(self, event: ev.KbIngest, tenant: str) -> None:
        try:
            await self.publisher.publish(KB_INGEST, event, key=event.document_id, tenant=tenant)
        except Exception as error:
            raise ServiceUnavailableError(
                "the mesh's message broker did not take the document; retry later"
            ) from error

    @staticmethod
    def _accepted(collection: str, document_id: str, status: str) -> Response:
        return JSONResponse(
            {
                "document_id": document_id,
                "collection": collection,
                "status": status,
                "status_url": f"/v1/kb/collections/{collection}/documents/{document_id}",
            },
            status_code=202,
        )

    @staticmethod
    async def _json(request: Request, limit: int) -> dict[str, Any]:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise DocumentTooLarge(f"the request body is larger than {limit} bytes")
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except ValueError as error:
            raise InvalidRequestError(f"the body is not valid JSON ({error})") from None
        if not isinstance(body, dict):
            raise InvalidRequestError("the body must be a JSON object")
        return body

    async def _forward(
        self,
        method: str,
        path: str,
        params: dict[str, str] | None = None,
        json_body: dict[str, Any] | None = None,
    ) -> Response:
        url = self.settings.service_url.rstrip("/") + path
        try:
            reply = await self._client.request(method, url, params=params, json=json_body)
            body = reply.json()
        except (httpx.HTTPError, ValueError) as error:
            raise ServiceUnavailableError(
                f"the knowledge base is unreachable ({type(error).__name__}); retry later"
            ) from error
        return JSONResponse(body, status_code=reply.status_code)


def _group(name: Any) -> bool:
    return isinstance(name, str) and 0 < len(name) <= 128


def _content(body: dict[str, Any]) -> bytes:
    text, encoded = body.get("text"), body.get("content_base64")
    if (text is None) == (encoded is None):
        raise invalid_field("text", "give the document as text or as content_base64 (one of them)")
    if text is not None:
        if not isinstance(text, str):
            raise invalid_field("text", "must be a string")
        return text.encode()
    if not isinstance(encoded, str):
        raise invalid_field("content_base64", "must be a base64 string")
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise invalid_field("content_base64", "is not valid base64") from None
