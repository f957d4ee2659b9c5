"""``python -m services.audit``: the audit service (see :mod:`services.audit.service`)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Generator

import uvicorn

from services.audit.api import AuditApi
from services.audit.checkpoint import CheckpointSigner
from services.audit.log import AuditLog
from services.audit.service import AuditService
from services.audit.settings import AuditSettings
from services.audit.store import open_store
from shared.bus import Bus
from shared.health import HealthState
from shared.logging import get_logger
from shared.service import run_service
from shared.topics import AUDIT_EVENTS

NAME = "audit"
log = get_logger("services.audit")


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the service's shutdown drives it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


async def build(settings: AuditSettings, bus: Bus, health: HealthState) -> Awaitable[None]:
    store = await asyncio.to_thread(open_store, settings)
    signer = await asyncio.to_thread(CheckpointSigner.load_or_create, settings.signing_key_path)
    audit_log = await asyncio.to_thread(AuditLog, store, signer)
    log.info(
        "audit log opened", log_id=audit_log.log_id, size=audit_log.size, store=settings.store_kind
    )
    service = AuditService(audit_log, settings, bus.publisher)
    # the store absorbs redeliveries by event id: no separate dedup store is needed
    bus.subscribe(AUDIT_EVENTS, group=NAME, durable_dedup=False)(service.on_event)
    api = AuditApi(audit_log, settings.max_page_size)
    server = _Server(
        uvicorn.Config(
            api.app(),
            host=settings.audit_api_host,
            port=settings.audit_api_port,
            log_level="warning",
            # uvicorn's own handlers would print plain text past the PII and credential filters
            log_config=None,
            lifespan="off",
        )
    )
    health.readiness["http"] = lambda: None if server.started else "HTTP not listening yet"
    return _serve(server, service, bus, settings)


async def _listen(server: _Server, settings: AuditSettings) -> None:
    try:
        await server.serve()
    except SystemExit:  # uvicorn exits the process when it cannot bind; fail like a service
        raise RuntimeError(
            f"the audit API cannot listen on {settings.audit_api_host}:{settings.audit_api_port} "
            "(MESHLLM_AUDIT_API_HOST, MESHLLM_AUDIT_API_PORT)"
        ) from None


async def _serve(server: _Server, service: AuditService, bus: Bus, settings: AuditSettings) -> None:
    background = [
        asyncio.create_task(service.run_checkpoints(), name="checkpoints"),
        asyncio.create_task(service.run_retention(), name="retention"),
    ]
    task = asyncio.create_task(_listen(server, settings), name="audit-api")
    while not server.started and not task.done():
        await asyncio.sleep(0.05)
    if server.started:
        port = server.servers[0].sockets[0].getsockname()[1]  # the one picked, for port 0
        log.info("audit API listening", url=f"http://{settings.audit_api_host}:{port}")
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        server.should_exit = True
        for work in background:
            work.cancel()
        await asyncio.gather(task, *background, return_exceptions=True)
        # Drain what the broker already holds before the last checkpoint, so that it covers
        # them; the bus stops these subscribers again after this returns, which is a no-op.
        drain_s = settings.bus.drain_timeout_ms / 1000
        await asyncio.gather(*(subscriber.stop(drain_s) for subscriber in bus.subscribers))
        await service.close()
        raise


def main() -> None:
    run_service(NAME, AuditSettings, build)


if __name__ == "__main__":
    main()
