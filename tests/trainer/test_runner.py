"""The runner's side of a job's life, with a stand-in for the training process (it speaks
the same protocol; the real one is run by tests/trainer/test_job_process.py and end to end
in tests/e2e/test_feedback.py): a cancel stops the run, a lost lease stops it and writes
nothing, a killed process is run again up to the attempts allowed, an error fails the job,
and a runner that stops gives its job back."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from services.inference.model.gguf_model import smollm2_path
from services.inference.registry import ModelRegistry
from services.inference.settings import DEFAULT_MODEL_NAME, DEFAULT_MODEL_VERSION
from services.trainer.jobs import job_json
from services.trainer.runner import Runner
from services.trainer.service import TrainerService
from services.trainer.settings import TrainerSettings, TrainSettings
from services.trainer.store import TrainerStore
from shared.sqldb import SqliteDriver
from shared.topics import TRAINING_PROGRESS
from shared.training_requests import parse_job_request

ROW = b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n'
STAND_IN = "tests.trainer.stand_in_job"


class Published:
    def __init__(self) -> None:
        self.sent: list[tuple[str, Any]] = []

    async def publish(self, topic: Any, event: Any, *, key: str, tenant: str) -> None:
        self.sent.append((topic.name, event))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("models")
    ModelRegistry(path).register(
        DEFAULT_MODEL_NAME, DEFAULT_MODEL_VERSION, smollm2_path(), copy=False
    )
    return path


@pytest.fixture
async def service(tmp_path: Path, models: Path) -> AsyncIterator[TrainerService]:
    store = await TrainerStore(SqliteDriver(tmp_path / "t.sqlite")).open()
    settings = TrainerSettings(
        trainer_dir=tmp_path / "trainer", model_dir=models, lease_s=5, scan_interval_s=0.2,
        train=TrainSettings(max_attempts=2),
    )  # fmt: skip
    yield TrainerService(store, settings, Published())  # type: ignore[arg-type]
    await store.close()


async def until(check: Callable[[], Awaitable[Any]], timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = await check()
        if found:
            return found
        await asyncio.sleep(0.1)
    pytest.fail(f"not within {timeout} s")


async def start_job(service: TrainerService, runner: Runner) -> str:
    made = await service.add_file("acme", "dev", "t.jsonl", "fine-tune", ROW)
    body = {"model": DEFAULT_MODEL_NAME, "training_file": made["id"]}
    job = await service.create_job("acme", "dev", parse_job_request(body))
    await runner.scan()
    return str(job["id"])


async def status(service: TrainerService, job_id: str) -> str:
    job = await service.store.job(job_id)
    assert job is not None
    return job.status


def child_pid(service: TrainerService, job_id: str) -> int:
    return int((service.settings.root() / "runs" / job_id / "stand-in.pid").read_text())


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with contextlib.suppress(ChildProcessError):
        return os.waitpid(pid, os.WNOHANG)[0] == pid
    return False


async def test_a_cancel_stops_the_running_process(
    service: TrainerService, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STAND_IN_MODE", "hang")
    runner = Runner(service, service.publisher, child_module=STAND_IN)
    job_id = await start_job(service, runner)
    job = await until(lambda: _with_progress(service, job_id))
    assert job["progress"]["step"] == 1
    assert job["status"] == "running"
    pid = child_pid(service, job_id)
    await service.cancel("acme", job_id)
    assert await status(service, job_id) == "running"  # its runner stops it
    await until(lambda: _is(service, job_id, "cancelled"), timeout=15)
    await until(lambda: _true(gone(pid)), timeout=10)
    events = [e["message"] for e in await service.store.events(job_id, 20)]
    assert events[0] == "Job cancelled"
    states = [e.state for name, e in service.publisher.sent if name == TRAINING_PROGRESS.name]  # type: ignore[attr-defined]
    assert states[-1] == 5  # TRAINING_STATE_CANCELLED
    await runner.stop()


async def test_a_lost_lease_stops_the_process_and_writes_nothing(
    service: TrainerService, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STAND_IN_MODE", "hang")
    runner = Runner(service, service.publisher, child_module=STAND_IN)
    job_id = await start_job(service, runner)
    await until(lambda: _with_progress(service, job_id))
    pid = child_pid(service, job_id)
    # another runner took the job over (this one looked stalled to it)
    await service.store.driver.execute("UPDATE jobs SET owner = 'other' WHERE id = ?", (job_id,))
    await until(lambda: _true(gone(pid)), timeout=15)
    await until(lambda: _true(not runner.running))
    job = await service.store.job(job_id)
    assert job is not None
    assert (job.status, job["owner"]) == ("running", "other")  # the other runner's to finish


async def test_a_killed_process_runs_again_then_the_job_fails(
    service: TrainerService, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STAND_IN_MODE", "die")
    runner = Runner(service, service.publisher, child_module=STAND_IN)
    job_id = await start_job(service, runner)
    await until(lambda: _is(service, job_id, "queued"))  # given back after the first kill
    messages = [e["message"] for e in await service.store.events(job_id, 20)]
    assert "killed (signal 9); resuming from the last checkpoint" in messages[0]
    await runner.scan()  # the second run (max_attempts=2) is the last
    job = await until(lambda: _final(service, job_id))
    assert job.status == "failed"
    assert job["attempts"] == 2
    assert "exited with code -9" in job["error"]["message"]


async def test_an_error_fails_the_job_with_its_message(
    service: TrainerService, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STAND_IN_MODE", "fail")
    runner = Runner(service, service.publisher, child_module=STAND_IN)
    job_id = await start_job(service, runner)
    job = await until(lambda: _final(service, job_id))
    assert job.status == "failed"
    assert job["error"]["message"] == "ValueError: no training row keeps a token"


async def test_a_stopping_runner_gives_its_job_back_and_a_cancel_then_ends_it(
    service: TrainerService, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STAND_IN_MODE", "hang")
    runner = Runner(service, service.publisher, child_module=STAND_IN)
    job_id = await start_job(service, runner)
    await until(lambda: _with_progress(service, job_id))
    pid = child_pid(service, job_id)
    await runner.stop()
    assert gone(pid)
    assert await status(service, job_id) == "queued"
    # a cancel asked while no runner holds it is not lost: the next scan ends it
    await service.store.driver.execute("UPDATE jobs SET status = 'running' WHERE id = ?", (job_id,))
    await service.store.request_cancel("acme", job_id, int(time.time()))
    assert await service.store.runnable(int(time.time()) + 10) == []
    assert await status(service, job_id) == "cancelled"


async def _with_progress(service: TrainerService, job_id: str) -> Any:
    job = await service.store.job(job_id)
    return job if job is not None and job["progress"] else None


async def _is(service: TrainerService, job_id: str, state: str) -> bool:
    return await status(service, job_id) == state


async def _final(service: TrainerService, job_id: str) -> Any:
    job = await service.store.job(job_id)
    return job if job is not None and job.status in ("succeeded", "failed", "cancelled") else None


async def _true(value: bool) -> bool:
    return value


async def test_a_passed_edge_file_is_registered_beside_the_candidate_and_nothing_else_is(
    service: TrainerService, tmp_path: Path
) -> None:
    """The runner's side of the 4-bit export: only a file whose check passed, at the run's
    own path (not one the child names), becomes a second candidate; a registration that
    fails is recorded on the verdict and fails nothing."""
    import shutil

    runner = Runner(service, service.publisher, child_module=STAND_IN)
    made = await service.add_file("acme", "dev", "t.jsonl", "fine-tune", ROW)
    body = {"model": DEFAULT_MODEL_NAME, "training_file": made["id"]}
    job_id = (await service.create_job("acme", "dev", parse_job_request(body)))["id"]
    job = await service.store.job(job_id)
    assert job is not None
    source = f"{DEFAULT_MODEL_NAME}:ft-x"
    lineage = {"job_id": job_id, "tenant": "acme"}
    check = {"kl": 0.01, "top1": 0.95, "passed": True}
    registry = service.registry

    # no file at the run's path: noted, nothing registered, nothing raised
    missing: dict[str, Any] = {
        "edge": {"quant": "q4_0", "check": dict(check), "path": str(tmp_path / "x")}
    }
    runner._register_edge(job, missing, lineage, source)
    assert missing["edge"]["check"]["passed"] is False
    assert missing["edge"]["reasons"] == ["the 4-bit file could not be registered"]

    edge_dir = runner.run_dir(job) / "edge"
    edge_dir.mkdir(parents=True)
    shutil.copy(smollm2_path(), edge_dir / "model.Q4_0.gguf")
    for result in (
        {"edge": {"quant": "q4_0", "check": {**check, "passed": False}}},
        {"edge": {"quant": "q8_0", "check": dict(check)}},
        {},
    ):
        runner._register_edge(job, result, lineage, source)
        assert "ft-x-q4_0" not in registry.versions(DEFAULT_MODEL_NAME)
    runner._register_edge(job, {"edge": {"quant": "q4_0", "check": check}}, lineage, source)
    entry = registry.resolve(DEFAULT_MODEL_NAME, "ft-x-q4_0")
    assert entry.status == "candidate"
    assert entry.lineage is not None
    assert (entry.lineage["quantized_from"], entry.lineage["quant_check"]) == (source, check)
    assert registry.latest(DEFAULT_MODEL_NAME) == DEFAULT_MODEL_VERSION  # no traffic


async def test_auto_skips_the_edge_export_of_a_four_bit_base(service: TrainerService) -> None:
    runner = Runner(service, service.publisher, child_module=STAND_IN)
    made = await service.add_file("acme", "dev", "t.jsonl", "fine-tune", ROW)
    body = {"model": DEFAULT_MODEL_NAME, "training_file": made["id"]}
    job_id = (await service.create_job("acme", "dev", parse_job_request(body)))["id"]
    job = await service.store.job(job_id)
    assert job is not None
    assert runner.edge_quant(job) == ("none", "the base is already 4-bit (Q4_1)")
    forced = runner.settings.train.model_copy(update={"edge_quant": "q4_0"})
    runner.settings = runner.settings.model_copy(update={"train": forced})
    assert runner.edge_quant(job) == ("q4_0", None)


async def test_a_private_job_passes_its_budget_to_the_run_and_states_what_it_spent(
    service: TrainerService,
) -> None:
    runner = Runner(service, service.publisher, child_module=STAND_IN)
    made = await service.add_file("acme", "dev", "t.jsonl", "fine-tune", ROW)
    body = {"model": DEFAULT_MODEL_NAME, "training_file": made["id"], "dp": {"epsilon": 3}}
    job_id = (await service.create_job("acme", "dev", parse_job_request(body)))["id"]
    job = await service.store.claim(job_id, runner.owner, now=100, lease_until=10**12)
    assert job is not None
    spec = json.loads(runner._write_spec(job).read_text())
    assert spec["dp"] == {"epsilon": 3, "delta": None, "max_grad_norm": 1.0}
    assert "dp" not in spec["hyperparameters"]
    spent = {
        "epsilon": 3, "delta": 0.5, "max_grad_norm": 1.0, "sample_rate": 1.0, "steps": 3,
        "noise_multiplier": 2.5, "accountant": "prv", "steps_taken": 3, "epsilon_spent": 2.98,
    }  # fmt: skip
    service.registry.register(
        DEFAULT_MODEL_NAME, "ft-dp", smollm2_path(), copy=False, status="candidate"
    )
    await runner._succeed(job, f"{DEFAULT_MODEL_NAME}:ft-dp", {"tokens_seen": 10, "dp": spent})
    shown = job_json((await service.job("acme", job_id)).values)["dp"]
    assert shown == {"epsilon": 3, "max_grad_norm": 1.0} | {
        k: spent[k] for k in ("delta", "noise_multiplier", "sample_rate", "steps_taken",
                              "epsilon_spent")
    }  # fmt: skip
    events = [e["message"] for e in await service.store.events(job_id, 20)]
    assert any(
        m.startswith("Differential privacy: epsilon 2.980 spent at delta 0.5") for m in events
    )


def test_the_registry_writes_a_card_beside_each_version(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path)
    lineage = {"base": "smollm2:q4_1", "method": "lora", "dp": {
        "epsilon": 8, "delta": 0.01, "max_grad_norm": 1.0, "sample_rate": 0.1, "steps": 30,
        "noise_multiplier": 0.9, "accountant": "prv", "steps_taken": 30, "epsilon_spent": 7.9,
    }}  # fmt: skip
    entry = registry.register("m", "1", smollm2_path(), copy=False, lineage=lineage)
    card = (entry.directory / "MODEL_CARD.md").read_text()
    assert card.startswith("# m:1\n")
    assert "(7.900, 0.01)-differentially private" in card


def test_a_private_candidates_lineage_keeps_only_what_the_guarantee_covers() -> None:
    from types import SimpleNamespace

    from services.trainer.jobs import candidate_lineage

    job = {"id": "ftjob-x", "tenant": "acme", "created_by": "alice", "dataset": None,
           "tuning": "lora", "hyperparameters": {"learning_rate_multiplier": 1.0},
           "seed": 42}  # fmt: skip
    base = SimpleNamespace(ref="m:1", sha256="ab" * 32)
    result = {"steps": 9, "epochs": 3, "loss_before": 2.0, "loss_after": 0.4,
              "tokens_seen": 999, "train_seconds": 5.0, "held_out_source": "training",
              "training_counts": {"rows": 12}, "trainable_parameters": 7}  # fmt: skip
    files = {"training_file": {"id": "file-x", "sha256": "cd" * 32, "row_count": 12}}
    plain = candidate_lineage(job, base=base, files=files, result=result, train={})
    assert plain["seed"] == 42
    assert plain["files"]["training_file"]["rows"] == 12
    assert plain["metrics"]["loss_after"] == 0.4
    private = candidate_lineage(
        job, base=base, files=files, result={**result, "dp": {"epsilon_spent": 7.9}}, train={}
    )
    assert private["files"] == {"training_file": {"id": "file-x"}}  # no digest, no count
    assert private["seed"] is None
    assert private["metrics"] == {"steps": 9, "epochs": 3, "trainable_parameters": 7}
    assert private["training_counts"] is None
    assert private["held_out_source"] is None
    assert private["dp"] == {"epsilon_spent": 7.9}
