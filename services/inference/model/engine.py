"""The CPU engine: continuous batching over a slot KV cache, streaming, cancellation.

One worker thread owns the model. :meth:`Engine.launch` builds the model on that thread
too, so one thread runs all of torch's parallel work: a second OpenMP thread team, left
behind by a thread that only loaded the weights, made every decode step ~40% slower
(measured: int8 batch-1 step 17 ms when loaded and run on one thread, 24-28 ms when
loaded on another). Requests wait in a queue; at every token
boundary the worker admits waiting requests into free slots (prefilling each
prompt), then runs one decode step for every active sequence together. A sequence
leaves its slot the moment it finishes or its caller goes away, and the next
waiting request takes the slot at the following boundary.

Dynamic batching limits (settings): ``max_batch`` sequences at once; an idle engine
waits ``max_wait_ms`` for companions before starting; admission stops while the
prompt + max_tokens of active sequences would exceed ``max_tokens_in_flight``.
"""

from __future__ import annotations

import asyncio
import collections
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import torch

from services.inference.engine_protocol import EngineStats
from services.inference.generation import (
    Completion,
    Delta,
    EngineSettings,
    InvalidRequest,
    SamplingParams,
    TextAssembler,
    Usage,
)
from services.inference.model.llama import KVCache, Llama
from services.inference.model.prefix_cache import PrefixCache
from services.inference.model.quant import HEAD_REFINE_TOP
from services.inference.model.sampling import Sampler
from services.inference.model.tokenizer import Tokenizer
from shared.logging import get_logger

log = get_logger(__name__)


def _use_threads(threads: int) -> None:
    """Give torch ``threads`` threads on the calling thread (0: leave torch's setting).

    Set on the worker thread itself: OpenMP keeps the thread count per thread, and a Ray
    worker starts with OMP_NUM_THREADS set to its reserved CPUs (often 1).
    """
    if threads and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@dataclass(eq=False)
class _Sequence:
    prompt: list[int]
    params: SamplingParams
    sampler: Sampler
    text: TextAssembler
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Delta | BaseException]
    slot: int = -1
    generated: int = 0
    last_token: int = -1
    cancelled: bool = False
    done: bool = False
    enqueued_at: float = field(default_factory=time.monotonic)

    @property
    def budget(self) -> int:
        return len(self.prompt) + self.params.max_tokens

    def send(self, item: Delta | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class Engine:
    def __init__(self, model: Llama, tokenizer: Tokenizer, settings: EngineSettings) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.max_seq_len = min(settings.max_seq_len, model.config.context_length)
        self._cache: KVCache = model.new_cache(settings.max_batch, self.max_seq_len)
        self._free = list(range(settings.max_batch - 1, -1, -1))
        self.prefix_cache = PrefixCache(
            int(settings.prefix_cache_mb * 2**20), settings.prefix_block
        )
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._active: list[_Sequence] = []
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.last_step_at = time.monotonic()
        self.steps = 0
        self.busy_s = 0.0
        self.generated_tokens = 0
        self.prompt_tokens = 0
        self.threads = 0  # torch threads of the worker thread, once it runs

    @classmethod
    def launch(
        cls, build: Callable[[], Llama], tokenizer: Tokenizer, settings: EngineSettings
    ) -> Engine:
        """Build the model with ``build`` on a new worker thread and run the engine there.

        Blocks until the model is built and the cache allocated; raises what ``build``
        raised. The engine is running when this returns (``start`` does nothing more).
        """
        ready: queue.Queue[Engine | BaseException] = queue.Queue(maxsize=1)

        def main() -> None:
            try:
                _use_threads(settings.threads)
                engine = cls(build(), tokenizer, settings)
            except BaseException as error:
                ready.put(error)
                return
            engine._thread = threading.current_thread()
            ready.put(engine)
            engine._run()

        threading.Thread(target=main, name="engine", daemon=True).start()
        result = ready.get()
        if isinstance(result, BaseException):
            raise result
        return result

    # ----------------------------------------------------------------- caller side

    def start(self) -> None:
        if self._thread is not None:
            return  # launched: already running on the thread that built it
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    @property
    def active(self) -> int:
        return len(self._active)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def stuck(self) -> str | None:
        """A reason when there is work but no step has finished for ``stuck_after_s``."""
        if self._thread is None or not self._thread.is_alive():
            return "engine thread is not running"
        idle = time.monotonic() - self.last_step_at
        if (self._active or self._waiting) and idle > self.settings.stuck_after_s:
            return f"no step for {idle:.0f}s with {self.active} active, {self.waiting} waiting"
        return None

    def stats(self) -> EngineStats:
        prefix = self.prefix_cache.stats
        return EngineStats(
            generated_tokens=self.generated_tokens,
            prompt_tokens=self.prompt_tokens,
            steps=self.steps,
            busy_s=self.busy_s,
            kv_used_tokens=sum(self._cache.lengths),
            kv_capacity_tokens=len(self._cache.lengths) * self.max_seq_len,
            prefix_lookups=prefix.lookups,
            prefix_hits=prefix.hits,
            prefix_reused_tokens=prefix.reused_tokens,
        )

    def check(self, prompt: Sequence[int], params: SamplingParams) -> None:
        """Raise :class:`InvalidRequest` if this request can never run."""
        params.validate(self.max_seq_len - 1)
        if not prompt:
            raise InvalidRequest("prompt", "is empty")
        if len(prompt) + params.max_tokens > self.max_seq_len:
            raise InvalidRequest(
                "max_tokens" if len(prompt) < self.max_seq_len else "prompt",
                f"the prompt has {len(prompt)} tokens; with max_tokens {params.max_tokens} "
                f"it exceeds the context length of {self.max_seq_len} tokens",
            )

    async def stream(self, prompt: Sequence[int], params: SamplingParams) -> AsyncIterator[Delta]:
        """Generate for ``prompt`` token ids, yielding text as it is produced.

        Each delta holds every token produced since the previous one was taken: one token
        when the caller keeps up, several (never waiting for more) when it does not.

        Leaving the iteration early (the caller went away) cancels the sequence and
        frees its slot at the next token boundary.
        """
        self.check(prompt, params)
        sequence = _Sequence(
            prompt=list(prompt),
            params=params,
            sampler=Sampler(params),
            text=TextAssembler(self.tokenizer, params.stop),
            loop=asyncio.get_running_loop(),
            queue=asyncio.Queue(),
        )
        with self._wake:
            self._waiting.append(sequence)
            self._wake.notify()
        held: Delta | BaseException | None = None  # taken from the queue, not sent yet
        try:
            while True:
                item = held if held is not None else await sequence.queue.get()
                held = None
                if isinstance(item, BaseException):
                    raise item
                # every token already produced goes out now, as one delta: a consumer slower
                # than the engine catches up in one step instead of one per token
                ready = [item]
                while ready[-1].finish_reason is None and not sequence.queue.empty():
                    following = sequence.queue.get_nowait()
                    if isinstance(following, BaseException):
                        held = following
                        break
                    ready.append(following)
                delta = Delta.joined(ready)
                yield delta
                if delta.finish_reason is not None:
                    return
        finally:
            if not sequence.done:
                sequence.cancelled = True
                with self._wake:
                    self._wake.notify()

    async def complete(self, prompt: Sequence[int], params: SamplingParams) -> Completion:
        parts: list[str] = []
        ids: list[int] = []
        async for delta in self.stream(prompt, params):
            parts.append(delta.text)
            ids.extend(delta.token_ids)
            if delta.finish_reason is not None and delta.usage is not None:
                return Completion("".join(parts), tuple(ids), delta.finish_reason, delta.usage)
        raise RuntimeError("generation ended without a final delta")

    # ----------------------------------------------------------------- worker side

    def _run(self) -> None:
        _use_threads(self.settings.threads)
        self.threads = torch.get_num_threads()
        while True:
            with self._wake:
                while not (self._stopping or self._waiting or self._active):
                    self._wake.wait()
                if self._stopping:
                    break
            if not self._active and self.settings.max_wait_ms > 0:
                time.sleep(self.settings.max_wait_ms / 1000)  # let a batch gather
            started = time.monotonic()
            try:
                self._drop_cancelled()
                self._admit()
                if self._active:
                    self._decode()
                    if self.settings.fault_step_delay_ms:  # a drill's slow engine
                        time.sleep(self.settings.fault_step_delay_ms / 1000)
            except Exception as error:  # a bug must fail its requests, not hang them
                log.exception("engine step failed")
                for sequence in [*self._active]:
                    sequence.send(error)
                    self._finish(sequence)
            self.last_step_at = time.monotonic()
            self.busy_s += self.last_step_at - started
            self.steps += 1
        for sequence in [*self._active, *self._waiting]:
            sequence.send(RuntimeError("engine stopped"))

    def _drop_cancelled(self) -> None:
        for sequence in [s for s in self._active if s.cancelled]:
            self._finish(sequence)
        with self._wake:
            self._waiting = collections.deque(s for s in self._waiting if not s.cancelled)

    def _admit(self) -> None:
        in_flight = sum(s.budget for s in self._active)
        while self._free:
            with self._wake:
                if not self._waiting:
                    return
                candidate = self._waiting[0]
                if (
                    self._active
                    and in_flight + candidate.budget > self.settings.max_tokens_in_flight
                ):
                    return
                self._waiting.popleft()
            candidate.slot = self._free.pop()
            in_flight += candidate.budget
            self._active.append(candidate)
            self._emit(candidate, candidate.sampler.pick(self._prefill(candidate)))

    def _prefill(self, sequence: _Sequence) -> torch.Tensor:
        """Run the prompt not found in the prefix cache; return the last position's logits.

        The prompt runs in chunks aligned to the cache's blocks, so every block's keys and
        values come from the same computation (same shapes, same rounding) whether it was
        prefilled here, in another prompt sharing the prefix, or taken from the cache:
        output does not depend on what the cache held.
        """
        slot, prompt, block = sequence.slot, sequence.prompt, self.prefix_cache.block
        position = self.prefix_cache.load(prompt, self._cache, slot)
        self.prompt_tokens += len(prompt) - position
        logits = torch.empty(0)
        while position < len(prompt):
            end = min(len(prompt), (position // block + 1) * block)
            logits = self.model.forward(
                torch.tensor([prompt[position:end]]),
                [slot],
                self._cache,
                best_only=self._best_only([sequence]),
            )
            position = end
        self.prefix_cache.store(prompt, self._cache, slot)
        return logits[0]

    def _decode(self) -> None:
        batch = list(self._active)
        tokens = torch.tensor([[s.last_token] for s in batch])
        logits = self.model.forward(
            tokens, [s.slot for s in batch], self._cache, best_only=self._best_only(batch)
        )
        for row, sequence in enumerate(batch):
            self._emit(sequence, sequence.sampler.pick(logits[row]))

    @staticmethod
    def _best_only(batch: Sequence[_Sequence]) -> bool:
        """Whether every sequence of ``batch`` picks among the head's best tokens only."""
        return all(s.params.needs_only_best(HEAD_REFINE_TOP) for s in batch)

    def _emit(self, sequence: _Sequence, token: int) -> None:
        sequence.generated += 1
        self.generated_tokens += 1
        sequence.last_token = token
        finish: str | None = None
        text = ""
        end_of_text = token == self.tokenizer.eos_id and not sequence.params.ignore_eos
        if end_of_text:
            finish = "stop"
            text = sequence.text.flush()
        else:
            text, stopped = sequence.text.add(token)
            if stopped:
                finish = "stop"
            elif sequence.generated >= sequence.params.max_tokens:
                finish = "length"
                text += sequence.text.flush()
        ids = () if end_of_text else (token,)
        if finish is None:
            sequence.send(Delta(text, ids))
            return
        usage = Usage(len(sequence.prompt), sequence.generated)
        sequence.send(Delta(text, ids, finish, usage))
        self._finish(sequence)

    def _finish(self, sequence: _Sequence) -> None:
        sequence.done = True
        if sequence in self._active:
            self._active.remove(sequence)
            self._cache.lengths[sequence.slot] = 0
            self._free.append(sequence.slot)
