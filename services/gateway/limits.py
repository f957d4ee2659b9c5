"""How much a caller may ask for: requests and tokens per minute, and requests at once.

These are the in-process limits of one gateway (the embedded mode). Gateways of a cluster
share theirs in Redis (:mod:`services.gateway.redis_limits`) behind the same protocols,
:class:`RateLimiter` and :class:`ConcurrencyGate`; both are async for that reason.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Literal, Protocol

from shared.logging import get_logger
from shared.openai_protocol import OpenAIError, ServiceUnavailableError

log = get_logger(__name__)

_PRUNE_EVERY = 4096


@dataclass(frozen=True)
class Limit:
    """Per-minute allowances; None means no limit of that kind."""

    requests_per_minute: int | None
    tokens_per_minute: int | None

    def __post_init__(self) -> None:
        for field in ("requests_per_minute", "tokens_per_minute"):
            value = getattr(self, field)
            if value is not None and value < 1:
                raise ValueError(f"{field} must be 1 or more, or None for no limit, not {value}")


Full = tuple[Literal["key", "tenant"], str, int]
"""Which scope has no slot free: ``("key" or "tenant", its name, its limit)``."""


class RateLimiter(Protocol):
    async def admit(
        self, key_id: str, tenant: str, key_limit: Limit, tenant_limit: Limit, tokens: int
    ) -> float | None:
        """Charge one request and ``tokens`` to the key and its tenant.

        Returns:
            None when admitted (both charged), else the seconds to wait before the request
            could be admitted (nothing charged).
        """
        ...

    async def settle(self, key_id: str, tenant: str, estimated: int, actual: int) -> None:
        """Correct the token charge of an admitted request once its real cost is known."""
        ...


class ConcurrencyGate(Protocol):
    async def acquire(self, key_id: str, tenant: str, slot: str) -> Full | None:
        """Take a slot of both the key and the tenant for ``slot`` (a request id), or neither.

        Returns:
            None when taken; else which scope is full.
        """
        ...

    async def release(self, key_id: str, tenant: str, slot: str) -> None:
        """Give back the slot :meth:`acquire` took for ``slot``."""
        ...


@dataclass
class _Bucket:
    capacity: float
    rate: float  # refill per second
    level: float
    updated: float

    def refill(self, capacity: float, now: float) -> None:
        self.capacity = capacity
        self.rate = capacity / 60.0
        self.level = min(capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now

    def full_at(self, now: float) -> bool:
        return self.level + (now - self.updated) * self.rate >= self.capacity


_BucketKey = tuple[Literal["key", "tenant"], str, Literal["requests", "tokens"]]


class LocalRateLimiter:
    """Token buckets, refilled continuously, per key and per tenant, for requests and tokens.

    A bucket holds one minute's allowance, so a quiet caller may burst up to its per-minute
    limit. A request needs one request token and its estimated tokens from each bucket of
    its key and tenant; it is admitted only when every bucket has enough, and then all are
    charged together (under one lock). A request estimated at more tokens than a full
    bucket holds is admitted when the bucket is full and leaves it in debt, which the refill
    pays back before the next one; otherwise it could never run.

    A bucket that has refilled to full is the same as no bucket, so such buckets are
    dropped now and then to keep memory bounded by the active callers.

    Args:
        clock: seconds, monotonic; injectable for tests.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[_BucketKey, _Bucket] = {}
        self._lock = threading.Lock()
        self._admits = 0

    async def admit(
        self, key_id: str, tenant: str, key_limit: Limit, tenant_limit: Limit, tokens: int
    ) -> float | None:
        """Charge one request and ``tokens`` to ``key_id`` and ``tenant``, or charge nothing.

        Returns:
            None when admitted; else the seconds until every bucket would hold enough
            (the caller rounds it up for Retry-After).
        """
        if tokens < 0:
            raise ValueError(f"tokens must not be negative, not {tokens}")
        needs: list[tuple[_BucketKey, int | None, int]] = [
            (("key", key_id, "requests"), key_limit.requests_per_minute, 1),
            (("key", key_id, "tokens"), key_limit.tokens_per_minute, tokens),
            (("tenant", tenant, "requests"), tenant_limit.requests_per_minute, 1),
            (("tenant", tenant, "tokens"), tenant_limit.tokens_per_minute, tokens),
        ]
        with self._lock:
            now = self._clock()
            self._admits += 1
            if self._admits % _PRUNE_EVERY == 0:
                self._prune(now)
            charges: list[tuple[_Bucket, int]] = []
            wait = 0.0
            for bucket_key, per_minute, amount in needs:
                if per_minute is None or amount == 0:
                    continue
                bucket = self._bucket(bucket_key, per_minute, now)
                needed = min(amount, bucket.capacity)
                if bucket.level < needed:
                    wait = max(wait, (needed - bucket.level) / bucket.rate)
                charges.append((bucket, amount))
            if wait > 0:
                return wait
            for bucket, amount in charges:
                bucket.level -= amount
            return None

    async def settle(self, key_id: str, tenant: str, estimated: int, actual: int) -> None:
        """Refund (``actual < estimated``) or charge further (``actual > estimated``) the token
        buckets of ``key_id`` and ``tenant``. A refund never fills a bucket past full."""
        difference = actual - estimated
        if difference == 0:
            return
        with self._lock:
            now = self._clock()
            keys: tuple[_BucketKey, ...] = (("key", key_id, "tokens"), ("tenant", tenant, "tokens"))
            for bucket_key in keys:
                bucket = self._buckets.get(bucket_key)
                if bucket is None:
                    continue
                bucket.refill(bucket.capacity, now)
                bucket.level = min(bucket.capacity, bucket.level - difference)

    def _bucket(self, key: _BucketKey, per_minute: int, now: float) -> _Bucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = _Bucket(per_minute, per_minute / 60.0, per_minute, now)
            self._buckets[key] = bucket
        else:
            bucket.refill(per_minute, now)
        return bucket

    def _prune(self, now: float) -> None:
        for key in [key for key, bucket in self._buckets.items() if bucket.full_at(now)]:
            del self._buckets[key]


class ConcurrencyLimitError(Exception):
    """Too many requests in flight for a key or a tenant."""

    def __init__(self, scope: Literal["key", "tenant"], name: str, limit: int) -> None:
        super().__init__(f"too many concurrent requests for {scope} {name} (limit {limit})")
        self.scope = scope
        self.name = name
        self.limit = limit


class ConcurrencyLimiter:
    """Counts requests in flight per key and per tenant, within the given maxima.

    Raises:
        ValueError: a maximum is below 1.
    """

    def __init__(self, per_key: int, per_tenant: int) -> None:
        if per_key < 1 or per_tenant < 1:
            raise ValueError(
                f"per_key and per_tenant must be 1 or more, not {per_key}, {per_tenant}"
            )
        self.per_key = per_key
        self.per_tenant = per_tenant
        self._keys: dict[str, int] = {}
        self._tenants: dict[str, int] = {}
        self._lock = threading.Lock()

    async def acquire(self, key_id: str, tenant: str, slot: str = "") -> Full | None:
        """Take a slot of both the key and the tenant, or neither (``slot`` is not needed
        in process: slots are counted).

        Returns:
            None when taken; else which scope is full.
        """
        return self._acquire(key_id, tenant)

    async def release(self, key_id: str, tenant: str, slot: str = "") -> None:
        """Give back a slot taken by :meth:`acquire`.

        Raises:
            RuntimeError: no slot of that key and tenant is held.
        """
        with self._lock:
            if self._keys.get(key_id, 0) < 1 or self._tenants.get(tenant, 0) < 1:
                raise RuntimeError(f"release of key {key_id}, tenant {tenant} without acquire")
            _decrement(self._keys, key_id)
            _decrement(self._tenants, tenant)

    def in_flight(self, key_id: str | None = None, tenant: str | None = None) -> int:
        """Requests in flight for ``key_id`` (or ``tenant``, or in all)."""
        with self._lock:
            if key_id is not None:
                return self._keys.get(key_id, 0)
            if tenant is not None:
                return self._tenants.get(tenant, 0)
            return sum(self._keys.values())

    @asynccontextmanager
    async def hold(self, key_id: str, tenant: str) -> AsyncIterator[None]:
        """Hold a slot for the duration of the block.

        Raises:
            ConcurrencyLimitError: the key or the tenant has no slot free.
        """
        full = self._acquire(key_id, tenant)
        if full is not None:
            scope, name, limit = full
            raise ConcurrencyLimitError(scope, name, limit)
        try:
            yield
        finally:
            await self.release(key_id, tenant)

    def _acquire(self, key_id: str, tenant: str) -> Full | None:
        with self._lock:
            if self._keys.get(key_id, 0) >= self.per_key:
                return ("key", key_id, self.per_key)
            if self._tenants.get(tenant, 0) >= self.per_tenant:
                return ("tenant", tenant, self.per_tenant)
            self._keys[key_id] = self._keys.get(key_id, 0) + 1
            self._tenants[tenant] = self._tenants.get(tenant, 0) + 1
            return None


def _decrement(counts: dict[str, int], name: str) -> None:
    if counts[name] <= 1:
        del counts[name]
    else:
        counts[name] -= 1


@contextmanager
def limits_checked() -> Iterator[None]:
    """A limiter that cannot answer (its Redis is down) refuses the request with 503: a
    request is never served unmetered."""
    try:
        yield
    except OpenAIError:
        raise
    except Exception as error:
        log.exception("rate limits unavailable", error=f"{type(error).__name__}: {error}")
        raise ServiceUnavailableError(
            "the rate limits cannot be checked now; retry later", None, "limits_unavailable"
        ) from None


def retry_after(wait: float) -> int:
    """Whole seconds for a ``Retry-After`` header: ``wait`` rounded up, at least 1."""
    return max(1, math.ceil(wait))
