"""Remembers which events a consumer group has processed, so redeliveries are absorbed.

The store is durable (SQLite in WAL mode) so a consumer restarted after a crash
still recognises events it processed but had not yet committed. Marking happens
before the offset commit; a crash between handler and mark can run a handler a
second time, so handlers whose effect lives in their own store should make that
effect idempotent by event id too (the audit store does).
"""

from __future__ import annotations

import itertools
import sqlite3
from pathlib import Path
from typing import Protocol

from shared.files import private_file


class IdempotencyStore(Protocol):
    def seen(self, event_id: str) -> bool: ...

    def mark(self, event_ids: list[str]) -> None: ...

    def close(self) -> None: ...


class SqliteIdempotencyStore:
    """Processed event ids of one consumer group, in a SQLite file, newest ``window`` kept.

    The ids are also held in memory (loaded at start), so the check for a duplicate,
    done for every event, never reads the file; only marking writes to it.
    """

    def __init__(self, path: Path, *, window: int = 200_000) -> None:
        self._db = sqlite3.connect(
            private_file(path), isolation_level=None, check_same_thread=False
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL loses nothing when the process dies; only a machine crash can.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS processed "
            "(seq INTEGER PRIMARY KEY AUTOINCREMENT, event_id TEXT UNIQUE NOT NULL)"
        )
        self._window = window
        self._ids: dict[str, None] = dict.fromkeys(
            row[0] for row in self._db.execute("SELECT event_id FROM processed ORDER BY seq")
        )
        self._prune()

    def seen(self, event_id: str) -> bool:
        return event_id in self._ids

    def mark(self, event_ids: list[str]) -> None:
        fresh = [e for e in event_ids if e not in self._ids]
        if not fresh:
            return
        # One statement is one implicit transaction: durable once it returns.
        self._db.executemany(
            "INSERT OR IGNORE INTO processed (event_id) VALUES (?)", [(e,) for e in fresh]
        )
        self._ids.update(dict.fromkeys(fresh))
        if len(self._ids) > self._window + self._window // 10:
            self._prune()

    def _prune(self) -> None:
        excess = len(self._ids) - self._window
        if excess <= 0:
            return
        self._db.execute(
            "DELETE FROM processed WHERE seq <= (SELECT MAX(seq) FROM processed) - ?",
            (self._window,),
        )
        for event_id in list(itertools.islice(self._ids, excess)):
            del self._ids[event_id]

    def close(self) -> None:
        self._db.close()


class MemoryIdempotencyStore:
    """For consumers whose effects are not durable either (caches, live relays)."""

    def __init__(self, *, window: int = 200_000) -> None:
        self._ids: dict[str, None] = {}
        self._window = window

    def seen(self, event_id: str) -> bool:
        return event_id in self._ids

    def mark(self, event_ids: list[str]) -> None:
        for event_id in event_ids:
            self._ids[event_id] = None
        while len(self._ids) > self._window:
            del self._ids[next(iter(self._ids))]

    def close(self) -> None:
        self._ids.clear()
