"""``/v1/audit/*`` at the gateway: the policy decides, the audit service answers.

Each call is authenticated, then the policy is asked whether the caller may ``read``
(records, proofs) or ``verify`` (checkpoints, consistency proofs, the public key) the audit
records of the tenant asked for: the ``tenant`` query parameter, else the caller's own.
Only auditors and admins of that tenant, and platform admins, are allowed (see
``policies/``); the decision itself is audited. An allowed call is forwarded to the audit
service with the tenant fixed, so a caller never sees another tenant's records; the gateway
proves its own identity there with its service token (see :mod:`shared.service_auth`).
"""

from __future__ import annotations

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
from shared.events.v1 import events_pb2 as ev
from shared.openai_protocol import (
    PermissionDeniedError,
    ServiceUnavailableError,
    invalid_field,
    reject_unknown,
)
from shared.policy import AccessRequest, Resource, Subject

READ_PATHS = (
    "/v1/audit/records",
    "/v1/audit/records/{event_id}",
    "/v1/audit/records/{event_id}/proof",
)
VERIFY_PATHS = ("/v1/audit/checkpoints", "/v1/audit/consistency", "/v1/audit/public-key")
RECORD_FILTERS = ("api_key_id", "user", "model", "model_version", "request_id", "kind")
QUERY_PARAMS: dict[str, frozenset[str]] = {
    "/v1/audit/records": frozenset(
        {"tenant", *RECORD_FILTERS, "since", "until", "cursor", "limit", "order"}
    ),
    "/v1/audit/records/{event_id}": frozenset({"tenant"}),
    "/v1/audit/records/{event_id}/proof": frozenset({"tenant", "tree_size"}),
    "/v1/audit/checkpoints": frozenset({"tenant", "limit"}),
    "/v1/audit/consistency": frozenset({"tenant", "first", "second"}),
    "/v1/audit/public-key": frozenset({"tenant"}),
}
"""The query parameters of each route (the audit service's, and ``tenant``); others: 400."""
MAX_TENANT_LENGTH = 128
EVENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
"""An audit record's id (a UUID for the mesh's own events); matched whole."""


AuditDenied = PermissionDeniedError  # the shared class, under this module's name


class AuditRoutes:
    def __init__(
        self,
        *,
        service_url: str,
        authenticate: Callable[[Request], Principal],
        policy: Policy,
        record: Callable[[ev.AuditEvent, str, str], Awaitable[None]],
        headers: dict[str, str],
        timeout_s: float = 10.0,
    ) -> None:
        """``headers`` name the gateway to the audit service (its service token)."""
        self.service_url = service_url.rstrip("/")
        self.authenticate = authenticate
        self.policy = policy
        self.record = record
        self._client = httpx.AsyncClient(timeout=timeout_s, headers=headers)

    def routes(self) -> list[Route]:
        return [
            *(Route(path, self._endpoint("read", path), methods=["GET"]) for path in READ_PATHS),
            *(
                Route(path, self._endpoint("verify", path), methods=["GET"])
                for path in VERIFY_PATHS
            ),
        ]

    def _endpoint(self, action: str, path: str) -> Callable[[Request], Awaitable[Response]]:
        allowed = QUERY_PARAMS[path]

        async def endpoint(request: Request) -> Response:
            self.authenticate(request)
            reject_unknown(request.query_params, allowed, what="a query parameter here")
            event_id = request.path_params.get("event_id")
            if event_id is not None and not EVENT_ID.fullmatch(event_id):
                # the id becomes part of the audit service's URL: only characters that are
                # the same in a path and in the id
                raise invalid_field("event_id", "use 1-128 letters, digits and _ . : -")
            return await self.handle(request, action)

        return endpoint

    async def handle(self, request: Request, action: str) -> Response:
        principal = self.authenticate(request)
        tenant = request.query_params.get("tenant") or principal.tenant
        if len(tenant) > MAX_TENANT_LENGTH:
            raise invalid_field("tenant", f"must have at most {MAX_TENANT_LENGTH} characters")
        source = request.client.host if request.client else None
        decision = await self.policy.aauthorize(
            AccessRequest(
                Subject(principal.subject, principal.tenant, principal.roles),
                action,
                Resource("audit", tenant),
                source_ip=source,
            )
        )
        await self._audit_decision(principal, action, tenant, decision.allow, decision.reasons)
        if not decision.allow:
            reason = "; ".join(decision.reasons) or "denied by policy"
            raise AuditDenied(reason, "tenant", "policy_denied")
        params = dict(request.query_params)
        if action == "read":
            params["tenant"] = tenant  # the records of the allowed tenant, never more
        else:
            params.pop("tenant", None)
        try:
            reply = await self._client.get(self.service_url + request.url.path, params=params)
        except httpx.HTTPError as error:
            raise ServiceUnavailableError(
                f"the audit service is unreachable ({type(error).__name__}); retry later"
            ) from error
        if reply.status_code in (401, 403):
            # the gateway's own service identity was refused: an operator's problem, which the
            # caller should not read as one about their API key
            raise ServiceUnavailableError(
                "the audit service refused the gateway's service identity "
                "(MESHLLM_SERVICE_AUTH__*); retry later"
            )
        try:
            body: Any = reply.json()
        except ValueError:
            raise ServiceUnavailableError("the audit service gave an unreadable answer") from None
        return JSONResponse(body, status_code=reply.status_code)

    async def _audit_decision(
        self, principal: Principal, action: str, tenant: str, allow: bool, reasons: tuple[str, ...]
    ) -> None:
        request_id = uuid.uuid4().hex
        event = ev.AuditEvent(request_id=request_id, api_key_id=principal.key_id or "")
        event.user = principal.subject
        event.policy.allow = allow
        event.policy.reasons.extend(reasons)
        event.policy.action = f"audit.{action}"
        event.policy.resource = f"audit:{tenant}"
        event.policy.roles.extend(principal.roles)
        await self.record(event, request_id, principal.tenant)

    async def close(self) -> None:
        await self._client.aclose()
