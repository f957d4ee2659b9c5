"""A trained model back to GGUF, the registry's and llama.cpp's format.

The base model's GGUF is the template: its metadata (architecture, tokenizer, chat template)
and its tensor list are copied, and each tensor's values are replaced by the trained
weights (:func:`export_gguf`), or by a registered file's own weights at another precision
(:func:`requantize_gguf`, the edge export). Precisions (:data:`QUANTS`):

- ``q8_0`` (the trainer's output): 2-D weights in Q8_0, norms in F32. Q8_0 keeps a LoRA
  fine-tune's effect where re-quantizing to Q4_1 was seen to erase it.
- ``q4_0`` (edge devices): the decoder layers' 2-D weights in Q4_0; the token embedding
  (which is also the output head when they are tied) stays Q8_0, as llama.cpp keeps its
  output head at higher precision. Only behind a quality check
  (:mod:`services.trainer.quant_check`): 4 bits can erase a fine-tune.
- ``f32``: no quantization; the reference the quality check compares against.

Names: Hugging Face's Llama weights map onto llama.cpp's (``model.layers.3.self_attn.q_proj``
-> ``blk.3.attn_q``). llama.cpp stores the query and key projections with their rotary
halves interleaved per head; Hugging Face's loader undoes that when it reads a GGUF, so the
export does it again (:func:`interleave_rotary`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from shared.logging import get_logger

log = get_logger(__name__)
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
TOP_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
WRITTEN_BY_WRITER = ("general.architecture", "general.file_type")
QUANTS = ("q8_0", "q4_0", "f32")
BLOCK = 32  # the row length Q8_0 and Q4_0 blocks need


class ExportError(ValueError):
    """The trained weights do not fit the template (a missing tensor, another shape)."""


def hf_name(gguf_name: str) -> str:
    """The Hugging Face weight that a llama.cpp tensor holds.

    Raises:
        ExportError: a tensor name this export does not know.
    """
    stem, _, kind = gguf_name.rpartition(".")
    parts = stem.split(".")
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in LAYER_NAMES:
        return f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.{kind}"
    if stem in TOP_NAMES:
        return f"{TOP_NAMES[stem]}.{kind}"
    raise ExportError(f"no Hugging Face weight is known for tensor {gguf_name}")


def interleave_rotary(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's layout of a query or key projection ([heads * head_dim, hidden]):
    within each head, the two rotary halves interleaved."""
    rows = weight.shape[0]
    shaped = weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:])
    return shaped.swapaxes(1, 2).reshape(weight.shape)


def export_gguf(
    weights: Mapping[str, Any],
    template: Path,
    out: Path,
    *,
    name: str | None = None,
    quant: str = "q8_0",
    layers: int | None = None,
    ffn: int | None = None,
) -> Path:
    """Write ``weights`` (a Hugging Face Llama state dict of tensors or arrays) as a GGUF
    shaped like ``template`` at ``quant`` (:data:`QUANTS`); returns ``out``.

    A pruned student (``layers`` decoder layers, feed-forward width ``ffn``: fewer than the
    template's) is written with its own layer count and width; without them the weights
    must fill the template exactly.

    Raises:
        ExportError: a template tensor has no trained weight, or another shape; weights of
            more layers than the export writes.
        ValueError: an unknown ``quant``.
    """
    import gguf

    reader = gguf.GGUFReader(str(template))
    heads, kv_heads = _heads(reader)
    arch = str(reader.fields["general.architecture"].contents())
    shape: dict[str, int] = {}
    if layers is not None:
        held = _layers(weights)
        if held != layers:
            raise ExportError(f"the weights hold {held} decoder layers, the student {layers}")
        shape[f"{arch}.block_count"] = layers
    if ffn is not None:
        shape[f"{arch}.feed_forward_length"] = ffn
    arrays = {
        tensor.name: _trained(weights, tensor, heads, kv_heads, ffn)
        for tensor in reader.tensors
        if layers is None or _layer(tensor.name) < layers
    }
    return _write(reader, arrays, out, quant=quant, name=name, overrides=shape)


def _layer(gguf_name: str) -> int:
    """The decoder layer a tensor belongs to (-1: none)."""
    match = re.match(r"blk\.(\d+)\.", gguf_name)
    return int(match.group(1)) if match else -1


def _layers(weights: Mapping[str, Any]) -> int:
    """How many decoder layers ``weights`` hold."""
    found = {int(m.group(1)) for k in weights if (m := re.match(r"model\.layers\.(\d+)\.", k))}
    return len(found)


def requantize_gguf(source: Path, out: Path, *, quant: str, name: str | None = None) -> Path:
    """``source``'s own weights, dequantized and written again at ``quant``; returns ``out``.

    Raises:
        ValueError: an unknown ``quant``, or a tensor type the ``gguf`` package cannot read.
    """
    import gguf
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(str(source))
    arrays = {}
    for tensor in reader.tensors:
        shape = tuple(int(n) for n in reversed(tensor.shape))
        values = dequantize(tensor.data, tensor.tensor_type)
        arrays[tensor.name] = np.ascontiguousarray(values.reshape(shape), dtype=np.float32)
    return _write(reader, arrays, out, quant=quant, name=name)


def _heads(reader: Any) -> tuple[int, int]:
    arch = str(reader.fields["general.architecture"].contents())
    heads = int(reader.fields[f"{arch}.attention.head_count"].contents())
    kv_field = reader.fields.get(f"{arch}.attention.head_count_kv")
    return heads, int(kv_field.contents()) if kv_field is not None else heads


def tensor_type(name: str, shape: tuple[int, ...], quant: str) -> str:
    """The GGML type a tensor is written in at ``quant`` (see the module's docstring).

    Raises:
        ValueError: an unknown ``quant``, naming the choices.
    """
    if quant not in QUANTS:
        raise ValueError(f"quant must be one of {', '.join(QUANTS)}; got {quant!r}")
    if quant == "f32" or len(shape) != 2 or shape[-1] % BLOCK:
        return "F32"
    if quant == "q4_0" and name.startswith("blk."):
        return "Q4_0"
    return "Q8_0"


Q4_0_SCALES = np.linspace(0.8, 1.0625, 15)
"""Factors of llama.cpp's step tried per block. At most 17/16, so the block's largest
magnitude still rounds to code 0 (or clips there): a reader that infers the grid from a
block's extreme values (our engine's :func:`~services.inference.model.quant.four_bit_grid`)
then reads every block exactly."""


def quantize_q4_0(array: np.ndarray) -> np.ndarray:
    """GGUF Q4_0 blocks of ``array`` [rows, K] as bytes [rows, K / 32 * 18]: per block of
    32 values an fp16 step d and 16 bytes of codes q in [0, 15] (byte j: value j in the low
    nibble, value j + 16 in the high one), each value ``d * (q - 8)``.

    llama.cpp's reference quantizer puts the block's largest magnitude at code 0
    (d = that value / -8); here d is that times the factor among :data:`Q4_0_SCALES` that
    reconstructs the block best (on three of SmolLM2's layers, 0.80x the reference's
    squared error; ``tests/trainer/test_edge_export.py`` checks it is below 0.9x). Any
    reader of Q4_0 reads the result: only the choice of d differs.
    """
    rows, width = array.shape
    blocks = np.ascontiguousarray(array, dtype=np.float32).reshape(-1, BLOCK)
    extreme = blocks[np.arange(len(blocks)), np.abs(blocks).argmax(axis=1)]
    best_d = np.zeros(len(blocks), dtype=np.float16)
    best_error = np.full(len(blocks), np.inf, dtype=np.float32)
    best_codes = np.zeros(blocks.shape, dtype=np.uint8)
    for factor in Q4_0_SCALES:
        d = (extreme / -8 * factor).astype(np.float16)
        step = d.astype(np.float32)[:, None]
        inverse = np.divide(1.0, step, out=np.zeros_like(step), where=step != 0)
        codes = np.clip(np.round(blocks * inverse) + 8, 0, 15)
        error = np.square((codes - 8) * step - blocks).sum(axis=1)
        better = error < best_error
        best_error = np.where(better, error, best_error)
        best_d = np.where(better, d, best_d)
        best_codes[better] = codes[better].astype(np.uint8)
    packed = best_codes[:, : BLOCK // 2] | (best_codes[:, BLOCK // 2 :] << 4)
    out = np.concatenate([best_d[:, None].view(np.uint8), packed], axis=1)
    return out.reshape(rows, width // BLOCK * 18)


def _write(
    reader: Any, arrays: Mapping[str, np.ndarray], out: Path, *, quant: str, name: str | None,
    overrides: Mapping[str, int] | None = None,
) -> Path:  # fmt: skip
    """``arrays`` (llama.cpp's names and layout) as a GGUF with ``reader``'s metadata
    (integer fields in ``overrides`` replaced: a pruned student's layer count and width)."""
    import gguf

    types = {n: tensor_type(n, a.shape, quant) for n, a in arrays.items()}  # checks quant
    file_type = {
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
        "f32": gguf.LlamaFileType.ALL_F32,
    }[quant]
    arch = str(reader.fields["general.architecture"].contents())
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".part")
    writer = gguf.GGUFWriter(str(partial), arch=arch)
    for field in reader.fields.values():
        if field.name in WRITTEN_BY_WRITER or field.name.startswith("GGUF."):
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        value = field.contents()
        if field.name == "general.name" and name is not None:
            value = name
        if overrides and field.name in overrides:
            value = overrides[field.name]
        writer.add_key_value(field.name, value, value_type, sub_type=sub_type)
    writer.add_file_type(file_type)
    for tensor_name, array in arrays.items():
        kind = types[tensor_name]
        if kind == "F32":
            writer.add_tensor(tensor_name, array)
            continue
        qtype = getattr(gguf.GGMLQuantizationType, kind)
        packed = quantize_q4_0(array) if kind == "Q4_0" else gguf.quants.quantize(array, qtype)
        writer.add_tensor(tensor_name, packed, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.replace(out)
    log.info("exported", path=str(out), tensors=len(arrays), quantization=quant)
    return out


def _trained(
    weights: Mapping[str, Any], tensor: Any, heads: int, kv_heads: int, ffn: int | None
) -> np.ndarray:
    """The trained values of one template tensor, in llama.cpp's layout (the feed-forward
    tensors ``ffn`` wide where the student was pruned)."""
    source = hf_name(tensor.name)
    if source not in weights:
        if tensor.name == "output.weight" and "model.embed_tokens.weight" in weights:
            source = "model.embed_tokens.weight"  # tied embeddings
        else:
            raise ExportError(f"the trained model has no {source} (for {tensor.name})")
    array = _numpy(weights[source])
    expected = tuple(int(n) for n in reversed(tensor.shape))
    if ffn is not None and tensor.name.endswith(("ffn_gate.weight", "ffn_up.weight")):
        expected = (ffn, expected[1])
    elif ffn is not None and tensor.name.endswith("ffn_down.weight"):
        expected = (expected[0], ffn)
    if array.shape != expected:
        raise ExportError(f"{source} has shape {array.shape}, {tensor.name} {expected}")
    if tensor.name.endswith("attn_q.weight"):
        return interleave_rotary(array, heads)
    if tensor.name.endswith("attn_k.weight"):
        return interleave_rotary(array, kv_heads)
    return array


def _numpy(value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return np.ascontiguousarray(value, dtype=np.float32)
    return np.ascontiguousarray(value.detach().to("cpu").float().numpy(), dtype=np.float32)


def load_weights(model_dir: Path) -> dict[str, Any]:
    """The tensors of a saved Hugging Face model folder (its safetensors files)."""
    from safetensors.torch import load_file

    weights: dict[str, Any] = {}
    for part in sorted(model_dir.glob("*.safetensors")):
        weights.update(load_file(str(part)))
    if not weights:
        raise ExportError(f"{model_dir} holds no .safetensors files")
    return weights
