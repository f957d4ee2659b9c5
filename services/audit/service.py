"""The running audit service: audit.events into the log, checkpoints out, retention.

Delivery: the bus commits an event's offset only after its handler returned, and the
handler returns only after :meth:`AuditLog.append` made the record durable. A crash
between the two redelivers the event, and the store absorbs it by event id: every event
is stored exactly once, whatever the crashes (see the kill -9 test in tests/audit).
While the service or its store is down, events wait in Kafka.

One writer: the log's leaf indices are assigned by this process, so one audit instance
consumes audit.events at a time (the consumer group gives one member all partitions
when only one runs; a second instance would wait as a standby member only if the
partition count were 1, so run one instance; ``replicas: 1`` in the Helm chart).
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from services.audit.checkpoint import Checkpoint
from services.audit.log import AuditLog
from services.audit.metrics import AuditMetrics
from services.audit.records import InvalidAuditEvent, parse_event
from services.audit.settings import AuditSettings
from shared.bus import Publisher
from shared.bus.consumer import EventContext, PoisonEvent
from shared.events.v1 import events_pb2 as ev
from shared.logging import get_logger
from shared.topics import AUDIT_CHECKPOINTS

log = get_logger(__name__)

RETENTION_EVERY_S = 3600.0


class AuditService:
    """Consumes audit events into ``log``; signs and publishes checkpoints; applies retention."""

    def __init__(self, audit_log: AuditLog, settings: AuditSettings, publisher: Publisher) -> None:
        self.log = audit_log
        self.settings = settings
        self.publisher = publisher
        self.appended = 0
        self.duplicates = 0
        latest = audit_log.latest_checkpoint()
        self.metrics = AuditMetrics(
            audit_log.size,
            latest.tree_size if latest else 0,
            latest.timestamp_ns / 1e9 if latest else None,
        )
        self._write = asyncio.Lock()  # one append at a time keeps leaf order = arrival order

    async def on_event(self, event: ev.AuditEvent, ctx: EventContext) -> None:
        try:
            parsed = parse_event(event)
        except InvalidAuditEvent as error:
            raise PoisonEvent(str(error)) from error
        async with self._write:
            [result] = await asyncio.to_thread(self.log.append, [parsed])
        if result.created:
            self.appended += 1
            self.metrics.taken("stored", result.leaf_index)
        else:
            self.duplicates += 1
            self.metrics.taken("conflict" if result.conflict else "duplicate")
            if result.conflict:
                log.error(
                    "an event id arrived again with different content; the first is kept",
                    event_id=result.event_id,
                    leaf_index=result.leaf_index,
                )

    async def checkpoint_now(self) -> Checkpoint | None:
        """Sign the current tree head if it grew, and publish it to audit.checkpoints."""
        async with self._write:
            checkpoint = await asyncio.to_thread(self.log.checkpoint)
        if checkpoint is not None:
            self.metrics.sealed(checkpoint.tree_size, checkpoint.timestamp_ns / 1e9)
            await self.publish(checkpoint)
        return checkpoint

    async def publish(self, checkpoint: Checkpoint) -> None:
        message = ev.AuditCheckpoint(
            log_id=checkpoint.log_id,
            tree_size=checkpoint.tree_size,
            root_hash=checkpoint.root_hash,
            signed_at_ns=checkpoint.timestamp_ns,
            key_id=checkpoint.key_id,
            signature=checkpoint.signature,
        )
        try:
            await self.publisher.publish(AUDIT_CHECKPOINTS, message, key=checkpoint.log_id)
        except Exception as error:  # it is in the store either way; witnesses get the next one
            log.warning("checkpoint not published", size=checkpoint.tree_size, error=str(error))
            return
        log.info(
            "checkpoint signed",
            tree_size=checkpoint.tree_size,
            root=checkpoint.root_hash.hex()[:16],
            appended=self.appended,
            duplicates=self.duplicates,
        )

    async def run_checkpoints(self) -> None:
        """Every ``checkpoint_interval_s``: a checkpoint when the log grew."""
        while True:
            await asyncio.sleep(self.settings.checkpoint_interval_s)
            try:
                await self.checkpoint_now()
            except Exception:
                log.exception("checkpoint failed")

    async def run_retention(self) -> None:
        """Hourly: purge the content of records past their tenant's retention."""
        if not self.settings.retention_days and self.settings.default_retention_days is None:
            return
        while True:
            started = time.monotonic()
            try:
                purged = await asyncio.to_thread(
                    self.log.apply_retention,
                    self.settings.retention_days,
                    self.settings.default_retention_days,
                )
                if any(purged.values()):
                    log.info("retention applied", purged=purged)
            except Exception:
                log.exception("retention failed")
            await asyncio.sleep(max(0.0, RETENTION_EVERY_S - (time.monotonic() - started)))

    async def close(self) -> None:
        """Sign a last checkpoint so a clean stop leaves nothing uncovered."""
        with contextlib.suppress(Exception):
            await self.checkpoint_now()
