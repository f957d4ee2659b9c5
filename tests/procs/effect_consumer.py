"""A service process for tests: consumes a test topic and records each handled event.

Environment: TEST_TOPIC, TEST_GROUP, TEST_EFFECTS (SQLite file), TEST_DELAY_MS.
Each handled event adds a row (event_id, partition, offset, trace_id) to the file,
so a test can tell exactly what was processed, even after a SIGKILL.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3

from opentelemetry import trace

from shared.bus import Bus, EventContext
from shared.events.v1 import events_pb2 as ev
from shared.health import HealthState
from shared.service import run_service
from shared.settings import MeshSettings
from tests.procs.topics import scratch_topic


async def build(settings: MeshSettings, bus: Bus, health: HealthState) -> None:
    effects = sqlite3.connect(os.environ["TEST_EFFECTS"], isolation_level=None)
    effects.execute(
        "CREATE TABLE IF NOT EXISTS effects "
        "(event_id TEXT, partition INTEGER, offset INTEGER, trace_id TEXT, request_id TEXT)"
    )
    delay = float(os.environ.get("TEST_DELAY_MS", "0")) / 1000

    @bus.subscribe(scratch_topic(os.environ["TEST_TOPIC"]), group=os.environ["TEST_GROUP"])
    async def record(event: ev.FeedbackEvent, ctx: EventContext) -> None:
        if delay:
            await asyncio.sleep(delay)
        trace_id = format(trace.get_current_span().get_span_context().trace_id, "032x")
        effects.execute(
            "INSERT INTO effects VALUES (?, ?, ?, ?, ?)",
            (ctx.envelope.event_id, ctx.partition, ctx.offset, trace_id, event.request_id),
        )


if __name__ == "__main__":
    run_service("effect-consumer", MeshSettings, build)
