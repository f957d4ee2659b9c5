"""The trainer's internal API as a trust boundary, over a real store on both databases:
who may call it, tenants kept apart, files checked line by line, jobs checked against the
registry and the tenant's files, the job states a cancel moves through."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.inference.model.gguf_model import smollm2_path
from services.inference.registry import ModelRegistry
from services.inference.settings import DEFAULT_MODEL_NAME, DEFAULT_MODEL_VERSION
from services.trainer.api import TrainerApi
from services.trainer.service import TrainerService
from services.trainer.settings import TrainerSettings
from services.trainer.store import TrainerStore
from shared.service_auth import ServiceGuard
from shared.sqldb import PostgresDriver, SqliteDriver
from shared.topics import TRAINING_JOBS
from tests.procs.postgres import postgres_database

GATEWAY, ROUTER = "g" * 64, "r" * 64
GATEWAY_HEADERS = {"authorization": f"Bearer {GATEWAY}"}
ROW = {"messages": [{"role": "user", "content": "Leave days?"},
                    {"role": "assistant", "content": "27 days."}]}  # fmt: skip
PAIR = {
    "input": {"messages": [{"role": "user", "content": "Leave days?"}]},
    "preferred_output": [{"role": "assistant", "content": "27 days."}],
    "non_preferred_output": [{"role": "assistant", "content": "No idea."}],
}


def jsonl(*rows: Any) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


class Published:
    """The bus's publisher, as far as the API uses it: what was announced, in order."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Any, str, str]] = []

    async def publish(self, topic: Any, event: Any, *, key: str, tenant: str) -> None:
        self.sent.append((topic.name, event, key, tenant))


@pytest.fixture(scope="module")
def postgres_dsn() -> Iterator[str]:
    with postgres_database() as dsn:
        yield dsn


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[TrainerStore]:
    if request.param == "sqlite":
        opened = await TrainerStore(SqliteDriver(tmp_path / "trainer.sqlite")).open()
    else:
        dsn = request.getfixturevalue("postgres_dsn")
        opened = await TrainerStore(await PostgresDriver.connect(dsn)).open()
        for table in ("files", "jobs", "job_events", "job_checkpoints"):
            await opened.driver.execute(f"DELETE FROM {table}")
    yield opened
    await opened.close()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry holding the bundled model (registered once: it reads the whole file)."""
    path = tmp_path_factory.mktemp("models")
    registry = ModelRegistry(path)
    registry.register(DEFAULT_MODEL_NAME, DEFAULT_MODEL_VERSION, smollm2_path(), copy=False)
    return path


@pytest.fixture
def settings(tmp_path: Path, models: Path) -> TrainerSettings:
    return TrainerSettings(trainer_dir=tmp_path / "trainer", model_dir=models)


@pytest.fixture
def published() -> Published:
    return Published()


def client_of(service: TrainerService, **tokens: str) -> httpx.AsyncClient:
    guard = ServiceGuard.of_tokens(tokens or {"gateway": GATEWAY, "router": ROUTER})
    transport = httpx.ASGITransport(app=TrainerApi(service, guard).app())
    return httpx.AsyncClient(transport=transport, base_url="http://trainer")


@pytest.fixture
async def api(
    store: TrainerStore, settings: TrainerSettings, published: Published
) -> AsyncIterator[httpx.AsyncClient]:
    async with client_of(TrainerService(store, settings, published)) as client:  # type: ignore[arg-type]
        yield client


async def call(
    client: httpx.AsyncClient, method: str, path: str, token: str | None = GATEWAY, *,
    body: bytes | None = None, json_body: Any = None, **params: str,
) -> Any:  # fmt: skip
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return await client.request(
        method, path, params=params, headers=headers, content=body, json=json_body
    )


async def upload(client: httpx.AsyncClient, data: bytes, tenant: str = "acme", **extra: str) -> Any:
    params = {"tenant": tenant, "subject": "dev", "filename": "train.jsonl", "purpose": "fine-tune"}
    return await call(client, "POST", "/v1/files", body=data, **(params | extra))


async def create(client: httpx.AsyncClient, tenant: str = "acme", **body: Any) -> Any:
    return await call(
        client, "POST", "/v1/fine_tuning/jobs", json_body=body, tenant=tenant, subject="dev"
    )


async def test_only_the_gateway_may_call_it(api: httpx.AsyncClient) -> None:
    assert (await call(api, "GET", "/v1/files", None, tenant="acme")).status_code == 401
    assert (await call(api, "GET", "/v1/files", "x" * 64, tenant="acme")).status_code == 401
    assert (
        await call(api, "GET", "/v1/fine_tuning/jobs", ROUTER, tenant="acme")
    ).status_code == 403
    assert (await call(api, "GET", "/v1/files", tenant="acme")).status_code == 200


async def test_a_file_is_checked_kept_and_seen_by_its_tenant_only(
    api: httpx.AsyncClient, settings: TrainerSettings
) -> None:
    made = await upload(api, jsonl(ROW, ROW))
    assert made.status_code == 200, made.text
    file = made.json()
    assert (file["object"], file["purpose"], file["rows"], file["kind"]) == (
        "file", "fine-tune", 2, "chat",
    )  # fmt: skip
    content = await call(api, "GET", f"/v1/files/{file['id']}/content", tenant="acme")
    assert content.content == jsonl(ROW, ROW)
    stored = list((settings.root() / "files").rglob("*.jsonl"))
    assert [p.name for p in stored] == [f"{file['id']}.jsonl"]
    assert "acme" not in str(stored[0])  # a tenant's name never becomes a path
    assert stored[0].stat().st_mode & 0o777 == 0o600
    for path in (f"/v1/files/{file['id']}", f"/v1/files/{file['id']}/content"):
        theirs = await call(api, "GET", path, tenant="globex")
        unknown = await call(
            api, "GET", path.replace(file["id"], "file-" + "x" * 24), tenant="acme"
        )
        assert theirs.status_code == unknown.status_code == 404
        assert theirs.json()["error"]["param"] == unknown.json()["error"]["param"] == "file_id"
    assert (await call(api, "GET", "/v1/files", tenant="globex")).json()["data"] == []
    listed = (await call(api, "GET", "/v1/files", tenant="acme", purpose="fine-tune")).json()[
        "data"
    ]
    assert [f["id"] for f in listed] == [file["id"]]


@pytest.mark.parametrize(
    "case",
    [
        (jsonl(ROW) + b"{oops\n", {}, "file", "line 2: not UTF-8 JSON"),
        (jsonl(ROW, PAIR), {}, "file", "line 2: a preference row in a file of chat rows"),
        (b"", {}, "file", "line 1: the file has no rows"),
        (jsonl(ROW), {"purpose": "assistants"}, "purpose", "must be 'fine-tune'"),
        (jsonl(ROW), {"filename": "../../etc/passwd"}, "file", "without / or"),
        (jsonl(ROW), {"filename": ""}, "file", "needs a file name"),
    ],
)
async def test_bad_files_are_refused_naming_the_line_or_field(
    api: httpx.AsyncClient, settings: TrainerSettings, case: tuple[bytes, dict[str, str], str, str]
) -> None:
    data, extra, param, message = case
    refused = await upload(api, data, **extra)
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == param
    assert message in refused.json()["error"]["message"]
    assert not list((settings.root() / "files").rglob("*.jsonl"))  # nothing kept


async def test_a_file_over_the_limit_is_refused(store: TrainerStore, tmp_path: Path) -> None:
    settings = TrainerSettings(trainer_dir=tmp_path / "t", max_file_bytes=1024)
    service = TrainerService(store, settings, Published())  # type: ignore[arg-type]
    async with client_of(service, gateway=GATEWAY) as client:
        assert (await upload(client, jsonl(*[ROW] * 40))).status_code == 413


async def test_a_job_is_checked_stored_and_announced(
    api: httpx.AsyncClient, published: Published
) -> None:
    file_id = (await upload(api, jsonl(ROW, ROW))).json()["id"]
    made = await create(api, model=DEFAULT_MODEL_NAME, training_file=file_id, suffix="policies",
                  hyperparameters={"n_epochs": 2, "batch_size": "auto"}, seed=7)  # fmt: skip
    assert made.status_code == 200, made.text
    job = made.json()
    assert job["object"] == "fine_tuning.job"
    assert (job["status"], job["model"], job["base_version"], job["seed"]) == (
        "queued", DEFAULT_MODEL_NAME, DEFAULT_MODEL_VERSION, 7,
    )  # fmt: skip
    assert job["hyperparameters"] == {
        "n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 1.0,
    }  # fmt: skip
    assert job["tuning"] == "lora"
    assert job["organization_id"] == "acme"
    ((topic, event, key, tenant),) = published.sent
    assert (topic, key, tenant) == (TRAINING_JOBS.name, job["id"], "acme")
    assert (event.job_id, event.training_file, event.method) == (job["id"], file_id, "lora")
    got = (await call(api, "GET", f"/v1/fine_tuning/jobs/{job['id']}", tenant="acme")).json()
    assert got == job
    assert (
        await call(api, "GET", f"/v1/fine_tuning/jobs/{job['id']}", tenant="globex")
    ).status_code == 404
    events = (
        await call(api, "GET", f"/v1/fine_tuning/jobs/{job['id']}/events", tenant="acme")
    ).json()
    assert [e["message"] for e in events["data"]] == ["Job created and queued"]


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "no-such-model"}, 400, "model"),
        ({"model": f"{DEFAULT_MODEL_NAME}:99"}, 400, "model"),
        ({"training_file": "file-" + "y" * 24}, 404, "training_file"),
        ({"validation_file": "file-" + "y" * 24}, 404, "validation_file"),
        ({"hyperparameters": {"n_epochs": 0}}, 400, "hyperparameters.n_epochs"),
        ({"hyperparameters": {"learning_rate": 1}}, 400, None),
        ({"dp": {"epsilon": 0}}, 400, "dp.epsilon"),
        ({"dp": {"epsilon": 8, "noise": 1}}, 400, "dp.noise"),
        ({"dp": {"epsilon": 8}, "method": "full"}, 400, "dp"),
        ({"dp": 8}, 400, "dp"),
        ({"distill": {"teacher": "x"}}, 400, "distill.teacher"),
        ({"distill": {"student": {"layers": 1}}}, 400, "distill.student.layers"),
        ({"distill": {"student": {"layers": 20}}, "method": "full"}, 400, "method"),
        ({"method": {"type": "dpo"}}, 400, "training_file"),  # a chat file: not pairs
        ({"method": {"type": "reinforce"}}, 400, "method.type"),
        ({"hyperparameters": {"beta": 0.2}}, 400, "hyperparameters.beta"),  # dpo's only
        (
            {"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0}}}},
            400,
            "hyperparameters.beta",
        ),
        ({"method": {"type": "dpo", "dpo": {"epochs": 1}}}, 400, None),
        ({"suffix": "../x"}, 400, "suffix"),
        ({"unknown": 1}, 400, None),
    ],
)
async def test_bad_jobs_are_refused_naming_the_field(
    api: httpx.AsyncClient,
    published: Published,
    body: dict[str, Any],
    status: int,
    param: str | None,
) -> None:
    file_id = (await upload(api, jsonl(ROW))).json()["id"]
    full = {"model": DEFAULT_MODEL_NAME, "training_file": file_id} | body
    refused = await create(api, **full)
    assert refused.status_code == status, refused.text
    if param is not None:
        assert refused.json()["error"]["param"] == param
    assert published.sent == []
    assert (await call(api, "GET", "/v1/fine_tuning/jobs", tenant="acme")).json()["data"] == []


async def test_another_tenants_file_is_the_same_404_and_a_preference_file_is_refused(
    api: httpx.AsyncClient,
) -> None:
    theirs = (await upload(api, jsonl(ROW), tenant="globex")).json()["id"]
    refused = await create(api, model=DEFAULT_MODEL_NAME, training_file=theirs)
    unknown = await create(api, model=DEFAULT_MODEL_NAME, training_file="file-" + "z" * 24)
    assert refused.status_code == unknown.status_code == 404
    assert refused.json()["error"]["message"].startswith("no file ")
    pairs = (await upload(api, jsonl(PAIR))).json()["id"]
    wrong = await create(api, model=DEFAULT_MODEL_NAME, training_file=pairs)
    assert (wrong.status_code, wrong.json()["error"]["param"]) == (400, "training_file")
    assert "chat rows" in wrong.json()["error"]["message"]


async def test_a_dpo_job_takes_preference_pairs(api: httpx.AsyncClient) -> None:
    pairs = (await upload(api, jsonl(PAIR))).json()["id"]
    method = {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.25, "n_epochs": 2}}}
    made = await create(api, model=DEFAULT_MODEL_NAME, training_file=pairs, method=method)
    assert made.status_code == 200, made.text
    job = made.json()
    assert job["tuning"] == "dpo"
    assert job["method"] == {"type": "dpo", "dpo": {"hyperparameters": {
        "n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 1.0, "beta": 0.25,
    }}}  # fmt: skip
    defaulted = await create(api, model=DEFAULT_MODEL_NAME, training_file=pairs,
                             method={"type": "dpo"})  # fmt: skip
    assert defaulted.json()["method"]["dpo"]["hyperparameters"]["beta"] == 0.1


async def test_a_private_job_keeps_its_budget_and_needs_one_worker(
    api: httpx.AsyncClient, settings: TrainerSettings
) -> None:
    file_id = (await upload(api, jsonl(ROW))).json()["id"]
    made = await create(api, model=DEFAULT_MODEL_NAME, training_file=file_id,
                        dp={"epsilon": 4, "max_grad_norm": 0.5})  # fmt: skip
    assert made.status_code == 200, made.text
    assert made.json()["dp"] == {"epsilon": 4, "delta": None, "max_grad_norm": 0.5}
    assert made.json()["hyperparameters"] == {
        "n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 1.0,
    }  # fmt: skip
    plain = (await create(api, model=DEFAULT_MODEL_NAME, training_file=file_id)).json()
    assert plain["dp"] is None
    impossible = await create(api, model=DEFAULT_MODEL_NAME, training_file=file_id,
                              dp={"epsilon": 1e-6})  # fmt: skip
    assert (impossible.status_code, impossible.json()["error"]["param"]) == (400, "dp.epsilon")
    many = (await upload(api, jsonl(*[ROW] * 2000))).json()["id"]
    loose = await create(api, model=DEFAULT_MODEL_NAME, training_file=many,
                         dp={"epsilon": 8, "delta": 1e-3})  # fmt: skip
    assert (loose.status_code, loose.json()["error"]["param"]) == (400, "dp.delta")
    assert "below 1/n" in loose.json()["error"]["message"]
    settings.train.workers = 2
    refused = await create(api, model=DEFAULT_MODEL_NAME, training_file=file_id, dp={"epsilon": 4})
    assert (refused.status_code, refused.json()["error"]["param"]) == (400, "dp")
    assert "one worker" in refused.json()["error"]["message"]


async def test_a_distillation_job_names_its_student(api: httpx.AsyncClient) -> None:
    file_id = (await upload(api, jsonl(ROW))).json()["id"]
    made = await create(api, model=DEFAULT_MODEL_NAME, training_file=file_id,
                        distill={"student": {"layers": 20, "ffn_keep": 0.75}})  # fmt: skip
    assert made.status_code == 200, made.text
    job = made.json()
    assert job["tuning"] == "distill"
    assert job["distill"] == {"student": {"layers": 20, "ffn_keep": 0.75}}
    assert job["dp"] is None
    whole = await create(api, model=DEFAULT_MODEL_NAME, training_file=file_id,
                         distill={"student": {"layers": 30}})  # fmt: skip
    assert (whole.status_code, whole.json()["error"]["param"]) == (400, "distill.student.layers")
    assert "below the model's 30 layers" in whole.json()["error"]["message"]


async def test_cancel_a_queued_job_and_a_running_one(
    api: httpx.AsyncClient, store: TrainerStore
) -> None:
    file_id = (await upload(api, jsonl(ROW))).json()["id"]
    first = (await create(api, model=DEFAULT_MODEL_NAME, training_file=file_id)).json()
    busy = await call(api, "DELETE", f"/v1/files/{file_id}", tenant="acme")
    assert (busy.status_code, busy.json()["error"]["code"]) == (409, "file_in_use")
    cancelled = await call(api, "POST", f"/v1/fine_tuning/jobs/{first['id']}/cancel", tenant="acme")
    assert cancelled.json()["status"] == "cancelled"
    again = await call(api, "POST", f"/v1/fine_tuning/jobs/{first['id']}/cancel", tenant="acme")
    assert again.status_code == 400
    second = (await create(api, model=DEFAULT_MODEL_NAME, training_file=file_id)).json()
    claimed = await store.claim(second["id"], "runner-1", now=100, lease_until=10**12)
    assert claimed is not None
    assert claimed.status == "running"
    assert await store.claim(second["id"], "runner-2", now=100, lease_until=10**12) is None
    theirs = await call(api, "POST", f"/v1/fine_tuning/jobs/{second['id']}/cancel", tenant="globex")
    assert theirs.status_code == 404
    await call(api, "POST", f"/v1/fine_tuning/jobs/{second['id']}/cancel", tenant="acme")
    # a running job is stopped by its runner, which learns of the cancel when it renews
    assert not await store.renew(second["id"], "runner-1", 10**12, None)
    assert await store.finish(second["id"], "runner-1", "cancelled", finished_at=101)
    assert (await call(api, "DELETE", f"/v1/files/{file_id}", tenant="acme")).json()["deleted"]


async def test_a_dead_runners_job_is_taken_over(
    store: TrainerStore, api: httpx.AsyncClient
) -> None:
    file_id = (await upload(api, jsonl(ROW))).json()["id"]
    job = (await create(api, model=DEFAULT_MODEL_NAME, training_file=file_id)).json()
    assert await store.runnable(now=100) == [job["id"]]
    assert await store.claim(job["id"], "runner-1", now=100, lease_until=160) is not None
    assert await store.runnable(now=150) == []  # its lease holds
    assert await store.claim(job["id"], "runner-2", now=150, lease_until=210) is None
    assert await store.runnable(now=161) == [job["id"]]  # the lease ran out
    taken = await store.claim(job["id"], "runner-2", now=161, lease_until=221)
    assert taken is not None
    assert taken["attempts"] == 2
    assert taken["owner"] == "runner-2"
    assert not await store.renew(job["id"], "runner-1", 300, None)  # the old runner lost it
    assert not await store.finish(job["id"], "runner-1", "failed")
    assert await store.finish(job["id"], "runner-2", "succeeded", fine_tuned_model="m:v")


async def test_pages_and_bad_parameters(api: httpx.AsyncClient) -> None:
    file_id = (await upload(api, jsonl(ROW))).json()["id"]
    ids = [
        (await create(api, model=DEFAULT_MODEL_NAME, training_file=file_id)).json()["id"]
        for _ in range(3)
    ]
    first = (await call(api, "GET", "/v1/fine_tuning/jobs", tenant="acme", limit="2")).json()
    assert first["has_more"]
    assert len(first["data"]) == 2
    rest = (await call(api, "GET", "/v1/fine_tuning/jobs", tenant="acme", limit="2",
                after=first["data"][-1]["id"])).json()  # fmt: skip
    assert not rest["has_more"]
    assert sorted(j["id"] for j in first["data"] + rest["data"]) == sorted(ids)
    for params, param in [
        ({"limit": "0"}, "limit"),
        ({"limit": "²"}, "limit"),
        ({"after": "x' OR 1=1 --"}, "after"),
        ({"bogus": "1"}, None),
    ]:
        query = {"tenant": "acme"} | params
        bad = await api.get("/v1/fine_tuning/jobs", params=query, headers=GATEWAY_HEADERS)
        assert bad.status_code == 400
        assert param is None or bad.json()["error"]["param"] == param
    assert (await call(api, "GET", "/v1/fine_tuning/jobs")).json()["error"]["param"] == "tenant"
    bad_id = await call(api, "GET", "/v1/fine_tuning/jobs/ftjob-..%2F..", tenant="acme")
    assert bad_id.status_code in (400, 404)


async def test_a_job_on_a_feedback_dataset_copies_it_and_marks_it_used(
    store: TrainerStore, settings: TrainerSettings, tmp_path: Path
) -> None:
    """The trainer reads the dataset from the real feedback API (in process, as the
    trainer's identity): its own tenant's is copied and marked used by the job before the
    copy; another tenant's and an unknown one are the same 404 and mark nothing."""
    from services.feedback.api import FeedbackApi
    from services.feedback.datasets import DatasetSpec, build, manifest
    from services.feedback.service import FeedbackService
    from services.feedback.settings import FeedbackSettings
    from services.feedback.store import FeedbackStore
    from services.trainer.service import DatasetReader
    from tests.feedback.conftest import example

    feedback = await FeedbackStore(SqliteDriver(tmp_path / "feedback.sqlite")).open()
    spec = DatasetSpec("acme", "support", eval_fraction=0)
    built = build([example("r1", correction="Reset it in the portal.")], spec,
                  lambda t: (t, 0), lambda t: [])  # fmt: skip
    made = manifest(spec, built, dataset_id="support-v1", version=1, created_at="t",
                    pii_policy={})  # fmt: skip
    await feedback.add_dataset("acme", "support", 1, lambda version, erased: (made, built.rows))
    trainer_token = "t" * 64
    guard = ServiceGuard.of_tokens({"gateway": GATEWAY, "trainer": trainer_token})
    # nothing is published or joined here: the dataset is read, and marked
    service = FeedbackService(feedback, FeedbackSettings(), None, None)  # type: ignore[arg-type]
    app = FeedbackApi(service, guard).app()
    reader = DatasetReader(
        "http://feedback", {"authorization": f"Bearer {trainer_token}"},
        transport=httpx.ASGITransport(app=app),
    )  # fmt: skip
    published = Published()
    async with client_of(TrainerService(store, settings, published, reader)) as api:  # type: ignore[arg-type]
        for tenant, dataset in (("globex", "support-v1"), ("acme", "other-v1")):
            refused = await create(api, tenant, model=DEFAULT_MODEL_NAME, dataset=dataset)
            assert (refused.status_code, refused.json()["error"]["param"]) == (404, "dataset")
        assert (await feedback.dataset("acme", "support-v1") or {})["used_by"] == []
        job = (await create(api, model=DEFAULT_MODEL_NAME, dataset="support-v1")).json()
        assert job["dataset"] == "support-v1"
        assert job["validation_file"] is None  # the dataset has no eval rows
        copied = await call(api, "GET", f"/v1/files/{job['training_file']}/content",
                            tenant="acme")  # fmt: skip
        assert copied.content == "".join(line + "\n" for line in built.lines("train")).encode()
    assert (await feedback.dataset("acme", "support-v1") or {})["used_by"] == [job["id"]]
    await reader.close()
    await feedback.close()
