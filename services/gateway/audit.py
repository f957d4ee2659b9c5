"""Audit records the gateway will not lose: acked by Kafka, or spooled to local disk first.

The gateway answers a request only once the request's and the response's audit records
are durable somewhere. Normally that is Kafka (``acks=all``). When the broker does not
ack in time, the record goes to an append-only spool file (fsync'd before the answer is
returned) and a background task replays the spool to Kafka once the broker is back.
Replayed records keep their envelope's event id, so the audit service absorbs any that
did reach Kafka after all. Only when neither the broker nor the disk takes the record
does the gateway refuse (503) instead of answering.

Why a spool rather than refusing whenever Kafka is slow: a response that was already
generated (and paid for) is not thrown away because of a broker hiccup between the
request and the answer; and a request cannot even start without the broker, since the
request itself travels over Kafka. The spool keeps the one guarantee that matters: no
answer without a durable audit record.

Spool format: one JSON object a line, ``{"key": str, "tenant": str, "event": base64}``,
where ``event`` is the serialized, stamped :class:`AuditEvent`. A torn last line (a
crash mid-write) is skipped on replay and reported.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from shared import envelope
from shared.bus import Publisher
from shared.events.v1 import events_pb2 as ev
from shared.files import private_file
from shared.logging import get_logger
from shared.pii import Purpose, TenantPiiSettings
from shared.pii.events import redact_audit_event
from shared.topics import AUDIT_EVENTS

log = get_logger(__name__)

REPLAY_BATCH = 500
"""Spooled records sent per replay round (a large spool is never read whole)."""


class AuditUnavailable(Exception):
    """Neither Kafka nor the local spool took an audit record."""


class AuditSettings(BaseModel):
    """Where the gateway's audit records go when the broker does not take them."""

    ack_timeout_s: float = Field(
        5.0, gt=0, le=120, description="How long to wait for Kafka's ack before spooling."
    )
    spool: Path | None = Field(
        None, description="The spool file; unset: <data_dir>/gateway/audit-spool.jsonl."
    )
    replay_every_s: float = Field(
        2.0, gt=0, le=600, description="How often a non-empty spool is replayed to Kafka."
    )
    spool_max_bytes: int = Field(
        256 * 2**20,
        ge=2**20,
        description="The spool's bound: past it a record Kafka did not take is refused, and "
        "so is its request (503), rather than filling the disk.",
    )
    strict_tenants: list[str] = Field(
        default_factory=list,
        description="Tenants whose streamed answers are held back whole until the response's "
        "record is durable (their clients then get the answer in one burst, or a 503).",
    )
    service_url: str = Field(
        "http://127.0.0.1:8090",
        description="The audit service's query API, which /v1/audit/* forwards to.",
    )


def _line(key: str, tenant: str, event: ev.AuditEvent) -> str:
    payload = base64.b64encode(event.SerializeToString()).decode()
    return json.dumps({"key": key, "tenant": tenant, "event": payload}) + "\n"


class SpoolFull(OSError):
    """The spool holds ``max_bytes`` already: the record is refused (so is its request)."""


class AuditSpool:
    """An append-only file of audit records waiting for Kafka (thread-safe), 0600.

    Replayed records are not rewritten away: a small offset file beside the spool says
    where the records still waiting begin, and the spool is truncated once all of it has
    been replayed. So a replay costs what it sends, not the size of the spool, and the file
    is bounded by ``max_bytes`` (an append past it raises :class:`SpoolFull`).
    """

    def __init__(self, path: Path, max_bytes: int = 256 * 2**20) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self._offset_path = path.with_name(path.name + ".offset")
        self._lock = threading.Lock()
        self._offset = self._load_offset()

    def append(self, key: str, tenant: str, event: ev.AuditEvent) -> None:
        """Write one record and fsync it.

        Raises:
            SpoolFull: the spool is at ``max_bytes``.
            OSError: the disk does not take it.
        """
        line = _line(key, tenant, event).encode()
        with self._lock:
            size = self.path.stat().st_size if self.path.exists() else 0
            waiting = size - self._offset  # what was replayed already does not count
            if waiting + len(line) > self.max_bytes:
                raise SpoolFull(
                    f"the audit spool {self.path} holds {waiting} bytes of records waiting "
                    f"(MESHLLM_AUDIT__SPOOL_MAX_BYTES={self.max_bytes})"
                )
            private_file(self.path)
            with self.path.open("r+b") as spool:
                spool.seek(0, os.SEEK_END)
                if size and not self._ends_with_newline(spool, size):
                    spool.write(b"\n")  # a torn last line stays alone on its line
                spool.write(line)
                spool.flush()
                os.fsync(spool.fileno())

    def records(self, limit: int | None = None) -> list[tuple[str, str, ev.AuditEvent]]:
        """The records still waiting (at most ``limit``), oldest first; a torn or corrupt
        line is skipped and logged."""
        with self._lock:
            return [record for record, _ in self._read(limit)]

    def remove(self, delivered: int) -> None:
        """Drop the first ``delivered`` waiting records (replayed), keeping any appended
        meanwhile; once none waits, the spool is emptied."""
        with self._lock:
            ends = [end for _, end in self._read(delivered)]
            end = ends[-1] if ends else self._offset
            size = self.path.stat().st_size if self.path.exists() else 0
            if end >= size:
                if self.path.exists():
                    with self.path.open("r+b") as spool:
                        spool.truncate(0)
                        os.fsync(spool.fileno())
                end = 0
            elif end > self.max_bytes // 2:
                end = self._compact(end)  # never drained for long: drop the replayed head
            self._store_offset(end)

    def __len__(self) -> int:
        return len(self.records())

    def _read(self, limit: int | None) -> Iterator[tuple[tuple[str, str, ev.AuditEvent], int]]:
        """Records from the offset, each with the byte offset just past its line."""
        if not self.path.exists() or (limit is not None and limit <= 0):
            return
        count = 0
        with self.path.open("rb") as spool:
            spool.seek(self._offset)
            position = self._offset
            for raw in spool:
                position += len(raw)
                if not raw.endswith(b"\n"):
                    return  # being written: not a record yet
                try:
                    item: dict[str, Any] = json.loads(raw)
                    event = ev.AuditEvent.FromString(base64.b64decode(item["event"]))
                    record = (str(item["key"]), str(item["tenant"]), event)
                except (ValueError, KeyError, TypeError):
                    log.exception("unreadable audit spool line", offset=position - len(raw))
                    continue
                yield record, position
                count += 1
                if limit is not None and count >= limit:
                    return

    @staticmethod
    def _ends_with_newline(spool: Any, size: int) -> bool:
        spool.seek(size - 1)
        ends = bool(spool.read(1) == b"\n")
        spool.seek(0, os.SEEK_END)
        return ends

    def _compact(self, offset: int) -> int:
        """Rewrite the spool without its first ``offset`` bytes (replayed); returns 0."""
        temporary = self.path.with_name(self.path.name + ".compact")
        private_file(temporary)
        with self.path.open("rb") as source, temporary.open("wb") as target:
            source.seek(offset)
            while chunk := source.read(1 << 20):
                target.write(chunk)
            target.flush()
            os.fsync(target.fileno())
        # offset first: a crash before the swap replays records twice (the audit log keeps
        # one per event id), never skips one
        self._store_offset(0)
        temporary.replace(self.path)
        return 0

    def _load_offset(self) -> int:
        try:
            offset = int(self._offset_path.read_text().strip() or 0)
        except (OSError, ValueError):
            return 0
        size = self.path.stat().st_size if self.path.exists() else 0
        return offset if 0 <= offset <= size else 0

    def _store_offset(self, offset: int) -> None:
        temporary = self._offset_path.with_name(self._offset_path.name + ".tmp")
        private_file(temporary)
        with temporary.open("w", encoding="utf-8") as out:
            out.write(str(offset))
            out.flush()
            os.fsync(out.fileno())
        temporary.replace(self._offset_path)
        self._offset = offset


class AuditRecorder:
    """Makes each audit record durable: Kafka's ack, else the spool; replays the spool."""

    def __init__(
        self,
        publisher: Publisher,
        spool: AuditSpool,
        settings: AuditSettings,
        *,
        producer: str,
        pii: TenantPiiSettings | None = None,
    ) -> None:
        self.publisher = publisher
        self.spool = spool
        self.settings = settings
        self.producer = producer
        self.pii = pii if pii is not None else TenantPiiSettings()
        self._replayer: asyncio.Task[None] | None = None
        self._stopping = False

    async def record(self, event: ev.AuditEvent, *, key: str, tenant: str) -> None:
        """Return once ``event`` is acked by Kafka or fsync'd to the spool.

        The tenant's ``audit`` PII policy applies first (off unless configured: an audit
        trail usually must keep what was said).

        Raises:
            AuditUnavailable: neither took it.
        """
        redact_audit_event(event, self.pii.redactor(tenant, Purpose.AUDIT))
        envelope.stamp(event, producer=self.producer, tenant=tenant)  # one id, kept on replay
        try:
            delivery = await asyncio.wait_for(
                self.publisher.enqueue(AUDIT_EVENTS, event, key=key, tenant=tenant),
                self.settings.ack_timeout_s,
            )
            await asyncio.wait_for(delivery, self.settings.ack_timeout_s)
            return
        except Exception as error:  # the broker's errors, timeouts, a stopped producer
            log.warning(
                "audit record not acked by Kafka; spooling it",
                request_id=key,
                event_id=event.envelope.event_id,
                error=f"{type(error).__name__}: {error}",
            )
        try:
            await asyncio.to_thread(self.spool.append, key, tenant, event)
        except OSError as error:
            log.exception("audit record lost by both Kafka and the spool", request_id=key)
            raise AuditUnavailable(
                f"audit record could not be stored (Kafka and spool failed: {error})"
            ) from error
        self._ensure_replayer()

    def _ensure_replayer(self) -> None:
        if self._stopping:
            return
        if self._replayer is None or self._replayer.done():
            self._replayer = asyncio.ensure_future(self._replay_loop())

    def start(self) -> None:
        """Replay what an earlier run left in the spool (call from the running loop)."""
        if self.spool.path.exists():
            self._ensure_replayer()

    async def stop(self) -> None:
        # The flag ends the loop even if a cancellation is lost: Python 3.11's wait_for can
        # swallow one that lands as the awaited call completes.
        self._stopping = True
        if self._replayer is not None:
            self._replayer.cancel()
            await asyncio.gather(self._replayer, return_exceptions=True)

    async def _replay_loop(self) -> None:
        while not self._stopping:
            pending = await asyncio.to_thread(self.spool.records, REPLAY_BATCH)
            if not pending:
                return
            delivered = await self.replay(pending)
            if delivered < len(pending):
                await asyncio.sleep(self.settings.replay_every_s)

    async def replay(self, pending: list[tuple[str, str, ev.AuditEvent]]) -> int:
        """Send ``pending`` in order; drop what Kafka acked from the spool; return how many."""
        delivered = 0
        for key, tenant, event in pending:
            try:
                delivery = await asyncio.wait_for(
                    self.publisher.enqueue(AUDIT_EVENTS, event, key=key, tenant=tenant),
                    self.settings.ack_timeout_s,
                )
                await asyncio.wait_for(delivery, self.settings.ack_timeout_s)
            except Exception as error:
                log.info(
                    "audit spool replay paused", left=len(pending) - delivered, error=str(error)
                )
                break
            delivered += 1
        if delivered:
            await asyncio.to_thread(self.spool.remove, delivered)
            log.info("audit spool replayed", records=delivered, left=len(pending) - delivered)
        return delivered
