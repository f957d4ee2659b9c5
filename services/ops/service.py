"""The running ops service: spans in, SLI windows kept, rules evaluated, alerts out.

Each ``telemetry.spans`` record is an OTLP export; the answers in it go into the SLI
windows (:mod:`services.ops.sli`). Every ``evaluate_every_s`` the rules run
(:mod:`services.ops.alerts`) and each alert that fires or resolves is published to
``ops.alerts`` (keyed by its alert id, so one alert's events stay in order) and logged;
one the broker did not take waits in an outbox and goes out, in order, at the next
evaluation.
Only records the gateway exported (record key ``gateway``, as the span exporter keys them)
are read; a record that is not OTLP is dead-lettered: the topic is internal, but nothing
read from it is trusted.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from services.ops import metrics as ops_metrics
from services.ops.alerts import Evaluator, Transition
from services.ops.sli import SliWindows
from services.ops.spans import ANSWER_SERVICE, NotSpans, answers
from shared.bus import Publisher
from shared.bus.consumer import EventContext, PoisonEvent
from shared.events.v1 import events_pb2 as ev
from shared.logging import get_logger
from shared.topics import OPS_ALERTS

log = get_logger(__name__)


class OpsService:
    def __init__(
        self,
        windows: SliWindows,
        evaluator: Evaluator,
        publisher: Publisher,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.windows = windows
        self.evaluator = evaluator
        self.publisher = publisher
        self.clock = clock
        self.outbox: list[Transition] = []  # decided, not yet taken by the broker

    async def on_spans(self, payload: bytes, ctx: EventContext) -> None:
        if ctx.key != ANSWER_SERVICE.encode():
            return  # another service's spans: no answers in them
        try:
            found = list(answers(payload or b""))
        except NotSpans as error:
            ops_metrics.rejected.add(1)
            raise PoisonEvent(str(error)) from error
        self.windows.add_all(found)
        if found:
            ops_metrics.answers.add(len(found))

    async def evaluate_now(self) -> list[Transition]:
        """Run the rules once; publish what fired or resolved (and return it)."""
        now = self.clock()
        changes = self.evaluator.evaluate(
            now, lambda rule: self.windows.slis(now, rule.window_s, rule.by)
        )
        self.outbox.extend(changes)
        while self.outbox:  # raises, keeping the rest, if the broker does not take one
            await self._publish(self.outbox[0])
            self.outbox.pop(0)
        return changes

    async def run(self, every_s: float) -> None:
        while True:
            await asyncio.sleep(every_s)
            try:
                await self.evaluate_now()
            except Exception:  # the next round tries again; the failure is logged
                log.exception("rule evaluation failed")

    async def _publish(self, change: Transition) -> None:
        rule = change.rule
        state = "firing" if change.firing else "resolved"
        ops_metrics.transitions.add(1, {"rule": rule.name, "state": state})
        log.warning(
            f"alert {state}",
            alert_id=change.alert_id,
            rule=rule.name,
            labels=dict(change.labels),
            value=change.value,
            threshold=rule.threshold,
        )
        alert = ev.OpsAlert(
            alert_id=change.alert_id,
            rule=rule.name,
            state=ev.ALERT_STATE_FIRING if change.firing else ev.ALERT_STATE_RESOLVED,
            severity=rule.severity,
            labels=dict(change.labels),
            value=change.value if change.value is not None else float("nan"),
            threshold=rule.threshold,
            summary=rule.summary,
        )
        await self.publisher.publish(OPS_ALERTS, alert, key=change.alert_id)
