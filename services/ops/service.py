"""The running ops service: spans in, SLI windows kept, rules evaluated, alerts out.

Each ``telemetry.spans`` record is an OTLP export; the answers in it go into the SLI
windows (:mod:`services.ops.sli`). Every ``evaluate_every_s`` the rules run
(:mod:`services.ops.alerts`) and each alert that fires or resolves is published to
``ops.alerts`` (keyed by its alert id, so one alert's events stay in order), logged, and,
with ``alertmanager_url`` set, sent to an Alertmanager (:mod:`services.ops.notify`);
one the broker did not take waits in an outbox and goes out, in order, at the next
evaluation.

Then the scaler (:mod:`services.ops.scaling`) sizes each Serve deployment from the same
windows and the router's backlog on the request topics; a change is published to
``ops.scaling`` (the inference service applies it) and audited on ``audit.events``.
Before both, the queues are sampled (:mod:`services.ops.readings`: the router's backlog,
the audit service's, the dead letters), for the rules that read them and the scaler.
Replica counts come from the inference service's ``model.status`` events; the decisions
of the past are read back from ``ops.scaling`` at start, so a restarted ops service keeps
its cooldowns instead of deciding again on the windows that caused the last change.
Only records the gateway exported (record key ``gateway``, as the span exporter keys them)
are read; a record that is not OTLP is dead-lettered: the topic is internal, but nothing
read from it is trusted.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from google.protobuf.message import Message

from services.ops import metrics as ops_metrics
from services.ops.alerts import Evaluator, Measure, Rule, Transition
from services.ops.history import AlertEvent
from services.ops.notify import AlertmanagerNotifier
from services.ops.readings import READINGS, Readings
from services.ops.scaling import Decision, Demand, Scaler
from services.ops.sli import Labels, SliWindows
from services.ops.spans import ANSWER_SERVICE, NotSpans, answers
from shared.bus import Publisher
from shared.bus.consumer import EventContext, PoisonEvent
from shared.envelope import stamp
from shared.events.v1 import events_pb2 as ev
from shared.logging import get_logger
from shared.topics import AUDIT_EVENTS, OPS_ALERTS, OPS_SCALING, Topic

log = get_logger(__name__)
CONSUMERS = "backlog_consumers"
"""The probe's sample of the router group's members (a backlog nobody reads is no demand)."""
MAX_REPLICAS_READ = 10_000  # a status claiming more is not believed
Probe = Callable[[], Awaitable[Mapping[str, float | None]]]
"""Samples of the mesh's queues: backlog, audit_backlog, dead_letters_total."""


STALE_DECISION_S = 60.0


@dataclass(frozen=True)
class _Outgoing:
    topic: Topic
    event: Message
    key: str
    at_s: float = 0.0  # when decided
    related: Topic | None = None  # the audit record of a scaling decision: OPS_SCALING


class OpsService:
    def __init__(
        self,
        windows: SliWindows,
        evaluator: Evaluator,
        publisher: Publisher,
        *,
        scaler: Scaler | None = None,
        probe: Probe | None = None,
        readings: Readings | None = None,
        notifier: AlertmanagerNotifier | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.windows = windows
        self.evaluator = evaluator
        self.publisher = publisher
        self.scaler = scaler
        self.probe = probe
        self.clock = clock
        self.readings = readings or Readings()
        self.notifier = notifier
        self.replicas: dict[str, int] = {}  # deployment -> its count, as last reported
        self.ceilings: dict[str, int] = {}  # deployment -> the most its owner would run
        self.running: dict[str, int] = {}  # deployment -> replicas running, as reported
        self.waiting: int | None = None  # the router's backlog at the last round
        self.unconsumed = False  # the router's group had no members at the last round
        self.outbox: list[_Outgoing] = []  # decided, not yet taken by the broker

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

    async def on_status(self, status: ev.ModelStatus, ctx: EventContext) -> None:
        """The inference service's replica count of one deployment."""
        if self.scaler is None or status.deployment not in self.scaler.policies:
            return
        if status.envelope.producer != "inference":
            return  # another writer's claim (signed events: another mesh service's)
        if status.replicas > MAX_REPLICAS_READ:
            raise PoisonEvent(f"replicas {status.replicas} exceeds {MAX_REPLICAS_READ}")
        self.replicas[status.deployment] = status.replicas
        if status.max_replicas:
            self.ceilings[status.deployment] = status.max_replicas
        self.running[status.deployment] = status.running_replicas

    async def on_decision(self, decision: ev.ScalingDecision, ctx: EventContext) -> None:
        """A decision of the past (this process's, or an earlier one's): its cooldowns."""
        if self.scaler is not None and decision.envelope.producer == "ops":
            at_s = decision.envelope.occurred_at.ToNanoseconds() / 1e9
            self.scaler.changed(decision.deployment, min(at_s, self.clock()))

    def restore(self, history: Mapping[str, AlertEvent]) -> int:
        """Take over the alerts an earlier instance left firing (see
        :mod:`services.ops.history`); one whose rule is gone is resolved with the next
        round's events. Returns how many were firing."""
        firing = 0
        for alert_id, event in sorted(history.items()):
            if not event.firing:
                continue
            firing += 1
            alert = event.alert
            labels: Labels = tuple(sorted(alert.labels.items()))
            value = None if math.isnan(alert.value) else alert.value
            if self.evaluator.restore(alert.rule, labels, min(event.at_s, self.clock()), value):
                continue
            gone = ev.OpsAlert()
            gone.CopyFrom(alert)
            gone.ClearField("envelope")
            gone.state = ev.ALERT_STATE_RESOLVED
            gone.summary = f"{alert.summary} (its rule {alert.rule} is no longer loaded)"
            self.outbox.append(_Outgoing(OPS_ALERTS, gone, alert_id))
        return firing

    async def evaluate_now(self) -> tuple[list[Transition], list[Decision]]:
        """Run the rules and the scaler once; publish what fired, resolved or changed
        (and return it)."""
        now = self.clock()
        await self._read(now)
        changes = self.evaluator.evaluate(now, lambda rule: self._measures(now, rule))
        for change in changes:
            self.outbox.append(self._alert(change))
        decisions = await self._scale(now)
        try:
            await self._flush(now)
        finally:  # best effort, bounded: the events on ops.alerts are the record
            if self.notifier is not None:
                await self.notifier.notify(now, self.evaluator.firing(), changes)
        return changes, decisions

    async def _flush(self, now: float) -> None:
        """Publish the outbox in order; raises, keeping the rest, if the broker does not
        take one. A scaling decision older than ``STALE_DECISION_S`` that never went out is
        dropped instead, with its audit record: after an outage the scaler decides again
        from what it then sees."""
        while self.outbox:
            out = self.outbox[0]
            if out.topic is OPS_SCALING and now - out.at_s > STALE_DECISION_S:
                log.warning("stale scaling decision dropped", key=out.key)
                self.outbox.pop(0)
                if self.outbox and self.outbox[0].related is OPS_SCALING:
                    self.outbox.pop(0)  # its audit record: it was never published
                continue
            await self.publisher.publish(out.topic, out.event, key=out.key)
            self.outbox.pop(0)

    def _measures(self, now: float, rule: Rule) -> Mapping[Labels, Measure]:
        if rule.indicator in READINGS:
            return {(): self.readings.reading(rule.indicator, now, rule.window_s)}
        return self.windows.slis(now, rule.window_s, rule.by)

    async def _read(self, now: float) -> None:
        """Sample the queues; a sample not taken is unknown (None), never a guess."""
        values: Mapping[str, float | None] = {}
        if self.probe is not None:
            try:
                values = await self.probe()
            except Exception as error:  # the P99 still decides; the queues are unknown
                log.warning("queues unknown", error=f"{type(error).__name__}: {error}")
        self.readings.sample(now, dict(values))
        backlog = self.readings.latest["backlog"]
        self.waiting = None if backlog is None else int(backlog)
        if self.waiting is not None and values.get(CONSUMERS) == 0:
            # no router reads the queue: more replicas would answer none of it (the backlog
            # alert still sees it); an unknown member count leaves the backlog as it is
            if not self.unconsumed:
                log.warning("the router's group has no members: its backlog is not demand")
            self.unconsumed = True
            self.waiting = None
        elif values.get(CONSUMERS):
            self.unconsumed = False

    async def _scale(self, now: float) -> list[Decision]:
        if self.scaler is None:
            return []
        decisions = []
        for name, policy in self.scaler.policies.items():
            groups = self.windows.slis(now, policy.window_s, where={"operation": policy.operations})
            sli = groups.get(())
            demand = Demand(
                answers=sli.requests if sli else 0,
                p99_s=sli.p99_s if sli else None,
                concurrency=sli.concurrency if sli else 0.0,
                waiting=self.waiting if policy.out_waiting_per_replica is not None else None,
            )
            current = self.replicas.get(name)
            settled = current is None or self.running.get(name, current) >= current
            decision = self.scaler.decide(
                name, now, current, demand, self.ceilings.get(name), settled=settled
            )
            if decision is not None:
                decisions.append(decision)
                self.replicas[name] = decision.target  # until the inference service says
                self.outbox.extend(self._scaling(decision))
        return decisions

    async def run(self, every_s: float) -> None:
        while True:
            await asyncio.sleep(every_s)
            try:
                await self.evaluate_now()
            except Exception:  # the next round tries again; the failure is logged
                log.exception("rule evaluation failed")

    def _scaling(self, decision: Decision) -> list[_Outgoing]:
        ops_metrics.decisions.add(1, {"deployment": decision.deployment, "reason": decision.reason})
        log.warning(
            "scaling",
            deployment=decision.deployment,
            replicas=f"{decision.current} -> {decision.target}",
            reason=decision.reason,
            detail=decision.detail,
        )
        event = ev.ScalingDecision(
            deployment=decision.deployment,
            current_replicas=decision.current,
            target_replicas=decision.target,
            reason=f"{decision.reason}: {decision.detail}",
        )
        stamp(event, producer="ops")
        audit = ev.AuditEvent(request_id=f"scaling-{event.envelope.event_id}")
        audit.scaling.CopyFrom(
            ev.ScalingRecord(
                deployment=decision.deployment,
                current_replicas=decision.current,
                target_replicas=decision.target,
                reason=event.reason,
                decision_id=event.envelope.event_id,
            )
        )
        now = self.clock()
        return [
            _Outgoing(OPS_SCALING, event, decision.deployment, now),
            _Outgoing(AUDIT_EVENTS, audit, audit.request_id, now, related=OPS_SCALING),
        ]

    def _alert(self, change: Transition) -> _Outgoing:
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
        return _Outgoing(OPS_ALERTS, alert, change.alert_id)
