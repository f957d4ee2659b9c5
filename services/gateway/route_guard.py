"""What every management route of the gateway does before its own work (``/v1/kb/*``,
``/v1/feedback``, ``/v1/datasets/*``): authenticate, charge the key's and the tenant's limits
one request and one concurrent slot, and ask the policy, auditing the decision."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Awaitable, Callable

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from services.gateway.admission import limit_key
from services.gateway.auth import Principal
from services.gateway.limits import ConcurrencyGate, Limit, RateLimiter, limits_checked
from services.gateway.policy import Decision, Policy
from services.gateway.settings import LimitsConfig
from shared.events.v1 import events_pb2 as ev
from shared.logging import get_logger
from shared.openai_protocol import PermissionDeniedError, RateLimitError, ServiceUnavailableError
from shared.policy import AccessRequest, Resource, ResourceKind, Subject

log = get_logger(__name__)
Handler = Callable[[Request, Principal], Awaitable[Response]]


class RouteGuard:
    """Authentication, limits and policy decisions for the gateway's management routes.

    Args:
        rate_limiter, concurrency, limits: the gateway's own limiters and their defaults;
            each request is charged one request and holds one concurrent slot.
        record: stores an audit event (event, key, tenant) before the decision takes effect.
    """

    def __init__(
        self,
        *,
        authenticate: Callable[[Request], Principal],
        policy: Policy,
        record: Callable[[ev.AuditEvent, str, str], Awaitable[None]],
        rate_limiter: RateLimiter,
        concurrency: ConcurrencyGate,
        limits: LimitsConfig,
    ) -> None:
        self.authenticate = authenticate
        self.policy = policy
        self.record = record
        self.rate_limiter = rate_limiter
        self.concurrency = concurrency
        self.limits = limits

    def limited(self, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        """``handler`` behind authentication; the concurrent slot :meth:`charge` takes once
        the request is checked is given back when the handler ends."""

        async def endpoint(request: Request) -> Response:
            principal = self.authenticate(request)
            try:
                return await handler(request, principal)
            finally:
                slot = getattr(request.state, "route_slot", None)
                if slot is not None:
                    with contextlib.suppress(Exception):  # a Redis slot lapses by itself
                        await self.concurrency.release(limit_key(principal), principal.tenant, slot)

        return endpoint

    async def charge(self, principal: Principal, request: Request) -> None:
        """Take a concurrent slot of the key and tenant and charge one request to them, once
        the request is checked (after validation, before policy: every decision writes an
        audit record, so denied attempts are paid for too); 429 holding nothing otherwise."""
        key_id = limit_key(principal)
        slot = uuid.uuid4().hex
        with limits_checked():
            full = await self.concurrency.acquire(key_id, principal.tenant, slot)
        if full is not None:
            raise RateLimitError("too many concurrent requests for this key or tenant", 1)
        request.state.route_slot = slot
        with limits_checked():
            wait = await self.rate_limiter.admit(
                key_id,
                principal.tenant,
                Limit(principal.rpm or self.limits.default_rpm, None),
                Limit(self.limits.tenant_rpm, None),
                0,
            )
        if wait is not None:
            raise RateLimitError(
                f"rate limit reached for {key_id if principal.key_id else principal.subject} "
                f"or tenant {principal.tenant}",
                wait,
            )

    async def permits(
        self, request: Request, principal: Principal, kind: ResourceKind, action: str
    ) -> bool:
        """Whether the policy allows ``action`` on ``kind`` of the caller's tenant, asked
        to choose what a route shows (not audited: nothing is refused on it)."""
        return (await self._ask(request, principal, kind, action, None)).allow

    async def _ask(
        self,
        request: Request,
        principal: Principal,
        kind: ResourceKind,
        action: str,
        name: str | None,
    ) -> Decision:
        return await self.policy.aauthorize(
            AccessRequest(
                Subject(principal.subject, principal.tenant, principal.roles),
                action,
                Resource(kind, principal.tenant, name),
                source_ip=request.client.host if request.client else None,
            )
        )

    async def decide(
        self,
        request: Request,
        principal: Principal,
        kind: ResourceKind,
        action: str,
        name: str | None,
        *,
        label: str,
    ) -> Decision:
        """The policy's decision on ``action`` over ``kind``/``name`` of the caller's tenant,
        audited as action ``<label>.<action>`` on ``<kind>:<name or *>``."""
        decision = await self._ask(request, principal, kind, action, name)
        request_id = uuid.uuid4().hex
        event = ev.AuditEvent(request_id=request_id, api_key_id=principal.key_id or "")
        event.user = principal.subject
        event.policy.allow = decision.allow
        event.policy.reasons.extend(decision.reasons)
        event.policy.action = f"{label}.{action}"
        event.policy.resource = f"{kind}:{name or '*'}"
        event.policy.roles.extend(principal.roles)
        await self.record(event, request_id, principal.tenant)
        return decision

    async def allow(
        self,
        request: Request,
        principal: Principal,
        kind: ResourceKind,
        action: str,
        name: str | None,
        *,
        label: str,
        param: str | None = None,
    ) -> None:
        """403 unless the policy allows ``action``; audited either way."""
        decision = await self.decide(request, principal, kind, action, name, label=label)
        if not decision.allow:
            reason = "; ".join(decision.reasons) or "denied by policy"
            raise PermissionDeniedError(reason, param, "policy_denied")


def relay(reply: httpx.Response, what: str) -> Response:
    """An internal service's answer as the gateway's: its JSON and status, except that a
    refusal of the gateway's own identity or a failure is logged and told as a 503."""
    try:
        body = reply.json()
    except ValueError:
        body = None
    if reply.status_code in (401, 403) or reply.status_code >= 500 or body is None:
        log.error(f"the {what} service failed a call", status=reply.status_code)
        raise ServiceUnavailableError(f"the {what} service could not answer; retry later")
    return JSONResponse(body, status_code=reply.status_code)
