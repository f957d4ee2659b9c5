"""Supervised fine-tuning on chat rows: the data, the hyperparameters, the guard. Nothing
here imports torch, transformers or Ray, so the service can validate a job and tests can
check the masking without a model:

- :func:`encode_row` turns an OpenAI chat fine-tuning row into token ids with the
  tokenizer's chat template, labels masked (``IGNORE``) everywhere except the assistant
  turns trained on (all of them unless a turn says ``"weight": 0``), cut to ``max_length``;
- :class:`Hyperparameters` is a run's settings, checked field by field;
- :func:`epoch_batches` is the order rows are seen in: a function of the seed and the epoch
  only, so a resumed run skips exactly the batches already done;
- :func:`check_update` is the guard: a run whose trainable weights do not move (or whose
  adapters do not change the model's output) fails at its first check instead of
  finishing with a normal-looking loss and a model identical to the base;
- :func:`parallel_config` is the ``prepare_model`` arguments for DDP or FSDP.

The loop that uses them on each Ray Train worker is :mod:`services.trainer.sft_loop`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Protocol, cast

IGNORE = -100
# dpo: preference optimisation on LoRA adapters; distill: a pruned student of the base
METHODS = ("lora", "full", "dpo", "distill")
SCHEDULERS = ("linear", "cosine", "constant")
PARALLEL = ("ddp", "fsdp")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
HELD_OUT_ROWS = 16
# a checkpoint's valid_loss: the first rows of the validation file, a sample about a batch's
# size as OpenAI's per-step one is (a pass over 16 rows cost more than a training step on
# two cores; the whole file is scored at the end)
CHECKPOINT_VALID_ROWS = 4
MIN_RELATIVE_CHANGE = 1e-7


class ChatTokenizer(Protocol):
    """What the encoding needs of a Hugging Face tokenizer."""

    def apply_chat_template(
        self, conversation: list[dict[str, str]], *, tokenize: bool, add_generation_prompt: bool
    ) -> Any: ...

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]: ...


# ---------------------------------------------------------------- hyperparameters


@dataclass(frozen=True)
class Hyperparameters:
    """A run's settings. Constructing one checks every field; the error names the field.

    ``batch_size`` is the global batch: with N workers each takes ``batch_size // N`` rows
    (at least one) per step.
    """

    n_epochs: int = 3
    batch_size: int = 4
    learning_rate: float = 2e-4
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    max_length: int = 512
    seed: int = 0
    method: str = "lora"
    checkpoint_every: int = 20
    warmup_ratio: float = 0.03
    scheduler: str = "linear"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    beta: float = 0.1  # dpo: how far the policy may move from the reference

    def __post_init__(self) -> None:
        ints = {
            "n_epochs": (1, 1000),
            "batch_size": (1, 4096),
            "lora_rank": (1, 1024),
            "lora_alpha": (1, 1 << 16),
            "max_length": (16, 1 << 20),
            "seed": (0, 2**31 - 1),
            "checkpoint_every": (1, 1 << 30),
        }
        floats = {
            "learning_rate": (0.0, 1.0, False),  # (low, high, low allowed)
            "lora_dropout": (0.0, 0.9, True),
            "warmup_ratio": (0.0, 0.5, True),
            "weight_decay": (0.0, 1.0, True),
            "max_grad_norm": (0.0, 1e6, False),
            "beta": (0.0, 10.0, False),
        }
        for name, (low, high) in ints.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"{name} must be an integer from {low} to {high}; got {value!r}")
        for name, (lowf, highf, closed) in floats.items():
            value = getattr(self, name)
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            if not ok or not (lowf <= value <= highf if closed else lowf < value <= highf):
                bound = "from" if closed else "above"
                raise ValueError(
                    f"{name} must be a number {bound} {lowf} to {highf}; got {value!r}"
                )
        for name, choices in (("method", METHODS), ("scheduler", SCHEDULERS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> Hyperparameters:
        """From a job's JSON; unknown keys are refused by name, integers stand for floats."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"unknown hyperparameter(s): {', '.join(unknown)}")
        given = dict(values)
        for name, value in given.items():
            if (
                known[name].type == "float"
                and isinstance(value, int)
                and not isinstance(value, bool)
            ):
                given[name] = float(value)
        return cls(**given)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------- data


@dataclass(frozen=True)
class Encoded:
    """One row as the model sees it: ``labels[i]`` is ``input_ids[i]`` where trained."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]

    @property
    def trained_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE)


@dataclass
class EncodeCounts:
    rows: int = 0
    kept: int = 0
    truncated: int = 0  # longer than max_length: cut, still trained on what is left
    dropped_truncated: int = 0  # no trained token left within max_length
    dropped_untrained: int = 0  # no assistant turn to train on (all weight 0)
    # a turn's text holds one of the tokenizer's control tokens (<|im_start|>...), which
    # would be read as a real turn boundary: a planted system or assistant turn
    dropped_control: int = 0
    tokens: int = 0
    trained_tokens: int = 0


def _render(tokenizer: ChatTokenizer, turns: list[dict[str, str]], prompt: bool) -> str:
    text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=prompt)
    if not isinstance(text, str):
        raise TypeError("the tokenizer's chat template did not render text")
    return text


def _extend(rendered: str, longer: str) -> str:
    if not longer.startswith(rendered):
        raise ValueError(
            "the chat template does not render a conversation as a prefix of its "
            "continuation; turns cannot be masked"
        )
    return longer[len(rendered) :]


def encode_row(
    messages: Sequence[Mapping[str, Any]], tokenizer: ChatTokenizer, max_length: int
) -> tuple[Encoded | None, bool]:
    """A chat row as token ids and labels, and whether it was cut to ``max_length``.

    The text is the chat template's, split at the turns: each assistant turn is what the
    template adds after the prompt with the generation cue (its content and end-of-turn
    token), so training sees the same prompt tokens as generation does. An assistant turn
    with ``"weight": 0`` is context only. Turns after the last assistant turn teach
    nothing and are left out. None: no trained token (none trained, or cut off).
    """
    turns = [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
    input_ids: list[int] = []
    labels: list[int] = []
    rendered = ""
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, turns[:index], prompt=True)
        full = _render(tokenizer, turns[: index + 1], prompt=False)
        trained = message.get("weight", 1) != 0
        for text, learn in ((_extend(rendered, prompt), False), (_extend(prompt, full), trained)):
            ids = list(tokenizer.encode(text, add_special_tokens=False))
            input_ids += ids
            labels += ids if learn else [IGNORE] * len(ids)
        rendered = full
    truncated = len(input_ids) > max_length
    encoded = Encoded(tuple(input_ids[:max_length]), tuple(labels[:max_length]))
    return (encoded if encoded.trained_tokens else None), truncated


def control_tokens(tokenizer: Any) -> tuple[str, ...]:
    """The tokenizer's special and added tokens as text (what a turn must not contain)."""
    found = set(getattr(tokenizer, "all_special_tokens", ()) or ())
    added = getattr(tokenizer, "get_added_vocab", None)
    if callable(added):
        found.update(added())
    return tuple(sorted(t for t in found if t))


def encode_rows(
    rows: Sequence[Sequence[Mapping[str, Any]]],
    tokenizer: ChatTokenizer,
    max_length: int,
    controls: Sequence[str] = (),
) -> tuple[list[Encoded], EncodeCounts]:
    """:func:`encode_row` over a file's rows, with what was cut or dropped counted. A row
    whose text holds any of ``controls`` (:func:`control_tokens`) is dropped."""
    counts = EncodeCounts(rows=len(rows))
    kept = []
    for messages in rows:
        if not any(m["role"] == "assistant" and m.get("weight", 1) != 0 for m in messages):
            counts.dropped_untrained += 1
            continue
        if any(c in str(m["content"]) for m in messages for c in controls):
            counts.dropped_control += 1
            continue
        encoded, truncated = encode_row(messages, tokenizer, max_length)
        counts.truncated += truncated
        if encoded is None:
            counts.dropped_truncated += 1
            continue
        kept.append(encoded)
        counts.tokens += len(encoded.input_ids)
        counts.trained_tokens += encoded.trained_tokens
    counts.kept = len(kept)
    return kept, counts


def read_chat_rows(path: str | Path) -> list[list[dict[str, Any]]]:
    """A chat JSONL file's rows as message dicts (role, content, weight).

    Raises:
        ValueError: a line not in the chat fine-tuning format (the message names the line),
            or a preference file.
    """
    from shared.finetune_format import ChatRow, rows

    result = []
    for number, kind, row in rows(Path(path).read_bytes()):
        if kind != "chat":
            raise ValueError(f"line {number}: a preference row; supervised training needs chat")
        turns = cast(ChatRow, row).messages
        result.append([{"role": m.role, "content": m.content, "weight": m.weight} for m in turns])
    return result


def read_preference_rows(
    path: str | Path, controls: Sequence[str] = ()
) -> tuple[list[dict[str, Any]], int]:
    """A preference JSONL file's rows in TRL's conversational preference format
    (``prompt``, ``chosen``, ``rejected``: lists of messages), and how many were dropped for
    holding one of ``controls`` (:func:`control_tokens`), which would plant a turn.

    Raises:
        ValueError: a line not in the preference format (the message names the line), or a
            chat file.
    """
    from shared.finetune_format import PreferenceRow, rows

    result, dropped = [], 0
    for number, kind, row in rows(Path(path).read_bytes()):
        if kind != "preference":
            raise ValueError(f"line {number}: a chat row; preference training needs pairs")
        pair = cast(PreferenceRow, row)
        prompt = [{"role": m.role, "content": m.content} for m in pair.prompt]
        chosen = [{"role": "assistant", "content": pair.preferred}]
        rejected = [{"role": "assistant", "content": pair.rejected}]
        texts = [m["content"] for m in prompt] + [pair.preferred, pair.rejected]
        if any(c in text for text in texts for c in controls):
            dropped += 1
            continue
        result.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return result, dropped


def epoch_batches(
    n_rows: int, batch_size: int, seed: int, epoch: int, *, rank: int = 0, world_size: int = 1
) -> list[list[int]]:
    """The row indices of each of this rank's batches in ``epoch``.

    The shuffle depends on ``seed`` and ``epoch`` only; the order is padded (by repeating
    its start) to a multiple of the world size, so every rank has as many batches.
    """
    order = list(range(n_rows))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    order += order[: (-len(order)) % world_size]
    shard = order[rank::world_size]
    per_rank = max(1, batch_size // world_size)
    return [shard[i : i + per_rank] for i in range(0, len(shard), per_rank)]


def steps_per_epoch(n_rows: int, batch_size: int, world_size: int = 1) -> int:
    return len(epoch_batches(n_rows, batch_size, 0, 0, world_size=world_size))


def learning_rate_factor(step: int, total: int, warmup: int, scheduler: str) -> float:
    """The multiplier of the base learning rate at ``step`` (0-based): linear warm-up over
    ``warmup`` steps, then constant, linear or cosine decay to zero at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    if scheduler == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if scheduler == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return max(0.0, 1.0 - progress)


# ---------------------------------------------------------------- the guard


class NoOpUpdateError(RuntimeError):
    """Training ran but changed nothing the model uses."""


@dataclass(frozen=True)
class UpdateCheck:
    """What the guard measures at a checkpoint, against the weights the run started from."""

    step: int
    relative_change: float  # ||trained - start|| / ||start|| (sampled for full training)
    lora_b_nonzero: int | None = None  # LoRA B matrices holding a non-zero entry
    lora_b_total: int | None = None
    output_change: float | None = None  # max |logit with adapters - logit without|


def check_update(check: UpdateCheck, min_change: float = MIN_RELATIVE_CHANGE) -> None:
    """Fail when the trained weights did not move or cannot affect the output.

    Raises:
        NoOpUpdateError: naming what is unchanged (the loss may look normal meanwhile).
    """
    why = []
    if not check.relative_change > min_change:
        why.append(f"the trainable weights moved by {check.relative_change:.3g} (relative)")
    if check.lora_b_total and not check.lora_b_nonzero:
        why.append(f"all {check.lora_b_total} LoRA B matrices are still zero")
    if check.output_change is not None and not check.output_change > 0.0:
        why.append("the adapters do not change the model's output")
    if why:
        raise NoOpUpdateError(
            f"training is a no-op after {check.step} step(s): {'; '.join(why)}. The optimizer "
            "is not updating the weights the model uses (adapter not attached, frozen "
            "parameters, or a zero learning rate); stopping rather than saving a copy of the base"
        )


# ---------------------------------------------------------------- parallelism


def parallel_config(parallel: str, *, workers: int, use_gpu: bool) -> dict[str, Any]:
    """The keyword arguments of ``ray.train.torch.prepare_model`` for ``parallel``.

    ``ddp`` replicates the model on every worker and averages gradients (CPU or GPU; a
    single worker is not wrapped). ``fsdp`` shards parameters, gradients and optimizer
    state across GPU workers, each decoder layer its own unit (``auto_wrap`` is resolved
    against the model by the loop); ``use_orig_params`` lets frozen base weights and
    trainable adapters share a unit.

    Raises:
        ValueError: an unknown strategy, or FSDP without GPUs (the message names ``parallel``).
    """
    if parallel not in PARALLEL:
        raise ValueError(f"parallel must be one of {', '.join(PARALLEL)}; got {parallel!r}")
    if parallel == "ddp":
        return {"parallel_strategy": "ddp", "parallel_strategy_kwargs": {}}
    if not use_gpu:
        raise ValueError("parallel: fsdp shards across GPUs; it needs use_gpu true")
    kwargs: dict[str, Any] = {"use_orig_params": True, "sync_module_states": True}
    if workers > 1:
        kwargs["auto_wrap"] = "decoder_layers"
    return {"parallel_strategy": "fsdp", "parallel_strategy_kwargs": kwargs}
