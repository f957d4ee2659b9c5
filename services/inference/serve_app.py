"""The inference service as a Ray Serve application, speaking the OpenAI API.

Three deployments (:func:`build_app`):

- :class:`ChatDeployment` holds one model version on a running :class:`Engine`;
  ``chat`` / ``chat_stream`` / ``complete`` / ``complete_stream`` take OpenAI request
  dicts through a ``DeploymentHandle`` and return OpenAI response (or chunk) dicts.
- :class:`EmbeddingsDeployment` embeds with multilingual-e5-small (``embed``).
- :class:`OpenAIIngress` is the HTTP face on Ray's proxy: ``POST /v1/chat/completions``,
  ``/v1/completions`` (SSE when ``"stream": true``), ``/v1/embeddings``, ``GET /v1/models``.

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
import base64
import contextlib
import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, cast

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from services.inference.embeddings import EmbeddingEngine, EmbeddingInputError
from services.inference.engine_protocol import TextEngine
from services.inference.generation import Delta, EngineSettings, InvalidRequest, SamplingParams
from services.inference.model.engine import Engine
from services.inference.model.gguf_model import GgufModel, ModelLoadError, load_gguf
from services.inference.model.llama import Llama
from services.inference.model.quant import resolve_mode
from services.inference.model.tokenizer import Tokenizer
from services.inference.registry import ModelEntry, ModelRegistry, UnknownModel
from services.inference.settings import InferenceSettings
from services.inference.vllm_engine import VllmEngine, VllmEngineSettings
from shared.logging import get_logger
from shared.openai_protocol import (
    GenerationRequest,
    InvalidRequestError,
    ModelNotFoundError,
    OpenAIError,
    RequestKind,
    RouteNotFoundError,
    ServiceUnavailableError,
    invalid_field,
    parse_request,
)
from shared.service_auth import ServiceGuard

log = get_logger(__name__)

CHAT_DEPLOYMENT = "ChatDeployment"
EMBEDDINGS_DEPLOYMENT = "EmbeddingsDeployment"

# --------------------------------------------------------------------------- models


def build_llama(model: GgufModel, quant: str) -> Llama:
    """The torch model with ``quant`` weights; the GGUF's dequantized tensors are freed.

    Raises:
        ModelLoadError: an unknown quantization mode.
    """
    try:
        return Llama(model, quant)
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from exc


@dataclass(eq=False)
class LoadedModel:
    """One model version on its own running engine, with its in-flight request count."""

    entry: ModelEntry
    engine: TextEngine
    tokenizer: Tokenizer
    quant: str
    in_flight: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.idle.set()

    @property
    def model_id(self) -> str:
        return self.entry.ref

    @property
    def fingerprint(self) -> str:
        return f"{self.entry.version}-{self.quant}-{self.entry.sha256[:8]}"

    def acquire(self) -> None:
        self.in_flight += 1
        self.idle.clear()

    def release(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self.idle.set()


def load_model(
    entry: ModelEntry, settings: EngineSettings, quant: str, *, verify: bool = True
) -> LoadedModel:
    """Read, build and start ``entry`` (blocking: seconds; run it in a thread).

    :class:`VllmEngineSettings` select the vLLM backend, which runs the file's own
    quantization (``quant`` does not apply); any other settings, the torch engine.

    Raises:
        ModelLoadError: the file is corrupt (``CorruptModel``) or unusable, or the vLLM
            backend is selected where vLLM is not installed.
    """
    started = time.monotonic()
    if verify:
        entry.verify()
    engine: TextEngine
    if isinstance(settings, VllmEngineSettings):
        vllm_engine = VllmEngine(entry.path, settings)
        engine, tokenizer, quant = vllm_engine, vllm_engine.tokenizer, "gguf"
    else:
        gguf = load_gguf(entry.path)
        tokenizer = Tokenizer(gguf.tokenizer)
        try:
            quant = resolve_mode(quant, gguf.tensor_types).value  # "auto": the file's own
        except ValueError as exc:
            raise ModelLoadError(str(exc)) from exc
        engine = Engine.launch(lambda: build_llama(gguf, quant), tokenizer, settings)
        del gguf
    engine.start()
    log.info(
        "model loaded",
        model=entry.ref,
        quant=quant,
        seconds=round(time.monotonic() - started, 2),
    )
    return LoadedModel(entry, engine, tokenizer, quant)


# --------------------------------------------------------------------------- responses


@dataclass(frozen=True)
class _Job:
    """One sequence to generate: choice ``index`` of prompt ``prompt_index``."""

    index: int
    prompt_index: int
    ids: tuple[int, ...]
    params: SamplingParams


@dataclass
class _Plan:
    request: GenerationRequest
    jobs: list[_Job]
    prompt_tokens: int


class _Shaper:
    """Builds the OpenAI response and chunk dicts of one request."""

    def __init__(self, kind: RequestKind, model: LoadedModel) -> None:
        self.kind = kind
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.model = model.model_id
        self.fingerprint = model.fingerprint

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.fingerprint,
            "choices": choices,
        }

    def chunk(
        self, index: int, text: str | None, finish: str | None = None, *, role: bool = False
    ) -> dict[str, Any]:
        if self.kind == "completion":
            choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
            return self._envelope("text_completion", [choice])
        delta: dict[str, Any] = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        return self._envelope("chat.completion.chunk", [choice])

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {**self._envelope(obj, []), "usage": usage}

    def response(
        self, texts: list[str], finishes: list[str], usage: dict[str, int]
    ) -> dict[str, Any]:
        choices: list[dict[str, Any]]
        if self.kind == "chat":
            choices = [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": finish,
                }
                for i, (text, finish) in enumerate(zip(texts, finishes, strict=True))
            ]
            obj = "chat.completion"
        else:
            choices = [
                {"index": i, "text": text, "logprobs": None, "finish_reason": finish}
                for i, (text, finish) in enumerate(zip(texts, finishes, strict=True))
            ]
            obj = "text_completion"
        return {**self._envelope(obj, choices), "usage": usage}


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _stream(engine: TextEngine, job: _Job) -> AsyncGenerator[Delta, None]:
    # TextEngine.stream is an async generator (typed as an iterator): close it when done.
    return cast(AsyncGenerator[Delta, None], engine.stream(job.ids, job.params))


async def _merge(model: LoadedModel, jobs: list[_Job]) -> AsyncGenerator[tuple[int, Delta], None]:
    """The deltas of every job as they come, tagged with the job's choice index."""
    engine = model.engine
    if len(jobs) == 1:
        job = jobs[0]
        async with contextlib.aclosing(_stream(engine, job)) as deltas:
            async for delta in deltas:
                yield job.index, delta
        return
    queue: asyncio.Queue[tuple[int, Delta | BaseException | None]] = asyncio.Queue()

    async def pump(job: _Job) -> None:
        try:
            async with contextlib.aclosing(_stream(engine, job)) as deltas:
                async for delta in deltas:
                    queue.put_nowait((job.index, delta))
        except Exception as error:
            queue.put_nowait((job.index, error))
        else:
            queue.put_nowait((job.index, None))

    tasks = [asyncio.create_task(pump(job)) for job in jobs]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# --------------------------------------------------------------------------- chat service


class ChatService:
    """Serves one model name from a registry, one version at a time, OpenAI-style.

    Not thread-safe: call it from one event loop (a Serve replica's).
    """

    def __init__(
        self,
        registry: ModelRegistry,
        model_name: str,
        engine_settings: EngineSettings,
        quant: str = "fp32",
        *,
        verify: bool = True,
        drain_timeout_s: float = 600.0,
    ) -> None:
        self.registry = registry
        self.model_name = model_name
        self.engine_settings = engine_settings
        self.quant = quant
        self.verify = verify
        self.drain_timeout_s = drain_timeout_s
        self._current: LoadedModel | None = None
        self._retiring: set[LoadedModel] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._switch_lock = asyncio.Lock()

    # ------------------------------------------------------------- model versions

    @property
    def current(self) -> LoadedModel:
        if self._current is None:
            raise ServiceUnavailableError("no model is loaded")
        return self._current

    def load_now(self, version: str | None) -> ModelEntry:
        """Blocking first load (a replica's constructor).

        Raises:
            UnknownModel, ModelLoadError: the version cannot be served.
        """
        if self._current is not None:
            raise RuntimeError("a model is loaded already; use switch()")
        entry = self.registry.resolve(self.model_name, version)
        self._current = load_model(entry, self.engine_settings, self.quant, verify=self.verify)
        return entry

    async def switch(self, version: str | None) -> dict[str, Any]:
        """Serve ``version`` (None: the latest) from now on, without failing a request.

        The new version is loaded on a new engine while the old one keeps serving; then
        new requests go to the new engine, and the old engine stops once its in-flight
        requests have finished (in the background; see ``status()["retiring"]``).

        Raises:
            ModelNotFoundError: no such version in the registry.
            ModelLoadError: the file is corrupt or unusable (the old version stays).
        """
        async with self._switch_lock:
            try:
                entry = self.registry.resolve(self.model_name, version)
            except UnknownModel as error:
                raise ModelNotFoundError(error.message) from None
            old = self._current
            if old is not None and (old.entry.version, old.entry.sha256) == (
                entry.version,
                entry.sha256,
            ):
                return self.status()
            new = await asyncio.to_thread(
                load_model, entry, self.engine_settings, self.quant, verify=self.verify
            )
            self._current = new
            log.info(
                "model switched",
                model=new.model_id,
                previous=old.model_id if old else None,
                draining=old.in_flight if old else 0,
            )
            if old is not None:
                self._retiring.add(old)
                task = asyncio.create_task(self._retire(old), name=f"retire {old.model_id}")
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            return self.status()

    async def _retire(self, old: LoadedModel) -> None:
        try:
            await asyncio.wait_for(old.idle.wait(), self.drain_timeout_s)
        except TimeoutError:
            log.warning(
                "stopping a retired model with requests in flight",
                model=old.model_id,
                in_flight=old.in_flight,
            )
        self._retiring.discard(old)
        await asyncio.to_thread(old.engine.stop)
        log.info("retired model stopped", model=old.model_id)

    async def wait_retired(self) -> None:
        """Wait until every replaced engine has drained and stopped."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def status(self) -> dict[str, Any]:
        current = self.current
        return {
            "model": current.model_id,
            "name": current.entry.name,
            "version": current.entry.version,
            "sha256": current.entry.sha256,
            "quant": current.quant,
            "max_seq_len": current.engine.max_seq_len,
            "in_flight": current.in_flight,
            "active": current.engine.active,
            "waiting": current.engine.waiting,
            "retiring": [
                {"model": m.model_id, "in_flight": m.in_flight}
                for m in sorted(self._retiring, key=lambda m: m.model_id)
            ],
        }

    def models(self) -> dict[str, Any]:
        """The OpenAI ``/v1/models`` list: the served name, and name:version."""
        current = self.current
        created = int(Path(current.entry.directory).stat().st_mtime)
        ids = [current.entry.name, current.model_id]
        return {
            "object": "list",
            "data": [
                {"id": i, "object": "model", "created": created, "owned_by": "meshllm"} for i in ids
            ],
        }

    def stuck(self) -> str | None:
        """Why an engine is unhealthy (stuck, or its thread died); None when all are fine."""
        for model in [self.current, *self._retiring]:
            reason = model.engine.stuck()
            if reason is not None:
                return f"{model.model_id}: {reason}"
        return None

    def close(self) -> None:
        """Stop every engine now (the replica is going away)."""
        for model in [self._current, *self._retiring]:
            if model is not None:
                model.engine.stop()
        self._retiring.clear()

    # ------------------------------------------------------------- requests

    def _select(self, request: GenerationRequest) -> LoadedModel:
        current = self.current
        if request.model is not None and request.model != self.model_name:
            available = ", ".join([self.model_name, current.model_id])
            raise ModelNotFoundError(
                f"model {request.model!r} is not served here; available: {available}"
            )
        if request.version is not None and request.version != current.entry.version:
            try:
                self.registry.resolve(self.model_name, request.version)
            except UnknownModel as error:
                raise ModelNotFoundError(error.message) from None
            raise ModelNotFoundError(
                f"version {request.version!r} of {self.model_name!r} is registered but not "
                f"served now; served: {current.model_id}"
            )
        return current

    @staticmethod
    def _prompt_ids(model: LoadedModel, request: GenerationRequest) -> list[tuple[int, ...]]:
        tokenizer = model.tokenizer
        if request.kind == "chat":
            try:
                text = tokenizer.render_chat(list(request.messages))
            except ModelLoadError as error:
                raise invalid_field("messages", str(error)) from None
            except Exception as error:  # the model's own template refused the messages
                raise invalid_field("messages", f"the chat template failed: {error}") from None
            return [tuple(tokenizer.encode(text))]
        prompts: list[tuple[int, ...]] = []
        for index, prompt in enumerate(request.prompts):
            if isinstance(prompt, str):
                prompts.append(tuple(tokenizer.encode(prompt)))
            elif all(0 <= t < tokenizer.vocab_size for t in prompt):
                prompts.append(prompt)
            else:
                raise invalid_field(f"prompt[{index}]", "token ids must be in the vocabulary")
        return prompts

    def _plan(self, model: LoadedModel, request: GenerationRequest) -> _Plan:
        engine = model.engine
        prompts = self._prompt_ids(model, request)
        jobs: list[_Job] = []
        for prompt_index, ids in enumerate(prompts):
            max_tokens = request.max_tokens
            if max_tokens is None:
                max_tokens = engine.max_seq_len - len(ids)
                if request.max_tokens_cap is not None:
                    max_tokens = min(max_tokens, request.max_tokens_cap)
                if max_tokens < 1:
                    raise invalid_field(
                        request.prompt_param,
                        f"the prompt has {len(ids)} tokens; the context length is "
                        f"{engine.max_seq_len} tokens",
                    )
            for choice in range(request.n):
                seed = request.seed
                if seed is not None and choice:
                    seed = (seed + choice) % 2**63
                params = SamplingParams(
                    max_tokens=max_tokens,
                    temperature=request.temperature,
                    top_p=request.top_p,
                    top_k=request.top_k,
                    seed=seed,
                    stop=request.stop,
                    ignore_eos=request.ignore_eos,
                )
                try:
                    engine.check(ids, params)
                except InvalidRequest as error:
                    param = request.prompt_param if error.param == "prompt" else error.param
                    raise invalid_field(param, error.message) from None
                jobs.append(_Job(len(jobs), prompt_index, ids, params))
        return _Plan(request, jobs, sum(len(ids) for ids in prompts))

    async def generate(self, body: Any, kind: RequestKind) -> dict[str, Any]:
        """A whole OpenAI chat/completion response for the request ``body``.

        Raises:
            InvalidRequestError, ModelNotFoundError: the request is refused.
        """
        request = parse_request(body, kind)
        model = self._select(request)
        plan = self._plan(model, request)
        shaper = _Shaper(kind, model)
        texts = [""] * len(plan.jobs)
        finishes = ["stop"] * len(plan.jobs)
        completion_tokens = 0
        model.acquire()
        try:
            async with contextlib.aclosing(_merge(model, plan.jobs)) as deltas:
                async for index, delta in deltas:
                    texts[index] += delta.text
                    if delta.finish_reason is not None:
                        finishes[index] = delta.finish_reason
                        completion_tokens += delta.usage.completion_tokens if delta.usage else 0
        finally:
            model.release()
        return shaper.response(texts, finishes, _usage(plan.prompt_tokens, completion_tokens))

    async def generate_stream(
        self, body: Any, kind: RequestKind
    ) -> AsyncGenerator[dict[str, Any], None]:
        """OpenAI chunks for the request ``body``; errors in the request come first."""
        request = parse_request(body, kind)
        model = self._select(request)
        plan = self._plan(model, request)
        shaper = _Shaper(kind, model)
        completion_tokens = 0
        model.acquire()
        try:
            if kind == "chat":
                for job in plan.jobs:
                    yield shaper.chunk(job.index, "", role=True)
            async with contextlib.aclosing(_merge(model, plan.jobs)) as deltas:
                async for index, delta in deltas:
                    if delta.text:
                        yield shaper.chunk(index, delta.text)
                    if delta.finish_reason is not None:
                        completion_tokens += delta.usage.completion_tokens if delta.usage else 0
                        yield shaper.chunk(
                            index, None if kind == "chat" else "", delta.finish_reason
                        )
            if request.include_usage:
                yield shaper.usage_chunk(_usage(plan.prompt_tokens, completion_tokens))
        finally:
            model.release()

    async def chat(self, body: Any) -> dict[str, Any]:
        return await self.generate(body, "chat")

    def chat_stream(self, body: Any) -> AsyncGenerator[dict[str, Any], None]:
        return self.generate_stream(body, "chat")

    async def complete(self, body: Any) -> dict[str, Any]:
        return await self.generate(body, "completion")

    def complete_stream(self, body: Any) -> AsyncGenerator[dict[str, Any], None]:
        return self.generate_stream(body, "completion")


# --------------------------------------------------------------------------- embeddings


class EmbeddingService:
    """OpenAI ``/v1/embeddings`` over an :class:`EmbeddingEngine`."""

    def __init__(self, engine: EmbeddingEngine) -> None:
        self.engine = engine

    async def embed(self, body: Any) -> dict[str, Any]:
        """The OpenAI embeddings response for ``body`` (``input``, ``model``, ``input_type``,
        ``encoding_format``, ``dimensions``).

        Raises:
            InvalidRequestError, ModelNotFoundError: the request is refused.
        """
        if not isinstance(body, dict):
            raise InvalidRequestError("the request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != self.engine.model_name:
            raise ModelNotFoundError(
                f"embedding model {model!r} is not served here; available: {self.engine.model_name}"
            )
        texts: Any = body.get("input")
        if isinstance(texts, str):
            texts = [texts]
        input_type: Any = body.get("input_type") or "query"
        if input_type == "document":
            input_type = "passage"
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise invalid_field("encoding_format", "must be 'float' or 'base64'")
        dimensions = body.get("dimensions")
        if dimensions is not None and dimensions != self.engine.dim:
            raise invalid_field("dimensions", f"this model only gives {self.engine.dim} dimensions")
        try:
            result = await asyncio.to_thread(self.engine.embed_with_usage, texts, input_type)
        except EmbeddingInputError as error:
            raise invalid_field(error.param, error.message) from None
        data = []
        for index, vector in enumerate(result.vectors):
            embedding: list[float] | str = vector
            if encoding == "base64":
                raw = np.asarray(vector, dtype=np.float32).tobytes()
                embedding = base64.b64encode(raw).decode()
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        return {
            "object": "list",
            "data": data,
            "model": self.engine.model_name,
            "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
        }


# --------------------------------------------------------------------------- HTTP


def _sse(item: dict[str, Any] | str) -> bytes:
    payload = item if isinstance(item, str) else json.dumps(item, ensure_ascii=False)
    return f"data: {payload}\n\n".encode()


def _error_body(error: BaseException) -> tuple[int, dict[str, Any]]:
    if isinstance(error, OpenAIError):
        return error.status, error.to_dict()
    log.error("request failed", error=f"{type(error).__name__}: {error}")
    message = f"internal error ({type(error).__name__})"
    return 500, {"error": {"message": message, "type": "server_error", "param": None, "code": None}}


Route = tuple[str, str]
"""(deployment method, its streaming variant or '')."""


class HttpFrontend:
    """Routes OpenAI HTTP requests to the chat and embeddings deployments' handles.

    Every route needs a mesh service identity (``Authorization: Bearer <token>``, see
    :mod:`shared.service_auth`): generation and ``/v1/models`` the router's, embeddings the
    router's or the retrieval service's; 401 without a known token, 403 for another service.
    """

    ROUTES: ClassVar[dict[str, Route]] = {
        "/v1/chat/completions": ("chat", "chat_stream"),
        "/v1/completions": ("complete", "complete_stream"),
        "/v1/embeddings": ("embed", ""),
    }
    CALLERS: ClassVar[dict[str, frozenset[str]]] = {
        "/v1/embeddings": frozenset({"router", "retrieval"}),
    }
    DEFAULT_CALLERS: ClassVar[frozenset[str]] = frozenset({"router"})

    def __init__(
        self,
        chat: DeploymentHandle[Any],
        embeddings: DeploymentHandle[Any] | None,
        guard: ServiceGuard,
    ) -> None:
        self.chat = chat
        self.embeddings = embeddings
        self.guard = guard

    async def handle(self, request: Request) -> Response:
        """The response to one HTTP request; errors become OpenAI error bodies."""
        try:
            return await self._dispatch(request)
        except Exception as error:
            status, payload = _error_body(error)
            return JSONResponse(payload, status_code=status)

    async def _dispatch(self, request: Request) -> Response:
        path = request.scope["path"]
        root = request.scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :] or "/"
        path = "/" + path.strip("/")
        self.guard.check(request.headers, self.CALLERS.get(path, self.DEFAULT_CALLERS))
        if request.method == "GET" and path == "/v1/models":
            return JSONResponse(await self.chat.models.remote())
        route = self.ROUTES.get(path)
        if route is None:
            raise RouteNotFoundError(f"no route {request.method} {path}")
        if request.method != "POST":
            raise InvalidRequestError(f"{path} takes POST")
        try:
            body = json.loads(await request.body())
        except ValueError as error:
            raise InvalidRequestError(f"the body is not valid JSON ({error})") from None
        method, stream_method = route
        target = self.chat if method != "embed" else self.embeddings
        if target is None:
            raise ModelNotFoundError("no embedding model is deployed")
        if stream_method and isinstance(body, dict) and body.get("stream") is True:
            return await self._stream(getattr(target.options(stream=True), stream_method), body)
        return JSONResponse(await getattr(target, method).remote(body))

    async def _stream(self, method: Any, body: dict[str, Any]) -> Response:
        chunks = method.remote(body)
        try:
            first = await chunks.__anext__()  # request errors become a plain JSON error
        except StopAsyncIteration:
            first = None

        async def events() -> AsyncIterator[bytes]:
            finished = False
            try:
                if first is not None:
                    yield _sse(first)
                    async for chunk in chunks:
                        yield _sse(chunk)
                finished = True
            except Exception as error:
                finished = True
                yield _sse(_error_body(error)[1])
            finally:
                if not finished:
                    chunks.cancel()  # the client went away
            yield _sse("[DONE]")

        return StreamingResponse(
            events(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )


# --------------------------------------------------------------------------- deployments


@serve.deployment
class ChatDeployment:
    """A replica serving one model version; see :class:`ChatService`."""

    def __init__(self, settings: InferenceSettings) -> None:
        if settings.torch_threads:
            import torch

            torch.set_num_threads(settings.torch_threads)
        self._service = ChatService(
            ModelRegistry(settings.registry_dir),
            settings.model_name,
            settings.engine.engine_settings(),
            settings.quant,
            drain_timeout_s=settings.serve.reload_drain_timeout_s,
        )
        self._service.load_now(settings.model_version)

    async def reconfigure(self, user_config: dict[str, Any] | None) -> None:
        """Serve's ``user_config``: ``{"model_version": "..."}`` (null: the latest)."""
        await self._service.switch((user_config or {}).get("model_version"))

    async def reload(self, version: str | None = None) -> dict[str, Any]:
        """Switch this replica to ``version`` (None: the latest); returns ``status()``."""
        return await self._service.switch(version)

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

    async def chat_stream(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        async with contextlib.aclosing(self._service.chat_stream(request)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def complete(self, request: dict[str, Any]) -> dict[str, Any]:
        return await self._service.complete(request)

    async def complete_stream(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
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


@serve.deployment
class OpenAIIngress:
    """The HTTP routes on Ray's proxy; see :class:`HttpFrontend`.

    Each call is a SERVER span continuing the caller's trace (``traceparent``), exported
    like every service's spans to the telemetry topic when a broker is reachable.
    """

    def __init__(
        self,
        chat: DeploymentHandle[Any],
        embeddings: DeploymentHandle[Any] | None,
        settings: InferenceSettings | None = None,
        guard: ServiceGuard | None = None,
    ) -> None:
        # no guard given: one of no caller, so every request is refused (never open)
        self._frontend = HttpFrontend(chat, embeddings, guard or ServiceGuard({}))
        self._settings = settings
        self._telemetry_task: asyncio.Task[None] | None = None

    async def __call__(self, request: Request) -> Response:
        from opentelemetry import propagate, trace

        if self._telemetry_task is None and self._settings is not None:
            self._telemetry_task = asyncio.create_task(_export_spans(self._settings))
        if self._telemetry_task is not None and not self._telemetry_task.done():
            # the first call waits (briefly) so that its own span is exported too
            await asyncio.wait({self._telemetry_task}, timeout=5)
        with trace.get_tracer("meshllm.inference").start_as_current_span(
            f"{request.method} {request.url.path}",
            context=propagate.extract(dict(request.headers)),
            kind=trace.SpanKind.SERVER,
        ):
            return await self._frontend.handle(request)


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


def build_app(settings: InferenceSettings) -> serve.Application:
    """The Serve application: the ingress, bound to the chat and embeddings deployments."""
    settings = settings.model_copy(update={"model_dir": settings.registry_dir.resolve()})
    s = settings.serve
    common: dict[str, Any] = {
        "health_check_period_s": s.health_check_period_s,
        "health_check_timeout_s": s.health_check_timeout_s,
        "graceful_shutdown_timeout_s": s.graceful_shutdown_timeout_s,
        "logging_config": {"enable_access_log": s.access_log},
    }
    chat = ChatDeployment.options(  # type: ignore[attr-defined]
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
    ).bind(settings)
    embeddings = None
    if s.embeddings_replicas:
        embeddings = EmbeddingsDeployment.options(  # type: ignore[attr-defined]
            **common,
            name=EMBEDDINGS_DEPLOYMENT,
            num_replicas=s.embeddings_replicas,
            max_ongoing_requests=s.embeddings_max_ongoing_requests,
            ray_actor_options={"num_cpus": s.embeddings_num_cpus},
        ).bind(settings)
    app: serve.Application = OpenAIIngress.options(  # type: ignore[attr-defined]
        **common,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=max(s.chat_max_ongoing_requests * 4, 256),
    ).bind(chat, embeddings, settings, inference_guard(settings))
    return app


def inference_guard(settings: InferenceSettings) -> ServiceGuard:
    """The callers the HTTP front accepts, read here (in the driver) so that replicas on
    other nodes need no token files: they get only the callers' token digests."""
    callers = set(HttpFrontend.DEFAULT_CALLERS).union(*HttpFrontend.CALLERS.values())
    return ServiceGuard.load(settings, callers)


__all__ = [
    "CHAT_DEPLOYMENT",
    "EMBEDDINGS_DEPLOYMENT",
    "ChatDeployment",
    "ChatService",
    "EmbeddingService",
    "EmbeddingsDeployment",
    "GenerationRequest",
    "HttpFrontend",
    "InvalidRequestError",
    "ModelNotFoundError",
    "OpenAIError",
    "OpenAIIngress",
    "ServiceUnavailableError",
    "app_builder",
    "build_app",
    "parse_request",
]


def app_builder(args: dict[str, Any]) -> serve.Application:
    """For declarative Serve configs (``import_path: services.inference.serve_app:app_builder``):
    the settings come from the environment, with ``args`` overriding them."""
    from shared.settings import load_settings

    return build_app(load_settings(InferenceSettings, **args))
