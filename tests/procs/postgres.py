"""A PostgreSQL database for the tests: a fresh database on ``MESHLLM_TEST_POSTGRES``, else on
the server at 127.0.0.1:5432 (started with ``pg_ctlcluster`` when it is installed and down).

The suite never skips for want of one: it fails with a message that says what is missing.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import glob
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"
MISSING = (
    "the feedback store's PostgreSQL tests need a server: install PostgreSQL (Debian: "
    "`apt-get install postgresql`; trust or password auth for the `postgres` user on "
    "127.0.0.1:5432), or point MESHLLM_TEST_POSTGRES at one (postgresql://user:pw@host:port/db)"
)


def _run(coroutine: Any) -> Any:
    """Run ``coroutine`` to its end on a loop of its own (callers may be inside one)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


async def _reachable(dsn: str) -> bool:
    import asyncpg

    try:
        connection = await asyncpg.connect(dsn, timeout=5)
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return False
    await connection.close()
    return True


def _start_local_cluster() -> None:
    tool = shutil.which("pg_ctlcluster")
    versions = sorted(os.path.basename(p) for p in glob.glob("/etc/postgresql/*"))
    if tool is None or not versions:
        raise RuntimeError(MISSING)
    subprocess.run(
        [tool, "--skip-systemctl-redirect", versions[-1], "main", "start"],
        check=False, capture_output=True, timeout=60,
    )  # fmt: skip


async def _admin(dsn: str, statement: str) -> None:
    import asyncpg

    connection = await asyncpg.connect(dsn, timeout=10)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


@contextmanager
def postgres_database() -> Iterator[str]:
    """A new, empty database for this test session; dropped afterwards. Yields its DSN."""
    server = os.environ.get("MESHLLM_TEST_POSTGRES", DEFAULT_SERVER)
    if not _run(_reachable(server)):
        if "MESHLLM_TEST_POSTGRES" in os.environ:
            raise RuntimeError(f"MESHLLM_TEST_POSTGRES ({server}) does not answer")
        _start_local_cluster()
        if not _run(_reachable(server)):
            raise RuntimeError(MISSING)
    name = f"meshllm_test_{uuid.uuid4().hex[:12]}"
    _run(_admin(server, f'CREATE DATABASE "{name}"'))
    base, _, _ = server.rpartition("/")
    try:
        yield f"{base}/{name}"
    finally:
        _run(_admin(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
