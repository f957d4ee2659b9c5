"""Creating the registered topics (and their dead-letter topics) on a broker."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, KafkaError

from shared.bus.security import client_options
from shared.logging import get_logger
from shared.settings import KafkaSettings
from shared.topics import DLQ_PARTITIONS, DLQ_RETENTION_MS, REGISTRY, Topic

log = get_logger(__name__)
TOPIC_ALREADY_EXISTS = 36


def topic_specs(topics: Iterable[Topic], replication: int = 1) -> list[NewTopic]:
    specs = []
    for topic in topics:
        config = {"retention.ms": str(topic.retention_ms), **topic.extra_config}
        specs.append(NewTopic(topic.name, topic.partitions, replication, topic_configs=config))
        if topic.consumers:
            specs.append(
                NewTopic(
                    topic.dlq,
                    DLQ_PARTITIONS,
                    replication,
                    topic_configs={"retention.ms": str(DLQ_RETENTION_MS)},
                )
            )
    return specs


async def wait_for_broker(
    bootstrap: str, timeout: float = 30.0, *, kafka: KafkaSettings | None = None
) -> None:
    """Return once the broker answers a metadata request; raise TimeoutError otherwise.
    ``kafka``: the client security settings (SASL, TLS) to connect with."""
    deadline = asyncio.get_running_loop().time() + timeout
    last_error: Exception | None = None
    host, _, port = bootstrap.split(",", maxsplit=1)[0].rpartition(":")
    while asyncio.get_running_loop().time() < deadline:
        try:
            _, writer = await asyncio.open_connection(host, int(port))
            writer.close()
        except OSError as error:
            last_error = error
            await asyncio.sleep(0.05)
            continue
        admin = AIOKafkaAdminClient(
            bootstrap_servers=bootstrap, request_timeout_ms=2000, **_security(kafka)
        )
        try:
            await admin.start()
            await admin.list_topics()
            return
        except (KafkaConnectionError, KafkaError, OSError) as error:
            last_error = error
            await asyncio.sleep(0.1)
        finally:
            await admin.close()
    raise TimeoutError(
        f"no Kafka broker answered at {bootstrap} within {timeout:.0f}s: {last_error}"
    )


def _security(kafka: KafkaSettings | None) -> dict[str, Any]:
    return client_options(kafka) if kafka is not None else {}


async def ensure_topics(
    bootstrap: str,
    topics: Iterable[Topic] = REGISTRY,
    replication: int = 1,
    *,
    kafka: KafkaSettings | None = None,
) -> list[str]:
    """Create whichever registered topics are missing; return the names created.
    ``kafka``: the client security settings (SASL, TLS) to connect with."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **_security(kafka))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [s for s in topic_specs(topics, replication) if s.name not in existing]
        if not missing:
            return []
        response = await admin.create_topics(missing)
        created = []
        for name, code, *message in response.topic_errors:
            if code == 0:
                created.append(name)
            elif code != TOPIC_ALREADY_EXISTS:
                raise RuntimeError(f"could not create topic {name}: error {code} {message}")
        log.info("topics created", count=len(created))
        return created
    finally:
        await admin.close()
