"""Rate and concurrency limits shared by every gateway of a cluster, counted in Redis.

The same token buckets as :class:`~services.gateway.limits.LocalRateLimiter` (one minute's
allowance a bucket, refilled continuously, per key and per tenant, for requests and tokens),
but each decision is one Lua script run atomically by Redis on its own clock: N gateways
behind a load balancer share one allowance, exactly, with no overshoot under concurrency.
Requests in flight are a sorted set per key and per tenant whose members expire with the
request's deadline, so a gateway that dies holding slots frees them by itself.

Keys carry the tenant as a hash tag (``meshllm:rl:{acme}:...``): a key's and its tenant's
buckets live in one slot, so the scripts also run on Redis Cluster.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis

from services.gateway.limits import Full, Limit

_ADMIT = """
-- KEYS: 4 buckets (hashes of level, updated). ARGV: 4 capacities (0: no limit), 4 amounts.
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) + tonumber(now_parts[2]) / 1e6
local wait = 0
local levels = {}
for i = 1, 4 do
  local capacity = tonumber(ARGV[i])
  local amount = tonumber(ARGV[i + 4])
  if capacity > 0 and amount > 0 then
    local rate = capacity / 60.0
    local stored = redis.call('HMGET', KEYS[i], 'level', 'updated')
    local level = capacity
    if stored[1] then
      level = math.min(capacity, tonumber(stored[1]) + (now - tonumber(stored[2])) * rate)
    end
    levels[i] = level
    local needed = math.min(amount, capacity)
    if level < needed then
      wait = math.max(wait, (needed - level) / rate)
    end
  end
end
if wait > 0 then
  return tostring(wait)
end
for i = 1, 4 do
  if levels[i] ~= nil then
    local level = levels[i] - tonumber(ARGV[i + 4])
    redis.call('HSET', KEYS[i], 'level', tostring(level), 'updated', tostring(now),
               'capacity', ARGV[i])
    -- a bucket left alone refills within a minute (a debt within a few): then it is as new
    redis.call('EXPIRE', KEYS[i], 600)
  end
end
return false
"""

_SETTLE = """
-- KEYS: 2 token buckets. ARGV: the difference (actual - estimated). A refund never fills a
-- bucket past full; a bucket that lapsed is full already.
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) + tonumber(now_parts[2]) / 1e6
for i = 1, 2 do
  local stored = redis.call('HMGET', KEYS[i], 'level', 'updated', 'capacity')
  if stored[1] then
    local capacity = tonumber(stored[3])
    local level = tonumber(stored[1]) + (now - tonumber(stored[2])) * capacity / 60.0
    level = math.min(capacity, math.min(capacity, level) - tonumber(ARGV[1]))
    redis.call('HSET', KEYS[i], 'level', tostring(level), 'updated', tostring(now))
    redis.call('EXPIRE', KEYS[i], 600)
  end
end
return false
"""

_ACQUIRE = """
-- KEYS: the key's and the tenant's in-flight sets. ARGV: per-key max, per-tenant max,
-- request id, seconds the slot may be held at most.
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) + tonumber(now_parts[2]) / 1e6
for i = 1, 2 do
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
  if redis.call('ZCARD', KEYS[i]) >= tonumber(ARGV[i]) then
    return i
  end
end
local expires = now + tonumber(ARGV[4])
for i = 1, 2 do
  redis.call('ZADD', KEYS[i], expires, ARGV[3])
  redis.call('EXPIRE', KEYS[i], math.ceil(tonumber(ARGV[4])) + 1)
end
return 0
"""


def _prefix(tenant: str) -> str:
    return f"meshllm:rl:{{{tenant}}}"


class RedisRateLimiter:
    """:class:`~services.gateway.limits.RateLimiter` over Redis, shared by every gateway.

    A Redis error propagates: the caller refuses the request (fail closed) rather than
    serve it unmetered.
    """

    def __init__(self, client: Redis) -> None:
        self._client = client
        self._admit: Any = client.register_script(_ADMIT)
        self._settle: Any = client.register_script(_SETTLE)

    async def admit(
        self, key_id: str, tenant: str, key_limit: Limit, tenant_limit: Limit, tokens: int
    ) -> float | None:
        """Charge one request and ``tokens`` to the key and its tenant, or charge nothing.

        Returns:
            None when admitted; else the seconds until every bucket would hold enough.
        """
        if tokens < 0:
            raise ValueError(f"tokens must not be negative, not {tokens}")
        prefix = _prefix(tenant)
        keys = [
            f"{prefix}:key:{key_id}:requests",
            f"{prefix}:key:{key_id}:tokens",
            f"{prefix}:tenant:requests",
            f"{prefix}:tenant:tokens",
        ]
        capacities = [
            key_limit.requests_per_minute,
            key_limit.tokens_per_minute,
            tenant_limit.requests_per_minute,
            tenant_limit.tokens_per_minute,
        ]
        wait = await self._admit(
            keys=keys, args=[*(c or 0 for c in capacities), 1, tokens, 1, tokens]
        )
        return None if wait is None else float(wait)

    async def settle(self, key_id: str, tenant: str, estimated: int, actual: int) -> None:
        """Refund (``actual < estimated``) or charge further the token buckets of the key and
        its tenant once the request's real cost is known."""
        if actual == estimated:
            return
        prefix = _prefix(tenant)
        await self._settle(
            keys=[f"{prefix}:key:{key_id}:tokens", f"{prefix}:tenant:tokens"],
            args=[actual - estimated],
        )


class RedisConcurrencyLimiter:
    """Requests in flight per key and per tenant, counted across every gateway.

    Each slot is a member of a sorted set scored by when it lapses (``hold_s`` after it is
    taken): a slot that a crashed gateway never released lapses by itself.
    """

    def __init__(self, client: Redis, per_key: int, per_tenant: int, hold_s: float) -> None:
        if per_key < 1 or per_tenant < 1:
            raise ValueError(
                f"per_key and per_tenant must be 1 or more, not {per_key}, {per_tenant}"
            )
        self._client = client
        self.per_key = per_key
        self.per_tenant = per_tenant
        self.hold_s = hold_s
        self._acquire: Any = client.register_script(_ACQUIRE)

    async def acquire(self, key_id: str, tenant: str, slot: str) -> Full | None:
        """Take a slot of both the key and the tenant for ``slot`` (a request id), or neither.

        Returns:
            None when taken; else which scope is full, its name and its limit.
        """
        full = int(
            await self._acquire(
                keys=self._keys(key_id, tenant),
                args=[self.per_key, self.per_tenant, slot, self.hold_s],
            )
        )
        if full == 1:
            return ("key", key_id, self.per_key)
        if full == 2:
            return ("tenant", tenant, self.per_tenant)
        return None

    async def release(self, key_id: str, tenant: str, slot: str) -> None:
        """Give back the slot ``slot`` holds (nothing if it lapsed already)."""
        async with self._client.pipeline(transaction=True) as pipe:
            for key in self._keys(key_id, tenant):
                pipe.zrem(key, slot)
            await pipe.execute()

    async def in_flight(self, key_id: str, tenant: str) -> int:
        """Slots the key holds now (lapsed ones included until the next acquire)."""
        return int(await self._client.zcard(self._keys(key_id, tenant)[0]))

    @staticmethod
    def _keys(key_id: str, tenant: str) -> list[str]:
        prefix = _prefix(tenant)
        return [f"{prefix}:key:{key_id}:in-flight", f"{prefix}:tenant:in-flight"]
