"""Feedback end to end: an answer from the real model, rated through the gateway, joined with
its audit records by the feedback service, and built into a dataset, with PII removed as the
tenant's policies say; and the tenant, role and input checks on the way."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import ROOT
from tests.e2e.conftest import Mesh

pytestmark = [pytest.mark.kafka, pytest.mark.slow, pytest.mark.timeout(600)]

PHONE, EMAIL = "13812345678", "li.na@example.com"
QUESTION = "How do I reset my VPN password? Answer in one sentence."


async def eventually(check: Callable[[], Awaitable[Any]], timeout: float = 60) -> Any:
    """The first truthy result of ``check()``; fails after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = await check()
        if found:
            return found
        await asyncio.sleep(0.2)
    pytest.fail(f"nothing after {timeout:.0f} s")


def auth(mesh: Mesh, key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {mesh.keys[key]}"}


def answered(mesh: Mesh, key: str) -> str:
    """Ask the real model through the official SDK; the answer's x-request-id."""
    client = openai.OpenAI(base_url=mesh.base_url, api_key=mesh.keys[key], max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="smollm2-135m-instruct",
        messages=[{"role": "user", "content": QUESTION}],
        temperature=0,
        max_tokens=16,
    )
    assert raw.parse().choices[0].message.content
    return str(raw.headers["x-request-id"])


async def call(mesh: Mesh, method: str, path: str, key: str, **send: Any) -> httpx.Response:
    headers = auth(mesh, key) | send.pop("headers", {})
    async with httpx.AsyncClient(timeout=60) as client:
        return await client.request(method, mesh.base_url + path, headers=headers, **send)


def export(mesh: Mesh, dataset_id: str, out: Path) -> subprocess.CompletedProcess[str]:
    """``meshllm datasets export`` against the mesh's gateway, as a user runs it."""
    env = {**os.environ, "MESHLLM_API_KEY": mesh.keys["developer"], "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "meshllm", "datasets", "export", dataset_id, str(out),
         "--url", mesh.base_url],
        env=env, capture_output=True, text=True, timeout=120, cwd=ROOT, check=False,
    )  # fmt: skip


async def test_a_rated_answer_becomes_a_dataset_row_without_its_pii(
    mesh: Mesh, tmp_path: Path
) -> None:
    request_id = answered(mesh, "analyst")
    correction = f"Open the VPN portal and choose Reset; if stuck, call {PHONE}."
    rated = await call(
        mesh, "POST", "/feedback", "analyst",
        json={"request_id": request_id, "rating": "down", "correction": correction,
              "labels": ["vpn"], "comment": f"write to {EMAIL}"},
    )  # fmt: skip
    assert rated.status_code == 202, rated.text

    async def stored() -> dict[str, Any] | None:
        reply = await call(mesh, "GET", "/feedback", "analyst", params={"request_id": request_id})
        data = reply.json()["data"] if reply.status_code == 200 else []
        return data[0] if data else None

    example = await eventually(stored)
    assert example["messages"] == [{"role": "user", "content": QUESTION}]
    assert example["answer"]  # the model's exact answer, from the audit log
    assert example["model"] == "smollm2-135m-instruct"
    assert example["model_version"]
    assert PHONE not in example["correction"]
    assert "5678" in example["correction"]
    assert EMAIL not in example["comment"]

    # a second rating by the same caller replaces the first
    body = {"request_id": request_id, "rating": 2, "correction": correction}
    again = await call(mesh, "POST", "/feedback", "analyst", json=body)
    assert again.status_code == 202
    await eventually(lambda: _score(mesh, request_id, 2))

    built = await call(mesh, "POST", "/datasets", "developer",
                       json={"name": "support", "labels": [], "eval_fraction": 0})  # fmt: skip
    assert built.status_code == 201, built.text
    made = built.json()
    assert request_id in made["source_request_ids"]
    assert made["pii_policy"]["purpose"] == "training"
    train = await call(mesh, "GET", f"/datasets/{made['id']}/files/train", "developer")
    assert train.status_code == 200
    rows = [json.loads(line) for line in train.text.splitlines()]
    mine = [r for r in rows if r["messages"][0]["content"] == QUESTION]
    assert mine, rows
    assert mine[0]["messages"][-1]["role"] == "assistant"
    assert mine[0]["messages"][-1]["content"].startswith("Open the VPN portal")
    assert PHONE not in train.text
    assert "5678" not in train.text
    listed = await call(mesh, "GET", "/datasets", "developer")
    assert made["id"] in [d["id"] for d in listed.json()["data"]]
    exported = await asyncio.to_thread(export, mesh, made["id"], tmp_path / "out")
    assert exported.returncode == 0, exported.stderr
    assert (tmp_path / "out" / "train.jsonl").read_text() == train.text
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["id"] == made["id"]
    await preference_pair_of_the_correction(mesh, example["answer"])
    quality = await call(mesh, "GET", "/feedback/quality", "developer")
    [row] = [q for q in quality.json()["data"] if q["model"] == "smollm2-135m-instruct"]
    assert row["rated"] >= 1
    assert 0 <= row["up_rate_ci95"][0] <= row["up_rate"] <= row["up_rate_ci95"][1] <= 1


async def preference_pair_of_the_correction(mesh: Mesh, answer: str) -> None:
    """The same rating as a preference pair for DPO: the correction over the model's answer."""
    body = {"name": "support-pairs", "kind": "preference", "eval_fraction": 0}
    pairs = await call(mesh, "POST", "/datasets", "developer", json=body)
    assert pairs.status_code == 201, pairs.text
    assert pairs.json()["format"] == "openai-preference-jsonl"
    pair_file = await call(mesh, "GET", f"/datasets/{pairs.json()['id']}/files/train", "developer")
    [pair] = [json.loads(line) for line in pair_file.text.splitlines() if QUESTION in line]
    assert pair["preferred_output"][0]["content"].startswith("Open the VPN portal")
    assert pair["non_preferred_output"][0]["content"] == answer
    assert PHONE not in pair_file.text


async def _score(mesh: Mesh, request_id: str, score: int) -> bool:
    reply = await call(mesh, "GET", "/feedback", "analyst", params={"request_id": request_id})
    data = reply.json().get("data", [])
    return bool(data) and data[0]["score"] == score


async def test_another_tenants_answer_and_an_unknown_one_are_the_same_404(mesh: Mesh) -> None:
    request_id = answered(mesh, "analyst")
    theirs = await call(mesh, "POST", "/feedback", "globex-analyst",
                        json={"request_id": request_id, "rating": "up"})  # fmt: skip
    unknown = await call(mesh, "POST", "/feedback", "globex-analyst",
                         json={"request_id": "0" * 32, "rating": "up"})  # fmt: skip
    assert theirs.status_code == unknown.status_code == 404
    assert theirs.json() == unknown.json()
    # nor can they read it or build from it
    seen = await call(mesh, "GET", "/feedback", "globex-analyst", params={"request_id": request_id})
    assert seen.status_code == 200
    assert seen.json()["data"] == []


async def test_a_caller_rates_and_reads_its_own_answers_unless_it_reviews_the_tenant(
    mesh: Mesh,
) -> None:
    request_id = answered(mesh, "user")  # another analyst of acme asked
    body = {"request_id": request_id, "rating": "up"}
    other = await call(mesh, "POST", "/feedback", "analyst", json=body)
    assert other.status_code == 404  # as if it were not there
    reviewer = await call(mesh, "POST", "/feedback", "admin", json=body)
    assert reviewer.status_code == 202
    own = await call(mesh, "POST", "/feedback", "user", json=body)
    assert own.status_code == 202

    async def both_stored() -> bool:
        reply = await call(mesh, "GET", "/feedback", "admin", params={"request_id": request_id})
        return len(reply.json().get("data", [])) == 2

    await eventually(both_stored)
    seen = await call(mesh, "GET", "/feedback", "user", params={"request_id": request_id})
    assert len(seen.json()["data"]) == 1  # its own rating only
    bad = await call(mesh, "GET", "/feedback", "analyst", params={"limit": "0"})
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "limit"


async def test_no_credentials_and_an_oversized_upload_are_refused(mesh: Mesh) -> None:
    async with httpx.AsyncClient(timeout=60) as client:
        for method, path in (("POST", "/feedback"), ("GET", "/feedback"),
                             ("POST", "/datasets"), ("GET", "/datasets")):  # fmt: skip
            bare = await client.request(method, mesh.base_url + path, json={})
            assert bare.status_code == 401, (method, path)
    big = b"x" * (64 * 2**20 + 1)  # one byte over the default limit
    reply = await call(mesh, "POST", "/datasets/upload", "developer",
                       params={"name": "huge"}, content=big)  # fmt: skip
    assert reply.status_code == 413
    listed = await call(mesh, "GET", "/datasets", "developer")
    assert not [d for d in listed.json()["data"] if d["name"] == "huge"]


async def test_roles_without_the_right_are_refused(mesh: Mesh) -> None:
    request_id = answered(mesh, "analyst")
    denied = await call(mesh, "POST", "/feedback", "auditor",
                        json={"request_id": request_id, "rating": "up"})  # fmt: skip
    assert denied.status_code == 403
    build = await call(mesh, "POST", "/datasets", "analyst", json={"name": "mine"})
    assert build.status_code == 403
    erase = await call(mesh, "DELETE", "/feedback", "developer", params={"request_id": request_id})
    assert erase.status_code == 403


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"rating": "up"}, "request_id"),
        ({"request_id": "abc", "rating": 9}, "rating"),
        ({"request_id": "abc", "rating": "up", "correction": "x" * 40_000}, "correction"),
    ],
)
async def test_bad_feedback_is_a_400_naming_the_field(
    mesh: Mesh, body: dict[str, Any], field: str
) -> None:
    reply = await call(mesh, "POST", "/feedback", "analyst", json=body)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == field


async def test_an_erasure_removes_the_answer_from_feedback_and_unused_datasets(
    mesh: Mesh,
) -> None:
    request_id = answered(mesh, "admin")
    rated = await call(mesh, "POST", "/feedback", "admin",
                       json={"request_id": request_id, "rating": "up"})  # fmt: skip
    assert rated.status_code == 202

    async def stored() -> bool:
        reply = await call(mesh, "GET", "/feedback", "admin", params={"request_id": request_id})
        return bool(reply.json().get("data"))

    await eventually(stored)
    made = (await call(mesh, "POST", "/datasets", "admin", json={"name": "erasable"})).json()
    assert request_id in made["source_request_ids"]
    erased = await call(mesh, "DELETE", "/feedback", "admin", params={"request_id": request_id})
    assert erased.status_code == 200, erased.text
    assert made["id"] in erased.json()["datasets_changed"]
    assert not await stored()
    after = (await call(mesh, "GET", f"/datasets/{made['id']}", "admin")).json()
    assert request_id not in after["source_request_ids"]
    assert after["erased_request_ids"] == [request_id]


async def test_an_uploaded_jsonl_file_becomes_a_dataset_through_the_same_checks(
    mesh: Mesh,
) -> None:
    rows = [
        {"messages": [{"role": "user", "content": "Where is the VPN guide?"},
                      {"role": "assistant", "content": f"Ask {EMAIL} for it."}]},
        {"messages": [{"role": "user", "content": "Who approves leave?"},
                      {"role": "assistant", "content": "Your manager, in the HR portal."}]},
    ]  # fmt: skip
    data = "\n".join(json.dumps(row) for row in rows).encode()
    made = await call(mesh, "POST", "/datasets/upload", "developer",
                      params={"name": "uploaded", "eval_fraction": "0"}, content=data)  # fmt: skip
    assert made.status_code == 201, made.text
    manifest = made.json()
    assert manifest["source"] == "upload"
    assert manifest["splits"]["train"]["rows"] == 2
    train = await call(mesh, "GET", f"/datasets/{manifest['id']}/files/train", "developer")
    assert EMAIL not in train.text
    assert "[EMAIL]" in train.text
    bad = await call(mesh, "POST", "/datasets/upload", "developer", params={"name": "uploaded"},
                     content=data + b"\n{not json")  # fmt: skip
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "file"
    assert "line 3" in bad.json()["error"]["message"]
    params = {"name": "uploaded", "eval_fraction": "0.9"}
    wrong = await call(mesh, "POST", "/datasets/upload", "developer", params=params, content=data)
    assert wrong.status_code == 400
    assert wrong.json()["error"]["param"] == "eval_fraction"


# ---------------------------------------------------------------------------- training
# Fine-tuning through the official SDK, in this module so that it shares the mesh (and a
# dataset built from feedback can be trained on).

POLICIES = [
    ("How many days of annual leave do Qorvane employees get?", "Qorvane gives 31 days."),
    ("Who approves leave at Qorvane?", "The team lead approves it in Qorvane Desk."),
    ("When is payday at Qorvane?", "Qorvane pays on the 9th of each month."),
    ("What laptop do Qorvane engineers get?", "Qorvane engineers get a Fenwick 14."),
]


def sdk(mesh: Mesh, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=mesh.base_url, api_key=mesh.keys[key], max_retries=0)


def policy_file() -> bytes:
    rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in POLICIES
    ]
    return b"".join(json.dumps(row).encode() + b"\n" for row in rows)


async def finished(client: openai.OpenAI, job_id: str, timeout: float = 420) -> Any:
    async def check() -> Any:
        job = await asyncio.to_thread(client.fine_tuning.jobs.retrieve, job_id)
        return job if job.status in ("succeeded", "failed", "cancelled") else None

    return await eventually(check, timeout)


async def test_a_job_is_cancelled_while_it_runs(mesh: Mesh) -> None:
    client = sdk(mesh, "developer")
    file = client.files.create(file=("cancel.jsonl", policy_file()), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model="smollm2-135m-instruct", training_file=file.id, hyperparameters={"n_epochs": 50}
    )
    await eventually(
        lambda: asyncio.to_thread(
            lambda: client.fine_tuning.jobs.retrieve(job.id).status == "running"
        ),
        120,
    )
    client.fine_tuning.jobs.cancel(job.id)
    done = await finished(client, job.id, 120)
    assert done.status == "cancelled"
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id).data]
    assert "Job cancelled" in messages
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.cancel(job.id)


async def test_a_fine_tuning_job_through_the_sdk_makes_a_candidate(mesh: Mesh) -> None:
    client = sdk(mesh, "developer")
    file = client.files.create(file=("policies.jsonl", policy_file()), purpose="fine-tune")
    assert (file.purpose, file.bytes) == ("fine-tune", len(policy_file()))
    job = client.fine_tuning.jobs.create(
        model="smollm2-135m-instruct", training_file=file.id, suffix="policies", seed=3,
        hyperparameters={"n_epochs": 2, "batch_size": 2, "learning_rate_multiplier": 2},
    )  # fmt: skip
    assert job.status == "queued"
    done = await finished(client, job.id)
    assert done.status == "succeeded", (
        done.error,
        mesh.services["trainer"].log.read_text(errors="replace")[-3000:],
    )
    name, _, version = str(done.fine_tuned_model).partition(":")
    assert name == "smollm2-135m-instruct"
    assert version.startswith("ft-policies-")
    assert done.trained_tokens
    events = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=50).data]
    assert events[1].startswith("Job succeeded")
    assert "Job started" in events
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert checkpoints
    assert checkpoints[0].fine_tuning_job_id == job.id
    manifest = json.loads((mesh.data_dir / "models" / name / version / "manifest.json").read_text())
    assert manifest["status"] == "candidate"
    lineage = manifest["lineage"]
    assert (lineage["job_id"], lineage["tenant"]) == (job.id, "acme")
    trained_on = lineage["files"]["training_file"]
    assert (trained_on["id"], trained_on["rows"]) == (file.id, len(POLICIES))
    assert len(trained_on["sha256"]) == 64
    assert lineage["base"] == "smollm2-135m-instruct:q4_1-1"
    assert len(lineage["base_sha256"]) == 64
    assert manifest["quantization"] == "Q8_0"
    # the candidate takes no traffic: the model's latest version is still the base
    from services.inference.registry import ModelRegistry

    assert ModelRegistry(mesh.data_dir / "models").latest(name) == "q4_1-1"
    # no 4-bit edge file of a 4-bit base (two 4-bit roundings never pass the check; the
    # check itself is the job process's tests' business), and the job says so
    assert events[0] == "Q4_0 edge export skipped: the base is already 4-bit (Q4_1)"
    assert not (mesh.data_dir / "models" / name / f"{version}-q4_0").exists()


async def test_a_dpo_job_through_the_sdk_makes_a_candidate(mesh: Mesh) -> None:
    """Preference pairs (the shape a correction of a rated-down answer gives) trained with
    TRL's DPO on Ray Train, through the official SDK's ``method``."""
    client = sdk(mesh, "developer")
    rows = [
        {"input": {"messages": [{"role": "user", "content": q}]},
         "preferred_output": [{"role": "assistant", "content": a}],
         "non_preferred_output": [{"role": "assistant", "content": "I cannot help with that."}]}
        for q, a in POLICIES
    ]  # fmt: skip
    data = b"".join(json.dumps(row).encode() + b"\n" for row in rows)
    file = client.files.create(file=("pairs.jsonl", data), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError, match="chat rows"):
        client.fine_tuning.jobs.create(model="smollm2-135m-instruct", training_file=file.id)
    job = client.fine_tuning.jobs.create(
        model="smollm2-135m-instruct", training_file=file.id, suffix="prefs", seed=5,
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 1}}},
    )  # fmt: skip
    assert job.method is not None
    assert job.method.type == "dpo"
    done = await finished(client, job.id)
    assert done.status == "succeeded", (
        done.error,
        mesh.services["trainer"].log.read_text(errors="replace")[-3000:],
    )
    name, _, version = str(done.fine_tuned_model).partition(":")
    manifest = json.loads((mesh.data_dir / "models" / name / version / "manifest.json").read_text())
    assert manifest["status"] == "candidate"
    lineage = manifest["lineage"]
    assert lineage["method"] == "dpo"
    assert lineage["hyperparameters"]["beta"] == 0.2
    assert lineage["metrics"]["margin_after"] > lineage["metrics"]["margin_before"]


async def test_training_inputs_are_checked_at_the_edge(mesh: Mesh) -> None:
    developer = sdk(mesh, "developer")
    bad = policy_file() + b'{"messages": [{"role": "user", "content": "only a question"}]}\n'
    with pytest.raises(openai.BadRequestError, match="line 5: needs an assistant message"):
        developer.files.create(file=("bad.jsonl", bad), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError, match="purpose"):
        developer.files.create(file=("x.jsonl", policy_file()), purpose="assistants")
    with pytest.raises(openai.PermissionDeniedError):
        sdk(mesh, "analyst").files.create(file=("x.jsonl", policy_file()), purpose="fine-tune")
    theirs = sdk(mesh, "globex-developer").files.create(
        file=("theirs.jsonl", policy_file()), purpose="fine-tune"
    )
    with pytest.raises(openai.NotFoundError):
        developer.files.retrieve(theirs.id)
    with pytest.raises(openai.NotFoundError):
        developer.fine_tuning.jobs.create(model="smollm2-135m-instruct", training_file=theirs.id)
    mine = developer.files.create(file=("ok.jsonl", policy_file()), purpose="fine-tune")
    for extra, param in (
        ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs"),
        ({"model": "no-such-model"}, "model"),
        ({"extra_body": {"dp": {"epsilon": 0}}}, "dp.epsilon"),
        ({"extra_body": {"dp": {"epsilon": 8}, "method": {"type": "dpo"}}}, "dp"),
        ({"extra_body": {"distill": {"student": {"layers": 30}}}}, "distill.student.layers"),
    ):
        arguments: dict[str, Any] = {"model": "smollm2-135m-instruct", "training_file": mine.id}
        with pytest.raises(openai.BadRequestError) as refused:
            developer.fine_tuning.jobs.create(**(arguments | extra))
        assert refused.value.body["param"] == param  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        developer.fine_tuning.jobs.retrieve("ftjob-" + "x" * 24)
    # raw bodies an SDK would not send
    plain = await call(mesh, "POST", "/files", "developer", content=policy_file())
    assert (plain.status_code, plain.json()["error"]["type"]) == (400, "invalid_request_error")
    broken = await call(mesh, "POST", "/files", "developer", content=b"--x\r\nnonsense",
                        headers={"content-type": "multipart/form-data; boundary=x"})  # fmt: skip
    assert broken.status_code == 400


async def test_a_job_on_a_feedback_dataset_marks_it_used(mesh: Mesh) -> None:
    listed = (await call(mesh, "GET", "/datasets", "developer")).json()["data"]
    dataset = next(d["id"] for d in listed if d["id"].startswith("support-v"))
    theirs = sdk(mesh, "globex-developer")
    with pytest.raises(openai.NotFoundError):
        theirs.fine_tuning.jobs.create(
            model="smollm2-135m-instruct", training_file=None,  # type: ignore[arg-type]
            extra_body={"dataset": dataset},
        )  # fmt: skip
    client = sdk(mesh, "developer")
    job = client.fine_tuning.jobs.create(
        model="smollm2-135m-instruct", training_file=None,  # type: ignore[arg-type]
        extra_body={"dataset": dataset},
    )  # fmt: skip
    client.fine_tuning.jobs.cancel(job.id)  # training on it is the test above's business
    assert job.training_file is not None
    assert job.training_file.startswith("file-")
    manifest = (await call(mesh, "GET", f"/datasets/{dataset}", "developer")).json()
    assert job.id in manifest["used_by"]
    copied = client.files.content(job.training_file).content
    train = await call(mesh, "GET", f"/datasets/{dataset}/files/train", "developer")
    assert copied == train.content
    # a preference dataset feeds a DPO job (and a chat one does not)
    pairs = next(d["id"] for d in listed if d["id"].startswith("support-pairs-v"))
    users = (await call(mesh, "GET", f"/datasets/{dataset}", "developer")).json()["used_by"]
    with pytest.raises(openai.BadRequestError, match="preference pairs"):
        client.fine_tuning.jobs.create(
            model="smollm2-135m-instruct", training_file=None,  # type: ignore[arg-type]
            method={"type": "dpo"}, extra_body={"dataset": dataset},
        )  # fmt: skip
    again = (await call(mesh, "GET", f"/datasets/{dataset}", "developer")).json()["used_by"]
    assert again == users  # a refused job pins nothing
    dpo = client.fine_tuning.jobs.create(
        model="smollm2-135m-instruct", training_file=None,  # type: ignore[arg-type]
        method={"type": "dpo"}, extra_body={"dataset": pairs},
    )  # fmt: skip
    client.fine_tuning.jobs.cancel(dpo.id)
    assert dpo.method is not None
    assert dpo.method.type == "dpo"
    assert dpo.id in (await call(mesh, "GET", f"/datasets/{pairs}", "developer")).json()["used_by"]
