"""The feedback service as a process on the real broker, next to the real audit service:
kill -9 five times while 2,000 ratings stream in, and every rating is stored exactly once,
joined with its answer."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from shared.bus import Publisher
from shared.bus.embedded import free_port
from shared.envelope import stamp
from shared.events.v1 import events_pb2 as ev
from shared.settings import ENV_PREFIX, KafkaSettings, MeshSettings
from shared.topics import AUDIT_EVENTS, FEEDBACK_EVENTS
from tests.audit.helpers import audit_event
from tests.conftest import ROOT
from tests.e2e.conftest import Service

pytestmark = [pytest.mark.kafka, pytest.mark.slow, pytest.mark.timeout(600)]

RATINGS, KILLS = 2000, 5


def stored(db: Path) -> tuple[int, int, int]:
    """(rows, distinct request ids, rows with an answer) in the service's SQLite store."""
    if not db.exists():
        return 0, 0, 0
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as connection:
        try:
            row = connection.execute(
                "SELECT COUNT(*), COUNT(DISTINCT request_id), "
                "SUM(CASE WHEN answer <> '' THEN 1 ELSE 0 END) FROM examples"
            ).fetchone()
        except sqlite3.OperationalError:  # not created yet
            return 0, 0, 0
    return int(row[0]), int(row[1]), int(row[2] or 0)


async def test_kill_9_five_times_during_2000_ratings_stores_each_exactly_once(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    audit_port, feedback_port = free_port(), free_port()
    env = {
        **inherited,
        "PYTHONPATH": str(ROOT),
        "PYTHONUNBUFFERED": "1",
        "MESHLLM_KAFKA__BOOTSTRAP": kafka_bootstrap,
        "MESHLLM_KAFKA__SESSION_TIMEOUT_MS": "1000",  # a killed member leaves the group fast
        "MESHLLM_DATA_DIR": str(tmp_path),
        "MESHLLM_LOG_FORMAT": "json",
        "MESHLLM_AUDIT_API_PORT": str(audit_port),
        "MESHLLM_AUDIT_URL": f"http://127.0.0.1:{audit_port}",
        "MESHLLM_FEEDBACK_API_PORT": str(feedback_port),
    }
    audit = Service("services.audit", free_port(), env, tmp_path / "audit.log")
    feedback = Service("services.feedback", free_port(), env, tmp_path / "feedback.log")
    settings = MeshSettings(kafka=KafkaSettings(bootstrap=kafka_bootstrap))
    publisher = Publisher(settings, service="gateway")
    await publisher.start()
    try:
        await audit.start()
        await audit.ready(timeout=60)
        answers = [  # as the gateway and the router audit them
            audit_event(kind=kind, request_id=f"r{n:05d}", text=f"answer {n}")
            for n in range(RATINGS)
            for kind in ("request", "response")
        ]
        await asyncio.gather(*await publisher.enqueue_many(AUDIT_EVENTS, answers))
        await feedback.start()
        await feedback.ready(timeout=60)
        ratings = [
            ev.FeedbackEvent(request_id=f"r{n:05d}", user="alice", rating=1 - 2 * (n % 2))
            for n in range(RATINGS)
        ]
        for rating in ratings:
            stamp(rating, producer="gateway", tenant="acme")
        await asyncio.gather(*await publisher.enqueue_many(FEEDBACK_EVENTS, ratings, tenant="acme"))
        kills_at = []
        db = tmp_path / "feedback" / "feedback.sqlite"
        for _ in range(KILLS):
            floor = stored(db)[0]
            deadline = time.monotonic() + 60
            while stored(db)[0] < min(RATINGS - 1, floor + 150) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            kills_at.append(stored(db)[0])
            await feedback.stop(signal.SIGKILL)
            await feedback.start()
            await feedback.ready(timeout=60)
        deadline = time.monotonic() + 180
        while stored(db)[0] < RATINGS and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        await asyncio.sleep(2)  # anything redelivered after the last count lands by now
        assert stored(db) == (RATINGS, RATINGS, RATINGS), feedback.log.read_text()[-3000:]
        assert len(kills_at) == KILLS
        assert kills_at[0] < RATINGS  # the first kill came while ratings were still arriving
    finally:
        await publisher.stop()
        await feedback.stop()
        await audit.stop()
