"""Where files, jobs, their events and checkpoints are kept: SQLite (embedded) or PostgreSQL
(cluster), one implementation over a :class:`~shared.sqldb.Driver`.

The job row is the truth every trainer replica shares. A runner takes a job with a lease
(:meth:`TrainerStore.claim`: one ``UPDATE`` that only succeeds on a queued job or a running
one whose lease ran out) and renews it while the job runs; a cancel is a flag the runner
reads when it renews. So a job is run by one runner at a time, a dead runner's job is taken
over, and a cancel reaches whichever replica runs it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from shared.sqldb import Driver

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS files (
        tenant TEXT NOT NULL, id TEXT NOT NULL, filename TEXT NOT NULL, purpose TEXT NOT NULL,
        bytes BIGINT NOT NULL, created_at BIGINT NOT NULL, sha256 TEXT NOT NULL,
        row_count BIGINT NOT NULL, kind TEXT NOT NULL, created_by TEXT NOT NULL,
        PRIMARY KEY (tenant, id))""",
    """CREATE TABLE IF NOT EXISTS jobs (
        id TEXT PRIMARY KEY, tenant TEXT NOT NULL, created_by TEXT NOT NULL,
        created_at BIGINT NOT NULL, model TEXT NOT NULL, base_version TEXT NOT NULL,
        tuning TEXT NOT NULL, training_file TEXT, validation_file TEXT, dataset TEXT,
        hyperparameters TEXT NOT NULL, suffix TEXT, seed BIGINT NOT NULL, metadata TEXT NOT NULL,
        status TEXT NOT NULL, started_at BIGINT, finished_at BIGINT, fine_tuned_model TEXT,
        error TEXT, trained_tokens BIGINT, owner TEXT, lease_until BIGINT NOT NULL DEFAULT 0,
        attempts BIGINT NOT NULL DEFAULT 0, cancel_requested BIGINT NOT NULL DEFAULT 0,
        progress TEXT, result TEXT)""",
    "CREATE INDEX IF NOT EXISTS jobs_tenant ON jobs (tenant, created_at)",
    "CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, lease_until)",
    """CREATE TABLE IF NOT EXISTS job_events (
        job_id TEXT NOT NULL, seq BIGINT NOT NULL, created_at BIGINT NOT NULL,
        level TEXT NOT NULL, type TEXT NOT NULL, message TEXT NOT NULL, data TEXT,
        PRIMARY KEY (job_id, seq))""",
    """CREATE TABLE IF NOT EXISTS job_checkpoints (
        job_id TEXT NOT NULL, step BIGINT NOT NULL, created_at BIGINT NOT NULL,
        metrics TEXT NOT NULL, path TEXT NOT NULL, PRIMARY KEY (job_id, step))""",
)
JOB_COLUMNS = (
    "id", "tenant", "created_by", "created_at", "model", "base_version", "tuning",
    "training_file", "validation_file", "dataset", "hyperparameters", "suffix", "seed",
    "metadata", "status", "started_at", "finished_at", "fine_tuned_model", "error",
    "trained_tokens", "owner", "lease_until", "attempts", "cancel_requested", "progress",
    "result",
)  # fmt: skip
JSON_COLUMNS = frozenset({"hyperparameters", "metadata", "error", "progress", "result"})
FILE_COLUMNS = (
    "tenant", "id", "filename", "purpose", "bytes", "created_at", "sha256", "row_count", "kind",
    "created_by",
)  # fmt: skip


@dataclass(frozen=True)
class Job:
    """A job's row (JSON columns decoded)."""

    values: dict[str, Any]

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    @property
    def id(self) -> str:
        return str(self.values["id"])

    @property
    def status(self) -> str:
        return str(self.values["status"])


def _job(row: tuple[Any, ...]) -> Job:
    values = dict(zip(JOB_COLUMNS, row, strict=True))
    for name in JSON_COLUMNS:
        if values[name] is not None:
            values[name] = json.loads(values[name])
    return Job(values)


def _encode(name: str, value: Any) -> Any:
    if name in JSON_COLUMNS and value is not None:
        return json.dumps(value, ensure_ascii=False)
    return value


class TrainerStore:
    def __init__(self, driver: Driver) -> None:
        self.driver = driver

    async def open(self) -> TrainerStore:
        for statement in SCHEMA:
            await self.driver.execute(statement)
        return self

    async def close(self) -> None:
        await self.driver.close()

    # ------------------------------------------------------------------ files

    async def add_file(self, row: dict[str, Any]) -> None:
        marks = ", ".join("?" * len(FILE_COLUMNS))
        await self.driver.execute(
            f"INSERT INTO files ({', '.join(FILE_COLUMNS)}) VALUES ({marks})",
            [row[c] for c in FILE_COLUMNS],
        )

    async def file(self, tenant: str, file_id: str) -> dict[str, Any] | None:
        rows = await self.driver.fetch(
            f"SELECT {', '.join(FILE_COLUMNS)} FROM files WHERE tenant = ? AND id = ?",
            (tenant, file_id),
        )
        return dict(zip(FILE_COLUMNS, rows[0], strict=True)) if rows else None

    async def files(self, tenant: str, purpose: str | None, limit: int) -> list[dict[str, Any]]:
        where, args = "tenant = ?", [tenant]
        if purpose is not None:
            where, args = where + " AND purpose = ?", [*args, purpose]
        rows = await self.driver.fetch(
            f"SELECT {', '.join(FILE_COLUMNS)} FROM files WHERE {where} "
            "ORDER BY created_at DESC, id DESC LIMIT ?",
            (*args, limit),
        )
        return [dict(zip(FILE_COLUMNS, row, strict=True)) for row in rows]

    async def delete_file(self, tenant: str, file_id: str) -> str | None:
        """Delete a file's row unless an active job uses it; the job's id when one does."""
        async with self.driver.transaction() as tx:
            users = await tx.fetch(
                "SELECT id FROM jobs WHERE tenant = ? AND status IN ('queued', 'running') "
                "AND (training_file = ? OR validation_file = ?) LIMIT 1",
                (tenant, file_id, file_id),
            )
            if users:
                return str(users[0][0])
            await tx.execute("DELETE FROM files WHERE tenant = ? AND id = ?", (tenant, file_id))
        return None

    # ------------------------------------------------------------------ jobs

    async def add_job(self, values: dict[str, Any]) -> Job:
        row = {c: values.get(c) for c in JOB_COLUMNS}
        row.update(lease_until=0, attempts=0, cancel_requested=0)
        marks = ", ".join("?" * len(JOB_COLUMNS))
        await self.driver.execute(
            f"INSERT INTO jobs ({', '.join(JOB_COLUMNS)}) VALUES ({marks})",
            [_encode(c, row[c]) for c in JOB_COLUMNS],
        )
        return Job(row)

    async def job(self, job_id: str, tenant: str | None = None) -> Job | None:
        sql = f"SELECT {', '.join(JOB_COLUMNS)} FROM jobs WHERE id = ?"
        args: list[Any] = [job_id]
        if tenant is not None:
            sql, args = sql + " AND tenant = ?", [*args, tenant]
        rows = await self.driver.fetch(sql, args)
        return _job(rows[0]) if rows else None

    async def jobs(self, tenant: str, limit: int, after: str | None = None) -> list[Job]:
        """The tenant's jobs, newest first; ``after``: the last job id of the previous page."""
        where, args = "tenant = ?", [tenant]
        if after is not None:
            mark = "(SELECT created_at FROM jobs WHERE id = ? AND tenant = ?)"
            where += f" AND (created_at < {mark} OR (created_at = {mark} AND id < ?))"
            args += [after, tenant, after, tenant, after]
        rows = await self.driver.fetch(
            f"SELECT {', '.join(JOB_COLUMNS)} FROM jobs WHERE {where} "
            "ORDER BY created_at DESC, id DESC LIMIT ?",
            (*args, limit),
        )
        return [_job(row) for row in rows]

    async def runnable(self, now: int, limit: int = 10) -> list[str]:
        """Jobs waiting for a runner: queued, or running with a lease that ran out. A job
        cancelled while its runner was gone is finished as cancelled here."""
        await self.driver.execute(
            "UPDATE jobs SET status = 'cancelled', finished_at = ?, lease_until = 0 "
            "WHERE cancel_requested = 1 AND (status = 'queued' OR "
            "(status = 'running' AND lease_until < ?))",
            (now, now),
        )
        rows = await self.driver.fetch(
            "SELECT id FROM jobs WHERE cancel_requested = 0 AND (status = 'queued' OR "
            "(status = 'running' AND lease_until < ?)) ORDER BY created_at LIMIT ?",
            (now, limit),
        )
        return [str(row[0]) for row in rows]

    async def claim(self, job_id: str, owner: str, now: int, lease_until: int) -> Job | None:
        """Take a queued job, or a running one whose lease ran out; the job, or None when
        another runner holds it (or it is finished)."""
        changed = await self.driver.execute(
            "UPDATE jobs SET status = 'running', owner = ?, lease_until = ?, "
            "attempts = attempts + 1, started_at = COALESCE(started_at, ?) "
            "WHERE id = ? AND cancel_requested = 0 AND (status = 'queued' OR "
            "(status = 'running' AND lease_until < ?))",
            (owner, lease_until, now, job_id, now),
        )
        return await self.job(job_id) if changed else None

    async def renew(
        self, job_id: str, owner: str, lease_until: int, progress: dict[str, Any] | None
    ) -> bool:
        """Extend the lease (and note the progress); False when the job is no longer this
        runner's to run: cancelled, or taken over after the lease ran out."""
        changed = await self.driver.execute(
            "UPDATE jobs SET lease_until = ?, progress = COALESCE(?, progress) "
            "WHERE id = ? AND owner = ? AND status = 'running' AND cancel_requested = 0",
            (lease_until, _encode("progress", progress), job_id, owner),
        )
        return changed == 1

    async def finish(self, job_id: str, owner: str | None, status: str, **fields: Any) -> bool:
        """Move a job to a final state (with ``fields`` such as ``error``, ``result``,
        ``fine_tuned_model``); ``owner`` None: whoever holds it. False if already final, or
        (for ``succeeded``) if a cancel came first."""
        sets = ["status = ?", "lease_until = 0"] + [f"{name} = ?" for name in fields]
        args = [status, *(_encode(name, value) for name, value in fields.items())]
        where = "id = ? AND status IN ('queued', 'running')"
        if status == "succeeded":
            where += " AND cancel_requested = 0"
        args.append(job_id)
        if owner is not None:
            where += " AND owner = ?"
            args.append(owner)
        changed = await self.driver.execute(
            f"UPDATE jobs SET {', '.join(sets)} WHERE {where}", args
        )
        return changed == 1

    async def requeue(self, job_id: str, owner: str) -> None:
        """Give a job back (this runner stops; another may take it now), or finish it as
        cancelled when a cancel was asked for."""
        await self.driver.execute(
            "UPDATE jobs SET status = CASE WHEN cancel_requested = 1 THEN 'cancelled' "
            "ELSE 'queued' END, lease_until = 0, owner = NULL "
            "WHERE id = ? AND owner = ? AND status = 'running'",
            (job_id, owner),
        )

    async def request_cancel(self, tenant: str, job_id: str, now: int) -> Job | None:
        """Cancel: a queued job at once, a running one through its runner. The job after."""
        await self.driver.execute(
            "UPDATE jobs SET cancel_requested = 1, "
            "status = CASE WHEN status = 'queued' THEN 'cancelled' ELSE status END, "
            "finished_at = CASE WHEN status = 'queued' THEN ? ELSE finished_at END "
            "WHERE id = ? AND tenant = ? AND status IN ('queued', 'running')",
            (now, job_id, tenant),
        )
        return await self.job(job_id, tenant)

    # ------------------------------------------------------------------ events, checkpoints

    async def add_event(
        self, job_id: str, now: int, message: str, *, level: str = "info",
        kind: str = "message", data: dict[str, Any] | None = None,
    ) -> None:  # fmt: skip
        async with self.driver.transaction() as tx:
            await tx.lock("job-events:" + job_id)  # the API and a runner may both write
            rows = await tx.fetch(
                "SELECT COALESCE(MAX(seq), 0) FROM job_events WHERE job_id = ?", (job_id,)
            )
            await tx.execute(
                "INSERT INTO job_events (job_id, seq, created_at, level, type, message, data) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (job_id, int(rows[0][0]) + 1, now, level, kind, message,
                 None if data is None else json.dumps(data)),
            )  # fmt: skip

    async def events(
        self, job_id: str, limit: int, after: int | None = None
    ) -> list[dict[str, Any]]:
        """Newest first; ``after``: the sequence number of the previous page's last."""
        rows = await self.driver.fetch(
            "SELECT seq, created_at, level, type, message, data FROM job_events "
            "WHERE job_id = ? AND seq < ? ORDER BY seq DESC LIMIT ?",
            (job_id, 2**62 if after is None else after, limit),
        )
        return [
            {"seq": int(r[0]), "created_at": int(r[1]), "level": r[2], "type": r[3],
             "message": r[4], "data": None if r[5] is None else json.loads(r[5])}
            for r in rows
        ]  # fmt: skip

    async def add_checkpoint(
        self, job_id: str, step: int, now: int, metrics: dict[str, Any], path: str
    ) -> None:
        await self.driver.execute(
            "INSERT INTO job_checkpoints (job_id, step, created_at, metrics, path) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (job_id, step) DO UPDATE SET "
            "created_at = excluded.created_at, metrics = excluded.metrics, path = excluded.path",
            (job_id, step, now, json.dumps(metrics), path),
        )

    async def checkpoints(
        self, job_id: str, limit: int, before_step: int | None = None
    ) -> list[dict[str, Any]]:
        """Newest first; ``before_step``: the step of the previous page's last."""
        rows = await self.driver.fetch(
            "SELECT step, created_at, metrics, path FROM job_checkpoints WHERE job_id = ? "
            "AND step < ? ORDER BY step DESC LIMIT ?",
            (job_id, 2**62 if before_step is None else before_step, limit),
        )
        return [
            {"step": int(r[0]), "created_at": int(r[1]), "metrics": json.loads(r[2]),
             "path": r[3]}
            for r in rows
        ]  # fmt: skip
