"""The audit store in one SQLite file (embedded mode).

Schema::

    meta(key TEXT PRIMARY KEY, value TEXT)             -- schema version, log id
    records(
        leaf_index INTEGER PRIMARY KEY,                -- contiguous from 0
        event_id TEXT NOT NULL UNIQUE,                 -- a redelivery finds its record here
        request_id, tenant, api_key_id, user, model, model_version, kind TEXT NOT NULL,
        occurred_at_ns INTEGER NOT NULL,               -- the envelope's occurred_at
        appended_at_ns INTEGER NOT NULL,
        event BLOB,                                    -- the leaf data; NULL once purged
        leaf_hash BLOB NOT NULL,                       -- SHA-256(0x00 || event)
        seal BLOB,                                     -- key id + HMAC(log id, leaf index, hash)
        purged_at_ns INTEGER)
    checkpoints(id INTEGER PRIMARY KEY, tree_size, timestamp_ns, root_hash, key_id, log_id,
                signature)
    purges(id INTEGER PRIMARY KEY, tenant, before_ns, purged_at_ns, count)

A batch is one ``BEGIN IMMEDIATE`` transaction: the next leaf index is read under SQLite's
write lock, so several writers (processes) can share the file without gaps or overlaps.
``synchronous = FULL`` makes a committed batch survive a power cut, since the caller commits
its Kafka offsets right after. ``secure_delete`` overwrites purged content on disk.
"""

from __future__ import annotations

import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from services.audit.checkpoint import Checkpoint, validate_log_id
from services.audit.records import (
    AppendResult,
    AuditQuery,
    AuditRecord,
    Page,
    PurgeRecord,
    Sealer,
    to_ns,
)
from services.audit.store import AppendInput, AuditStore, StoreError, parse_all
from shared.files import private_file

SCHEMA_VERSION = "1"
_SCAN_BATCH = 2_000
_COLUMNS = (
    "leaf_index, event_id, request_id, tenant, api_key_id, user, model, model_version, kind, "
    "occurred_at_ns, appended_at_ns, event, leaf_hash, seal, purged_at_ns"
)
# Read back as bytes whatever was written into them (a verifier must not trip over a TEXT value).
_SELECT = _COLUMNS.replace("event,", "CAST(event AS BLOB),").replace(
    "leaf_hash, seal", "CAST(leaf_hash AS BLOB), CAST(seal AS BLOB)"
)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    leaf_index INTEGER PRIMARY KEY,
    event_id TEXT NOT NULL UNIQUE,
    request_id TEXT NOT NULL,
    tenant TEXT NOT NULL,
    api_key_id TEXT NOT NULL,
    user TEXT NOT NULL,
    model TEXT NOT NULL,
    model_version TEXT NOT NULL,
    kind TEXT NOT NULL,
    occurred_at_ns INTEGER NOT NULL,
    appended_at_ns INTEGER NOT NULL,
    event BLOB,
    leaf_hash BLOB NOT NULL,
    seal BLOB,
    purged_at_ns INTEGER
);
CREATE INDEX IF NOT EXISTS records_tenant ON records (tenant, leaf_index);
CREATE INDEX IF NOT EXISTS records_tenant_time ON records (tenant, occurred_at_ns);
CREATE INDEX IF NOT EXISTS records_api_key ON records (api_key_id, leaf_index);
CREATE INDEX IF NOT EXISTS records_user ON records (user, leaf_index);
CREATE INDEX IF NOT EXISTS records_model_version ON records (model_version, leaf_index);
CREATE INDEX IF NOT EXISTS records_request ON records (request_id, leaf_index);
CREATE INDEX IF NOT EXISTS records_time ON records (occurred_at_ns);
CREATE TABLE IF NOT EXISTS checkpoints (
    id INTEGER PRIMARY KEY,
    tree_size INTEGER NOT NULL,
    timestamp_ns INTEGER NOT NULL,
    root_hash BLOB NOT NULL,
    key_id TEXT NOT NULL,
    log_id TEXT NOT NULL,
    signature BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS checkpoints_size ON checkpoints (tree_size, timestamp_ns);
CREATE TABLE IF NOT EXISTS purges (
    id INTEGER PRIMARY KEY,
    tenant TEXT NOT NULL,
    before_ns INTEGER NOT NULL,
    purged_at_ns INTEGER NOT NULL,
    count INTEGER NOT NULL
);
"""


def _record(row: tuple[Any, ...]) -> AuditRecord:
    return AuditRecord(
        leaf_index=row[0],
        event_id=row[1],
        request_id=row[2],
        tenant=row[3],
        api_key_id=row[4],
        user=row[5],
        model=row[6],
        model_version=row[7],
        kind=row[8],
        occurred_at_ns=row[9],
        appended_at_ns=row[10],
        raw=None if row[11] is None else bytes(row[11]),
        leaf_hash=bytes(row[12]),
        seal=None if row[13] is None else bytes(row[13]),
        purged_at_ns=row[14],
    )


class SqliteAuditStore(AuditStore):
    """The audit store in a SQLite file (WAL). Thread-safe: one connection under a lock."""

    def __init__(self, path: Path, *, read_only: bool = False, log_id: str | None = None) -> None:
        """Open (or create) the store at ``path``.

        ``log_id`` names a new store (default: ``meshllm-audit/<random hex>``); an existing
        store keeps its own.

        Raises:
            StoreError: ``read_only`` and no store exists at ``path``, or it is not a store.
        """
        self.path = Path(path)
        self._lock = threading.Lock()
        if read_only:
            if not self.path.is_file():
                raise StoreError(f"no audit store at {self.path}")
            self._db = sqlite3.connect(
                f"{self.path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False
            )
        else:
            self._db = sqlite3.connect(
                private_file(self.path), check_same_thread=False, isolation_level=None
            )
        self._db.isolation_level = None
        self._db.text_factory = lambda value: value.decode("utf-8", "replace")
        self._db.execute("PRAGMA busy_timeout = 10000")
        try:
            if not read_only:
                self._db.execute("PRAGMA journal_mode = WAL")
                self._db.execute("PRAGMA synchronous = FULL")
                self._db.execute("PRAGMA secure_delete = ON")
                self._db.executescript(_SCHEMA)
                self._db.execute(
                    "INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,)
                )
                new_id = validate_log_id(log_id or f"meshllm-audit/{uuid.uuid4().hex}")
                self._db.execute("INSERT OR IGNORE INTO meta VALUES ('log_id', ?)", (new_id,))
            row = self._db.execute("SELECT value FROM meta WHERE key = 'log_id'").fetchone()
        except sqlite3.DatabaseError as error:
            self._db.close()
            raise StoreError(f"{self.path} is not an audit store: {error}") from None
        if row is None:
            self._db.close()
            raise StoreError(f"{self.path} is not an audit store (no log id)")
        self.log_id: str = row[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def append(
        self, events: Sequence[AppendInput], *, seal: Sealer | None = None
    ) -> list[AppendResult]:
        parsed = parse_all(events)
        appended_at = time.time_ns()
        results: list[AppendResult] = []
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                (next_index,) = db.execute(
                    "SELECT coalesce(max(leaf_index) + 1, 0) FROM records"
                ).fetchone()
                for event in parsed:
                    found = db.execute(
                        "SELECT leaf_index, leaf_hash FROM records WHERE event_id = ?",
                        (event.event_id,),
                    ).fetchone()
                    if found is not None:
                        conflict = bytes(found[1]) != event.leaf_hash
                        results.append(AppendResult(event.event_id, found[0], False, conflict))
                        continue
                    db.execute(
                        f"INSERT INTO records ({_COLUMNS}) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL)",
                        (
                            next_index,
                            event.event_id,
                            event.request_id,
                            event.tenant,
                            event.api_key_id,
                            event.user,
                            event.model,
                            event.model_version,
                            event.kind,
                            event.occurred_at_ns,
                            appended_at,
                            event.raw,
                            event.leaf_hash,
                            seal(next_index, event.leaf_hash) if seal else None,
                        ),
                    )
                    results.append(AppendResult(event.event_id, next_index, True))
                    next_index += 1
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return results

    def size(self) -> int:
        with self._lock:
            (size,) = self._db.execute(
                "SELECT coalesce(max(leaf_index) + 1, 0) FROM records"
            ).fetchone()
        return int(size)

    def leaf_hashes(self, start: int = 0) -> Iterator[tuple[int, bytes]]:
        position = start
        while True:
            with self._lock:
                rows = self._db.execute(
                    "SELECT leaf_index, CAST(leaf_hash AS BLOB) FROM records WHERE leaf_index >= ? "
                    "ORDER BY leaf_index LIMIT ?",
                    (position, _SCAN_BATCH * 10),
                ).fetchall()
            for index, value in rows:
                yield index, bytes(value)
            if len(rows) < _SCAN_BATCH * 10:
                return
            position = rows[-1][0] + 1

    def records(self, start: int = 0, end: int | None = None) -> Iterator[AuditRecord]:
        position = start
        stop = end if end is not None else 1 << 62
        while position < stop:
            with self._lock:
                rows = self._db.execute(
                    f"SELECT {_SELECT} FROM records "
                    "WHERE leaf_index >= ? AND leaf_index < ? ORDER BY leaf_index LIMIT ?",
                    (position, stop, _SCAN_BATCH),
                ).fetchall()
            for row in rows:
                yield _record(row)
            if len(rows) < _SCAN_BATCH:
                return
            position = rows[-1][0] + 1

    def get(self, leaf_index: int) -> AuditRecord | None:
        return self._one("leaf_index = ?", leaf_index)

    def get_by_event_id(self, event_id: str) -> AuditRecord | None:
        return self._one("event_id = ?", event_id)

    def _one(self, condition: str, value: object) -> AuditRecord | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {_SELECT} FROM records WHERE {condition}",
                (value,),
            ).fetchone()
        return None if row is None else _record(row)

    def query(self, query: AuditQuery) -> Page:
        conditions: list[str] = []
        values: list[object] = []
        for column, value in query.equalities().items():
            conditions.append(f"{column} = ?")  # column names come from AuditQuery, not input
            values.append(value)
        if query.since is not None:
            conditions.append("occurred_at_ns >= ?")
            values.append(to_ns(query.since))
        if query.until is not None:
            conditions.append("occurred_at_ns < ?")
            values.append(to_ns(query.until))
        if query.after is not None:
            conditions.append("leaf_index < ?" if query.descending else "leaf_index > ?")
            values.append(query.after)
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        order = "DESC" if query.descending else "ASC"
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_SELECT} FROM records {where} ORDER BY leaf_index {order} LIMIT ?",
                (*values, query.limit + 1),
            ).fetchall()
        records = [_record(row) for row in rows[: query.limit]]
        more = len(rows) > query.limit
        return Page(records, records[-1].leaf_index if more else None)

    def add_checkpoint(self, checkpoint: Checkpoint) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO checkpoints "
                "(tree_size, timestamp_ns, root_hash, key_id, log_id, signature) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (
                    checkpoint.tree_size,
                    checkpoint.timestamp_ns,
                    checkpoint.root_hash,
                    checkpoint.key_id,
                    checkpoint.log_id,
                    checkpoint.signature,
                ),
            )

    def checkpoints(self) -> list[Checkpoint]:
        return self._checkpoints("ORDER BY tree_size, timestamp_ns, id")

    def _checkpoints(self, clause: str, *values: object) -> list[Checkpoint]:
        with self._lock:
            rows = self._db.execute(
                "SELECT log_id, tree_size, root_hash, timestamp_ns, key_id, signature "
                f"FROM checkpoints {clause}",
                values,
            ).fetchall()
        return [
            Checkpoint(row[0], row[1], bytes(row[2]), row[3], row[4], bytes(row[5])) for row in rows
        ]

    def latest_checkpoint(self) -> Checkpoint | None:
        found = self._checkpoints("ORDER BY tree_size DESC, timestamp_ns DESC, id DESC LIMIT 1")
        return found[0] if found else None

    def checkpoint_at(self, tree_size: int) -> Checkpoint | None:
        found = self._checkpoints(
            "WHERE tree_size = ? ORDER BY timestamp_ns DESC, id DESC LIMIT 1", tree_size
        )
        return found[0] if found else None

    def tenants(self) -> list[str]:
        with self._lock:
            rows = self._db.execute("SELECT DISTINCT tenant FROM records ORDER BY tenant")
            return [row[0] for row in rows]

    def purge(self, tenant: str, before_ns: int, *, now_ns: int | None = None) -> int:
        now_ns = time.time_ns() if now_ns is None else now_ns
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                count = db.execute(
                    "UPDATE records SET event = NULL, request_id = '', api_key_id = '', "
                    "user = '', purged_at_ns = ? "
                    "WHERE tenant = ? AND occurred_at_ns < ? AND event IS NOT NULL",
                    (now_ns, tenant, before_ns),
                ).rowcount
                if count:
                    db.execute(
                        "INSERT INTO purges (tenant, before_ns, purged_at_ns, count) "
                        "VALUES (?, ?, ?, ?)",
                        (tenant, before_ns, now_ns, count),
                    )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return int(count)

    def purges(self) -> list[PurgeRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT tenant, before_ns, purged_at_ns, count FROM purges ORDER BY id"
            ).fetchall()
        return [PurgeRecord(*row) for row in rows]
