"""Inference pools and their replicas: which pool serves a request, which replica takes it."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from services.router.settings import PoolConfig


@dataclass(eq=False)
class Replica:
    url: str
    in_flight: int = 0
    failed_until: float = 0.0
    failures: int = 0

    @property
    def healthy(self) -> bool:
        return time.monotonic() >= self.failed_until


class Pool:
    def __init__(self, config: PoolConfig, cooldown_s: float) -> None:
        self.config = config
        self.name = config.name
        self.replicas = [Replica(url) for url in config.replicas]
        self.slots = asyncio.Semaphore(config.max_concurrency)
        self._cooldown_s = cooldown_s

    @property
    def healthy(self) -> bool:
        return any(replica.healthy for replica in self.replicas)

    def pick(self, exclude: frozenset[str] = frozenset()) -> Replica | None:
        """The healthy replica with the fewest requests in flight, not in ``exclude``.

        When every candidate is cooling down after a failure, the one that failed
        longest ago is tried rather than failing the request outright.
        """
        candidates = [r for r in self.replicas if r.url not in exclude]
        if not candidates:
            return None
        healthy = [r for r in candidates if r.healthy]
        if healthy:
            return min(healthy, key=lambda r: r.in_flight)
        return min(candidates, key=lambda r: r.failed_until)

    def failed(self, replica: Replica) -> None:
        replica.failures += 1
        replica.failed_until = time.monotonic() + self._cooldown_s

    def succeeded(self, replica: Replica) -> None:
        replica.failed_until = 0.0


class Pools:
    """Pool choice: among the pools serving a priority, GPU before CPU, healthy first."""

    def __init__(self, configs: list[PoolConfig], cooldown_s: float) -> None:
        self.pools = [Pool(config, cooldown_s) for config in configs]

    def choose(self, priority: str) -> Pool | None:
        serving = [p for p in self.pools if priority in p.config.priorities]
        if not serving:
            return None
        ordered = sorted(serving, key=lambda p: (not p.healthy, p.config.kind != "gpu"))
        return ordered[0]
