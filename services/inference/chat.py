"""OpenAI chat and completion requests over a loaded model, without Ray: validation, the
jobs one request makes (``n`` choices, several prompts; their streams are merged by
:mod:`.merging`), OpenAI chunks and usage, and the versions served: switching in place,
and a candidate beside the current one during a release (:class:`ChatService`)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.inference.generation import EngineSettings, InvalidRequest, SamplingParams
from services.inference.loading import LoadedModel, load_model
from services.inference.merging import Job, merge, paced
from services.inference.model.gguf_model import ModelLoadError
from services.inference.registry import ModelEntry, ModelRegistry, UnknownModel
from shared.logging import get_logger
from shared.openai_protocol import (
    GenerationRequest,
    ModelNotFoundError,
    RequestKind,
    ServiceUnavailableError,
    invalid_field,
    parse_request,
)
from shared.openai_shapes import OpenAIShapes

log = get_logger(__name__)

# --------------------------------------------------------------------------- responses


@dataclass
class _Plan:
    request: GenerationRequest
    jobs: list[Job]
    prompt_tokens: int


def _shapes(kind: RequestKind, model: LoadedModel) -> OpenAIShapes:
    return OpenAIShapes(kind, uuid.uuid4().hex, model.model_id, model.fingerprint)


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _same(model: LoadedModel, entry: ModelEntry) -> bool:
    return (model.entry.version, model.entry.sha256) == (entry.version, entry.sha256)


class ChatService:
    """Serves one model name from a registry, OpenAI-style: its current version (what a
    request naming no version gets) and, during a release, versions alongside it (a
    candidate, asked for by ``name:version``; :meth:`serve_alongside`).

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
        stream_interval_s: float = 0.0,
        max_alongside: int = 1,
    ) -> None:
        """``max_alongside``: versions served besides the current one at most (each holds
        its own engine, so its weights and KV cache, in memory)."""
        self.registry = registry
        self.max_alongside = max_alongside
        self._alongside: dict[str, LoadedModel] = {}
        self.stream_interval_s = stream_interval_s
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
        requests have finished (in the background; see ``status()["retiring"]``). A version
        served alongside is promoted as it is: its engine becomes the current one.

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
            if old is not None and _same(old, entry):
                return self.status()
            beside = self._alongside.get(entry.version)
            if beside is not None and _same(beside, entry):  # promoted: no load, no pause
                new = self._alongside.pop(entry.version)
            else:
                new = await asyncio.to_thread(
                    load_model, entry, self.engine_settings, self.quant, verify=self.verify
                )
                if beside is not None:  # another file under that version name since
                    self._start_retiring(self._alongside.pop(entry.version))
            self._current = new
            log.info(
                "model switched",
                model=new.model_id,
                previous=old.model_id if old else None,
                draining=old.in_flight if old else 0,
            )
            if old is not None:
                self._start_retiring(old)
            return self.status()

    async def serve_alongside(self, versions: list[str]) -> dict[str, Any]:
        """Serve exactly ``versions`` besides the current one, from now on: load those not
        served yet (while everything keeps serving), retire the others once their
        requests have finished. The current version in the list is ignored.

        Raises:
            ModelNotFoundError: a version is not in the registry (nothing changes).
            ModelLoadError: a file is corrupt or unusable (nothing changes).
            InvalidRequestError: more versions than ``max_alongside``.
        """
        async with self._switch_lock:
            current = self.current.entry.version
            wanted = list(dict.fromkeys(v for v in versions if v != current))
            if len(wanted) > self.max_alongside:
                raise invalid_field(
                    "alongside",
                    f"{len(wanted)} versions asked for; at most {self.max_alongside} are "
                    "served beside the current one",
                )
            entries = {}
            for version in wanted:
                try:
                    entries[version] = self.registry.resolve(self.model_name, version)
                except UnknownModel as error:
                    raise ModelNotFoundError(error.message) from None
            loaded: dict[str, LoadedModel] = {}
            try:
                for version, entry in entries.items():
                    present = self._alongside.get(version)
                    if present is None or not _same(present, entry):
                        loaded[version] = await asyncio.to_thread(
                            load_model, entry, self.engine_settings, self.quant, verify=self.verify
                        )
            except BaseException:  # a load failed or the call was cancelled: undo the rest
                for model in loaded.values():
                    model.engine.stop()
                raise
            retired = [v for v in self._alongside if v not in entries or v in loaded]
            for version in retired:
                self._start_retiring(self._alongside.pop(version))
            self._alongside.update(loaded)
            if loaded or retired:
                log.info("versions alongside", model=self.model_name, versions=wanted)
            return self.status()

    async def drop_alongside(self, version: str) -> bool:
        """Stop serving ``version`` beside the current one (after its requests); whether it
        was served there."""
        async with self._switch_lock:
            model = self._alongside.pop(version, None)
            if model is None:
                return False
            self._start_retiring(model)
            log.info("version dropped", model=model.model_id)
            return True

    def _start_retiring(self, old: LoadedModel) -> None:
        self._retiring.add(old)
        task = asyncio.create_task(self._retire(old), name=f"retire {old.model_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

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
            "threads": self.engine_settings.threads,
            "in_flight": current.in_flight,
            "active": current.engine.active,
            "waiting": current.engine.waiting,
            "engine": dataclasses.asdict(current.engine.stats()),
            "alongside": [
                {"model": m.model_id, "version": v, "in_flight": m.in_flight}
                for v, m in sorted(self._alongside.items())
            ],
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
        ids += [model.model_id for _, model in sorted(self._alongside.items())]
        return {
            "object": "list",
            "data": [
                {"id": i, "object": "model", "created": created, "owned_by": "meshllm"} for i in ids
            ],
        }

    def stuck(self) -> str | None:
        """Why an engine is unhealthy (stuck, or its thread died); None when all are fine.

        Only the current engine's counts. A stuck engine served alongside or retiring is
        stopped instead (its callers get an error): it must not take the replica, and
        production, down with it.
        Called from the replica's event loop.
        """
        for model in [*self._alongside.values(), *self._retiring]:
            reason = model.engine.stuck()
            if reason is not None:
                log.error("stopping a stuck engine", model=model.model_id, reason=reason)
                self._alongside = {v: m for v, m in self._alongside.items() if m is not model}
                self._retiring.discard(model)
                task = asyncio.get_running_loop().create_task(
                    asyncio.to_thread(model.engine.stop), name=f"stop {model.model_id}"
                )
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        reason = self.current.engine.stuck()
        return f"{self.current.model_id}: {reason}" if reason is not None else None

    def close(self) -> None:
        """Stop every engine now (the replica is going away)."""
        for model in [self._current, *self._alongside.values(), *self._retiring]:
            if model is not None:
                model.engine.stop()
        self._alongside.clear()
        self._retiring.clear()

    # ------------------------------------------------------------- requests

    def _select(self, request: GenerationRequest) -> LoadedModel:
        current = self.current
        if request.model is not None and request.model != self.model_name:
            available = ", ".join([self.model_name, current.model_id])
            raise ModelNotFoundError(
                f"model {request.model!r} is not served here; available: {available}"
            )
        if request.version is None or request.version == current.entry.version:
            return current
        beside = self._alongside.get(request.version)
        if beside is not None:
            return beside
        try:
            self.registry.resolve(self.model_name, request.version)
        except UnknownModel as error:
            raise ModelNotFoundError(error.message) from None
        served = ", ".join([current.model_id, *(m.model_id for m in self._alongside.values())])
        raise ModelNotFoundError(
            f"version {request.version!r} of {self.model_name!r} is registered but not "
            f"served now; served: {served}"
        )

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
        jobs: list[Job] = []
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
                jobs.append(Job(len(jobs), prompt_index, ids, params))
        return _Plan(request, jobs, sum(len(ids) for ids in prompts))

    async def generate(self, body: Any, kind: RequestKind) -> dict[str, Any]:
        """A whole OpenAI chat/completion response for the request ``body``.

        Raises:
            InvalidRequestError, ModelNotFoundError: the request is refused.
        """
        request = parse_request(body, kind)
        model = self._select(request)
        plan = self._plan(model, request)
        shaper = _shapes(kind, model)
        texts = [""] * len(plan.jobs)
        finishes = ["stop"] * len(plan.jobs)
        completion_tokens = 0
        model.acquire()
        try:
            async with contextlib.aclosing(merge(model, plan.jobs)) as deltas:
                async for index, delta in deltas:
                    texts[index] += delta.text
                    if delta.finish_reason is not None:
                        finishes[index] = delta.finish_reason
                        completion_tokens += delta.usage.completion_tokens if delta.usage else 0
        finally:
            model.release()
        choices = [
            (i, text, finish) for i, (text, finish) in enumerate(zip(texts, finishes, strict=True))
        ]
        return shaper.response(choices, _usage(plan.prompt_tokens, completion_tokens))

    async def generate_stream(
        self, body: Any, kind: RequestKind
    ) -> AsyncGenerator[dict[str, Any], None]:
        """OpenAI chunks for the request ``body``; errors in the request come first."""
        request = parse_request(body, kind)
        model = self._select(request)
        plan = self._plan(model, request)
        shaper = _shapes(kind, model)
        completion_tokens = 0
        model.acquire()
        try:
            if kind == "chat":
                for job in plan.jobs:
                    yield shaper.chunk(job.index, "", role=True)
            async with (
                contextlib.aclosing(merge(model, plan.jobs)) as merged,
                contextlib.aclosing(paced(merged, self.stream_interval_s)) as deltas,
            ):
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
