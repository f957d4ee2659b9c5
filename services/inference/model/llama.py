"""The Llama forward pass in torch, with a slot-based KV cache for continuous batching.

Weights come straight from GGUF. GGUF stores Q and K permuted for GGML's rotary
embedding, which rotates adjacent pairs (x[2i], x[2i+1]); this module rotates the
same pairs, so no un-permuting is needed.

Shapes: B batch, S prompt length, H query heads, K kv heads, D head dim, T cache length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from services.inference.model.gguf_model import GgufModel, LlamaConfig
from services.inference.model.quant import (
    BlockInt4Linear,
    BlockInt8Linear,
    Embedding,
    Int8Linear,
    LinearWeight,
    QuantMode,
    prepare_embedding,
    prepare_head,
    prepare_linear,
    prepare_tied,
    resolve_mode,
)


@dataclass
class Layer:
    attn_norm: torch.Tensor
    qkv: LinearWeight  # [(H + 2K) * D, hidden]
    out: LinearWeight
    ffn_norm: torch.Tensor
    gate_up: LinearWeight  # [2 * ffn, hidden]
    down: LinearWeight

    @property
    def nbytes(self) -> int:
        norms = (self.attn_norm.numel() + self.ffn_norm.numel()) * 4
        return norms + sum(w.nbytes for w in (self.qkv, self.out, self.gate_up, self.down))


def _kernel_args(weight: LinearWeight) -> list[torch.Tensor] | None:
    """A block-quantized weight as ``meshllm_kernels.decode_layer`` takes it; None otherwise."""
    if isinstance(weight, BlockInt8Linear | BlockInt4Linear):
        return weight.kernel_args
    return None


class KVCache:
    """Keys and values of up to ``slots`` sequences of up to ``max_len`` tokens each, stored
    as ``dtype`` (float32, or float16 for half the memory and half the bytes each decode
    step's attention reads)."""

    def __init__(
        self, config: LlamaConfig, slots: int, max_len: int, dtype: torch.dtype = torch.float32
    ) -> None:
        shape = (config.num_layers, slots, config.num_kv_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype)
        self.v = torch.zeros(shape, dtype=dtype)
        # each layer's (k, v) [slots, K, T, D], views made once rather than at every step
        self.layers = list(zip(self.k.unbind(0), self.v.unbind(0), strict=True))
        self.lengths = [0] * slots
        self.max_len = max_len

    @property
    def slots(self) -> int:
        return len(self.lengths)

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


class Llama:
    """The model, its weights stored as ``quant`` (see :mod:`services.inference.model.quant`;
    ``"auto"`` keeps the file's own precision: :func:`~services.inference.model.quant.native_mode`).

    Construction consumes ``model.tensors``: each dequantized GGUF tensor is dropped as soon
    as its (fused, possibly quantized) copy exists, so peak memory stays near one copy of
    the weights instead of two. Pass ``keep_source=True`` to leave them in place.
    ``block`` chooses the kernels of int8/int4 layers (see :func:`~services.inference.model.quant.
    prepare_linear`): None takes the block-quantized ones wherever they built.
    """

    def __init__(
        self,
        model: GgufModel,
        quant: QuantMode | str = QuantMode.FP32,
        *,
        keep_source: bool = False,
        block: bool | None = None,
    ) -> None:
        self.quant = resolve_mode(quant, model.tensor_types)
        c = model.config
        self.config = c
        source = model.tensors if not keep_source else dict(model.tensors)

        def take(*names: str) -> torch.Tensor:
            parts = [torch.from_numpy(source.pop(name)) for name in names]
            return parts[0] if len(parts) == 1 else torch.cat(parts)

        def linear(*names: str) -> LinearWeight:
            return prepare_linear(take(*names), self.quant, block=block)

        self.layers = [
            Layer(
                attn_norm=take(f"blk.{i}.attn_norm.weight"),
                qkv=linear(
                    f"blk.{i}.attn_q.weight", f"blk.{i}.attn_k.weight", f"blk.{i}.attn_v.weight"
                ),
                out=linear(f"blk.{i}.attn_output.weight"),
                ffn_norm=take(f"blk.{i}.ffn_norm.weight"),
                gate_up=linear(f"blk.{i}.ffn_gate.weight", f"blk.{i}.ffn_up.weight"),
                down=linear(f"blk.{i}.ffn_down.weight"),
            )
            for i in range(c.num_layers)
        ]
        self.norm = take("output_norm.weight")
        self.embed: Embedding
        self.output: LinearWeight
        if "output.weight" in source:  # untied head
            self.output = prepare_head(take("output.weight"), self.quant, block=block)
            self.embed = prepare_embedding(take("token_embd.weight"), self.quant, block=block)
        else:  # tied: one matrix is both the embedding [V, hidden] and the head
            self.embed, self.output = prepare_tied(
                take("token_embd.weight"), self.quant, block=block
            )
        # Decode steps run each layer in one kernel call (meshllm_kernels/cpu: meshllm_kernels.
        # decode_layer) wherever all its linear layers are block-quantized; fp32 and torch's
        # kernels keep the layer in torch ops.
        self._fused: list[tuple[object, ...]] | None = None
        args = [
            [_kernel_args(w) for w in (layer.qkv, layer.out, layer.gate_up, layer.down)]
            for layer in self.layers
        ]
        if all(a is not None for row in args for a in row):
            self._fused = [
                (layer.attn_norm, qkv, out, layer.ffn_norm, gate_up, down)
                for layer, (qkv, out, gate_up, down) in zip(self.layers, args, strict=True)
            ]
        # float16 keys and values where the decode kernel reads them (the quantized models:
        # llama.cpp's default too); fp32 keeps float32, to match the reference exactly.
        self.cache_dtype = torch.float32 if self._fused is None else torch.float16
        half = c.head_dim // 2
        inv_freq = 1.0 / (
            c.rope_theta ** (torch.arange(half, dtype=torch.float64) * 2 / c.head_dim)
        )
        positions = torch.arange(c.context_length, dtype=torch.float64)
        angles = torch.outer(positions, inv_freq)  # [ctx, D/2]
        cos, sin = angles.cos().float(), angles.sin().float()
        # Per position, over interleaved pairs: (cos, cos) and (-sin, +sin) [ctx, D], so a
        # rotation is x * cos + pair_swapped(x) * sin: three ops for q and k together.
        self._cos = torch.stack((cos, cos), dim=-1).flatten(-2)
        self._sin = torch.stack((-sin, sin), dim=-1).flatten(-2)

    @property
    def nbytes(self) -> int:
        """Bytes held by the weights (a tied embedding/head counted once)."""
        return (
            sum(layer.nbytes for layer in self.layers)
            + self.norm.numel() * 4
            + self.embed.nbytes
            + self.output.nbytes
        )

    def new_cache(self, slots: int, max_len: int) -> KVCache:
        """A cache of ``cache_dtype`` for ``slots`` sequences of up to ``max_len`` tokens."""
        return KVCache(
            self.config, slots, min(max_len, self.config.context_length), self.cache_dtype
        )

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), weight, self.config.rms_norm_eps)

    @staticmethod
    def _rope(x: torch.Tensor, step: _Step) -> torch.Tensor:
        """Rotate adjacent pairs (x[2i], x[2i+1]) of ``x`` [T, heads, D] by each token's angle.

        (even, odd) -> (even * cos - odd * sin, odd * cos + even * sin), elementwise the
        same arithmetic as the textbook form.
        """
        swapped = x.view(*x.shape[:-1], -1, 2).flip(-1).view(x.shape)
        return x * step.cos + swapped * step.sin

    @torch.inference_mode()
    def forward(
        self, tokens: torch.Tensor, slots: list[int], cache: KVCache, *, best_only: bool = False
    ) -> torch.Tensor:
        """Run ``tokens`` [B, S] for the sequences in ``slots``; return last-position logits [B, V].

        Each sequence continues at its cache length. B > 1 needs S == 1 (decode);
        a prompt (S > 1) is prefilled one sequence at a time. ``best_only``: the caller
        only needs the best tokens (greedy or small top-k sampling); an int8 head with a
        screen then scores only its candidates, the rest of the logits are -inf.
        """
        batch, steps = tokens.shape
        if batch > 1 and steps > 1:
            raise ValueError("prefill one sequence at a time; batch only single-token steps")
        starts = torch.tensor([cache.lengths[s] for s in slots])
        if int(starts.max()) + steps > cache.max_len:
            raise ValueError(f"sequence would exceed the cache length {cache.max_len}")
        if steps == 1 and self._fused is not None:
            x = self._decode_fused(tokens.view(-1), slots, starts, cache)
            return self._head(x, best_only)
        step = _Step(slots, starts, steps)
        step.cos = self._cos[step.positions.view(-1)].unsqueeze(1)  # [T, 1, D]
        step.sin = self._sin[step.positions.view(-1)].unsqueeze(1)
        x = self.embed[tokens.view(-1)]  # [T, hidden], T = B * S tokens, sequence-major
        for layer_index, layer in enumerate(self.layers):
            x += self._attention(layer, self._rms(x, layer.attn_norm), step, cache, layer_index)
            gate, up = layer.gate_up(self._rms(x, layer.ffn_norm)).chunk(2, dim=-1)
            x += layer.down(F.silu(gate).mul_(up))
        for slot, end in zip(slots, step.end_list, strict=True):
            cache.lengths[slot] = end
        return self._head(x.view(batch, steps, -1)[:, -1], best_only)

    def _head(self, x: torch.Tensor, best_only: bool) -> torch.Tensor:
        """Logits [B, V] of the last positions' hidden states ``x`` [B, hidden]."""
        last = self._rms(x, self.norm)
        if best_only and isinstance(self.output, Int8Linear):
            return self.output.best(last)
        return self.output(last)

    def _decode_fused(
        self, tokens: torch.Tensor, slots: list[int], starts: torch.Tensor, cache: KVCache
    ) -> torch.Tensor:
        """One decode step of every layer, a kernel call each; returns hidden states [B, hidden]."""
        assert self._fused is not None
        c = self.config
        x = self.embed[tokens].float().contiguous()  # [B, hidden]
        step = (torch.tensor(slots), starts, self._cos, self._sin)
        shape = (c.rms_norm_eps, c.num_heads, c.num_kv_heads)
        layer_op = torch.ops.meshllm_kernels.decode_layer.default
        for weights, cached in zip(self._fused, cache.layers, strict=True):
            layer_op(x, *weights, *cached, *step, *shape)
        for slot, start in zip(slots, starts.tolist(), strict=True):
            cache.lengths[slot] = start + 1
        return x

    def _attention(
        self, layer: Layer, h: torch.Tensor, step: _Step, cache: KVCache, layer_index: int
    ) -> torch.Tensor:
        c = self.config
        batch, steps = step.batch, step.steps
        heads, kv_heads, d = c.num_heads, c.num_kv_heads, c.head_dim
        qkv = layer.qkv(h)  # [T, (H + 2K) * D]
        qk = self._rope(qkv[:, : (heads + kv_heads) * d].view(-1, heads + kv_heads, d), step)
        qk = qk.view(batch, steps, heads + kv_heads, d).transpose(1, 2)  # [B, H + K, S, D]
        q, k = qk[:, :heads], qk[:, heads:]
        v = qkv[:, (heads + kv_heads) * d :].view(batch, steps, kv_heads, d).transpose(1, 2)
        layer_k, layer_v = cache.k[layer_index], cache.v[layer_index]  # [slots, K, T, D]
        step.write(layer_k, layer_v, k, v)
        if steps == 1:
            # Each sequence attends over exactly its own keys, so its result is bit-identical
            # whether it is decoded alone or in any batch (greedy output is reproducible).
            rows = [
                F.scaled_dot_product_attention(
                    q[row : row + 1],
                    layer_k[slot : slot + 1, :, :end].to(q.dtype),
                    layer_v[slot : slot + 1, :, :end].to(q.dtype),
                    enable_gqa=True,
                )
                for row, (slot, end) in enumerate(zip(step.slots, step.end_list, strict=True))
            ]
            attn = rows[0] if batch == 1 else torch.cat(rows)  # [B, H, 1, D]
        else:
            slot, span = step.slots[0], step.span
            attn = F.scaled_dot_product_attention(
                q,
                layer_k[slot : slot + 1, :, :span].to(q.dtype),
                layer_v[slot : slot + 1, :, :span].to(q.dtype),
                attn_mask=step.mask,
                is_causal=step.causal,
                enable_gqa=True,
            )  # [1, H, S, D]
        return layer.out(attn.transpose(1, 2).reshape(batch * steps, heads * d))


class _Step:
    """Positions, cache span and attention mask shared by every layer of one forward call."""

    def __init__(self, slots: list[int], starts: torch.Tensor, steps: int) -> None:
        self.slots = slots
        self.index = torch.tensor(slots)
        self.starts = starts
        self.steps = steps
        self.batch = len(slots)
        self.positions = starts.unsqueeze(1) + torch.arange(steps).unsqueeze(0)  # [B, S]
        self.ends = starts + steps
        self.end_list: list[int] = self.ends.tolist()
        self.span = int(self.ends.max())
        self.mask: torch.Tensor | None = None
        self.causal = False
        self.cos = self.sin = torch.empty(0)  # [T, 1, D] rotary tables, set by the model
        if steps > 1 and self.span > steps:
            # a prompt continuing a cached prefix: all of the prefix, then causal
            self.mask = torch.ones(steps, self.span, dtype=torch.bool).tril(self.span - steps)
        elif steps > 1:
            self.causal = True

    def write(
        self, layer_k: torch.Tensor, layer_v: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        """Store this step's keys and values [B, K, S, D] at each sequence's position."""
        if self.batch == 1:
            slot, start = self.slots[0], int(self.starts[0])
            layer_k[slot, :, start : start + self.steps] = k[0]
            layer_v[slot, :, start : start + self.steps] = v[0]
            return
        layer_k[self.index, :, self.starts] = k[:, :, 0].to(layer_k.dtype)
        layer_v[self.index, :, self.starts] = v[:, :, 0].to(layer_v.dtype)
