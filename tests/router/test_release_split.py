"""A release's traffic split, through the real broker: decisions on model.deployments move
the router's requests between versions; bad decisions on the topic change nothing."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from shared.bus import Bus
from shared.bus.embedded import free_port
from shared.events.v1 import events_pb2 as ev
from shared.release_split import bucket
from shared.topics import MODEL_DEPLOYMENTS
from tests.conftest import poll_until
from tests.fakes.openai_backend import FakeBackend
from tests.router.test_router import Replies, answered, mesh, request, running_router

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(120)]
__all__ = ["mesh"]  # the fixture, used by name


def decision(model: str, action: Any, version: str = "", **fields: Any) -> ev.ModelDeployment:
    return ev.ModelDeployment(model=model, version=version, action=action, **fields)


def canary(
    model: str, version: str, percent: int, release_id: str, **fields: Any
) -> ev.ModelDeployment:
    return decision(
        model,
        ev.DEPLOYMENT_ACTION_CANARY,
        version,
        traffic_percent=percent,
        release_id=release_id,
        lease_s=fields.pop("lease_s", 120),
        **fields,
    )


async def asked_for(
    client: Bus,
    replies: Replies,
    fake: FakeBackend,
    model: str,
    *,
    key: str = "",
    tenant: str = "acme",
) -> tuple[str, ev.RoutingDecision]:
    """The model name the replica was asked for, and the request's routing record."""
    event = request(max_tokens=1, api_key_id=key)
    event.model = model
    event.user = event.request_id  # the replica sees it as the body's user
    event.envelope.tenant = tenant
    await answered(client, replies, event)
    await poll_until(lambda: event.request_id in replies.routing, message="routing record")
    [body] = [b for b in fake.behaviour.bodies if b.get("user") == event.request_id]
    return str(body["model"]), replies.routing[event.request_id]


async def test_a_split_decided_before_the_router_started_sends_each_caller_where_its_hash_says(
    kafka_bootstrap: str, tmp_path: Path, mesh: tuple[Bus, Replies]
) -> None:
    client, replies = mesh
    model, release = f"m-{uuid.uuid4().hex[:6]}", uuid.uuid4().hex
    await client.publish(
        MODEL_DEPLOYMENTS,
        canary(
            model, "v2", 40, release,
            candidate_callers=["tenant:testers"], production_callers=["tenant:bank"],
        ),
    )  # fmt: skip
    with FakeBackend(free_port()) as fake:
        async with running_router(kafka_bootstrap, tmp_path, fake.url):

            async def tester_on_candidate() -> bool:
                asked, _ = await asked_for(client, replies, fake, model, key="k", tenant="testers")
                return asked == f"{model}:v2"

            # a router reads the decisions of the last lease on start; until then (the safe
            # side) it sends every caller to production
            await poll_until_async(tester_on_candidate, "the decision read on start")
            keys = [f"key-{i}" for i in range(24)]
            for key in keys:
                expected = bucket(model, release, f"key:{key}") < 40
                asked, routing = await asked_for(client, replies, fake, model, key=key)
                assert asked == (f"{model}:v2" if expected else model), key
                assert routing.release_arm == ("candidate" if expected else "production")
                assert routing.model_version == ("v2" if expected else "production")
            asked, routing = await asked_for(
                client, replies, fake, model, key="k", tenant="testers"
            )
            assert (asked, routing.release_arm) == (f"{model}:v2", "pinned-candidate")
            asked, routing = await asked_for(client, replies, fake, model, key="k", tenant="bank")
            assert (asked, routing.release_arm) == (model, "pinned-production")
            # a caller naming a version gets it, and the record shows no release arm
            named = request(max_tokens=1, model_version="v1")
            named.model = model
            await answered(client, replies, named)
            await poll_until(lambda: named.request_id in replies.routing, message="routing")
            assert replies.routing[named.request_id].release_arm == ""
            # the rollback: every caller back on production
            await client.publish(
                MODEL_DEPLOYMENTS, decision(model, ev.DEPLOYMENT_ACTION_ROLLBACK, "v2")
            )

            async def back_on_production() -> bool:
                asked, _ = await asked_for(client, replies, fake, model, key="k", tenant="testers")
                return asked == model

            await poll_until_async(back_on_production, "the rollback applied")


async def test_bad_decisions_on_the_topic_change_nothing_and_a_lease_ends_by_itself(
    kafka_bootstrap: str, tmp_path: Path, mesh: tuple[Bus, Replies]
) -> None:
    client, replies = mesh
    model, marker = f"m-{uuid.uuid4().hex[:6]}", f"marker-{uuid.uuid4().hex[:6]}"
    release = uuid.uuid4().hex
    with FakeBackend(free_port()) as fake:
        async with running_router(kafka_bootstrap, tmp_path, fake.url):
            await client.publish(MODEL_DEPLOYMENTS, canary(model, "v2", 100, release))

            async def on(name: str, version: str) -> bool:
                """Whether a caller of ``name`` is sent to ``version`` (empty: production)."""
                asked, _ = await asked_for(client, replies, fake, name, key="k")
                return asked == (f"{name}:{version}" if version else name)

            await poll_until_async(lambda: on(model, "v2"), "the split applied")
            for bad in (
                canary(model, "v3", 100, release, lease_s=0),  # would never end
                canary(model, "v3", 100, release, lease_s=100_000),
                canary(model, "v3", 250, release),
                canary(model, "v3:x", 100, release),
                canary(model, "v3", 100, ""),
                canary(model, "v3", 100, release, candidate_callers=["*"]),
                decision(model, 42, "v3"),
                decision(model, ev.DEPLOYMENT_ACTION_ROLLBACK, "v3"),  # not its candidate
            ):
                await client.publish(MODEL_DEPLOYMENTS, bad)
            # a good decision after them: once it is applied, so were (or were not) they
            await client.publish(MODEL_DEPLOYMENTS, canary(marker, "v9", 100, release))
            await poll_until_async(lambda: on(marker, "v9"), "the marker applied")
            assert await on(model, "v2")  # not v3, and still split
            # nobody renews a split: at its lease's end the callers are back on production
            short = f"short-{uuid.uuid4().hex[:6]}"
            await client.publish(MODEL_DEPLOYMENTS, canary(short, "v2", 100, release, lease_s=20))
            await poll_until_async(lambda: on(short, "v2"), "the short split applied")
            await poll_until_async(lambda: on(short, ""), "the short lease ended")


async def poll_until_async(
    check: Callable[[], Awaitable[bool]], message: str, timeout: float = 30
) -> None:
    """Await ``check()`` until it is true; fail after ``timeout`` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {message}")
        await asyncio.sleep(0.2)


async def test_a_candidate_the_replica_does_not_serve_is_answered_by_production(
    kafka_bootstrap: str, tmp_path: Path, mesh: tuple[Bus, Replies]
) -> None:
    """A replica still loading the candidate, or one that dropped it on a rollback the
    router has not read yet, answers 404: the caller gets production's answer, not an
    error."""
    client, replies = mesh
    model = f"m-{uuid.uuid4().hex[:6]}"
    with FakeBackend(free_port()) as fake:
        fake.behaviour.unserved = {f"{model}:v2"}
        async with running_router(kafka_bootstrap, tmp_path, fake.url):
            await client.publish(MODEL_DEPLOYMENTS, canary(model, "v2", 100, uuid.uuid4().hex))

            async def fell_back() -> bool:
                event = request(max_tokens=2, api_key_id="k")
                event.model = model
                final = await answered(client, replies, event)
                await poll_until(lambda: event.request_id in replies.routing, message="record")
                arm = replies.routing[event.request_id].release_arm
                if arm != "candidate-unserved":
                    return False
                assert not final.HasField("error"), final.error
                assert final.choices[0].text == "the quick "
                return True

            await poll_until_async(fell_back, "a fallback to production")
    asked = [b["model"] for b in fake.behaviour.bodies if b["model"].startswith(model)]
    assert asked[-2:] == [f"{model}:v2", model]  # the candidate refused, then production
