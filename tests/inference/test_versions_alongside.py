"""A replica serving a candidate beside its current version (a release's A/B stage), then
promoting it without a reload, or dropping it; requests in flight finish on the engine
that started them."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from services.inference.chat import ChatService
from services.inference.generation import EngineSettings
from services.inference.registry import ModelRegistry, ensure_default
from services.inference.releases import ReleaseFollower
from services.inference.serve_app import _follow_releases
from services.inference.settings import (
    DEFAULT_MODEL_NAME,
    DEFAULT_MODEL_VERSION,
    InferenceSettings,
)
from shared.events.v1 import events_pb2 as ev
from shared.openai_protocol import InvalidRequestError, ModelNotFoundError
from shared.topics import MODEL_DEPLOYMENTS
from tests.conftest import poll_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
# names of this run only: a broker that outlives the run must not replay them to the next
RUN = uuid.uuid4().hex[:6]
CANDIDATE, OTHER = f"cand-{RUN}", f"other-{RUN}"
CURRENT_ID = f"{DEFAULT_MODEL_NAME}:{DEFAULT_MODEL_VERSION}"
CANDIDATE_ID = f"{DEFAULT_MODEL_NAME}:{CANDIDATE}"


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[ChatService]:
    registry = ModelRegistry(tmp_path)
    default = ensure_default(registry)
    for version in (CANDIDATE, OTHER):
        registry.register(DEFAULT_MODEL_NAME, version, default.path, copy=False)
    service = ChatService(
        registry,
        DEFAULT_MODEL_NAME,
        EngineSettings(max_batch=4, max_seq_len=256),
        "int8",
        verify=False,
    )
    service.load_now(DEFAULT_MODEL_VERSION)
    yield service
    service.close()


def asking(version: str | None = None, max_tokens: int = 4) -> dict[str, Any]:
    model = f"{DEFAULT_MODEL_NAME}:{version}" if version else DEFAULT_MODEL_NAME
    return {
        "model": model,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }


async def running(service: ChatService, body: dict[str, Any]) -> asyncio.Task[list[dict[str, Any]]]:
    """A stream whose generation has begun (its first chunk came); the task reads it all."""
    stream = service.chat_stream(body)
    first = await stream.__anext__()

    async def rest() -> list[dict[str, Any]]:
        return [first, *[chunk async for chunk in stream]]

    return asyncio.create_task(rest())


async def test_a_candidate_is_served_beside_the_current_version_then_promoted_without_a_reload(
    service: ChatService,
) -> None:
    with pytest.raises(ModelNotFoundError, match="registered but not served now"):
        await service.chat(asking(CANDIDATE))
    # the current version keeps answering while the candidate loads
    during_load = await running(service, asking(max_tokens=40))
    status = await service.serve_alongside([CANDIDATE])
    assert [m["model"] for m in status["alongside"]] == [CANDIDATE_ID]
    assert status["model"] == CURRENT_ID
    chunks = await during_load
    assert {c["model"] for c in chunks} == {CURRENT_ID}
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"

    assert (await service.chat(asking()))["model"] == CURRENT_ID
    assert (await service.chat(asking(CANDIDATE)))["model"] == CANDIDATE_ID
    ids = [m["id"] for m in service.models()["data"]]
    assert ids == [DEFAULT_MODEL_NAME, CURRENT_ID, CANDIDATE_ID]

    # promoted while a request runs on each: the candidate's engine becomes the current one
    beside = service._alongside[CANDIDATE]
    on_current = await running(service, asking(max_tokens=40))
    on_candidate = await running(service, asking(CANDIDATE, max_tokens=40))
    promoted = await service.switch(CANDIDATE)
    assert service.current is beside  # no reload
    assert promoted["model"] == CANDIDATE_ID
    assert promoted["in_flight"] == 1  # the candidate's request, now on the current engine
    assert promoted["alongside"] == []
    assert promoted["retiring"] == [{"model": CURRENT_ID, "in_flight": 1}]
    for task, model in ((on_current, CURRENT_ID), (on_candidate, CANDIDATE_ID)):
        chunks = await task
        assert {c["model"] for c in chunks} == {model}
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert (await service.chat(asking()))["model"] == CANDIDATE_ID
    await service.wait_retired()
    assert service.status()["retiring"] == []


async def test_dropping_the_candidate_retires_it_after_its_requests_and_bad_asks_change_nothing(
    service: ChatService,
) -> None:
    await service.serve_alongside([CANDIDATE])
    with pytest.raises(InvalidRequestError) as too_many:
        await service.serve_alongside([CANDIDATE, OTHER])
    assert too_many.value.param == "alongside"
    with pytest.raises(ModelNotFoundError, match="v404"):
        await service.serve_alongside(["v404"])
    assert [m["version"] for m in service.status()["alongside"]] == [CANDIDATE]

    on_candidate = await running(service, asking(CANDIDATE, max_tokens=40))
    status = await service.serve_alongside([])  # the release was rolled back
    assert status["alongside"] == []
    assert status["retiring"] == [{"model": CANDIDATE_ID, "in_flight": 1}]
    chunks = await on_candidate
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    with pytest.raises(ModelNotFoundError, match="registered but not served now"):
        await service.chat(asking(CANDIDATE))
    await service.wait_retired()
    assert service.status()["retiring"] == []
    # asking for the current version alongside itself is no second engine
    assert (await service.serve_alongside([DEFAULT_MODEL_VERSION]))["alongside"] == []


@pytest.mark.kafka
async def test_a_replica_follows_the_release_decisions_on_the_topic(
    service: ChatService, kafka_bootstrap: str, tmp_path: Path
) -> None:
    settings = InferenceSettings(kafka={"bootstrap": kafka_bootstrap}, data_dir=tmp_path)
    bus = await _follow_releases(settings, service)
    assert bus is not None
    try:

        async def decide(action: int, version: str, model: str = DEFAULT_MODEL_NAME) -> None:
            await bus.publish(
                MODEL_DEPLOYMENTS,
                ev.ModelDeployment(
                    model=model,
                    version=version,
                    action=action,  # type: ignore[arg-type]
                    release_id="r",
                    lease_s=60,
                ),
            )

        def beside() -> list[str]:
            return [m["version"] for m in service.status()["alongside"]]

        await decide(ev.DEPLOYMENT_ACTION_CANARY, CANDIDATE, model="another-model")
        await decide(ev.DEPLOYMENT_ACTION_CANARY, "v404")  # not in the registry: logged
        await decide(ev.DEPLOYMENT_ACTION_CANARY, CANDIDATE)
        await poll_until(lambda: beside() == [CANDIDATE], 60, message="the candidate loaded")
        assert (await service.chat(asking(CANDIDATE)))["model"] == CANDIDATE_ID
        await decide(ev.DEPLOYMENT_ACTION_ROLLBACK, CANDIDATE)
        await poll_until(lambda: beside() == [], 30, message="the candidate dropped")
        await decide(ev.DEPLOYMENT_ACTION_CANARY, CANDIDATE)
        await decide(ev.DEPLOYMENT_ACTION_PROMOTE, CANDIDATE)
        await poll_until(
            lambda: service.current.entry.version == CANDIDATE, 60, message="the promotion"
        )
        assert beside() == []
        assert (await service.chat(asking()))["model"] == CANDIDATE_ID
    finally:
        await bus.stop()


async def test_a_rolled_back_candidate_answers_for_a_grace_period_unless_released_again(
    service: ChatService,
) -> None:
    follower = ReleaseFollower(service, drop_after_s=3)

    async def decide(action: int, version: str = CANDIDATE) -> None:
        event = ev.ModelDeployment(
            model=DEFAULT_MODEL_NAME, version=version, action=action,  # type: ignore[arg-type]
            release_id="r", lease_s=60,
        )  # fmt: skip
        event.envelope.occurred_at.FromNanoseconds(time.time_ns())
        await follower.on_decision(event, None)  # type: ignore[arg-type]

    def beside() -> list[str]:
        return [m["version"] for m in service.status()["alongside"]]

    await decide(ev.DEPLOYMENT_ACTION_CANARY)
    engine = service._alongside[CANDIDATE]
    await decide(ev.DEPLOYMENT_ACTION_ROLLBACK)
    # a router that has not read the rollback yet still gets an answer
    assert (await service.chat(asking(CANDIDATE)))["model"] == CANDIDATE_ID
    await decide(ev.DEPLOYMENT_ACTION_RETIRE, OTHER)  # about another version: no effect
    await decide(ev.DEPLOYMENT_ACTION_CANARY)  # released again within the grace period
    await asyncio.sleep(3.5)
    assert service._alongside.get(CANDIDATE) is engine  # never dropped (nor reloaded)
    await decide(ev.DEPLOYMENT_ACTION_ROLLBACK)
    await asyncio.sleep(1)
    await decide(ev.DEPLOYMENT_ACTION_ROLLBACK)  # repeated: the first deadline holds
    await poll_until(lambda: beside() == [], 2.5, message="the candidate dropped")


async def test_a_canary_the_routers_would_refuse_is_not_loaded(service: ChatService) -> None:
    follower = ReleaseFollower(service, max_lease_s=300)
    for lease_s in (0, 3600):  # a split that never ends, or ends later than routers allow
        event = ev.ModelDeployment(
            model=DEFAULT_MODEL_NAME, version=CANDIDATE, release_id="r", lease_s=lease_s,
            action=ev.DEPLOYMENT_ACTION_CANARY,
        )  # fmt: skip
        event.envelope.occurred_at.FromNanoseconds(time.time_ns())
        await follower.on_decision(event, None)  # type: ignore[arg-type]
    assert service.status()["alongside"] == []


async def test_a_stuck_candidate_is_retired_and_does_not_take_the_replica_down(
    service: ChatService, monkeypatch: pytest.MonkeyPatch
) -> None:
    await service.serve_alongside([CANDIDATE])
    engine = service._alongside[CANDIDATE].engine
    monkeypatch.setattr(engine, "stuck", lambda: "no step for 60 s")
    assert service.stuck() is None  # the replica stays healthy
    assert service.status()["alongside"] == []
    with pytest.raises(ModelNotFoundError, match="registered but not served now"):
        await service.chat(asking(CANDIDATE))
    assert (await service.chat(asking()))["model"] == CURRENT_ID
