"""The bus's metrics: records sent and handled, handler time, dead letters, consumer lag.

Semantic-convention names for messaging where they exist (``messaging.process.duration``,
``messaging.client.sent.messages``, ``messaging.client.consumed.messages``), ``meshllm.bus.*``
for the rest. Labels are topic and group names, which the code fixes, so their number
is bounded.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

from opentelemetry.metrics import CallbackOptions, Observation

from shared.instruments import get_meter
from shared.metrics import histogram

SYSTEM = {"messaging.system": "kafka"}

_meter = get_meter("meshllm.bus")
sent = _meter.create_counter(
    "messaging.client.sent.messages",
    unit="{message}",
    description="Records the broker acknowledged (error.type set when it did not)",
)
consumed = _meter.create_counter(
    "messaging.client.consumed.messages",
    unit="{message}",
    description="Records taken off a topic, by outcome (handled, duplicate, dead_letter)",
)
process_duration = histogram(
    _meter,
    "messaging.process.duration",
    unit="s",
    description="Handler time per record (its last attempt; error.type when it failed)",
)
dead_letters = _meter.create_counter(
    "meshllm.bus.dead_letters",
    unit="{message}",
    description="Records sent to a dead-letter topic, by topic and reason",
)


class _Lagging(Protocol):
    group: str

    @property
    def lag(self) -> dict[Any, int]: ...


_subscribers: weakref.WeakSet[Any] = weakref.WeakSet()


def watch_lag(subscriber: _Lagging) -> None:
    """Report ``subscriber.lag`` ({TopicPartition: records behind}) while it lives."""
    _subscribers.add(subscriber)


def _observe_lag(options: CallbackOptions) -> Iterator[Observation]:
    for subscriber in list(_subscribers):
        by_topic: dict[str, int] = {}
        for tp, behind in list(subscriber.lag.items()):
            by_topic[tp.topic] = by_topic.get(tp.topic, 0) + behind
        for topic, behind in by_topic.items():
            yield Observation(
                behind,
                {
                    **SYSTEM,
                    "messaging.destination.name": topic,
                    "messaging.consumer.group.name": subscriber.group,
                },
            )


_meter.create_observable_gauge(
    "meshllm.bus.consumer.lag",
    callbacks=[_observe_lag],
    unit="{message}",
    description="Records behind the partition's end at this member's last commit, per topic",
)


def attributes(topic: str, **more: str) -> dict[str, str]:
    return {**SYSTEM, "messaging.destination.name": topic, **more}


def lag_of(ends: Iterable[tuple[Any, int | None, int]]) -> dict[Any, int]:
    """{partition: records behind} from (partition, its high watermark, next offset)."""
    return {tp: max(0, (end or offset) - offset) for tp, end, offset in ends}
