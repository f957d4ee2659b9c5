"""A registered model version's card: ``MODEL_CARD.md`` beside its file, written by the
registry from the manifest (:func:`render`). It says what the version is, what it was made
from and how, and what its training spent of a privacy budget, in words a reviewer reads
without opening the JSON. The manifest stays the source of truth; the card is its view."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

FILE_NAME = "MODEL_CARD.md"


def render(manifest: Mapping[str, Any]) -> str:
    """The card of a version from its manifest (``ModelEntry.manifest()``)."""
    lines = [
        f"# {_text(manifest['name'])}:{_text(manifest['version'])}",
        "",
        f"- Status: {_text(manifest.get('status', 'production'))}",
        f"- File: {_text(manifest['file_name'])} ({_text(manifest['architecture'])}, "
        f"{_text(manifest['quantization'])}, {manifest['size']:,} bytes)",
        f"- SHA-256: {_text(manifest['sha256'])}",
        f"- Registered: {_text(manifest['created_at'])} from "
        f"{_text(manifest.get('source') or 'a file')}",
    ]
    lineage = manifest.get("lineage")
    if not isinstance(lineage, Mapping):
        lines += ["", "No lineage is recorded: this version was registered from a file."]
        return "\n".join(lines) + "\n"
    lines += ["", "## How it was made", ""]
    if lineage.get("quantized_from"):
        lines.append(f"- Quantized from {_text(lineage['quantized_from'])}")
    lines += _made_from(lineage)
    lines += ["", "## Differential privacy", "", *_privacy(lineage.get("dp"))]
    if isinstance(lineage.get("distill"), Mapping):
        lines += ["", "## Distillation", "", *_distillation(lineage["distill"])]
    metrics = lineage.get("metrics")
    if isinstance(metrics, Mapping) and metrics:
        lines += ["", "## Training metrics", ""]
        source = lineage.get("held_out_source")
        if source:
            lines.append(f"Losses before/after are over held-out rows from the {source} file.")
            lines.append("")
        lines += [f"- {name}: {_number(value)}" for name, value in sorted(metrics.items())]
    if lineage.get("quant_check"):
        lines += ["", "## Quantization check", "", "```json"]
        lines += [json.dumps(lineage["quant_check"], indent=1, sort_keys=True), "```"]
    return "\n".join(lines) + "\n"


def _made_from(lineage: Mapping[str, Any]) -> list[str]:
    lines = []
    if lineage.get("base"):
        lines.append(
            f"- Base: {_text(lineage['base'])} (SHA-256 {_text(lineage.get('base_sha256'))})"
        )
    if lineage.get("method"):
        lines.append(f"- Method: {_text(lineage['method'])}")
    if lineage.get("job_id"):
        lines.append(
            f"- Job: {_text(lineage['job_id'])} for tenant {_text(lineage.get('tenant'))}, "
            f"by {_text(lineage.get('created_by'))}"
        )
    if lineage.get("dataset"):
        lines.append(f"- Dataset: {_text(lineage['dataset'])}")
    for role, file in sorted((lineage.get("files") or {}).items()):
        if file.get("sha256") is None:  # a DP-SGD candidate's: the id only
            lines.append(f"- {_text(role)}: {_text(file.get('id'))}")
            continue
        lines.append(
            f"- {_text(role)}: {_text(file.get('id'))} ({_text(file.get('rows'))} rows, "
            f"SHA-256 {_text(file.get('sha256'))})"
        )
    hyper = {k: v for k, v in (lineage.get("hyperparameters") or {}).items() if k != "dp"}
    if hyper:
        lines.append(f"- Hyperparameters: {_text(json.dumps(hyper, sort_keys=True))}")
    if lineage.get("learning_rate") is not None:
        lines.append(f"- Learning rate: {lineage['learning_rate']:g}")
    if lineage.get("seed") is not None:
        lines.append(f"- Seed: {lineage['seed']}")
    return lines


def _privacy(dp: Any) -> list[str]:
    if not isinstance(dp, Mapping):
        return ["Not trained with differential privacy."]
    return [
        f"Trained with DP-SGD: ({dp['epsilon_spent']:.3f}, {dp['delta']:.3g})-differentially "
        "private with respect to each training row (the weights; not the job's metrics).",
        "",
        f"- Epsilon spent: {dp['epsilon_spent']:.4f} (target {dp['epsilon']:g}), "
        f"from the {dp.get('accountant', '?')} accountant",
        f"- Delta: {dp['delta']:.4g}",
        f"- Noise multiplier: {dp['noise_multiplier']:.4f}; per-example clipping norm "
        f"{dp['max_grad_norm']:g}",
        f"- Steps: {dp['steps_taken']} at sample rate {dp['sample_rate']:.4f} (Poisson sampling)",
    ]


def _distillation(distill: Mapping[str, Any]) -> list[str]:
    kept = distill.get("layers_kept") or []
    return [
        f"A student pruned from {distill.get('teacher_layers', '?')} layers to {len(kept)} "
        f"(kept: {', '.join(str(i) for i in kept)}) and feed-forward width "
        f"{distill.get('teacher_intermediate_size', '?')} to "
        f"{distill.get('intermediate_size', '?')}, trained on the teacher's outputs.",
        "",
        f"- Parameters: {distill.get('student_parameters', 0):,} "
        f"(teacher {distill.get('teacher_parameters', 0):,})",
        f"- KL to the teacher on the job's held-out rows (its validation file, else its "
        f"first training rows): {_number(distill.get('kl_before'))} before training, "
        f"{_number(distill.get('kl_after'))} after",
    ]


def _text(value: Any) -> str:
    """A value as inert Markdown: one line, its markup characters escaped."""
    text = " ".join(str("?" if value is None else value).split())
    return re.sub(r"([\\`*_{}\[\]()<>#+\-.!|~])", r"\\\1", text)


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
