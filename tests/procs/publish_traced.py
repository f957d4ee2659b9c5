"""Publishes TEST_COUNT events to TEST_TOPIC inside one root span, exporting spans to Kafka.

Prints the root span's trace id, then exits after the spans are flushed.
"""

from __future__ import annotations

import asyncio
import os

from opentelemetry import trace

from shared.bus import Bus
from shared.events.v1 import events_pb2 as ev
from shared.logging import configure_logging
from shared.settings import MeshSettings, load_settings
from shared.telemetry import Telemetry
from tests.procs.topics import scratch_topic


async def main() -> None:
    settings = load_settings(MeshSettings)
    telemetry = Telemetry(settings, "traced-publisher")
    telemetry.install()
    bus = Bus(settings, service="traced-publisher")
    await bus.start()
    telemetry.export_spans_to_kafka(bus.publisher, asyncio.get_running_loop())
    topic = scratch_topic(os.environ["TEST_TOPIC"])
    tracer = trace.get_tracer("tests")
    with tracer.start_as_current_span("client request") as root:
        for i in range(int(os.environ.get("TEST_COUNT", "1"))):
            await bus.publish(topic, ev.FeedbackEvent(request_id=f"req-{i}", rating=1))
        print(format(root.get_span_context().trace_id, "032x"), flush=True)
    await telemetry.flush()
    await bus.stop()
    telemetry.shutdown()


if __name__ == "__main__":
    configure_logging("traced-publisher")
    asyncio.run(main())
