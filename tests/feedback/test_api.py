"""The feedback service's internal API as a trust boundary: who may call it, and what it
does with bad or hostile parameters (a real SQLite store behind it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from services.feedback.api import FeedbackApi
from services.feedback.datasets import DatasetSpec, build, manifest
from services.feedback.service import FeedbackService
from services.feedback.settings import FeedbackSettings
from services.feedback.store import FeedbackStore
from shared.service_auth import ServiceGuard
from shared.sqldb import SqliteDriver
from tests.feedback.conftest import example

GATEWAY, ROUTER, TRAINER = "g" * 64, "r" * 64, "t" * 64


class NoPublisher:
    """Datasets are not built here; nothing is published."""


class NoAudit:
    """Ratings are not consumed here; nothing is joined."""


@pytest.fixture
async def api(tmp_path: Path) -> Any:
    store = await FeedbackStore(SqliteDriver(tmp_path / "f.sqlite")).open()
    for n in range(3):
        await store.put(example(f"r{n}", subject="alice~smith", rated_at_ns=100 + n))
    await store.put(example("theirs", tenant="globex"))
    spec = DatasetSpec("acme", "old")
    built = build([example("r0")], spec, lambda t: (t, 0), lambda t: [])
    made = manifest(spec, built, dataset_id="old-v1", version=1, created_at="t", pii_policy={})
    await store.add_dataset("acme", "old", 1, lambda version, erased: (made, built.rows))
    await store.purge_datasets("acme", 10, now_ns=11)
    service = FeedbackService(store, FeedbackSettings(), NoPublisher(), NoAudit())  # type: ignore[arg-type]
    guard = ServiceGuard.of_tokens({"gateway": GATEWAY, "router": ROUTER, "trainer": TRAINER})
    yield TestClient(FeedbackApi(service, guard).app())
    await store.close()


def get(client: TestClient, path: str, token: str | None = GATEWAY, **params: str) -> Any:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return client.get(path, params=params, headers=headers)


def test_only_the_gateway_may_call_it(api: TestClient) -> None:
    assert get(api, "/v1/feedback", None, tenant="acme").status_code == 401
    assert get(api, "/v1/feedback", "x" * 64, tenant="acme").status_code == 401
    assert get(api, "/v1/feedback", ROUTER, tenant="acme").status_code == 403
    assert get(api, "/v1/feedback", tenant="acme").status_code == 200


def test_a_tenant_is_required_and_sees_only_its_own(api: TestClient) -> None:
    assert get(api, "/v1/feedback").json()["error"]["param"] == "tenant"
    ids = [e["request_id"] for e in get(api, "/v1/feedback", tenant="acme").json()["data"]]
    assert sorted(ids) == ["r0", "r1", "r2"]
    theirs = get(api, "/v1/feedback", tenant="acme", request_id="theirs").json()["data"]
    assert theirs == []


def test_pages_follow_a_subject_with_tildes(api: TestClient) -> None:
    first = get(api, "/v1/feedback", tenant="acme", limit="2").json()
    rest = get(api, "/v1/feedback", tenant="acme", limit="2", after=first["next_cursor"]).json()
    assert len(first["data"]) + len(rest["data"]) == 3


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "²"}, "limit"),
        ({"after": "9" * 5000 + "~a~b"}, "after"),
        ({"after": "nonsense"}, "after"),
        ({"request_id": "../x"}, "request_id"),
        ({"tenant2": "x"}, "tenant2"),
    ],
)
def test_bad_parameters_are_400_naming_them(
    api: TestClient, params: dict[str, str], field: str
) -> None:
    reply = get(api, "/v1/feedback", tenant="acme", **params)
    assert reply.status_code == 400
    assert reply.json()["error"]["param"] == field


def test_a_purged_dataset_keeps_its_manifest_and_its_files_are_gone(api: TestClient) -> None:
    manifest = get(api, "/v1/datasets/old-v1", tenant="acme")
    assert manifest.status_code == 200
    assert manifest.json()["content_purged_at_ns"] == 11
    gone = get(api, "/v1/datasets/old-v1/files/train", tenant="acme")
    assert gone.status_code == 410
    assert get(api, "/v1/datasets/old-v1", tenant="globex").status_code == 404
    assert get(api, "/v1/datasets/..%2Fx-v1", tenant="acme").status_code in (400, 404)


def test_a_build_body_is_checked(api: TestClient) -> None:
    reply = api.post(
        "/v1/datasets",
        params={"tenant": "acme"},
        headers={"authorization": f"Bearer {GATEWAY}"},
        content=json.dumps({"name": "ok", "min_rating": 9}),
    )
    assert reply.status_code == 400
    assert reply.json()["error"]["param"] == "min_rating"


def test_the_trainer_reads_dataset_files_and_marks_them_used_and_nothing_else(
    api: TestClient,
) -> None:
    trainer = {"authorization": f"Bearer {TRAINER}"}
    gateway = {"authorization": f"Bearer {GATEWAY}"}
    assert get(api, "/v1/feedback", TRAINER, tenant="acme").status_code == 403
    assert get(api, "/v1/datasets", TRAINER, tenant="acme").status_code == 403
    used = "/v1/datasets/old-v1/used"
    assert (
        api.post(used, params={"tenant": "acme", "by": "x:1"}, headers=gateway).status_code == 403
    )
    bad = api.post(used, params={"tenant": "acme", "by": "../x"}, headers=trainer)
    assert (bad.status_code, bad.json()["error"]["param"]) == (400, "by")
    theirs = api.post(used, params={"tenant": "globex", "by": "ftjob-1"}, headers=trainer)
    assert theirs.status_code == 404
    for by in ("ftjob-1", "smollm2:ft-1", "ftjob-1"):
        marked = api.post(used, params={"tenant": "acme", "by": by}, headers=trainer)
        assert marked.status_code == 200
    assert marked.json()["used_by"] == ["ftjob-1", "smollm2:ft-1"]
