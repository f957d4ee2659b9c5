"""``/v1/kb/*`` at the gateway: the knowledge base, behind the policy and the limits.

- ``POST /v1/kb/search`` ``{"query", "collections", "top_k", "mode"}``: ``read`` on each
  collection; the retrieval service searches only the caller's tenant and the chunks
  whose ACL names one of the caller's roles (or has none).
- ``GET /v1/kb/collections``, ``GET /v1/kb/collections/{c}/documents[/{id}]``: ``read``.
- ``POST /v1/kb/collections/{c}/documents`` ``{"document_id"?, "title"?, "content_type",
  "text" | "content_base64", "acl"?, "metadata"?}``: ``write``; the document goes to
  ``kb.ingest`` and the answer is 202 with where to follow its indexing.
- ``DELETE /v1/kb/collections/{c}/documents/{id}``: ``write``; 202.

What is promised:

- Every field is checked here, before anything is charged or decided: a bad one is a 400
  naming it. Collection names and document ids are whole-string matches (no ``/``, no
  trailing newline) and are URL-encoded as single path segments when forwarded, so the
  collection the policy checked is the one the retrieval service reads.
- A search names at most ``kb.max_search_collections`` distinct collections; duplicates
  count once (each collection is one policy decision and one audit record).
- Every route is charged one request to the key's and the tenant's rate limits and holds
  one of their concurrent slots, as chat requests do (429 with Retry-After).
- Document ACLs apply to every route: listing, counting and reading show only documents
  whose ACL is empty or names one of the caller's roles, and one it may not see is a 404 exactly
  like a missing one; replacing or deleting a document needs the same (enforced by the
  retrieval service when it applies the write; the 202 does not tell). A caller holding
  ``admin`` on the collection is not limited by ACLs on these routes.

Each decision is audited like the gateway's other decisions.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from services.gateway.auth import Principal
from services.gateway.limits import ConcurrencyGate, RateLimiter
from services.gateway.policy import Decision, Policy
from services.gateway.route_guard import RouteGuard
from services.gateway.settings import KbSettings, LimitsConfig
from shared.bus import Publisher
from shared.events.v1 import events_pb2 as ev
from shared.http_body import read_json_body
from shared.kb_names import COLLECTION, COLLECTION_RULE, DOCUMENT_ID, DOCUMENT_ID_RULE
from shared.logging import get_logger
from shared.openai_protocol import (
    InvalidRequestError,
    NotFoundError,
    RequestTooLargeError,
    ServiceUnavailableError,
    invalid_field,
    reject_unknown,
)
from shared.topics import KB_INGEST

log = get_logger(__name__)

CONTENT_TYPES = ("text/plain", "text/markdown", "text/html", "application/pdf")
INGEST_FIELDS = frozenset(
    {"document_id", "title", "content_type", "text", "content_base64", "acl", "metadata"}
)
SEARCH_FIELDS = frozenset({"query", "collections", "top_k", "mode"})

MODES = ("hybrid", "bm25", "vector")
MAX_QUERY_CHARS = 4000
MAX_ACL_GROUPS = 64
MAX_METADATA = 64
MAX_LIST_LIMIT = 1000

Params = list[tuple[str, str | int | float | bool | None]]  # query parameters, as httpx takes them


class KbRoutes:
    """The ``/v1/kb/*`` routes.

    Args:
        rate_limiter, concurrency, limits: the gateway's own limiters and their defaults;
            each kb request is charged one request and holds one concurrent slot.
    """

    def __init__(
        self,
        *,
        settings: KbSettings,
        authenticate: Callable[[Request], Principal],
        policy: Policy,
        publisher: Publisher,
        record: Callable[[ev.AuditEvent, str, str], Awaitable[None]],
        rate_limiter: RateLimiter,
        concurrency: ConcurrencyGate,
        limits: LimitsConfig,
        headers: dict[str, str],
    ) -> None:
        """``headers`` name the gateway to the retrieval service (its service token)."""
        self.settings = settings
        self.authenticate = authenticate
        self.publisher = publisher
        self.guard = RouteGuard(
            authenticate=authenticate, policy=policy, record=record, rate_limiter=rate_limiter,
            concurrency=concurrency, limits=limits,
        )  # fmt: skip
        self._client = httpx.AsyncClient(timeout=30, headers=headers)

    def routes(self) -> list[Route]:
        documents = "/v1/kb/collections/{collection}/documents"
        limited = self.guard.limited
        return [
            Route("/v1/kb/search", limited(self.search), methods=["POST"]),
            Route("/v1/kb/collections", limited(self.collections), methods=["GET"]),
            Route(documents, limited(self.documents), methods=["GET"]),
            Route(documents, limited(self.ingest), methods=["POST"]),
            # ":path" so that an id with "/" (or "%2F") reaches the check and gets its 400
            Route(documents + "/{document_id:path}", limited(self.document), methods=["GET"]),
            Route(documents + "/{document_id:path}", limited(self.delete), methods=["DELETE"]),
        ]

    # ------------------------------------------------------------------ decisions

    async def _allow(
        self, request: Request, principal: Principal, action: str, collection: str | None
    ) -> None:
        """403 unless the policy allows ``action``; audited either way."""
        await self.guard.allow(
            request, principal, "kb_collection", action, collection, label="kb", param="collection"
        )

    async def _decide(
        self, request: Request, principal: Principal, action: str, collection: str | None
    ) -> Decision:
        return await self.guard.decide(
            request, principal, "kb_collection", action, collection, label="kb"
        )

    async def _document_access(
        self, request: Request, principal: Principal, action: str, collection: str | None
    ) -> bool:
        """Allow ``action`` on the collection's documents; True when the caller administers
        the collection, so that document ACLs do not limit it."""
        if (await self._decide(request, principal, "admin", collection)).allow:
            return True
        await self._allow(request, principal, action, collection)
        return False

    # ------------------------------------------------------------------ reads

    async def search(self, request: Request, principal: Principal) -> Response:
        body = await self._json(request, 64 * 1024)
        reject_unknown(body, SEARCH_FIELDS)
        query = body.get("query")
        if not isinstance(query, str) or not query.strip():
            raise invalid_field("query", "is required (non-empty text)")
        if len(query) > MAX_QUERY_CHARS:
            raise invalid_field("query", f"must have at most {MAX_QUERY_CHARS} characters")
        top_k, most = body.get("top_k", 5), self.settings.max_top_k
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= most:
            raise invalid_field("top_k", f"must be an integer from 1 to {most}")
        mode = body.get("mode", "hybrid")
        if mode not in MODES:
            raise invalid_field("mode", f"must be one of {', '.join(MODES)}")
        collections = _collection_list(
            body.get("collections"), self.settings.max_search_collections
        )
        await self.guard.charge(principal, request)
        for name in collections:
            await self._allow(request, principal, "read", name)
        forwarded = {
            "query": query,
            "collections": collections,
            "top_k": top_k,
            "mode": mode,
            "tenant": principal.tenant,
            "groups": list(principal.roles),
        }
        return await self._forward("POST", "/v1/kb/search", json_body=forwarded)

    async def collections(self, request: Request, principal: Principal) -> Response:
        reject_unknown(request.query_params, (), what="a query parameter here")
        await self.guard.charge(principal, request)
        admin = await self._document_access(request, principal, "read", None)
        params: Params = [("tenant", principal.tenant), *_reader(principal, admin)]
        return await self._forward("GET", "/v1/kb/collections", params)

    async def documents(self, request: Request, principal: Principal) -> Response:
        collection = _collection(request)
        reject_unknown(request.query_params, ("after", "limit"), what="a query parameter here")
        params: Params = [("tenant", principal.tenant)]
        after = request.query_params.get("after")
        if after is not None:
            params.append(("after", _document_id(after, "after")))
        limit = request.query_params.get("limit")
        if limit is not None:
            if not limit.isdigit() or not 1 <= int(limit) <= MAX_LIST_LIMIT:
                raise invalid_field("limit", f"must be an integer from 1 to {MAX_LIST_LIMIT}")
            params.append(("limit", limit))
        await self.guard.charge(principal, request)
        admin = await self._document_access(request, principal, "read", collection)
        return await self._forward("GET", _path(collection), params + _reader(principal, admin))

    async def document(self, request: Request, principal: Principal) -> Response:
        collection = _collection(request)
        document_id = _path_document_id(request)
        reject_unknown(request.query_params, (), what="a query parameter here")
        await self.guard.charge(principal, request)
        admin = await self._document_access(request, principal, "read", collection)
        params: Params = [
            ("tenant", principal.tenant),
            *_reader(principal, admin),
        ]
        return await self._forward("GET", _path(collection, document_id), params)

    # ------------------------------------------------------------------ writes

    async def ingest(self, request: Request, principal: Principal) -> Response:
        collection = _collection(request)
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
            raise RequestTooLargeError(
                f"the document has {len(content)} bytes; the limit is {limit}"
            )
        given_id = body.get("document_id")
        document_id = uuid.uuid4().hex if given_id is None else _document_id(given_id)
        title = _or_default(body, "title", "")
        if not isinstance(title, str) or len(title) > 500:
            raise invalid_field("title", "must be text of at most 500 characters")
        acl = _or_default(body, "acl", [])
        if (
            not isinstance(acl, list)
            or len(acl) > MAX_ACL_GROUPS
            or not all(isinstance(g, str) and 0 < len(g) <= 128 for g in acl)
        ):
            raise invalid_field("acl", f"must be a list of at most {MAX_ACL_GROUPS} group names")
        metadata = _or_default(body, "metadata", {})
        if (
            not isinstance(metadata, dict)
            or len(metadata) > MAX_METADATA
            or not all(
                isinstance(k, str) and 0 < len(k) <= 128 and isinstance(v, str) and len(v) <= 1024
                for k, v in metadata.items()
            )
        ):
            raise invalid_field(
                "metadata", f"must be an object of at most {MAX_METADATA} short string values"
            )
        await self.guard.charge(principal, request)
        admin = await self._document_access(request, principal, "write", collection)
        event = ev.KbIngest(
            document_id=document_id,
            collection=collection,
            title=title,
            content_type=content_type,
            content=content,
            writer_is_admin=admin,
        )
        event.acl.extend(acl)
        event.metadata.update(metadata)
        event.writer_groups.extend(principal.roles)
        await self._publish(event, principal.tenant)
        return self._accepted(collection, document_id, "queued")

    async def delete(self, request: Request, principal: Principal) -> Response:
        collection = _collection(request)
        document_id = _path_document_id(request)
        reject_unknown(request.query_params, (), what="a query parameter here")
        await self.guard.charge(principal, request)
        admin = await self._document_access(request, principal, "write", collection)
        event = ev.KbIngest(
            document_id=document_id, collection=collection, delete=True, writer_is_admin=admin
        )
        event.writer_groups.extend(principal.roles)
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
                "status_url": _path(collection, document_id),
            },
            status_code=202,
        )

    async def _json(self, request: Request, limit: int) -> dict[str, Any]:
        """The body of an authenticated caller (401 before a byte is read), read within
        ``kb.body_timeout_s`` (408) and ``limit`` bytes (413), as strict JSON of bounded
        depth."""
        self.authenticate(request)
        body = await read_json_body(request, limit, self.settings.body_timeout_s)
        if not isinstance(body, dict):
            raise InvalidRequestError("the body must be a JSON object")
        return body

    async def _forward(
        self,
        method: str,
        path: str,
        params: Params | None = None,
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
        if reply.status_code == 404:  # the same answer for missing and for not visible
            raise NotFoundError("no such document in this collection", "document_id", "not_found")
        if reply.status_code in (401, 403) or reply.status_code >= 500:
            # the gateway's identity refused, or the service failed: its words name internal
            # services (an embedder's URL...), so they are logged and not told
            log.error("the knowledge base failed a call", status=reply.status_code, body=body)
            raise ServiceUnavailableError("the knowledge base could not answer; retry later")
        return JSONResponse(body, status_code=reply.status_code)


def _path(collection: str, document_id: str | None = None) -> str:
    """The retrieval service's path; each name is encoded as one segment, so that nothing in
    a name can change which collection is read (``..``, ``/``, ``?``, ``#``)."""
    path = f"/v1/kb/collections/{quote(collection, safe='')}/documents"
    return path if document_id is None else f"{path}/{quote(document_id, safe='')}"


def _reader(principal: Principal, admin: bool) -> Params:
    """Query parameters that tell the retrieval service whose ACL view to give."""
    if admin:
        return [("admin", "true")]
    return [("group", role) for role in principal.roles]


def _collection(request: Request) -> str:
    name = str(request.path_params["collection"])
    if not COLLECTION.fullmatch(name):
        raise invalid_field("collection", COLLECTION_RULE)
    return name


def _document_id(value: Any, field: str = "document_id") -> str:
    if not isinstance(value, str) or not DOCUMENT_ID.fullmatch(value):
        raise invalid_field(field, DOCUMENT_ID_RULE)
    return value


def _path_document_id(request: Request) -> str:
    # the route's own pattern ends in "$", which matches before a final newline and so
    # drops it from the parameter: check what really follows "/documents/" in the path
    return _document_id(str(request.scope["path"]).partition("/documents/")[2])


def _collection_list(value: Any, most: int) -> list[str]:
    """The distinct collection names of a search, in order; 400 naming ``collections``."""
    if not isinstance(value, list) or not value:
        raise invalid_field("collections", "must be a non-empty list of collection names")
    names: dict[str, None] = {}
    for name in value:
        if not isinstance(name, str) or not COLLECTION.fullmatch(name):
            raise invalid_field("collections", f"{str(name)[:80]!r} is not a collection name")
        names[name] = None
        if len(names) > most:
            raise invalid_field("collections", f"at most {most} distinct collections per search")
    return list(names)


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


def _or_default(body: dict[str, Any], name: str, default: Any) -> Any:
    """``body[name]``, or ``default`` when it is absent or null (and only then: a ``0`` or
    ``false`` where text or a list belongs is refused by the caller's check, not taken as
    empty)."""
    value = body.get(name)
    return default if value is None else value
