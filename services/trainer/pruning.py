"""Structured pruning of a Llama-shaped model into a distillation student: whole decoder
layers removed, and feed-forward channels removed in every layer kept.

Which to remove is measured on the job's own text (the calibration rows), not guessed:

- **layers** (:func:`layer_scores`): a layer whose output hidden state points the same way
  as its input changes little (ShortGPT's "block influence": one minus the cosine
  similarity of the two, averaged over the real tokens). The lowest-scoring layers go; the
  first and the last layer always stay (removing either hurts most in published ablations).
- **channels** (:func:`channel_scores`): a feed-forward channel's contribution is the size of
  its activation (``silu(gate) * up``) on the calibration tokens times the norm of its column
  in the down projection; the weakest go. The channels kept are a multiple of 32, the row
  length GGUF's block quantizations need.

:func:`prune` builds the student in place from a copy of the teacher: the layers kept in
order (renumbered, so the KV cache indexes them right), their projections sliced, the
config updated. The scoring functions take tensors and return plain lists; nothing here
reads or writes files.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Sequence
from typing import Any

from shared.training_requests import StudentShape

__all__ = ["StudentShape", "calibrate", "choose_layers", "cut_copy", "prune", "top_channels"]


def layer_scores(hidden_states: Sequence[Any], mask: Any) -> list[float]:
    """Each layer's block influence: ``1 - cos(input, output)`` averaged over the positions
    where ``mask`` is 1. ``hidden_states`` is the model's (embeddings, then each layer's
    output), as transformers returns them with ``output_hidden_states``."""
    import torch

    weights = mask.to(torch.float32)
    scores = []
    for before, after in itertools.pairwise(hidden_states):
        cosine = torch.nn.functional.cosine_similarity(before.float(), after.float(), dim=-1)
        scores.append(float(((1 - cosine) * weights).sum() / weights.sum().clamp(min=1)))
    return scores


def choose_layers(scores: Sequence[float], keep: int) -> list[int]:
    """The ``keep`` layers to keep, in order: the first, the last, and the highest-scoring
    of the rest.

    Raises:
        ValueError: ``keep`` below 2 or above the layers there are.
    """
    total = len(scores)
    if not 2 <= keep <= total:
        raise ValueError(f"a student keeps 2 to {total} layers; asked for {keep}")
    middle = sorted(range(1, total - 1), key=lambda i: scores[i], reverse=True)[: keep - 2]
    return sorted({0, total - 1, *middle})


def channel_scores(activations: Any, mask: Any, down_weight: Any) -> Any:
    """Each feed-forward channel's contribution: mean ``|silu(gate) * up|`` over the real
    tokens (``activations``: batch x tokens x channels) times its down-projection column's
    norm (``down_weight``: hidden x channels)."""
    weights = mask.to(activations.dtype).unsqueeze(-1)
    size = (activations.abs() * weights).sum((0, 1)) / weights.sum().clamp(min=1)
    return size * down_weight.norm(dim=0)


def calibrate(model: Any, batches: Sequence[dict[str, Any]]) -> tuple[list[float], list[Any]]:
    """Layer scores and per-layer channel scores of ``model`` on ``batches`` (collated rows:
    ``input_ids``, ``attention_mask``), averaged over the batches."""
    import torch

    layers = model.model.layers
    captured: dict[int, Any] = {}

    def hook(index: int) -> Any:
        def save(module: Any, inputs: tuple[Any, ...], output: Any) -> None:
            captured[index] = inputs[0].detach()  # the down projection's input

        return save

    handles = [layer.mlp.down_proj.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    layer_total = [0.0] * len(layers)
    channel_total: list[Any] = [0] * len(layers)
    try:
        model.eval()
        with torch.no_grad():
            for batch in batches:
                out = model(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    output_hidden_states=True,
                )  # fmt: skip
                mask = batch["attention_mask"]
                for i, score in enumerate(layer_scores(out.hidden_states, mask)):
                    layer_total[i] += score / len(batches)
                for i, layer in enumerate(layers):
                    scores = channel_scores(captured[i], mask, layer.mlp.down_proj.weight)
                    channel_total[i] = channel_total[i] + scores / len(batches)
    finally:
        for handle in handles:
            handle.remove()
    return layer_total, channel_total


def cut_copy(teacher: Any, keep_layers: Sequence[int], channels: Sequence[Any] | None) -> Any:
    """A student made of a copy of ``teacher``'s layers ``keep_layers`` only (the others
    are never copied, so the peak is one teacher and one student), cut by :func:`prune`."""
    import torch

    layers = teacher.model.layers
    teacher.model.layers = torch.nn.ModuleList([layers[i] for i in keep_layers])
    try:
        student = copy.deepcopy(teacher)
    finally:
        teacher.model.layers = layers
    return prune(student, keep_layers, channels, copied=True)


def prune(
    model: Any, keep_layers: Sequence[int], channels: Sequence[Any] | None, *,
    copied: bool = False,
) -> Any:  # fmt: skip
    """``model`` (a copy of the teacher: changed in place and returned) cut to the layers
    ``keep_layers`` and, with ``channels`` (for each kept layer, the indices of the
    feed-forward channels it keeps), to those channels. ``copied``: ``model`` already holds
    only the kept layers, in order (:func:`cut_copy`)."""
    import torch

    old = model.model.layers
    chosen: list[Any] = list(old) if copied else [old[i] for i in keep_layers]
    kept = torch.nn.ModuleList(chosen)
    for position, layer in enumerate(chosen):
        layer.self_attn.layer_idx = position  # the KV cache is indexed by it
    model.model.layers = kept
    config = model.config
    config.num_hidden_layers = len(kept)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in keep_layers]
    if channels is not None:
        sizes = {len(c) for c in channels}
        if len(sizes) != 1 or len(channels) != len(kept):
            raise ValueError("every kept layer must keep the same number of channels")
        for layer, index in zip(chosen, channels, strict=True):
            mlp = layer.mlp
            mlp.gate_proj = _rows(mlp.gate_proj, index)
            mlp.up_proj = _rows(mlp.up_proj, index)
            mlp.down_proj = _columns(mlp.down_proj, index)
            mlp.intermediate_size = len(index)
        config.intermediate_size = sizes.pop()
    return model


def top_channels(scores: Any, count: int) -> Any:
    """The ``count`` highest-scoring channel indices, in their original order."""
    import torch

    return torch.sort(torch.topk(scores, count).indices).values


def _rows(linear: Any, index: Any) -> Any:
    import torch

    cut = torch.nn.Linear(linear.in_features, len(index), bias=linear.bias is not None)
    with torch.no_grad():
        cut.weight.copy_(linear.weight[index])
        if linear.bias is not None:
            cut.bias.copy_(linear.bias[index])
    return cut


def _columns(linear: Any, index: Any) -> Any:
    import torch

    cut = torch.nn.Linear(len(index), linear.out_features, bias=linear.bias is not None)
    with torch.no_grad():
        cut.weight.copy_(linear.weight[:, index])
        if linear.bias is not None:
            cut.bias.copy_(linear.bias)
    return cut
