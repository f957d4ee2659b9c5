"""What the ops loop said before: the latest event of each alert on ``ops.alerts``.

A (re)started ops service reads it before its first evaluation, so that an alert an earlier
instance left firing is still firing here: it resolves (with its event) once its condition
clears, instead of staying "firing" for ever in Alertmanager and ``meshllm alerts``, and a
condition still breached does not fire a second time. ``meshllm alerts`` shows the same
reading.

Only the ops service's own events count (``envelope.producer == "ops"``), and where the
mesh signs its events (``MESHLLM_BUS__REQUIRE_SIGNED``), only those whose signature
verifies: another writer on the topic can neither raise nor silence an alert here.
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.message import DecodeError

from shared.bus.security import client_options
from shared.bus.signing import SIGNATURE_HEADER, UnverifiedEvent, load_signer
from shared.events.v1 import events_pb2 as ev
from shared.logging import get_logger
from shared.settings import MeshSettings
from shared.topics import OPS_ALERTS

log = get_logger(__name__)
PRODUCER = "ops"


@dataclass(frozen=True)
class AlertEvent:
    alert: ev.OpsAlert
    at_s: float  # when it was published (its envelope's time)

    @property
    def firing(self) -> bool:
        return self.alert.state == ev.ALERT_STATE_FIRING


async def latest_alerts(
    settings: MeshSettings, bootstrap: str | None = None
) -> dict[str, AlertEvent]:
    """Every alert's latest trusted event on ``ops.alerts``, by alert id (the topic keeps
    seven days)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    signer = load_signer(settings, required=True) if settings.signatures_required else None
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap or settings.kafka.bootstrap,
        enable_auto_commit=False,
        **client_options(settings.kafka),
    )
    await consumer.start()
    latest: dict[str, AlertEvent] = {}
    refused = 0
    try:
        partitions = [TopicPartition(OPS_ALERTS.name, p) for p in range(OPS_ALERTS.partitions)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        while any([await consumer.position(tp) < ends[tp] for tp in partitions]):
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for record in records:
                    found = _trusted(record, signer)
                    if found is None:
                        refused += 1
                        continue
                    latest[found.alert.alert_id] = found
    finally:
        await consumer.stop()
    if refused:
        log.warning("events on ops.alerts not taken as the ops service's", count=refused)
    return latest


def _trusted(record: object, signer: object) -> AlertEvent | None:
    value: bytes = getattr(record, "value", None) or b""
    if signer is not None:
        headers = getattr(record, "headers", None) or ()
        signature = next((v for k, v in headers if k == SIGNATURE_HEADER), None)
        try:
            signer.verify(  # type: ignore[attr-defined]
                OPS_ALERTS.name, ev.OpsAlert.DESCRIPTOR.full_name.encode(), value, signature
            )
        except UnverifiedEvent:
            return None
    try:
        alert = ev.OpsAlert.FromString(value)
    except DecodeError:
        return None
    if alert.envelope.producer != PRODUCER or not alert.alert_id or not alert.rule:
        return None
    return AlertEvent(alert, alert.envelope.occurred_at.ToNanoseconds() / 1e9)
