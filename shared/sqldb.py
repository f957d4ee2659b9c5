"""The two databases the feedback and trainer stores run on, behind one small
:class:`Driver` contract.

- :class:`SqliteDriver` (embedded mode): one connection, its calls on a worker thread and
  one at a time; a transaction holds the connection (``BEGIN IMMEDIATE``).
- :class:`PostgresDriver` (cluster mode): an asyncpg pool; a transaction holds one
  connection of it.

The store writes its SQL once, with ``?`` placeholders and types both databases take
(``BIGINT``, ``TEXT``, ``INSERT ... ON CONFLICT``); the PostgreSQL driver numbers the
placeholders (``$1``, ``$2``...).
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any, Protocol

Rows = list[tuple[Any, ...]]
_PLACEHOLDER = re.compile(r"\?")


class Driver(Protocol):
    dialect: str  # "sqlite" or "postgres"

    async def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        """Run one statement; the rows it changed."""

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None: ...

    async def fetch(self, sql: str, args: Sequence[Any] = ()) -> Rows: ...

    def transaction(self) -> AbstractAsyncContextManager[Driver]:
        """A driver whose statements commit together when the block ends (roll back if it
        raises)."""

    async def lock(self, key: str) -> None:
        """Inside a transaction: hold ``key`` until it ends, so that two transactions about
        the same thing run one after the other."""

    async def close(self) -> None: ...


class _SqliteConnection:
    """Statements on one sqlite3 connection, each on a worker thread; no locking."""

    dialect = "sqlite"

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._db = connection

    def _run(self, sql: str, args: Sequence[Any]) -> tuple[int, Rows]:
        cursor = self._db.execute(sql, tuple(args))
        return cursor.rowcount, [tuple(row) for row in cursor.fetchall()]

    async def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        return (await asyncio.to_thread(self._run, sql, args))[0]

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        await asyncio.to_thread(self._db.executemany, sql, [tuple(r) for r in rows])

    async def fetch(self, sql: str, args: Sequence[Any] = ()) -> Rows:
        return (await asyncio.to_thread(self._run, sql, args))[1]

    def transaction(self) -> AbstractAsyncContextManager[Driver]:
        raise RuntimeError("transactions do not nest")

    async def lock(self, key: str) -> None:
        return None  # BEGIN IMMEDIATE already runs one writing transaction at a time

    async def close(self) -> None:
        return None


class SqliteDriver:
    dialect = "sqlite"

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # autocommit outside explicit transactions; WAL so that readers never wait on a build
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=10000")
        self._connection = _SqliteConnection(self._db)
        self._lock = asyncio.Lock()

    async def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        async with self._lock:
            return await self._connection.execute(sql, args)

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        async with self.transaction() as tx:
            await tx.executemany(sql, rows)

    async def fetch(self, sql: str, args: Sequence[Any] = ()) -> Rows:
        async with self._lock:
            return await self._connection.fetch(sql, args)

    async def lock(self, key: str) -> None:
        raise RuntimeError("a lock is taken inside a transaction")

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Driver]:
        async with self._lock:
            await asyncio.to_thread(self._db.execute, "BEGIN IMMEDIATE")
            try:
                yield self._connection
            except BaseException:
                await asyncio.to_thread(self._db.execute, "ROLLBACK")
                raise
            await asyncio.to_thread(self._db.execute, "COMMIT")

    async def close(self) -> None:
        async with self._lock:
            await asyncio.to_thread(self._db.close)


def numbered(sql: str) -> str:
    """``?`` placeholders as PostgreSQL's ``$1, $2...`` (the store's SQL has no ``?``
    inside string literals)."""
    counter = iter(range(1, 10_000))
    return _PLACEHOLDER.sub(lambda _: f"${next(counter)}", sql)


class _PostgresConnection:
    dialect = "postgres"

    def __init__(self, connection: Any) -> None:
        self._conn = connection

    async def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        status = await self._conn.execute(numbered(sql), *args)
        last = str(status).rsplit(" ", 1)[-1]
        return int(last) if last.isdigit() else 0

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        await self._conn.executemany(numbered(sql), [tuple(r) for r in rows])

    async def fetch(self, sql: str, args: Sequence[Any] = ()) -> Rows:
        return [tuple(record) for record in await self._conn.fetch(numbered(sql), *args)]

    def transaction(self) -> AbstractAsyncContextManager[Driver]:
        raise RuntimeError("transactions do not nest")

    async def lock(self, key: str) -> None:
        await self._conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", key)

    async def close(self) -> None:
        return None


class PostgresDriver:
    dialect = "postgres"

    def __init__(self, pool: Any) -> None:
        self._pool = pool

    @classmethod
    async def connect(
        cls, dsn: str, *, password: str | None = None, min_size: int = 1, max_size: int = 8
    ) -> PostgresDriver:
        import asyncpg

        pool = await asyncpg.create_pool(
            dsn, password=password, min_size=min_size, max_size=max_size, timeout=10
        )
        return cls(pool)

    async def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        async with self._pool.acquire() as connection:
            return await _PostgresConnection(connection).execute(sql, args)

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        async with self.transaction() as tx:
            await tx.executemany(sql, rows)

    async def fetch(self, sql: str, args: Sequence[Any] = ()) -> Rows:
        async with self._pool.acquire() as connection:
            return await _PostgresConnection(connection).fetch(sql, args)

    async def lock(self, key: str) -> None:
        raise RuntimeError("a lock is taken inside a transaction")

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Driver]:
        async with self._pool.acquire() as connection, connection.transaction():
            yield _PostgresConnection(connection)

    async def close(self) -> None:
        await self._pool.close()


async def open_driver(
    kind: str, sqlite_path: Path, url: str | None, password_file: Path | None, *, prefix: str
) -> Driver:
    """A store's database as its service's settings choose it: ``kind`` "sqlite" (a file)
    or "postgres" (``url``, with the password from ``password_file`` if given); ``prefix``
    names the settings in the error (``MESHLLM_FEEDBACK``).

    Raises:
        SettingsError: postgres without a URL.
    """
    from shared.settings import SettingsError

    if kind == "sqlite":
        return await asyncio.to_thread(SqliteDriver, sqlite_path)
    if url is None:
        raise SettingsError(
            f"{prefix}_DATABASE_URL is required with the postgres store "
            "(postgresql://user:password@host:port/database)"
        )
    password = password_file.read_text().strip() if password_file is not None else None
    return await PostgresDriver.connect(url, password=password)
