"""Loading a model version for serving: the registry's entry, its GGUF, the engine that
runs it (the torch engine on CPU or vLLM on GPU), and what the replica reports of it."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from services.inference.engine_protocol import TextEngine
from services.inference.generation import EngineSettings
from services.inference.model.engine import Engine
from services.inference.model.gguf_model import GgufModel, ModelLoadError, load_gguf
from services.inference.model.llama import Llama
from services.inference.model.quant import resolve_mode
from services.inference.model.tokenizer import Tokenizer
from services.inference.registry import ModelEntry
from services.inference.vllm_engine import VllmEngine, VllmEngineSettings
from shared.logging import get_logger

log = get_logger(__name__)


def build_llama(model: GgufModel, quant: str) -> Llama:
    """The torch model with ``quant`` weights; the GGUF's dequantized tensors are freed.

    Raises:
        ModelLoadError: an unknown quantization mode.
    """
    try:
        return Llama(model, quant)
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from exc


@dataclass(eq=False)
class LoadedModel:
    """One model version on its own running engine, with its in-flight request count."""

    entry: ModelEntry
    engine: TextEngine
    tokenizer: Tokenizer
    quant: str
    in_flight: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.idle.set()

    @property
    def model_id(self) -> str:
        return self.entry.ref

    @property
    def fingerprint(self) -> str:
        return f"{self.entry.version}-{self.quant}-{self.entry.sha256[:8]}"

    def acquire(self) -> None:
        self.in_flight += 1
        self.idle.clear()

    def release(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self.idle.set()


def load_model(
    entry: ModelEntry, settings: EngineSettings, quant: str, *, verify: bool = True
) -> LoadedModel:
    """Read, build and start ``entry`` (blocking: seconds; run it in a thread).

    :class:`VllmEngineSettings` select the vLLM backend, which runs the file's own
    quantization (``quant`` does not apply); any other settings, the torch engine.

    Raises:
        ModelLoadError: the file is corrupt (``CorruptModel``) or unusable, or the vLLM
            backend is selected where vLLM is not installed.
    """
    started = time.monotonic()
    if verify:
        entry.verify()
    engine: TextEngine
    if isinstance(settings, VllmEngineSettings):
        vllm_engine = VllmEngine(entry.path, settings)
        engine, tokenizer, quant = vllm_engine, vllm_engine.tokenizer, "gguf"
    else:
        gguf = load_gguf(entry.path)
        tokenizer = Tokenizer(gguf.tokenizer)
        try:
            quant = resolve_mode(quant, gguf.tensor_types).value  # "auto": the file's own
        except ValueError as exc:
            raise ModelLoadError(str(exc)) from exc
        engine = Engine.launch(lambda: build_llama(gguf, quant), tokenizer, settings)
        del gguf
    engine.start()
    log.info(
        "model loaded",
        model=entry.ref,
        quant=quant,
        seconds=round(time.monotonic() - started, 2),
    )
    return LoadedModel(entry, engine, tokenizer, quant)
