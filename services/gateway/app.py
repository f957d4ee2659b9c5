"""The gateway's HTTP API: OpenAI's routes, each request sent through the mesh over Kafka.

Per request: body size -> JSON -> credentials (401) -> fields (400) -> policy (403) ->
rate and concurrency limits (429) -> audit the request -> publish it to the topic of
its priority -> relay the router's replies (SSE or one body) until the final reply or
the deadline (504). A caller that goes away cancels the request downstream.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from services.gateway.audit import AuditRecorder, AuditUnavailable
from services.gateway.audit_routes import AuditRoutes
from services.gateway.auth import Authenticator, AuthError, Principal
from services.gateway.kb_routes import KbRoutes
from services.gateway.limits import ConcurrencyLimiter, Limit, LocalRateLimiter
from services.gateway.policy import Action, Policy, PolicyRequest
from services.gateway.rag import RagRequest, parse_rag
from services.gateway.relay import Pending, ReplyRelay
from services.gateway.responses import ReplyError, ResponseBuilder, embeddings_body
from services.gateway.settings import GatewaySettings
from shared.bus import Publisher
from shared.events.v1 import events_pb2 as ev
from shared.logging import get_logger
from shared.openai_protocol import (
    GenerationRequest,
    InvalidRequestError,
    OpenAIError,
    ServiceUnavailableError,
    invalid_field,
    parse_request,
    reject_unknown_fields,
    split_model,
)
from shared.policy import AccessRequest, Resource, Subject
from shared.service_auth import service_headers
from shared.topics import (
    CANCELLATIONS,
    REPLIES,
    REQUESTS_HIGH,
    REQUESTS_LOW,
    REQUESTS_NORMAL,
)

log = get_logger(__name__)
tracer = trace.get_tracer("meshllm.gateway")

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
"""Tokens charged against the rate limit for a request that sets no max_tokens."""


class AuthenticationFailed(OpenAIError):
    status = 401
    error_type = "authentication_error"


class PermissionDenied(OpenAIError):
    status = 403
    error_type = "permission_error"


class RateLimited(OpenAIError):
    status = 429
    error_type = "rate_limit_error"

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message, None, "rate_limit_exceeded")
        self.retry_after = max(1, math.ceil(retry_after_s))


class BodyTooLarge(OpenAIError):
    status = 413
    error_type = "invalid_request_error"


class ClientClosed(OpenAIError):
    """The caller went away before the reply (nginx's 499); nobody reads this response."""

    status = 499
    error_type = "client_closed_request"


class GatewayTimeout(OpenAIError):
    status = 504
    error_type = "timeout"


@dataclass
class Admitted:
    """A request past every check, about to be published."""

    request_id: str
    principal: Principal
    kind: str
    priority: str
    event: ev.InferenceRequest
    estimated_tokens: int
    started: float


class Gateway:
    def __init__(
        self,
        settings: GatewaySettings,
        *,
        publisher: Publisher,
        relay: ReplyRelay,
        authenticator: Authenticator,
        policy: Policy,
        rate_limiter: LocalRateLimiter,
        concurrency: ConcurrencyLimiter,
        audit: AuditRecorder,
    ) -> None:
        self.settings = settings
        self.publisher = publisher
        self.audit = audit
        self.relay = relay
        self.authenticator = authenticator
        self.policy = policy
        self.rate_limiter = rate_limiter
        self.concurrency = concurrency
        self._background: set[asyncio.Task[Any]] = set()
        self.audit_routes = AuditRoutes(
            service_url=settings.audit.service_url,
            authenticate=self._authenticate,
            policy=policy,
            record=lambda event, key, tenant: audit.record(event, key=key, tenant=tenant),
            headers=service_headers(settings),
        )
        self.kb_routes = KbRoutes(
            settings=settings.kb,
            authenticate=self._authenticate,
            policy=policy,
            publisher=publisher,
            record=lambda event, key, tenant: audit.record(event, key=key, tenant=tenant),
            headers=service_headers(settings),
        )

    # ----------------------------------------------------------------- HTTP routes

    def app(self) -> Starlette:
        routes = [
            Route("/v1/chat/completions", self._route("chat"), methods=["POST"]),
            Route("/v1/completions", self._route("completion"), methods=["POST"]),
            Route("/v1/embeddings", self._route("embedding"), methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            *self.audit_routes.routes(),
            *self.kb_routes.routes(),
        ]
        return Starlette(
            routes=routes,
            exception_handlers={OpenAIError: _error_response, 404: _not_found, 405: _not_allowed},
        )

    def _route(self, kind: str) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            return await self.handle(request, kind)

        return endpoint

    async def models(self, request: Request) -> Response:
        principal = self._authenticate(request)
        allowed = []
        for name in self.settings.models:
            decision = self.policy.decide(
                PolicyRequest(principal, "chat.completions", name, None, None)
            )
            if decision.allow:
                allowed.append({"id": name, "object": "model", "created": 0, "owned_by": "meshllm"})
        return JSONResponse({"object": "list", "data": allowed})

    # ----------------------------------------------------------------- the flow

    async def handle(self, request: Request, kind: str) -> Response:
        with tracer.start_as_current_span(
            f"{request.method} {request.url.path}",
            kind=trace.SpanKind.SERVER,
            attributes={"http.request.method": request.method, "url.path": request.url.path},
        ) as span:
            trace_id = format(span.get_span_context().trace_id, "032x")
            try:
                response = await self._handle(request, kind)
            except OpenAIError as error:
                span.set_attribute("http.response.status_code", error.status)
                error.trace_id = trace_id  # type: ignore[attr-defined]
                raise
            span.set_attribute("http.response.status_code", response.status_code)
            response.headers["x-trace-id"] = trace_id
            return response

    async def _handle(self, request: Request, kind: str) -> Response:
        body = await self._read_json(request)
        principal = self._authenticate(request)
        admitted = self._admit(principal, body, kind, request)
        key_id = _limit_key(principal)
        if not self.concurrency.try_acquire(key_id, principal.tenant):
            self.rate_limiter.settle(key_id, principal.tenant, admitted.estimated_tokens, 0)
            raise RateLimited("too many concurrent requests for this key or tenant", 1)
        pending = self.relay.open(admitted.request_id)
        try:
            await self._publish(admitted, request)
        except BaseException:
            self._release(admitted, pending)
            # never sent: give back what the rate limiter charged for it
            self.rate_limiter.settle(key_id, principal.tenant, admitted.estimated_tokens, 0)
            raise
        if admitted.event.stream:
            return StreamingResponse(
                self._stream(admitted, pending, body),
                media_type="text/event-stream",
                headers={"cache-control": "no-cache", "x-request-id": admitted.request_id},
            )
        try:
            reply = await self._final(admitted, pending, request)
        finally:
            self._release(admitted, pending)
        return JSONResponse(
            await self._whole(admitted, reply), headers={"x-request-id": admitted.request_id}
        )

    async def _read_json(self, request: Request) -> Any:
        limit = self.settings.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise BodyTooLarge(f"the request body is larger than {limit} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(f"the request body is larger than {limit} bytes")
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except ValueError as error:
            raise InvalidRequestError(f"the body is not valid JSON ({error})") from None

    def _authenticate(self, request: Request) -> Principal:
        try:
            return self.authenticator.authenticate(request.headers.get("authorization"))
        except AuthError as error:
            raise AuthenticationFailed(str(error), None, "invalid_api_key") from None

    def _admit(self, principal: Principal, body: Any, kind: str, request: Request) -> Admitted:
        rag = (
            parse_rag(body.pop("rag", None)) if isinstance(body, dict) and kind == "chat" else None
        )
        reject_unknown_fields(body, kind)
        generation = parse_request(body, kind) if kind != "embedding" else None  # type: ignore[arg-type]
        inputs = _embedding_inputs(body) if kind == "embedding" else []
        name, version = split_model(body.get("model"))
        model = name or self.settings.default_model
        requested = body.get("priority", request.headers.get("x-meshllm-priority"))
        if requested is not None and requested not in PRIORITIES:
            raise invalid_field("priority", "must be one of high, normal, low")
        max_tokens = generation.max_tokens if generation else None
        decision = self.policy.decide(
            PolicyRequest(
                principal,
                ACTIONS[kind],
                model,
                requested,
                max_tokens,
                model_version=version or None,
                source_ip=request.client.host if request.client else None,
            )
        )
        request_id = uuid.uuid4().hex
        self._audit_policy(
            request_id,
            principal=principal,
            model=model,
            kind=kind,
            allow=decision.allow,
            reasons=decision.reasons,
        )
        if not decision.allow:
            reason = "; ".join(decision.reasons) or "denied by policy"
            param = (
                "max_tokens" if "max_tokens" in reason else ("model" if "model" in reason else None)
            )
            raise PermissionDenied(reason, param, "policy_denied")
        if generation is not None and generation.max_tokens is None and decision.max_tokens:
            # the policy's limit caps the answer; it is not a length to ask of the model
            cap = min(generation.max_tokens_cap or decision.max_tokens, decision.max_tokens)
            generation = dataclasses.replace(generation, max_tokens_cap=cap)
        estimated = _estimate_tokens(body, generation)
        key_id = _limit_key(principal)
        limits = self.settings.limits
        wait = self.rate_limiter.admit(
            key_id,
            principal.tenant,
            Limit(principal.rpm or limits.default_rpm, principal.tpm or limits.default_tpm),
            Limit(limits.tenant_rpm, limits.tenant_tpm),
            estimated,
        )
        if wait is not None:
            who = f"key {key_id}" if principal.key_id else principal.subject
            raise RateLimited(
                f"rate limit reached for {who} or tenant {principal.tenant}; "
                f"retry after {math.ceil(wait)} s",
                wait,
            )
        event = _inference_request(
            request_id,
            kind,
            model=model,
            version=version,
            generation=generation,
            inputs=inputs,
            principal=principal,
            priority=decision.priority,
        )
        if rag is not None:
            self._check_rag(principal, rag, request_id)
            event.rag_collections.extend(rag.collections)
            event.rag_top_k = rag.top_k or 0
            event.acl_groups.extend(principal.roles)
        timeout = self.settings.request_timeout_s
        event.deadline.FromNanoseconds(time.time_ns() + int(timeout * 1e9))
        return Admitted(
            request_id, principal, kind, decision.priority, event, estimated, time.monotonic()
        )

    async def _publish(self, admitted: Admitted, request: Request) -> None:
        topic, _ = PRIORITIES[admitted.priority]
        tenant = admitted.principal.tenant
        audit = ev.AuditEvent(
            request_id=admitted.request_id,
            api_key_id=admitted.principal.key_id or "",
            user=admitted.event.user,
            model=admitted.event.model,
            model_version=admitted.event.model_version,
        )
        record = audit.request
        record.kind = admitted.event.kind
        record.messages.extend(admitted.event.messages)
        record.inputs.extend(admitted.event.inputs)
        record.sampling.CopyFrom(admitted.event.sampling)
        record.priority = admitted.event.priority
        record.source_address = request.client.host if request.client else ""
        # both go out together; the request is answered only if its audit record is durable
        outcomes: tuple[Any, ...] = await asyncio.gather(
            self.audit.record(audit, key=admitted.request_id, tenant=tenant),
            self.publisher.publish(topic, admitted.event, key=admitted.request_id, tenant=tenant),
            return_exceptions=True,
        )
        recorded, published = outcomes
        if isinstance(published, BaseException):
            log.warning(
                "request not published", request_id=admitted.request_id, error=str(published)
            )
            raise ServiceUnavailableError(
                "the mesh's message broker did not take the request; retry later"
            ) from published
        if isinstance(recorded, BaseException):
            self._cancel(admitted, "audit record not durable")
            raise _audit_failure(recorded)

    async def _final(self, admitted: Admitted, pending: Pending, request: Request) -> ev.FinalReply:
        """Wait for the final reply; 504 at the deadline; cancel when the caller leaves."""
        disconnected = asyncio.ensure_future(_disconnect(request))
        try:
            while True:
                reply = await self._next(admitted, pending, disconnected)
                if isinstance(reply, ev.FinalReply):
                    return reply
        finally:
            disconnected.cancel()

    async def _next(
        self, admitted: Admitted, pending: Pending, disconnected: asyncio.Future[None] | None
    ) -> ev.ReplyChunk | ev.FinalReply:
        remaining = self.settings.request_timeout_s - (time.monotonic() - admitted.started)
        getter = asyncio.ensure_future(pending.queue.get())
        waiting: set[asyncio.Future[Any]] = {getter}
        if disconnected is not None:
            waiting.add(disconnected)
        done, _ = await asyncio.wait(
            waiting, timeout=max(remaining, 0), return_when="FIRST_COMPLETED"
        )
        if getter in done:
            return getter.result()
        getter.cancel()
        if disconnected is not None and disconnected in done:
            self._cancel(admitted, "client disconnected")
            self._spawn(self._audit_response(admitted, None, 499, "client disconnected"))
            raise ClientClosed("the client disconnected before the reply")
        self._cancel(admitted, "deadline exceeded")
        self._spawn(self._audit_response(admitted, None, 504, "deadline exceeded"))
        raise GatewayTimeout(
            f"no reply within {self.settings.request_timeout_s:g} s", None, "deadline_exceeded"
        )

    async def _whole(self, admitted: Admitted, reply: ev.FinalReply) -> dict[str, Any]:
        failure = ReplyError(reply.error) if reply.HasField("error") else None
        try:
            if failure is not None:
                await self._audit_response(admitted, reply, failure.status, reply.error.message)
            else:
                await self._audit_response(admitted, reply, 200, None)
        except AuditUnavailable as error:
            raise _audit_failure(error) from error
        if failure is not None:
            raise failure
        if admitted.kind == "embedding":
            return embeddings_body(reply)
        return ResponseBuilder(admitted.kind, admitted.request_id, admitted.event.model).whole(
            reply
        )

    async def _stream(self, admitted: Admitted, pending: Pending, body: Any) -> AsyncIterator[str]:
        builder = ResponseBuilder(admitted.kind, admitted.request_id, admitted.event.model)
        options = body.get("stream_options") or {}
        finished = False
        try:
            if admitted.kind == "chat":
                for index in range(admitted.event.sampling.n or 1):
                    yield _sse(builder.chunk(index, ""))
            while True:
                try:
                    reply = await self._next(admitted, pending, None)
                except OpenAIError as error:
                    finished = True
                    yield _sse(error.to_dict())
                    return
                if isinstance(reply, ev.ReplyChunk):
                    yield _sse(builder.chunk(reply.choice_index, reply.delta))
                    continue
                finished = True
                if reply.HasField("error"):
                    failure = ReplyError(reply.error)
                    await self._audit_response(admitted, reply, failure.status, reply.error.message)
                    yield _sse(failure.to_dict())
                    return
                try:  # the end of the answer goes out only once its audit record is durable
                    await self._audit_response(admitted, reply, 200, None)
                except AuditUnavailable as error:
                    yield _sse(_audit_failure(error).to_dict())
                    return
                for choice in reply.choices:
                    yield _sse(builder.chunk(choice.index, None, choice.finish_reason or "stop"))
                if reply.citations:
                    yield _sse(builder.citations_chunk(reply))
                if options.get("include_usage"):
                    yield _sse(builder.usage_chunk(reply))
                yield "data: [DONE]\n\n"
                return
        finally:
            if not finished:  # the caller went away mid-stream
                self._cancel(admitted, "client disconnected")
                self._spawn(self._audit_response(admitted, None, 499, "client disconnected"))
            self._release(admitted, pending)

    # ----------------------------------------------------------------- bookkeeping

    def _release(self, admitted: Admitted, pending: Pending) -> None:
        self.relay.close(pending.request_id)
        self.concurrency.release(_limit_key(admitted.principal), admitted.principal.tenant)

    def _cancel(self, admitted: Admitted, reason: str) -> None:
        event = ev.CancelRequest(request_id=admitted.request_id, reason=reason)
        self._spawn(
            self.publisher.publish(
                CANCELLATIONS, event, key=admitted.request_id, tenant=admitted.principal.tenant
            )
        )

    def _spawn(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _check_rag(self, principal: Principal, rag: RagRequest, request_id: str) -> None:
        """403 unless the caller may read every collection the request names."""
        subject = Subject(principal.subject, principal.tenant, principal.roles)
        for collection in rag.collections:
            decision = self.policy.authorize(
                AccessRequest(
                    subject, "read", Resource("kb_collection", principal.tenant, collection)
                )
            )
            if not decision.allow:
                self._audit_policy(
                    request_id,
                    principal=principal,
                    model=f"kb_collection:{collection}",
                    kind="chat",
                    allow=False,
                    reasons=decision.reasons,
                )
                reason = "; ".join(decision.reasons) or "denied by policy"
                raise PermissionDenied(reason, "rag.collections", "policy_denied")

    def _audit_policy(
        self,
        request_id: str,
        *,
        principal: Principal,
        model: str,
        kind: str,
        allow: bool,
        reasons: tuple[str, ...],
    ) -> None:
        event = ev.AuditEvent(request_id=request_id, api_key_id=principal.key_id or "", model=model)
        event.policy.allow = allow
        event.policy.reasons.extend(reasons)
        event.policy.action = ACTIONS[kind]
        event.policy.resource = model
        event.policy.roles.extend(principal.roles)
        self._spawn(self.audit.record(event, key=request_id, tenant=principal.tenant))

    async def _audit_response(
        self, admitted: Admitted, reply: ev.FinalReply | None, status: int, error: str | None
    ) -> None:
        """Record the response; returns once the record is durable (raises AuditUnavailable)."""
        actual = 0
        event = ev.AuditEvent(
            request_id=admitted.request_id,
            api_key_id=admitted.principal.key_id or "",
            user=admitted.event.user,
            model=reply.model if reply else admitted.event.model,
            model_version=reply.model_version if reply else admitted.event.model_version,
        )
        record = event.response
        record.status_code = status
        record.latency_us = int((time.monotonic() - admitted.started) * 1e6)
        if reply is not None:
            record.choices.extend(reply.choices)
            record.retrieved_chunk_ids.extend(c.chunk_id for c in reply.citations)
            record.usage.CopyFrom(reply.usage)
            actual = reply.usage.prompt_tokens + reply.usage.completion_tokens
            if reply.HasField("error"):
                record.error.CopyFrom(reply.error)
        elif error:
            record.error.message = error
        self.rate_limiter.settle(
            _limit_key(admitted.principal),
            admitted.principal.tenant,
            admitted.estimated_tokens,
            actual,
        )
        await self.audit.record(event, key=admitted.request_id, tenant=admitted.principal.tenant)


# --------------------------------------------------------------------------- helpers


def _audit_failure(error: BaseException) -> ServiceUnavailableError:
    return ServiceUnavailableError(
        f"the answer is withheld because its audit record could not be stored ({error})"
    )


def _limit_key(principal: Principal) -> str:
    return principal.key_id or f"jwt:{principal.subject}"


def _embedding_inputs(body: dict[str, Any]) -> list[str]:
    value = body.get("input")
    if isinstance(value, str) and value:
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
        return list(value)
    raise invalid_field("input", "must be a non-empty string or array of non-empty strings")


def _estimate_tokens(body: dict[str, Any], generation: GenerationRequest | None) -> int:
    """Tokens charged before the reply: ~4 characters a token of input, plus max_tokens."""
    text = json.dumps(body.get("messages") or body.get("prompt") or body.get("input") or "")
    completion = 0
    if generation is not None:
        limit = generation.max_tokens or generation.max_tokens_cap or DEFAULT_MAX_TOKENS
        completion = limit * generation.n
    return len(text) // 4 + 1 + completion


def _inference_request(
    request_id: str,
    kind: str,
    *,
    model: str,
    version: str | None,
    generation: GenerationRequest | None,
    inputs: list[str],
    principal: Principal,
    priority: str,
) -> ev.InferenceRequest:
    event = ev.InferenceRequest(
        request_id=request_id,
        kind=KINDS[kind],
        model=model,
        model_version=version or "",
        priority=PRIORITIES[priority][1],
        reply_topic=REPLIES.name,
        api_key_id=principal.key_id or "",
    )
    event.envelope.tenant = principal.tenant
    event.envelope.correlation_id = request_id
    if generation is None:
        event.inputs.extend(inputs)
        return event
    event.user = generation.user or principal.subject
    event.stream = generation.stream
    for message in generation.messages:
        event.messages.add(role=message["role"], content=message["content"])
    for prompt in generation.prompts if kind == "completion" else ():
        if not isinstance(prompt, str):
            raise invalid_field("prompt", "token id prompts are not accepted here; send text")
        event.inputs.append(prompt)
    s = event.sampling
    s.temperature = generation.temperature
    s.top_p = generation.top_p
    s.top_k = generation.top_k
    if generation.seed is not None:
        s.seed = generation.seed
    s.stop.extend(generation.stop)
    s.max_tokens = generation.max_tokens or 0
    s.max_tokens_cap = generation.max_tokens_cap or 0
    s.n = generation.n
    return event


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


async def _disconnect(request: Request) -> None:
    """Returns when the caller disconnects (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _error_response(request: Request, error: Exception) -> Response:
    assert isinstance(error, OpenAIError)
    headers = {"retry-after": str(error.retry_after)} if isinstance(error, RateLimited) else {}
    trace_id = getattr(error, "trace_id", None)
    if trace_id:
        headers["x-trace-id"] = trace_id
    return JSONResponse(error.to_dict(), status_code=error.status, headers=headers)


async def _not_found(request: Request, error: Exception) -> Response:
    body = {"error": {"message": f"no route {request.url.path}", "type": "invalid_request_error",
                      "param": None, "code": "not_found"}}  # fmt: skip
    return JSONResponse(body, status_code=404)


async def _not_allowed(request: Request, error: Exception) -> Response:
    body = {"error": {"message": f"{request.method} is not allowed on {request.url.path}",
                      "type": "invalid_request_error", "param": None, "code": None}}  # fmt: skip
    return JSONResponse(body, status_code=405)
