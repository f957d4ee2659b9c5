"""A trained model back to GGUF, the registry's and llama.cpp's format.

The base model's GGUF is the template: its metadata (architecture, tokenizer, chat template)
and its tensor list are copied, and each tensor's values are replaced by the trained
weights, stored as ``Q8_0`` (2-D weights) or ``F32`` (norms). Q8_0 keeps a LoRA
fine-tune's effect where re-quantizing to Q4_1 was seen to erase it; 4-bit export is for
the edge export, behind a quality check (not here).

Names: Hugging Face's Llama weights map onto llama.cpp's (``model.layers.3.self_attn.q_proj``
-> ``blk.3.attn_q``). llama.cpp stores the query and key projections with their rotary
halves interleaved per head; Hugging Face's loader undoes that when it reads a GGUF, so the
export does it again (:func:`interleave_rotary`).
"""

from __future__ import annotations

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
    weights: Mapping[str, Any], template: Path, out: Path, *, name: str | None = None
) -> Path:
    """Write ``weights`` (a Hugging Face Llama state dict of tensors or arrays) as a GGUF
    shaped like ``template``; returns ``out``.

    Raises:
        ExportError: a template tensor has no trained weight, or another shape.
    """
    import gguf

    reader = gguf.GGUFReader(str(template))
    arch = str(reader.fields["general.architecture"].contents())
    heads = int(reader.fields[f"{arch}.attention.head_count"].contents())
    kv_field = reader.fields.get(f"{arch}.attention.head_count_kv")
    kv_heads = int(kv_field.contents()) if kv_field is not None else heads
    arrays = {tensor.name: _trained(weights, tensor, heads, kv_heads) for tensor in reader.tensors}

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
        writer.add_key_value(field.name, value, value_type, sub_type=sub_type)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    for tensor_name, array in arrays.items():
        if array.ndim == 2 and array.shape[-1] % 32 == 0:
            packed = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(tensor_name, packed, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(tensor_name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.replace(out)
    log.info("exported", path=str(out), tensors=len(arrays), quantization="Q8_0")
    return out


def _trained(weights: Mapping[str, Any], tensor: Any, heads: int, kv_heads: int) -> np.ndarray:
    """The trained values of one template tensor, in llama.cpp's layout."""
    source = hf_name(tensor.name)
    if source not in weights:
        if tensor.name == "output.weight" and "model.embed_tokens.weight" in weights:
            source = "model.embed_tokens.weight"  # tied embeddings
        else:
            raise ExportError(f"the trained model has no {source} (for {tensor.name})")
    array = _numpy(weights[source])
    expected = tuple(int(n) for n in reversed(tensor.shape))
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
