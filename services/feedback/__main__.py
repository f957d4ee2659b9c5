"""``python -m services.feedback``: the feedback service (see :mod:`services.feedback.service`)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

from services.feedback.api import CALLERS, FeedbackApi
from services.feedback.service import AuditReader, FeedbackService
from services.feedback.settings import FeedbackSettings
from services.feedback.store import FeedbackStore
from shared import sqldb
from shared.bus import Bus
from shared.health import HealthState
from shared.http_server import HttpApi
from shared.logging import get_logger
from shared.service import run_service
from shared.service_auth import ServiceGuard, service_headers
from shared.sqldb import Driver
from shared.topics import FEEDBACK_EVENTS

NAME = "feedback"
log = get_logger("services.feedback")


async def open_driver(settings: FeedbackSettings) -> Driver:
    """The store's database, as the settings choose it."""
    url = settings.feedback_database_url
    return await sqldb.open_driver(
        settings.store_kind(), settings.sqlite_path(),
        None if url is None else url.get_secret_value(),
        settings.feedback_database_password_file, prefix="MESHLLM_FEEDBACK",
    )  # fmt: skip


async def build(settings: FeedbackSettings, bus: Bus, health: HealthState) -> Awaitable[None]:
    guard = await asyncio.to_thread(ServiceGuard.load, settings, CALLERS)  # fail fast
    store = await FeedbackStore(await open_driver(settings)).open()
    log.info("feedback store opened", store=settings.store_kind(), examples=await store.count())
    audit = AuditReader(settings.audit_url, service_headers(settings))
    service = FeedbackService(store, settings, bus.publisher, audit)
    # the store keeps one row per (tenant, request, subject): redeliveries change nothing
    bus.subscribe(FEEDBACK_EVENTS, group=NAME, durable_dedup=False)(service.on_event)
    server = HttpApi(
        FeedbackApi(service, guard).app(),
        name="feedback API",
        host=settings.feedback_api_host,
        port=settings.feedback_api_port,
        settings_hint="MESHLLM_FEEDBACK_API_HOST, MESHLLM_FEEDBACK_API_PORT",
    )
    server.report_readiness(health)

    async def on_stop() -> None:
        drain_s = settings.bus.drain_timeout_ms / 1000
        await asyncio.gather(*(subscriber.stop(drain_s) for subscriber in bus.subscribers))
        await audit.close()
        await store.close()

    return server.serve(
        background=[service.run_quality(), service.run_retention()], on_stop=on_stop
    )


def main() -> None:
    run_service(NAME, FeedbackSettings, build)


if __name__ == "__main__":
    main()
