"""Suite-wide fixtures: the broker (started here unless one is given) and helpers."""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from shared.bus.admin import ensure_topics
from shared.bus.embedded import EmbeddedBroker
from shared.topics import Topic
from tests.procs.redis import redis_server
from tests.procs.topics import scratch_topic

ROOT = Path(__file__).resolve().parent.parent


_SPANS = InMemorySpanExporter()


def pytest_sessionstart(session: pytest.Session) -> None:
    """Build the engine's CPU kernels once, up front, where the inference extra is installed.

    A service started by a test would otherwise build them on its first model load (about a
    minute on a 2-core machine, on top of the load) and race its start-up timeout.
    """
    try:
        import torch  # noqa: F401
    except ImportError:
        return
    from meshllm_kernels import cpu

    cpu.available()


@pytest.fixture(scope="session", autouse=True)
def tracer_provider() -> TracerProvider:
    """The suite's process-wide tracer provider, as a service's would be, exporting to memory."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(_SPANS))
    trace.set_tracer_provider(provider)
    return provider


@pytest.fixture
def spans() -> InMemorySpanExporter:
    """Spans finished during this test."""
    _SPANS.clear()
    return _SPANS


@pytest.fixture(scope="module")
async def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    """A Kafka-compatible broker with the registered topics: ``MESHLLM_TEST_KAFKA``, or an
    embedded one for each test module.

    The embedded broker slows down as its partitions fill (a fetch walks the partition's
    record batches: ``meshbench/results/broker_fetch_cost.md``), so one broker for the
    whole session made the later modules slow by the traffic of the earlier ones.
    """
    given = os.environ.get("MESHLLM_TEST_KAFKA")
    if given:
        await ensure_topics(given)
        yield given
        return
    broker = EmbeddedBroker(log_file=tmp_path_factory.mktemp("broker") / "broker.log")
    await broker.start()
    yield broker.bootstrap
    await broker.stop()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis server: ``MESHLLM_TEST_REDIS``, else a private one this suite starts."""
    given = os.environ.get("MESHLLM_TEST_REDIS")
    if given:
        yield given
        return
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture
async def fresh_topic(kafka_bootstrap: str) -> Topic:
    """A new topic (and its DLQ) no other test uses."""
    topic = scratch_topic(f"test.{uuid.uuid4().hex[:10]}")
    await ensure_topics(kafka_bootstrap, [topic])
    return topic


@pytest.fixture
def service_env(kafka_bootstrap: str, tmp_path: Path) -> Callable[..., dict[str, str]]:
    """Environment for a child service process pointed at the test broker."""

    def make(**extra: str) -> dict[str, str]:
        return {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "PYTHONUNBUFFERED": "1",
            "MESHLLM_KAFKA__BOOTSTRAP": kafka_bootstrap,
            "MESHLLM_DATA_DIR": str(tmp_path / "data"),
            "MESHLLM_LOG_FORMAT": "json",
            **extra,
        }

    return make


async def start_process(module: str, env: dict[str, str], log: Path) -> asyncio.subprocess.Process:
    with open(log, "ab") as out:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", module, env=env, stdout=out, stderr=out, cwd=ROOT
        )


async def poll_until(
    condition: Callable[[], object],
    timeout: float = 30.0,
    interval: float = 0.05,
    message: str = "condition",
) -> object:
    """Return the first truthy value of ``condition()``; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        await asyncio.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {message}")
