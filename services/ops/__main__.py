"""``python -m services.ops``: the ops service (see :mod:`services.ops.service`)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

from services.ops.alerts import DEFAULT_RULES, Evaluator, load_rules
from services.ops.history import latest_alerts
from services.ops.metrics import OpsMetrics
from services.ops.notify import AlertmanagerNotifier
from services.ops.readings import Readings
from services.ops.scaling import Scaler
from services.ops.service import CONSUMERS, OpsService, Probe
from services.ops.settings import OpsSettings
from services.ops.sli import SliWindows
from shared.bus import Bus
from shared.bus.lag import GroupLag
from shared.health import HealthState
from shared.logging import get_logger
from shared.service import run_service
from shared.topics import (
    AUDIT_EVENTS,
    DLQ_PARTITIONS,
    MODEL_STATUS,
    OPS_SCALING,
    REGISTRY,
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
    scaler = Scaler(scaling.policies()) if scaling.enabled else None
    lag = GroupLag(settings.kafka)
    await lag.start()
    notifier = None
    if settings.ops.alertmanager_url is not None:
        url = str(settings.ops.alertmanager_url)
        notifier = AlertmanagerNotifier(url, settings.ops.evaluate_every_s)
        log.info("alerts also go to alertmanager", url=notifier.shown)
    service = OpsService(
        windows,
        evaluator,
        bus.publisher,
        scaler=scaler,
        probe=_probe(lag, scaling.group),
        readings=Readings(settings.ops.keep_s),
        notifier=notifier,
    )
    # the alerts an earlier instance left firing stay firing (and resolve) here
    firing = service.restore(await latest_alerts(settings))
    if firing:
        log.info("alerts left firing taken over", count=firing)
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
    return _run(service, settings.ops.evaluate_every_s, lag, notifier)


def _probe(lag: GroupLag, group: str) -> Probe:
    """The queues' samples: each one the broker did not answer is None."""
    dead_letter_topics = [topic.dlq for topic in REGISTRY if topic.consumers]

    async def probe() -> dict[str, float | None]:
        values: dict[str, float | None] = {}
        asks = {
            "backlog": lag.behind(group, (REQUESTS_HIGH, REQUESTS_NORMAL, REQUESTS_LOW)),
            "audit_backlog": lag.behind("audit", (AUDIT_EVENTS,)),
            "dead_letters_total": lag.records(dead_letter_topics, DLQ_PARTITIONS),
            CONSUMERS: lag.members(group),
        }
        for name, ask in asks.items():
            try:
                values[name] = float(await ask)
            except Exception as error:
                values[name] = None
                log.warning("queue unknown", queue=name, error=f"{type(error).__name__}: {error}")
        return values

    return probe


async def _run(
    service: OpsService, every_s: float, lag: GroupLag, notifier: AlertmanagerNotifier | None
) -> None:
    try:
        await service.run(every_s)
    finally:
        await lag.close()
        if notifier is not None:
            await notifier.close()


def main() -> None:
    run_service(NAME, OpsSettings, build)


if __name__ == "__main__":
    main()
