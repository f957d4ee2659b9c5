"""The feedback store on both of its databases: SQLite in a temporary folder, and a fresh
database on a real PostgreSQL server (see :mod:`tests.procs.postgres`)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from services.feedback.examples import Example, Message
from services.feedback.store import FeedbackStore
from shared.sqldb import PostgresDriver, SqliteDriver
from tests.procs.postgres import postgres_database


@pytest.fixture(scope="session")
def postgres_dsn() -> Iterator[str]:
    with postgres_database() as dsn:
        yield dsn


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[FeedbackStore]:
    if request.param == "sqlite":
        driver = SqliteDriver(tmp_path / "feedback.sqlite")
        opened = await FeedbackStore(driver).open()
    else:
        dsn = request.getfixturevalue("postgres_dsn")
        opened = await FeedbackStore(await PostgresDriver.connect(dsn)).open()
        for table in ("examples", "datasets", "dataset_rows", "erasures"):
            await opened.driver.execute(f"DELETE FROM {table}")
    yield opened
    await opened.close()


def example(request_id: str = "r1", **changes: object) -> Example:
    values: dict[str, object] = {
        "tenant": "acme", "request_id": request_id, "subject": "key-1", "api_key_id": "k1",
        "rating": 1, "score": 0, "labels": (), "correction": "", "comment": "",
        "model": "smollm2-135m-instruct", "model_version": "1", "kind": "chat",
        "messages": (Message("user", f"How do I reset my VPN password? ({request_id})"),),
        "answer": "Open the portal and choose Reset.", "finish_reason": "stop",
        "retrieved_chunk_ids": (), "rated_at_ns": 1_000, "answered_at_ns": 900,
        "event_id": "e-" + request_id,
    }  # fmt: skip
    values.update(changes)
    return Example(**values)  # type: ignore[arg-type]
