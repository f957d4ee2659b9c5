"""The retrieval service's API (internal: the router and the gateway call it; the gateway
has checked the caller's policy and fills in the tenant and groups).

- ``POST /v1/kb/search``: ``{"tenant", "collections": [...], "groups": [...], "query",
  "top_k", "mode": "hybrid"|"bm25"|"vector"}`` -> ``{"hits": [{chunk_id, document_id,
  title, collection, text, score, ordinal, bm25_rank, vector_rank}]}``. Only chunks of
  that tenant and those collections whose ACL is empty or names one of the groups are
  searched at all.
- ``GET /v1/kb/collections?tenant=&group=...`` -> the tenant's collections with their sizes.
- ``GET /v1/kb/collections/{collection}/documents?tenant=&group=...&after=&limit=``
- ``GET /v1/kb/collections/{collection}/documents/{document_id}?tenant=&group=...`` -> the
  stored document and the outcome of its last ingestion (``failed`` with the reason, too).

The listing routes (and their counts) and ``GET`` of a document show only what the
caller's groups (``group``, repeated) may read (:mod:`services.retrieval.access`), or
everything with ``admin=true`` (the gateway sets it for a collection's administrators); a
document the caller may not read is answered exactly as one that does not exist.

Callers prove their service identity (``Authorization: Bearer <token>``, see
:mod:`shared.service_auth`): search is granted to the gateway and the router, the listings
to the gateway only; no token or an unknown one is answered 401, another service's 403.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from services.retrieval import metrics as retrieval_metrics
from services.retrieval.access import Reader
from services.retrieval.embedder import EmbedderError
from services.retrieval.index import DocumentInfo, KnowledgeIndex, Scope
from services.retrieval.search import HybridSearcher
from services.retrieval.service import StatusStore
from shared.http_body import read_json_body
from shared.kb_names import (
    COLLECTION_RULE,
    DOCUMENT_ID_RULE,
    valid_collection,
    valid_document_id,
)
from shared.openai_protocol import (
    InvalidRequestError,
    NotFoundError,
    OpenAIError,
    ServiceUnavailableError,
    invalid_field,
    reject_unknown,
)
from shared.service_auth import ServiceGuard

SEARCH_FIELDS = frozenset({"tenant", "collections", "groups", "query", "top_k", "mode"})
MODES = ("hybrid", "bm25", "vector")
MAX_QUERY_CHARS = 4000
MAX_COLLECTIONS = 32
MAX_GROUPS = 64
SEARCHERS = frozenset({"gateway", "router"})
"""Who may search: the gateway (``/v1/kb/search``) and the router (RAG)."""
READERS = frozenset({"gateway"})
"""Who may list collections and read documents: the gateway, after its policy check."""
CALLERS = SEARCHERS | READERS
MAX_SEARCH_BODY_BYTES = 64 * 1024
BODY_TIMEOUT_S = 10.0


def parse_search(body: Any, max_top_k: int) -> tuple[Scope, str, int, str]:
    """(scope, query, top_k, mode) of a search body; 400 naming the field at fault."""
    if not isinstance(body, dict):
        raise InvalidRequestError("the body must be a JSON object")
    reject_unknown(body, SEARCH_FIELDS)
    tenant = body.get("tenant")
    if not isinstance(tenant, str) or not tenant:
        raise invalid_field("tenant", "is required (a non-empty string)")
    query = body.get("query")
    if not isinstance(query, str) or not query.strip():
        raise invalid_field("query", "is required (non-empty text)")
    if len(query) > MAX_QUERY_CHARS:
        raise invalid_field("query", f"must have at most {MAX_QUERY_CHARS} characters")
    collections = body.get("collections")
    if (
        not isinstance(collections, list)
        or not 1 <= len(collections) <= MAX_COLLECTIONS
        or not all(valid_collection(c) for c in collections)
    ):
        raise invalid_field(
            "collections",
            f"must list 1 to {MAX_COLLECTIONS} collection names (letters, digits, _ . -)",
        )
    groups = body.get("groups", [])
    if (
        not isinstance(groups, list)
        or len(groups) > MAX_GROUPS
        or not all(isinstance(g, str) and 0 < len(g) <= 128 for g in groups)
    ):
        raise invalid_field("groups", f"must be a list of at most {MAX_GROUPS} names")
    top_k = body.get("top_k", 5)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= max_top_k:
        raise invalid_field("top_k", f"must be an integer from 1 to {max_top_k}")
    mode = body.get("mode", "hybrid")
    if mode not in MODES:
        raise invalid_field("mode", f"must be one of {', '.join(MODES)}")
    scope = Scope(tenant, tuple(dict.fromkeys(collections)), tuple(groups))
    return scope, query, top_k, str(mode)


def document_json(info: DocumentInfo) -> dict[str, Any]:
    return {
        "document_id": info.document_id,
        "collection": info.collection,
        "title": info.title,
        "content_type": info.content_type,
        "content_sha256": info.content_sha256,
        "chunks": info.chunks,
        "acl": list(info.acl),
        "metadata": dict(info.metadata),
        "indexed_at_ns": info.indexed_at_ns,
    }


class RetrievalApi:
    def __init__(
        self,
        index: KnowledgeIndex,
        searcher: HybridSearcher,
        statuses: StatusStore,
        *,
        max_top_k: int,
        guard: ServiceGuard,
    ) -> None:
        self.guard = guard
        self.index = index
        self.searcher = searcher
        self.statuses = statuses
        self.max_top_k = max_top_k

    def app(self) -> Starlette:
        def route(
            path: str,
            handler: Callable[[Request], Awaitable[Any]],
            method: str,
            callers: frozenset[str] = READERS,
        ) -> Route:
            async def endpoint(request: Request) -> Response:
                try:
                    self.guard.check(request.headers, callers)
                    return JSONResponse(await handler(request))
                except OpenAIError as error:
                    return JSONResponse(error.to_dict(), status_code=error.status)

            return Route(path, endpoint, methods=[method])

        return Starlette(
            routes=[
                route("/v1/kb/search", self.search, "POST", SEARCHERS),
                route("/v1/kb/collections", self.collections, "GET"),
                route("/v1/kb/collections/{collection}/documents", self.documents, "GET"),
                route(
                    "/v1/kb/collections/{collection}/documents/{document_id:path}",
                    self.document,
                    "GET",
                ),
            ]
        )

    async def search(self, request: Request) -> dict[str, Any]:
        body = await read_json_body(request, MAX_SEARCH_BODY_BYTES, BODY_TIMEOUT_S)
        scope, query, top_k, mode = parse_search(body, self.max_top_k)
        started = time.monotonic()
        try:
            hits = await asyncio.to_thread(self.searcher.search, scope, query, top_k, mode)
        except EmbedderError as error:
            retrieval_metrics.searched(mode, time.monotonic() - started, "embedder_error")
            raise ServiceUnavailableError(f"the query could not be embedded: {error}") from error
        retrieval_metrics.searched(mode, time.monotonic() - started)
        return {
            "hits": [
                {
                    "chunk_id": hit.chunk.chunk_id,
                    "document_id": hit.chunk.document_id,
                    "title": hit.chunk.title,
                    "collection": hit.chunk.collection,
                    "ordinal": hit.chunk.ordinal,
                    "text": hit.chunk.text,
                    "score": hit.score,
                    "bm25_rank": hit.bm25_rank,
                    "vector_rank": hit.vector_rank,
                    # readable only by some of the tenant's groups (it has an ACL)
                    "restricted": bool(hit.chunk.acl),
                }
                for hit in hits
            ]
        }

    @staticmethod
    def _tenant(request: Request, allowed: frozenset[str]) -> str:
        for key in request.query_params:
            if key not in allowed:
                raise invalid_field(key, "is not a query parameter here")
        tenant = request.query_params.get("tenant")
        if not tenant:
            raise invalid_field("tenant", "is required")
        return tenant

    @staticmethod
    def _reader(request: Request) -> Reader:
        groups = request.query_params.getlist("group")
        if len(groups) > MAX_GROUPS or not all(0 < len(g) <= 128 for g in groups):
            raise invalid_field("group", f"at most {MAX_GROUPS} names of 1-128 characters")
        admin = request.query_params.get("admin", "false")
        if admin not in ("true", "false"):
            raise invalid_field("admin", "must be true or false")
        return Reader(tuple(groups), admin == "true")

    @staticmethod
    def _collection(request: Request) -> str:
        collection = str(request.path_params["collection"])
        if not valid_collection(collection):
            raise invalid_field("collection", COLLECTION_RULE)
        return collection

    async def collections(self, request: Request) -> dict[str, Any]:
        tenant = self._tenant(request, frozenset({"tenant", "group", "admin"}))
        reader = self._reader(request)
        found = await asyncio.to_thread(
            functools.partial(self.index.collections, tenant, readers=reader.readers)
        )
        return {
            "collections": [
                {"collection": c.collection, "documents": c.documents, "chunks": c.chunks}
                for c in found
            ]
        }

    async def documents(self, request: Request) -> dict[str, Any]:
        tenant = self._tenant(request, frozenset({"tenant", "group", "admin", "after", "limit"}))
        reader = self._reader(request)
        collection = self._collection(request)
        limit_text = request.query_params.get("limit", "100")
        if not limit_text.isdigit() or not 1 <= int(limit_text) <= 1000:
            raise invalid_field("limit", "must be an integer from 1 to 1000")
        found = await asyncio.to_thread(
            self.index.documents,
            tenant,
            collection,
            after=request.query_params.get("after"),
            limit=int(limit_text),
            readers=reader.readers,
        )
        return {
            "documents": [document_json(info) for info in found],
            "next_after": found[-1].document_id if len(found) == int(limit_text) else None,
        }

    async def document(self, request: Request) -> dict[str, Any]:
        tenant = self._tenant(request, frozenset({"tenant", "group", "admin"}))
        reader = self._reader(request)
        collection = self._collection(request)
        document_id = str(request.path_params["document_id"])
        if not valid_document_id(document_id):
            raise invalid_field("document_id", DOCUMENT_ID_RULE)
        info = await asyncio.to_thread(self.index.document, tenant, collection, document_id)
        status = await asyncio.to_thread(self.statuses.get, tenant, collection, document_id)
        if info is not None and not reader.may_see(info.acl):
            info, status = None, None  # the status of a hidden document is hidden too
        if status is not None and not reader.may_see(status.acl):
            status = None
        if info is None and status is None:
            raise NotFoundError(f"no document {document_id!r} in {collection!r}", "document_id")
        return {
            "document": None if info is None else document_json(info),
            "last_ingestion": None
            if status is None
            else {
                "state": status.state,
                "chunks": status.chunks,
                "content_sha256": status.content_sha256,
                "error": status.error or None,
                "updated_at_ns": status.updated_at_ns,
            },
        }
