"""``meshllm train start|follow|list|show|cancel``: fine-tuning jobs through the gateway's
OpenAI-compatible API (the caller's key decides what it may train and read).

``start`` uploads a chat JSONL file (or names a feedback dataset), creates the job and
follows it with a progress bar; when it ends, the loss curve is drawn into a PNG.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from meshllm.datasets_cli import Url, _call, console, errors

train_app = typer.Typer(
    help="Fine-tuning jobs (LoRA, DPO, DP-SGD on Ray Train).", no_args_is_help=True
)
FINAL = ("succeeded", "failed", "cancelled")


@train_app.command("start")
def start(
    file: Annotated[
        Path | None, typer.Argument(exists=True, dir_okay=False, help="Chat JSONL to train on.")
    ] = None,
    *,
    dataset: Annotated[str | None, typer.Option(help="A feedback dataset id instead.")] = None,
    model: Annotated[str, typer.Option(help="The base model (name or name:version).")] = (
        "smollm2-135m-instruct"
    ),
    epochs: Annotated[int | None, typer.Option(min=1, max=50)] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, max=256)] = None,
    learning_rate_multiplier: Annotated[float | None, typer.Option(min=0.0, max=10.0)] = None,
    suffix: Annotated[str | None, typer.Option(help="Part of the candidate's version.")] = None,
    method: Annotated[
        str, typer.Option(help="lora, full, or dpo (a file of preference pairs).")
    ] = ("lora"),
    beta: Annotated[float | None, typer.Option(min=0.0, max=10.0, help="dpo's beta.")] = None,
    dp_epsilon: Annotated[
        float | None, typer.Option(help="Train with DP-SGD, spending at most this epsilon.")
    ] = None,
    dp_delta: Annotated[
        float | None, typer.Option(help="DP-SGD's delta (default min(1e-5, 1/(10 n))).")
    ] = None,
    dp_max_grad_norm: Annotated[
        float | None, typer.Option(help="DP-SGD's per-example clipping norm (default 1).")
    ] = None,
    distill_layers: Annotated[
        int | None, typer.Option(help="Distil into a student of this many layers.")
    ] = None,
    distill_ffn_keep: Annotated[
        float | None, typer.Option(help="The share of feed-forward channels it keeps.")
    ] = None,
    wait: Annotated[bool, typer.Option(help="Follow the job until it ends.")] = True,
    plot: Annotated[Path, typer.Option(help="Where the loss curve goes.")] = Path("loss.png"),
    url: Url = None,
) -> None:
    """Fine-tune a model on a file or a dataset; prints the job's id."""
    if (file is None) == (dataset is None):
        errors.print("[red]give a JSONL file or --dataset (one of them)[/red]")
        raise typer.Exit(2)
    body: dict[str, Any] = {
        "model": model,
        "method": {"type": "dpo"} if method == "dpo" else method,
    }
    if file is not None:
        with console.status(f"uploading {file.name}"):
            files = {"file": (file.name, file.read_bytes())}
            made = _call(url, "POST", "/files", files=files, data={"purpose": "fine-tune"}).json()
        console.print(f"{made['id']}: {made['rows']} rows ({made['kind']})")
        body["training_file"] = made["id"]
    else:
        body["dataset"] = dataset
    hyper = {"n_epochs": epochs, "batch_size": batch_size,
             "learning_rate_multiplier": learning_rate_multiplier, "beta": beta}  # fmt: skip
    body["hyperparameters"] = {k: v for k, v in hyper.items() if v is not None}
    if suffix is not None:
        body["suffix"] = suffix
    if dp_epsilon is not None:
        dp = {"epsilon": dp_epsilon, "delta": dp_delta, "max_grad_norm": dp_max_grad_norm}
        body["dp"] = {k: v for k, v in dp.items() if v is not None}
    elif dp_delta is not None or dp_max_grad_norm is not None:
        errors.print("[red]--dp-delta and --dp-max-grad-norm need --dp-epsilon[/red]")
        raise typer.Exit(2)
    if distill_layers is not None:
        student: dict[str, Any] = {"layers": distill_layers}
        if distill_ffn_keep is not None:
            student["ffn_keep"] = distill_ffn_keep
        body["distill"] = {"student": student}
        del body["method"]  # a distillation job has its own
    elif distill_ffn_keep is not None:
        errors.print("[red]--distill-ffn-keep needs --distill-layers[/red]")
        raise typer.Exit(2)
    job = _call(url, "POST", "/fine_tuning/jobs", json=body).json()
    console.print(f"[bold]{job['id']}[/bold] {job['status']}")
    if wait:
        _follow(job["id"], plot, url)


@train_app.command("follow")
def follow(
    job_id: Annotated[str, typer.Argument()],
    plot: Annotated[Path, typer.Option(help="Where the loss curve goes.")] = Path("loss.png"),
    url: Url = None,
) -> None:
    """Follow a job with a progress bar until it ends; then draw its loss curve."""
    _follow(job_id, plot, url)


def _follow(job_id: str, plot: Path, url: str | None) -> None:
    seen: dict[int, float] = {}
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
               TimeRemainingColumn())  # fmt: skip
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(job_id, total=None, info="queued")
        while True:
            job = _call(url, "GET", f"/fine_tuning/jobs/{job_id}").json()
            progress = job.get("progress") or {}
            if progress.get("step") is not None and progress.get("loss") is not None:
                seen[int(progress["step"])] = float(progress["loss"])
                info = (
                    f"step {progress['step']}/{progress['total_steps']} loss {progress['loss']:.3f}"
                )
                bar.update(task, total=progress["total_steps"], completed=progress["step"],
                           info=info)  # fmt: skip
            else:
                bar.update(task, info=job["status"])
            if job["status"] in FINAL:
                break
            time.sleep(2)
    events = _call(url, "GET", f"/fine_tuning/jobs/{job_id}/events", params={"limit": 100})
    for event in events.json()["data"]:
        data = event.get("data") or {}
        if data.get("step") is not None and data.get("loss") is not None:
            seen.setdefault(int(data["step"]), float(data["loss"]))
    if job["status"] == "succeeded":
        console.print(f"[green]succeeded[/green]: {job['fine_tuned_model']} (a candidate)")
        if (job.get("dp") or {}).get("epsilon_spent") is not None:
            dp = job["dp"]
            console.print(f"differential privacy: epsilon {dp['epsilon_spent']:.3f} spent "
                          f"at delta {dp['delta']:.3g}")  # fmt: skip
        distilled = job.get("distill") or {}
        if distilled.get("kl_after") is not None:
            before, after = distilled["kl_before"], distilled["kl_after"]
            layers = len(distilled["layers_kept"])
            console.print(f"student: {layers} layers, KL to teacher {before:.3f} to {after:.3f}")
    else:
        error = (job.get("error") or {}).get("message", "")
        console.print(f"[red]{job['status']}[/red] {error}")
    if len(seen) >= 2:
        _plot(job_id, seen, plot)
    if job["status"] != "succeeded":
        raise typer.Exit(1)


def _plot(job_id: str, losses: dict[int, float], out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        errors.print("no loss plot: matplotlib is not installed (pip install matplotlib)")
        return
    steps = sorted(losses)
    figure, axes = plt.subplots(figsize=(6, 3.5))
    axes.plot(steps, [losses[s] for s in steps], marker="o")
    axes.set(xlabel="step", ylabel="training loss", title=job_id)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)
    console.print(f"loss curve: {out}")


@train_app.command("list")
def list_jobs(url: Url = None) -> None:
    """Your tenant's fine-tuning jobs, newest first."""
    table = Table("id", "status", "model", "fine-tuned model", "created")
    for job in _call(url, "GET", "/fine_tuning/jobs", params={"limit": 100}).json()["data"]:
        created = time.strftime("%Y-%m-%d %H:%M", time.gmtime(job["created_at"]))
        table.add_row(job["id"], job["status"], job["model"], job["fine_tuned_model"] or "",
                      created)  # fmt: skip
    console.print(table)


@train_app.command("show")
def show(job_id: Annotated[str, typer.Argument()], url: Url = None) -> None:
    """A job, as JSON."""
    console.print_json(json.dumps(_call(url, "GET", f"/fine_tuning/jobs/{job_id}").json()))


@train_app.command("cancel")
def cancel(job_id: Annotated[str, typer.Argument()], url: Url = None) -> None:
    """Cancel a job (a running one stops within a third of its lease)."""
    job = _call(url, "POST", f"/fine_tuning/jobs/{job_id}/cancel").json()
    console.print(f"{job['id']}: {job['status']}")
