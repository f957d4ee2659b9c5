"""How far a consumer group is behind on some topics, asked of the broker from outside
the group (the ops loop's view of the queue; each consumer reports its own lag too, see
:mod:`shared.bus.metrics`).

The group commits an offset only up to its first unfinished record
(:mod:`shared.bus.work`), so ``end offset - committed offset`` counts every record the
group has not finished: not fetched, buffered, or in progress. For the router on the
request topics, that is the requests the gateway accepted that no one has answered yet.
A partition the group never committed counts from its log start.
"""

from __future__ import annotations

from collections.abc import Iterable

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from shared.bus.metrics import lag_of
from shared.bus.security import client_options
from shared.settings import KafkaSettings
from shared.topics import Topic


class GroupLag:
    """One admin client (committed offsets) and one group-less consumer (log ends)."""

    def __init__(self, kafka: KafkaSettings, request_timeout_ms: int = 5000) -> None:
        options = {
            "bootstrap_servers": kafka.bootstrap,
            "request_timeout_ms": request_timeout_ms,
            **client_options(kafka),
        }
        self._admin = AIOKafkaAdminClient(**options)
        self._ends = AIOKafkaConsumer(enable_auto_commit=False, **options)

    async def start(self) -> None:
        await self._admin.start()
        await self._ends.start()

    async def close(self) -> None:
        await self._ends.stop()
        await self._admin.close()

    async def behind(self, group: str, topics: Iterable[Topic]) -> int:
        """Records of ``topics`` that ``group`` has not finished, summed over partitions."""
        partitions = [
            TopicPartition(topic.name, index)
            for topic in topics
            for index in range(topic.partitions)
        ]
        committed = await self._admin.list_consumer_group_offsets(group, partitions=partitions)
        starts = await self._ends.beginning_offsets(partitions)
        ends = await self._ends.end_offsets(partitions)
        rows = []
        for tp in partitions:
            done = committed.get(tp)
            offset = done.offset if done is not None and done.offset >= 0 else starts[tp]
            rows.append((tp, ends[tp], offset))
        return sum(lag_of(rows).values())

    async def members(self, group: str) -> int:
        """Consumers in ``group`` now (0 when it is empty, dead or unknown to the broker)."""
        count = 0
        for response in await self._admin.describe_consumer_groups([group]):
            for described in response.to_object().get("groups", []):
                if described.get("group") == group and described.get("error_code", 0) == 0:
                    count += len(described.get("members", []))
        return count

    async def records(self, topics: Iterable[str], partitions: int) -> int:
        """Records ever written to ``topics`` (``partitions`` each): their end offsets, which
        only grow (retention dropping old ones does not hide new ones)."""
        tps = [TopicPartition(name, index) for name in topics for index in range(partitions)]
        ends = await self._ends.end_offsets(tps)
        return sum(ends[tp] for tp in tps)
