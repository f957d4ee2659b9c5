"""The life of a service process: settings, logging, telemetry, bus, health, shutdown.

A service module builds its components and hands them to :func:`run_service`:

    def main() -> None:
        run_service("audit", AuditSettings, build)

``build(settings, bus)`` registers subscribers on the bus and returns an optional
coroutine to run beside them (an HTTP server, a periodic job). The process exits 0
after SIGTERM/SIGINT, once the bus has committed what it handled and flushed what
it published; non-zero if a component fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from shared.bus import Bus
from shared.health import HealthServer, HealthState
from shared.logging import configure_logging, get_logger
from shared.settings import Settings, SettingsError, load_settings
from shared.telemetry import Telemetry

log = get_logger(__name__)

Build = Callable[[Any, Bus, HealthState], Awaitable[Awaitable[None] | None]]


async def serve(name: str, settings: Settings, build: Build) -> int:
    telemetry = Telemetry(settings, name)
    telemetry.install()
    bus = Bus(settings, service=name)
    health = HealthState(service=name)
    health.liveness["bus"] = lambda: (
        f"subscriber failed: {bus.failure()}" if bus.failure() else None
    )
    health.readiness["bus"] = lambda: None if bus.ready else "bus not connected or not assigned"
    server = HealthServer(
        health,
        settings.health_host,
        settings.health_port,
        metrics=telemetry.scrape.render if telemetry.scrape else None,
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    try:
        extra = await build(settings, bus, health)
    except Exception as error:
        log.exception("start-up failed", error=f"{type(error).__name__}: {error}")
        telemetry.shutdown()
        return 1
    # again: a component may have put its own handler in (Ray's core worker does, for SIGTERM)
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await bus.start()
    telemetry.export_spans_to_kafka(bus.publisher, loop)
    await server.start()
    log.info(
        "service started",
        health_port=server.port,
        pid=os.getpid(),
        bootstrap=settings.kafka.bootstrap,
    )

    waiters: list[asyncio.Future[Any]] = [asyncio.create_task(stop.wait(), name="stop-signal")]
    if extra is not None:
        waiters.append(asyncio.ensure_future(extra))
    waiters.extend(asyncio.create_task(_watch(s), name="watch") for s in bus.subscribers)
    done, pending = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    failure = next((t.exception() for t in done if not t.cancelled() and t.exception()), None)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)

    log.info("service stopping", reason="failure" if failure else "signal")
    await bus.stop(drain=failure is None)
    await telemetry.flush()
    await server.stop()
    telemetry.shutdown()
    if failure is not None:
        log.error("service failed", error=f"{type(failure).__name__}: {failure}")
        return 1
    log.info("service stopped")
    return 0


async def _watch(subscriber: Any) -> None:
    while subscriber.running:
        await asyncio.sleep(0.5)
    if subscriber.failure is not None:
        raise subscriber.failure


def run_service(name: str, settings_cls: type[Settings], build: Build) -> None:
    """Entry point of ``python -m services.<name>``: exits with the service's status."""
    try:
        settings = load_settings(settings_cls, service_name=name)
    except SettingsError as error:
        print(f"{name}: {error}", file=sys.stderr)
        sys.exit(2)
    configure_logging(name, settings.log_level, settings.log_format, settings.pii)
    code = 1
    with contextlib.suppress(KeyboardInterrupt):
        code = asyncio.run(serve(name, settings, build))
    sys.exit(code)
