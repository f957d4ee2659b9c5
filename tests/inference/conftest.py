"""The real default model, loaded once for the inference tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from services.inference.generation import EngineSettings
from services.inference.model.engine import Engine
from services.inference.model.gguf_model import GgufModel, load_gguf, smollm2_path
from services.inference.model.llama import Llama
from services.inference.model.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def gguf_model() -> GgufModel:
    torch.set_num_threads(2)
    return load_gguf(smollm2_path())


@pytest.fixture(scope="session")
def tokenizer(gguf_model: GgufModel) -> Tokenizer:
    return Tokenizer(gguf_model.tokenizer)


@pytest.fixture(scope="session")
def llama(gguf_model: GgufModel) -> Llama:
    return Llama(gguf_model, keep_source=True)


@pytest.fixture(scope="session")
def engine(llama: Llama, tokenizer: Tokenizer) -> Iterator[Engine]:
    engine = Engine(llama, tokenizer, EngineSettings(max_batch=16, max_seq_len=1024))
    engine.start()
    yield engine
    engine.stop()


def chat_ids(tokenizer: Tokenizer, question: str) -> list[int]:
    return tokenizer.encode(tokenizer.render_chat([{"role": "user", "content": question}]))
