"""Where rated examples and datasets are kept: SQLite (embedded) or PostgreSQL (cluster).

One implementation over a :class:`~shared.sqldb.Driver`. Tables:

- ``examples``: one row per (tenant, request id, subject), replaced by a newer rating only
  (``rated_at_ns``), so redelivered or reordered events cannot undo a later rating and a
  redelivery after a crash stores nothing twice.
- ``datasets``: one row per (tenant, dataset id) with its manifest; versions of a name are
  numbered here, in the transaction that stores the dataset, and never rewritten except by
  an erasure (which the manifest records).
- ``dataset_rows``: each split's JSON lines, with the request id each came from.
- ``erasures``: what each erasure removed, and which trained models had seen the content.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from services.feedback.datasets import SPLITS, Row, split_digest, whole_digest
from services.feedback.examples import Example, messages_from_json, messages_json
from services.feedback.quality import QualityCounts
from shared.sqldb import Driver

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS examples (
        tenant TEXT NOT NULL, request_id TEXT NOT NULL, subject TEXT NOT NULL,
        api_key_id TEXT NOT NULL, rating BIGINT NOT NULL, score BIGINT NOT NULL,
        labels TEXT NOT NULL, correction TEXT NOT NULL, comment TEXT NOT NULL,
        model TEXT NOT NULL, model_version TEXT NOT NULL, kind TEXT NOT NULL,
        messages TEXT NOT NULL, answer TEXT NOT NULL, finish_reason TEXT NOT NULL,
        chunks TEXT NOT NULL, rated_at_ns BIGINT NOT NULL, answered_at_ns BIGINT NOT NULL,
        event_id TEXT NOT NULL, redactions BIGINT NOT NULL, prompt TEXT NOT NULL DEFAULT '[]',
        PRIMARY KEY (tenant, request_id, subject))""",
    "CREATE INDEX IF NOT EXISTS examples_rated ON examples (tenant, rated_at_ns)",
    "CREATE INDEX IF NOT EXISTS examples_model ON examples (model, model_version)",
    """CREATE TABLE IF NOT EXISTS datasets (
        tenant TEXT NOT NULL, dataset_id TEXT NOT NULL, name TEXT NOT NULL,
        version BIGINT NOT NULL, created_at_ns BIGINT NOT NULL, manifest TEXT NOT NULL,
        PRIMARY KEY (tenant, dataset_id), UNIQUE (tenant, name, version))""",
    """CREATE TABLE IF NOT EXISTS dataset_rows (
        tenant TEXT NOT NULL, dataset_id TEXT NOT NULL, split TEXT NOT NULL,
        line_no BIGINT NOT NULL, request_id TEXT NOT NULL, line TEXT NOT NULL,
        PRIMARY KEY (tenant, dataset_id, split, line_no))""",
    "CREATE INDEX IF NOT EXISTS dataset_rows_request ON dataset_rows (tenant, request_id)",
    """CREATE TABLE IF NOT EXISTS erasures (
        tenant TEXT NOT NULL, request_id TEXT NOT NULL, erased_at_ns BIGINT NOT NULL,
        report TEXT NOT NULL)""",
)

ADDED_COLUMNS = (
    ("examples", "prompt", "TEXT NOT NULL DEFAULT '[]'"),
    # a preference pair's second source: the rejected answer's request (erasing either
    # side removes the pair)
    ("dataset_rows", "paired_request_id", "TEXT NOT NULL DEFAULT ''"),
)
"""Columns added since a table was first created: (table, column, definition)."""

COLUMNS = (
    "tenant, request_id, subject, api_key_id, rating, score, labels, correction, comment, "
    "model, model_version, kind, messages, answer, finish_reason, chunks, rated_at_ns, "
    "answered_at_ns, event_id, redactions, prompt"
)
_UPDATED = [c.strip() for c in COLUMNS.split(",")][3:]
UPSERT = (
    f"INSERT INTO examples ({COLUMNS}) VALUES ({', '.join('?' * 21)}) "
    "ON CONFLICT (tenant, request_id, subject) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in _UPDATED)
    + " WHERE excluded.rated_at_ns >= examples.rated_at_ns"
)


class DatasetExists(Exception):
    """Another build took this dataset's version first."""


@dataclass(frozen=True)
class FeedbackQuery:
    tenant: str
    request_id: str | None = None
    model: str | None = None
    model_version: str | None = None
    subject: str | None = None
    since_ns: int | None = None
    until_ns: int | None = None
    limit: int = 100
    after: tuple[int, str, str] | None = None  # (rated_at_ns, request_id, subject) of the last


def _row(example: Example) -> tuple[Any, ...]:
    return (
        example.tenant, example.request_id, example.subject, example.api_key_id,
        example.rating, example.score, json.dumps(list(example.labels), ensure_ascii=False),
        example.correction, example.comment, example.model, example.model_version,
        example.kind, messages_json(example.messages), example.answer, example.finish_reason,
        json.dumps(list(example.retrieved_chunk_ids)), example.rated_at_ns,
        example.answered_at_ns, example.event_id, example.redactions,
        messages_json(example.prompt),
    )  # fmt: skip


def _example(row: Sequence[Any]) -> Example:
    return Example(
        tenant=row[0], request_id=row[1], subject=row[2], api_key_id=row[3],
        rating=int(row[4]), score=int(row[5]), labels=tuple(json.loads(row[6])),
        correction=row[7], comment=row[8], model=row[9], model_version=row[10], kind=row[11],
        messages=messages_from_json(row[12]), answer=row[13], finish_reason=row[14],
        retrieved_chunk_ids=tuple(json.loads(row[15])), rated_at_ns=int(row[16]),
        answered_at_ns=int(row[17]), event_id=row[18], redactions=int(row[19]),
        prompt=messages_from_json(row[20]),
    )  # fmt: skip


class FeedbackStore:
    def __init__(self, driver: Driver) -> None:
        self.driver = driver

    async def open(self) -> FeedbackStore:
        for statement in SCHEMA:
            await self.driver.execute(statement)
        for table, column, definition in ADDED_COLUMNS:  # a store made by an older version
            if self.driver.dialect == "postgres":
                await self.driver.execute(
                    f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} {definition}"
                )
                continue
            present = await self.driver.fetch(f"PRAGMA table_info({table})")
            if column not in {row[1] for row in present}:
                await self.driver.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
        await self.driver.execute(
            "CREATE INDEX IF NOT EXISTS dataset_rows_paired "
            "ON dataset_rows (tenant, paired_request_id)"
        )
        return self

    async def close(self) -> None:
        await self.driver.close()

    # ------------------------------------------------------------------ examples

    async def put(self, example: Example) -> bool:
        """Store ``example``; False when a newer rating of the same subject is kept, or when
        the request's content was erased: no rating brings it back, whether a redelivered
        or replayed event or a new one (the audit log may still hold the conversation)."""
        async with self.driver.transaction() as tx:
            await tx.lock(_request_key(example.tenant, example.request_id))  # vs. an erasure
            erased = await tx.fetch(
                "SELECT 1 FROM erasures WHERE tenant = ? AND request_id = ?",
                [example.tenant, example.request_id],
            )
            if erased:
                return False
            return await tx.execute(UPSERT, _row(example)) > 0

    async def query(self, query: FeedbackQuery) -> list[Example]:
        """Examples of one tenant, newest first, a page at a time."""
        where: list[str] = ["tenant = ?"]
        args: list[Any] = [query.tenant]
        for column in ("request_id", "model", "model_version", "subject"):
            value = getattr(query, column)
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if query.since_ns is not None:
            where.append("rated_at_ns >= ?")
            args.append(query.since_ns)
        if query.until_ns is not None:
            where.append("rated_at_ns < ?")
            args.append(query.until_ns)
        if query.after is not None:
            at, request_id, subject = query.after
            where.append(
                "(rated_at_ns < ? OR (rated_at_ns = ? AND (request_id > ? OR "
                "(request_id = ? AND subject > ?))))"
            )
            args += [at, at, request_id, request_id, subject]
        sql = (
            f"SELECT {COLUMNS} FROM examples WHERE {' AND '.join(where)} "
            "ORDER BY rated_at_ns DESC, request_id, subject LIMIT ?"
        )
        return [_example(row) for row in await self.driver.fetch(sql, [*args, query.limit])]

    async def pages(
        self, tenant: str, since_ns: int | None, until_ns: int | None, size: int = 1000
    ) -> AsyncIterator[list[Example]]:
        """Every example of ``tenant`` rated in [since, until), newest first, ``size`` at a
        time (a dataset build reads the history this way, never all of it at once)."""
        page = FeedbackQuery(tenant, since_ns=since_ns, until_ns=until_ns, limit=size)
        while True:
            batch = await self.query(page)
            if batch:
                yield batch
            if len(batch) < page.limit:
                return
            last = batch[-1]
            page = FeedbackQuery(
                tenant, since_ns=since_ns, until_ns=until_ns, limit=size,
                after=(last.rated_at_ns, last.request_id, last.subject),
            )  # fmt: skip

    async def count(self) -> int:
        return int((await self.driver.fetch("SELECT COUNT(*) FROM examples"))[0][0])

    async def quality(self, tenant: str | None = None) -> list[QualityCounts]:
        """Rating counts per model version: every tenant's, or one tenant's."""
        where, args = ("WHERE tenant = ? ", [tenant]) if tenant is not None else ("", [])
        rows = await self.driver.fetch(
            "SELECT model, model_version, COUNT(*), "
            "SUM(CASE WHEN rating > 0 THEN 1 ELSE 0 END), "
            "SUM(CASE WHEN rating < 0 THEN 1 ELSE 0 END), "
            "SUM(CASE WHEN correction <> '' THEN 1 ELSE 0 END) "
            f"FROM examples {where}GROUP BY model, model_version ORDER BY model, model_version",
            args,
        )
        return [QualityCounts(r[0], r[1], int(r[2]), int(r[3]), int(r[4]), int(r[5])) for r in rows]

    async def purge(self, tenant: str | None, before_ns: int, keep: Sequence[str] = ()) -> int:
        """Delete the examples rated before ``before_ns`` (of ``tenant``, or of every tenant
        not in ``keep`` when None)."""
        if tenant is not None:
            return await self.driver.execute(
                "DELETE FROM examples WHERE tenant = ? AND rated_at_ns < ?", [tenant, before_ns]
            )
        marks = ", ".join("?" * len(keep))
        others = f" AND tenant NOT IN ({marks})" if keep else ""
        return await self.driver.execute(
            f"DELETE FROM examples WHERE rated_at_ns < ?{others}", [before_ns, *keep]
        )

    async def purge_datasets(
        self, tenant: str | None, before_ns: int, now_ns: int, keep: Sequence[str] = ()
    ) -> int:
        """Delete the rows of datasets built before ``before_ns`` (as :meth:`purge` picks
        tenants); their manifests stay, with the digests and ``content_purged_at_ns``, so
        what a model was trained on stays traceable. Returns the datasets purged."""
        if tenant is not None:
            where, args = "tenant = ?", [tenant]
        else:
            where = "1 = 1" + (f" AND tenant NOT IN ({', '.join('?' * len(keep))})" if keep else "")
            args = list(keep)
        purged = 0
        async with self.driver.transaction() as tx:
            rows = await tx.fetch(
                f"SELECT tenant, dataset_id, manifest FROM datasets WHERE {where} "
                "AND created_at_ns < ?",
                [*args, before_ns],
            )
            for owner, dataset_id, text in rows:
                manifest = json.loads(text)
                if manifest.get("content_purged_at_ns"):
                    continue
                await tx.execute(
                    "DELETE FROM dataset_rows WHERE tenant = ? AND dataset_id = ?",
                    [owner, dataset_id],
                )
                manifest["content_purged_at_ns"] = now_ns
                await _save_manifest(tx, owner, dataset_id, manifest)
                purged += 1
        return purged

    # ------------------------------------------------------------------ datasets

    async def add_dataset(
        self,
        tenant: str,
        name: str,
        created_at_ns: int,
        make: Callable[[int, set[str]], tuple[dict[str, Any], Sequence[Row]]],
    ) -> dict[str, Any]:
        """Store the next version of ``tenant``'s dataset ``name``: ``make(version, erased)``
        gives its manifest and rows, leaving out the requests erased so far (a build reads
        for a while; an erasure that finished meanwhile must not come back with it). Raises
        :class:`DatasetExists` if a concurrent build took the version (the caller builds
        again)."""
        async with self.driver.transaction() as tx:
            [(latest,)] = await tx.fetch(
                "SELECT COALESCE(MAX(version), 0) FROM datasets WHERE tenant = ? AND name = ?",
                [tenant, name],
            )
            version = int(latest) + 1
            erased = await tx.fetch("SELECT request_id FROM erasures WHERE tenant = ?", [tenant])
            manifest, rows = make(version, {str(row[0]) for row in erased})
            dataset_id = manifest["id"]
            try:
                await tx.execute(
                    "INSERT INTO datasets (tenant, dataset_id, name, version, created_at_ns, "
                    "manifest) VALUES (?, ?, ?, ?, ?, ?)",
                    [tenant, dataset_id, name, version, created_at_ns, json.dumps(manifest)],
                )
            except Exception as error:
                if "unique" in str(error).lower() or "duplicate" in str(error).lower():
                    raise DatasetExists(dataset_id) from error
                raise
            numbered = _numbered(rows)
            if numbered:
                await tx.executemany(
                    "INSERT INTO dataset_rows (tenant, dataset_id, split, line_no, request_id, "
                    "line, paired_request_id) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [(tenant, dataset_id, *row) for row in numbered],
                )
        return manifest

    async def datasets(self, tenant: str) -> list[dict[str, Any]]:
        rows = await self.driver.fetch(
            "SELECT manifest FROM datasets WHERE tenant = ? ORDER BY name, version", [tenant]
        )
        return [json.loads(row[0]) for row in rows]

    async def dataset(self, tenant: str, dataset_id: str) -> dict[str, Any] | None:
        rows = await self.driver.fetch(
            "SELECT manifest FROM datasets WHERE tenant = ? AND dataset_id = ?",
            [tenant, dataset_id],
        )
        return json.loads(rows[0][0]) if rows else None

    async def lines(self, tenant: str, dataset_id: str, split: str) -> list[str]:
        rows = await self.driver.fetch(
            "SELECT line FROM dataset_rows WHERE tenant = ? AND dataset_id = ? AND split = ? "
            "ORDER BY line_no",
            [tenant, dataset_id, split],
        )
        return [row[0] for row in rows]

    async def mark_used(self, tenant: str, dataset_id: str, model: str) -> dict[str, Any] | None:
        """Record that ``model`` (``name:version``) was trained on the dataset: an erasure
        then leaves its rows and names the model instead."""
        async with self.driver.transaction() as tx:
            manifest = await _manifest(tx, tenant, dataset_id)
            if manifest is None:
                return None
            if model not in manifest["used_by"]:
                manifest["used_by"].append(model)
                await _save_manifest(tx, tenant, dataset_id, manifest)
        return manifest

    # ------------------------------------------------------------------ erasure

    async def erase(self, tenant: str, request_id: str, now_ns: int) -> dict[str, Any]:
        """Remove a request's content: its examples, and its rows from every dataset no
        model was trained on yet (their manifests get new digests and name the erasure).
        Datasets already used keep their rows; the report names the models that saw it."""
        report: dict[str, Any] = {"request_id": request_id, "examples_removed": 0,
                                  "datasets_changed": [], "trained_models": []}  # fmt: skip
        async with self.driver.transaction() as tx:
            await tx.lock(_request_key(tenant, request_id))  # no rating lands half-way
            report["examples_removed"] = await tx.execute(
                "DELETE FROM examples WHERE tenant = ? AND request_id = ?", [tenant, request_id]
            )
            holding = await tx.fetch(
                "SELECT DISTINCT dataset_id FROM dataset_rows WHERE tenant = ? "
                "AND (request_id = ? OR paired_request_id = ?)",
                [tenant, request_id, request_id],
            )
            for (dataset_id,) in holding:
                manifest = await _manifest(tx, tenant, dataset_id)
                if manifest is None:
                    continue
                if manifest["used_by"]:
                    report["trained_models"] += manifest["used_by"]
                    continue
                await tx.execute(
                    "DELETE FROM dataset_rows WHERE tenant = ? AND dataset_id = ? "
                    "AND (request_id = ? OR paired_request_id = ?)",
                    [tenant, dataset_id, request_id, request_id],
                )
                await _refresh_digests(tx, tenant, dataset_id, manifest, request_id)
                report["datasets_changed"].append(dataset_id)
            await tx.execute(
                "INSERT INTO erasures (tenant, request_id, erased_at_ns, report) "
                "VALUES (?, ?, ?, ?)",
                [tenant, request_id, now_ns, json.dumps(report)],
            )
        return report


def _request_key(tenant: str, request_id: str) -> str:
    return f"feedback-request/{len(tenant)}/{tenant}/{request_id}"


def _numbered(rows: Sequence[Row]) -> list[tuple[str, int, str, str, str]]:
    counters = dict.fromkeys(SPLITS, 0)
    numbered = []
    for row in rows:
        paired = next((i for i in row.sources if i != row.request_id), "")
        numbered.append((row.split, counters[row.split], row.request_id, row.line, paired))
        counters[row.split] += 1
    return numbered


async def _manifest(tx: Driver, tenant: str, dataset_id: str) -> dict[str, Any] | None:
    rows = await tx.fetch(
        "SELECT manifest FROM datasets WHERE tenant = ? AND dataset_id = ?", [tenant, dataset_id]
    )
    return json.loads(rows[0][0]) if rows else None


async def _save_manifest(
    tx: Driver, tenant: str, dataset_id: str, manifest: dict[str, Any]
) -> None:
    await tx.execute(
        "UPDATE datasets SET manifest = ? WHERE tenant = ? AND dataset_id = ?",
        [json.dumps(manifest), tenant, dataset_id],
    )


async def _refresh_digests(
    tx: Driver, tenant: str, dataset_id: str, manifest: dict[str, Any], erased: str
) -> None:
    for split in SPLITS:
        rows = await tx.fetch(
            "SELECT line FROM dataset_rows WHERE tenant = ? AND dataset_id = ? AND split = ? "
            "ORDER BY line_no",
            [tenant, dataset_id, split],
        )
        sha, size = split_digest(row[0] for row in rows)
        manifest["splits"][split] = {"rows": len(rows), "bytes": size, "sha256": sha}
    manifest["sha256"] = whole_digest(manifest["splits"])
    manifest["rows"] = sum(manifest["splits"][s]["rows"] for s in SPLITS)
    left = await tx.fetch(  # a pair's other side goes with it
        "SELECT request_id, paired_request_id FROM dataset_rows WHERE tenant = ? "
        "AND dataset_id = ?",
        [tenant, dataset_id],
    )
    holding = {str(i) for row in left for i in row if i}
    manifest["source_request_ids"] = [r for r in manifest["source_request_ids"] if r in holding]
    manifest["erased_request_ids"].append(erased)
    await _save_manifest(tx, tenant, dataset_id, manifest)
