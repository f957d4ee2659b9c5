"""``python -m services.router``: the router service (see :mod:`services.router.routing`)."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable

import httpx

from services.router.metrics import RouterMetrics
from services.router.pools import Pools
from services.router.routing import Router
from services.router.scheduling import priority_with_aging
from services.router.settings import RouterSettings
from shared.bus import Bus
from shared.health import HealthState
from shared.release_split import Splits
from shared.service import run_service
from shared.service_auth import ServiceTokenAuth, own_token
from shared.topics import (
    CANCELLATIONS,
    MODEL_DEPLOYMENTS,
    REQUESTS_HIGH,
    REQUESTS_LOW,
    REQUESTS_NORMAL,
)

NAME = "router"


def service_auth(settings: RouterSettings) -> ServiceTokenAuth:
    """The router's identity, sent to the retrieval service and the mesh's own pools only
    (a pool with ``service_token: false`` is run by others and never sees it)."""
    mesh_urls = [settings.rag.retrieval_url]
    mesh_urls += [url for pool in settings.pools if pool.service_token for url in pool.replicas]
    return ServiceTokenAuth(own_token(settings), mesh_urls)


async def build(settings: RouterSettings, bus: Bus, health: HealthState) -> Awaitable[None] | None:
    pools = Pools(settings.pools, settings.replica_cooldown_s)
    limits = httpx.Limits(max_connections=settings.max_in_flight + 8, max_keepalive_connections=64)
    timeout = httpx.Timeout(settings.default_deadline_s, connect=settings.connect_timeout_s)
    client = httpx.AsyncClient(limits=limits, timeout=timeout, auth=service_auth(settings))
    router = Router(
        bus.publisher,
        pools,
        client,
        default_deadline_s=settings.default_deadline_s,
        rag=settings.rag,
        pii=settings.pii,
        splits=Splits(max_lease_s=settings.release_max_lease_s),
    )
    worker = bus.add_worker(
        [REQUESTS_HIGH, REQUESTS_NORMAL, REQUESTS_LOW],
        group=NAME,
        handler=router.handle,
        max_in_flight=settings.max_in_flight,
        max_buffered=settings.scheduling.max_buffered,
        choose=priority_with_aging(settings.scheduling.aging_s),
        max_attempts=1,  # the router retries replicas itself; a failure here is a bus problem
    )
    priorities = {REQUESTS_HIGH.name: "high", REQUESTS_NORMAL.name: "normal",
                  REQUESTS_LOW.name: "low"}  # fmt: skip
    RouterMetrics(
        buffered=lambda: {priorities[t]: n for t, n in worker.buffered.items() if t in priorities},
        in_flight=lambda: {p.name: sum(r.in_flight for r in p.replicas) for p in pools.pools},
    )
    # every instance reads every cancellation: its own group, nothing to keep across restarts
    instance = settings.instance_id or uuid.uuid4().hex[:12]
    bus.subscribe(
        CANCELLATIONS, group=f"{NAME}-cancel-{instance}", durable_dedup=False, from_latest=True
    )(router.on_cancel)
    # every instance keeps every model's split. A split still live was decided (or renewed)
    # within the longest lease, so reading that far back on each start rebuilds them all.
    bus.subscribe(
        MODEL_DEPLOYMENTS,
        group=f"{NAME}-releases-{instance}",
        durable_dedup=False,
        rewind_s=settings.release_max_lease_s + 5,
    )(router.on_deployment)
    health.readiness["pools"] = lambda: (
        None
        if any(pool.healthy for pool in pools.pools)
        else "every replica of every pool failed recently"
    )
    return None


def main() -> None:
    run_service(NAME, RouterSettings, build)


if __name__ == "__main__":
    main()
