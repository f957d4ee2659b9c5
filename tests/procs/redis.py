"""A Redis server for the tests: ``MESHLLM_TEST_REDIS``, else one of our own on a free port."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from shared.bus.embedded import free_port

MISSING = (
    "the tests of shared rate limits need a Redis server: install one (Debian: "
    "`apt-get install redis-server`), or point MESHLLM_TEST_REDIS at one (redis://host:port/0)"
)


@contextmanager
def redis_server(folder: Path) -> Iterator[str]:
    """A private ``redis-server`` (no persistence) on a free loopback port; yields its URL.

    Raises:
        RuntimeError: no ``redis-server`` on PATH (the message says how to get one), or it did
            not start.
    """
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError(MISSING)
    port = free_port()
    log = folder / "redis.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
             "no", "--dir", str(folder)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while b"Ready to accept connections" not in log.read_bytes():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start: {log.read_text()[-2000:]}")
            time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(10)
