"""The vLLM backend: the torch engine's surface (:class:`TextEngine`) over vLLM, on a GPU.

Selected with ``MESHLLM_ENGINE__BACKEND=vllm``; it needs the ``vllm`` extra and a CUDA
GPU. vLLM loads the registered GGUF file itself (``model=<file>.gguf``) and runs its
quantized weights with its own kernels, so ``MESHLLM_QUANT`` does not apply.

Token ids in, token ids out. vLLM starts without a tokenizer (``skip_tokenizer_init``):
prompts reach it as token ids (``TokensPrompt``) made by the service's own GGUF
tokenizer, as for the torch engine, and the ids it generates become text here, with the
torch engine's :class:`~services.inference.generation.TextAssembler`. So chat templates,
stop strings (never sent, not even in part) and UTF-8 handling behave exactly as on the
CPU pools, and no Hugging Face tokenizer directory has to sit beside the GGUF (vLLM's
documentation calls its own GGUF tokenizer conversion slow and unstable). Without a
tokenizer vLLM does not know the end-of-text token, so it is passed as a stop token id.

One thread runs an event loop that owns the vLLM engine: the engine is created there, so
vLLM's background tasks live on that loop whichever thread loads the model and whichever
loop serves requests. :meth:`VllmEngine.stream` hands each request to that loop and gets
deltas back on the caller's loop. Closing the stream early cancels the request there,
which aborts it in vLLM; a stop string found here aborts it too.

vLLM API used, the same in the V0 ``AsyncLLMEngine`` (0.6+) and the V1 ``AsyncLLM`` that
``AsyncLLMEngine`` names in recent releases: ``AsyncEngineArgs`` (a dataclass),
``AsyncLLMEngine.from_engine_args``, ``generate(prompt, sampling_params, request_id)``
yielding cumulative ``RequestOutput`` objects, ``abort(request_id)``, ``errored``,
``SamplingParams`` and ``TokensPrompt``; then ``model_config`` (V1) or
``get_model_config()`` (V0), and ``shutdown()`` (V1) or ``shutdown_background_loop()`` (V0).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import threading
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Collection, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

from services.inference.engine_protocol import EngineStats, check_request
from services.inference.generation import (
    Completion,
    Delta,
    EngineSettings,
    InvalidRequest,
    SamplingParams,
    TextAssembler,
    Usage,
)
from services.inference.model.gguf_model import ModelLoadError, read_gguf_header
from services.inference.model.tokenizer import Tokenizer
from shared.logging import get_logger

log = get_logger(__name__)

GGUF_PLUGIN_SINCE = (0, 24)
"""vLLM releases from this one read GGUF files only with the ``vllm-gguf-plugin`` package."""

SHUTDOWN_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class VllmEngineSettings(EngineSettings):
    """The common engine limits plus vLLM's own options; these settings select vLLM.

    Of the common limits vLLM takes ``max_batch`` (as ``max_num_seqs``), ``max_seq_len``
    (as ``max_model_len``, capped by the model), ``stuck_after_s``, and ``prefix_cache_mb``
    (0 turns vLLM's prefix caching off). It sizes its KV cache from GPU memory itself, so
    ``max_tokens_in_flight``, ``max_wait_ms`` and ``prefix_block`` do not apply.
    """

    gpu_memory_utilization: float = 0.9
    tensor_parallel_size: int = 1
    dtype: str = "auto"
    enforce_eager: bool = False


def import_vllm() -> ModuleType:
    """The ``vllm`` module.

    Raises:
        ModelLoadError: vLLM is missing (naming the extra to install) or fails to import.
    """
    try:
        import vllm as module
    except ImportError as error:
        raise ModelLoadError(
            f"MESHLLM_ENGINE__BACKEND=vllm needs vLLM, which cannot be imported ({error}): "
            "install the `vllm` extra (pip install 'meshllm[vllm]') on a machine with a CUDA GPU"
        ) from None
    except Exception as error:  # e.g. CUDA libraries that do not match the wheel
        raise ModelLoadError(f"vLLM is installed but fails to import: {error}") from error
    vllm: ModuleType = module
    return vllm


def sampling_kwargs(params: SamplingParams, eos_id: int | None) -> dict[str, Any]:
    """Keywords of vLLM's ``SamplingParams`` for ``params``.

    Stop strings are not among them: they are found here, in the assembled text. The
    end-of-text token is a stop token id unless ``ignore_eos`` (vLLM has no tokenizer to
    know it from), and vLLM is asked for ids only (``detokenize=False``).
    """
    return {
        "n": 1,
        "max_tokens": params.max_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        # -1 turns top-k off in every vLLM release; 0 does only in recent ones
        "top_k": params.top_k if params.top_k > 0 else -1,
        "seed": params.seed,
        "ignore_eos": params.ignore_eos,
        "stop_token_ids": [] if params.ignore_eos or eos_id is None else [eos_id],
        "detokenize": False,
    }


def engine_kwargs(
    model: Path, settings: VllmEngineSettings, max_model_len: int, known: Collection[str]
) -> dict[str, Any]:
    """Keywords of vLLM's ``AsyncEngineArgs``; ``known`` names the fields this release has."""
    kwargs: dict[str, Any] = {
        "model": str(model),
        "skip_tokenizer_init": True,
        "max_model_len": max_model_len,
        "max_num_seqs": settings.max_batch,
        "enable_prefix_caching": settings.prefix_cache_mb > 0,
        "gpu_memory_utilization": settings.gpu_memory_utilization,
        "tensor_parallel_size": settings.tensor_parallel_size,
        "dtype": settings.dtype,
        "enforce_eager": settings.enforce_eager,
    }
    if "disable_log_requests" in known:
        # releases with this field log every request's prompt unless told not to
        kwargs["disable_log_requests"] = True
    return kwargs


class OutputReader:
    """Turns vLLM's cumulative outputs of one request into deltas, as the torch engine does.

    The token that ends a ``"stop"``-finished output is the end-of-text (or another stop)
    token: it is counted in the usage but is not part of the output, and a stop string
    found in the text ends the output where it starts.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_tokens: int, params: SamplingParams) -> None:
        self._text = TextAssembler(tokenizer, params.stop)
        self._prompt_tokens = prompt_tokens
        self._seen = 0
        self.generated = 0
        self.done = False

    def read(self, token_ids: Sequence[int], finish_reason: str | None) -> Delta | None:
        """The delta for the ids past those already read; None when there is nothing new.

        Raises:
            RuntimeError: vLLM ended the request for another reason (it was aborted).
        """
        new = list(token_ids[self._seen :])
        self._seen = len(token_ids)
        end_token = finish_reason == "stop" and bool(new)
        if end_token:
            new.pop()
        parts: list[str] = []
        ids: list[int] = []
        for token in new:
            text, stopped = self._text.add(token)
            parts.append(text)
            ids.append(token)
            self.generated += 1
            if stopped:
                return self._final("stop", parts, ids)
        if finish_reason == "stop":
            self.generated += int(end_token)
            return self._final("stop", [*parts, self._text.flush()], ids)
        if finish_reason == "length":
            return self._final("length", [*parts, self._text.flush()], ids)
        if finish_reason is not None:
            raise RuntimeError(f"vLLM ended the request: {finish_reason}")
        return Delta("".join(parts), tuple(ids)) if ids else None

    def _final(self, reason: str, parts: list[str], ids: list[int]) -> Delta:
        self.done = True
        usage = Usage(self._prompt_tokens, self.generated)
        return Delta("".join(parts), tuple(ids), reason, usage)


@dataclass(eq=False)
class _Request:
    id: str
    started: bool = False  # vLLM has produced output for it
    finished_in_vllm: bool = False  # nothing to abort


class VllmEngine:
    """vLLM's async engine serving one GGUF file, behind the torch engine's surface."""

    def __init__(self, model_path: Path | str, settings: VllmEngineSettings) -> None:
        """Check that vLLM is there and read the file's header; :meth:`start` loads it.

        Raises:
            ModelLoadError: vLLM is not installed (install the ``vllm`` extra on a GPU
                machine), or the file is not a usable GGUF.
        """
        self._vllm = import_vllm()
        self.model_path = Path(model_path)
        header = read_gguf_header(self.model_path)
        self.tokenizer = Tokenizer(header.tokenizer)
        self.settings = settings
        self.max_seq_len = min(settings.max_seq_len, header.config.context_length)
        self.last_output_at = time.monotonic()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._engine: Any = None
        # owned by the engine's loop; the counts are read from other threads
        self._requests: set[asyncio.Task[None]] = set()
        self._active = 0
        self._waiting = 0
        self._generated_tokens = 0
        self._prompt_tokens = 0
        self._stopping = False

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Load the model into vLLM on the engine's own loop thread (blocking: minutes).

        Raises:
            ModelLoadError: vLLM could not load the model.
        """
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="vllm-engine", daemon=True)
        thread.start()
        self._loop, self._thread = loop, thread
        try:
            self._engine = asyncio.run_coroutine_threadsafe(self._create(), loop).result()
        except Exception as error:
            self._close_loop()
            raise ModelLoadError(
                f"{self.model_path}: vLLM could not load the model ({error}){_gguf_plugin_hint()}"
            ) from error
        log.info("vllm engine started", model=str(self.model_path), max_seq_len=self.max_seq_len)

    async def _create(self) -> Any:
        vllm = self._vllm
        known = {f.name for f in dataclasses.fields(vllm.AsyncEngineArgs)}
        args = vllm.AsyncEngineArgs(
            **engine_kwargs(self.model_path, self.settings, self.max_seq_len, known)
        )
        engine = vllm.AsyncLLMEngine.from_engine_args(args)
        config = getattr(engine, "model_config", None)
        if config is None:
            config = await engine.get_model_config()
        self.max_seq_len = int(config.max_model_len)
        return engine

    def stop(self) -> None:
        """Fail the requests in flight, shut vLLM down and end the loop thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return
        self._stopping = True
        try:
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(SHUTDOWN_TIMEOUT_S)
        except Exception:
            log.exception("vllm engine shutdown failed", model=str(self.model_path))
        self._close_loop()

    async def _shutdown(self) -> None:
        requests = list(self._requests)
        for request in requests:
            request.cancel()
        await asyncio.gather(*requests, return_exceptions=True)
        engine, self._engine = self._engine, None
        shutdown = getattr(engine, "shutdown", None) or getattr(
            engine, "shutdown_background_loop", None
        )
        if shutdown is not None:
            shutdown()

    def _close_loop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        if not thread.is_alive():
            loop.close()

    # ----------------------------------------------------------------- state

    @property
    def active(self) -> int:
        return self._active

    @property
    def waiting(self) -> int:
        return self._waiting

    def stats(self) -> EngineStats:
        """Tokens counted as they stream out; vLLM's own step and cache figures are in its
        metrics, not here (0: unknown)."""
        return EngineStats(
            generated_tokens=self._generated_tokens, prompt_tokens=self._prompt_tokens
        )

    def stuck(self) -> str | None:
        """A reason when vLLM died, or has work but produced nothing for ``stuck_after_s``."""
        if self._thread is None or not self._thread.is_alive():
            return "vLLM engine loop is not running"
        if self._engine is not None and self._engine.errored:
            return "vLLM engine has died"
        idle = time.monotonic() - self.last_output_at
        if (self._active or self._waiting) and idle > self.settings.stuck_after_s:
            return (
                f"no vLLM output for {idle:.0f}s with {self.active} active, {self.waiting} waiting"
            )
        return None

    # ----------------------------------------------------------------- requests

    def check(self, prompt: Sequence[int], params: SamplingParams) -> None:
        """Raise :class:`InvalidRequest` if this request can never run."""
        check_request(prompt, params, self.max_seq_len)
        vocab_size = self.tokenizer.vocab_size
        # vLLM does not check ids without a tokenizer; one outside the vocabulary kills a GPU
        if any(not 0 <= token < vocab_size for token in prompt):
            raise InvalidRequest("prompt", "token ids must be in the vocabulary")

    async def stream(
        self, prompt: Sequence[int], params: SamplingParams
    ) -> AsyncGenerator[Delta, None]:
        """Generate for ``prompt`` token ids, yielding text as vLLM produces it.

        Leaving the iteration early (the caller went away) aborts the request in vLLM.
        """
        self.check(prompt, params)
        loop = self._loop
        if loop is None or self._engine is None or self._stopping:
            raise RuntimeError("engine is not running")
        caller = asyncio.get_running_loop()
        queue: asyncio.Queue[Delta | BaseException] = asyncio.Queue()

        def deliver(item: Delta | BaseException) -> None:
            caller.call_soon_threadsafe(queue.put_nowait, item)

        request = asyncio.run_coroutine_threadsafe(
            self._generate(list(prompt), params, deliver), loop
        )
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                self._generated_tokens += len(item.token_ids)
                if item.finish_reason is not None:
                    # the final delta: nothing is left to cancel if the caller stops here
                    finished = True
                    self._prompt_tokens += len(prompt)
                yield item
                if finished:
                    # the request's bookkeeping (active/waiting) settles before the stream ends
                    await asyncio.wrap_future(request)
                    return
        finally:
            if not finished:
                request.cancel()  # the request's task aborts it in vLLM

    async def complete(self, prompt: Sequence[int], params: SamplingParams) -> Completion:
        parts: list[str] = []
        ids: list[int] = []
        final: Delta | None = None
        async with contextlib.aclosing(self.stream(prompt, params)) as deltas:
            async for delta in deltas:  # read to the end, so the request's bookkeeping settles
                parts.append(delta.text)
                ids.extend(delta.token_ids)
                if delta.finish_reason is not None:
                    final = delta
        if final is None or final.finish_reason is None or final.usage is None:
            raise RuntimeError("generation ended without a final delta")
        return Completion("".join(parts), tuple(ids), final.finish_reason, final.usage)

    async def _generate(
        self,
        prompt: list[int],
        params: SamplingParams,
        deliver: Callable[[Delta | BaseException], None],
    ) -> None:
        """One request on the engine's loop: vLLM's outputs become deltas for ``deliver``."""
        if self._stopping or self._engine is None:  # it arrived while the engine stopped
            deliver(RuntimeError("engine stopped"))
            return
        task = asyncio.current_task()
        assert task is not None
        request = _Request(uuid.uuid4().hex)
        self._requests.add(task)
        if not (self._active or self._waiting):
            self.last_output_at = time.monotonic()  # idle time before this request is no stall
        self._waiting += 1
        try:
            await self._relay(request, prompt, params, deliver)
        except asyncio.CancelledError:
            if self._stopping:
                deliver(RuntimeError("engine stopped"))
            raise
        except Exception as error:
            log.warning("vllm request failed", request_id=request.id, error=str(error))
            deliver(error)
        finally:
            if request.started:
                self._active -= 1
            else:
                self._waiting -= 1
            self._requests.discard(task)
            if not request.finished_in_vllm:
                await self._abort(request.id)

    async def _relay(
        self,
        request: _Request,
        prompt: list[int],
        params: SamplingParams,
        deliver: Callable[[Delta | BaseException], None],
    ) -> None:
        """Deliver the deltas of ``request`` until its output ends (vLLM's or a stop string)."""
        reader = OutputReader(self.tokenizer, len(prompt), params)
        outputs = self._engine.generate(
            self._vllm.TokensPrompt(prompt_token_ids=prompt),
            self._vllm.SamplingParams(**sampling_kwargs(params, self.tokenizer.eos_id)),
            request.id,
        )
        async with contextlib.aclosing(outputs):
            async for output in outputs:
                self.last_output_at = time.monotonic()
                if not request.started:
                    request.started = True
                    self._waiting -= 1
                    self._active += 1
                request.finished_in_vllm = bool(output.finished)
                completion = output.outputs[0]
                delta = reader.read(completion.token_ids, completion.finish_reason)
                if delta is not None:
                    deliver(delta)
                if reader.done:
                    return
        raise RuntimeError("vLLM ended the request without a final output")

    async def _abort(self, request_id: str) -> None:
        engine = self._engine
        if engine is None:
            return
        try:
            # shielded: a cancellation arriving now must not leave vLLM generating
            await asyncio.shield(engine.abort(request_id))
        except Exception as error:  # a dead engine cannot abort; its requests are gone anyway
            log.warning("vllm abort failed", request_id=request_id, error=str(error))


def _gguf_plugin_hint() -> str:
    """Why a GGUF may not load: recent vLLM reads it only with a plugin that is missing."""
    try:
        version = metadata.version("vllm")
    except metadata.PackageNotFoundError:
        return ""
    release = tuple(int(part) for part in re.findall(r"\d+", version)[:2])
    if release < GGUF_PLUGIN_SINCE:
        return ""
    try:
        metadata.version("vllm-gguf-plugin")
    except metadata.PackageNotFoundError:
        return f"; vLLM {version} reads GGUF files only with its plugin: install vllm-gguf-plugin"
    return ""
