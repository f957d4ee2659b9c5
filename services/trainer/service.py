"""The trainer's files and jobs as its API sees them: files checked and kept, jobs checked
against the registry and the tenant's files, stored, and announced on ``training.jobs`` for
the runners (:mod:`services.trainer.runner`).

A file's bytes live under ``<trainer_dir>/files/<tenant key>/<file id>.jsonl``; the tenant
key is a digest of the tenant, so no tenant name becomes a path. Each row in the store names
its tenant, and every read is by (tenant, id): another tenant's file is the same 404 as an
unknown one.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from pathlib import Path
from typing import Any

import httpx

from services.inference.model.gguf_model import read_gguf_header
from services.inference.registry import ModelRegistry, UnknownModel
from services.trainer.jobs import JobRequest, file_json, job_json, new_id
from services.trainer.settings import TrainerSettings
from services.trainer.store import Job, TrainerStore
from shared.bus import Publisher
from shared.events.v1 import events_pb2 as ev
from shared.finetune_format import FileSummary, FormatError, check_jsonl
from shared.logging import get_logger
from shared.openai_protocol import (
    ConflictError,
    NotFoundError,
    ServiceUnavailableError,
    invalid_field,
)
from shared.topics import TRAINING_JOBS
from shared.training_requests import Privacy

log = get_logger(__name__)
PURPOSES = frozenset({"fine-tune"})
MAX_FILENAME = 255


def tenant_key(tenant: str) -> str:
    return hashlib.sha256(tenant.encode()).hexdigest()[:24]


class DatasetReader:
    """A feedback dataset's splits, read from the feedback service as the trainer."""

    def __init__(
        self,
        base_url: str,
        headers: dict[str, str],
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """``transport``: how to reach the service (tests hand its app in process)."""
        self._url = base_url.rstrip("/")
        self._client = httpx.AsyncClient(timeout=120, headers=headers, transport=transport)

    async def split(self, tenant: str, dataset_id: str, split: str) -> bytes:
        """The split's JSONL.

        Raises:
            NotFoundError: no such dataset in the tenant (another tenant's too).
            ServiceUnavailableError: the feedback service did not answer.
        """
        url = f"{self._url}/v1/datasets/{dataset_id}/files/{split}"
        try:
            reply = await self._client.get(url, params={"tenant": tenant})
        except httpx.HTTPError as error:
            raise ServiceUnavailableError("the feedback service is unreachable") from error
        if reply.status_code == 404:
            raise NotFoundError(f"no dataset {dataset_id}", "dataset", "not_found")
        if reply.status_code == 410:
            raise invalid_field("dataset", "its rows were deleted under the tenant's retention")
        if reply.status_code != 200:
            raise ServiceUnavailableError(
                f"the feedback service answered {reply.status_code} for the dataset"
            )
        return reply.content

    async def mark_used(self, tenant: str, dataset_id: str, by: str) -> None:
        """Tell the feedback service that ``by`` (a job, or the model it made) holds the
        dataset's rows, so an erasure names it instead of assuming the rows are gone.

        Raises:
            NotFoundError: no such dataset in the tenant (another tenant's too).
            ServiceUnavailableError: the feedback service did not record it.
        """
        url = f"{self._url}/v1/datasets/{dataset_id}/used"
        try:
            reply = await self._client.post(url, params={"tenant": tenant, "by": by})
        except httpx.HTTPError as error:
            raise ServiceUnavailableError("the feedback service is unreachable") from error
        if reply.status_code == 404:
            raise NotFoundError(f"no dataset {dataset_id}", "dataset", "not_found")
        if reply.status_code != 200:
            raise ServiceUnavailableError(
                f"the feedback service answered {reply.status_code} marking the dataset used"
            )

    async def close(self) -> None:
        await self._client.aclose()


class TrainerService:
    def __init__(
        self,
        store: TrainerStore,
        settings: TrainerSettings,
        publisher: Publisher,
        datasets: DatasetReader | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.publisher = publisher
        self.datasets = datasets
        self.registry = ModelRegistry(settings.registry_dir())
        self.files_dir = settings.root() / "files"

    def file_path(self, tenant: str, file_id: str) -> Path:
        return self.files_dir / tenant_key(tenant) / f"{file_id}.jsonl"

    # ------------------------------------------------------------------ files

    async def add_file(
        self, tenant: str, subject: str, filename: str, purpose: str, data: bytes
    ) -> dict[str, Any]:
        """Check and keep an uploaded file; its OpenAI ``file`` object.

        Raises:
            InvalidRequestError: a purpose other than fine-tune, a bad file name, or a bad
                line (``file``; the message names the line).
        """
        if purpose not in PURPOSES:
            raise invalid_field("purpose", "must be 'fine-tune'")
        if not filename or len(filename) > MAX_FILENAME or any(c in filename for c in "\0/\\"):
            raise invalid_field("file", "needs a file name of 1-255 characters, without / or \\")
        try:
            summary = await asyncio.to_thread(
                check_jsonl, data, max_rows=self.settings.max_file_rows
            )
        except FormatError as error:
            raise invalid_field("file", str(error)) from None
        return await self._keep(tenant, subject, filename, data, summary)

    async def _keep(
        self, tenant: str, subject: str, filename: str, data: bytes, summary: FileSummary
    ) -> dict[str, Any]:
        purpose = "fine-tune"
        file_id = new_id("file-")
        path = self.file_path(tenant, file_id)
        await asyncio.to_thread(_write_private, path, data)
        row = {
            "tenant": tenant, "id": file_id, "filename": filename, "purpose": purpose,
            "bytes": len(data), "created_at": int(time.time()),
            "sha256": hashlib.sha256(data).hexdigest(), "row_count": summary.rows,
            "kind": summary.kind, "created_by": subject,
        }  # fmt: skip
        try:
            await self.store.add_file(row)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        log.info("file added", tenant=tenant, file=file_id, rows=summary.rows, kind=summary.kind)
        return file_json(row)

    async def file(self, tenant: str, file_id: str) -> dict[str, Any]:
        row = await self.store.file(tenant, file_id)
        if row is None:
            raise NotFoundError(f"no file {file_id}", "file_id", "not_found")
        return row

    async def delete_file(self, tenant: str, file_id: str) -> dict[str, Any]:
        await self.file(tenant, file_id)
        user = await self.store.delete_file(tenant, file_id)
        if user is not None:
            raise ConflictError(
                f"{file_id} is read by {user}, which has not finished; cancel it first",
                "file_id",
                "file_in_use",
            )
        self.file_path(tenant, file_id).unlink(missing_ok=True)
        return {"id": file_id, "object": "file", "deleted": True}

    # ------------------------------------------------------------------ jobs

    async def create_job(self, tenant: str, subject: str, request: JobRequest) -> dict[str, Any]:
        """Check a job against the registry and the tenant's files, store it queued and
        announce it; its ``fine_tuning.job`` object.

        Raises:
            InvalidRequestError: the base model is not registered (``model``), a file is not
                a fine-tuning file of the method's kind: chat rows, or preference pairs
                for dpo (named).
            NotFoundError: a file or dataset the tenant does not have (the same answer for
                another tenant's).
        """
        name, _, version = request.model.partition(":")
        try:
            entry = await asyncio.to_thread(self.registry.resolve, name, version or None)
        except (UnknownModel, ValueError) as error:
            raise invalid_field("model", f"not a registered model ({error})") from None
        made_by = (entry.lineage or {}).get("tenant")
        if entry.status == "candidate" and made_by != tenant:
            # another tenant's fine-tune holds that tenant's data: told as unknown
            raise invalid_field("model", f"not a registered model ({request.model})")
        await self._check_method(request, entry)
        job_id = new_id("ftjob-")
        training, validation = request.training_file, request.validation_file
        if request.dataset is not None:
            if self.datasets is None:
                raise ServiceUnavailableError("no feedback service is configured for datasets")
            await self._check_dataset_kind(tenant, request.dataset, request.tuning)
            # marked before the rows are copied here, so no erasure can miss the copy
            await self.datasets.mark_used(tenant, request.dataset, job_id)
            training, validation = await self._dataset_files(tenant, subject, request.dataset)
        rows = 0
        for param, file_id in (("training_file", training), ("validation_file", validation)):
            if file_id is None:
                continue
            row = await self.store.file(tenant, file_id)
            if row is None:
                raise NotFoundError(f"no file {file_id}", param, "not_found")
            kind = "preference" if request.tuning == "dpo" else "chat"
            if row["purpose"] != "fine-tune" or row["kind"] != kind:
                what = "preference pairs (method dpo)" if kind == "preference" else "chat rows"
                raise invalid_field(param, f"must be a fine-tune file of {what}")
            rows = rows or int(row["row_count"])
        if request.dp is not None:
            await asyncio.to_thread(_check_budget, request, rows)
        job = await self.store.add_job({
            "id": job_id, "tenant": tenant, "created_by": subject,
            "created_at": int(time.time()), "model": entry.name, "base_version": entry.version,
            "tuning": request.tuning, "training_file": training, "validation_file": validation,
            "dataset": request.dataset,
            "hyperparameters": request.hyperparameters
            | ({"dp": request.dp} if request.dp else {})
            | ({"distill": request.distill} if request.distill else {}),
            "suffix": request.suffix, "seed": request.seed, "metadata": request.metadata,
            "status": "queued",
        })  # fmt: skip
        await self.store.add_event(job_id, int(time.time()), "Job created and queued")
        await self.announce(job)
        log.info("job queued", tenant=tenant, job=job_id, model=entry.ref, tuning=request.tuning)
        return job_json(job.values)

    async def _check_method(self, request: JobRequest, entry: Any) -> None:
        """What this trainer and the base must allow for a DP-SGD or distillation job.

        Raises:
            InvalidRequestError: ``dp`` on a trainer with several workers; a student with
                as many layers as the base, or distillation on a trainer set to fsdp.
        """
        train = self.settings.train
        if request.dp is not None and train.workers != 1:
            raise invalid_field(
                "dp", f"DP-SGD runs on one worker; this trainer runs {train.workers}"
            )
        if request.distill is None:
            return
        if train.parallel != "ddp":
            raise invalid_field("distill", "distillation runs data parallel: this trainer is fsdp")
        header = await asyncio.to_thread(read_gguf_header, entry.path)
        if request.distill["layers"] >= header.config.num_layers:
            raise invalid_field(
                "distill.student.layers",
                f"must be below the model's {header.config.num_layers} layers",
            )

    async def announce(self, job: Job) -> None:
        """Wake the runners (the job is already stored: a lost wake-up only delays it until
        a runner's next scan)."""
        event = ev.TrainingJob(
            job_id=job.id, method=job["tuning"], base_model=job["model"],
            base_version=job["base_version"], dataset_id=job["dataset"] or "",
            training_file=job["training_file"] or "",
            validation_file=job["validation_file"] or "",
        )  # fmt: skip
        try:
            await self.publisher.publish(TRAINING_JOBS, event, key=job.id, tenant=job["tenant"])
        except Exception as error:  # the job runs at the next scan
            log.warning("job announcement failed", job=job.id, error=str(error))

    async def _check_dataset_kind(self, tenant: str, dataset_id: str, tuning: str) -> None:
        """A dataset of the other kind is refused before it is marked used (a refused job
        must not pin the dataset's rows against erasure)."""
        assert self.datasets is not None
        data = await self.datasets.split(tenant, dataset_id, "train")
        if not data.strip():
            return  # _dataset_files refuses it
        kind = (await asyncio.to_thread(check_jsonl, data)).kind
        wanted = "preference" if tuning == "dpo" else "chat"
        if kind != wanted:
            needs = "a dpo job needs preference pairs" if tuning == "dpo" else (
                "a supervised job needs chat rows")  # fmt: skip
            raise invalid_field("dataset", f"{dataset_id} holds {kind} rows; {needs}")

    async def _dataset_files(
        self, tenant: str, subject: str, dataset_id: str
    ) -> tuple[str, str | None]:
        """The dataset's splits as this tenant's files (train, eval or None)."""
        if self.datasets is None:
            raise ServiceUnavailableError("no feedback service is configured for datasets")
        made: list[str | None] = []
        for split in ("train", "eval"):
            data = await self.datasets.split(tenant, dataset_id, split)
            if not data.strip():
                if split == "train":
                    raise invalid_field("dataset", f"{dataset_id} has no training rows")
                made.append(None)
                continue
            summary = await asyncio.to_thread(check_jsonl, data)
            row = await self._keep(tenant, subject, f"{dataset_id}-{split}.jsonl", data, summary)
            made.append(str(row["id"]))
        assert made[0] is not None
        return made[0], made[1]

    async def job(self, tenant: str, job_id: str) -> Job:
        job = await self.store.job(job_id, tenant)
        if job is None:
            raise NotFoundError(f"no fine-tuning job {job_id}", "fine_tuning_job_id", "not_found")
        return job

    async def cancel(self, tenant: str, job_id: str) -> dict[str, Any]:
        job = await self.job(tenant, job_id)
        if job.status in ("succeeded", "failed", "cancelled"):
            raise invalid_field("fine_tuning_job_id", f"the job has already {job.status}")
        now = int(time.time())
        after = await self.store.request_cancel(tenant, job_id, now)
        assert after is not None
        message = "Job cancelled" if after.status == "cancelled" else "Cancel requested"
        await self.store.add_event(job_id, now, message)
        return job_json(after.values)


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temporary = path.with_suffix(".part")
    descriptor = os.open(temporary, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    temporary.replace(path)


def _check_budget(request: JobRequest, rows: int) -> None:
    """The noise a DP-SGD job needs exists for its rows (counted before encoding, which can
    only drop rows: the job checks again with the rows it keeps).

    Raises:
        InvalidRequestError: naming ``dp.epsilon`` or ``dp.delta``.
    """
    from services.trainer.privacy import PrivacyBudgetError, plan
    from services.trainer.sft import steps_per_epoch

    assert request.dp is not None
    batch = int(request.hyperparameters["batch_size"])
    steps = steps_per_epoch(rows, batch) * int(request.hyperparameters["n_epochs"])
    try:
        plan(Privacy.from_mapping(request.dp), rows=rows, batch_size=batch, steps=steps)
    except PrivacyBudgetError as error:
        field = "dp.delta" if str(error).startswith("dp.delta") else "dp.epsilon"
        raise invalid_field(field, str(error).removeprefix(f"{field} ")) from None
