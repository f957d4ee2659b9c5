"""One gateway process's worth of admits against a shared Redis limiter (a test's helper).

    python -m tests.procs.limit_hammer REDIS_URL START_AT ATTEMPTS TOKENS TENANT

Waits until the wall clock reaches START_AT (so several processes start together), sends
ATTEMPTS admits of TOKENS tokens each at once for key "k" of TENANT (60 tokens a minute),
and prints how many were admitted.
"""

from __future__ import annotations

import asyncio
import sys
import time

from redis.asyncio import Redis

from services.gateway.limits import Limit
from services.gateway.redis_limits import RedisRateLimiter

KEY_LIMIT = Limit(requests_per_minute=None, tokens_per_minute=60)
TENANT_LIMIT = Limit(requests_per_minute=None, tokens_per_minute=None)


async def main(url: str, start_at: float, attempts: int, tokens: int, tenant: str) -> int:
    client = Redis.from_url(url)
    limiter = RedisRateLimiter(client)
    await client.ping()
    await asyncio.sleep(max(0.0, start_at - time.time()))
    waits = await asyncio.gather(
        *(limiter.admit("k", tenant, KEY_LIMIT, TENANT_LIMIT, tokens) for _ in range(attempts))
    )
    await client.aclose()
    return sum(wait is None for wait in waits)


if __name__ == "__main__":
    url, start_at, attempts, tokens, tenant = sys.argv[1:6]
    print(asyncio.run(main(url, float(start_at), int(attempts), int(tokens), tenant)))
