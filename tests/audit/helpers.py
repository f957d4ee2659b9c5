"""Audit events to store, and a log that is quick to fill."""

from __future__ import annotations

import itertools
from typing import Any

from shared.envelope import stamp
from shared.events.v1 import events_pb2 as ev

_counter = itertools.count()
T0 = 1_700_000_000 * 1_000_000_000
"""2023-11-14T22:13:20Z, in nanoseconds."""


def audit_event(
    *,
    tenant: str = "acme",
    kind: str = "request",
    request_id: str | None = None,
    user: str = "alice",
    api_key_id: str = "key1",
    model: str = "smollm2",
    model_version: str = "v1",
    occurred_at_ns: int | None = None,
    text: str = "hello",
) -> ev.AuditEvent:
    """An AuditEvent with a fresh event id; ``occurred_at`` defaults to T0 + 1 s per event."""
    number = next(_counter)
    event = ev.AuditEvent(
        request_id=request_id or f"req-{number}",
        api_key_id=api_key_id,
        user=user,
        model=model,
        model_version=model_version,
    )
    if kind == "request":
        event.request.kind = ev.REQUEST_KIND_CHAT
        event.request.messages.add(role="user", content=text)
    elif kind == "response":
        event.response.choices.add(index=0, text=text, finish_reason="stop")
        event.response.status_code = 200
    elif kind == "routing":
        event.routing.pool = "cpu"
        event.routing.replica = text
    elif kind == "policy":
        event.policy.allow = True
        event.policy.reasons.append(text)
    stamp(event, producer="test", tenant=tenant)
    moment = occurred_at_ns if occurred_at_ns is not None else T0 + number * 1_000_000_000
    event.envelope.occurred_at.FromNanoseconds(moment)
    return event


def raw_events(count: int, **fields: Any) -> list[bytes]:
    """``count`` serialized events (as Kafka delivers them)."""
    return [audit_event(**fields).SerializeToString() for _ in range(count)]
