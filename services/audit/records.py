"""What the audit store keeps: one record per :class:`AuditEvent`, and how it is queried.

A record's *leaf data* is the event's serialized bytes exactly as stored; its leaf hash is
``SHA-256(0x00 || bytes)`` (:func:`services.audit.merkle.leaf_hash`). The columns beside the
bytes (tenant, user, ...) are copies for querying; verification checks that they still match
the bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import DecodeError

from services.audit.merkle import leaf_hash
from shared.envelope import EnvelopeError, check
from shared.events.v1 import events_pb2 as ev

KINDS = ("request", "response", "routing", "policy")
"""Record kinds, the names of the ``AuditEvent.record`` oneof; ``unknown`` when unset (an
event from a newer producer whose record this code does not know)."""
UNKNOWN_KIND = "unknown"
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000

Sealer = Callable[[int, bytes], bytes]
"""``(leaf_index, leaf_hash) -> seal``: a keyed tag binding a leaf hash to its position."""


class InvalidAuditEvent(ValueError):
    """Bytes that are not a storable AuditEvent; the message says why (for the DLQ)."""


@dataclass(frozen=True)
class ParsedEvent:
    """An event ready to append: its bytes, leaf hash and the columns copied from it."""

    raw: bytes
    leaf_hash: bytes
    event_id: str
    request_id: str
    tenant: str
    api_key_id: str
    user: str
    model: str
    model_version: str
    kind: str
    occurred_at_ns: int


def parse_event(event: bytes | ev.AuditEvent) -> ParsedEvent:
    """Decode (bytes) or serialize (a message, deterministically) one AuditEvent.

    Bytes are kept exactly as given: pass the Kafka record's value when you have it.

    Raises:
        InvalidAuditEvent: bytes that do not decode, an unusable envelope, or no
            ``occurred_at``.
    """
    if isinstance(event, ev.AuditEvent):
        message, raw = event, event.SerializeToString(deterministic=True)
    else:
        raw = bytes(event)
        message = ev.AuditEvent()
        try:
            message.ParseFromString(raw)
        except DecodeError as error:
            raise InvalidAuditEvent(f"not an AuditEvent: {error}") from None
    try:
        envelope = check(message)
    except EnvelopeError as error:
        raise InvalidAuditEvent(str(error)) from None
    if not envelope.HasField("occurred_at"):
        raise InvalidAuditEvent(f"event {envelope.event_id}: envelope.occurred_at is unset")
    return ParsedEvent(
        raw=raw,
        leaf_hash=leaf_hash(raw),
        event_id=envelope.event_id,
        request_id=message.request_id,
        tenant=envelope.tenant,
        api_key_id=message.api_key_id,
        user=message.user,
        model=message.model,
        model_version=message.model_version,
        kind=message.WhichOneof("record") or UNKNOWN_KIND,
        occurred_at_ns=envelope.occurred_at.ToNanoseconds(),
    )


def decode_event(raw: bytes) -> dict[str, Any]:
    """The event as JSON-able data (proto field names; 64-bit integers as strings)."""
    message = ev.AuditEvent()
    message.ParseFromString(raw)
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def iso(ns: int) -> str:
    """Nanoseconds since the epoch as an ISO 8601 UTC time (microsecond precision)."""
    seconds, rest = divmod(ns, 1_000_000_000)
    moment = datetime.fromtimestamp(seconds, UTC).replace(microsecond=rest // 1_000)
    return moment.isoformat().replace("+00:00", "Z")


def to_ns(moment: datetime) -> int:
    """A timezone-aware datetime as nanoseconds since the epoch.

    Raises:
        ValueError: for a naive datetime (which time zone it means is a guess).
    """
    if moment.tzinfo is None:
        raise ValueError(f"{moment!r} has no time zone; use an aware datetime (UTC)")
    delta = moment - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1_000


@dataclass(frozen=True)
class AppendResult:
    """Where an appended event landed.

    ``created`` is False for an event id already stored (a redelivery): ``leaf_index`` is then
    the stored record's, and ``conflict`` says whether the stored bytes differ from these.
    """

    event_id: str
    leaf_index: int
    created: bool
    conflict: bool = False


@dataclass(frozen=True)
class AuditRecord:
    """One stored record. ``raw`` is None once retention purged its content."""

    leaf_index: int
    event_id: str
    request_id: str
    tenant: str
    api_key_id: str
    user: str
    model: str
    model_version: str
    kind: str
    occurred_at_ns: int
    appended_at_ns: int
    raw: bytes | None
    leaf_hash: bytes
    seal: bytes | None = None
    purged_at_ns: int | None = None

    @property
    def purged(self) -> bool:
        return self.raw is None

    def to_json(self) -> dict[str, Any]:
        """JSON-able: the columns, the leaf hash (hex) and the decoded event (None if purged)."""
        return {
            "leaf_index": self.leaf_index,
            "event_id": self.event_id,
            "request_id": self.request_id,
            "tenant": self.tenant,
            "api_key_id": self.api_key_id,
            "user": self.user,
            "model": self.model,
            "model_version": self.model_version,
            "kind": self.kind,
            "occurred_at": iso(self.occurred_at_ns),
            "appended_at": iso(self.appended_at_ns),
            "leaf_hash": self.leaf_hash.hex(),
            "purged": self.purged,
            "purged_at": None if self.purged_at_ns is None else iso(self.purged_at_ns),
            "event": None if self.raw is None else decode_event(self.raw),
        }


@dataclass(frozen=True)
class AuditQuery:
    """Filters (all optional, combined with AND) and a page of a query.

    ``since`` is inclusive and ``until`` exclusive, on the event's ``occurred_at``.
    ``after`` is the cursor: the last leaf index of the previous page (in the order asked).
    """

    tenant: str | None = None
    api_key_id: str | None = None
    user: str | None = None
    model: str | None = None
    model_version: str | None = None
    request_id: str | None = None
    kind: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    after: int | None = None
    limit: int = DEFAULT_PAGE_SIZE
    descending: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.limit <= MAX_PAGE_SIZE:
            raise ValueError(f"limit must be between 1 and {MAX_PAGE_SIZE}, not {self.limit}")
        if self.after is not None and self.after < 0:
            raise ValueError(f"after must be a leaf index (>= 0), not {self.after}")
        if self.kind is not None and self.kind not in (*KINDS, UNKNOWN_KIND):
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {self.kind!r}")
        for name in ("since", "until"):
            moment = getattr(self, name)
            if moment is not None and moment.tzinfo is None:
                raise ValueError(f"{name} must be timezone-aware")

    def equalities(self) -> dict[str, str]:
        """The column = value filters that are set."""
        fields = {
            "tenant": self.tenant,
            "api_key_id": self.api_key_id,
            "user": self.user,
            "model": self.model,
            "model_version": self.model_version,
            "request_id": self.request_id,
            "kind": self.kind,
        }
        return {name: value for name, value in fields.items() if value is not None}


@dataclass(frozen=True)
class Page:
    """A page of records; ``next_cursor`` goes into the next query's ``after`` (None: last)."""

    records: list[AuditRecord]
    next_cursor: int | None

    def to_json(self) -> dict[str, Any]:
        return {
            "records": [record.to_json() for record in self.records],
            "next_cursor": self.next_cursor,
        }


@dataclass(frozen=True)
class PurgeRecord:
    """One retention run for a tenant: content older than ``before_ns`` was purged."""

    tenant: str
    before_ns: int
    purged_at_ns: int
    count: int
