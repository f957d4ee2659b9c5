"""The running feedback service: ratings in from ``feedback.events``, joined with the audited
answer, redacted and stored; datasets built from them and announced on ``training.datasets``.

Delivery is at least once. A rating is stored under (tenant, request id, subject) and an
older rating never replaces a newer one (:meth:`FeedbackStore.put`), so a redelivery after a
crash or a kill stores nothing twice and loses nothing.

The join reads the answer's request and response records from the audit service (as the
``feedback`` service identity, for the event's tenant only). The gateway accepted the
rating only after it found the request record, so the records exist; the response record
may be stored a moment after the rating arrives, so the handler waits for it up to
``join_wait_s`` before it lets the bus retry. Content the audit log no longer holds
(retention) or a request that has no answer to rate goes to the dead-letter topic.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import httpx

from services.feedback import metrics
from services.feedback.datasets import (
    Builder,
    BuiltDataset,
    DatasetSpec,
    build,
    examples_from_jsonl,
    manifest,
)
from services.feedback.examples import Example, JoinError, NotYet, join
from services.feedback.settings import FeedbackSettings
from services.feedback.store import DatasetExists, FeedbackStore
from shared.bus import Publisher
from shared.bus.consumer import EventContext, PoisonEvent
from shared.events.v1 import events_pb2 as ev
from shared.feedback_requests import iso_ns
from shared.logging import get_logger
from shared.pii import PiiMode, PiiPolicy, PiiType, Purpose, Redactor, detect
from shared.pii.types import STRUCTURED_TYPES
from shared.topics import TRAINING_DATASETS

log = get_logger(__name__)
DAY_NS = 86_400 * 1_000_000_000
PROGRESS_EVERY = 10_000  # examples read between a build's progress lines


class AuditUnreachable(Exception):
    """The audit service did not answer; the event is retried."""


class AuditReader:
    """The audit records of one request, read from the audit service's API."""

    def __init__(self, base_url: str, headers: Mapping[str, str], timeout_s: float = 10) -> None:
        self._url = base_url.rstrip("/") + "/v1/audit/records"
        self._client = httpx.AsyncClient(timeout=timeout_s, headers=dict(headers))

    async def records(self, tenant: str, request_id: str) -> list[dict[str, Any]]:
        params = {"tenant": tenant, "request_id": request_id, "limit": "50"}
        try:
            reply = await self._client.get(self._url, params=params)
        except httpx.HTTPError as error:
            raise AuditUnreachable(f"{type(error).__name__}: {error}") from error
        if reply.status_code != 200:
            raise AuditUnreachable(f"the audit API answered {reply.status_code}")
        records = reply.json().get("records", [])
        return [r for r in records if isinstance(r, dict)]

    async def close(self) -> None:
        await self._client.aclose()


def scan_structured(text: str) -> list[str]:
    """The structured PII types still found in ``text`` (the residue scan)."""
    return [str(f.type) for f in detect(text, STRUCTURED_TYPES)]


class FeedbackService:
    def __init__(
        self,
        store: FeedbackStore,
        settings: FeedbackSettings,
        publisher: Publisher,
        audit: AuditReader,
    ) -> None:
        self.store = store
        self.settings = settings
        self.publisher = publisher
        self.audit = audit
        self.stored = 0

    # ------------------------------------------------------------------ ratings

    async def on_event(self, event: ev.FeedbackEvent, ctx: EventContext) -> None:
        tenant = ctx.envelope.tenant
        if not tenant or not event.request_id or not event.user:
            metrics.taken("rejected")
            raise PoisonEvent("a feedback event needs a tenant, a request id and a user")
        if event.rating not in (-1, 0, 1) or event.score > 5:
            metrics.taken("rejected")
            raise PoisonEvent(f"rating {event.rating} / score {event.score} is out of range")
        example = await self._join(event, ctx.envelope)
        redactor = self.settings.pii.redactor(tenant, Purpose.FEEDBACK)
        cleaned = example.redacted(lambda text: _redact(redactor, text))
        if await self.store.put(cleaned):
            self.stored += 1
            metrics.taken("stored")
        else:
            metrics.taken("superseded")

    async def _join(self, event: ev.FeedbackEvent, envelope: ev.Envelope) -> Example:
        deadline = time.monotonic() + self.settings.join_wait_s
        pause = 0.05
        while True:
            records = await self.audit.records(envelope.tenant, event.request_id)
            try:
                return join(event, envelope, records)
            except NotYet as error:
                kinds = {r.get("kind") for r in records}
                if "response" in kinds and _older(records, "response", self.settings.join_wait_s):
                    # the routing record follows the answer by moments: one this late will
                    # not come (its publish failed); keep the rating, without the prompt
                    return join(event, envelope, records, routing_overdue=True)
                if "response" not in kinds and _older(
                    records, "request", self.settings.answer_within_s
                ):
                    metrics.taken("rejected")  # it will never have an answer to join
                    message = f"{error}; the request is too old to be answered"
                    raise PoisonEvent(message) from error
                if time.monotonic() >= deadline:
                    raise  # the bus retries later
            except JoinError as error:
                metrics.taken("rejected")
                raise PoisonEvent(str(error)) from error
            await asyncio.sleep(pause)
            pause = min(pause * 2, 1.0)

    # ------------------------------------------------------------------ datasets

    async def build_dataset(self, spec: DatasetSpec) -> dict[str, Any]:
        """Build, store and announce the next version of ``spec.name`` from the feedback.

        The history is read a page at a time, newest first, and each page is built off the
        event loop; a progress line is logged every :data:`PROGRESS_EVERY` examples.
        """
        filters = spec.filters
        builder = Builder(spec, training_redaction(self.settings, spec.tenant), scan_structured)
        read = 0
        started = time.monotonic()
        async for page in self.store.pages(spec.tenant, filters.since_ns, filters.until_ns):
            await asyncio.to_thread(builder.add_all, page)
            before, read = read, read + len(page)
            if read // PROGRESS_EVERY > before // PROGRESS_EVERY:
                log.info("dataset build progress", tenant=spec.tenant, dataset=spec.name,
                         examples_read=read, rows=builder.counts.candidates,
                         seconds=round(time.monotonic() - started, 1))  # fmt: skip
        return await self._store_dataset(spec, builder.result(), source="feedback")

    async def import_dataset(self, spec: DatasetSpec, data: bytes) -> dict[str, Any]:
        """Make an uploaded chat-format JSONL file a dataset, through the same checks.

        Raises:
            FormatError: a line that is not chat-format JSON (its number is in the message).
        """
        examples = examples_from_jsonl(data, spec.tenant, uploaded_at_ns=time.time_ns())
        redact = training_redaction(self.settings, spec.tenant)
        built = await asyncio.to_thread(build, examples, spec, redact, scan_structured)
        return await self._store_dataset(spec, built, source="upload")

    async def _store_dataset(
        self, spec: DatasetSpec, built: BuiltDataset, source: str
    ) -> dict[str, Any]:
        policy = self.settings.pii.policy_for(spec.tenant, Purpose.TRAINING)
        policy_json = policy.model_dump(mode="json", exclude={"key"})
        now = datetime.now(UTC)

        def make(version: int, erased: set[str]) -> tuple[dict[str, Any], Any]:
            kept = built.without(erased)
            made = manifest(
                spec, kept, dataset_id=f"{spec.name}-v{version}", version=version,
                created_at=now.isoformat().replace("+00:00", "Z"), pii_policy=policy_json,
                source=source,
            )  # fmt: skip
            return made, kept.rows

        for attempt in range(3):
            try:
                made = await self.store.add_dataset(spec.tenant, spec.name, time.time_ns(), make)
                break
            except DatasetExists:
                if attempt == 2:
                    raise
        ready = ev.DatasetReady(
            dataset_id=made["id"],
            uri=f"meshllm://datasets/{spec.tenant}/{made['id']}",
            examples=made["rows"],
            sha256=made["sha256"],
            purpose="training",
        )
        await self.publisher.publish(TRAINING_DATASETS, ready, key=made["id"], tenant=spec.tenant)
        log.info("dataset built", tenant=spec.tenant, dataset=made["id"], rows=made["rows"])
        return made

    async def erase(self, tenant: str, request_id: str) -> dict[str, Any]:
        report = await self.store.erase(tenant, request_id, time.time_ns())
        log.info("erased", tenant=tenant, **{k: v for k, v in report.items() if k != "request_id"})
        return report

    # ------------------------------------------------------------------ background

    async def run_retention(self) -> None:
        """Hourly: delete feedback older than its tenant's retention."""
        settings = self.settings
        if not settings.retention_days and settings.default_retention_days is None:
            return
        while True:
            try:
                purged = await self.purge_expired(time.time_ns())
                if purged:
                    log.info("retention applied", purged=purged)
            except Exception:
                log.exception("retention failed")
            await asyncio.sleep(3600)

    async def purge_expired(self, now_ns: int) -> int:
        """Ratings, and the rows of datasets, older than their tenant's retention; the
        count of both."""
        settings = self.settings
        purged = 0
        for tenant, days in settings.retention_days.items():
            before = now_ns - days * DAY_NS
            purged += await self.store.purge(tenant, before)
            purged += await self.store.purge_datasets(tenant, before, now_ns)
        if settings.default_retention_days is not None:
            before = now_ns - settings.default_retention_days * DAY_NS
            keep = list(settings.retention_days)
            purged += await self.store.purge(None, before, keep=keep)
            purged += await self.store.purge_datasets(None, before, now_ns, keep=keep)
        return purged

    async def run_quality(self) -> None:
        while True:
            try:
                metrics.quality(await self.store.quality())
            except Exception:
                log.exception("quality counts unavailable")
            await asyncio.sleep(self.settings.quality_interval_s)


def _older(records: Sequence[Mapping[str, Any]], kind: str, seconds: float) -> bool:
    """Whether the ``kind`` record is older than ``seconds`` (a request older than any answer
    to it can be; an answer older than its routing record can follow it)."""
    found = next((r for r in records if r.get("kind") == kind), None)
    at_ns = iso_ns(found.get("occurred_at")) if found is not None else None
    return at_ns is not None and (time.time_ns() - at_ns) / 1e9 > seconds


def _redact(redactor: Redactor, text: str) -> tuple[str, int]:
    result = redactor.redact(text)
    return result.text, result.total


_LABELS = {t.label: t for t in PiiType}
_MARKER = re.compile(r"\[(" + "|".join(sorted(_LABELS)) + r"):[^\[\]\s]{1,200}\]")


def _retag(policy: PiiPolicy, text: str) -> tuple[str, int]:
    """Values an earlier, laxer policy left partly visible (the feedback policy's masks,
    ``[PHONE:***5678]``) as ``[PHONE]`` where ``policy`` drops that type: a value redacted
    once is no longer found as PII, so the training policy would otherwise keep the rest."""
    count = 0

    def replace(match: re.Match[str]) -> str:
        nonlocal count
        pii_type = _LABELS[match.group(1)]
        if not policy.enabled or policy.mode_for(pii_type) is not PiiMode.DROP:
            return match.group(0)
        count += 1
        return f"[{pii_type.label}]"

    return _MARKER.sub(replace, text), count


def training_redaction(settings: FeedbackSettings, tenant: str) -> Callable[[str], tuple[str, int]]:
    """The tenant's ``training`` policy over stored (feedback-redacted) text."""
    redactor = settings.pii.redactor(tenant, Purpose.TRAINING)
    policy = settings.pii.policy_for(tenant, Purpose.TRAINING)

    def redact(text: str) -> tuple[str, int]:
        cleaned, found = _redact(redactor, text)
        retagged, again = _retag(policy, cleaned)
        return retagged, found + again

    return redact
