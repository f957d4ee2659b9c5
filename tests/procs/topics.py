"""Topics that tests create for themselves, so tests never share partitions."""

from __future__ import annotations

from shared.events.v1 import events_pb2 as ev
from shared.topics import HOUR_MS, Topic


def scratch_topic(name: str, partitions: int = 3) -> Topic:
    return Topic(
        name=name,
        messages=(ev.FeedbackEvent,),
        key="request_id",
        partitions=partitions,
        retention_ms=HOUR_MS,
        producers=("tests",),
        consumers=("tests",),
        description="test topic",
    )
