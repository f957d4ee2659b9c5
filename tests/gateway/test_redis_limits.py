"""Rate and concurrency limits shared in Redis: every gateway of a cluster draws on one
allowance, exactly, also when they ask at the same instant."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from services.gateway.__main__ import build_gateway
from services.gateway.auth import KeyStore
from services.gateway.limits import Limit
from services.gateway.redis_limits import RedisConcurrencyLimiter, RedisRateLimiter
from services.gateway.settings import GatewaySettings
from shared.bus import Bus
from tests.conftest import ROOT

NONE = Limit(requests_per_minute=None, tokens_per_minute=None)


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


def tenant() -> str:
    return f"t-{uuid.uuid4().hex[:8]}"  # every test its own buckets


async def test_a_key_is_admitted_up_to_its_allowance_then_told_how_long_to_wait(
    client: Redis,
) -> None:
    limiter = RedisRateLimiter(client)
    name = tenant()
    key_limit = Limit(requests_per_minute=3, tokens_per_minute=None)
    for _ in range(3):
        assert await limiter.admit("k", name, key_limit, NONE, 10) is None
    wait = await limiter.admit("k", name, key_limit, NONE, 10)
    assert wait is not None
    assert 0 < wait <= 20.5  # one request back every 20 s
    # another key of the tenant is not affected
    assert await limiter.admit("other", name, key_limit, NONE, 10) is None


async def test_a_refused_request_is_charged_nothing(client: Redis) -> None:
    limiter = RedisRateLimiter(client)
    name = tenant()
    key_limit = Limit(requests_per_minute=None, tokens_per_minute=100)
    tenant_limit = Limit(requests_per_minute=None, tokens_per_minute=1_000)
    assert await limiter.admit("k", name, key_limit, tenant_limit, 80) is None
    # 30 more do not fit the key's bucket: refused, and the tenant's 920 stay whole
    assert await limiter.admit("k", name, key_limit, tenant_limit, 30) is not None
    for key in ("a", "b", "c", "d", "e", "f", "g", "h", "i"):
        assert await limiter.admit(key, name, key_limit, tenant_limit, 100) is None, key
    assert await limiter.admit("j", name, key_limit, tenant_limit, 100) is not None


async def test_settle_refunds_what_the_request_did_not_use(client: Redis) -> None:
    limiter = RedisRateLimiter(client)
    name = tenant()
    key_limit = Limit(requests_per_minute=None, tokens_per_minute=100)
    assert await limiter.admit("k", name, key_limit, NONE, 100) is None
    assert await limiter.admit("k", name, key_limit, NONE, 50) is not None
    await limiter.settle("k", name, estimated=100, actual=20)  # 80 back
    assert await limiter.admit("k", name, key_limit, NONE, 50) is None


async def test_negative_tokens_are_refused(client: Redis) -> None:
    with pytest.raises(ValueError, match="tokens must not be negative"):
        await RedisRateLimiter(client).admit("k", tenant(), NONE, NONE, -1)


def test_two_gateway_processes_share_one_allowance_exactly(redis_url: str) -> None:
    """Two processes ask for 40 x 10 tokens each at the same instant against a key of 60
    tokens a minute: together they get 6 (7 if the bucket refilled 10 meanwhile), never
    the 12 that two in-process limiters would give."""
    start_at = time.time() + 1.5
    name = tenant()  # fresh buckets, also against a shared MESHLLM_TEST_REDIS
    hammer = ["-m", "tests.procs.limit_hammer", redis_url, f"{start_at}", "40", "10", name]
    processes = [
        subprocess.Popen([sys.executable, *hammer], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    admitted = []
    for process in processes:
        out, _ = process.communicate(timeout=60)
        assert process.returncode == 0
        admitted.append(int(out))
    elapsed = time.time() - start_at
    refill = int(elapsed * 60 / 60 / 10) + 1  # at most this many requests refilled meanwhile
    assert 6 <= sum(admitted) <= 6 + refill, admitted


async def test_slots_in_flight_are_shared_and_lapse_after_a_crash(client: Redis) -> None:
    name = tenant()
    one = RedisConcurrencyLimiter(client, per_key=2, per_tenant=3, hold_s=60)
    two = RedisConcurrencyLimiter(client, per_key=2, per_tenant=3, hold_s=60)
    assert await one.acquire("a", name, "r1") is None
    assert await two.acquire("a", name, "r2") is None
    assert await one.acquire("a", name, "r3") == ("key", "a", 2)  # the other gateway's counts
    assert await two.acquire("b", name, "r4") is None
    assert await one.acquire("c", name, "r5") == ("tenant", name, 3)
    await two.release("a", name, "r2")
    assert await one.acquire("a", name, "r6") is None
    assert await one.in_flight("a", name) == 2

    # a gateway that dies holding a slot: the slot lapses by itself after hold_s
    short = RedisConcurrencyLimiter(client, per_key=1, per_tenant=5, hold_s=0.3)
    crashed = tenant()
    assert await short.acquire("x", crashed, "lost") is None
    assert await short.acquire("x", crashed, "next") == ("key", "x", 1)
    await asyncio.sleep(0.4)
    assert await short.acquire("x", crashed, "next") is None


async def test_an_unreachable_redis_raises_rather_than_admitting() -> None:
    """Fail closed: the gateway turns the error into a 503, never into unmetered service."""
    client = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.5)
    with pytest.raises(RedisConnectionError):
        await RedisRateLimiter(client).admit("k", "t", NONE, NONE, 1)
    await client.aclose()


async def test_two_gateways_refuse_a_key_past_its_shared_allowance(
    redis_url: str, tmp_path: Path
) -> None:
    """Two gateways built as the service builds them, on one Redis: a key of 2 requests a
    minute gets its third refused whichever gateway it asks (per process, each would let
    it through)."""
    settings = GatewaySettings(
        data_dir=tmp_path,
        limits={"redis_url": redis_url},
        kb={"service_url": "http://127.0.0.1:9"},  # nothing listens: only the charge matters
    )
    with KeyStore(settings.keys_db_path) as store:
        secret = store.create(tenant(), ["analyst"], rpm=2)[1]
    gateways = [build_gateway(settings, Bus(settings, service="gateway")) for _ in range(2)]
    statuses = []
    for gateway in (gateways[0], gateways[1], gateways[1]):
        transport = httpx.ASGITransport(app=gateway.app())
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            reply = await client.post(
                "/v1/kb/search",
                json={"query": "leave", "collections": ["handbook"]},
                headers={"authorization": f"Bearer {secret}"},
            )
        statuses.append(reply.status_code)
    # the first two pass the limits and fail only at the knowledge base nobody runs (503)
    assert statuses == [503, 503, 429], statuses
