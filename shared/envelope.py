"""The event envelope: identity, time, tenant and schema version of every event."""

from __future__ import annotations

import os
import time
import uuid

from google.protobuf.message import Message

from shared.events.v1 import events_pb2 as ev

SCHEMA_VERSION = 1
SUPPORTED_SCHEMA_VERSIONS = frozenset({1})


class EnvelopeError(ValueError):
    """An event whose envelope is missing or unusable."""


def new_event_id() -> str:
    """A UUIDv7: unique, and sortable by creation time (RFC 9562)."""
    millis = time.time_ns() // 1_000_000
    value = (millis & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76
    value |= int.from_bytes(os.urandom(10), "big") & ((1 << 76) - 1)
    value &= ~(0xC << 60)
    value |= 0x8 << 60
    return str(uuid.UUID(int=value))


def stamp(event: Message, *, producer: str, tenant: str | None = None) -> ev.Envelope:
    """Fill the envelope fields the caller left empty; return the envelope."""
    envelope: ev.Envelope = event.envelope  # type: ignore[attr-defined]
    if not envelope.event_id:
        envelope.event_id = new_event_id()
    if not envelope.HasField("occurred_at"):
        envelope.occurred_at.FromNanoseconds(time.time_ns())
    if not envelope.schema_version:
        envelope.schema_version = SCHEMA_VERSION
    if not envelope.producer:
        envelope.producer = producer
    if tenant is not None and not envelope.tenant:
        envelope.tenant = tenant
    return envelope


def check(event: Message) -> ev.Envelope:
    """Return the envelope of a decoded event, or raise EnvelopeError saying why not."""
    if not event.HasField("envelope"):
        raise EnvelopeError(f"{event.DESCRIPTOR.full_name} has no envelope")
    envelope: ev.Envelope = event.envelope  # type: ignore[attr-defined]
    if not envelope.event_id:
        raise EnvelopeError("envelope.event_id is empty")
    if envelope.schema_version not in SUPPORTED_SCHEMA_VERSIONS:
        supported = ", ".join(str(v) for v in sorted(SUPPORTED_SCHEMA_VERSIONS))
        raise EnvelopeError(
            f"unsupported envelope.schema_version {envelope.schema_version} "
            f"(this consumer reads {supported})"
        )
    return envelope
