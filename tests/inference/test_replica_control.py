"""The inference service's side of the ops loop's replica decisions, without Ray: a decision
is applied within this service's own bounds (settings, and the CPUs of a local Ray), and
the counts go out on model.status. Serve's scaling call is replaced by a recorder (a test
double); the real Serve path is covered by the Serve tests."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import pytest

from services.inference import scaling
from services.inference.scaling import ReplicaControl
from services.inference.settings import InferenceSettings, ServeConfig
from shared.bus.consumer import EventContext
from shared.deployments import CHAT_DEPLOYMENT, EMBEDDINGS_DEPLOYMENT
from shared.envelope import stamp
from shared.events.v1 import events_pb2 as ev
from shared.topics import MODEL_STATUS, OPS_SCALING
from tests.fakes.publisher import RecordingPublisher

CHAT = CHAT_DEPLOYMENT
EMBEDDINGS = EMBEDDINGS_DEPLOYMENT
MODEL = "smollm2-135m-instruct"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("MESHLLM_"):
            monkeypatch.delenv(name)


@pytest.fixture
def scaled(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, int]]:
    """Serve's scaling call, recorded instead of made: (app, deployment, replicas)."""
    calls: list[tuple[str, str, int]] = []

    def record(app_name: str, deployment: str, replicas: int) -> None:
        calls.append((app_name, deployment, replicas))

    monkeypatch.setattr(scaling, "_scale", record)
    return calls


def statuses(publisher: RecordingPublisher) -> list[tuple[str, int]]:
    return [(e.deployment, e.replicas) for e in publisher.on(MODEL_STATUS)]


def control(
    cpus: float | None = None, *, deployed: bool = True, **serve: Any
) -> tuple[ReplicaControl, RecordingPublisher]:
    settings = InferenceSettings(model_version="q4_1-1", serve=ServeConfig(**serve))
    publisher = RecordingPublisher()
    replicas = ReplicaControl(settings, publisher, cpus)  # type: ignore[arg-type]
    if deployed:
        replicas.deployed.set()
    return replicas, publisher


def decision(deployment: str, target: int) -> ev.ScalingDecision:
    event = ev.ScalingDecision(deployment=deployment, current_replicas=1,
                               target_replicas=target, reason="p99: test")  # fmt: skip
    stamp(event, producer="ops")
    return event


CTX = EventContext(OPS_SCALING.name, 0, 0, None, [], ev.Envelope(), attempt=1)


async def test_a_forged_decision_for_a_thousand_replicas_gets_the_maximum(
    scaled: list[tuple[str, str, int]],
) -> None:
    replicas, publisher = control(chat_max_replicas=3)
    await replicas.on_decision(decision(CHAT, 1000), CTX)
    assert scaled == [("inference", CHAT, 3)]
    assert replicas.replicas[CHAT] == 3
    assert statuses(publisher) == [(CHAT, 3)]


@pytest.mark.parametrize(("chat_min_replicas", "applied"), [(0, 1), (1, 1), (2, 2)])
async def test_zero_replicas_gets_the_minimum_and_never_none(
    scaled: list[tuple[str, str, int]], chat_min_replicas: int, applied: int
) -> None:
    replicas, _ = control(chat_replicas=3, chat_min_replicas=chat_min_replicas)
    await replicas.on_decision(decision(CHAT, 0), CTX)
    assert scaled == [("inference", CHAT, applied)]
    assert replicas.replicas[CHAT] == applied


async def test_zero_embeddings_replicas_gets_one(scaled: list[tuple[str, str, int]]) -> None:
    replicas, _ = control(embeddings_replicas=2, embeddings_max_replicas=3)
    await replicas.on_decision(decision(EMBEDDINGS, 0), CTX)
    assert scaled == [("inference", EMBEDDINGS, 1)]


@pytest.mark.parametrize(
    ("deployment", "serve"),
    [
        ("SomethingElse", {}),  # no such deployment here
        (EMBEDDINGS, {"embeddings_replicas": 0}),  # embeddings not deployed
    ],
)
async def test_a_decision_for_a_deployment_not_run_here_changes_nothing(
    scaled: list[tuple[str, str, int]], deployment: str, serve: dict[str, Any]
) -> None:
    replicas, publisher = control(**serve)
    before = dict(replicas.replicas)
    await replicas.on_decision(decision(deployment, 2), CTX)
    assert scaled == []
    assert publisher.sent == []
    assert replicas.replicas == before
    assert replicas.bounded(deployment, 2) is None


async def test_a_local_ray_bounds_the_count_by_the_cpus_it_has(
    scaled: list[tuple[str, str, int]],
) -> None:
    # 2 CPUs: the embeddings replica holds 0.5, so one chat replica (1 CPU each) fits
    replicas, publisher = control(cpus=2, chat_num_cpus=1, embeddings_replicas=1,
                                  embeddings_num_cpus=0.5)  # fmt: skip
    assert replicas.bounded(CHAT, 4) == 1
    await replicas.on_decision(decision(CHAT, 4), CTX)
    assert scaled == []  # one replica runs already: nothing to change
    assert replicas.replicas[CHAT] == 1
    assert statuses(publisher) == [(CHAT, 1)]  # the count is told all the same
    # the embeddings may take the CPU the chat replica leaves: (2 - 1) / 0.5
    assert replicas.bounded(EMBEDDINGS, 5) == 2


async def test_the_cpu_bound_follows_the_other_deployments_count(
    scaled: list[tuple[str, str, int]],
) -> None:
    replicas, _ = control(cpus=4, chat_num_cpus=1, embeddings_num_cpus=1,
                          embeddings_max_replicas=3)  # fmt: skip
    assert replicas.bounded(CHAT, 10) == 3  # 4 CPUs less the embeddings' 1
    await replicas.on_decision(decision(EMBEDDINGS, 3), CTX)
    assert replicas.bounded(CHAT, 10) == 1  # 4 less 3: one chat replica
    await replicas.on_decision(decision(CHAT, 10), CTX)
    assert scaled == [("inference", EMBEDDINGS, 3)]  # chat stays at 1
    assert replicas.replicas == {CHAT: 1, EMBEDDINGS: 3}


def test_a_cluster_or_a_free_replica_has_no_cpu_bound() -> None:
    cluster, _ = control(cpus=None, chat_max_replicas=8)
    assert cluster.bounded(CHAT, 100) == 8
    free, _ = control(cpus=1, chat_num_cpus=0, chat_max_replicas=8)
    assert free.bounded(CHAT, 100) == 8
    full, _ = control(cpus=0.5, chat_num_cpus=1)  # nothing fits: still the minimum
    assert full.bounded(CHAT, 3) == 1


@pytest.mark.parametrize(
    "serve",
    [{"chat_autoscaling": True}, {"external_scaling": False}],
    ids=["serve-autoscaling", "external-scaling-off"],
)
async def test_decisions_are_refused_when_the_ops_loop_does_not_size_the_deployments(
    scaled: list[tuple[str, str, int]], serve: dict[str, Any]
) -> None:
    replicas, publisher = control(**serve)
    assert not replicas.external
    await replicas.on_decision(decision(CHAT, 3), CTX)
    await replicas.on_decision(decision(EMBEDDINGS, 2), CTX)
    assert scaled == []
    assert publisher.sent == []
    assert replicas.replicas == {CHAT: 1, EMBEDDINGS: 1}


async def test_the_same_target_twice_scales_once(scaled: list[tuple[str, str, int]]) -> None:
    replicas, publisher = control()
    await replicas.on_decision(decision(CHAT, 3), CTX)
    await replicas.on_decision(decision(CHAT, 3), CTX)
    assert scaled == [("inference", CHAT, 3)]
    assert statuses(publisher) == [(CHAT, 3), (CHAT, 3)]


async def test_an_applied_count_is_published_on_model_status(
    scaled: list[tuple[str, str, int]],
) -> None:
    replicas, publisher = control(app_name="mesh")
    await replicas.on_decision(decision(CHAT, 2), CTX)
    assert scaled == [("mesh", CHAT, 2)]
    [(topic, status, key)] = publisher.sent
    assert topic == MODEL_STATUS
    assert key == MODEL  # model.status is keyed by model
    assert isinstance(status, ev.ModelStatus)
    assert (status.deployment, status.replicas) == (CHAT, 2)
    assert status.state == ev.MODEL_STATE_READY
    assert (status.model, status.version) == (MODEL, "q4_1-1")


async def test_a_failed_scaling_call_keeps_the_count_and_raises(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refuse(app_name: str, deployment: str, replicas: int) -> None:
        raise RuntimeError("Serve is not running")

    monkeypatch.setattr(scaling, "_scale", refuse)
    replicas, publisher = control()
    with pytest.raises(RuntimeError, match="Serve is not running"):  # the bus tries again
        await replicas.on_decision(decision(CHAT, 2), CTX)
    assert replicas.replicas[CHAT] == 1
    assert publisher.sent == []


async def test_report_publishes_every_deployments_count() -> None:
    replicas, publisher = control(chat_replicas=2, embeddings_replicas=1)
    await replicas.report()
    assert statuses(publisher) == [(CHAT, 2), (EMBEDDINGS, 1)]
    assert all(t == MODEL_STATUS and key == MODEL for t, _, key in publisher.sent)
    publisher.sent.clear()
    await replicas.report(EMBEDDINGS)
    assert statuses(publisher) == [(EMBEDDINGS, 1)]
    chat_only, alone = control(embeddings_replicas=0)
    await chat_only.report()
    assert statuses(alone) == [(CHAT, 1)]


async def test_a_decision_waits_until_the_application_is_deployed(
    scaled: list[tuple[str, str, int]],
) -> None:
    replicas, publisher = control(deployed=False)
    applying = asyncio.create_task(replicas.on_decision(decision(CHAT, 2), CTX))
    for _ in range(20):
        await asyncio.sleep(0)
    assert not applying.done()
    assert scaled == []
    assert publisher.sent == []
    replicas.deployed.set()
    await asyncio.wait_for(applying, 5)
    assert scaled == [("inference", CHAT, 2)]
    assert statuses(publisher) == [(CHAT, 2)]


async def test_statuses_say_how_many_would_run_and_how_many_run() -> None:
    replicas, publisher = control(cpus=2.0, chat_num_cpus=0.5, chat_max_replicas=8)
    replicas.running = {CHAT: 1, EMBEDDINGS: 1}
    await replicas.report()
    sent = {status.deployment: status for _, status, _ in publisher.sent}
    assert isinstance(sent[CHAT], ev.ModelStatus)
    # two CPUs, the embeddings replica holds 0.5: three chat replicas of 0.5 fit
    assert (sent[CHAT].max_replicas, sent[CHAT].running_replicas) == (3, 1)
    assert sent[EMBEDDINGS].max_replicas == 2  # embeddings_max_replicas


async def test_a_decision_another_service_made_is_ignored(
    scaled: list[tuple[str, str, int]],
) -> None:
    replicas, publisher = control()
    forged = ev.ScalingDecision(deployment=CHAT, current_replicas=1, target_replicas=2)
    stamp(forged, producer="router")
    await replicas.on_decision(forged, CTX)
    assert scaled == []
    assert publisher.sent == []


async def test_a_decision_older_than_two_minutes_is_ignored(
    scaled: list[tuple[str, str, int]],
) -> None:
    replicas, publisher = control()
    old = ev.ScalingDecision(deployment=CHAT, current_replicas=1, target_replicas=2)
    old.envelope.occurred_at.FromNanoseconds(time.time_ns() - 121 * 10**9)
    stamp(old, producer="ops")
    await replicas.on_decision(old, CTX)
    assert scaled == []
    assert publisher.sent == []


async def test_with_serves_own_autoscaling_it_offers_the_ops_loop_no_room() -> None:
    replicas, publisher = control(chat_autoscaling=True, chat_max_replicas=4)
    await replicas.report(CHAT)
    [(_, status, _)] = publisher.sent
    assert isinstance(status, ev.ModelStatus)
    assert status.max_replicas == status.replicas  # so the loop asks for nothing
