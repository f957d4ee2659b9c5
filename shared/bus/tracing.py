"""W3C trace context in Kafka headers, and the producer/consumer spans around them."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.propagators.textmap import Getter, Setter

Headers = list[tuple[str, bytes]]

_tracer = trace.get_tracer("meshllm.bus")


class _HeaderSetter(Setter[Headers]):
    def set(self, carrier: Headers, key: str, value: str) -> None:
        if any(k == key for k, _ in carrier):
            carrier[:] = [(k, v) for k, v in carrier if k != key]
        carrier.append((key, value.encode()))


class _HeaderGetter(Getter[Sequence[tuple[str, bytes]]]):
    def get(self, carrier: Sequence[tuple[str, bytes]], key: str) -> list[str] | None:
        values = [v.decode(errors="replace") for k, v in carrier if k == key]
        return values or None

    def keys(self, carrier: Sequence[tuple[str, bytes]]) -> list[str]:
        return [k for k, _ in carrier]


_SETTER = _HeaderSetter()
_GETTER = _HeaderGetter()


def _attributes(topic: str, event_id: str | None, **extra: Any) -> dict[str, Any]:
    attributes: dict[str, Any] = {"messaging.system": "kafka", "messaging.destination.name": topic}
    if event_id:
        attributes["messaging.message.id"] = event_id
    attributes.update({k: v for k, v in extra.items() if v is not None})
    return attributes


def start_publish_span(
    topic: str, event_id: str | None, headers: Headers, *, batch_size: int = 1
) -> trace.Span:
    """Start a PRODUCER span and inject its context into ``headers``; the caller ends it.

    Not a context manager and not made current: this runs once per published event
    (or batch), and attaching a current span was a third of the publish cost.
    """
    attributes: dict[str, Any] = {
        "messaging.system": "kafka",
        "messaging.destination.name": topic,
        "messaging.operation.type": "send",
    }
    if batch_size > 1:
        attributes["messaging.batch.message_count"] = batch_size
    elif event_id:
        attributes["messaging.message.id"] = event_id
    span = _tracer.start_span(
        f"{topic} publish", kind=trace.SpanKind.PRODUCER, attributes=attributes
    )
    propagate.inject(headers, context=trace.set_span_in_context(span), setter=_SETTER)
    return span


@contextmanager
def process_span(
    topic: str,
    group: str,
    headers: Sequence[tuple[str, bytes]],
    *,
    partition: int,
    offset: int,
    event_id: str | None,
) -> Iterator[trace.Span]:
    """A CONSUMER span, child of the producer's span found in ``headers``."""
    parent = propagate.extract(headers, getter=_GETTER)
    token = otel_context.attach(parent)
    try:
        with _tracer.start_as_current_span(
            f"{topic} process",
            kind=trace.SpanKind.CONSUMER,
            attributes=_attributes(
                topic,
                event_id,
                **{
                    "messaging.operation.type": "process",
                    "messaging.consumer.group.name": group,
                    "messaging.destination.partition.id": str(partition),
                    "messaging.kafka.offset": offset,
                },
            ),
        ) as span:
            yield span
    finally:
        otel_context.detach(token)
