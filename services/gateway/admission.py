"""Admission at the gateway: who asks, whether the body is sound, whether it may, and the charge.

Per request, in this order, each step refusing with its own status and nothing charged
before the last one: credentials (401, before any of the body is read) -> the body, read
within ``limits.body_timeout_s`` (408) and ``limits.max_body_bytes`` (413), as JSON of
bounded depth (400) -> every field against the OpenAI contract of
:mod:`shared.openai_protocol` (400 naming the field) -> policy: model, priority, the role's
token limit, RAG collections (403) -> concurrency, then rate and token limits (429). Only a
request past all of them is charged, and becomes the :class:`ev.InferenceRequest` to publish.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace
from starlette.requests import Request

from services.gateway.auth import Authenticator, AuthError, Principal
from services.gateway.limits import ConcurrencyGate, Limit, RateLimiter, limits_checked
from services.gateway.policy import Action, Policy, PolicyRequest
from services.gateway.rag import RagRequest, parse_rag
from services.gateway.settings import GatewaySettings
from shared.events.v1 import events_pb2 as ev
from shared.http_body import read_json_body
from shared.logging import get_logger
from shared.openai_protocol import (
    AuthenticationError,
    EmbeddingRequest,
    GenerationRequest,
    PermissionDeniedError,
    RateLimitError,
    invalid_field,
    parse_embedding_request,
    parse_request,
)
from shared.policy import AccessRequest, Resource, Subject
from shared.topics import REPLIES, REQUESTS_HIGH, REQUESTS_LOW, REQUESTS_NORMAL

PRIORITIES = {
    "high": (REQUESTS_HIGH, ev.PRIORITY_HIGH),
    "normal": (REQUESTS_NORMAL, ev.PRIORITY_NORMAL),
    "low": (REQUESTS_LOW, ev.PRIORITY_LOW),
}
KINDS = {
    "chat": ev.REQUEST_KIND_CHAT,
    "completion": ev.REQUEST_KIND_COMPLETION,
    "embedding": ev.REQUEST_KIND_EMBEDDING,
}
ACTIONS: dict[str, Action] = {
    "chat": "chat.completions",
    "completion": "completions",
    "embedding": "embeddings",
}
DEFAULT_MAX_TOKENS = 256
"""Tokens charged against the rate limit for a request that sets no max_tokens (nor has a cap)."""
"""Deepest nesting of arrays and objects in a body; no field of the API needs more than 5."""

AuditPolicy = Callable[..., "asyncio.Future[None]"]
"""Starts recording a policy decision, ``(request_id, *, principal, model, kind, allow,
reasons)``: the future is done once the record is durable (or failed to be)."""

log = get_logger(__name__)


@dataclass
class Admitted:
    """A request past every check, charged, about to be published."""

    request_id: str
    principal: Principal
    kind: str
    priority: str
    event: ev.InferenceRequest
    estimated_tokens: int
    started: float
    policy_recorded: asyncio.Future[None] | None = None
    """The policy decision's audit record: published only once it is durable too."""
    span: trace.SpanContext | None = None
    """The gateway's span of the request: its answer's span is a child of it."""


def limit_key(principal: Principal) -> str:
    """The rate limiter's key of a caller: its API key (unique across tenants), or its
    tenant and JWT subject (the same ``sub`` in two tenants is two callers)."""
    return principal.key_id or f"{principal.tenant}/{principal.subject}"


class Admission:
    """The gateway's checks of a request (see the module docstring), with the limiters."""

    def __init__(
        self,
        settings: GatewaySettings,
        *,
        authenticator: Authenticator,
        policy: Policy,
        rate_limiter: RateLimiter,
        concurrency: ConcurrencyGate,
        audit_policy: AuditPolicy,
    ) -> None:
        self.settings = settings
        self.authenticator = authenticator
        self.policy = policy
        self.rate_limiter = rate_limiter
        self.concurrency = concurrency
        self.audit_policy = audit_policy

    def authenticate(self, request: Request) -> Principal:
        """The caller, from the Authorization header alone.

        Raises:
            AuthenticationError: 401.
        """
        try:
            return self.authenticator.authenticate(request.headers.get("authorization"))
        except AuthError as error:
            raise AuthenticationError(str(error), None, "invalid_api_key") from None

    async def read_json(self, request: Request) -> Any:
        """The body as JSON, read within the size and time limits.

        Raises:
            RequestTooLargeError: 413, over ``limits.max_body_bytes``.
            RequestTimeoutError: 408, not all there within ``limits.body_timeout_s``.
            InvalidRequestError: 400, not JSON (NaN and Infinity are not), or nested deeper
                than MAX_JSON_DEPTH.
        """
        limits = self.settings.limits
        return await read_json_body(request, limits.max_body_bytes, limits.body_timeout_s)

    async def admit(self, principal: Principal, body: Any, kind: str, request: Request) -> Admitted:
        """Validate, decide and charge ``body``; the request to publish.

        Raises:
            InvalidRequestError (400), PermissionDeniedError (403), RateLimitError (429):
                nothing is charged.
        """
        rag = (
            parse_rag(body.pop("rag", None)) if isinstance(body, dict) and kind == "chat" else None
        )
        generation: GenerationRequest | None = None
        embedding: EmbeddingRequest | None = None
        if kind == "embedding":
            embedding = parse_embedding_request(body)
            name, version = embedding.model, embedding.version
        else:
            generation = parse_request(body, kind, public=True)  # type: ignore[arg-type]
            name, version = generation.model, generation.version
        model = name or self.settings.default_model
        requested = body.get("priority")
        if requested is None:
            requested = request.headers.get("x-meshllm-priority")
        if requested is not None and (
            not isinstance(requested, str) or requested not in PRIORITIES
        ):
            raise invalid_field("priority", "must be one of high, normal, low")
        request_id: str = getattr(request.state, "request_id", None) or uuid.uuid4().hex
        source = request.client.host if request.client else None
        decision = await self.policy.adecide(
            PolicyRequest(
                principal,
                ACTIONS[kind],
                model,
                requested,
                generation.max_tokens if generation else None,
                model_version=version or None,
                source_ip=source,
            )
        )
        policy_recorded = self.audit_policy(
            request_id,
            principal=principal,
            model=model,
            kind=kind,
            allow=decision.allow,
            reasons=decision.reasons,
        )
        if not decision.allow:
            await _recorded_denial(policy_recorded, request_id)
            reason = "; ".join(decision.reasons) or "denied by policy"
            param = (
                "max_tokens" if "max_tokens" in reason else ("model" if "model" in reason else None)
            )
            raise PermissionDeniedError(reason, param, "policy_denied")
        if rag is not None:
            await self._check_rag(principal, rag, request_id)
        cap = None
        if generation is not None and generation.max_tokens is None and decision.max_tokens:
            cap = decision.max_tokens  # the role's limit caps the answer; it is not asked for
        estimated = estimate_tokens(body, generation, cap)
        await self._charge(principal, estimated, request_id)
        event = inference_request(
            request_id,
            kind,
            model=model,
            version=version,
            generation=generation,
            embedding=embedding,
            principal=principal,
            priority=decision.priority,
            max_tokens_cap=cap,
        )
        if rag is not None:
            event.rag_collections.extend(rag.collections)
            event.rag_top_k = rag.top_k or 0
            event.acl_groups.extend(principal.roles)
        event.deadline.FromNanoseconds(time.time_ns() + int(self.settings.request_timeout_s * 1e9))
        return Admitted(
            request_id,
            principal,
            kind,
            decision.priority,
            event,
            estimated,
            time.monotonic(),
            policy_recorded,
        )

    async def _charge(self, principal: Principal, estimated: int, request_id: str) -> None:
        """Take a concurrency slot, then charge the rate limits; 429 (nothing held) if either
        is full. The slot is the caller's to release when the request ends."""
        key_id = limit_key(principal)
        with limits_checked():
            full = await self.concurrency.acquire(key_id, principal.tenant, request_id)
        if full is not None:
            raise RateLimitError("too many concurrent requests for this key or tenant", 1)
        limits = self.settings.limits
        try:
            with limits_checked():
                wait = await self.rate_limiter.admit(
                    key_id,
                    principal.tenant,
                    Limit(principal.rpm or limits.default_rpm, principal.tpm or limits.default_tpm),
                    Limit(limits.tenant_rpm, limits.tenant_tpm),
                    estimated,
                )
        except BaseException:
            with contextlib.suppress(Exception):
                await self.concurrency.release(key_id, principal.tenant, request_id)
            raise
        if wait is not None:
            await self.concurrency.release(key_id, principal.tenant, request_id)
            who = f"key {key_id}" if principal.key_id else principal.subject
            raise RateLimitError(
                f"rate limit reached for {who} or tenant {principal.tenant}; "
                f"retry after {math.ceil(wait)} s",
                wait,
            )

    async def _check_rag(self, principal: Principal, rag: RagRequest, request_id: str) -> None:
        """403 unless the caller may read every collection the request names."""
        subject = Subject(principal.subject, principal.tenant, principal.roles)
        for collection in rag.collections:
            decision = await self.policy.aauthorize(
                AccessRequest(
                    subject, "read", Resource("kb_collection", principal.tenant, collection)
                )
            )
            if not decision.allow:
                denial = self.audit_policy(
                    request_id,
                    principal=principal,
                    model=f"kb_collection:{collection}",
                    kind="chat",
                    allow=False,
                    reasons=decision.reasons,
                )
                await _recorded_denial(denial, request_id)
                reason = "; ".join(decision.reasons) or "denied by policy"
                raise PermissionDeniedError(reason, "rag.collections", "policy_denied")


async def _recorded_denial(recorded: asyncio.Future[None], request_id: str) -> None:
    """Wait for a denial's record before answering 403; a record that failed is logged (the
    request is refused either way, so refusing it is safe)."""
    try:
        await asyncio.shield(recorded)
    except Exception as error:
        log.exception("policy denial not recorded", request_id=request_id, error=repr(error))


def estimate_tokens(body: Any, generation: GenerationRequest | None, cap: int | None) -> int:
    """Tokens charged before the reply: ~4 characters a token of input, plus max_tokens."""
    text = json.dumps(body.get("messages") or body.get("prompt") or body.get("input") or "")
    completion = 0
    if generation is not None:
        limit = generation.max_tokens or cap or DEFAULT_MAX_TOKENS
        completion = limit * generation.n
    return len(text) // 4 + 1 + completion


def inference_request(
    request_id: str,
    kind: str,
    *,
    model: str,
    version: str | None,
    generation: GenerationRequest | None,
    embedding: EmbeddingRequest | None,
    principal: Principal,
    priority: str,
    max_tokens_cap: int | None,
) -> ev.InferenceRequest:
    """The event for the router: every field the client gave travels in it."""
    event = ev.InferenceRequest(
        request_id=request_id,
        kind=KINDS[kind],
        model=model,
        model_version=version or "",
        priority=PRIORITIES[priority][1],
        reply_topic=REPLIES.name,
        api_key_id=principal.key_id or "",
        user=principal.subject,
    )
    event.envelope.tenant = principal.tenant
    event.envelope.correlation_id = request_id
    if embedding is not None:
        event.client_user = embedding.user or ""
        event.inputs.extend(embedding.inputs)
        return event
    assert generation is not None
    event.client_user = generation.user or ""
    event.stream = generation.stream
    for message in generation.messages:
        event.messages.add(role=message["role"], content=message["content"])
    if kind == "completion":
        event.inputs.extend(p for p in generation.prompts if isinstance(p, str))
    s = event.sampling
    s.temperature = generation.temperature
    s.top_p = generation.top_p
    s.top_k = generation.top_k
    if generation.seed is not None:
        s.seed = generation.seed
    s.stop.extend(generation.stop)
    s.max_tokens = generation.max_tokens or 0
    s.max_tokens_cap = max_tokens_cap or 0
    s.n = generation.n
    s.ignore_eos = generation.ignore_eos
    return event
