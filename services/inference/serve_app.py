"""The inference service as a Ray Serve application, speaking the OpenAI API.

Two deployments (:func:`build_app`):

- :class:`ChatDeployment` holds one model version on a running :class:`Engine`, and is
  the HTTP face on Ray's proxy: ``POST /v1/chat/completions``, ``/v1/completions`` (SSE
  when ``"stream": true``), ``/v1/embeddings``, ``GET /v1/models``. Generation is served
  in the replica that runs the engine, so a token crosses one actor hop (replica to
  proxy) on its way out, not two. Through a ``DeploymentHandle`` it also takes
  ``chat`` / ``chat_stream`` / ``complete`` / ``complete_stream`` with OpenAI request
  dicts and returns OpenAI response (or chunk) dicts.
- :class:`EmbeddingsDeployment` embeds with multilingual-e5-small (``embed``); the chat
  replica's ``/v1/embeddings`` route calls it through a handle.

The deployments only delegate: the OpenAI request/response handling is in
:class:`ChatService` / :class:`EmbeddingService`, which know nothing of Ray.

Errors are :class:`OpenAIError` subclasses carrying the OpenAI ``error`` fields and an
HTTP status; through a handle they arrive wrapped by Ray but still ``isinstance`` of
their class with their fields.

Model versions: the model named in a request may be ``name`` or ``name:version``; a
response's ``model`` is always ``name:version`` of the version that answered. A new
version goes live without failing a request:

- ``reload(version)`` on a replica (through a handle) switches it in place
  (:meth:`ChatService.switch`: new engine first, old one stopped once drained).
- Serve's ``user_config`` ``{"model_version": ...}`` calls the same switch in place
  (``reconfigure``) when Serve applies the change as a config-only update (a
  declarative ``serve deploy`` whose import path and runtime env are unchanged).
- ``serve.run`` of :func:`build_app` with another ``model_version`` makes Serve replace
  the replicas (Python ``serve.run`` gives every deployment a new code version); the
  old replicas finish their requests within ``graceful_shutdown_timeout_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import Response

from services.inference.chat import ChatService
from services.inference.embeddings import EmbeddingEngine, EmbeddingService
from services.inference.http import HttpFrontend
from services.inference.registry import ModelRegistry
from services.inference.settings import InferenceSettings
from shared.deployments import CHAT_DEPLOYMENT, EMBEDDINGS_DEPLOYMENT
from shared.logging import get_logger
from shared.service_auth import ServiceGuard

log = get_logger(__name__)


# --------------------------------------------------------------------------- deployments


@serve.deployment
class ChatDeployment:
    """A replica serving one model version (see :class:`ChatService`) and the HTTP routes
    (see :class:`HttpFrontend`).

    Each HTTP call is a SERVER span continuing the caller's trace (``traceparent``),
    exported like every service's spans to the telemetry topic when a broker is reachable.
    """

    def __init__(
        self,
        settings: InferenceSettings,
        embeddings: DeploymentHandle[Any] | None = None,
        guard: ServiceGuard | None = None,
    ) -> None:
        # threads resolved here, in the replica: its node's CPUs, not the driver's
        self._service = ChatService(
            ModelRegistry(settings.registry_dir),
            settings.model_name,
            settings.engine.engine_settings(threads=settings.engine_threads()),
            settings.quant,
            drain_timeout_s=settings.serve.reload_drain_timeout_s,
            stream_interval_s=settings.stream_interval_ms / 1000,
            max_alongside=settings.serve.max_versions_alongside,
        )
        self._service.load_now(settings.model_version)
        # no guard given: one of no caller, so every request is refused (never open)
        self._frontend = HttpFrontend(self, embeddings, guard or ServiceGuard({}))
        self._settings = settings
        self._telemetry_task: asyncio.Task[None] | None = None
        self._releases: asyncio.Task[Any] | None = None

    async def __call__(self, request: Request) -> Response:
        from opentelemetry import propagate, trace

        if self._telemetry_task is None:
            self._telemetry_task = asyncio.create_task(_export_spans(self._settings))
        if not self._telemetry_task.done():
            # the first call waits (briefly) so that its own span is exported too
            await asyncio.wait({self._telemetry_task}, timeout=5)
        with trace.get_tracer("meshllm.inference").start_as_current_span(
            f"{request.method} {request.url.path}",
            context=propagate.extract(dict(request.headers)),
            kind=trace.SpanKind.SERVER,
        ):
            return await self._frontend.handle(request)

    async def reconfigure(self, user_config: dict[str, Any] | None) -> None:
        """Serve's ``user_config``: ``{"model_version": "...", "alongside": [...]}``
        (``model_version`` null: the latest; ``alongside``: versions served beside it)."""
        config = user_config or {}
        await self._service.switch(config.get("model_version"))
        if "alongside" in config:  # else what the release decisions set stays
            await self._service.serve_alongside(list(config["alongside"] or []))
        if self._releases is None and self._settings.serve.follow_releases:
            # Serve calls this once a replica is up: from then on it follows the releases
            self._releases = asyncio.create_task(_follow_releases(self._settings, self._service))

    async def reload(self, version: str | None = None) -> dict[str, Any]:
        """Switch this replica to ``version`` (None: the latest); returns ``status()``."""
        return await self._service.switch(version)

    async def serve_alongside(self, versions: list[str]) -> dict[str, Any]:
        """Serve exactly ``versions`` beside the current one; returns ``status()``."""
        return await self._service.serve_alongside(versions)

    async def status(self) -> dict[str, Any]:
        """The served version, engine load, retiring engines, and this replica's id."""
        return {**self._service.status(), "replica": serve.get_replica_context().replica_tag}

    async def models(self) -> dict[str, Any]:
        return self._service.models()

    async def wait_retired(self) -> dict[str, Any]:
        """Wait until replaced engines have drained and stopped; returns ``status()``."""
        await self._service.wait_retired()
        return await self.status()

    async def chat(self, request: dict[str, Any]) -> dict[str, Any]:
        return await self._service.chat(request)

    async def chat_stream(self, request: dict[str, Any]) -> AsyncGenerator[dict[str, Any], None]:
        async with contextlib.aclosing(self._service.chat_stream(request)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def complete(self, request: dict[str, Any]) -> dict[str, Any]:
        return await self._service.complete(request)

    async def complete_stream(
        self, request: dict[str, Any]
    ) -> AsyncGenerator[dict[str, Any], None]:
        async with contextlib.aclosing(self._service.complete_stream(request)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def check_health(self) -> None:
        """Raise when an engine is stuck, so Serve replaces this replica."""
        reason = self._service.stuck()
        if reason is not None:
            raise RuntimeError(f"engine unhealthy: {reason}")

    def __del__(self) -> None:
        service = getattr(self, "_service", None)
        if service is not None:
            service.close()


@serve.deployment
class EmbeddingsDeployment:
    """multilingual-e5-small embeddings; see :class:`EmbeddingService`."""

    def __init__(self, settings: InferenceSettings) -> None:
        self._service = EmbeddingService(EmbeddingEngine(threads=settings.embedding_threads))

    async def embed(self, request: dict[str, Any]) -> dict[str, Any]:
        return await self._service.embed(request)


async def _export_spans(settings: InferenceSettings) -> None:
    """Install this replica's tracer provider, exporting spans to Kafka (best effort)."""
    from shared.bus.producer import Publisher
    from shared.telemetry import Telemetry

    telemetry = Telemetry(settings, "inference")
    telemetry.install()
    if not settings.telemetry.spans_to_kafka:
        return
    publisher = Publisher(settings, service="inference")
    try:
        await asyncio.wait_for(publisher.start(), 30)
    except Exception as error:
        log.warning("spans stay local: no broker", error=f"{type(error).__name__}: {error}")
        return
    telemetry.export_spans_to_kafka(publisher, asyncio.get_running_loop())


async def _follow_releases(settings: InferenceSettings, service: ChatService) -> Any:
    """This replica's consumer of ``model.deployments`` (see :mod:`.releases`); None when
    no broker is reachable (the replica serves its configured version only)."""
    import uuid

    from services.inference.releases import ReleaseFollower
    from shared.bus import Bus
    from shared.topics import MODEL_DEPLOYMENTS

    bus = Bus(settings, service="inference")
    bus.subscribe(
        MODEL_DEPLOYMENTS,
        group=f"inference-releases-{uuid.uuid4().hex[:12]}",
        durable_dedup=False,
        rewind_s=settings.release_max_lease_s + 5,
    )(
        ReleaseFollower(
            service,
            drop_after_s=settings.serve.release_drop_after_s,
            max_lease_s=settings.release_max_lease_s,
        ).on_decision
    )
    try:
        await asyncio.wait_for(bus.start(), 60)
    except Exception as error:
        log.warning(
            "release decisions not followed: the bus did not start",
            error=f"{type(error).__name__}: {error}",
        )
        with contextlib.suppress(Exception):
            await bus.stop()
        return None
    return bus


def build_app(settings: InferenceSettings) -> serve.Application:
    """The Serve application: the chat deployment as the ingress, bound to the embeddings."""
    settings = settings.model_copy(update={"model_dir": settings.registry_dir.resolve()})
    s = settings.serve
    common: dict[str, Any] = {
        "health_check_period_s": s.health_check_period_s,
        "health_check_timeout_s": s.health_check_timeout_s,
        "graceful_shutdown_timeout_s": s.graceful_shutdown_timeout_s,
        "logging_config": {"enable_access_log": s.access_log},
    }
    embeddings = None
    if s.embeddings_replicas:
        embeddings = EmbeddingsDeployment.options(  # type: ignore[attr-defined]
            **common,
            name=EMBEDDINGS_DEPLOYMENT,
            num_replicas=s.embeddings_replicas,
            max_ongoing_requests=s.embeddings_max_ongoing_requests,
            ray_actor_options={"num_cpus": s.embeddings_num_cpus},
        ).bind(settings)
    app: serve.Application = ChatDeployment.options(  # type: ignore[attr-defined]
        **common,
        name=CHAT_DEPLOYMENT,
        **s.chat_scaling(),
        max_ongoing_requests=s.chat_max_ongoing_requests,
        ray_actor_options={
            "num_cpus": s.chat_num_cpus,
            # a vLLM replica holds its GPUs (one per tensor-parallel shard)
            "num_gpus": settings.engine.vllm.tensor_parallel_size
            if settings.engine.backend == "vllm"
            else 0,
        },
        user_config={"model_version": settings.model_version},
    ).bind(settings, embeddings, inference_guard(settings))
    return app


def inference_guard(settings: InferenceSettings) -> ServiceGuard:
    """The callers the HTTP front accepts, read here (in the driver) so that replicas on
    other nodes need no token files: they get only the callers' token digests."""
    return ServiceGuard.load(settings, HttpFrontend.callers())


def app_builder(args: dict[str, Any]) -> serve.Application:
    """For declarative Serve configs (``import_path: services.inference.serve_app:app_builder``):
    the settings come from the environment, with ``args`` overriding them."""
    from shared.settings import load_settings

    return build_app(load_settings(InferenceSettings, **args))
