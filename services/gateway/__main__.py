"""``python -m services.gateway``: the OpenAI-compatible edge of the mesh (see ``app.py``)."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable

from services.gateway.app import Gateway
from services.gateway.audit import AuditRecorder, AuditSpool
from services.gateway.auth import Authenticator, KeyStore
from services.gateway.limits import (
    ConcurrencyGate,
    ConcurrencyLimiter,
    LocalRateLimiter,
    RateLimiter,
)
from services.gateway.policy import build_policy
from services.gateway.relay import ReplyRelay
from services.gateway.settings import GatewaySettings
from shared.bus import Bus
from shared.health import HealthState
from shared.http_server import HttpApi
from shared.service import run_service
from shared.topics import REPLIES

NAME = "gateway"


def build_gateway(settings: GatewaySettings, bus: Bus) -> Gateway:
    """The gateway and its reply subscription, on ``bus`` (not yet started)."""
    relay = ReplyRelay()
    instance = settings.instance_id or uuid.uuid4().hex[:12]
    # each instance reads every reply and keeps its own requests' ones
    bus.subscribe(REPLIES, group=f"{NAME}-{instance}", durable_dedup=False, from_latest=True)(
        relay.on_reply
    )
    rate_limiter, concurrency = build_limits(settings)
    audit = AuditRecorder(
        bus.publisher,
        AuditSpool(settings.audit_spool_path, settings.audit.spool_max_bytes),
        settings.audit,
        producer=NAME,
        pii=settings.pii,
    )
    return Gateway(
        settings,
        publisher=bus.publisher,
        relay=relay,
        authenticator=Authenticator(
            KeyStore(settings.keys_db_path, settings.key_cache_ttl_s), settings.jwt.verifier()
        ),
        policy=build_policy(settings),
        rate_limiter=rate_limiter,
        concurrency=concurrency,
        audit=audit,
    )


def build_limits(settings: GatewaySettings) -> tuple[RateLimiter, ConcurrencyGate]:
    """In-process limits, or limits shared in Redis by every gateway when it is set."""
    limits = settings.limits
    if limits.redis_url is None:
        return LocalRateLimiter(), ConcurrencyLimiter(
            limits.max_concurrent_per_key, limits.max_concurrent_per_tenant
        )
    from redis.asyncio import Redis

    from services.gateway.redis_limits import RedisConcurrencyLimiter, RedisRateLimiter

    client = Redis.from_url(limits.redis_url, socket_timeout=2.0, socket_connect_timeout=2.0)
    # a slot outlives its request by at most the deadline: a crashed gateway's lapse by then
    hold_s = settings.request_timeout_s + 30
    concurrency = RedisConcurrencyLimiter(
        client, limits.max_concurrent_per_key, limits.max_concurrent_per_tenant, hold_s
    )
    return RedisRateLimiter(client), concurrency


async def build(settings: GatewaySettings, bus: Bus, health: HealthState) -> Awaitable[None]:
    gateway = build_gateway(settings, bus)
    gateway.audit.start()  # replay what an earlier run left in the spool
    server = HttpApi(
        gateway.app(),
        name="gateway",
        host=settings.http_host,
        port=settings.http_port,
        settings_hint="MESHLLM_HTTP_HOST, MESHLLM_HTTP_PORT",
        graceful_shutdown_s=settings.request_timeout_s,  # open requests may finish
    )
    server.report_readiness(health)
    return server.serve()


def main() -> None:
    run_service(NAME, GatewaySettings, build)


if __name__ == "__main__":
    main()
