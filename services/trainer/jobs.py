"""Fine-tuning jobs: the states a job moves through, and the OpenAI shapes of jobs, events,
checkpoints and files. No I/O. (The create body is checked by
:mod:`shared.training_requests`.)

States::

    queued -> running -> succeeded | failed | cancelled
    queued -> cancelled
    running -> queued     (its runner died; taken over from the last checkpoint)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from shared.training_requests import (
    BASE_LEARNING_RATE,
    FILE_ID,
    JOB_ID,
    JobRequest,
    new_id,
    parse_job_request,
)

__all__ = ["FILE_ID", "JOB_ID", "JobRequest", "new_id", "parse_job_request"]


def learning_rate(tuning: str, hyperparameters: Mapping[str, Any]) -> float:
    """The optimiser's learning rate: the method's base rate times the multiplier."""
    return BASE_LEARNING_RATE[tuning] * float(hyperparameters["learning_rate_multiplier"])


def candidate_version(base_version: str, suffix: str | None, job_id: str) -> str:
    """The registry version a job's model gets: ``ft-<suffix>-<job tail>`` under the base
    model's name, so the lineage reads off the name and two jobs never collide."""
    tail = job_id.removeprefix("ftjob-")[:12].lower()
    return "-".join(part for part in ("ft", suffix, tail) if part)[:128]


def edge_note(model: str, edge: Mapping[str, Any]) -> str:
    """The job event that tells what became of the 4-bit edge export of ``model``."""
    quant = str(edge.get("quant", "")).upper()
    if edge.get("error"):
        return f"{quant} edge export failed: {edge['error']}"
    check = edge.get("check") or {}
    measured = f"KL {check.get('kl', 0):.4f} nats, top-1 {check.get('top1', 0):.1%}"
    if check.get("passed"):
        return f"{quant} edge export passed its check ({measured}): {model}-{edge['quant']}"
    return f"{quant} edge export not kept: {'; '.join(edge.get('reasons') or [measured])}"


# What a DP-SGD candidate's lineage may say about the run: nothing computed on the rows
# without noise (losses, token counts, timings), and not the job's seed.
PRIVATE_RUN_METRICS = ("steps", "epochs", "trainable_parameters")


def candidate_lineage(
    job: Mapping[str, Any], *, base: Any, files: Mapping[str, Mapping[str, Any]],
    result: Mapping[str, Any], train: Mapping[str, Any],
) -> dict[str, Any]:  # fmt: skip
    """What a candidate was made from and how (the registry's lineage, shown on its card).

    A DP-SGD job's lineage leaves out what is not covered by its guarantee: metrics computed
    on the rows (they stay in the job's result, which only its tenant reads), the files'
    digests and row counts (a digest lets anyone test a guessed data set), and the seed.
    """
    private = result.get("dp") is not None
    metrics = {k: v for k, v in result.items()
               if isinstance(v, int | float) and not isinstance(v, bool)}  # fmt: skip
    if private:
        metrics = {k: v for k, v in metrics.items() if k in PRIVATE_RUN_METRICS}
    return {
        "job_id": job["id"], "tenant": job["tenant"], "created_by": job["created_by"],
        "base": base.ref, "base_sha256": base.sha256, "dataset": job["dataset"],
        "files": {
            role: {"id": row["id"]} if private
            else {"id": row["id"], "sha256": row["sha256"], "rows": row["row_count"]}
            for role, row in files.items()
        },
        "method": job["tuning"], "hyperparameters": job["hyperparameters"],
        "learning_rate": learning_rate(job["tuning"], job["hyperparameters"]),
        "seed": None if private else job["seed"], "train": dict(train),
        "metrics": metrics,
        # loss_before/after are over held-out rows only when this says "validation"
        "held_out_source": None if private else result.get("held_out_source"),
        "training_counts": None if private else result.get("training_counts"),
        # DP-SGD: the noise used and the epsilon the accountant gives for the steps taken
        "dp": result.get("dp"),
        # distillation: what was cut from the teacher, the student's KL before and after
        "distill": result.get("distill"),
    }  # fmt: skip


def privacy_note(dp: Mapping[str, Any]) -> str:
    """The job event that states what a DP-SGD run spent."""
    return (
        f"Differential privacy: epsilon {dp['epsilon_spent']:.3f} spent at delta "
        f"{dp['delta']:.3g} (target {dp['epsilon']:g}; noise multiplier "
        f"{dp['noise_multiplier']:.4f}, {dp['steps_taken']} steps at sample rate "
        f"{dp['sample_rate']:.4f}, {dp['accountant']} accountant)"
    )


def file_json(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "object": "file",
        "bytes": row["bytes"],
        "created_at": row["created_at"],
        "filename": row["filename"],
        "purpose": row["purpose"],
        "status": "processed",
        "status_details": None,
        "expires_at": None,
        "rows": row["row_count"],
        "kind": row["kind"],
        "sha256": row["sha256"],
    }


def _method(tuning: str, openai_hyper: dict[str, Any], hyper: Mapping[str, Any]) -> dict[str, Any]:
    if tuning == "dpo":
        return {"type": "dpo", "dpo": {"hyperparameters": {**openai_hyper, "beta": hyper["beta"]}}}
    return {"type": "supervised", "supervised": {"hyperparameters": openai_hyper}}


def _privacy(asked: Mapping[str, Any] | None, result: Mapping[str, Any] | None) -> Any:
    """A DP-SGD job's settings and, once it ran, the noise used and the epsilon spent."""
    if asked is None:
        return None
    ran = (result or {}).get("dp") or {}
    keys = ("delta", "noise_multiplier", "sample_rate", "steps_taken", "epsilon_spent")
    return dict(asked) | {k: ran[k] for k in keys if k in ran}


def _distill(asked: Mapping[str, Any] | None, result: Mapping[str, Any] | None) -> Any:
    """A distillation job's student and, once it ran, what was kept and its KL to the
    teacher before and after."""
    if asked is None:
        return None
    ran = (result or {}).get("distill") or {}
    keys = ("layers_kept", "intermediate_size", "kl_before", "kl_after", "student_parameters",
            "teacher_parameters")  # fmt: skip
    return {"student": dict(asked)} | {k: ran[k] for k in keys if k in ran}


def job_json(job: Mapping[str, Any]) -> dict[str, Any]:
    """A job row as OpenAI's ``fine_tuning.job`` (with our extensions beside its fields)."""
    hyper = dict(job["hyperparameters"])
    openai_hyper = {
        "n_epochs": hyper["n_epochs"],
        "batch_size": hyper["batch_size"],
        "learning_rate_multiplier": hyper["learning_rate_multiplier"],
    }
    progress = job["progress"] or {}
    estimated = None
    if job["status"] == "running" and progress.get("eta_s") is not None:
        estimated = int(progress.get("at", 0) + progress["eta_s"])
    return {
        "id": job["id"],
        "object": "fine_tuning.job",
        "created_at": job["created_at"],
        "error": job["error"],
        "fine_tuned_model": job["fine_tuned_model"],
        "finished_at": job["finished_at"],
        "hyperparameters": openai_hyper,
        "model": job["model"],
        "organization_id": job["tenant"],
        "result_files": [],
        "seed": job["seed"],
        "status": job["status"],
        "trained_tokens": job["trained_tokens"],
        "training_file": job["training_file"],
        "validation_file": job["validation_file"],
        "estimated_finish": estimated,
        "integrations": None,
        "metadata": job["metadata"] or None,
        "user_provided_suffix": job["suffix"],
        "method": _method(job["tuning"], openai_hyper, hyper),
        # ours
        "tuning": job["tuning"],
        "base_version": job["base_version"],
        "dataset": job["dataset"],
        "lora": {k: hyper[k] for k in ("lora_rank", "lora_alpha")},
        "max_length": hyper["max_length"],
        "dp": _privacy(hyper.get("dp"), job["result"]),
        "distill": _distill(hyper.get("distill"), job["result"]),
        "progress": progress or None,
        "attempts": job["attempts"],
        "result": job["result"],
    }


def event_json(job_id: str, event: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "id": f"ftevent-{job_id.removeprefix('ftjob-')}-{event['seq']}",
        "object": "fine_tuning.job.event",
        "created_at": event["created_at"],
        "level": event["level"],
        "message": event["message"],
        "data": event["data"],
        "type": event["type"],
    }


def checkpoint_json(job: Mapping[str, Any], checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    metrics = dict(checkpoint["metrics"])
    step = checkpoint["step"]
    return {
        "id": f"ftckpt-{job['id'].removeprefix('ftjob-')}-{step}",
        "object": "fine_tuning.job.checkpoint",
        "created_at": checkpoint["created_at"],
        "fine_tuned_model_checkpoint": None,  # a resume point, not a servable model
        "fine_tuning_job_id": job["id"],
        "metrics": {"step": step, **metrics},
        "step_number": step,
    }
