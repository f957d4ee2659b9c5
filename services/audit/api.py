"""The audit service's query and proof API (internal: the gateway forwards to it after the
policy allowed the caller, with the tenant the caller may see).

Only the gateway's service identity may call it (``Authorization: Bearer <its token>``, see
:mod:`shared.service_auth`): no token or an unknown one is answered 401, another service's
403, so no other process that reaches the port reads any tenant's records.

Routes (JSON; errors as ``{"error": {"message", "type", "param", "code"}}``):

- ``GET /v1/audit/records``: filters ``tenant``, ``api_key_id``, ``user``, ``model``,
  ``model_version``, ``request_id``, ``kind``; ``since`` (inclusive) and ``until``
  (exclusive) as ISO 8601 with a zone or Unix seconds; ``cursor`` (from the previous
  page's ``next_cursor``), ``limit`` (1..max_page_size), ``order`` (asc, desc).
- ``GET /v1/audit/records/{event_id}``: one record; ``tenant`` scopes it (404 otherwise).
- ``GET /v1/audit/records/{event_id}/proof``: the record with its inclusion proof against
  the latest checkpoint (or the one of ``tree_size``), verifiable offline with
  ``meshllm audit verify --proof``.
- ``GET /v1/audit/checkpoints``: signed checkpoints, newest first (``limit``).
- ``GET /v1/audit/consistency?first=M&second=N``: a consistency proof between two sizes.
- ``GET /v1/audit/public-key``: the PEM public key checkpoints verify with.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from services.audit.log import AuditLog
from services.audit.merkle import ProofError
from services.audit.records import KINDS, UNKNOWN_KIND, AuditQuery
from shared.logging import get_logger
from shared.openai_protocol import (
    InvalidRequestError,
    NotFoundError,
    OpenAIError,
    invalid_field,
    reject_unknown,
)
from shared.service_auth import ServiceForbidden, ServiceGuard

log = get_logger(__name__)

FILTERS = ("tenant", "api_key_id", "user", "model", "model_version", "request_id", "kind")
QUERY_PARAMS = frozenset((*FILTERS, "since", "until", "cursor", "limit", "order"))
MAX_FILTER_LENGTH = 256
MAX_INTEGER = 2**63 - 1  # leaf indices and tree sizes are SQLite/OpenSearch 64-bit integers
CALLERS = frozenset({"gateway", "feedback"})
"""The services that may call this API: the gateway, after its policy allowed the caller,
and the feedback service, which reads the records of the answers rated (``records`` only)."""
RECORD_READERS = CALLERS
GATEWAY_ONLY = frozenset({"gateway"})
# The span of int64 nanoseconds since the epoch, which occurred_at is stored as.
EARLIEST = datetime(1677, 9, 22, tzinfo=UTC)
LATEST = datetime(2262, 4, 11, tzinfo=UTC)


class NotCheckpointed(OpenAIError):
    """The record is newer than every signed checkpoint; one follows within the interval."""

    status = 409
    error_type = "conflict_error"


def _only(params: Mapping[str, str], allowed: frozenset[str]) -> None:
    reject_unknown(sorted(params), allowed, what="a query parameter")


def _digits(value: str) -> bool:
    # str.isdigit() also takes "²" (which int() refuses) and other scripts' digits
    return value.isascii() and value.isdigit()


def _integer(params: Mapping[str, str], name: str, low: int, high: int = MAX_INTEGER) -> int | None:
    value = params.get(name)
    if value is None:
        return None
    if not _digits(value):
        raise invalid_field(name, f"must be a whole number, got {value[:40]!r}")
    number = int(value)
    if not low <= number <= high:
        raise invalid_field(name, f"must be between {low} and {high}, got {value[:40]}")
    return number


def _moment(params: Mapping[str, str], name: str) -> datetime | None:
    value = params.get(name)
    if value is None:
        return None
    try:
        if _digits(value.replace(".", "", 1)):
            return datetime.fromtimestamp(float(value), UTC)
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except (ValueError, OverflowError, OSError):
        raise invalid_field(
            name, f"must be ISO 8601 with a time zone or Unix seconds, got {value[:40]!r}"
        ) from None
    if moment.tzinfo is None:
        raise invalid_field(name, f"needs a time zone (e.g. {value}Z), got {value[:40]!r}")
    return moment


def _representable(moment: datetime | None) -> datetime | None:
    """``moment`` within the times a record can have (int64 nanoseconds since the epoch):
    ``until=9999-12-31T00:00:00Z`` means "no end", not an overflow in the store."""
    if moment is None:
        return None
    return min(max(moment, EARLIEST), LATEST)


def parse_query(params: Mapping[str, str], max_page_size: int) -> AuditQuery:
    """The :class:`AuditQuery` of a request's query string; 400 naming the bad parameter."""
    _only(params, QUERY_PARAMS)
    for name in FILTERS:
        value = params.get(name)
        if value is not None and not 0 < len(value) <= MAX_FILTER_LENGTH:
            raise invalid_field(name, f"must have 1 to {MAX_FILTER_LENGTH} characters")
    kind = params.get("kind")
    if kind is not None and kind not in (*KINDS, UNKNOWN_KIND):
        raise invalid_field("kind", f"must be one of {', '.join(KINDS)}, got {kind[:40]!r}")
    order = params.get("order", "asc")
    if order not in ("asc", "desc"):
        raise invalid_field("order", f"must be asc or desc, got {order[:40]!r}")
    since, until = _moment(params, "since"), _moment(params, "until")
    if since is not None and until is not None and since >= until:
        raise invalid_field("until", "must be later than since")
    limit = _integer(params, "limit", 1, max_page_size)
    return AuditQuery(
        **{name: params.get(name) for name in FILTERS},
        since=_representable(since),
        until=_representable(until),
        after=_integer(params, "cursor", 0),
        limit=limit if limit is not None else min(100, max_page_size),
        descending=order == "desc",
    )


class AuditApi:
    def __init__(self, audit_log: AuditLog, max_page_size: int, guard: ServiceGuard) -> None:
        self.log = audit_log
        self.max_page_size = max_page_size
        self.guard = guard

    def app(self) -> Starlette:
        def route(
            path: str, handler: Callable[[Request], Any], callers: frozenset[str] = GATEWAY_ONLY
        ) -> Route:
            async def endpoint(request: Request) -> Response:
                try:
                    request.state.caller = self.guard.check(request.headers, callers)
                    return JSONResponse(await handler(request))
                except OpenAIError as error:
                    return JSONResponse(error.to_dict(), status_code=error.status)
                except Exception:
                    # logged here, through the service's JSON and PII-filtered logging, and
                    # answered in the API's error format, not as uvicorn's plain-text 500
                    log.exception("audit API request failed", path=request.url.path)
                    failed = OpenAIError("the audit service failed to answer; see its logs")
                    return JSONResponse(failed.to_dict(), status_code=failed.status)

            return Route(path, endpoint, methods=["GET"])

        return Starlette(
            routes=[
                route("/v1/audit/records", self.records, RECORD_READERS),
                route("/v1/audit/records/{event_id}", self.record),
                route("/v1/audit/records/{event_id}/proof", self.proof),
                route("/v1/audit/checkpoints", self.checkpoints),
                route("/v1/audit/consistency", self.consistency),
                route("/v1/audit/public-key", self.public_key),
            ]
        )

    async def records(self, request: Request) -> dict[str, Any]:
        query = parse_query(request.query_params, self.max_page_size)
        if request.state.caller != "gateway" and not (query.tenant and query.request_id):
            # the feedback service reads the records of one rated answer, never a listing
            raise ServiceForbidden(
                "the feedback service reads one request's records (tenant and request_id)",
                "request_id",
                "service_not_allowed",
            )
        page = await asyncio.to_thread(self.log.store.query, query)
        return page.to_json()

    async def _scoped(self, request: Request, allowed: frozenset[str]) -> Any:
        _only(request.query_params, allowed)
        event_id = request.path_params["event_id"]
        found = await asyncio.to_thread(self.log.store.get_by_event_id, event_id)
        tenant = request.query_params.get("tenant")
        if found is None or (tenant is not None and found.tenant != tenant):
            raise NotFoundError(f"no audit record {event_id[:80]!r}", "event_id", "not_found")
        return found

    async def record(self, request: Request) -> dict[str, Any]:
        found = await self._scoped(request, frozenset({"tenant"}))
        result: dict[str, Any] = found.to_json()
        return result

    async def proof(self, request: Request) -> dict[str, Any]:
        _only(request.query_params, frozenset({"tenant", "tree_size"}))
        size = _integer(request.query_params, "tree_size", 1)
        found = await self._scoped(request, frozenset({"tenant", "tree_size"}))
        checkpoint = None
        if size is not None:
            checkpoint = await asyncio.to_thread(self.log.store.checkpoint_at, size)
            if checkpoint is None:
                raise invalid_field("tree_size", f"no signed checkpoint has size {size}")
            if size <= found.leaf_index:
                raise invalid_field(
                    "tree_size",
                    f"the checkpoint of size {size} does not cover leaf {found.leaf_index}",
                )
        try:
            bundle = await asyncio.to_thread(
                self.log.record_proof, leaf_index=found.leaf_index, checkpoint=checkpoint
            )
        except ProofError as error:
            raise NotCheckpointed(str(error), None, "not_checkpointed_yet") from error
        result: dict[str, Any] = bundle.to_json()
        return result

    async def checkpoints(self, request: Request) -> dict[str, Any]:
        _only(request.query_params, frozenset({"limit"}))
        limit = _integer(request.query_params, "limit", 1, self.max_page_size) or 20
        stored = await asyncio.to_thread(self.log.store.checkpoints)
        newest = sorted(stored, key=lambda c: c.tree_size, reverse=True)[:limit]
        return {"log_id": self.log.log_id, "checkpoints": [c.to_json() for c in newest]}

    async def consistency(self, request: Request) -> dict[str, Any]:
        params = request.query_params
        _only(params, frozenset({"first", "second"}))
        first = _integer(params, "first", 1)
        second = _integer(params, "second", 1)
        if first is None:
            raise invalid_field("first", "is required (a tree size)")
        try:
            proof = await asyncio.to_thread(self.log.consistency_proof, first, second)
        except ProofError as error:
            raise InvalidRequestError(str(error), "second" if second else "first") from error
        result: dict[str, Any] = proof.to_json()
        return result

    async def public_key(self, request: Request) -> dict[str, Any]:
        _only(request.query_params, frozenset())
        pem = self.log.signer.public_key_pem().decode()
        return {"public_key": pem, "log_id": self.log.log_id}
