"""Replica counts decided by the ops loop: the policy (no I/O), the SLIs it reads, its
settings, and the ops service publishing and auditing its decisions. No broker.

This module is over 500 lines: the policy's cases and the service's publishing of them
are read together.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from pydantic import ValidationError

from services.ops.alerts import Evaluator, Rule
from services.ops.scaling import Decision, Demand, Scaler, ScalingPolicy
from services.ops.service import CONSUMERS, MAX_REPLICAS_READ, OpsService, Probe
from services.ops.settings import OpsSettings
from services.ops.sli import INDICATORS, SliWindows
from shared.bus.consumer import EventContext, PoisonEvent
from shared.deployments import CHAT_DEPLOYMENT, EMBEDDINGS_DEPLOYMENT
from shared.events.v1 import events_pb2 as ev
from shared.settings import SettingsError, load_settings
from shared.topics import AUDIT_EVENTS, MODEL_STATUS, OPS_ALERTS, OPS_SCALING, Topic
from tests.fakes.publisher import RecordingPublisher
from tests.ops.test_ops_domain import answer

MODEL = "smollm2-135m-instruct"
CHAT = CHAT_DEPLOYMENT
EMBEDDINGS = EMBEDDINGS_DEPLOYMENT

SLOW = Demand(answers=50, p99_s=2.0, concurrency=2.0, waiting=0)  # P99 4x the limit
BUSY = Demand(answers=50, p99_s=0.3, concurrency=1.0, waiting=0)  # neither out nor in
IDLE = Demand(answers=50, p99_s=0.1, concurrency=0.1, waiting=0)  # nothing to do


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("MESHLLM_"):
            monkeypatch.delenv(name)


def policy(**overrides: object) -> ScalingPolicy:
    fields: dict[str, object] = {
        "deployment": CHAT, "operations": ("chat", "text_completion"), "min_replicas": 1,
        "max_replicas": 4, "window_s": 60, "min_requests": 20, "out_p99_s": 0.5,
        "out_waiting_per_replica": 8, "out_for_s": 15, "out_cooldown_s": 60,
        "in_p99_s": 0.25, "in_concurrency_per_replica": 0.5, "in_for_s": 300,
        "in_cooldown_s": 300,
    }  # fmt: skip
    fields.update(overrides)
    return ScalingPolicy.model_validate(fields)


def demand(**overrides: Any) -> Demand:
    fields: dict[str, Any] = {"answers": 50, "p99_s": 0.3, "concurrency": 1.0, "waiting": 0}
    fields.update(overrides)
    return Demand(**fields)


# ------------------------------------------------------------------ the policy


def test_a_p99_held_for_out_for_s_adds_one_replica_not_before() -> None:
    scaler = Scaler([policy()])
    assert scaler.decide(CHAT, 0.0, 2, SLOW) is None  # a clock at 0.0: pending from 0
    assert scaler.decide(CHAT, 14.9, 2, SLOW) is None
    decision = scaler.decide(CHAT, 15.0, 2, SLOW)
    assert decision == Decision(CHAT, 2, 3, "p99", "P99 2000 ms > 500 ms")


def test_a_p99_that_dips_starts_its_duration_over() -> None:
    scaler = Scaler([policy()])
    assert scaler.decide(CHAT, 100.0, 2, SLOW) is None
    assert scaler.decide(CHAT, 110.0, 2, BUSY) is None  # back under the limit
    assert scaler.decide(CHAT, 120.0, 2, SLOW) is None
    assert scaler.decide(CHAT, 134.9, 2, SLOW) is None  # 15 s since 120, not since 100
    decision = scaler.decide(CHAT, 135.0, 2, SLOW)
    assert decision is not None
    assert (decision.target, decision.reason) == (3, "p99")


def test_too_few_answers_give_no_p99_to_scale_on() -> None:
    scaler = Scaler([policy(out_for_s=0, min_requests=20)])
    few = demand(answers=19, p99_s=30.0)
    assert all(scaler.decide(CHAT, t, 1, few) is None for t in range(0, 1000, 5))
    decision = scaler.decide(CHAT, 1000.0, 1, demand(answers=20, p99_s=30.0))
    assert decision is not None
    assert (decision.target, decision.reason) == (2, "p99")


@pytest.mark.parametrize(
    ("current", "waiting", "target"),
    [
        (1, 8, None),  # 8 waiting for 1 replica: not above 8 per replica
        (1, 9, 2),  # one more
        (2, 16, None),
        (2, 17, 3),  # one more at least
        (1, 30, 2),  # ceil(30 / 8) = 4, but at most twice as many at once
        (2, 30, 4),  # as many as the queue needs: ceil(30 / 8)
        (2, 100, 4),  # ceil(100 / 8) = 13, capped at max_replicas
        (1, 100, 2),  # a queue that grew for another reason cannot jump to the maximum
        (4, 1000, None),  # at the maximum already
    ],
)
def test_the_queue_scales_out_to_what_it_needs_up_to_max_replicas(
    current: int, waiting: int, target: int | None
) -> None:
    scaler = Scaler([policy(out_for_s=0)])
    queued = demand(answers=0, p99_s=None, concurrency=0.0, waiting=waiting)
    decision = scaler.decide(CHAT, 0.0, current, queued)
    if target is None:
        assert decision is None
    else:
        assert decision == Decision(
            CHAT,
            current,
            target,
            "queue",
            f"{waiting} requests waiting > 8 per replica x {current}",
        )


def test_the_queue_is_not_read_where_the_policy_does_not_read_it() -> None:
    scaler = Scaler([policy(out_for_s=0, out_waiting_per_replica=None)])
    assert scaler.decide(CHAT, 0.0, 1, demand(waiting=10_000)) is None
    # an unknown queue (the lag could not be read) is no reason either
    scaler = Scaler([policy(out_for_s=0)])
    assert scaler.decide(CHAT, 0.0, 1, demand(waiting=None)) is None


def test_no_scale_out_during_the_cooldown_after_a_change() -> None:
    scaler = Scaler([policy(out_for_s=0, out_cooldown_s=60)])
    first = scaler.decide(CHAT, 0.0, 1, SLOW)
    assert first is not None
    assert first.target == 2
    assert scaler.decide(CHAT, 30.0, 2, SLOW) is None
    assert scaler.decide(CHAT, 59.9, 2, SLOW) is None
    second = scaler.decide(CHAT, 60.0, 2, SLOW)
    assert second is not None
    assert (second.current, second.target) == (2, 3)


def test_an_idle_deployment_loses_one_replica_after_in_for_s() -> None:
    scaler = Scaler([policy(in_for_s=300, in_cooldown_s=300)])
    assert scaler.decide(CHAT, 0.0, 3, IDLE) is None
    assert scaler.decide(CHAT, 299.9, 3, IDLE) is None
    decision = scaler.decide(CHAT, 300.0, 3, IDLE)
    assert decision == Decision(CHAT, 3, 2, "idle", "0.03 answers in progress per replica < 0.5")
    # the pending time starts over after the change, and the cooldown holds
    assert scaler.decide(CHAT, 400.0, 2, IDLE) is None
    assert scaler.decide(CHAT, 699.9, 2, IDLE) is None
    again = scaler.decide(CHAT, 700.0, 2, IDLE)
    assert again is not None
    assert (again.current, again.target) == (2, 1)
    assert scaler.decide(CHAT, 5000.0, 1, IDLE) is None  # at the minimum


@pytest.mark.parametrize(
    "busy",
    [
        demand(p99_s=0.1, concurrency=0.1, waiting=1),  # 0.5 in progress per replica now
        demand(p99_s=0.25, concurrency=0.1),  # P99 at in_p99_s: not below it
        demand(p99_s=0.4, concurrency=0.1),  # between in_p99_s and out_p99_s
        demand(p99_s=0.1, concurrency=1.0),  # 0.5 per replica on 2: not below 0.5
    ],
    ids=["waiting", "p99-at-in-limit", "p99-between-limits", "concurrency"],
)
def test_scale_in_is_blocked_while_anything_waits_or_the_p99_is_not_low(busy: Demand) -> None:
    scaler = Scaler([policy(in_for_s=0, in_cooldown_s=0)])
    assert all(scaler.decide(CHAT, float(t), 2, busy) is None for t in range(0, 2000, 10))


def test_requests_in_progress_now_do_not_block_scale_in_below_the_limit() -> None:
    # the queue counts what is being answered too: one request on two replicas is idle
    scaler = Scaler([policy(in_for_s=0, in_cooldown_s=0, in_concurrency_per_replica=1.0)])
    decision = scaler.decide(CHAT, 0.0, 2, demand(p99_s=0.1, concurrency=0.6, waiting=1))
    assert decision is not None
    assert (decision.target, decision.reason) == (1, "idle")


def test_a_wait_in_between_starts_the_idle_time_over() -> None:
    scaler = Scaler([policy(in_for_s=300)])
    assert scaler.decide(CHAT, 0.0, 2, IDLE) is None
    assert scaler.decide(CHAT, 200.0, 2, demand(p99_s=0.1, concurrency=0.1, waiting=3)) is None
    assert scaler.decide(CHAT, 250.0, 2, IDLE) is None
    assert scaler.decide(CHAT, 549.9, 2, IDLE) is None
    decision = scaler.decide(CHAT, 550.0, 2, IDLE)
    assert decision is not None
    assert decision.reason == "idle"


def test_no_scale_in_during_the_cooldown_after_a_change() -> None:
    scaler = Scaler([policy(out_for_s=0, in_for_s=0, in_cooldown_s=300)])
    out = scaler.decide(CHAT, 0.0, 1, SLOW)
    assert out is not None
    assert out.target == 2
    assert scaler.decide(CHAT, 10.0, 2, IDLE) is None  # idle at once, but just changed
    assert scaler.decide(CHAT, 299.9, 2, IDLE) is None
    decision = scaler.decide(CHAT, 300.0, 2, IDLE)
    assert decision is not None
    assert (decision.current, decision.target, decision.reason) == (2, 1, "idle")


def test_a_count_outside_the_bounds_is_brought_back_after_the_cooldown() -> None:
    scaler = Scaler([policy(min_replicas=2, max_replicas=4)])  # cooldowns: out 60, in 300
    assert scaler.decide(CHAT, 0.0, 1, IDLE) == Decision(CHAT, 1, 2, "below_min", "bounds [2, 4]")
    # a count that stays outside (an owner with other bounds) is not fought every round
    assert scaler.decide(CHAT, 10.0, 1, IDLE) is None
    assert scaler.decide(CHAT, 59.0, 1, IDLE) is None
    assert scaler.decide(CHAT, 60.0, 0, SLOW) == Decision(CHAT, 0, 2, "below_min", "bounds [2, 4]")
    assert scaler.decide(CHAT, 200.0, 9, SLOW) is None  # above: waits the scale-in cooldown
    assert scaler.decide(CHAT, 360.0, 9, SLOW) == Decision(CHAT, 9, 4, "above_max", "bounds [2, 4]")


def test_an_unknown_count_is_left_alone() -> None:
    scaler = Scaler([policy()])
    flood = demand(p99_s=9.0, waiting=10_000)
    assert all(scaler.decide(CHAT, float(t), None, flood) is None for t in range(0, 100, 5))
    # the time without a count does not count towards out_for_s
    assert scaler.decide(CHAT, 100.0, 1, SLOW) is None
    decision = scaler.decide(CHAT, 115.0, 1, SLOW)
    assert decision is not None
    assert decision.target == 2


def test_decisions_never_leave_the_bounds() -> None:
    rng = random.Random(7)
    scaler = Scaler([policy(min_replicas=2, max_replicas=5, out_for_s=0, out_cooldown_s=0,
                            in_for_s=0, in_cooldown_s=0)])  # fmt: skip
    current, decided = 3, 0
    for step in range(2000):
        moment = demand(
            answers=rng.choice([0, 10, 100]),
            p99_s=rng.choice([None, 0.05, 0.3, 3.0]),
            concurrency=rng.uniform(0, 10),
            waiting=rng.choice([None, 0, 5, 50, 5000]),
        )
        decision = scaler.decide(CHAT, float(step), current, moment)
        if decision is not None:
            assert decision.current == current
            assert 2 <= decision.target <= 5, decision
            assert decision.target != current
            current, decided = decision.target, decided + 1
    assert decided > 10  # the walk did move both ways
    assert scaler.decide(CHAT, 1e6, 5, demand(p99_s=9.0, waiting=10_000)) is None
    assert scaler.decide(CHAT, 1e6 + 1, 2, IDLE) is None


def test_a_change_read_back_after_a_restart_keeps_the_cooldown() -> None:
    scaler = Scaler([policy(out_for_s=0, out_cooldown_s=60)])
    scaler.changed(CHAT, 100.0)
    scaler.changed(CHAT, 50.0)  # an older one read later moves nothing back
    scaler.changed("NotRunHere", 100.0)  # a deployment without a policy: ignored
    assert scaler.decide(CHAT, 130.0, 1, SLOW) is None
    assert scaler.decide(CHAT, 159.9, 1, SLOW) is None
    decision = scaler.decide(CHAT, 160.0, 1, SLOW)
    assert decision is not None
    assert decision.target == 2


def test_a_clock_starting_at_zero_is_a_time_like_any_other() -> None:
    scaler = Scaler([policy(out_for_s=0, in_for_s=0, out_cooldown_s=10, in_cooldown_s=10)])
    out = scaler.decide(CHAT, 0.0, 1, SLOW)  # no change yet: no cooldown at 0.0
    assert out is not None
    assert out.target == 2
    assert scaler.decide(CHAT, 0.0, 2, SLOW) is None  # a change at 0.0 is a change
    assert scaler.decide(CHAT, 9.9, 2, IDLE) is None
    back = scaler.decide(CHAT, 10.0, 2, IDLE)
    assert back is not None
    assert back.target == 1
    fresh = Scaler([policy(out_for_s=0, out_cooldown_s=10)])
    fresh.changed(CHAT, 0.0)  # read back: changed at 0.0
    assert fresh.decide(CHAT, 5.0, 1, SLOW) is None


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"min_replicas": 3, "max_replicas": 2}, r"min_replicas \(3\) exceeds max_replicas \(2\)"),
        ({"in_p99_s": 0.6, "out_p99_s": 0.5}, r"in_p99_s \(0.6\) exceeds out_p99_s \(0.5\)"),
        ({"colour": "red"}, "colour"),
        ({"min_replicas": 0}, "min_replicas"),
        ({"out_waiting_per_replica": 0}, "out_waiting_per_replica"),
        ({"operations": ()}, "operations"),
    ],
)
def test_a_bad_policy_is_refused_naming_the_field(overrides: dict[str, object], named: str) -> None:
    with pytest.raises(ValidationError, match=named):
        policy(**overrides)


# ------------------------------------------------------------------ SLIs the policy reads


def test_concurrency_is_the_answers_durations_over_the_window() -> None:
    windows = SliWindows(bucket_s=10, keep_s=900, clock=lambda: 1000)
    for i in range(10):  # 10 answers of 3 s each, from 950 s
        windows.add(answer(950 + i * 5, 3.0))
    [sli] = windows.slis(now_s=1000, window_s=60).values()
    # the buckets that start after 940 s cover 950 s .. 1000 s: 50 s
    assert sli.window_s == 50
    assert sli.busy_s == pytest.approx(30.0)
    assert sli.concurrency == pytest.approx(0.6)
    assert sli.value("concurrency") == pytest.approx(0.6)
    assert "concurrency" in INDICATORS


def test_where_keeps_only_the_answers_with_the_listed_labels() -> None:
    windows = SliWindows(bucket_s=10, keep_s=900, clock=lambda: 1000)
    for operation, count in (("chat", 3), ("text_completion", 2), ("embeddings", 5)):
        for i in range(count):
            windows.add(answer(990 + i, 1.0, operation=operation))
    windows.add(answer(991, 1.0, operation="chat", model="other"))
    chat = {"operation": ("chat", "text_completion")}
    assert windows.slis(1000, 60, where=chat)[()].requests == 6
    by_operation = windows.slis(1000, 60, by=["operation"], where=chat)
    assert {labels: sli.requests for labels, sli in by_operation.items()} == {
        (("operation", "chat"),): 4,
        (("operation", "text_completion"),): 2,
    }
    both = windows.slis(1000, 60, where={"operation": ["chat"], "model": [MODEL]})
    assert both[()].requests == 3
    assert windows.slis(1000, 60, where={"operation": ()}) == {}
    assert windows.slis(1000, 60, where=None)[()].requests == 11
    with pytest.raises(ValueError, match="unknown label"):
        windows.slis(1000, 60, where={"region": ["eu"]})


# ------------------------------------------------------------------ settings


def test_the_scaling_settings_size_both_deployments_by_default() -> None:

    scaling = OpsSettings().ops.scaling
    assert scaling.enabled
    assert scaling.group == "router"
    assert [p.deployment for p in scaling.policies()] == [CHAT, EMBEDDINGS]
    assert scaling.chat.operations == ("chat", "text_completion")
    assert scaling.embeddings.operations == ("embeddings",)
    assert scaling.embeddings.max_replicas == 2
    assert scaling.embeddings.out_waiting_per_replica is None  # the queue is chat's
    assert scaling.chat.out_cooldown_s >= scaling.chat.window_s


def test_scaling_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHLLM_OPS__SCALING__CHAT__MAX_REPLICAS", "2")
    monkeypatch.setenv("MESHLLM_OPS__SCALING__CHAT__OUT_P99_S", "0.8")
    monkeypatch.setenv("MESHLLM_OPS__SCALING__ENABLED", "false")
    scaling = load_settings(OpsSettings).ops.scaling
    assert not scaling.enabled
    assert (scaling.chat.max_replicas, scaling.chat.out_p99_s) == (2, 0.8)
    assert scaling.chat.deployment == CHAT  # the other fields keep their defaults
    assert scaling.chat.operations == ("chat", "text_completion")
    assert scaling.embeddings.max_replicas == 2


@pytest.mark.parametrize(
    ("name", "value", "named"),
    [
        ("MESHLLM_OPS__SCALING__CHAT__MIN_REPLICAS", "5",
         r"MESHLLM_OPS__SCALING__CHAT: .*min_replicas \(5\) exceeds max_replicas \(4\)"),
        ("MESHLLM_OPS__SCALING__CHAT__COLOUR", "red", "MESHLLM_OPS__SCALING__CHAT__COLOUR"),
        ("MESHLLM_OPS__SCALING__EMBEDDINGS__MAX_REPLICAS", "0",
         "MESHLLM_OPS__SCALING__EMBEDDINGS__MAX_REPLICAS: .*greater than or equal to 1"),
        # the settings' own defaults keep the policy's constraints
        ("MESHLLM_OPS__SCALING__EMBEDDINGS__OUT_WAITING_PER_REPLICA", "-1",
         "MESHLLM_OPS__SCALING__EMBEDDINGS__OUT_WAITING_PER_REPLICA: .*greater than 0"),
        ("MESHLLM_OPS__SCALING__CHAT__OPERATIONS", "[]", "MESHLLM_OPS__SCALING__CHAT__OPERATIONS"),
        ("MESHLLM_OPS__SCALING__CHAT__DEPLOYMENT", "", "MESHLLM_OPS__SCALING__CHAT__DEPLOYMENT"),
    ],
)  # fmt: skip
def test_bad_scaling_settings_are_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, named: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError, match=named):
        load_settings(OpsSettings)


# ------------------------------------------------------------------ the service


def context(topic: Topic) -> EventContext:
    return EventContext(topic.name, 0, 0, None, [], ev.Envelope(), attempt=1)


def status(deployment: str, replicas: int, producer: str = "inference") -> ev.ModelStatus:
    found = ev.ModelStatus(model=MODEL, deployment=deployment, replicas=replicas,
                           running_replicas=replicas, state=ev.MODEL_STATE_READY)  # fmt: skip
    found.envelope.producer = producer
    return found


def _probe(backlog: Callable[[], Awaitable[int]] | None) -> Probe | None:
    """The service's probe of the queues, reading only the router's backlog."""
    if backlog is None:
        return None
    counted = backlog

    async def probe() -> dict[str, float | None]:
        return {"backlog": float(await counted())}

    return probe


def make_service(
    now: list[float],
    *policies: ScalingPolicy,
    publisher: RecordingPublisher | None = None,
    backlog: Callable[[], Awaitable[int]] | None = None,
    rules: tuple[Rule, ...] = (),
) -> tuple[OpsService, RecordingPublisher, SliWindows]:
    windows = SliWindows(bucket_s=10, keep_s=900, clock=lambda: now[0])
    publisher = publisher or RecordingPublisher()
    scaler = Scaler(policies or (policy(out_for_s=0),))
    ops = OpsService(windows, Evaluator(list(rules)), publisher, scaler=scaler,  # type: ignore[arg-type]
                     probe=_probe(backlog), clock=lambda: now[0])  # fmt: skip
    return ops, publisher, windows


def slow_answers(windows: SliWindows, operation: str = "chat", seconds: float = 2.0) -> None:
    for i in range(30):  # enough answers for a P99 (min_requests 20), in the last minute
        windows.add(answer(960 + i, seconds, operation=operation))


async def test_a_decision_is_published_on_ops_scaling_and_audited() -> None:
    now = [1000.0]
    ops, publisher, windows = make_service(now)
    slow_answers(windows)
    await ops.on_status(status(CHAT, 1), context(MODEL_STATUS))
    changes, decisions = await ops.evaluate_now()
    assert changes == []
    [decision] = decisions
    assert (decision.deployment, decision.current, decision.target) == (CHAT, 1, 2)
    assert decision.reason == "p99"
    shown = re.fullmatch(r"P99 (\d+) ms > 500 ms", decision.detail)
    assert shown is not None, decision.detail
    assert int(shown[1]) == pytest.approx(2000, rel=0.01)  # the sketch's accuracy
    [event] = publisher.on(OPS_SCALING)
    [audit] = publisher.on(AUDIT_EVENTS)
    assert [(topic, key) for topic, _, key in publisher.sent] == [
        (OPS_SCALING, CHAT),  # keyed by deployment: one deployment's decisions in order
        (AUDIT_EVENTS, audit.request_id),
    ]
    assert (event.deployment, event.current_replicas, event.target_replicas) == (CHAT, 1, 2)
    assert event.reason == f"p99: {decision.detail}"
    assert event.envelope.producer == "ops"
    assert event.envelope.event_id
    assert audit.WhichOneof("record") == "scaling"
    assert audit.request_id == f"scaling-{event.envelope.event_id}"
    record = audit.scaling
    assert record.decision_id == event.envelope.event_id
    assert (record.deployment, record.current_replicas, record.target_replicas) == (CHAT, 1, 2)
    assert record.reason == event.reason
    assert ops.replicas == {CHAT: 2}  # until the inference service says otherwise
    assert ops.outbox == []


async def test_each_deployment_reads_only_its_own_operations() -> None:
    now = [1000.0]
    embeddings = policy(deployment=EMBEDDINGS, operations=("embeddings",), out_for_s=0,
                        out_waiting_per_replica=None)  # fmt: skip
    ops, publisher, windows = make_service(now, policy(out_for_s=0), embeddings)
    slow_answers(windows, operation="embeddings")  # slow embeddings
    for i in range(30):  # fast chat
        windows.add(answer(960 + i, 0.1, operation="chat"))
    await ops.on_status(status(CHAT, 1), context(MODEL_STATUS))
    await ops.on_status(status(EMBEDDINGS, 1), context(MODEL_STATUS))
    _, decisions = await ops.evaluate_now()
    assert [(d.deployment, d.target) for d in decisions] == [(EMBEDDINGS, 2)]
    assert [e.deployment for e in publisher.on(OPS_SCALING)] == [EMBEDDINGS]


async def test_a_deployment_without_a_status_is_left_alone() -> None:
    now = [1000.0]
    ops, publisher, windows = make_service(now)
    slow_answers(windows)
    assert await ops.evaluate_now() == ([], [])
    assert publisher.sent == []
    assert ops.replicas == {}


async def test_a_status_from_another_producer_is_not_believed() -> None:
    ops, _, _ = make_service([1000.0])
    await ops.on_status(status(CHAT, 3, producer="router"), context(MODEL_STATUS))
    assert ops.replicas == {}


async def test_no_scale_out_while_a_replica_asked_for_still_starts() -> None:
    now = [1000.0]
    ops, _, windows = make_service(now, policy(out_for_s=0, out_cooldown_s=0, min_requests=1))
    windows.add_all(answer(995.0 + i / 10, 2.0) for i in range(30))
    starting = status(CHAT, 2)
    starting.running_replicas = 1
    await ops.on_status(starting, context(MODEL_STATUS))
    _, decisions = await ops.evaluate_now()
    assert decisions == []
    starting.running_replicas = 2
    await ops.on_status(starting, context(MODEL_STATUS))
    _, decisions = await ops.evaluate_now()
    assert [(d.current, d.target) for d in decisions] == [(2, 3)]


async def test_a_decision_not_published_within_a_minute_is_dropped_with_its_audit() -> None:
    now = [1000.0]
    publisher = RecordingPublisher(refuse=2)  # the broker is away for two rounds
    ops, _, windows = make_service(now, policy(out_for_s=0, min_requests=1), publisher=publisher)
    windows.add_all(answer(995.0 + i / 10, 2.0) for i in range(30))
    await ops.on_status(status(CHAT, 1), context(MODEL_STATUS))
    first = None
    for _ in range(2):
        with pytest.raises(ConnectionError):
            await ops.evaluate_now()
        first = first or ops.outbox[0].event
        now[0] += 45
    await ops.evaluate_now()  # the broker is back, 90 s after the decision
    published = publisher.on(OPS_SCALING)
    assert first is not None
    assert first not in published  # too old: dropped, not applied late
    audited = {e.scaling.decision_id for e in publisher.on(AUDIT_EVENTS)}
    assert audited == {d.envelope.event_id for d in published}  # no audit without its decision
    assert ops.outbox == []


async def test_statuses_give_the_replica_counts_and_absurd_ones_are_refused() -> None:
    ops, _, _ = make_service([1000.0])
    ctx = context(MODEL_STATUS)
    await ops.on_status(status(CHAT, 3), ctx)
    await ops.on_status(status("SomethingElse", 7), ctx)  # not a deployment sized here
    await ops.on_status(status(CHAT, MAX_REPLICAS_READ), ctx)
    assert ops.replicas == {CHAT: MAX_REPLICAS_READ}
    with pytest.raises(PoisonEvent, match="exceeds"):
        await ops.on_status(status(CHAT, MAX_REPLICAS_READ + 1), ctx)
    assert ops.replicas == {CHAT: MAX_REPLICAS_READ}  # the absurd count was not kept
    await ops.on_status(status(CHAT, 2), ctx)
    assert ops.replicas == {CHAT: 2}
    unscaled = OpsService(SliWindows(), Evaluator([]), RecordingPublisher())  # type: ignore[arg-type]
    await unscaled.on_status(status(CHAT, 3), ctx)  # scaling off: nothing recorded
    assert unscaled.replicas == {}


def past_decision(producer: str, at_s: float) -> ev.ScalingDecision:
    decision = ev.ScalingDecision(deployment=CHAT, current_replicas=1, target_replicas=2)
    decision.envelope.producer = producer
    decision.envelope.occurred_at.FromNanoseconds(int(at_s * 1e9))
    return decision


@pytest.mark.parametrize(
    ("producer", "at_s", "free_at"),
    [
        ("router", 990.0, 1000.0),  # not the ops loop's: no cooldown
        ("ops", 990.0, 1050.0),  # cooldown (60 s) from when it was decided
        ("ops", 1e9, 1060.0),  # from the future: from now, not from then
        ("ops", 0.0, 1000.0),  # long ago: over
    ],
)
async def test_only_the_ops_loops_past_decisions_keep_a_cooldown(
    producer: str, at_s: float, free_at: float
) -> None:
    now = [1000.0]
    slow = policy(window_s=300, out_for_s=0, out_cooldown_s=60)  # the answers stay in it
    ops, publisher, windows = make_service(now, slow)
    slow_answers(windows)
    await ops.on_status(status(CHAT, 1), context(MODEL_STATUS))
    await ops.on_decision(past_decision(producer, at_s), context(OPS_SCALING))
    if free_at > now[0]:
        now[0] = free_at - 0.1
        assert await ops.evaluate_now() == ([], [])
    now[0] = free_at
    _, decisions = await ops.evaluate_now()
    assert [(d.current, d.target) for d in decisions] == [(1, 2)]
    assert len(publisher.on(OPS_SCALING)) == 1


async def test_a_backlog_no_router_reads_is_not_demand_for_replicas() -> None:
    members = [0]

    async def probe() -> dict[str, float | None]:
        return {"backlog": 100.0, CONSUMERS: float(members[0])}

    now = [1000.0]
    ops, _, _ = make_service(now, policy(out_for_s=0, out_cooldown_s=0))
    ops.probe = probe
    await ops.on_status(status(CHAT, 1), context(MODEL_STATUS))
    _, decisions = await ops.evaluate_now()
    assert ops.readings.latest["backlog"] == 100  # the backlog alert still reads it
    assert ops.waiting is None
    assert decisions == []
    members[0] = 1  # a router is back: the queue is demand again
    now[0] = 1001.0
    _, decisions = await ops.evaluate_now()
    assert ops.waiting == 100
    assert [(d.target, d.reason) for d in decisions] == [(2, "queue")]


async def test_an_unknown_backlog_leaves_the_p99_to_decide() -> None:
    behind = [100]

    async def backlog() -> int:
        if behind[0] < 0:
            raise ConnectionError("lag unreadable")
        return behind[0]

    now = [1000.0]
    slow = policy(window_s=300, out_for_s=0, out_cooldown_s=60)  # the answers stay in it
    ops, _, windows = make_service(now, slow, backlog=backlog)
    slow_answers(windows)
    await ops.on_status(status(CHAT, 1), context(MODEL_STATUS))
    _, decisions = await ops.evaluate_now()
    assert ops.waiting == 100
    assert [(d.target, d.reason) for d in decisions] == [(2, "queue")]  # at most doubled
    behind[0] = -1
    await ops.on_status(status(CHAT, 1), context(MODEL_STATUS))
    now[0] = 1060.0
    _, decisions = await ops.evaluate_now()
    assert ops.waiting is None  # not the last round's number
    assert [(d.target, d.reason) for d in decisions] == [(2, "p99")]


async def test_a_decision_the_broker_did_not_take_goes_out_next_round_in_order() -> None:
    now = [1000.0]
    latency = Rule.model_validate({
        "name": "LatencyP99High", "indicator": "p99_s", "threshold": 0.5, "clear": 0.4,
        "for_s": 0, "clear_for_s": 0, "window_s": 60, "min_requests": 5, "summary": "slow",
    })  # fmt: skip
    ops, publisher, windows = make_service(
        now, policy(out_for_s=0), publisher=RecordingPublisher(refuse=1), rules=(latency,)
    )
    slow_answers(windows)
    await ops.on_status(status(CHAT, 1), context(MODEL_STATUS))
    with pytest.raises(ConnectionError):
        await ops.evaluate_now()
    held = [out.event for out in ops.outbox]
    assert [out.topic for out in ops.outbox] == [OPS_ALERTS, OPS_SCALING, AUDIT_EVENTS]
    assert ops.replicas == {CHAT: 2}
    now[0] = 1005.0  # within the cooldown: nothing new is decided
    assert await ops.evaluate_now() == ([], [])
    assert [topic for topic, _, _ in publisher.sent] == [OPS_ALERTS, OPS_SCALING, AUDIT_EVENTS]
    assert [event for _, event, _ in publisher.sent] == held
    [decision] = publisher.on(OPS_SCALING)
    [audit] = publisher.on(AUDIT_EVENTS)
    assert audit.scaling.decision_id == decision.envelope.event_id
    assert ops.outbox == []


async def test_a_failed_publish_does_not_decide_the_same_change_twice() -> None:
    now = [1000.0]
    ops, publisher, windows = make_service(now, publisher=RecordingPublisher(refuse=3))
    slow_answers(windows)
    await ops.on_status(status(CHAT, 1), context(MODEL_STATUS))
    for _ in range(3):
        with pytest.raises(ConnectionError):
            await ops.evaluate_now()
        now[0] += 5
    await ops.evaluate_now()
    assert [e.target_replicas for e in publisher.on(OPS_SCALING)] == [2]
    assert len(publisher.on(AUDIT_EVENTS)) == 1
    assert ops.replicas == {CHAT: 2}
    assert ops.outbox == []


def test_the_scaler_asks_for_no_more_than_the_owner_would_run() -> None:
    scaler = Scaler([policy(out_for_s=0, out_cooldown_s=0)])
    slow = demand(p99_s=2.0, waiting=100)
    assert scaler.decide(CHAT, 0.0, 1, slow, ceiling=1) is None  # one is all it would run
    decided = scaler.decide(CHAT, 1.0, 1, slow, ceiling=2)
    assert decided is not None
    assert decided.target == 2  # the queue asks for 13; the owner runs 2 at most
    # a lower ceiling (true or forged) never takes replicas away: the owner enforces its own
    assert scaler.decide(CHAT, 2.0, 3, demand(), ceiling=2) is None
    assert scaler.decide(CHAT, 3.0, 3, slow, ceiling=2) is None  # nor adds any


async def test_the_reported_ceiling_bounds_the_decisions() -> None:
    now = [1000.0]
    ops, publisher, windows = make_service(now, policy(out_for_s=0, min_requests=1))
    ctx = context(MODEL_STATUS)
    capped = status(CHAT, 1)
    capped.max_replicas = 1  # e.g. a two-core machine: one chat replica fits
    await ops.on_status(capped, ctx)
    windows.add_all(answer(995.0 + i / 10, 2.0) for i in range(30))
    _, decisions = await ops.evaluate_now()
    assert decisions == []
    assert publisher.sent == []
    roomy = status(CHAT, 1)
    roomy.max_replicas = 3
    await ops.on_status(roomy, ctx)
    _, decisions = await ops.evaluate_now()
    assert [(d.current, d.target) for d in decisions] == [(1, 2)]
