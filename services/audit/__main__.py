"""``python -m services.audit``: the audit service (see :mod:`services.audit.service`)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

from services.audit.api import CALLERS, AuditApi
from services.audit.checkpoint import CheckpointSigner
from services.audit.log import AuditLog
from services.audit.service import AuditService
from services.audit.settings import AuditSettings
from services.audit.store import open_store
from shared.bus import Bus
from shared.health import HealthState
from shared.http_server import HttpApi
from shared.logging import get_logger
from shared.service import run_service
from shared.service_auth import ServiceGuard
from shared.topics import AUDIT_EVENTS

NAME = "audit"
log = get_logger("services.audit")


async def build(settings: AuditSettings, bus: Bus, health: HealthState) -> Awaitable[None]:
    guard = await asyncio.to_thread(ServiceGuard.load, settings, CALLERS)  # fail fast
    store = await asyncio.to_thread(open_store, settings)
    signer = await asyncio.to_thread(CheckpointSigner.load_or_create, settings.signing_key_path)
    audit_log = await asyncio.to_thread(AuditLog, store, signer)
    log.info(
        "audit log opened", log_id=audit_log.log_id, size=audit_log.size, store=settings.store_kind
    )
    service = AuditService(audit_log, settings, bus.publisher)
    # the store absorbs redeliveries by event id: no separate dedup store is needed
    bus.subscribe(AUDIT_EVENTS, group=NAME, durable_dedup=False)(service.on_event)
    api = AuditApi(audit_log, settings.max_page_size, guard)
    server = HttpApi(
        api.app(),
        name="audit API",
        host=settings.audit_api_host,
        port=settings.audit_api_port,
        settings_hint="MESHLLM_AUDIT_API_HOST, MESHLLM_AUDIT_API_PORT",
    )
    server.report_readiness(health)

    async def on_stop() -> None:
        # Drain what the broker already holds before the last checkpoint, so that it covers
        # them; the bus stops these subscribers again after this returns, which is a no-op.
        drain_s = settings.bus.drain_timeout_ms / 1000
        await asyncio.gather(*(subscriber.stop(drain_s) for subscriber in bus.subscribers))
        await service.close()

    return server.serve(
        background=[service.run_checkpoints(), service.run_retention()], on_stop=on_stop
    )


def main() -> None:
    run_service(NAME, AuditSettings, build)


if __name__ == "__main__":
    main()
