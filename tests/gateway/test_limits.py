"""Token-bucket rate limits and concurrency limits, on an injected clock."""

from __future__ import annotations

import pytest

from services.gateway.limits import (
    ConcurrencyLimiter,
    ConcurrencyLimitError,
    Limit,
    LocalRateLimiter,
    RateLimiter,
    retry_after,
)

NONE = Limit(None, None)


class FakeClock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def limiter(clock: FakeClock) -> LocalRateLimiter:
    return LocalRateLimiter(clock=clock)


async def test_the_local_limiter_is_a_rate_limiter(limiter: LocalRateLimiter) -> None:
    protocol: RateLimiter = limiter
    assert await protocol.admit("k", "t", NONE, NONE, 10**9) is None


async def test_requests_per_minute_run_out_then_refill(
    limiter: LocalRateLimiter, clock: FakeClock
) -> None:
    per_key = Limit(3, None)
    for _ in range(3):
        assert await limiter.admit("k1", "acme", per_key, NONE, 0) is None
    wait = await limiter.admit("k1", "acme", per_key, NONE, 0)
    assert wait == pytest.approx(20.0)  # 3 a minute: one every 20 s
    assert wait is not None
    assert retry_after(wait) == 20
    clock.now += 10
    assert await limiter.admit("k1", "acme", per_key, NONE, 0) == pytest.approx(10.0)
    clock.now += 10
    assert await limiter.admit("k1", "acme", per_key, NONE, 0) is None
    assert await limiter.admit("k1", "acme", per_key, NONE, 0) == pytest.approx(20.0)
    # another key of the same tenant has its own bucket
    assert await limiter.admit("k2", "acme", per_key, NONE, 0) is None


async def test_a_quiet_key_refills_only_to_one_minute(
    limiter: LocalRateLimiter, clock: FakeClock
) -> None:
    per_key = Limit(2, None)
    clock.now += 3600
    assert await limiter.admit("k", "t", per_key, NONE, 0) is None
    assert await limiter.admit("k", "t", per_key, NONE, 0) is None
    assert await limiter.admit("k", "t", per_key, NONE, 0) is not None


async def test_the_tenant_limit_spans_its_keys(limiter: LocalRateLimiter, clock: FakeClock) -> None:
    per_key, per_tenant = Limit(10, None), Limit(2, None)
    assert await limiter.admit("k1", "acme", per_key, per_tenant, 0) is None
    assert await limiter.admit("k2", "acme", per_key, per_tenant, 0) is None
    assert await limiter.admit("k3", "acme", per_key, per_tenant, 0) == pytest.approx(30.0)
    assert await limiter.admit("k1", "beta", per_key, per_tenant, 0) is None  # another tenant
    clock.now += 30
    assert await limiter.admit("k3", "acme", per_key, per_tenant, 0) is None


async def test_a_refused_request_charges_nothing(limiter: LocalRateLimiter) -> None:
    per_key, per_tenant = Limit(1, 10_000), Limit(None, 100)
    assert await limiter.admit("k1", "acme", per_key, per_tenant, 60) is None
    # the tenant lacks tokens: k2's request bucket must not be charged for the refusal
    assert await limiter.admit("k2", "acme", per_key, per_tenant, 60) is not None
    assert await limiter.admit("k2", "acme", per_key, per_tenant, 40) is None
    # k1's single request a minute is spent; its tokens must not be taken either
    assert await limiter.admit("k1", "acme", per_key, Limit(None, None), 5_000) is not None
    assert await limiter.admit("k3", "acme", Limit(None, 10_000), Limit(None, None), 10_000) is None


async def test_tokens_per_minute_and_settling(limiter: LocalRateLimiter, clock: FakeClock) -> None:
    per_key = Limit(None, 600)  # 10 tokens a second
    assert await limiter.admit("k", "acme", per_key, NONE, 500) is None
    assert await limiter.admit("k", "acme", per_key, NONE, 200) == pytest.approx(10.0)
    await limiter.settle("k", "acme", estimated=500, actual=100)  # 400 back
    assert await limiter.admit("k", "acme", per_key, NONE, 200) is None  # 300 left after
    await limiter.settle("k", "acme", estimated=200, actual=500)  # 300 more: none left
    assert await limiter.admit("k", "acme", per_key, NONE, 100) == pytest.approx(10.0)
    clock.now += 10
    assert await limiter.admit("k", "acme", per_key, NONE, 100) is None


async def test_a_refund_does_not_overfill(limiter: LocalRateLimiter) -> None:
    per_key = Limit(None, 600)
    assert await limiter.admit("k", "acme", per_key, NONE, 100) is None
    await limiter.settle("k", "acme", estimated=100, actual=0)
    await limiter.settle("k", "acme", estimated=5_000, actual=0)
    assert await limiter.admit("k", "acme", per_key, NONE, 600) is None
    assert await limiter.admit("k", "acme", per_key, NONE, 1) is not None


async def test_settling_charges_the_tenant_too(limiter: LocalRateLimiter) -> None:
    per_tenant = Limit(None, 1000)
    assert await limiter.admit("k1", "acme", NONE, per_tenant, 100) is None
    await limiter.settle("k1", "acme", estimated=100, actual=1000)
    assert await limiter.admit("k2", "acme", NONE, per_tenant, 1) is not None
    await limiter.settle("unknown", "nobody", estimated=1, actual=5)  # nothing to settle: no error


async def test_a_request_larger_than_a_minute_runs_once_then_waits(
    limiter: LocalRateLimiter, clock: FakeClock
) -> None:
    per_key = Limit(None, 600)
    assert await limiter.admit("k", "t", per_key, NONE, 1200) is None  # leaves 600 of debt
    assert await limiter.admit("k", "t", per_key, NONE, 1) == pytest.approx(60.1)
    clock.now += 60.1
    assert await limiter.admit("k", "t", per_key, NONE, 1) is None


async def test_a_lowered_limit_applies_at_once(limiter: LocalRateLimiter) -> None:
    assert await limiter.admit("k", "t", Limit(100, None), NONE, 0) is None
    assert await limiter.admit("k", "t", Limit(1, None), NONE, 0) is None  # 99 left, capped to 1
    assert await limiter.admit("k", "t", Limit(1, None), NONE, 0) == pytest.approx(60.0)


async def test_invalid_limits_and_charges() -> None:
    with pytest.raises(ValueError, match="requests_per_minute"):
        Limit(0, None)
    with pytest.raises(ValueError, match="tokens_per_minute"):
        Limit(None, -1)
    with pytest.raises(ValueError, match="tokens"):
        await LocalRateLimiter().admit("k", "t", NONE, NONE, -1)


@pytest.mark.parametrize(("wait", "seconds"), [(0.001, 1), (1.0, 1), (1.01, 2), (29.5, 30)])
def test_retry_after_rounds_up(wait: float, seconds: int) -> None:
    assert retry_after(wait) == seconds


async def test_many_keys_do_not_grow_without_bound(clock: FakeClock) -> None:
    limiter = LocalRateLimiter(clock=clock)
    for index in range(10_000):
        assert await limiter.admit(f"k{index}", f"t{index}", Limit(60, 600), NONE, 10) is None
        clock.now += 0.01
    assert len(limiter._buckets) < 5_000  # 20,000 without pruning


# --------------------------------------------------------------------------- concurrency


async def test_concurrency_per_key_and_tenant() -> None:
    limiter = ConcurrencyLimiter(per_key=2, per_tenant=3)
    assert await limiter.acquire("k1", "acme") is None
    assert await limiter.acquire("k1", "acme") is None
    assert await limiter.acquire("k1", "acme") == ("key", "k1", 2)  # the key is full
    assert await limiter.acquire("k2", "acme") is None
    assert await limiter.acquire("k3", "acme") == ("tenant", "acme", 3)  # the tenant is full
    assert limiter.in_flight(key_id="k3") == 0  # a refusal takes nothing
    assert await limiter.acquire("k3", "beta") is None
    assert limiter.in_flight(tenant="acme") == 3
    await limiter.release("k1", "acme")
    assert await limiter.acquire("k3", "acme") is None
    assert await limiter.acquire("k1", "acme") is not None
    for key, tenant in [("k1", "acme"), ("k2", "acme"), ("k3", "acme"), ("k3", "beta")]:
        await limiter.release(key, tenant)
    assert limiter.in_flight() == 0
    with pytest.raises(RuntimeError, match="without acquire"):
        await limiter.release("k1", "acme")


def test_invalid_concurrency_limits() -> None:
    with pytest.raises(ValueError, match="per_key"):
        ConcurrencyLimiter(per_key=0, per_tenant=1)


async def test_hold_releases_even_on_error() -> None:
    limiter = ConcurrencyLimiter(per_key=1, per_tenant=5)
    async with limiter.hold("k", "acme"):
        assert limiter.in_flight(key_id="k") == 1
        with pytest.raises(ConcurrencyLimitError, match="key k") as full:
            async with limiter.hold("k", "acme"):
                pass
        assert (full.value.scope, full.value.limit) == ("key", 1)
    assert limiter.in_flight(key_id="k") == 0
    with pytest.raises(KeyError):
        async with limiter.hold("k", "acme"):
            raise KeyError("boom")
    assert limiter.in_flight() == 0
