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

from services.inference.gguf_model import GgufModel, LlamaConfig


@dataclass
class Layer:
    attn_norm: torch.Tensor
    qkv: torch.Tensor  # [(H + 2K) * D, hidden]
    out: torch.Tensor
    ffn_norm: torch.Tensor
    gate_up: torch.Tensor  # [2 * ffn, hidden]
    down: torch.Tensor


class KVCache:
    """Keys and values of up to ``slots`` sequences of up to ``max_len`` tokens each."""

    def __init__(self, config: LlamaConfig, slots: int, max_len: int) -> None:
        shape = (config.num_layers, slots, config.num_kv_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape)
        self.v = torch.zeros(shape)
        self.lengths = [0] * slots
        self.max_len = max_len

    @property
    def slots(self) -> int:
        return len(self.lengths)

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


class Llama:
    def __init__(self, model: GgufModel) -> None:
        c = model.config
        self.config = c
        t = {name: torch.from_numpy(array) for name, array in model.tensors.items()}
        self.embed = t["token_embd.weight"]  # [V, hidden], tied with the output
        self.output = t.get("output.weight", self.embed)
        self.norm = t["output_norm.weight"]
        self.layers = [
            Layer(
                attn_norm=t[f"blk.{i}.attn_norm.weight"],
                qkv=torch.cat(
                    [t[f"blk.{i}.attn_q.weight"], t[f"blk.{i}.attn_k.weight"],
                     t[f"blk.{i}.attn_v.weight"]]
                ).contiguous(),
                out=t[f"blk.{i}.attn_output.weight"],
                ffn_norm=t[f"blk.{i}.ffn_norm.weight"],
                gate_up=torch.cat(
                    [t[f"blk.{i}.ffn_gate.weight"], t[f"blk.{i}.ffn_up.weight"]]
                ).contiguous(),
                down=t[f"blk.{i}.ffn_down.weight"],
            )
            for i in range(c.num_layers)
        ]
        half = c.head_dim // 2
        inv_freq = 1.0 / (c.rope_theta ** (torch.arange(half, dtype=torch.float64) * 2 / c.head_dim))
        positions = torch.arange(c.context_length, dtype=torch.float64)
        angles = torch.outer(positions, inv_freq)  # [ctx, D/2]
        self._cos = angles.cos().float()
        self._sin = angles.sin().float()

    def new_cache(self, slots: int, max_len: int) -> KVCache:
        return KVCache(self.config, slots, min(max_len, self.config.context_length))

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), weight, self.config.rms_norm_eps)

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # x: [B, heads, S, D]; positions: [B, S]
        cos = self._cos[positions].unsqueeze(1)  # [B, 1, S, D/2]
        sin = self._sin[positions].unsqueeze(1)
        pairs = x.unflatten(-1, (-1, 2))
        even, odd = pairs[..., 0], pairs[..., 1]
        rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
        return rotated.flatten(-2)

    @torch.inference_mode()
    def forward(
        self, tokens: torch.Tensor, slots: list[int], cache: KVCache
    ) -> torch.Tensor:
        """Run ``tokens`` [B, S] for the sequences in ``slots``; return last-position logits [B, V].

        Each sequence continues at its cache length. B > 1 needs S == 1 (decode);
        a prompt (S > 1) is prefilled one sequence at a time.
        """
        c = self.config
        batch, steps = tokens.shape
        if batch > 1 and steps > 1:
            raise ValueError("prefill one sequence at a time; batch only single-token steps")
        starts = torch.tensor([cache.lengths[s] for s in slots])
        if int(starts.max()) + steps > cache.max_len:
            raise ValueError(f"sequence would exceed the cache length {cache.max_len}")
        positions = starts.unsqueeze(1) + torch.arange(steps).unsqueeze(0)  # [B, S]
        ends = starts + steps
        span = int(ends.max())
        index = torch.tensor(slots)
        q_dim, kv_dim = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        groups = c.num_heads // c.num_kv_heads
        if steps > 1:
            mask = None
            causal = True
        else:
            # keys past each sequence's own end are masked out: [B, 1, 1, span]
            mask = (torch.arange(span).unsqueeze(0) < ends.unsqueeze(1)).view(batch, 1, 1, span)
            causal = False

        x = self.embed[tokens]  # [B, S, hidden]
        for layer_index, layer in enumerate(self.layers):
            h = self._rms(x, layer.attn_norm)
            q, k, v = F.linear(h, layer.qkv).split((q_dim, kv_dim, kv_dim), dim=-1)
            q = self._rope(q.view(batch, steps, c.num_heads, c.head_dim).transpose(1, 2), positions)
            k = self._rope(k.view(batch, steps, c.num_kv_heads, c.head_dim).transpose(1, 2),
                           positions)
            v = v.view(batch, steps, c.num_kv_heads, c.head_dim).transpose(1, 2)
            layer_k, layer_v = cache.k[layer_index], cache.v[layer_index]
            if batch == 1:
                start = int(starts[0])
                layer_k[slots[0], :, start : start + steps] = k[0]
                layer_v[slots[0], :, start : start + steps] = v[0]
                keys = layer_k[slots[0] : slots[0] + 1, :, :span]
                values = layer_v[slots[0] : slots[0] + 1, :, :span]
            else:
                layer_k[index, :, starts] = k[:, :, 0]
                layer_v[index, :, starts] = v[:, :, 0]
                keys = layer_k[index, :, :span]
                values = layer_v[index, :, :span]
            keys = keys.repeat_interleave(groups, dim=1)  # [B, H, span, D]
            values = values.repeat_interleave(groups, dim=1)
            if causal and span > steps:
                # a prompt continuing an existing prefix: attend to the prefix and causally
                mask_full = torch.ones(steps, span, dtype=torch.bool).tril(span - steps)
                attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask_full)
            else:
                attn = F.scaled_dot_product_attention(
                    q, keys, values, attn_mask=mask, is_causal=causal
                )
            x = x + F.linear(attn.transpose(1, 2).reshape(batch, steps, q_dim), layer.out)
            h = self._rms(x, layer.ffn_norm)
            gate, up = F.linear(h, layer.gate_up).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, layer.down)
        for slot, end in zip(slots, ends.tolist(), strict=True):
            cache.lengths[slot] = end
        last = self._rms(x[:, -1], self.norm)
        return F.linear(last, self.output)  # [B, V]
