"""Readings of the mesh's queues (backlog, audit backlog, dead letters): the samples kept
(no I/O), the rules that read them, the ops service sampling its probe and alerting on them
(no broker), their Prometheus queries, and the broker-side counts of :mod:`shared.bus.lag`
on a real (embedded) broker.

This module is over 500 lines: the readings, their rules, their PromQL and the broker
probe are one feature, read together.
"""

from __future__ import annotations

import asyncio
import math
import re
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import promql_parser
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from services.ops.alerts import DEFAULT_RULES, Evaluator, Rule, RulesError, load_rules
from services.ops.prometheus_rules import READING_QUERIES, expression
from services.ops.readings import COUNTED, READINGS, Reading, Readings
from services.ops.service import OpsService, Probe
from services.ops.sli import INDICATORS, SliWindows
from shared.bus.embedded import EmbeddedBroker
from shared.bus.lag import GroupLag
from shared.events.v1 import events_pb2 as ev
from shared.settings import KafkaSettings
from shared.topics import (
    DLQ_PARTITIONS,
    OPS_ALERTS,
    REQUESTS_HIGH,
    REQUESTS_LOW,
    REQUESTS_NORMAL,
)
from tests.fakes.publisher import RecordingPublisher

ROOT = Path(__file__).resolve().parents[2]
READING_RULES = ("RequestBacklogHigh", "AuditBacklogHigh", "DeadLettersGrowing")


# ------------------------------------------------------------------ the samples kept


def test_the_latest_backlogs_are_the_last_samples() -> None:
    readings = Readings()
    readings.sample(1000.0, {"backlog": 12.0, "audit_backlog": 3.0})
    readings.sample(1010.0, {"backlog": 40.0, "audit_backlog": 7.0})
    assert readings.reading("backlog", 1010.0, 60) == Reading("backlog", 40.0)
    assert readings.reading("audit_backlog", 1010.0, 60) == Reading("audit_backlog", 7.0)
    assert readings.latest == {"backlog": 40.0, "audit_backlog": 7.0}


def test_a_sample_not_taken_makes_the_reading_unknown_not_the_last_value() -> None:
    readings = Readings()
    assert readings.reading("backlog", 0.0, 60).measured is None  # nothing sampled yet
    readings.sample(1000.0, {"backlog": 500.0, "audit_backlog": 9.0})
    readings.sample(1010.0, {"backlog": None})  # audit_backlog: missing key
    assert readings.reading("backlog", 1010.0, 60).measured is None
    assert readings.reading("audit_backlog", 1010.0, 60).measured is None
    readings.sample(1020.0, {})  # nothing taken at all
    assert readings.latest == {"backlog": None, "audit_backlog": None}
    readings.sample(1030.0, {"backlog": 0.0, "audit_backlog": 0.0})  # 0 is a value
    assert readings.reading("backlog", 1030.0, 60).measured == 0.0
    assert readings.reading("audit_backlog", 1030.0, 60).measured == 0.0


def test_a_reading_counts_as_enough_answers_for_any_rule() -> None:
    reading = Reading("backlog", 5.0)
    assert reading.value("backlog") == 5.0
    assert reading.count_for("backlog") == COUNTED
    assert COUNTED >= 1_000_000  # above any sensible min_requests


def test_dead_letters_are_unknown_before_any_total() -> None:
    readings = Readings()
    assert readings.reading("dead_letters", 1000.0, 300).measured is None
    readings.sample(1000.0, {"backlog": 1.0})  # a round without the dead-letter total
    assert readings.reading("dead_letters", 1000.0, 300).measured is None


def test_dead_letters_are_the_increase_of_the_total_over_the_rules_window() -> None:
    readings = Readings(keep_s=900)
    for at_s, total in ((1000, 10), (1100, 12), (1200, 15), (1300, 15), (1400, 21)):
        readings.sample(float(at_s), {"dead_letters_total": float(total)})

    def increase(now_s: float, window_s: float) -> float | None:
        return readings.reading("dead_letters", now_s, window_s).measured

    # base: the last total at or before the window's start
    assert increase(1400, 100) == 6  # from 15 at 1300 (at the start exactly)
    assert increase(1400, 150) == 6  # from 15 at 1200 (1250 falls between 1200 and 1300)
    assert increase(1400, 250) == 9  # from 12 at 1100 (1150 falls between 1100 and 1200)
    assert increase(1400, 50) == 6  # from 15 at 1300, the last before 1350
    # a window longer than the history: from the oldest kept
    assert increase(1400, 10_000) == 11
    assert increase(1400, 400) == 11  # from 10 at 1000 (at the start exactly)


def test_dead_letters_never_go_negative_when_the_topics_lose_records() -> None:
    readings = Readings()
    readings.sample(1000.0, {"dead_letters_total": 50.0})
    readings.sample(1010.0, {"dead_letters_total": 20.0})  # retention dropped 30 records
    assert readings.reading("dead_letters", 1010.0, 300).measured == 0.0
    readings.sample(1020.0, {"dead_letters_total": 22.0})
    assert readings.reading("dead_letters", 1020.0, 10).measured == 2.0  # from 20 at 1010
    assert readings.reading("dead_letters", 1020.0, 15).measured == 0.0  # from 50 at 1000


def test_dead_letter_history_older_than_keep_s_is_dropped() -> None:
    readings = Readings(keep_s=100)
    readings.sample(0.0, {"dead_letters_total": 5.0})
    readings.sample(50.0, {"dead_letters_total": 6.0})
    assert readings.reading("dead_letters", 50.0, 1000).measured == 1.0  # 5 still kept
    readings.sample(150.0, {"dead_letters_total": 7.0})  # 0 < 150 - 100: forgotten
    assert readings.reading("dead_letters", 150.0, 1000).measured == 1.0  # from 6, not 5
    readings.sample(151.0, {"dead_letters_total": 7.0})  # 50 < 51: forgotten too
    assert readings.reading("dead_letters", 151.0, 1000).measured == 0.0  # from 7


# ------------------------------------------------------------------ the rules


def write_rule(tmp_path: Path, **fields: object) -> Path:
    rule = {"name": "A", "indicator": "backlog", "threshold": 1, "clear": 1, "for_s": 1,
            "clear_for_s": 1, "window_s": 60, "summary": "s"}  # fmt: skip
    rule.update(fields)
    body = ", ".join(f"{key}: {value}" for key, value in rule.items())
    path = tmp_path / "rules.yaml"
    path.write_text(f"rules: [{{{body}}}]")
    return path


@pytest.mark.parametrize("indicator", sorted(READINGS))
def test_a_reading_rule_with_by_labels_is_refused_saying_why(
    tmp_path: Path, indicator: str
) -> None:
    path = write_rule(tmp_path, indicator=indicator, by="[model]")
    with pytest.raises(RulesError, match=f"{indicator} is one reading of the mesh") as refused:
        load_rules(path)
    assert "no 'by' labels" in str(refused.value)
    assert str(path) in str(refused.value)


@pytest.mark.parametrize("indicator", sorted(READINGS))
def test_a_reading_rule_without_by_labels_loads(tmp_path: Path, indicator: str) -> None:
    [rule] = load_rules(write_rule(tmp_path, indicator=indicator, min_requests=50))
    assert (rule.indicator, rule.by, rule.min_requests) == (indicator, (), 50)


def test_an_unknown_indicators_message_lists_the_readings_too(tmp_path: Path) -> None:
    with pytest.raises(RulesError, match=r"rules\.0\.indicator") as refused:
        load_rules(write_rule(tmp_path, indicator="queue"))
    message = str(refused.value)
    assert "unknown indicator 'queue'" in message
    for name in sorted(READINGS | INDICATORS):
        assert repr(name) in message, name


def test_the_bundled_rules_read_the_backlogs_and_the_dead_letters() -> None:
    rules = {rule.name: rule for rule in load_rules(DEFAULT_RULES)}
    assert {name: rules[name].indicator for name in READING_RULES} == {
        "RequestBacklogHigh": "backlog",
        "AuditBacklogHigh": "audit_backlog",
        "DeadLettersGrowing": "dead_letters",
    }
    assert all(rules[name].by == () and rules[name].above for name in READING_RULES)
    growing = rules["DeadLettersGrowing"]
    assert (growing.threshold, growing.for_s) == (0, 0)  # any dead letter, at once
    assert rules["RequestBacklogHigh"].threshold > rules["RequestBacklogHigh"].clear


# ------------------------------------------------------------------ the ops service


class Queues:
    """A probe the test steers: the values it returns, or an error it raises."""

    def __init__(self, **values: float | None) -> None:
        self.values: dict[str, float | None] = dict(values)
        self.error: Exception | None = None
        self.calls = 0

    async def __call__(self) -> Mapping[str, float | None]:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return dict(self.values)


def reading_rule(**overrides: object) -> Rule:
    fields: dict[str, object] = {
        "name": "BacklogHigh", "indicator": "backlog", "threshold": 100, "clear": 10,
        "for_s": 10, "clear_for_s": 10, "window_s": 60, "summary": "queue long",
    }  # fmt: skip
    fields.update(overrides)
    return Rule.model_validate(fields)


def make_service(
    now: list[float], probe: Probe | None, *rules: Rule
) -> tuple[OpsService, RecordingPublisher]:
    publisher = RecordingPublisher()
    windows = SliWindows(bucket_s=10, keep_s=900, clock=lambda: now[0])
    ops = OpsService(windows, Evaluator(list(rules or (reading_rule(),))), publisher,  # type: ignore[arg-type]
                     probe=probe, clock=lambda: now[0])  # fmt: skip
    return ops, publisher


async def at(ops: OpsService, now: list[float], t: float) -> list[tuple[bool, float | None]]:
    """Evaluate at ``t``: (firing, value) of each transition."""
    now[0] = t
    changes, decisions = await ops.evaluate_now()
    assert decisions == []  # no scaler
    return [(change.firing, change.value) for change in changes]


async def test_a_long_backlog_fires_after_for_s_and_resolves_after_clear_for_s() -> None:
    now = [1000.0]
    queues = Queues(backlog=500.0)
    ops, publisher = make_service(now, queues)
    assert await at(ops, now, 1000) == []  # pending
    assert await at(ops, now, 1009) == []
    assert await at(ops, now, 1010) == [(True, 500.0)]
    [fired] = publisher.on(OPS_ALERTS)
    assert fired.state == ev.ALERT_STATE_FIRING
    assert (fired.rule, fired.value, fired.threshold) == ("BacklogHigh", 500.0, 100.0)
    assert dict(fired.labels) == {}  # one reading for the whole mesh
    assert publisher.sent[0][2] == fired.alert_id  # keyed by its alert id
    queues.values["backlog"] = 50.0  # under the threshold, above the clear bound
    assert await at(ops, now, 1020) == []
    assert await at(ops, now, 1040) == []
    queues.values["backlog"] = 0.0
    assert await at(ops, now, 1050) == []  # clearing from 1050
    assert await at(ops, now, 1059) == []
    assert await at(ops, now, 1060) == [(False, 0.0)]
    resolved = publisher.on(OPS_ALERTS)[-1]
    assert resolved.state == ev.ALERT_STATE_RESOLVED
    assert resolved.alert_id == fired.alert_id
    assert ops.evaluator.firing() == []
    assert queues.calls == 8  # sampled at every evaluation


async def test_an_unknown_backlog_never_fires() -> None:
    now = [1000.0]
    queues = Queues(backlog=500.0)
    queues.error = ConnectionError("broker away")
    ops, publisher = make_service(now, queues)
    for t in range(1000, 1100, 10):
        assert await at(ops, now, t) == []
    assert publisher.sent == []
    assert ops.readings.latest["backlog"] is None
    assert ops.waiting is None


async def test_a_firing_alert_whose_reading_is_unknown_clears_like_one_back_in_bounds() -> None:
    # services/ops/alerts.py Evaluator._step: once firing, ``value is None`` takes the same
    # path as ``rule.cleared(value)``; so a probe that keeps failing resolves the alert after
    # clear_for_s (with no value: NaN on the wire), though services/ops/readings.py says a
    # reading not taken neither fires nor resolves its rules.
    now = [1000.0]
    queues = Queues(backlog=500.0)
    ops, publisher = make_service(now, queues)
    await at(ops, now, 1000)
    assert await at(ops, now, 1010) == [(True, 500.0)]
    queues.error = ConnectionError("broker away")
    assert await at(ops, now, 1020) == []  # unknown: clearing from 1020
    assert ops.readings.reading("backlog", 1020, 60).measured is None
    queues.error = None  # known and still long before clear_for_s: the clearing starts over
    assert await at(ops, now, 1025) == []
    queues.error = ConnectionError("broker away")
    assert await at(ops, now, 1030) == []  # clearing from 1030, not 1020
    assert await at(ops, now, 1039) == []
    [(firing, value)] = await at(ops, now, 1040)
    assert not firing
    assert value is None
    resolved = publisher.on(OPS_ALERTS)[-1]
    assert resolved.state == ev.ALERT_STATE_RESOLVED
    assert math.isnan(resolved.value)


async def test_dead_letters_fire_at_once_and_resolve_once_the_window_has_no_growth() -> None:
    now = [1000.0]
    queues = Queues(dead_letters_total=4.0)  # dead letters of the past: not growing
    growing = reading_rule(name="DeadLetters", indicator="dead_letters", threshold=0,
                           clear=0, for_s=0, clear_for_s=0, window_s=300)  # fmt: skip
    ops, publisher = make_service(now, queues, growing)
    assert await at(ops, now, 1000) == []
    assert await at(ops, now, 1010) == []
    queues.values["dead_letters_total"] = 6.0  # two records dead-lettered
    assert await at(ops, now, 1020) == [(True, 2.0)]
    for t in range(1030, 1320, 10):  # no more growth; 1020 still in the window
        assert await at(ops, now, t) == [], t
    assert ops.readings.reading("dead_letters", 1310, 300).measured == 2.0  # from 4 at 1010
    assert await at(ops, now, 1320) == [(False, 0.0)]  # from 6 at 1020: no growth
    assert [a.state for a in publisher.on(OPS_ALERTS)] == [
        ev.ALERT_STATE_FIRING,
        ev.ALERT_STATE_RESOLVED,
    ]


async def test_the_bundled_dead_letter_rule_resolves_clear_for_s_after_the_window() -> None:
    rules = {rule.name: rule for rule in load_rules(DEFAULT_RULES)}
    rule = rules["DeadLettersGrowing"]
    now = [1000.0]
    queues = Queues(dead_letters_total=0.0)
    ops, publisher = make_service(now, queues, rule)
    await at(ops, now, 1000)
    queues.values["dead_letters_total"] = 1.0
    assert await at(ops, now, 1010) == [(True, 1.0)]
    t = 1010 + rule.window_s  # the growth leaves the window here: clearing from now on
    assert await at(ops, now, t - 1) == []  # still in the window: still firing
    for step in range(0, int(rule.clear_for_s), 30):
        assert await at(ops, now, t + step) == [], t + step
    assert await at(ops, now, t + rule.clear_for_s) == [(False, 0.0)]
    assert len(publisher.on(OPS_ALERTS)) == 2


async def test_without_a_scaler_the_probe_is_still_sampled() -> None:
    now = [1000.0]
    queues = Queues(backlog=7.0, audit_backlog=3.0, dead_letters_total=0.0)
    ops, _ = make_service(now, queues)
    assert ops.scaler is None
    assert ops.waiting is None  # nothing sampled yet
    await at(ops, now, 1000)
    assert queues.calls == 1
    assert ops.waiting == 7
    assert ops.readings.latest == {"backlog": 7.0, "audit_backlog": 3.0}
    queues.values["backlog"] = None  # the broker did not answer for this one
    await at(ops, now, 1010)
    assert ops.waiting is None
    assert ops.readings.latest["audit_backlog"] == 3.0


async def test_without_a_probe_every_reading_is_unknown() -> None:
    now = [1000.0]
    ops, publisher = make_service(now, None)
    for t in (1000, 1010, 1020):
        assert await at(ops, now, t) == []
    assert ops.waiting is None
    assert all(ops.readings.reading(name, 1020, 60).measured is None for name in READINGS)
    assert publisher.sent == []


# ------------------------------------------------------------------ Prometheus

EXPORTED = {  # the instruments of shared/bus/metrics.py, as Prometheus names them
    "meshllm_bus_consumer_lag": '"meshllm.bus.consumer.lag"',
    "meshllm_bus_dead_letters_total": '"meshllm.bus.dead_letters"',
}


def selectors(node: Any) -> list[Any]:
    """Every VectorSelector of a parsed PromQL expression."""
    if type(node).__name__ == "VectorSelector":
        return [node]
    found = []
    for attribute in ("expr", "lhs", "rhs", "vector_selector", "param"):
        child = getattr(node, attribute, None)
        if child is not None and not isinstance(child, int | float | str):
            found += selectors(child)
    for argument in getattr(node, "args", ()):
        found += selectors(argument)
    return found


def matchers(selector: Any) -> dict[str, tuple[str, str]]:
    """{label: (operator, value)} of a selector."""
    return {m.name: (str(m.op).rsplit(".", 1)[-1], m.value) for m in selector.matchers.matchers}


def bundled(name: str) -> Rule:
    return {rule.name: rule for rule in load_rules(DEFAULT_RULES)}[name]


@pytest.mark.parametrize("name", READING_RULES)
def test_each_reading_rule_parses_and_selects_only_exported_metrics(name: str) -> None:
    rule = bundled(name)
    query = expression(rule)
    parsed = promql_parser.parse(query)  # raises on a query that does not parse
    found = selectors(parsed)
    assert found, query
    assert {selector.name for selector in found} <= set(EXPORTED), query
    assert query.endswith(f" > {rule.threshold:g}")
    metrics_source = (ROOT / "shared" / "bus" / "metrics.py").read_text()
    for selector in found:
        assert EXPORTED[selector.name] in metrics_source, selector.name


def test_the_backlog_query_selects_the_routers_lag_on_the_request_topics() -> None:
    query = expression(bundled("RequestBacklogHigh"))
    assert query == (
        '(sum(meshllm_bus_consumer_lag{messaging_consumer_group_name="router",'
        'messaging_destination_name=~"llm\\\\.requests\\\\.high|llm\\\\.requests\\\\.normal|'
        'llm\\\\.requests\\\\.low"})) > 200'
    )
    [selector] = selectors(promql_parser.parse(query))
    labels = matchers(selector)
    assert labels["messaging_consumer_group_name"] == ("Equal", "router")
    operator, pattern = labels["messaging_destination_name"]
    assert operator == "Re"
    # Prometheus anchors a regex matcher at both ends (RE2, which reads this one as re does)
    for topic in (REQUESTS_HIGH, REQUESTS_NORMAL, REQUESTS_LOW):
        assert re.fullmatch(pattern, topic.name), topic.name
    assert re.fullmatch(pattern, "llm.requests.high")
    assert not re.fullmatch(pattern, "llmXrequestsXhigh")  # the dots are literal
    assert not re.fullmatch(pattern, "audit.events")


def test_the_audit_and_dead_letter_queries() -> None:
    [audit] = selectors(promql_parser.parse(expression(bundled("AuditBacklogHigh"))))
    assert matchers(audit) == {
        "messaging_consumer_group_name": ("Equal", "audit"),
        "messaging_destination_name": ("Equal", "audit.events"),
    }
    dead = expression(bundled("DeadLettersGrowing"))
    assert dead == "(sum(increase(meshllm_bus_dead_letters_total[300s]))) > 0"
    assert READING_QUERIES.keys() == READINGS


# ------------------------------------------------------------------ the broker's counts


@pytest.fixture(scope="module")
async def broker(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    """An embedded broker of this module's own, with the registered topics."""
    broker = EmbeddedBroker(log_file=tmp_path_factory.mktemp("lag") / "broker.log")
    await broker.start()
    try:
        yield broker.bootstrap
    finally:
        await broker.stop()


@pytest.fixture
async def lag(broker: str) -> AsyncIterator[GroupLag]:
    lag = GroupLag(KafkaSettings(bootstrap=broker))
    await lag.start()
    try:
        yield lag
    finally:
        await lag.close()


async def produce(bootstrap: str, records: list[tuple[str, int]]) -> None:
    """One record to each (topic, partition)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for index, (topic, partition) in enumerate(records):
            await producer.send_and_wait(topic, f"r{index}".encode(), partition=partition)
    finally:
        await producer.stop()


async def eventually(read: Callable[[], Any], expected: int) -> int:
    """``await read()`` until it is ``expected`` (the broker's offsets settle), or its last."""
    value = -1
    for _ in range(50):
        value = await read()
        if value == expected:
            break
        await asyncio.sleep(0.1)
    return value


@pytest.mark.kafka
async def test_records_counts_what_the_dead_letter_topics_hold(broker: str, lag: GroupLag) -> None:
    topics = [REQUESTS_NORMAL.dlq, REQUESTS_HIGH.dlq]
    assert await lag.records(topics, DLQ_PARTITIONS) == 0
    await produce(broker, [(REQUESTS_NORMAL.dlq, 0)] * 3 + [(REQUESTS_HIGH.dlq, 0)] * 2)
    assert await eventually(lambda: lag.records(topics, DLQ_PARTITIONS), 5) == 5
    assert await lag.records([REQUESTS_NORMAL.dlq], DLQ_PARTITIONS) == 3


@pytest.mark.kafka
async def test_behind_counts_what_a_group_has_not_committed(broker: str, lag: GroupLag) -> None:
    group = f"tests-{uuid.uuid4().hex[:8]}"
    topic = REQUESTS_NORMAL.name
    assert REQUESTS_NORMAL.partitions >= 2
    before = await lag.behind(group, (REQUESTS_NORMAL,))  # this module's only writer: none
    assert before == 0
    await produce(broker, [(topic, 0)] * 5 + [(topic, 1)] * 2)
    # never committed: every record from the log's start counts
    assert await eventually(lambda: lag.behind(group, (REQUESTS_NORMAL,)), 7) == 7
    consumer = AIOKafkaConsumer(bootstrap_servers=broker, group_id=group,
                                enable_auto_commit=False)  # fmt: skip
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, 0), TopicPartition(topic, 1)])
        await consumer.commit({TopicPartition(topic, 0): 3})  # 3 of 5 finished on partition 0
        assert await eventually(lambda: lag.behind(group, (REQUESTS_NORMAL,)), 4) == 4
        await consumer.commit({TopicPartition(topic, 0): 5, TopicPartition(topic, 1): 2})
        assert await eventually(lambda: lag.behind(group, (REQUESTS_NORMAL,)), 0) == 0
    finally:
        await consumer.stop()
    # another group's commits are not this one's
    assert await lag.behind(f"{group}-other", (REQUESTS_NORMAL,)) == 7


@pytest.mark.kafka
async def test_members_counts_the_consumers_of_a_group_now(broker: str, lag: GroupLag) -> None:
    group = f"tests-{uuid.uuid4().hex[:8]}"
    assert await lag.members(group) == 0  # never joined
    consumer = AIOKafkaConsumer(REQUESTS_NORMAL.name, bootstrap_servers=broker, group_id=group)
    await consumer.start()
    try:
        assert await eventually(lambda: lag.members(group), 1) == 1
    finally:
        await consumer.stop()
    assert await eventually(lambda: lag.members(group), 0) == 0  # it left


def test_dead_letters_are_unknown_when_the_last_round_did_not_take_them() -> None:
    readings = Readings()
    readings.sample(1000.0, {"dead_letters_total": 0.0})
    readings.sample(1010.0, {"dead_letters_total": 2.0})
    assert readings.reading("dead_letters", 1010.0, 300).measured == 2.0
    readings.sample(1070.0, {})  # the broker did not answer
    assert readings.reading("dead_letters", 1070.0, 300).measured is None
    readings.sample(1080.0, {"dead_letters_total": 2.0})
    assert readings.reading("dead_letters", 1080.0, 300).measured == 2.0
