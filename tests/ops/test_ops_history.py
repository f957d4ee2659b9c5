"""A restarted ops service takes over the alerts an earlier instance left firing (read back
from ops.alerts): they resolve once their condition clears, one whose rule is gone is
resolved at once, and an alert another writer put on the topic is not taken."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest

from services.ops.__main__ import build
from services.ops.alerts import Transition, load_rules
from services.ops.settings import OpsSettings
from shared.bus import Bus
from shared.events.v1 import events_pb2 as ev
from shared.health import HealthState
from shared.topics import OPS_ALERTS
from tests.conftest import poll_until
from tests.ops.test_ops_service import RULES

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(120)]


def firing(rule: str, alert_id: str, model: str) -> ev.OpsAlert:
    alert = ev.OpsAlert(alert_id=alert_id, rule=rule, state=ev.ALERT_STATE_FIRING)
    alert.severity, alert.value, alert.threshold, alert.summary = "page", 0.9, 0.5, "left firing"
    alert.labels["model"] = model
    return alert


async def test_alerts_left_firing_resolve_after_a_restart(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(RULES)
    [rule] = load_rules(rules_file)
    mine, forged = f"model-{uuid.uuid4().hex[:8]}", f"model-{uuid.uuid4().hex[:8]}"

    def alert_id(model: str) -> str:
        return Transition(rule, (("model", model),), True, 0.9, 0.0, 0.0).alert_id

    gone_id = f"GoneRule-{uuid.uuid4().hex[:12]}"
    settings = OpsSettings(
        kafka={"bootstrap": kafka_bootstrap},
        data_dir=tmp_path,
        ops={"rules_file": rules_file, "bucket_s": 1, "keep_s": 60, "evaluate_every_s": 0.2},
    )
    earlier = Bus(settings, service="ops")  # the instance that was killed
    other = Bus(settings, service="tests")  # another writer on the topic
    await earlier.start()
    await other.start()
    await earlier.publisher.publish(OPS_ALERTS, firing(rule.name, alert_id(mine), mine))
    await earlier.publisher.publish(OPS_ALERTS, firing("GoneRule", gone_id, mine))
    await other.publisher.publish(OPS_ALERTS, firing(rule.name, alert_id(forged), forged))
    await earlier.stop()

    seen: list[ev.OpsAlert] = []

    async def on_alert(alert: ev.OpsAlert, ctx: object) -> None:
        seen.append(alert)

    reader = Bus(settings, service="tests")
    reader.subscribe(OPS_ALERTS, group=f"tests-{uuid.uuid4().hex[:8]}", durable_dedup=False,
                     from_latest=True)(on_alert)  # fmt: skip
    await reader.start()
    await poll_until(lambda: reader.ready, message="reader bus")
    bus = Bus(settings, service="ops")
    evaluating = asyncio.ensure_future(await build(settings, bus, HealthState("ops")))
    await bus.start()
    try:
        await poll_until(lambda: bus.ready, message="ops bus")

        def resolved() -> set[str]:
            return {a.alert_id for a in seen if a.state == ev.ALERT_STATE_RESOLVED}

        await poll_until(lambda: {alert_id(mine), gone_id} <= resolved(), timeout=30,
                         message="the alerts left firing resolved")  # fmt: skip
        await asyncio.sleep(1)  # rounds after: nothing about the forged one, nothing twice
        assert alert_id(forged) not in {a.alert_id for a in seen}
        assert [a.alert_id for a in seen].count(alert_id(mine)) == 1
        assert not [a for a in seen if a.state == ev.ALERT_STATE_FIRING]
    finally:
        evaluating.cancel()
        await bus.stop(drain=True)
        await other.stop()
        await reader.stop()
