"""How a rating waits for its answer's audit records (the audit API is a test double here;
the real one is in tests/feedback/test_service_kill.py and tests/e2e/test_feedback.py)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from services.feedback.examples import JoinError, NotYet, join
from services.feedback.service import FeedbackService
from services.feedback.settings import FeedbackSettings
from services.feedback.store import FeedbackQuery, FeedbackStore
from shared.bus.consumer import EventContext, PoisonEvent
from shared.envelope import stamp
from shared.events.v1 import events_pb2 as ev
from shared.sqldb import SqliteDriver


class Records:
    """The audit API's answer for every request: a request record of ``age``, no response."""

    def __init__(self, age: timedelta) -> None:
        self.age = age
        self.asked = 0

    async def records(self, tenant: str, request_id: str) -> list[dict[str, Any]]:
        self.asked += 1
        at = (datetime.now(UTC) - self.age).isoformat().replace("+00:00", "Z")
        return [{"kind": "request", "occurred_at": at, "event": {"request": {}}}]


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[FeedbackStore]:
    opened = await FeedbackStore(SqliteDriver(tmp_path / "f.sqlite")).open()
    yield opened
    await opened.close()


def rating() -> tuple[ev.FeedbackEvent, EventContext]:
    event = ev.FeedbackEvent(request_id="r1", user="alice", rating=1)
    envelope = stamp(event, producer="gateway", tenant="acme")
    context = EventContext("feedback.events", 0, 0, b"r1", [], envelope, 1)
    return event, context


async def test_a_request_too_old_to_be_answered_is_dead_lettered_at_once(
    store: FeedbackStore,
) -> None:
    audit = Records(timedelta(hours=1))
    service = FeedbackService(store, FeedbackSettings(join_wait_s=30), None, audit)  # type: ignore[arg-type]
    started = time.monotonic()
    with pytest.raises(PoisonEvent, match="too old to be answered"):
        await service.on_event(*rating())
    assert time.monotonic() - started < 5  # not the 30 s wait
    assert audit.asked == 1


async def test_a_recent_request_waits_for_its_answer_then_is_retried(
    store: FeedbackStore,
) -> None:
    audit = Records(timedelta(seconds=1))
    service = FeedbackService(store, FeedbackSettings(join_wait_s=0.5), None, audit)  # type: ignore[arg-type]
    with pytest.raises(JoinError, match="no response record"):
        await service.on_event(*rating())
    assert audit.asked > 1  # it looked again while it waited
    assert await store.count() == 0


def _records(*, sourced: bool, routing: dict[str, Any] | str | None = "absent") -> list[Any]:
    at = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    request = {"kind": "REQUEST_KIND_CHAT", "messages": [{"role": "user", "content": "Days?"}]}
    response: dict[str, Any] = {"choices": [{"text": "25 days [1].", "finish_reason": "stop"}]}
    if sourced:
        response["retrieved_chunk_ids"] = ["doc-1#0"]
    records: list[Any] = [
        {"kind": "request", "occurred_at": at, "event": {"request": request}},
        {"kind": "response", "occurred_at": at, "event": {"response": response}},
    ]
    if routing != "absent":
        records.append({"kind": "routing", "occurred_at": at,
                        "event": None if routing is None else {"routing": routing}})  # fmt: skip
    return records


PROMPT = [
    {"role": "system", "content": "Answer from the sources."},
    {"role": "user", "content": "<sources>[1] 25 days</sources>\n\nQuestion: Days?"},
]


def test_a_sourced_answer_joins_with_the_prompt_the_model_was_given() -> None:
    event, context = rating()
    made = join(event, context.envelope, _records(sourced=True, routing={"prompt": PROMPT}))
    assert [m.content for m in made.messages] == ["Days?"]
    assert [(m.role, m.content) for m in made.prompt] == [(p["role"], p["content"]) for p in PROMPT]
    assert made.retrieved_chunk_ids == ("doc-1#0",)


def test_a_sourced_answer_waits_for_its_routing_record() -> None:
    event, context = rating()
    with pytest.raises(NotYet, match="no routing record"):
        join(event, context.envelope, _records(sourced=True))
    with pytest.raises(JoinError, match="purged"):
        join(event, context.envelope, _records(sourced=True, routing=None))
    # a routing record from before prompts were recorded: the caller's messages only
    made = join(event, context.envelope, _records(sourced=True, routing={"pool": "cpu"}))
    assert made.prompt == ()


def test_a_prompt_with_a_source_only_some_groups_may_read_is_not_kept() -> None:
    event, context = rating()
    routing = {"prompt": PROMPT, "prompt_restricted": True}
    made = join(event, context.envelope, _records(sourced=True, routing=routing))
    assert made.prompt == ()
    assert made.retrieved_chunk_ids == ("doc-1#0",)


def test_an_answer_without_sources_needs_no_routing_record() -> None:
    event, context = rating()
    assert join(event, context.envelope, _records(sourced=False)).prompt == ()


async def test_a_response_without_its_request_is_dead_lettered(store: FeedbackStore) -> None:
    class Orphan:
        async def records(self, tenant: str, request_id: str) -> list[dict[str, Any]]:
            return _records(sourced=False)[1:]

    service = FeedbackService(store, FeedbackSettings(join_wait_s=5), None, Orphan())  # type: ignore[arg-type]
    with pytest.raises(PoisonEvent, match="no request"):
        await service.on_event(*rating())


async def test_a_routing_record_that_never_came_does_not_hold_the_rating(
    store: FeedbackStore,
) -> None:
    class Late:
        async def records(self, tenant: str, request_id: str) -> list[dict[str, Any]]:
            old = (datetime.now(UTC) - timedelta(minutes=5)).isoformat().replace("+00:00", "Z")
            return [{**r, "occurred_at": old} for r in _records(sourced=True)]

    service = FeedbackService(store, FeedbackSettings(join_wait_s=30), None, Late())  # type: ignore[arg-type]
    started = time.monotonic()
    await service.on_event(*rating())
    assert time.monotonic() - started < 5
    [kept] = await store.query(FeedbackQuery("acme", request_id="r1"))
    assert kept.prompt == ()
    assert kept.retrieved_chunk_ids == ("doc-1#0",)  # its dataset row is withheld
