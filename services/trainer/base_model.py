"""The base model a fine-tuning job starts from: a GGUF file, dequantized once.

Training needs float weights in the Hugging Face layout, and dequantizing a GGUF file is
slow (about 40 s for a 135M model on two cores). :func:`cached_base` does it once per file
content: the dequantized model (safetensors, config, tokenizer) is kept under the caller's
cache directory, in a folder named by the GGUF file's sha256, so every later job on the
same file loads a plain Hugging Face folder in seconds.

The folder is written to a temporary name and renamed into place, so a crash mid-write
leaves no half folder a later job would trust, and a lock file makes concurrent jobs on one
machine wait for the first one's copy instead of each dequantizing.

The other end is here too: :func:`with_lora` wraps a loaded base with adapters, and
:func:`save_trained` writes a trained model back as a Hugging Face folder (the adapters
merged in) with the adapter beside it.

Layout::

    <cache_dir>/<sha256>/config.json, model.safetensors, tokenizer.json, ...
    <cache_dir>/<sha256>/meshllm-base.json     (written last: the folder is complete)
    <cache_dir>/<sha256>.lock
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.logging import get_logger

log = get_logger(__name__)

MARKER = "meshllm-base.json"
_CHUNK = 1 << 20


@dataclass
class BaseModel:
    """A loaded base: the float model, its tokenizer, and the cache folder they came from."""

    model: Any  # transformers PreTrainedModel
    tokenizer: Any  # transformers tokenizer with a chat template
    folder: Path


def sha256_file(path: Path) -> str:
    """The file's sha256 (hex), read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def _heartbeat(what: str, every_s: float = 10.0) -> Iterator[None]:
    """Log ``what`` every ``every_s`` seconds until the block ends, so a slow step shows
    it is alive rather than hung."""
    started = time.monotonic()
    done = threading.Event()

    def beat() -> None:
        while not done.wait(every_s):
            log.info(f"{what}: still working", elapsed_s=round(time.monotonic() - started))

    thread = threading.Thread(target=beat, name="base-model-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def is_complete(folder: Path) -> bool:
    """Whether ``folder`` is a finished cache entry (its marker is written last)."""
    return (folder / MARKER).is_file()


def cached_base(gguf_path: str | Path, cache_dir: str | Path) -> Path:
    """The Hugging Face folder holding ``gguf_path`` dequantized to float32, made now if the
    cache has none for this file's content.

    Raises:
        FileNotFoundError: no such GGUF file.
    """
    gguf = Path(gguf_path)
    if not gguf.is_file():
        raise FileNotFoundError(f"no base model file at {gguf}")
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    digest = sha256_file(gguf)
    log.info("base model hashed", file=gguf.name, sha256=digest[:16], seconds=_since(started))
    folder = cache / digest
    if is_complete(folder):
        return folder
    with _locked(cache / f"{digest}.lock"):
        if is_complete(folder):  # another job made it while this one waited
            return folder
        _build(gguf, digest, folder)
    return folder


def _build(gguf: Path, digest: str, folder: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    temporary = folder.parent / f".{digest}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    started = time.monotonic()
    log.info("dequantizing the base model once for training (cached afterwards)", file=gguf.name)
    try:
        with _heartbeat("dequantizing the base model"):
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
            )
        log.info("base model dequantized", seconds=_since(started))
        _forget_gguf_quantizer(model)
        with _heartbeat("writing the dequantized base model"):
            model.save_pretrained(str(temporary))
            tokenizer.save_pretrained(str(temporary))
        marker = {
            "gguf_file": gguf.name,
            "gguf_sha256": digest,
            "architecture": type(model).__name__,
            "parameters": sum(p.numel() for p in model.parameters()),
        }
        (temporary / MARKER).write_text(json.dumps(marker, indent=1) + "\n")
        if folder.exists():  # an incomplete leftover of a crashed writer
            shutil.rmtree(folder)
        os.rename(temporary, folder)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    log.info("base model cached", folder=str(folder), seconds=_since(started))


def _forget_gguf_quantizer(model: Any) -> None:
    """The weights are already float32 after the GGUF load, but the model still carries the
    GGUF quantizer, which makes ``save_pretrained`` refuse; a plain float model is what the
    cache holds."""
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def load_base(folder: str | Path) -> BaseModel:
    """The float32 model and tokenizer of a cache folder made by :func:`cached_base`.

    Raises:
        FileNotFoundError: ``folder`` is not a complete cache entry.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(folder)
    if not is_complete(path):
        raise FileNotFoundError(f"{path} is not a complete base model cache entry")
    started = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    log.info("base model loaded", folder=path.name[:16], seconds=_since(started))
    return BaseModel(model=model, tokenizer=tokenizer, folder=path)


def _since(started: float) -> float:
    return round(time.monotonic() - started, 1)


def with_lora(model: Any, rank: int, alpha: int, dropout: float, targets: Sequence[str]) -> Any:
    """``model`` wrapped with LoRA adapters on the linear layers named in ``targets``
    (those the architecture has); only the adapters are trainable.

    Raises:
        ValueError: the model has none of ``targets``.
    """
    from peft import get_peft_model

    return get_peft_model(model, lora_config(model, rank, alpha, dropout, targets))


def lora_config(model: Any, rank: int, alpha: int, dropout: float, targets: Sequence[str]) -> Any:
    """The PEFT ``LoraConfig`` :func:`with_lora` applies (for trainers that wrap the model
    themselves).

    Raises:
        ValueError: the model has none of ``targets``.
    """
    from peft import LoraConfig

    present = sorted({name.rsplit(".", 1)[-1] for name, _ in model.named_modules()} & set(targets))
    if not present:
        raise ValueError(f"the base model has none of the LoRA target layers {list(targets)}")
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=present,
        task_type="CAUSAL_LM",
    )


def save_trained(
    model: Any, tokenizer: Any, base_folder: Path | None, output_dir: Path
) -> dict[str, Any]:
    """Write the trained model as a Hugging Face folder (``<output_dir>/model``: the LoRA
    merged into the base weights) and, for LoRA, the adapter alone (``<output_dir>/adapter``).

    Each folder is written under a temporary name and renamed into place. The model is
    merged in place (it is no longer a PEFT model afterwards). Returns the folders and
    ``weight_delta_norm``: the Frobenius norm of the merged weights minus the base's (None
    without ``base_folder``: a pruned student's tensors are not the base's).
    """
    from peft import PeftModel

    written: dict[str, Any] = {}
    model = model.to("cpu")
    if isinstance(model, PeftModel):
        written["adapter_dir"] = str(
            _replace_folder(output_dir / "adapter", lambda path: model.save_pretrained(str(path)))
        )
        model = model.merge_and_unload()

    def write_model(path: Path) -> None:
        model.save_pretrained(str(path))
        tokenizer.save_pretrained(str(path))

    written["model_dir"] = str(_replace_folder(output_dir / "model", write_model))
    written["weight_delta_norm"] = (
        None if base_folder is None else weight_delta_norm(model.state_dict(), base_folder)
    )
    return written


def weight_delta_norm(state: Mapping[str, Any], base_folder: Path) -> float:
    """sqrt(sum ||w - w_base||^2) over the tensors ``state`` shares with the base's
    safetensors, read one tensor at a time so the base is never loaded twice in memory."""
    from safetensors import safe_open

    total = 0.0
    with safe_open(str(base_folder / "model.safetensors"), framework="pt") as base:
        names = set(base.keys())
        for name, tensor in state.items():
            if name in names:
                diff = tensor.detach().float() - base.get_tensor(name).float()
                total += float(diff.pow(2).sum())
    return float(total**0.5)


def _replace_folder(final: Path, write: Callable[[Path], None]) -> Path:
    temporary = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(temporary)
        if final.exists():
            shutil.rmtree(final)
        os.rename(temporary, final)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return final
