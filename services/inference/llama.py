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


class Dense:
    """x @ W.T with an fp32 weight [out, in]."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


@dataclass
class Layer:
    attn_norm: torch.Tensor
    qkv: Dense  # [(H + 2K) * D, hidden]
    out: Dense
    ffn_norm: torch.Tensor
    gate_up: Dense  # [2 * ffn, hidden]
    down: Dense


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
        self.output = Dense(t.get("output.weight", self.embed))
        self.norm = t["output_norm.weight"]
        self.layers = [
            Layer(
                attn_norm=t[f"blk.{i}.attn_norm.weight"],
                qkv=Dense(
                    torch.cat(
                        [
                            t[f"blk.{i}.attn_q.weight"],
                            t[f"blk.{i}.attn_k.weight"],
                            t[f"blk.{i}.attn_v.weight"],
                        ]
                    )
                ),
                out=Dense(t[f"blk.{i}.attn_output.weight"]),
                ffn_norm=t[f"blk.{i}.ffn_norm.weight"],
                gate_up=Dense(
                    torch.cat([t[f"blk.{i}.ffn_gate.weight"], t[f"blk.{i}.ffn_up.weight"]])
                ),
                down=Dense(t[f"blk.{i}.ffn_down.weight"]),
            )
            for i in range(c.num_layers)
        ]
        half = c.head_dim // 2
        inv_freq = 1.0 / (
            c.rope_theta ** (torch.arange(half, dtype=torch.float64) * 2 / c.head_dim)
        )
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
        pairs = x.view(*x.shape[:-1], -1, 2)
        even, odd = pairs[..., 0], pairs[..., 1]
        rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
        return rotated.flatten(-2)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, slots: list[int], cache: KVCache) -> torch.Tensor:
        """Run ``tokens`` [B, S] for the sequences in ``slots``; return last-position logits [B, V].

        Each sequence continues at its cache length. B > 1 needs S == 1 (decode);
        a prompt (S > 1) is prefilled one sequence at a time.
        """
        batch, steps = tokens.shape
        if batch > 1 and steps > 1:
            raise ValueError("prefill one sequence at a time; batch only single-token steps")
        starts = torch.tensor([cache.lengths[s] for s in slots])
        if int(starts.max()) + steps > cache.max_len:
            raise ValueError(f"sequence would exceed the cache length {cache.max_len}")
        step = _Step(slots, starts, steps)
        x = self.embed[tokens]  # [B, S, hidden]
        for layer_index, layer in enumerate(self.layers):
            x = x + self._attention(layer, self._rms(x, layer.attn_norm), step, cache, layer_index)
            gate, up = layer.gate_up(self._rms(x, layer.ffn_norm)).chunk(2, dim=-1)
            x = x + layer.down(F.silu(gate) * up)
        for slot, end in zip(slots, step.ends.tolist(), strict=True):
            cache.lengths[slot] = end
        return self.output(self._rms(x[:, -1], self.norm))  # [B, V]

    def _attention(
        self, layer: Layer, h: torch.Tensor, step: _Step, cache: KVCache, layer_index: int
    ) -> torch.Tensor:
        c = self.config
        batch, steps = step.batch, step.steps
        q_dim, kv_dim = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        q, k, v = torch.split(layer.qkv(h), [q_dim, kv_dim, kv_dim], dim=-1)
        q = self._rope(
            q.view(batch, steps, c.num_heads, c.head_dim).transpose(1, 2), step.positions
        )
        k = self._rope(
            k.view(batch, steps, c.num_kv_heads, c.head_dim).transpose(1, 2), step.positions
        )
        v = v.view(batch, steps, c.num_kv_heads, c.head_dim).transpose(1, 2)
        keys, values = step.store(cache.k[layer_index], cache.v[layer_index], k, v)
        groups = c.num_heads // c.num_kv_heads
        keys = keys.repeat_interleave(groups, dim=1)  # [B, H, span, D]
        values = values.repeat_interleave(groups, dim=1)
        attn = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=step.mask, is_causal=step.causal
        )
        return layer.out(attn.transpose(1, 2).reshape(batch, steps, q_dim))


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
        self.span = int(self.ends.max())
        self.mask: torch.Tensor | None = None
        self.causal = False
        if steps == 1:
            # keys past each sequence's own end are masked out: [B, 1, 1, span]
            self.mask = (torch.arange(self.span).unsqueeze(0) < self.ends.unsqueeze(1)).view(
                self.batch, 1, 1, self.span
            )
        elif self.span > steps:
            # a prompt continuing a cached prefix: all of the prefix, then causal
            self.mask = torch.ones(steps, self.span, dtype=torch.bool).tril(self.span - steps)
        else:
            self.causal = True

    def store(
        self, layer_k: torch.Tensor, layer_v: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's k/v [B, K, S, D]; return the keys/values [B, K, span, D] to attend."""
        if self.batch == 1:
            slot, start = self.slots[0], int(self.starts[0])
            layer_k[slot, :, start : start + self.steps] = k[0]
            layer_v[slot, :, start : start + self.steps] = v[0]
            return layer_k[slot : slot + 1, :, : self.span], layer_v[
                slot : slot + 1, :, : self.span
            ]
        layer_k[self.index, :, self.starts] = k[:, :, 0]
        layer_v[self.index, :, self.starts] = v[:, :, 0]
        return layer_k[self.index, :, : self.span], layer_v[self.index, :, : self.span]
