"""The gateway's HTTP API: OpenAI's routes, each request sent through the mesh over Kafka.

Per request: admission (:mod:`services.gateway.admission`: credentials 401, body 408/413,
fields 400, policy 403, limits 429, nothing charged before the end) -> audit the request ->
publish it to the topic of its priority -> relay the router's replies (SSE or one body)
until the final reply or the deadline (504). A caller that goes away cancels the request
downstream. Errors are OpenAI error bodies; a server-side failure is told without its
internal details (those are logged, under the request id the client is given).

Longer than most modules (~580 lines): the request's flow (publish, relay, stream, its
records) is one sequence whose steps share the request's state; admission and response
shapes are modules of their own.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from opentelemetry import trace
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from services.gateway.admission import ACTIONS, PRIORITIES, Admission, Admitted
from services.gateway.admission import limit_key as _limit_key
from services.gateway.audit import AuditRecorder, AuditUnavailable
from services.gateway.audit_routes import AuditRoutes
from services.gateway.auth import Authenticator, Principal
from services.gateway.feedback_routes import FeedbackRoutes
from services.gateway.kb_routes import KbRoutes
from services.gateway.limits import ConcurrencyGate, RateLimiter
from services.gateway.metrics import GatewayMetrics
from services.gateway.openapi import openapi_document
from services.gateway.policy import Action, Policy, PolicyRequest
from services.gateway.relay import Delta, Diverged, Pending, Relayed, ReplyRelay
from services.gateway.responses import (
    ReplyError,
    ResponseBuilder,
    audit_failure,
    diverged_error,
    embeddings_body,
    error_response,
    internal_error,
    not_allowed,
    not_found,
    sse,
    strict_stream,
)
from services.gateway.route_guard import RouteGuard
from services.gateway.settings import GatewaySettings
from services.gateway.training_routes import TrainingRoutes
from shared.bus import Publisher
from shared.events.v1 import events_pb2 as ev
from shared.logging import get_logger
from shared.openai_protocol import ClientClosedError as ClientClosed
from shared.openai_protocol import GatewayTimeoutError as GatewayTimeout
from shared.openai_protocol import (
    OpenAIError,
    ServiceUnavailableError,
    reject_unknown,
)
from shared.service_auth import service_headers
from shared.topics import CANCELLATIONS

log = get_logger(__name__)
tracer = trace.get_tracer("meshllm.gateway")
ROUTES = {
    "chat": "/v1/chat/completions",
    "completion": "/v1/completions",
    "embedding": "/v1/embeddings",
}


class Gateway:
    def __init__(
        self,
        settings: GatewaySettings,
        *,
        publisher: Publisher,
        relay: ReplyRelay,
        authenticator: Authenticator,
        policy: Policy,
        rate_limiter: RateLimiter,
        concurrency: ConcurrencyGate,
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
        self.metrics = GatewayMetrics([*settings.models, *settings.embedding_models])
        self.admission = Admission(
            settings,
            authenticator=authenticator,
            policy=policy,
            rate_limiter=rate_limiter,
            concurrency=concurrency,
            audit_policy=self._audit_policy,
        )
        self.audit_routes = AuditRoutes(
            service_url=settings.audit.service_url,
            authenticate=self._authenticate,
            policy=policy,
            record=lambda event, key, tenant: audit.record(event, key=key, tenant=tenant),
            headers=service_headers(settings),
        )
        guard = RouteGuard(
            authenticate=self._authenticate,
            policy=policy,
            record=lambda event, key, tenant: audit.record(event, key=key, tenant=tenant),
            rate_limiter=rate_limiter,
            concurrency=concurrency,
            limits=settings.limits,
        )
        self.feedback_routes = FeedbackRoutes(
            settings=settings.feedback,
            audit_url=settings.audit.service_url,
            guard=guard,
            publisher=publisher,
            headers=service_headers(settings),
        )
        self.training_routes = TrainingRoutes(
            settings=settings.training, guard=guard, headers=service_headers(settings)
        )
        self.kb_routes = KbRoutes(
            settings=settings.kb,
            authenticate=self._authenticate,
            policy=policy,
            publisher=publisher,
            record=lambda event, key, tenant: audit.record(event, key=key, tenant=tenant),
            rate_limiter=rate_limiter,
            concurrency=concurrency,
            limits=settings.limits,
            headers=service_headers(settings),
        )

    # ----------------------------------------------------------------- HTTP routes

    def app(self) -> Starlette:
        routes = [
            *(Route(path, self._route(kind), methods=["POST"]) for kind, path in ROUTES.items()),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/openapi.json", self.openapi, methods=["GET"]),
            *self.audit_routes.routes(),
            *self.kb_routes.routes(),
            *self.feedback_routes.routes(),
            *self.training_routes.routes(),
        ]
        return Starlette(
            routes=routes,
            exception_handlers={
                OpenAIError: error_response,
                # a decision on the kb or audit routes whose record could not be stored
                AuditUnavailable: _audit_unavailable,
                404: not_found,
                405: not_allowed,
                Exception: internal_error,
            },
        )

    def _route(self, kind: str) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            return await self.handle(request, kind)

        return endpoint

    async def openapi(self, request: Request) -> Response:
        """The OpenAPI document of these routes (no credentials needed)."""
        return JSONResponse(openapi_document(self.settings))

    async def models(self, request: Request) -> Response:
        """The chat and embedding models this caller may use, as OpenAI's model list."""
        principal = self._authenticate(request)
        reject_unknown(request.query_params, (), what="a query parameter here")
        listed: list[tuple[str, Action]] = [
            *((name, "chat.completions") for name in self.settings.models),
            *((name, "embeddings") for name in self.settings.embedding_models),
        ]
        allowed = [
            {"id": name, "object": "model", "created": 0, "owned_by": "meshllm"}
            for name, action in listed
            if (await self.policy.adecide(PolicyRequest(principal, action, name, None, None))).allow
        ]
        return JSONResponse({"object": "list", "data": allowed})

    # ----------------------------------------------------------------- the flow

    async def handle(self, request: Request, kind: str) -> Response:
        with tracer.start_as_current_span(
            f"{request.method} {request.url.path}",
            kind=trace.SpanKind.SERVER,
            attributes={"http.request.method": request.method, "url.path": request.url.path},
        ) as span:
            trace_id = format(span.get_span_context().trace_id, "032x")
            request.state.request_id = uuid.uuid4().hex
            started = time.monotonic()
            status: int = 500
            failure: str | None = "internal"
            try:
                response = await self._handle(request, kind)
                status, failure = response.status_code, None
            except OpenAIError as error:
                status, failure = error.status, (error.code or error.error_type)[:64]
                span.set_attribute("http.response.status_code", error.status)
                error.trace_id = trace_id  # type: ignore[attr-defined]
                raise
            finally:
                self.metrics.request(
                    method=request.method,
                    route=ROUTES[kind],
                    status=status,
                    seconds=time.monotonic() - started,
                    tenant=getattr(request.state, "tenant", ""),
                    model=getattr(request.state, "model", None),
                    error=failure,
                )
            span.set_attribute("http.response.status_code", response.status_code)
            response.headers["x-trace-id"] = trace_id
            return response

    async def _handle(self, request: Request, kind: str) -> Response:
        principal = self._authenticate(request)  # before a byte of the body is read
        request.state.tenant = principal.tenant
        body = await self.admission.read_json(request)
        if isinstance(body, dict) and isinstance(body.get("model"), str):
            request.state.model = body["model"]
        admitted = await self.admission.admit(principal, body, kind, request)
        admitted.span = trace.get_current_span().get_span_context()
        strict = admitted.principal.tenant in self.settings.audit.strict_tenants
        pending = self.relay.open(admitted.request_id, stream=admitted.event.stream and not strict)
        try:
            await self._publish(admitted, request)
        except BaseException as error:
            if isinstance(error, OpenAIError):  # the broker or the audit store failed: a 5xx
                self._answered(admitted, None, None, error)
            await self._release(admitted, pending)
            # never sent: give back what the rate limiter charged for it
            await self._settle(admitted, 0)
            raise
        sse_headers = {"cache-control": "no-cache", "x-request-id": admitted.request_id}
        if pending.stream:
            return StreamingResponse(
                self._stream(admitted, pending, body),
                media_type="text/event-stream",
                headers=sse_headers,
            )
        reply: ev.FinalReply | None = None
        try:  # every way this ends is one answer in the metrics and spans: 504 and 499 too
            try:
                reply = await self._final(admitted, pending, request)
            finally:
                await self._release(admitted, pending)
            whole = await self._whole(admitted, reply, body)
        except OpenAIError as error:
            self._answered(admitted, reply, None, error)
            raise
        self._answered(admitted, reply, None, None)
        if admitted.event.stream:  # a strict tenant's stream: sent once its record is durable
            chunks = strict_stream(admitted, reply, body)
            return StreamingResponse(chunks, media_type="text/event-stream", headers=sse_headers)
        return JSONResponse(whole, headers={"x-request-id": admitted.request_id})

    def _authenticate(self, request: Request) -> Principal:
        return self.admission.authenticate(request)

    async def _publish(self, admitted: Admitted, request: Request) -> None:
        topic, _ = PRIORITIES[admitted.priority]
        tenant = admitted.principal.tenant
        audit = ev.AuditEvent(
            request_id=admitted.request_id,
            api_key_id=admitted.principal.key_id or "",
            user=admitted.event.user,
            client_user=admitted.event.client_user,
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
        # all go out together; the request is answered only if the records of its policy
        # decision and of itself are durable. The request's own publish is bounded by its
        # deadline: a broker (or a producer buffer) that never takes it is a 503, not a
        # request that hangs for ever (the audit record has its own bound and spool).
        remaining = self.settings.request_timeout_s - (time.monotonic() - admitted.started)
        outcomes: tuple[Any, ...] = await asyncio.gather(
            self.audit.record(audit, key=admitted.request_id, tenant=tenant),
            asyncio.wait_for(
                self.publisher.publish(
                    topic, admitted.event, key=admitted.request_id, tenant=tenant
                ),
                max(remaining, 0.001),
            ),
            _done(admitted.policy_recorded),
            return_exceptions=True,
        )
        recorded, published, policy_recorded = outcomes
        if not isinstance(recorded, BaseException):
            recorded = policy_recorded
        if isinstance(published, TimeoutError):  # it may still reach the broker: stop it there
            self._cancel(admitted, "not published within the deadline")
        if isinstance(published, BaseException):
            log.warning(
                "request not published", request_id=admitted.request_id, error=str(published)
            )
            raise ServiceUnavailableError(
                "the mesh's message broker did not take the request; retry later"
            ) from published
        if isinstance(recorded, BaseException):
            self._cancel(admitted, "audit record not durable")
            raise audit_failure(recorded, admitted.request_id)

    async def _final(self, admitted: Admitted, pending: Pending, request: Request) -> ev.FinalReply:
        """Wait for the final reply; 504 at the deadline; cancel when the caller leaves."""
        disconnected = asyncio.ensure_future(_disconnect(request))
        try:
            while True:
                try:
                    item = await self._next(admitted, pending, disconnected)
                except (GatewayTimeout, ClientClosed) as error:
                    self._spawn(self._audit_response(admitted, None, error.status, error.message))
                    error.request_id = admitted.request_id  # type: ignore[union-attr]
                    raise
                if isinstance(item, ev.FinalReply):
                    return item
        finally:
            disconnected.cancel()

    async def _next(
        self, admitted: Admitted, pending: Pending, disconnected: asyncio.Future[None] | None
    ) -> Relayed:
        """The next item of the relay; cancels the request downstream when it raises.

        Raises:
            ClientClosed: ``disconnected`` completed first.
            GatewayTimeout: the request's deadline passed.
        """
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
            raise ClientClosed("the client disconnected before the reply")
        self._cancel(admitted, "deadline exceeded")
        raise GatewayTimeout(
            f"no reply within {self.settings.request_timeout_s:g} s", None, "deadline_exceeded"
        )

    async def _whole(self, admitted: Admitted, reply: ev.FinalReply, body: Any) -> dict[str, Any]:
        failure = ReplyError(reply.error, admitted.request_id) if reply.HasField("error") else None
        try:
            if failure is not None:
                await self._audit_response(admitted, reply, failure.status, reply.error.message)
            else:
                await self._audit_response(admitted, reply, 200, None)
        except AuditUnavailable as error:
            raise audit_failure(error, admitted.request_id) from error
        if failure is not None:
            failure.request_id = admitted.request_id  # type: ignore[attr-defined]
            raise failure
        if admitted.kind == "embedding":
            return embeddings_body(reply, body.get("encoding_format") or "float")
        return ResponseBuilder(admitted.kind, admitted.request_id, admitted.event.model).whole(
            reply
        )

    async def _stream(self, admitted: Admitted, pending: Pending, body: Any) -> AsyncIterator[str]:
        """The answer as SSE while it is made (the request's record is durable already).

        Content goes out as the relay hands it over; the end (finish reasons, usage,
        ``[DONE]``) only once the response's record, holding the whole text, is durable.
        A stream that ends any other way ends with an error event and no ``[DONE]``, and
        its response record holds exactly the text the client was sent.
        """
        builder = ResponseBuilder(admitted.kind, admitted.request_id, admitted.event.model)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        shown: dict[int, str] = {}
        ended = recorded = False
        first_token: float | None = None

        def answered(reply: ev.FinalReply | None, error: OpenAIError | None) -> None:
            nonlocal recorded
            if not recorded:  # once per stream, however it ends
                recorded = True
                self._answered(admitted, reply, first_token, error)

        try:
            if admitted.kind == "chat":
                for index in range(admitted.event.sampling.n or 1):
                    yield sse(builder.chunk(index, "", role=True))
            while True:
                try:
                    item = await self._next(admitted, pending, None)
                except GatewayTimeout as error:
                    ended = True
                    answered(None, error)
                    yield sse(await self._interrupted(admitted, None, shown, error))
                    return
                if isinstance(item, Delta):
                    if first_token is None and item.text:
                        first_token = time.monotonic() - admitted.started
                    shown[item.choice_index] = shown.get(item.choice_index, "") + item.text
                    yield sse(builder.chunk(item.choice_index, item.text))
                    continue
                ended = True
                if isinstance(item, Diverged) or item.HasField("error"):
                    reply = None if isinstance(item, Diverged) else item
                    failed = self._failure_of(admitted, item)
                    answered(reply, failed)
                    yield sse(await self._interrupted(admitted, reply, shown, failed))
                    return
                try:  # the end of the answer goes out only once its audit record is durable
                    await self._shielded(self._audit_response(admitted, item, 200, None))
                except AuditUnavailable as failure:
                    refused = audit_failure(failure)
                    answered(item, refused)
                    yield sse(refused.to_dict())
                    return
                answered(item, None)  # before the ending goes out: a client may leave meanwhile
                for payload in builder.ending(item, include_usage=include_usage):
                    yield sse(payload)
                yield "data: [DONE]\n\n"
                return
        finally:
            answered(None, ClientClosed("client disconnected"))  # when nothing else was
            if not ended:  # the caller went away mid-stream
                self._cancel(admitted, "client disconnected")
                self._spawn(self._audit_response(admitted, None, 499, "client disconnected", shown))
            await self._release(admitted, pending)

    def _failure_of(self, admitted: Admitted, item: Diverged | ev.FinalReply) -> OpenAIError:
        """The error a stream ends with: a re-run that diverged, or the reply's error."""
        if isinstance(item, Diverged):
            self._cancel(admitted, "the re-run diverged from the text already sent")
            return diverged_error(item)
        return ReplyError(item.error)

    async def _interrupted(
        self,
        admitted: Admitted,
        reply: ev.FinalReply | None,
        shown: dict[int, str],
        error: OpenAIError,
    ) -> dict[str, Any]:
        """Record a stream that ends without its answer; returns the error event to send."""
        try:
            await self._shielded(
                self._audit_response(admitted, reply, error.status, error.message, shown)
            )
        except AuditUnavailable as failure:
            return audit_failure(failure).to_dict()
        return error.to_dict()

    # ----------------------------------------------------------------- bookkeeping

    def _answered(
        self,
        admitted: Admitted,
        reply: ev.FinalReply | None,
        first_token_s: float | None,
        error: OpenAIError | None,
    ) -> None:
        """Record the answer's metrics and span (at its end: a body sent, a stream's last
        event)."""
        usage = reply.usage if reply is not None else None
        self.metrics.answer(
            parent=admitted.span,
            tenant=admitted.principal.tenant,
            kind=admitted.kind,
            model=admitted.event.model,
            seconds=time.monotonic() - admitted.started,
            first_token_s=first_token_s,
            output_tokens=usage.completion_tokens if usage is not None else 0,
            input_tokens=usage.prompt_tokens if usage is not None else 0,
            error=None if error is None else (error.code or error.error_type)[:64],
            status=200 if error is None else error.status,
            model_version=reply.model_version[:64] if reply is not None else "",
            pool=reply.pool[:64] if reply is not None else "",
        )

    async def _release(self, admitted: Admitted, pending: Pending) -> None:
        self.relay.close(pending.request_id)
        try:  # a slot that cannot be given back lapses by itself (Redis) at the deadline
            await self.concurrency.release(
                _limit_key(admitted.principal), admitted.principal.tenant, admitted.request_id
            )
        except Exception:
            log.exception("concurrency slot not released", request_id=admitted.request_id)

    async def _settle(self, admitted: Admitted, actual: int) -> None:
        """Correct the token charge; best effort: the answer and its record come first."""
        try:
            await self.rate_limiter.settle(
                _limit_key(admitted.principal),
                admitted.principal.tenant,
                admitted.estimated_tokens,
                actual,
            )
        except Exception:
            log.exception("token charge not settled", request_id=admitted.request_id)

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

    async def _shielded(self, work: Any) -> Any:
        """Await ``work``, which a caller hanging up meanwhile does not cancel (a record
        being written is finished even when nobody waits for the answer any more)."""
        task = asyncio.ensure_future(work)
        self._spawn(task)  # held until done
        return await asyncio.shield(task)

    def _audit_policy(
        self,
        request_id: str,
        *,
        principal: Principal,
        model: str,
        kind: str,
        allow: bool,
        reasons: tuple[str, ...],
    ) -> asyncio.Future[None]:
        """Start recording a policy decision; the future is done once it is durable."""
        event = ev.AuditEvent(
            request_id=request_id,
            api_key_id=principal.key_id or "",
            user=principal.subject,
            model=model,
        )
        event.policy.allow = allow
        event.policy.reasons.extend(reasons)
        event.policy.action = ACTIONS[kind]
        event.policy.resource = model
        event.policy.roles.extend(principal.roles)
        recorded = asyncio.ensure_future(
            self.audit.record(event, key=request_id, tenant=principal.tenant)
        )
        self._spawn(recorded)  # held until done, whoever waits for it
        return recorded

    async def _audit_response(
        self,
        admitted: Admitted,
        reply: ev.FinalReply | None,
        status: int,
        error: str | None,
        shown: dict[int, str] | None = None,
    ) -> None:
        """Record the response; returns once the record is durable (raises AuditUnavailable).

        ``shown`` is the text a stream that ended early had sent (its choices are recorded
        with finish reason ``interrupted``).
        """
        actual = 0
        event = ev.AuditEvent(
            request_id=admitted.request_id,
            api_key_id=admitted.principal.key_id or "",
            user=admitted.event.user,
            client_user=admitted.event.client_user,
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
        if shown and not record.choices:
            for index, text in sorted(shown.items()):
                record.choices.add(index=index, text=text, finish_reason="interrupted")
        await self.audit.record(event, key=admitted.request_id, tenant=admitted.principal.tenant)
        await self._settle(admitted, actual)


# --------------------------------------------------------------------------- helpers


async def _done(future: asyncio.Future[None] | None) -> None:
    if future is not None:
        await asyncio.shield(future)


async def _disconnect(request: Request) -> None:
    """Returns when the caller disconnects (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _audit_unavailable(request: Request, error: Exception) -> Response:
    return await error_response(request, audit_failure(error))
