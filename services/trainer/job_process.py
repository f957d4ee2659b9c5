"""The child process that runs one fine-tuning job: ``python -m services.trainer.job_process
SPEC_JSON_PATH``.

The spec (written by the trainer service)::

    {"job_id": "ftjob-abc", "tenant": "acme", "method": "lora" | "full" | "dpo" | "distill",
     "base_gguf": "/abs/model.gguf", "cache_dir": "/abs/cache",
     "training_file": "/abs/train.jsonl", "validation_file": null | "/abs/valid.jsonl",
     "hyperparameters": {"n_epochs": 3, "batch_size": 4, "learning_rate": 0.0002,
                         "lora_rank": 8, "lora_alpha": 16, "max_length": 512, "seed": 0, ...},
     "checkpoint_every": 20, "output_dir": "/abs/run", "workers": 1, "use_gpu": false,
     "ray_address": null, "parallel": "ddp" | "fsdp" (optional, ddp),
     "cpus_per_worker": null | int (optional: this machine's CPUs shared by the workers),
     "edge_quant": "q4_0" | "none" (optional, none: see services.trainer.edge),
     "dp": null | {"epsilon": 8, "delta": null | 1e-5, "max_grad_norm": 1.0}
           (optional: DP-SGD on LoRA, one worker; see services.trainer.dp_loop),
     "distill": null | {"layers": 20, "ffn_keep": 0.75}
           (with method distill: a pruned student; see services.trainer.distill_loop)}

``hyperparameters`` takes every field of :class:`~services.trainer.sft.Hyperparameters`
except ``method`` and ``checkpoint_every``, which are the spec's own.

Stdout carries only the protocol, one JSON object per line (Ray, transformers and the logs
write to stderr: this process moves its stdout aside at start, so even a library writing
to file descriptor 1 lands on stderr)::

    {"event": "progress", "step", "total_steps", "epoch", "loss", "tokens_per_s", "eta_s"}
    {"event": "checkpoint", "step", "path", "loss", "valid_loss"}
    {"event": "result", ...result.json..., "model_dir"}                   exit 0
    {"event": "error", "message"}                                         exit 1
    {"event": "error", "message", "field"}  (a bad spec, nothing started)  exit 2
    {"event": "error", "message", "cancelled": true}  (SIGTERM/SIGINT)     exit 143

Progress reaches this process through Ray Train itself: the workers' ``ray.train.report``
metrics are delivered to a ``ray.train.UserCallback`` in the run's controller, which Ray
places on this process's node; it appends them to ``<output_dir>/events.jsonl``, which this
process follows. So no worker needs to see this machine's disk for progress to flow.

Resuming: Ray Train keeps the run's state under ``<output_dir>/ray/<job_id>``; started
again for the same job (after a crash or ``kill -9``), the trainer finds the latest
checkpoint there and the loop continues from its step. Two checkpoints are kept.

Stopping: the process asks the kernel for SIGTERM when its parent dies, and on SIGTERM
(a cancel) it shuts down the Ray it started (its worker processes with it) and exits 143.
The local Ray processes are bound to this process: after a ``kill -9`` its workers die with
it, and Ray's two per-node agents exit by themselves within about a minute (a resumed run
does not wait for them).

Parallelism (``workers``, ``use_gpu``, ``parallel``): each worker is one Ray Train worker
process; with more than one, ``prepare_model`` wraps the model according to
:func:`~services.trainer.sft.parallel_config`:

- ``ddp`` (default): data parallel. Every worker holds the whole model, takes
  ``batch_size / workers`` rows per step, and gradients are averaged (gloo on CPU, NCCL on
  GPUs). Right whenever the model and its optimizer state fit one device, as LoRA on small
  and medium models does.
- ``fsdp``: fully sharded data parallel, GPUs only. Parameters, gradients and optimizer
  state are sharded across the workers, each decoder layer its own FSDP unit
  (``use_orig_params`` so frozen base weights and trainable adapters can share a unit);
  for full fine-tuning of models whose optimizer state does not fit one GPU. Checkpoints
  then hold each rank's shard, so a run resumes with the same number of workers.

With ``ray_address`` the job joins an existing cluster instead of starting a local Ray;
``output_dir`` and ``cache_dir`` must then be on storage every node sees.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any

from services.trainer.job_spec import JobSpec, SpecError, loop_config, parse_spec

EVENTS = "events.jsonl"
EXIT_ERROR, EXIT_SPEC, EXIT_CANCELLED = 1, 2, 143
RAY_WORKER_NICENESS = 15  # Ray's default for its worker processes
_PR_SET_PDEATHSIG = 1
# ---------------------------------------------------------------- process plumbing


class _Protocol:
    """The parent's channel: the original stdout, one JSON object per line."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def emit(self, event: dict[str, Any]) -> None:
        with self._lock:
            self._stream.write(json.dumps(event, separators=(",", ":")) + "\n")
            self._stream.flush()


def _claim_stdout() -> _Protocol:
    """Keep the real stdout for the protocol; point descriptor 1 (and ``sys.stdout``) at
    stderr, so whatever else writes there, Ray's child processes included, cannot corrupt
    the parent's stream."""
    sys.stdout.flush()
    protocol = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return _Protocol(protocol)


def _die_with_parent() -> None:
    """Have the kernel send SIGTERM when the parent dies (a cancel, so Ray is stopped)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() == 1:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


class _Cancelled(Exception):
    pass


def _relay(events: Path) -> Any:
    """A ``ray.train.UserCallback`` appending each report to ``events`` as protocol lines.

    It runs in the run's controller actor, on this process's node; defined here so the
    class is pickled with the trainer.
    """
    import ray.train

    class ProgressRelay(ray.train.UserCallback):
        def __init__(self, path: str) -> None:
            self.path = path

        def after_report(self, run_context: Any, metrics: Any, checkpoint: Any) -> None:
            report = metrics[0] if metrics else {}
            keys = ("step", "total_steps", "epoch", "loss", "tokens_per_s", "eta_s")
            lines = [{"event": "progress", **{k: report.get(k) for k in keys}}]
            if checkpoint is not None:
                lines.append({
                    "event": "checkpoint", "step": report.get("step"), "path": checkpoint.path,
                    "loss": report.get("loss"), "valid_loss": report.get("valid_loss"),
                })  # fmt: skip
            with open(self.path, "a", encoding="utf-8") as file:
                file.writelines(json.dumps(line, separators=(",", ":")) + "\n" for line in lines)

    return ProgressRelay(str(events))


class _Follower:
    """Forwards the complete lines appended to a file since this object was made."""

    def __init__(self, path: Path, protocol: _Protocol) -> None:
        self.path, self.protocol = path, protocol
        self.offset = path.stat().st_size if path.exists() else 0
        self.partial = ""

    def poll(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, encoding="utf-8") as file:
            file.seek(self.offset)
            data = file.read()
            self.offset = file.tell()
        *lines, self.partial = (self.partial + data).split("\n")
        for line in lines:
            with contextlib.suppress(ValueError):
                self.protocol.emit(json.loads(line))


def _failure_message(error: BaseException) -> str:
    """The first worker's own exception when Ray Train reports worker failures."""
    failures = getattr(error, "worker_failures", None)
    if failures:
        first = failures[min(failures)]
        cause = getattr(first, "cause", None) or first
        return f"{type(cause).__name__}: {cause}".strip()[:4000]
    return f"{type(error).__name__}: {error}"[:4000]


def _fit(spec: JobSpec, base_dir: Path, events: Path) -> None:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if spec.hyperparameters.method == "dpo":
        from services.trainer.dpo_loop import train_loop_per_worker
    elif spec.hyperparameters.method == "distill":
        from services.trainer.distill_loop import train_loop_per_worker
    elif spec.privacy is not None:
        from services.trainer.dp_loop import train_loop_per_worker
    else:
        from services.trainer.sft_loop import train_loop_per_worker

    resources = {"CPU": spec.cpus_per_worker} | ({"GPU": 1} if spec.use_gpu else {})
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=asdict(loop_config(spec, base_dir)),
        scaling_config=ScalingConfig(
            num_workers=spec.workers, use_gpu=spec.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            storage_path=str(spec.output_dir / "ray"),
            name=spec.job_id,
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=0),  # a retry is the parent's decision
            callbacks=[_relay(events)],
        ),
    )
    trainer.fit()


class _Stop:
    """SIGTERM/SIGINT handling: before Ray is up the main thread is the one working, so the
    signal interrupts it; afterwards the main thread only follows the run, and sees the flag."""

    def __init__(self) -> None:
        self.requested = threading.Event()
        self.ray_up = False

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, _: Any) -> None:
        self.requested.set()
        if not self.ray_up:
            raise _Cancelled

    def after_ray_init(self) -> None:
        # Ray's core worker installs its own SIGTERM handler (it aborts the process); a
        # cancel must stop Ray and report instead
        self.ray_up = True
        self.install()


def run(spec: JobSpec, protocol: _Protocol, stop: _Stop) -> int:
    """Train ``spec`` to its end; the exit code (the protocol lines are emitted here).

    Raises:
        _Cancelled: a stop was requested.
    """
    import ray

    from services.trainer.base_model import cached_base

    spec.output_dir.mkdir(parents=True, exist_ok=True)
    base_dir = cached_base(spec.base_gguf, spec.cache_dir)
    # the run controller's placement-group cleaner warns every second that the state API
    # (served by the dashboard, which is not started) is unavailable: Ray logs errors only
    logging_config = ray.LoggingConfig(log_level="ERROR")
    if spec.ray_address:
        ray.init(address=spec.ray_address, logging_config=logging_config)
    else:
        cpus = max(spec.cpus_per_worker * spec.workers, os.cpu_count() or 1)
        ray.init(num_cpus=cpus, include_dashboard=False, logging_config=logging_config)
    stop.after_ray_init()
    events = spec.output_dir / EVENTS
    follower = _Follower(events, protocol)
    outcome: dict[str, BaseException | None] = {}

    def fit() -> None:
        try:
            _fit(spec, base_dir, events)
            outcome["error"] = None
        except BaseException as error:  # reported to the parent, whatever it is
            outcome["error"] = error

    thread = threading.Thread(target=fit, name="fit", daemon=True)
    thread.start()
    while thread.is_alive() and not stop.requested.is_set():
        follower.poll()
        thread.join(0.25)
    follower.poll()
    if stop.requested.is_set():
        raise _Cancelled
    error = outcome.get("error")
    if error is not None:
        protocol.emit({"event": "error", "message": _failure_message(error)})
        return EXIT_ERROR
    result = json.loads((spec.output_dir / "result.json").read_text())
    if spec.edge_quant != "none":
        _shutdown_ray()  # its workers are done; the check wants the CPUs and the memory
        stop.ray_up = False  # a cancel interrupts the check at once
        if stop.requested.is_set():
            raise _Cancelled
        result["edge"] = _edge(spec, result)
    protocol.emit({"event": "result", **result, "model_dir": result.get("model_dir")})
    return 0


def _edge(spec: JobSpec, result: dict[str, Any]) -> dict[str, Any]:
    """The 4-bit export behind its check; a failure of it does not fail the job (the Q8_0
    export stands), it is reported instead."""
    import torch

    from services.trainer.edge import edge_export
    from shared.logging import get_logger

    prompts = spec.validation_file or spec.training_file
    torch.set_num_threads(spec.cpus_per_worker)  # the CPUs the job's worker had
    with contextlib.suppress(OSError):  # as low a priority as Ray gives training workers
        os.nice(max(0, RAY_WORKER_NICENESS - os.nice(0)))
    try:
        return edge_export(
            Path(result["model_dir"]), spec.base_gguf, spec.output_dir / "edge", prompts,
            quant=spec.edge_quant, student=result.get("distill"),
            private=spec.privacy is not None,
        )  # fmt: skip
    except _Cancelled:
        raise
    except Exception:
        get_logger(__name__).exception("edge export failed", job=spec.job_id)
        # the details (with this machine's paths) stay in the log; the job says what failed
        return {"quant": spec.edge_quant, "path": None, "error": "the check could not run"}


def main(argv: list[str]) -> int:
    """Run the job of the spec file ``argv[0]``; the exit code."""
    protocol = _claim_stdout()
    if len(argv) != 1:
        protocol.emit({"event": "error", "message": "usage: job_process SPEC_JSON_PATH"})
        return EXIT_SPEC
    try:
        raw = json.loads(Path(argv[0]).read_text())
    except (OSError, ValueError) as error:
        protocol.emit({"event": "error", "message": f"spec: unreadable ({error})"})
        return EXIT_SPEC
    try:
        spec = parse_spec(raw)
    except SpecError as error:
        protocol.emit({"event": "error", "message": str(error), "field": error.field})
        return EXIT_SPEC
    from shared.logging import configure_logging, get_logger

    configure_logging("trainer")
    log = get_logger("services.trainer.job_process")
    stop = _Stop()
    started = time.monotonic()
    log.info("job starting", job=spec.job_id, tenant=spec.tenant, workers=spec.workers)
    try:
        stop.install()
        _die_with_parent()
        code = run(spec, protocol, stop)
    except _Cancelled:
        protocol.emit({"event": "error", "message": "cancelled", "cancelled": True})
        code = EXIT_CANCELLED
    except Exception as error:
        log.exception("job failed", job=spec.job_id)
        protocol.emit({"event": "error", "message": _failure_message(error)})
        code = EXIT_ERROR
    finally:
        with contextlib.suppress(Exception):
            _shutdown_ray()
    log.info("job process exiting", job=spec.job_id, code=code, seconds=time.monotonic() - started)
    return code


def _shutdown_ray() -> None:
    """Stop the Ray this process started (or leave the cluster it joined), within a bound:
    a shutdown racing the training thread must not keep a cancelled job alive."""
    import ray

    if not ray.is_initialized():
        return
    stopper = threading.Thread(target=ray.shutdown, name="ray-shutdown", daemon=True)
    stopper.start()
    stopper.join(30.0)


if __name__ == "__main__":
    exit_code = main(sys.argv[1:])
    sys.stderr.flush()
    os._exit(exit_code)  # Ray's threads must not keep a finished job's process alive
