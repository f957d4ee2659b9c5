"""``python -m services.ops``: the ops service (see :mod:`services.ops.service`)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

from services.ops.alerts import DEFAULT_RULES, Evaluator, load_rules
from services.ops.metrics import OpsMetrics
from services.ops.service import OpsService
from services.ops.settings import OpsSettings
from services.ops.sli import SliWindows
from shared.bus import Bus
from shared.health import HealthState
from shared.logging import get_logger
from shared.service import run_service
from shared.topics import TELEMETRY_SPANS

NAME = "ops"
log = get_logger("services.ops")


async def build(settings: OpsSettings, bus: Bus, health: HealthState) -> Awaitable[None]:
    path = settings.ops.rules_file or DEFAULT_RULES
    rules = await asyncio.to_thread(load_rules, path)  # a bad rule fails the start
    log.info("alert rules loaded", rules=[rule.name for rule in rules], file=str(path))
    windows = SliWindows(settings.ops.bucket_s, settings.ops.keep_s)
    evaluator = Evaluator(rules)
    service = OpsService(windows, evaluator, bus.publisher)
    OpsMetrics(windows, evaluator)
    # spans are a stream of facts: dedup by event id does not apply (they carry none); a
    # (re)started ops service reads the windows' span of the past again, so a restart,
    # kill -9 included, recomputes them instead of starting empty
    bus.subscribe(TELEMETRY_SPANS, group=NAME, durable_dedup=False, rewind_s=settings.ops.keep_s)(
        service.on_spans
    )
    return service.run(settings.ops.evaluate_every_s)


def main() -> None:
    run_service(NAME, OpsSettings, build)


if __name__ == "__main__":
    main()
