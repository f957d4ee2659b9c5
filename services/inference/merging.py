"""The sequences one OpenAI request makes (``n`` choices of each prompt) and their token
streams merged into one, tagged by choice; pacing of the merged stream."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import cast

from services.inference.engine_protocol import TextEngine
from services.inference.generation import Delta, SamplingParams
from services.inference.loading import LoadedModel


@dataclass(frozen=True)
class Job:
    """One sequence to generate: choice ``index`` of prompt ``prompt_index``."""

    index: int
    prompt_index: int
    ids: tuple[int, ...]
    params: SamplingParams


def _stream(engine: TextEngine, job: Job) -> AsyncGenerator[Delta, None]:
    # TextEngine.stream is an async generator (typed as an iterator): close it when done.
    return cast(AsyncGenerator[Delta, None], engine.stream(job.ids, job.params))


async def merge(model: LoadedModel, jobs: list[Job]) -> AsyncGenerator[tuple[int, Delta], None]:
    """The deltas of every job as they come, tagged with the job's choice index."""
    engine = model.engine
    if len(jobs) == 1:
        job = jobs[0]
        async with contextlib.aclosing(_stream(engine, job)) as deltas:
            async for delta in deltas:
                yield job.index, delta
        return
    queue: asyncio.Queue[tuple[int, Delta | BaseException | None]] = asyncio.Queue()

    async def pump(job: Job) -> None:
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


async def paced(
    deltas: AsyncIterator[tuple[int, Delta]], interval_s: float
) -> AsyncGenerator[tuple[int, Delta], None]:
    """``deltas`` with each choice's first one at once and the rest gathered, so that a
    choice sends at most one delta per ``interval_s``; a finish goes out at once with what
    was held. Every hop after the replica (HTTP, the router, Kafka, the gateway, the client)
    then pays per chunk, not per token; at 100 ms a reader sees ten updates a second."""
    held: dict[int, list[Delta]] = {}
    sent_at: dict[int, float] = {}
    async for index, delta in deltas:
        waiting = held.setdefault(index, [])
        waiting.append(delta)
        now = time.monotonic()
        last = sent_at.get(index)
        if delta.finish_reason is not None or last is None or now - last >= interval_s:
            yield index, Delta.joined(waiting)
            held[index] = []
            sent_at[index] = now
    for index, waiting in held.items():
        if waiting:
            yield index, Delta.joined(waiting)
