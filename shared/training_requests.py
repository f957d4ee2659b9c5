"""The body of ``POST /v1/fine_tuning/jobs``, checked the same way at the gateway (a 400
naming the field, before anything is charged) and again at the trainer.

A create body is OpenAI's (``model``, ``training_file``, ``validation_file``,
``hyperparameters`` {``n_epochs``, ``batch_size``, ``learning_rate_multiplier``}, ``suffix``,
``seed``, ``metadata``, ``method`` {``type``: ``supervised`` or ``dpo``}) plus our
extensions:

- ``method`` may also be the string ``"lora"`` (adapters, the default) or ``"full"``;
  ``{"type": "dpo", "dpo": {"hyperparameters": {"beta": ...}}}`` is preference
  optimisation on LoRA adapters (the training file must hold preference pairs);
- ``hyperparameters`` may also hold ``lora_rank``, ``lora_alpha``, ``max_length``, and
  ``beta`` for DPO;
- ``dataset``: a dataset id of the feedback service instead of ``training_file`` (its eval
  split becomes the validation file);
- ``dp``: ``{"epsilon": 8, "delta": null, "max_grad_norm": 1.0}`` trains the LoRA adapters
  with DP-SGD (:class:`Privacy`; supervised method only);
- ``distill``: ``{"teacher": null, "student": {"layers": 20, "ffn_keep": 0.75}}`` makes a
  smaller student of the model (whole layers and feed-forward channels removed) and trains
  it on the model's own outputs (:func:`parse_distill`); the teacher is the job's model.
"""

from __future__ import annotations

import math
import re
import secrets
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from shared.feedback_requests import DATASET_ID
from shared.openai_protocol import invalid_field, reject_unknown

FILE_ID = re.compile(r"file-[A-Za-z0-9]{24}")
JOB_ID = re.compile(r"ftjob-[A-Za-z0-9]{24}")
SUFFIX = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,39}")
MODEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}(:[A-Za-z0-9][A-Za-z0-9._-]{0,127})?")
CREATE_FIELDS = frozenset({
    "model", "training_file", "validation_file", "hyperparameters", "suffix", "seed",
    "metadata", "method", "integrations", "dataset", "dp", "distill",
})  # fmt: skip
HYPERPARAMETERS = frozenset({
    "n_epochs", "batch_size", "learning_rate_multiplier", "lora_rank", "lora_alpha",
    "max_length", "beta",
})  # fmt: skip
BASE_LEARNING_RATE = {"lora": 2e-4, "full": 2e-5, "dpo": 1e-4, "distill": 1e-4}
DEFAULTS: dict[str, Any] = {
    "n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 1.0, "lora_rank": 8,
    "lora_alpha": 16, "max_length": 512,
}  # fmt: skip
DPO_DEFAULTS = {"beta": 0.1}
DP_FIELDS = ("epsilon", "delta", "max_grad_norm")
DP_RANGES = {"epsilon": (0.0, 100.0), "max_grad_norm": (0.0, 100.0)}  # (low, high]
FLOAT_RANGES = {"learning_rate_multiplier": (0.0, 10.0), "beta": (0.0, 10.0)}  # (low, high]
INTEGER_RANGES = {
    "n_epochs": (1, 50), "batch_size": (1, 256), "lora_rank": (1, 256), "lora_alpha": (1, 1024),
    "max_length": (32, 8192),
}  # fmt: skip
MAX_METADATA = 16
_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


@dataclass(frozen=True)
class Privacy:
    """A job's DP-SGD settings (``dp``): spend at most ``epsilon`` at ``delta`` (None: the
    trainer's default, ``min(1e-5, 1/(10 n))`` for n training rows; it must be below 1/n),
    each example's gradient clipped to ``max_grad_norm``. Constructing one checks every field.

    Raises:
        InvalidRequestError: naming the field (``dp.epsilon``...).
    """

    epsilon: float
    delta: float | None = None
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        for name, (low, high) in DP_RANGES.items():
            value = getattr(self, name)
            if not _finite(value) or not low < value <= high:
                raise invalid_field(f"dp.{name}", f"must be a number in ({low:g}, {high:g}]")
        if self.delta is not None and (not _finite(self.delta) or not 0 < self.delta <= 1e-3):
            raise invalid_field(
                "dp.delta", "must be null (min(1e-5, 1/(10 n))) or a number in (0, 0.001]"
            )

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> Privacy:
        reject_unknown(sorted(values), DP_FIELDS, what="a dp setting", prefix="dp.")
        if values.get("epsilon") is None:
            raise invalid_field("dp.epsilon", "is required")
        return cls(
            epsilon=values["epsilon"],
            delta=values.get("delta"),
            max_grad_norm=values.get("max_grad_norm", 1.0),
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def parse_dp(value: Any, tuning: str) -> dict[str, Any] | None:
    """The ``dp`` field checked, as stored with the job (None without one).

    Raises:
        InvalidRequestError: not an object, a field unknown or out of range, or a method
            other than supervised LoRA.
    """
    if value is None:
        return None
    if not isinstance(value, dict):
        raise invalid_field("dp", "must be an object with epsilon (and delta, max_grad_norm)")
    privacy = Privacy.from_mapping(value)
    if tuning != "lora":
        raise invalid_field("dp", "DP-SGD trains LoRA adapters: use the supervised lora method")
    return privacy.as_dict()


CHANNEL_MULTIPLE = 32  # GGUF's block quantizations need rows of a multiple of 32 values


@dataclass(frozen=True)
class StudentShape:
    """A distillation student: ``layers`` of the teacher's decoder layers, ``ffn_keep`` of
    each layer's feed-forward channels (1.0: all). Constructing one checks both fields.

    Raises:
        InvalidRequestError: naming the field (``distill.student.layers``...).
    """

    layers: int
    ffn_keep: float = 1.0

    def __post_init__(self) -> None:
        layers, keep = self.layers, self.ffn_keep
        if isinstance(layers, bool) or not isinstance(layers, int) or not 2 <= layers <= 1024:
            raise invalid_field("distill.student.layers", "must be an integer from 2 to 1024")
        if not _finite(keep) or not 0 < keep <= 1:
            raise invalid_field("distill.student.ffn_keep", "must be a number in (0, 1]")

    def channels(self, intermediate: int) -> int:
        """The feed-forward channels kept of ``intermediate``: rounded down to a multiple of
        32 (at least 32)."""
        kept = math.floor(intermediate * self.ffn_keep / CHANNEL_MULTIPLE) * CHANNEL_MULTIPLE
        return max(CHANNEL_MULTIPLE, min(intermediate, kept))


def parse_distill(value: Any, model: str) -> dict[str, Any] | None:
    """The ``distill`` field checked (None without one): the student's ``layers`` (2 or
    more; the teacher must have more, checked when the job runs) and ``ffn_keep``, the share
    of each layer's feed-forward channels kept (0, 1].

    Raises:
        InvalidRequestError: naming the field (``distill.student.layers``...).
    """
    if value is None:
        return None
    if not isinstance(value, dict):
        raise invalid_field("distill", "must be an object with a student")
    reject_unknown(sorted(value), ("student", "teacher"), what="a distill field", prefix="distill.")
    teacher = value.get("teacher")
    if teacher is not None and teacher != model:
        raise invalid_field("distill.teacher", "the teacher is the job's model: leave it out")
    student = value.get("student")
    if not isinstance(student, dict):
        raise invalid_field("distill.student", "must be an object with layers (and ffn_keep)")
    prefix = "distill.student."
    reject_unknown(sorted(student), ("layers", "ffn_keep"), what="a student field", prefix=prefix)
    shape = StudentShape(layers=student.get("layers", 0), ffn_keep=student.get("ffn_keep", 1.0))
    return {"layers": shape.layers, "ffn_keep": float(shape.ffn_keep)}


def new_id(prefix: str) -> str:
    """``prefix`` and 24 random letters and digits (OpenAI's id shape)."""
    return prefix + "".join(secrets.choice(_ALPHABET) for _ in range(24))


@dataclass(frozen=True)
class JobRequest:
    """A checked create body."""

    model: str
    tuning: str  # "lora", "full" or "dpo"
    training_file: str | None
    validation_file: str | None
    dataset: str | None
    hyperparameters: dict[str, Any]
    suffix: str | None
    seed: int
    metadata: dict[str, str] = field(default_factory=dict)
    dp: dict[str, Any] | None = None  # Privacy.as_dict()
    distill: dict[str, Any] | None = None  # parse_distill's result


def _integer(name: str, value: Any) -> int:
    low, high = INTEGER_RANGES[name]
    if value == "auto":
        return int(DEFAULTS[name])
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise invalid_field(f"hyperparameters.{name}", f"must be 'auto' or {low}-{high}")
    return value


def parse_hyperparameters(value: Any, tuning: str = "lora") -> dict[str, Any]:
    """The hyperparameters with ``auto`` and the missing ones filled in.

    Raises:
        InvalidRequestError: a field that is unknown, out of range, or not one of
            ``tuning``'s (named).
    """
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise invalid_field("hyperparameters", "must be an object")
    reject_unknown(sorted(value), sorted(HYPERPARAMETERS), what="a hyperparameter")
    checked = dict(DEFAULTS) | (DPO_DEFAULTS if tuning == "dpo" else {})
    for name, given in value.items():
        if name in DPO_DEFAULTS and tuning != "dpo":
            raise invalid_field(f"hyperparameters.{name}", "is a dpo method's hyperparameter")
        if name in FLOAT_RANGES:
            if given == "auto":
                continue
            low, high = FLOAT_RANGES[name]
            if (
                isinstance(given, bool)
                or not isinstance(given, int | float)
                or not math.isfinite(given)
                or not low < given <= high
            ):
                raise invalid_field(
                    f"hyperparameters.{name}", f"must be 'auto' or in ({low:g}, {high:g}]"
                )
            checked[name] = float(given)
        else:
            checked[name] = _integer(name, given)
    return checked


def _tuning(method: Any) -> str:
    if method is None:
        return "lora"
    if isinstance(method, str):
        if method not in ("lora", "full"):
            raise invalid_field("method", "must be 'lora', 'full' or an object with a type")
        return method
    if not isinstance(method, dict):
        raise invalid_field("method", "must be 'lora', 'full' or an object with a type")
    kind = method.get("type")
    if kind not in ("supervised", "dpo"):
        raise invalid_field("method.type", "must be 'supervised' or 'dpo'")
    reject_unknown(sorted(method), ("type", kind), what="a method field")
    if method.get(kind) is not None and not isinstance(method[kind], dict):
        raise invalid_field(f"method.{kind}", "must be an object")
    return "dpo" if kind == "dpo" else "lora"


def _method_hyperparameters(body: dict[str, Any]) -> Any:
    """The hyperparameters, from the top level or OpenAI's ``method.<type>``."""
    method = body.get("method")
    nested = None
    if isinstance(method, dict) and isinstance(method.get(method.get("type")), dict):
        inner = method[method["type"]]
        reject_unknown(sorted(inner), ("hyperparameters",), what=f"a method.{method['type']} field")
        nested = inner.get("hyperparameters")
    if nested is not None and body.get("hyperparameters") is not None:
        raise invalid_field("hyperparameters", "give them at the top level or in the method")
    return nested if nested is not None else body.get("hyperparameters")


def _file_id(value: Any, name: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or FILE_ID.fullmatch(value) is None:
        raise invalid_field(name, "must be a file id (file-...) from POST /v1/files")
    return value


def parse_job_request(body: Any) -> JobRequest:
    """A create body, checked.

    Raises:
        InvalidRequestError: the first field that is missing, unknown or wrong (named).
    """
    if not isinstance(body, dict):
        raise invalid_field("body", "must be a JSON object")
    reject_unknown(sorted(body), sorted(CREATE_FIELDS), what="a field")
    if body.get("integrations"):
        raise invalid_field("integrations", "no integrations are available")
    model = body.get("model")
    if not isinstance(model, str) or MODEL.fullmatch(model) is None:
        raise invalid_field("model", "must be a model name, or name:version")
    training = _file_id(body.get("training_file"), "training_file")
    validation = _file_id(body.get("validation_file"), "validation_file")
    dataset = body.get("dataset")
    if dataset is not None and (not isinstance(dataset, str) or not DATASET_ID.fullmatch(dataset)):
        raise invalid_field("dataset", "must be a dataset id (<name>-v<version>)")
    if (training is None) == (dataset is None):
        raise invalid_field("training_file", "give a training_file or a dataset (one of them)")
    if dataset is not None and validation is not None:
        raise invalid_field("validation_file", "a dataset brings its own (its eval split)")
    suffix = body.get("suffix")
    if suffix is not None and (not isinstance(suffix, str) or not SUFFIX.fullmatch(suffix)):
        raise invalid_field("suffix", "must be 1-40 letters, digits, '-' or '_'")
    seed = body.get("seed")
    if seed is None:
        seed = secrets.randbelow(2**31)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31:
        raise invalid_field("seed", "must be an integer from 0 to 2147483647")
    metadata = body.get("metadata") or {}
    if (
        not isinstance(metadata, dict)
        or len(metadata) > MAX_METADATA
        or not all(
            isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 512
            for k, v in metadata.items()
        )
    ):
        raise invalid_field("metadata", "must map up to 16 keys (64 chars) to text (512 chars)")
    distill = parse_distill(body.get("distill"), model)
    if distill is not None and body.get("method") is not None:
        raise invalid_field("method", "a distillation job has its own method: leave it out")
    tuning = "distill" if distill is not None else _tuning(body.get("method"))
    return JobRequest(
        model=model,
        tuning=tuning,
        training_file=training,
        validation_file=validation,
        dataset=dataset,
        hyperparameters=parse_hyperparameters(_method_hyperparameters(body), tuning),
        suffix=suffix,
        seed=seed,
        metadata=metadata,
        dp=parse_dp(body.get("dp"), tuning),
        distill=distill,
    )
