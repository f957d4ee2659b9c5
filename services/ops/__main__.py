"""``python -m services.ops``: the ops service (see :mod:`services.ops.service`)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from services.ops.alerts import DEFAULT_RULES, Evaluator, load_rules
from services.ops.metrics import OpsMetrics
from services.ops.scaling import Scaler
from services.ops.service import OpsService
from services.ops.settings import OpsSettings
from services.ops.sli import SliWindows
from shared.bus import Bus
from shared.bus.lag import GroupLag
from shared.health import HealthState
from shared.logging import get_logger
from shared.service import run_service
from shared.topics import (
    MODEL_STATUS,
    OPS_SCALING,
    REQUESTS_HIGH,
    REQUESTS_LOW,
    REQUESTS_NORMAL,
    TELEMETRY_SPANS,
)

NAME = "ops"
log = get_logger("services.ops")


async def build(settings: OpsSettings, bus: Bus, health: HealthState) -> Awaitable[None]:
    path = settings.ops.rules_file or DEFAULT_RULES
    rules = await asyncio.to_thread(load_rules, path)  # a bad rule fails the start
    log.info("alert rules loaded", rules=[rule.name for rule in rules], file=str(path))
    windows = SliWindows(settings.ops.bucket_s, settings.ops.keep_s)
    evaluator = Evaluator(rules)
    scaling = settings.ops.scaling
    scaler, lag = None, None
    if scaling.enabled:
        scaler = Scaler(scaling.policies())
        lag = GroupLag(settings.kafka)
        await lag.start()
    service = OpsService(
        windows,
        evaluator,
        bus.publisher,
        scaler=scaler,
        backlog=_backlog(lag, scaling.group) if lag is not None else None,
    )
    OpsMetrics(windows, evaluator, scaling=service)
    # spans are a stream of facts: dedup by event id does not apply (they carry none); a
    # (re)started ops service reads the windows' span of the past again, so a restart,
    # kill -9 included, recomputes them instead of starting empty
    bus.subscribe(TELEMETRY_SPANS, group=NAME, durable_dedup=False, rewind_s=settings.ops.keep_s)(
        service.on_spans
    )
    if scaler is not None:
        # replica counts as the inference service reports them (every 15 s, and on change)
        bus.subscribe(MODEL_STATUS, group=f"{NAME}-status", durable_dedup=False, from_latest=True)(
            service.on_status
        )
        # the decisions of the last cooldown, read again at each start: a restart keeps them
        longest = max(max(p.out_cooldown_s, p.in_cooldown_s) for p in scaling.policies())
        bus.subscribe(
            OPS_SCALING, group=f"{NAME}-decisions", durable_dedup=False, rewind_s=longest
        )(service.on_decision)
    return _run(service, settings.ops.evaluate_every_s, lag)


def _backlog(lag: GroupLag, group: str) -> Callable[[], Awaitable[int]]:
    async def backlog() -> int:
        return await lag.behind(group, (REQUESTS_HIGH, REQUESTS_NORMAL, REQUESTS_LOW))

    return backlog


async def _run(service: OpsService, every_s: float, lag: GroupLag | None) -> None:
    try:
        await service.run(every_s)
    finally:
        if lag is not None:
            await lag.close()


def main() -> None:
    run_service(NAME, OpsSettings, build)


if __name__ == "__main__":
    main()
