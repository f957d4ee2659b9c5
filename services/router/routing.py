"""Running one inference request: pool and replica choice, streaming, retry, replies, audit.

Replies go to the request's ``reply_topic``, keyed by request id (one partition, in
order): :class:`ReplyChunk` events of the text when the caller streams (the text that
arrives while one is in flight goes into the next: :mod:`services.router.chunks`), then
always one :class:`FinalReply`. A replica that fails (before or during its stream) is retried
once on another replica of the pool; a redelivered request (after a router crash) runs
again from the start. Each run names itself in its chunks (``run``) and numbers them
from 0; the gateway continues a client's stream with a new run only while its text
repeats what the client already has, and ends the stream with an error where it does
not (see ``services/gateway/relay.py``). Requests without a seed get one derived from
their id, so a re-run on the same engine samples the same text.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx
from opentelemetry import trace

from services.router import rag
from services.router.chunks import ChunkStream, Send
from services.router.metrics import RouterMetrics
from services.router.pools import Pool, Pools, Replica
from services.router.settings import RagConfig
from services.router.upstream import (
    Piece,
    ReplicaFailed,
    StreamEnd,
    UpstreamRejected,
    embed,
    stream_generation,
)
from shared.bus import EventContext, Publisher
from shared.events.v1 import events_pb2 as ev
from shared.logging import get_logger
from shared.pii import Purpose, TenantPiiSettings
from shared.pii.events import redact_audit_event
from shared.release_split import CANDIDATE_UNSERVED, Choice, InvalidDecision, Splits
from shared.topics import AUDIT_EVENTS, REPLIES, Topic, by_name

log = get_logger(__name__)
tracer = trace.get_tracer("meshllm.router")

PRIORITY_NAMES = {
    ev.PRIORITY_HIGH: "high",
    ev.PRIORITY_NORMAL: "normal",
    ev.PRIORITY_LOW: "low",
    ev.PRIORITY_UNSPECIFIED: "normal",
}
MAX_ATTEMPTS = 2
"""Replicas tried per request: the first, then one other."""


class RequestFailed(Exception):
    """The request cannot be served; ``info`` is what the caller is told."""

    def __init__(self, info: ev.ErrorInfo) -> None:
        super().__init__(info.message)
        self.info = info


def error_info(kind: str, code: str, message: str, param: str = "") -> ev.ErrorInfo:
    return ev.ErrorInfo(type=kind, code=code, message=message, param=param)


def derived_seed(request_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(request_id.encode(), digest_size=4).digest(), "big")


def upstream_body(request: ev.InferenceRequest) -> tuple[str, dict[str, Any]]:
    """The OpenAI-compatible path and body for ``request`` (always streaming)."""
    s = request.sampling
    model = f"{request.model}:{request.model_version}" if request.model_version else request.model
    body: dict[str, Any] = {
        "model": model,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": s.temperature,
        "top_p": s.top_p or 1.0,
        "n": s.n or 1,
    }
    if s.top_k:
        body["top_k"] = s.top_k
    if s.max_tokens:
        body["max_tokens"] = s.max_tokens
    elif s.max_tokens_cap:
        body["max_tokens_cap"] = s.max_tokens_cap
    if s.stop:
        body["stop"] = list(s.stop)
    if s.ignore_eos:
        body["ignore_eos"] = True
    if s.HasField("seed"):
        body["seed"] = s.seed
    elif s.temperature > 0:
        body["seed"] = derived_seed(request.request_id)
    if request.user:
        body["user"] = request.user
    if request.kind == ev.REQUEST_KIND_COMPLETION:
        body["prompt"] = list(request.inputs) if len(request.inputs) != 1 else request.inputs[0]
        return "/v1/completions", body
    body["messages"] = [{"role": m.role, "content": m.content} for m in request.messages]
    return "/v1/chat/completions", body


@dataclass
class _Outcome:
    reply: ev.FinalReply
    replica: str = ""
    attempt: int = 0
    texts: dict[int, list[str]] = field(default_factory=lambda: collections.defaultdict(list))


class Router:
    """Handles inference requests taken off the priority topics (see the module docstring)."""

    def __init__(
        self,
        publisher: Publisher,
        pools: Pools,
        client: httpx.AsyncClient,
        *,
        default_deadline_s: float,
        service: str = "router",
        rag: RagConfig | None = None,
        pii: TenantPiiSettings | None = None,
        splits: Splits | None = None,
    ) -> None:
        """``splits``: the releases' traffic splits (none: every request as it is named)."""
        self._publisher = publisher
        self._pools = pools
        self._client = client
        self._default_deadline_s = default_deadline_s
        self._rag = rag if rag is not None else RagConfig()
        self._pii = pii if pii is not None else TenantPiiSettings()
        self._service = service
        self.splits = splits if splits is not None else Splits(max_lease_s=300)
        self._running: dict[str, asyncio.Task[None]] = {}
        # ids cancelled before (or while) they ran; bounded, oldest forgotten first
        self._cancelled: collections.OrderedDict[str, None] = collections.OrderedDict()

    @property
    def running(self) -> int:
        return len(self._running)

    # ---------------------------------------------------------------- cancellation

    async def on_cancel(self, event: ev.CancelRequest, ctx: EventContext) -> None:
        self._cancelled[event.request_id] = None
        while len(self._cancelled) > 10_000:
            self._cancelled.popitem(last=False)
        task = self._running.get(event.request_id)
        if task is not None:
            log.info("request cancelled", request_id=event.request_id, reason=event.reason)
            task.cancel()

    async def on_deployment(self, event: ev.ModelDeployment, ctx: EventContext) -> None:
        """A release decision: start, move, renew or end a model's traffic split."""
        try:
            did = self.splits.apply(event, time.time())
        except InvalidDecision as error:  # logged and dropped: the split stays as it was
            log.warning("release decision refused", model=event.model[:64], error=str(error))
            return
        if did != "stale":
            log.info(
                "release decision",
                model=event.model[:64],
                version=event.version[:64],
                action=ev.DeploymentAction.Name(event.action),
                percent=event.traffic_percent,
                release_id=event.release_id,
                effect=did,
            )

    # ---------------------------------------------------------------- requests

    async def handle(self, request: ev.InferenceRequest, ctx: EventContext) -> None:
        """Run ``request`` to its final reply; returns once that reply is durable."""
        if request.request_id in self._cancelled:
            log.info("skipping a cancelled request", request_id=request.request_id)
            return
        work = asyncio.create_task(self._serve(request), name=f"request:{request.request_id}")
        self._running[request.request_id] = work
        try:
            await asyncio.wait({work})
        except asyncio.CancelledError:  # the router is stopping: stop the work too
            work.cancel()
            raise
        finally:
            self._running.pop(request.request_id, None)
        if work.cancelled():
            return  # the caller went away; nobody is waiting for a reply
        work.result()

    async def _serve(self, request: ev.InferenceRequest) -> None:
        asked = request
        choice = self.splits.choose(request, time.time())
        if choice is not None:
            RouterMetrics.released(request.model, choice.arm)
            if choice.version:  # the candidate: asked for by name from here on
                named = ev.InferenceRequest()
                named.CopyFrom(request)
                named.model_version = choice.version
                request = named
        reply_topic = self._reply_topic(request)
        started = time.monotonic()
        queue_wait_us = (
            max(0, time.time_ns() - request.envelope.occurred_at.ToNanoseconds()) // 1000
        )
        priority = PRIORITY_NAMES.get(request.priority, "normal")
        RouterMetrics.started(priority, queue_wait_us / 1e6)
        pool: Pool | None = None
        outcome: _Outcome | None = None
        prompted = request
        sources: list[rag.Source] = []
        try:
            self._check_deadline(request)
            sources = await self._sources(request)
            prompted = rag.augmented(request, sources) if sources else request
            pool = self._choose_pool(priority)
            async with pool.slots:
                self._check_deadline(request)  # it may have expired while waiting for a slot
                try:
                    outcome = await self._attempts(prompted, pool, reply_topic)
                except RequestFailed as failure:
                    if not (choice and choice.version and failure.info.code == "model_not_found"):
                        raise
                    # the split's candidate is not served where this went (a replica still
                    # loading it, or one that dropped it on a rollback this router has not
                    # read yet): production answers instead; nothing was streamed yet
                    log.warning("candidate not served; production answers",
                                request_id=request.request_id, version=choice.version)  # fmt: skip
                    choice = Choice("", CANDIDATE_UNSERVED)
                    RouterMetrics.released(asked.model, choice.arm)
                    request = asked
                    prompted = rag.augmented(request, sources) if sources else request
                    outcome = await self._attempts(prompted, pool, reply_topic)
            final = outcome.reply
            final.citations.extend(rag.citations(sources))
        except RequestFailed as failure:
            final = ev.FinalReply(request_id=request.request_id, model=request.model)
            final.error.CopyFrom(failure.info)
        if pool is not None:
            final.pool = pool.name
        RouterMetrics.finished(pool.name if pool else None, priority, final.error.code or None)
        log.info(
            "request done",
            request_id=request.request_id,
            pool=pool.name if pool else None,
            error=final.error.code or None,
            seconds=round(time.monotonic() - started, 3),
        )
        await self._publisher.publish(
            reply_topic, final, key=request.request_id, tenant=request.envelope.tenant
        )
        restricted = any(source.restricted for source in sources)
        await self._audit(
            request, pool, outcome, queue_wait_us, prompted, restricted=restricted, choice=choice
        )

    async def _sources(self, request: ev.InferenceRequest) -> list[rag.Source]:
        """The knowledge-base sources of a RAG request, within the context budget."""
        if not request.rag_collections or request.kind != ev.REQUEST_KIND_CHAT:
            return []
        with tracer.start_as_current_span(
            "retrieve", attributes={"collections": list(request.rag_collections)}
        ):
            try:
                found = await rag.retrieve(self._client, self._rag, request)
            except rag.RetrievalFailed as error:
                raise RequestFailed(error_info("server_error", error.code, str(error))) from None
        return rag.within_budget(found, self._rag.max_context_chars)

    def _choose_pool(self, priority: str) -> Pool:
        pool = self._pools.choose(priority)
        if pool is None:
            raise RequestFailed(
                error_info("server_error", "no_pool", f"no pool serves {priority} priority")
            )
        return pool

    def _reply_topic(self, request: ev.InferenceRequest) -> Topic:
        if not request.reply_topic:
            return REPLIES
        try:
            topic = by_name(request.reply_topic)
        except KeyError:
            log.warning("unknown reply topic; using the default", topic=request.reply_topic)
            return REPLIES
        return topic if topic.accepts(ev.FinalReply) else REPLIES

    def _check_deadline(self, request: ev.InferenceRequest) -> None:
        if request.HasField("deadline"):
            deadline_ns = request.deadline.ToNanoseconds()
        else:
            deadline_ns = request.envelope.occurred_at.ToNanoseconds() + int(
                self._default_deadline_s * 1e9
            )
        if time.time_ns() > deadline_ns:
            raise RequestFailed(
                error_info("timeout", "deadline_exceeded", "the request's deadline passed")
            )

    async def _attempts(
        self, request: ev.InferenceRequest, pool: Pool, reply_topic: Topic
    ) -> _Outcome:
        tried: set[str] = set()
        last_error = "no replica"
        for attempt in range(1, MAX_ATTEMPTS + 1):
            replica = pool.pick(frozenset(tried))
            if replica is None:
                break
            tried.add(replica.url)
            replica.in_flight += 1
            try:
                outcome = await self._run_on(request, replica, reply_topic)
            except ReplicaFailed as error:
                pool.failed(replica)
                RouterMetrics.retried(pool.name)
                last_error = str(error)
                log.warning(
                    "replica failed",
                    request_id=request.request_id,
                    replica=replica.url,
                    attempt=attempt,
                    error=last_error,
                )
                continue
            except UpstreamRejected as rejected:
                info = rejected.error
                raise RequestFailed(
                    error_info(
                        str(info.get("type") or "invalid_request_error"),
                        str(info.get("code") or rejected.status),
                        str(info.get("message") or "rejected by the model server"),
                        str(info.get("param") or ""),
                    )
                ) from None
            finally:
                replica.in_flight -= 1
            pool.succeeded(replica)
            outcome.replica = replica.url
            outcome.attempt = attempt
            return outcome
        raise RequestFailed(
            error_info(
                "server_error",
                "inference_unavailable",
                f"inference failed on {len(tried)} replica(s) of pool {pool.name}: {last_error}",
            )
        )

    async def _run_on(
        self, request: ev.InferenceRequest, replica: Replica, reply_topic: Topic
    ) -> _Outcome:
        reply = ev.FinalReply(request_id=request.request_id)
        outcome = _Outcome(reply)
        with tracer.start_as_current_span(
            "inference call", kind=trace.SpanKind.CLIENT, attributes={"replica": replica.url}
        ):
            if request.kind == ev.REQUEST_KIND_EMBEDDING:
                await self._embed(request, replica, reply)
                return outcome
            await self._generate(request, replica, reply_topic, outcome)
        return outcome

    async def _generate(
        self, request: ev.InferenceRequest, replica: Replica, reply_topic: Topic, outcome: _Outcome
    ) -> None:
        path, body = upstream_body(request)
        # this attempt's chunks, told apart from any other run's
        chunks = ChunkStream(
            self._chunk_sender(request, reply_topic), request.request_id, uuid.uuid4().hex
        )
        finish: dict[int, str] = {}
        end = StreamEnd()
        try:
            async for item in stream_generation(self._client, replica.url, path, body):
                if isinstance(item, StreamEnd):
                    end = item
                    continue
                piece: Piece = item
                if piece.text:
                    outcome.texts[piece.index].append(piece.text)
                    if request.stream:
                        await chunks.add(piece.index, piece.text)
                if piece.finish_reason:
                    finish[piece.index] = piece.finish_reason
            await chunks.close()  # the stream's chunks go before its final reply
        finally:
            chunks.cancel()  # a failed or cancelled run: what it did not publish is dropped
        reply = outcome.reply
        name, _, version = end.model.partition(":")
        reply.model = name or request.model
        reply.model_version = version or request.model_version
        for index in sorted(set(outcome.texts) | set(finish)):
            reply.choices.add(
                index=index,
                text="".join(outcome.texts.get(index, ())),
                finish_reason=finish.get(index, "stop"),
            )
        reply.usage.prompt_tokens = int(end.usage.get("prompt_tokens", 0))
        reply.usage.completion_tokens = int(end.usage.get("completion_tokens", 0))

    def _chunk_sender(self, request: ev.InferenceRequest, reply_topic: Topic) -> Send:
        async def send(chunk: ev.ReplyChunk) -> asyncio.Future[Any]:
            return await self._publisher.enqueue(
                reply_topic, chunk, key=request.request_id, tenant=request.envelope.tenant
            )

        return send

    async def _embed(
        self, request: ev.InferenceRequest, replica: Replica, reply: ev.FinalReply
    ) -> None:
        body: dict[str, Any] = {"input": list(request.inputs)}
        if request.model:
            body["model"] = request.model
        result = await embed(self._client, replica.url, body)
        reply.model = str(result.get("model", request.model))
        for item in result.get("data", ()):
            reply.embeddings.add(index=int(item.get("index", 0)), values=item["embedding"])
        usage = result.get("usage") or {}
        reply.usage.prompt_tokens = int(usage.get("prompt_tokens", 0))

    async def _audit(
        self,
        request: ev.InferenceRequest,
        pool: Pool | None,
        outcome: _Outcome | None,
        queue_wait_us: int,
        prompted: ev.InferenceRequest,
        *,
        restricted: bool = False,
        choice: Choice | None = None,
    ) -> None:
        """The routing record; for an augmented prompt it holds the messages the model was
        given, redacted by the tenant's ``audit`` policy like the gateway's records."""
        event = ev.AuditEvent(
            request_id=request.request_id,
            api_key_id=request.api_key_id,
            user=request.user,
            client_user=request.client_user,
            model=outcome.reply.model if outcome else request.model,
            model_version=outcome.reply.model_version if outcome else request.model_version,
        )
        event.envelope.correlation_id = request.request_id
        event.routing.pool = pool.name if pool else ""
        event.routing.replica = outcome.replica if outcome else ""
        event.routing.queue_wait_us = queue_wait_us
        event.routing.attempt = outcome.attempt if outcome else 0
        if choice is not None:
            event.routing.model_version = choice.version or "production"
            event.routing.release_arm = choice.arm
        if prompted is not request and outcome is not None:  # the model was given it
            event.routing.prompt.extend(prompted.messages)
            event.routing.prompt_restricted = restricted
            redact_audit_event(event, self._pii.redactor(request.envelope.tenant, Purpose.AUDIT))
        # acknowledged before the request's offset is committed: a routing record the broker
        # did not take fails the request's handling (it is dead-lettered with the reason)
        await self._publisher.publish(
            AUDIT_EVENTS, event, key=request.request_id, tenant=request.envelope.tenant
        )
