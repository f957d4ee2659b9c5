"""A job process's spec (see :mod:`services.trainer.job_process` for its fields): parsed
and checked field by field before anything starts, the error naming the field."""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from services.trainer.edge import SPEC_EDGE_QUANTS
from services.trainer.sft import METHODS, Hyperparameters, parallel_config
from services.trainer.sft_loop import LoopConfig
from shared.openai_protocol import InvalidRequestError
from shared.training_requests import Privacy, StudentShape

JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_REQUIRED = (
    "job_id", "tenant", "method", "base_gguf", "cache_dir", "training_file", "hyperparameters",
    "checkpoint_every", "output_dir", "workers", "use_gpu",
)  # fmt: skip
_OPTIONAL = (
    "validation_file", "ray_address", "parallel", "cpus_per_worker", "edge_quant", "dp",
    "distill",
)  # fmt: skip


class SpecError(ValueError):
    """The spec is not one this process can run; ``field`` names the culprit."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class JobSpec:
    job_id: str
    tenant: str
    base_gguf: Path
    cache_dir: Path
    training_file: Path
    validation_file: Path | None
    hyperparameters: Hyperparameters  # with the spec's method and checkpoint_every
    output_dir: Path
    workers: int
    use_gpu: bool
    ray_address: str | None
    parallel: str
    cpus_per_worker: int
    edge_quant: str = "none"
    privacy: Privacy | None = None  # DP-SGD (services.trainer.dp_loop)
    student: StudentShape | None = None  # distillation (services.trainer.distill_loop)


def parse_spec(spec: Any) -> JobSpec:
    """The spec, checked.

    Raises:
        SpecError: the first field that is missing, unknown, of the wrong type, or a file
            that is not there.
    """
    _check_fields(spec)
    workers, address, parallel, cpus = _placement(spec)
    edge_quant = spec.get("edge_quant") or "none"
    if edge_quant not in SPEC_EDGE_QUANTS:
        raise SpecError("edge_quant", f"must be one of {', '.join(SPEC_EDGE_QUANTS)}")
    hyperparameters = _hyperparameters(spec)
    if hyperparameters.method == "dpo" and parallel != "ddp":
        raise SpecError("parallel", "a dpo job runs data parallel (ddp) only")
    privacy = _privacy(spec, hyperparameters.method, workers)
    student = _student(spec, hyperparameters.method, parallel)
    wanted = "preference" if hyperparameters.method == "dpo" else "chat"
    for name in ("training_file", "validation_file"):
        if spec.get(name) is not None:
            _check_kind(_path(spec, name, must_exist=True), name, wanted)
    return JobSpec(
        job_id=spec["job_id"], tenant=spec["tenant"], hyperparameters=hyperparameters,
        base_gguf=_path(spec, "base_gguf", must_exist=True),
        cache_dir=_path(spec, "cache_dir"),
        training_file=_path(spec, "training_file", must_exist=True),
        validation_file=None if spec.get("validation_file") is None
        else _path(spec, "validation_file", must_exist=True),
        output_dir=_path(spec, "output_dir"), workers=workers, use_gpu=spec["use_gpu"],
        ray_address=address, parallel=parallel, cpus_per_worker=cpus, edge_quant=edge_quant,
        privacy=privacy, student=student,
    )  # fmt: skip


def _student(spec: dict[str, Any], method: str, parallel: str) -> StudentShape | None:
    given = spec.get("distill")
    if (given is not None) != (method == "distill"):
        raise SpecError("distill", "is required with method distill, and only with it")
    if given is None:
        return None
    if not isinstance(given, dict) or set(given) - {"layers", "ffn_keep"}:
        raise SpecError("distill", "must be an object with layers (and ffn_keep)")
    if parallel != "ddp":
        raise SpecError("parallel", "a distillation job runs data parallel (ddp) only")
    try:
        return StudentShape(layers=given.get("layers", 0), ffn_keep=given.get("ffn_keep", 1.0))
    except InvalidRequestError as error:
        field = (error.param or "distill").replace("distill.student.", "distill.")
        raise SpecError(field, error.message.split(": ", 1)[-1]) from None


def _privacy(spec: dict[str, Any], method: str, workers: int) -> Privacy | None:
    given = spec.get("dp")
    if given is None:
        return None
    if not isinstance(given, dict):
        raise SpecError("dp", "must be an object")
    if method != "lora":
        raise SpecError("dp", "DP-SGD trains LoRA adapters only (method lora)")
    if workers != 1:
        raise SpecError("dp", "DP-SGD runs on one worker")
    try:
        return Privacy.from_mapping(given)
    except InvalidRequestError as error:
        field = error.param or "dp"
        raise SpecError(field, error.message.removeprefix(f"{field}: ")) from None


def _check_fields(spec: Any) -> None:
    """The spec is an object with every required field, no unknown one, and a job id and
    tenant of the right shape."""
    if not isinstance(spec, dict):
        raise SpecError("spec", "must be a JSON object")
    for name in _REQUIRED:
        if name not in spec:
            raise SpecError(name, "is required")
    unknown = sorted(set(spec) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        raise SpecError(unknown[0], "unknown field")
    job_id = spec["job_id"]
    if not isinstance(job_id, str) or not JOB_ID.fullmatch(job_id):
        raise SpecError("job_id", "must be 1-128 letters, digits, '.', '_' or '-'")
    if not isinstance(spec["tenant"], str) or not spec["tenant"]:
        raise SpecError("tenant", "must be a non-empty string")


def _placement(spec: dict[str, Any]) -> tuple[int, str | None, str, int]:
    """Workers, the Ray address, the parallel strategy and the CPUs of each worker."""
    workers = _integer(spec, "workers", 1, 4096)
    if not isinstance(spec["use_gpu"], bool):
        raise SpecError("use_gpu", "must be true or false")
    address = spec.get("ray_address")
    if address is not None and (not isinstance(address, str) or not address):
        raise SpecError("ray_address", "must be null or an address")
    parallel = spec.get("parallel") or "ddp"
    try:
        parallel_config(parallel, workers=workers, use_gpu=spec["use_gpu"])
    except ValueError as error:
        raise SpecError("parallel", str(error).removeprefix("parallel: ")) from None
    if spec.get("cpus_per_worker") is None:
        cpus = max(1, (os.cpu_count() or 1) // workers)
    else:
        cpus = _integer(spec, "cpus_per_worker", 1, 1024)
    return workers, address, parallel, cpus


def _integer(spec: dict[str, Any], name: str, low: int, high: int) -> int:
    value = spec[name]
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise SpecError(name, f"must be an integer from {low} to {high}")
    return value


def _hyperparameters(spec: dict[str, Any]) -> Hyperparameters:
    if spec["method"] not in METHODS:
        raise SpecError("method", f"must be one of {', '.join(METHODS)}")
    every = _integer(spec, "checkpoint_every", 1, 1 << 30)
    given = spec["hyperparameters"]
    if not isinstance(given, dict):
        raise SpecError("hyperparameters", "must be an object")
    for name in ("method", "checkpoint_every"):
        if name in given:
            raise SpecError(f"hyperparameters.{name}", f"is set by the spec's {name}")
    try:
        return Hyperparameters.from_mapping(
            {**given, "method": spec["method"], "checkpoint_every": every}
        )
    except (TypeError, ValueError) as error:
        raise SpecError("hyperparameters", str(error)) from None


def _check_kind(path: Path, name: str, wanted: str) -> None:
    """The file holds rows of the method's kind (checked before Ray starts: a wrong file
    fails in a second, not after a minute of start-up)."""
    from shared.finetune_format import FormatError, check_jsonl

    try:
        kind = check_jsonl(path.read_bytes()).kind
    except (OSError, FormatError) as error:
        raise SpecError(name, str(error)) from None
    if kind != wanted:
        method = "dpo" if wanted == "preference" else "supervised"
        raise SpecError(name, f"holds {kind} rows; a {method} job needs {wanted} rows")


def _path(spec: dict[str, Any], name: str, must_exist: bool = False) -> Path:
    value = spec[name]
    if not isinstance(value, str) or not os.path.isabs(value):
        raise SpecError(name, "must be an absolute path")
    if must_exist and not os.path.isfile(value):
        raise SpecError(name, f"no such file: {value}")
    return Path(value)


def loop_config(spec: JobSpec, base_dir: Path) -> LoopConfig:
    """What every worker's loop is given."""
    return LoopConfig(
        base_dir=str(base_dir),
        training_file=str(spec.training_file),
        validation_file=None if spec.validation_file is None else str(spec.validation_file),
        output_dir=str(spec.output_dir),
        hyperparameters=spec.hyperparameters.as_dict(),
        parallel=parallel_config(spec.parallel, workers=spec.workers, use_gpu=spec.use_gpu),
        num_threads=spec.cpus_per_worker,
        privacy=None if spec.privacy is None else spec.privacy.as_dict(),
        distill=None if spec.student is None else asdict(spec.student),
    )
