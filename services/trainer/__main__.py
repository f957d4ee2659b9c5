"""``python -m services.trainer``: the trainer service (files, fine-tuning jobs, their runs;
see :mod:`services.trainer.service` and :mod:`services.trainer.runner`)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

from services.trainer.api import CALLERS, TrainerApi
from services.trainer.runner import Runner
from services.trainer.service import DatasetReader, TrainerService
from services.trainer.settings import TrainerSettings
from services.trainer.store import TrainerStore
from shared import sqldb
from shared.bus import Bus
from shared.health import HealthState
from shared.http_server import HttpApi
from shared.logging import get_logger
from shared.service import run_service
from shared.service_auth import ServiceGuard, service_headers
from shared.sqldb import Driver
from shared.topics import TRAINING_JOBS

NAME = "trainer"
log = get_logger("services.trainer")


async def open_driver(settings: TrainerSettings) -> Driver:
    """The store's database, as the settings choose it."""
    url = settings.trainer_database_url
    return await sqldb.open_driver(
        settings.store_kind(), settings.sqlite_path(),
        None if url is None else url.get_secret_value(),
        settings.trainer_database_password_file, prefix="MESHLLM_TRAINER",
    )  # fmt: skip


async def build(settings: TrainerSettings, bus: Bus, health: HealthState) -> Awaitable[None]:
    guard = await asyncio.to_thread(ServiceGuard.load, settings, CALLERS)  # fail fast
    store = await TrainerStore(await open_driver(settings)).open()
    datasets = DatasetReader(settings.feedback_url, service_headers(settings))
    service = TrainerService(store, settings, bus.publisher, datasets)
    runner = Runner(service, bus.publisher)
    log.info("trainer ready", store=settings.store_kind(), runner=runner.owner)
    # a wake-up only: the store says what to run, so a redelivery changes nothing
    bus.subscribe(TRAINING_JOBS, group=NAME, durable_dedup=False)(runner.on_job)
    server = HttpApi(
        TrainerApi(service, guard).app(),
        name="trainer API",
        host=settings.trainer_api_host,
        port=settings.trainer_api_port,
        settings_hint="MESHLLM_TRAINER_API_HOST, MESHLLM_TRAINER_API_PORT",
    )
    server.report_readiness(health)

    async def on_stop() -> None:
        await runner.stop()  # the children stop; their jobs go back to the queue
        drain_s = settings.bus.drain_timeout_ms / 1000
        await asyncio.gather(*(subscriber.stop(drain_s) for subscriber in bus.subscribers))
        await datasets.close()
        await store.close()

    return server.serve(background=[runner.run_forever()], on_stop=on_stop)


def main() -> None:
    run_service(NAME, TrainerSettings, build)


if __name__ == "__main__":
    main()
