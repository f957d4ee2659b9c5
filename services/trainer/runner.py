"""Runs fine-tuning jobs: takes them from the store with a lease, runs each in a child
process (:mod:`services.trainer.job_process`, which runs Ray Train), follows its progress,
and registers what it made as a candidate model version.

- Jobs are found by a scan of the store every ``scan_interval_s`` and at once when
  ``training.jobs`` announces one; the store's :meth:`~TrainerStore.claim` makes sure one
  runner runs a job.
- While a job runs, the runner renews its lease every third of ``lease_s``. A renewal that
  fails means the job was cancelled (the child is stopped, the job is ``cancelled``) or
  taken over by another runner after this one stalled (the child is stopped, nothing is
  written).
- The child dies with the runner (it asks the kernel for that). A runner killed with -9
  leaves a ``running`` job whose lease runs out; the next runner takes it over and the
  child resumes from the last checkpoint. After ``train.max_attempts`` runs the job fails.
- Progress goes to the store (the job's ``progress`` and its events and checkpoints) and
  to ``training.progress``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from services.inference.model.gguf_model import ModelLoadError
from services.inference.model.quant import FOUR_BIT_TYPES
from services.inference.registry import ModelExists, ModelRegistry
from services.trainer.export import ExportError, export_gguf, load_weights
from services.trainer.jobs import (
    candidate_lineage,
    candidate_version,
    edge_note,
    learning_rate,
    privacy_note,
)
from services.trainer.service import TrainerService
from services.trainer.store import Job
from shared.bus import Publisher
from shared.events.v1 import events_pb2 as ev
from shared.logging import get_logger
from shared.topics import MODEL_CANDIDATES, TRAINING_PROGRESS

log = get_logger(__name__)
STATES = {
    "queued": ev.TRAINING_STATE_QUEUED,
    "running": ev.TRAINING_STATE_RUNNING,
    "succeeded": ev.TRAINING_STATE_SUCCEEDED,
    "failed": ev.TRAINING_STATE_FAILED,
    "cancelled": ev.TRAINING_STATE_CANCELLED,
}
STOP_GRACE_S = 30.0
PRIVATE_RESULT_KEYS = frozenset({"event", "model_dir", "adapter_dir"})  # server paths
PROGRESS_EVENT_EVERY_S = 10.0


class JobFailed(Exception):
    """The job cannot succeed (the message is the job's error)."""


class Crashed(Exception):
    """The training process died without a word (killed); the job is run again from its
    last checkpoint, up to ``train.max_attempts`` runs."""


class Released(Exception):
    """This runner no longer runs the job: it was cancelled, or another runner took it."""


class Runner:
    def __init__(
        self,
        service: TrainerService,
        publisher: Publisher,
        child_module: str = "services.trainer.job_process",
    ) -> None:
        """``child_module``: what runs a job (``python -m <it> SPEC``); tests give a stand-in."""
        self.service = service
        self.store = service.store
        self.settings = service.settings
        self.publisher = publisher
        self.registry: ModelRegistry = service.registry
        self.owner = f"{os.uname().nodename}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.running: dict[str, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._progress_noted: dict[str, float] = {}
        self._children: dict[str, asyncio.subprocess.Process] = {}
        self.child_module = child_module

    def wake(self) -> None:
        self._wake.set()

    async def on_job(self, event: ev.TrainingJob, *_: Any) -> None:
        """``training.jobs``: a job was created; look at the store now."""
        self.wake()

    async def run_forever(self) -> None:
        while True:
            try:
                await self.scan()
            except Exception:
                log.exception("job scan failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.scan_interval_s)
            self._wake.clear()

    async def scan(self) -> None:
        free = self.settings.max_running_jobs - len(self.running)
        if free <= 0:
            return
        for job_id in await self.store.runnable(int(time.time()), limit=free * 4):
            if job_id in self.running or len(self.running) >= self.settings.max_running_jobs:
                continue
            now = int(time.time())
            job = await self.store.claim(job_id, self.owner, now, now + int(self.settings.lease_s))
            if job is None:
                continue
            task = asyncio.create_task(self._run(job), name=f"job {job_id}")
            self.running[job_id] = task
            task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[None]) -> None:
        self.running = {k: t for k, t in self.running.items() if t is not task}

    async def stop(self) -> None:
        """Stop the children and give their jobs back for another runner to resume."""
        for task in list(self.running.values()):
            task.cancel()
        await asyncio.gather(*self.running.values(), return_exceptions=True)

    # ------------------------------------------------------------------ one job

    def run_dir(self, job: Job) -> Path:
        return self.settings.root() / "runs" / job.id

    async def _run(self, job: Job) -> None:
        attempt = int(job["attempts"])
        if attempt > self.settings.train.max_attempts:
            await self._fail(job, f"the job's runner died {attempt - 1} times; giving up")
            return
        note = "Job started" if attempt == 1 else f"Job resumed (run {attempt})"
        await self._event(job, note)
        await self._publish(job, "running")
        released = asyncio.Event()  # set once the job is no longer this runner's
        lease = asyncio.create_task(self._keep_lease(job, released))
        try:
            result = await self._supervise(job, released)
            files = {}
            for role in ("training_file", "validation_file"):
                row = job[role] and await self.store.file(job["tenant"], job[role])
                if row:
                    files[role] = row
            model = await asyncio.to_thread(self._register, job, result, files)
            await self._succeed(job, model, result)
        except JobFailed as error:
            await self._fail(job, str(error))
        except Released:
            await lease  # it records the cancel (or the hand-over) before the task ends
        except Crashed as error:
            await self._event(job, f"{error}; resuming from the last checkpoint", level="warn")
            await self.store.requeue(job.id, self.owner)
            self.wake()
        except asyncio.CancelledError:
            await self.store.requeue(job.id, self.owner)
            raise
        except Exception as error:
            log.exception("job failed", job=job.id)
            await self._fail(job, f"{type(error).__name__}: {error}")
        finally:
            lease.cancel()
            self._children.pop(job.id, None)

    async def _succeed(self, job: Job, model: str, result: dict[str, Any]) -> None:
        public = {k: v for k, v in result.items() if k not in PRIVATE_RESULT_KEYS}
        edge = public.get("edge")
        if isinstance(edge, dict):
            public["edge"] = {k: v for k, v in edge.items() if k != "path"}
        done = await self.store.finish(
            job.id, self.owner, "succeeded", finished_at=int(time.time()),
            fine_tuned_model=model, trained_tokens=int(result.get("tokens_seen", 0)),
            result=public,
        )  # fmt: skip
        if done:
            await self._event(job, f"Job succeeded: {model} registered as a candidate")
            if isinstance(public.get("dp"), dict):
                await self._event(job, privacy_note(public["dp"]), data=public["dp"])
            if isinstance(edge, dict):
                await self._event(job, edge_note(model, edge), data=public["edge"])
            elif skipped := (await asyncio.to_thread(self.edge_quant, job))[1]:
                await self._event(job, f"Q4_0 edge export skipped: {skipped}")
            await self._publish(job, "succeeded", fine_tuned_model=model)
            await self._announce_candidate(job, model, result)
            await self._mark_dataset(job, model)
        else:  # cancelled while it was exported: the candidate stays, unpromoted
            log.warning("job cancelled after its model was registered", job=job.id, model=model)
            await self._event(job, f"Cancelled after {model} was registered", level="warn")
        await asyncio.to_thread(self._tidy, job)

    async def _announce_candidate(self, job: Job, model: str, result: dict[str, Any]) -> None:
        """``model.candidates``: what the release gate takes up (the registry has it)."""
        name, _, version = model.partition(":")
        entry = self.registry.resolve(name, version)
        event = ev.ModelCandidate(
            model=name, version=version, base_version=job["base_version"],
            artifact_uri=entry.path.resolve().as_uri(), job_id=job.id,
        )  # fmt: skip
        for key, value in result.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                event.metrics[key] = float(value)
        try:
            await self.publisher.publish(MODEL_CANDIDATES, event, key=name, tenant=job["tenant"])
        except Exception as error:  # the registry and the job hold it; the gate can list them
            log.warning("candidate unannounced", job=job.id, error=str(error))

    async def _mark_dataset(self, job: Job, model: str) -> None:
        """Name the model on its dataset (the job is named there since it was created)."""
        datasets = self.service.datasets
        if job["dataset"] is None or datasets is None:
            return
        try:
            await datasets.mark_used(job["tenant"], job["dataset"], model)
        except Exception as error:  # the job's own mark stays; an erasure still names it
            log.warning("dataset not marked with the model", job=job.id, error=str(error))
            await self._event(job, f"{job['dataset']} not marked as used by {model}", level="warn")

    def _tidy(self, job: Job) -> None:
        """Drop what the registry now holds a copy of (the merged weights, the export) and
        the resume checkpoints; the adapter, the result and the logs stay."""
        for name in ("model", "export", "edge", "ray"):
            shutil.rmtree(self.run_dir(job) / name, ignore_errors=True)

    async def _supervise(self, job: Job, released: asyncio.Event) -> dict[str, Any]:
        """Run the child to its end; its result.

        Raises:
            JobFailed: the child reported an error, or exited without a result.
            Released: the job was cancelled, or another runner took it over.
            Crashed: the child was killed without a result, and may run again.
            asyncio.CancelledError: this runner is stopping (the job is given back).
        """
        spec_path = await asyncio.to_thread(self._write_spec, job)
        stderr = (self.run_dir(job) / "job.log").open("ab")
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-m", self.child_module, str(spec_path),
            stdout=asyncio.subprocess.PIPE, stderr=stderr, limit=2**20,
        )  # fmt: skip
        self._children[job.id] = child
        result: dict[str, Any] | None = None
        error: dict[str, Any] | None = None
        try:
            assert child.stdout is not None
            async for raw in child.stdout:
                line = _parse(raw)
                if line is None:
                    continue
                kind = line.get("event")
                if kind == "result":
                    result = line
                elif kind == "error":
                    error = line
                else:
                    await self._note_safely(job, line)
            code = await child.wait()
        except BaseException:  # a stop, or anything else: the child must not run on alone
            await _stop(child)
            raise
        finally:
            stderr.close()
        if released.is_set():
            raise Released
        runs_left = int(job["attempts"]) < self.settings.train.max_attempts
        if error is not None and error.get("cancelled") and runs_left:
            raise Crashed("the training process was stopped from outside")
        if error is not None:
            raise JobFailed(str(error.get("message") or "the training run failed")[:2000])
        if code < 0 and runs_left:
            raise Crashed(f"the training process was killed (signal {-code})")
        if code != 0 or result is None:
            raise JobFailed(f"the training process exited with code {code} without a result")
        return result

    async def _keep_lease(self, job: Job, released: asyncio.Event) -> None:
        """Renew the lease until the job ends here; when a renewal is refused (a cancel, or
        another runner took the job over), stop the child and record a cancel."""
        period = self.settings.lease_s / 3
        while True:
            await asyncio.sleep(period)
            until = int(time.time() + self.settings.lease_s)
            try:
                if not await self.store.renew(job.id, self.owner, until, None):
                    break
            except Exception as error:  # a store hiccup: the next renewal tries again
                log.warning("lease not renewed", job=job.id, error=str(error))
        released.set()
        child = self._children.get(job.id)
        current = await self.store.job(job.id)
        if current is not None and current["cancel_requested"]:
            if child is not None:
                await _stop(child)
            if await self.store.finish(
                job.id, self.owner, "cancelled", finished_at=int(time.time())
            ):
                await self._event(job, "Job cancelled")
                await self._publish(job, "cancelled")
        else:
            log.warning("job lease lost; stopping its process", job=job.id)
            if child is not None:
                await _stop(child)

    async def _note_safely(self, job: Job, line: dict[str, Any]) -> None:
        try:
            await self._note(job, line)
        except Exception as error:  # progress is advisory; the run goes on
            log.warning("progress not recorded", job=job.id, error=str(error))

    async def _note(self, job: Job, line: dict[str, Any]) -> None:
        now = int(time.time())
        if line.get("event") == "checkpoint":
            step = int(line.get("step", 0))
            metrics = {k: line[k] for k in ("loss", "valid_loss") if line.get(k) is not None}
            await self.store.add_checkpoint(job.id, step, now, metrics, str(line.get("path", "")))
            await self._event(job, f"Checkpoint at step {step}", kind="metrics", data=metrics)
            return
        if line.get("event") != "progress":
            return
        keys = ("step", "total_steps", "epoch", "loss", "tokens_per_s", "eta_s")
        progress: dict[str, Any] = {k: line.get(k) for k in keys} | {"at": now}
        until = int(time.time() + self.settings.lease_s)
        await self.store.renew(job.id, self.owner, until, progress)
        if time.monotonic() - self._progress_noted.get(job.id, 0.0) >= PROGRESS_EVENT_EVERY_S:
            self._progress_noted[job.id] = time.monotonic()
            message = f"Step {progress['step']}/{progress['total_steps']}"
            await self._event(job, message, kind="metrics", data=progress)
        await self._publish(job, "running", progress=progress)

    def _write_spec(self, job: Job) -> Path:
        run = self.run_dir(job)
        run.mkdir(parents=True, exist_ok=True, mode=0o700)
        base = self.registry.resolve(job["model"], job["base_version"])
        train = self.settings.train
        validation = job["validation_file"]
        spec = {
            "job_id": job.id, "tenant": job["tenant"], "method": job["tuning"],
            "base_gguf": str(base.path.resolve()),
            "cache_dir": str(self.settings.root() / "cache"),
            "training_file": str(self.service.file_path(job["tenant"], job["training_file"])),
            "validation_file": None if validation is None
            else str(self.service.file_path(job["tenant"], validation)),
            "hyperparameters": {
                **{k: job["hyperparameters"][k] for k in (
                    "n_epochs", "batch_size", "lora_rank", "lora_alpha", "max_length")},
                "learning_rate": learning_rate(job["tuning"], job["hyperparameters"]),
                "seed": int(job["seed"]),
                **({"beta": job["hyperparameters"]["beta"]} if job["tuning"] == "dpo" else {}),
            },
            "checkpoint_every": train.checkpoint_every, "output_dir": str(run),
            "workers": train.workers, "use_gpu": train.use_gpu, "parallel": train.parallel,
            "ray_address": train.ray_address, "edge_quant": self.edge_quant(job)[0],
            "dp": job["hyperparameters"].get("dp"),
            "distill": job["hyperparameters"].get("distill"),
        }  # fmt: skip
        path = run / "spec.json"
        path.write_text(json.dumps(spec, indent=2))
        return path

    def _register(self, job: Job, result: dict[str, Any], files: dict[str, dict[str, Any]]) -> str:
        """Export the trained model to GGUF and register it as a candidate; its name.
        ``files``: the job's files' rows (their digests go into the lineage)."""
        model_dir = Path(str(result.get("model_dir", "")))
        base = self.registry.resolve(job["model"], job["base_version"])
        version = candidate_version(job["base_version"], job["suffix"], job.id)
        out = self.run_dir(job) / "export" / f"{job['model']}-{version}.Q8_0.gguf"
        distill = result.get("distill") or {}
        try:
            export_gguf(
                load_weights(model_dir), base.path, out, name=f"{job['model']} {version}",
                layers=len(distill["layers_kept"]) if distill else None,
                ffn=distill.get("intermediate_size"),
            )  # fmt: skip
        except (ExportError, OSError) as error:
            raise JobFailed(f"the trained model could not be exported: {error}") from None
        lineage = candidate_lineage(
            job.values,
            base=base,
            files=files,
            result=result,
            train=self.settings.train.model_dump(),
        )
        try:
            entry = self.registry.register(
                job["model"], version, out, source=f"fine-tune {job.id}",
                status="candidate", lineage=lineage,
            )  # fmt: skip
        except (ModelLoadError, ModelExists, ValueError) as error:
            raise JobFailed(f"the trained model could not be registered: {error}") from None
        self._register_edge(job, result, lineage, entry.ref)
        return entry.ref

    def _register_edge(
        self, job: Job, result: dict[str, Any], lineage: dict[str, Any], source: str
    ) -> None:
        """The 4-bit file beside the candidate when it passed its check (at the run's fixed
        path, not one the child names); a failure here is noted, and fails nothing."""
        edge = result.get("edge")
        if not isinstance(edge, dict) or edge.get("quant") != "q4_0":
            return
        if not (edge.get("check") or {}).get("passed"):
            return
        name, _, version = source.partition(":")
        path = self.run_dir(job) / "edge" / "model.Q4_0.gguf"
        try:
            self.registry.register(
                name, f"{version}-q4_0", path, source=f"fine-tune {job.id} (q4_0 edge export)",
                status="candidate",
                lineage={**lineage, "quantized_from": source, "quant_check": edge["check"]},
            )  # fmt: skip
        except (ModelLoadError, ModelExists, ValueError, OSError) as error:
            log.warning("edge file unregistered", job=job.id, error=str(error))
            edge["check"] = {**edge["check"], "passed": False}
            edge["reasons"] = ["the 4-bit file could not be registered"]

    def edge_quant(self, job: Job) -> tuple[str, str | None]:
        """The 4-bit export a job's run makes, and why none when none: ``auto`` skips it
        for a base whose layers are 4-bit already (a second 4-bit rounding of them measured
        KL ~0.3 nats from the float model: it would never pass its check)."""
        chosen = self.settings.train.edge_quant
        if chosen != "auto":
            return chosen, None
        base = self.registry.resolve(job["model"], job["base_version"])
        if base.quantization.upper() in FOUR_BIT_TYPES:
            return "none", f"the base is already 4-bit ({base.quantization})"
        return "q4_0", None

    async def _fail(self, job: Job, message: str) -> None:
        error = {"code": "training_failed", "message": message, "param": None}
        if await self.store.finish(
            job.id, self.owner, "failed", finished_at=int(time.time()), error=error
        ):
            await self._event(job, f"Job failed: {message}", level="error")
            await self._publish(job, "failed", error=message)

    async def _event(
        self, job: Job, message: str, *, level: str = "info", kind: str = "message",
        data: dict[str, Any] | None = None,
    ) -> None:  # fmt: skip
        await self.store.add_event(job.id, int(time.time()), message, level=level, kind=kind,
                                   data=data)  # fmt: skip

    async def _publish(
        self, job: Job, state: str, *, progress: dict[str, Any] | None = None,
        fine_tuned_model: str = "", error: str = "",
    ) -> None:  # fmt: skip
        p = progress or {}
        event = ev.TrainingProgress(
            job_id=job.id, state=STATES[state], step=int(p.get("step") or 0),
            total_steps=int(p.get("total_steps") or 0), epoch=float(p.get("epoch") or 0),
            loss=float(p.get("loss") or 0), tokens_per_s=float(p.get("tokens_per_s") or 0),
            eta_s=float(p.get("eta_s") or 0), fine_tuned_model=fine_tuned_model,
            error=error[:2000],
        )  # fmt: skip
        try:
            await self.publisher.publish(TRAINING_PROGRESS, event, key=job.id, tenant=job["tenant"])
        except Exception as failure:  # progress is advisory; the store holds the truth
            log.warning("progress unpublished", job=job.id, error=str(failure))


def _parse(raw: bytes) -> dict[str, Any] | None:
    try:
        line = json.loads(raw)
    except ValueError:
        log.warning("the training process wrote a line that is not JSON", line=raw[:200])
        return None
    return line if isinstance(line, dict) else None


async def _stop(child: asyncio.subprocess.Process) -> None:
    """SIGTERM (the child stops Ray and exits), then SIGKILL after a grace period."""
    if child.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        child.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(child.wait(), STOP_GRACE_S)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            child.kill()
        await child.wait()
