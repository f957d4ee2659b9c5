"""A trained model's 4-bit file, made only when it still answers like the trained model.

The job process calls :func:`edge_export` after training, once Ray is stopped: the trained
weights are written as an F32 GGUF (the float result, exactly) and as ``Q4_0``; the two are
compared in our engine (:mod:`services.trainer.quant_check`) on the general prompts and on
the job's own prompts (its validation file, else its training file: where the fine-tune's
effect is), and the 4-bit file is kept only when the check passes. The runner registers a
kept file as a second candidate version beside the Q8_0 one, with the verdict in its
lineage; a failed verdict is recorded on the job and the Q8_0 version stands alone.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from services.trainer.export import export_gguf, load_weights
from services.trainer.quant_check import Thresholds, check_prompts, run_check

SPEC_EDGE_QUANTS = ("q4_0", "none")  # what a job spec may ask for
MAX_JOB_PROMPTS = 24  # the job's rows the check answers, beside the general prompts


def edge_export(
    model_dir: Path,
    base_gguf: Path,
    out_dir: Path,
    prompts_file: Path,
    *,
    quant: str = "q4_0",
    thresholds: Thresholds | None = None,
    keep_failed: bool = False,
    student: Mapping[str, Any] | None = None,
    private: bool = False,
) -> dict[str, Any]:
    """Export ``model_dir`` at ``quant`` (q4_0, or q8_0 to measure it) behind the check;
    what happened, as JSON.

    ``path`` is the kept file, or None when the check failed (the file is then deleted,
    unless ``keep_failed``: a benchmark measures it all the same). ``student``: a
    distillation job's result (its ``layers_kept`` and ``intermediate_size``), for a model
    smaller than the base. ``private``: a DP-SGD job's model, checked on the general prompts
    only (a verdict on the job's own rows would be computed on them without noise).

    Raises:
        ValueError: ``quant`` is not one this export makes.
    """
    if quant not in ("q4_0", "q8_0"):
        raise ValueError(f"quant must be q4_0 or q8_0; got {quant!r}")
    started = time.monotonic()
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = load_weights(model_dir)
    shape: dict[str, Any] = {}
    if student:
        shape = {"layers": len(student["layers_kept"]), "ffn": student["intermediate_size"]}
    reference = export_gguf(weights, base_gguf, out_dir / "float.F32.gguf", quant="f32", **shape)
    edge = export_gguf(
        weights, base_gguf, out_dir / f"model.{quant.upper()}.gguf", quant=quant, **shape
    )
    del weights
    general = check_prompts()
    own = [] if private else check_prompts(prompts_file)[len(general) :][:MAX_JOB_PROMPTS]
    try:
        verdict = run_check(
            reference, edge, [*general, *own], thresholds=thresholds, reference_quant="fp32"
        )
    finally:
        reference.unlink(missing_ok=True)
    kept = verdict.passed or keep_failed
    size = edge.stat().st_size
    if not kept:
        edge.unlink(missing_ok=True)
    return {
        "quant": quant,
        "check": verdict.as_dict(),
        "reasons": verdict.reasons(),
        "path": str(edge) if kept else None,
        "bytes": size,
        "seconds": round(time.monotonic() - started, 1),
    }
