"""Loading GGUF files: the real model, and clear errors for files we cannot use."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from services.inference.model.gguf_model import GgufModel, ModelLoadError, load_gguf, smollm2_path


def test_default_model_hyper_parameters(gguf_model: GgufModel) -> None:
    c = gguf_model.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads) == (30, 576, 9, 3)
    assert c.vocab_size == 49152
    assert gguf_model.tokenizer.eos_id == 2
    assert gguf_model.tokenizer.chat_template is not None
    assert "<|im_start|>" in gguf_model.tokenizer.chat_template
    assert gguf_model.tensors["blk.0.attn_k.weight"].shape == (192, 576)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no such model file"):
        load_gguf(tmp_path / "nope.gguf")


def test_not_a_gguf_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"this is not a model" * 100)
    with pytest.raises(ModelLoadError, match="not a readable GGUF file"):
        load_gguf(bad)


def test_truncated_file(tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(smollm2_path().read_bytes()[:5_000_000])
    with pytest.raises(ModelLoadError, match=r"truncated\.gguf"):
        load_gguf(truncated)


def test_unsupported_architecture(tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match="architecture 'gpt2' is not supported"):
        load_gguf(path)
