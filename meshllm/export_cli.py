"""``meshllm export MODEL[:VERSION] --format gguf --quant q4_0|q8_0``: a registered model as
a file for a device, checked before it is written.

It runs where the model registry is (``MESHLLM_MODEL_DIR``, else ``<data_dir>/models``, or
``--model-dir``): the registered file is verified against its SHA-256, re-quantized, and
compared with the registered file in our engine (:mod:`services.trainer.quant_check`: KL
and top-1 agreement on the general prompts and, with ``--check``, the model's own held-out
prompts such as its fine-tuning validation file). A file that fails the check is not
written (exit 1, the reasons printed). One that passes is loaded and asked the first check
prompt in our engine and, where llama-cpp-python is installed, in llama.cpp; its size and
tokens per second in each are printed and kept beside it in ``<out>.json``.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from meshllm.datasets_cli import console, errors

FORMATS = ("gguf",)
EXPORT_QUANTS = ("q4_0", "q8_0")
SPEED_TOKENS = 64


def export(
    model: Annotated[str, typer.Argument(help="MODEL or MODEL:VERSION in the registry.")],
    *,
    format: Annotated[str, typer.Option("--format", help="Only gguf.")] = "gguf",
    quant: Annotated[str, typer.Option(help="q4_0 (edge) or q8_0.")] = "q4_0",
    out: Annotated[Path | None, typer.Option(help="The file to write.")] = None,
    check: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False, help="Chat JSONL of held-out prompts to check."),
    ] = None,
    max_kl: Annotated[float, typer.Option(help="Largest mean KL (nats) that passes.")] = 0.05,
    min_top1: Annotated[float, typer.Option(help="Smallest top-1 agreement that passes.")] = 0.9,
    model_dir: Annotated[Path | None, typer.Option(help="The registry directory.")] = None,
    threads: Annotated[int, typer.Option(min=1, max=256, help="torch threads.")] = 2,
) -> None:
    """Export a registered model for a device, behind a quality check."""
    import torch

    from services.inference.registry import CorruptModel, ModelRegistry, UnknownModel
    from services.inference.settings import InferenceSettings
    from services.trainer.export import requantize_gguf
    from services.trainer.quant_check import Thresholds, check_prompts, run_check

    if format not in FORMATS:
        _fail(f"--format must be one of {', '.join(FORMATS)}; got {format!r}", code=2)
    if quant not in EXPORT_QUANTS:
        _fail(f"--quant must be one of {', '.join(EXPORT_QUANTS)}; got {quant!r}", code=2)
    try:
        thresholds = Thresholds(max_kl=max_kl, min_top1=min_top1)
        prompts = check_prompts(check)
    except ValueError as error:
        _fail(str(error), code=2)
    torch.set_num_threads(threads)
    registry = ModelRegistry(model_dir or InferenceSettings().registry_dir)
    name, _, version = model.partition(":")
    try:
        entry = registry.resolve(name, version or None)
        with console.status(f"verifying {entry.ref}"):
            entry.verify()
    except (UnknownModel, CorruptModel) as error:
        _fail(str(error))
    target = out or Path(f"{entry.name}-{entry.version}-{quant}.gguf")
    with tempfile.TemporaryDirectory(prefix="meshllm-export-", dir=target.parent or None) as tmp:
        staged = Path(tmp) / target.name
        with console.status(f"quantizing {entry.ref} to {quant}"):
            requantize_gguf(entry.path, staged, quant=quant, name=f"{entry.ref} {quant}")
        with console.status(f"checking against {entry.ref} on {len(prompts)} prompts"):
            verdict = run_check(entry.path, staged, prompts, thresholds=thresholds)
        console.print(
            f"check: KL {verdict.kl:.4f} nats, top-1 {verdict.top1:.1%}, identical greedy "
            f"answers {verdict.greedy_same:.0%} ({verdict.prompts} prompts, "
            f"{verdict.positions} positions)"
        )
        if not verdict.passed:
            _fail(f"not exported: {'; '.join(verdict.reasons())}")
        question = prompts[0]
        report: dict[str, Any] = {
            "source": entry.ref, "source_sha256": entry.sha256, "quant": quant,
            "check": verdict.as_dict(), "bytes": staged.stat().st_size,
            "source_bytes": entry.size, "question": question,
        }  # fmt: skip
        with console.status("answering in our engine"):
            report["engine"] = _engine_answer(staged, question)
        with console.status("answering in llama.cpp"):
            report["llama_cpp"] = _llama_cpp_answer(staged, question, threads)
        os.replace(staged, target)
    Path(f"{target}.json").write_text(json.dumps(report, indent=1) + "\n")
    console.print(
        f"wrote {target}: {report['bytes'] / 1e6:.1f} MB ({entry.size / 1e6:.1f} MB before)"
    )
    for engine in ("engine", "llama_cpp"):
        run = report[engine]
        if "error" in run:
            console.print(f"{engine}: {run['error']}")
        else:
            console.print(f"{engine}: {run['tokens_per_s']:.1f} tokens/s; {run['answer']!r}")


def _fail(message: str, code: int = 1) -> Any:
    errors.print(f"[red]{message}[/red]")
    raise typer.Exit(code)


def _engine_answer(path: Path, question: list[dict[str, str]]) -> dict[str, Any]:
    """The greedy answer and decode speed in our engine (the file's own precision)."""
    from services.trainer.quant_check import greedy, load_file

    loaded = load_file(path, "auto")
    ids = loaded.tokenizer.encode(loaded.tokenizer.render_chat(question))
    started = time.monotonic()
    (answer,) = greedy(loaded, [ids], SPEED_TOKENS)
    seconds = time.monotonic() - started  # prefill and the engine's start included
    if answer and answer[-1] == loaded.tokenizer.eos_id:
        answer = answer[:-1]  # counted as llama.cpp counts: generated tokens only
    return {"answer": loaded.tokenizer.decode(answer), "tokens": len(answer),
            "tokens_per_s": len(answer) / seconds}  # fmt: skip


def _llama_cpp_answer(path: Path, question: list[dict[str, str]], threads: int) -> dict[str, Any]:
    """The same in llama.cpp, when llama-cpp-python is installed (it is not a dependency)."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return {"error": "llama-cpp-python is not installed (pip install llama-cpp-python)"}
    llm: Any = Llama(model_path=str(path), n_ctx=512, n_threads=threads, verbose=False)
    started = time.monotonic()
    reply: Any = llm.create_chat_completion(
        messages=question, max_tokens=SPEED_TOKENS, temperature=0.0
    )
    seconds = time.monotonic() - started
    tokens = int(reply["usage"]["completion_tokens"])
    return {"answer": reply["choices"][0]["message"]["content"], "tokens": tokens,
            "tokens_per_s": tokens / seconds}  # fmt: skip
