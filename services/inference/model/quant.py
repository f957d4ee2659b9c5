"""Quantized linear layers of the Llama model, for CPU decode.

Decode at batch 1 is memory-bound: every token streams every weight once, so fewer
weight bytes means more tokens per second, as long as the kernel keeps up with memory.

Two kernel families; :func:`prepare_linear` picks the first wherever it is available:

1. **Block-quantized kernels** (``meshllm_kernels/cpu/blockquant.cpp``, built on first use, see
   :mod:`meshllm_kernels.cpu`): weights in blocks of 32 inputs with an fp16 scale (int8, GGUF
   Q8_0's grid) or an fp16 scale and offset (int4, Q4_1's grid with centred codes), and
   every row of ``x`` quantized to int8 per block of 32 inside the call, so each block's
   product is an integer dot product (VNNI ``vpdpbusd``, else AVX2 ``maddubs``), scaled
   once: the arithmetic llama.cpp uses. int4's offsets multiply the exact fp32 block sums
   of ``x``. Output is fp32. Decode steps run a whole layer in one call of these kernels
   (:class:`~services.inference.model.llama.Llama`). Speed against torch's kernels and the peers:
   ``meshbench/results/inference.md``; against fp32, int8 activations cost int8 weights
   nothing measurable and int4 weights about twice torch's bf16 error
   (``meshbench/results/quant_quality.md``).
2. **torch's weight-only kernels** (the fallback): ``aten._weight_int8pack_mm`` and
   ``aten._weight_int4pack_mm_for_cpu``, fast only with bfloat16 activations (their fp32
   paths are scalar), so ``x`` is cast to bf16 for the call and back; per-channel int8 or
   int4 in groups of 32 with bf16 scales. Measured in
   ``meshbench/results/cpu_linear_kernels*.md``: with AVX-512 they stream 20-31 GB/s at
   batch 1, with AVX2 only ~6 GB/s. fbgemm's dynamic int8 (activations quantized per
   tensor, over the whole batch) is not used: a row's result would depend on its
   neighbours, and it was 5x further from fp32 in KL divergence.

Both families compute each row of ``x`` independently, in the same order whatever the
other rows are (batch-invariant: a prompt prefilled whole or in parts, or a sequence decoded
alone or in a batch gives bit-identical logits, so greedy output is reproducible and a
rerun after a failure streams the same text).

Modes:

- ``FP32``: the weight as is, ``F.linear``.
- ``INT8``: block int8 (:class:`BlockInt8Linear`), or torch's per-output-channel int8 with
  a bf16 scale, ``_weight_int8pack_mm`` for any number of rows. ``wide_prefill=True``
  trades that for faster long prefills: above :data:`INT8_KERNEL_MAX_ROWS` rows it runs
  ``F.linear`` in bf16 on the int8 codes (exact in bf16) with the scale applied after,
  1.3-2.7x faster at 32-256 rows but rounded differently.
- ``INT4``: block int4 (:class:`BlockInt4Linear`), or torch's asymmetric int4 in groups of
  :data:`INT4_GROUP_SIZE` along the input dimension, bf16 scale and zero per group,
  ``_weight_int4pack_mm_for_cpu``. Asymmetric groups of 32
  are the grid GGUF Q4_1 uses, so SmolLM2's Q4_1 weights re-quantize almost exactly.

Embedding and LM head: :func:`prepare_tied` gives the token-embedding lookup and the LM
head from one tied matrix; :func:`prepare_embedding` a lookup alone (untied models). The
head is the largest matrix (49152 x 576) and the most sensitive one: in INT4 mode it stays
int8 by default (:data:`HEAD_MODE`). SmolLM2 ships it as Q8_0; an int4 head raised the KL
divergence from fp32 on a test text from 0.002 to 0.068 (top-1 agreement 98.6% -> 83.6%)
for at most ~4% more decode speed (within run-to-run noise). INT8 lookups gather rows of
the head's int8 codes (no extra storage); an int4 head (``head_mode``) with the block
kernels reads its own codes, while torch's int4 layout is opaque, so its lookup keeps a
row-major nibble-packed copy of the same codes. With torch's kernels a greedy step screens
the int8 head with an int4 copy of itself and scores only the screen's best candidates
(:data:`HEAD_SCREEN`).

Shapes: N output features, K input features, G = K / group size, M rows of ``x``.

One module (~760 lines): both kernel families share the block layouts, the mode
resolution and the LM head's screen; each half is tested against the other.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from enum import StrEnum

import torch
import torch.nn.functional as F

INT4_GROUP_SIZE = 32
"""Inputs per int4 scale/zero pair. 32 and 64 measured equally fast; 32 is more accurate."""

INT8_KERNEL_MAX_ROWS = 16
"""Above this many rows ``_weight_int8pack_mm`` loses to a bf16 ``F.linear`` on the codes
(measured: the kernel wins at 16 rows, the bf16 path at 32 and beyond, 1.3-2.7x at 256)."""

_INT8_WIDE_BLOCK = 4096  # output features per block of Int8Linear's many-rows path
_INT4_N_MULTIPLE = 16  # _convert_weight_to_int4pack_for_cpu needs N % 16 == 0
# The overloads themselves: calling them skips a little per-call dispatch in Python.
_INT8_MM = torch.ops.aten._weight_int8pack_mm.default
_INT4_MM = torch.ops.aten._weight_int4pack_mm_for_cpu.default


class QuantMode(StrEnum):
    FP32 = "fp32"
    INT8 = "int8"
    INT4 = "int4"


AUTO = "auto"
"""The load option that follows the file: :func:`native_mode` of its layers' GGUF types."""

FOUR_BIT_TYPES = frozenset(
    {"Q4_0", "Q4_1", "Q4_K", "Q3_K", "Q2_K", "IQ4_NL", "IQ4_XS", "IQ3_S", "IQ3_XXS"}
    | {"IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S", "IQ1_M", "TQ1_0", "TQ2_0"}
)
"""GGUF weight types of at most about 4.5 bits a weight: int4 blocks keep all they hold."""


def native_mode(tensor_types: dict[str, str]) -> QuantMode:
    """The mode that keeps what a GGUF file's linear layers hold, and no more.

    INT4 when every layer weight (``blk.*`` tensors but the norms) is stored in 4 bits or
    fewer (:data:`FOUR_BIT_TYPES`): int4 blocks of 32 are then (nearly) the file's own
    grid, e.g. Q4_1, so int8 would only be bigger and slower. INT8 otherwise (Q5/Q6/Q8,
    F16, BF16, F32): int8 blocks of 32 are Q8_0's grid, within rounding of those.
    """
    layers = [
        kind
        for name, kind in tensor_types.items()
        if name.startswith("blk.") and "norm" not in name
    ]
    if layers and all(kind in FOUR_BIT_TYPES for kind in layers):
        return QuantMode.INT4
    return QuantMode.INT8


def resolve_mode(mode: QuantMode | str, tensor_types: dict[str, str]) -> QuantMode:
    """``mode`` as a :class:`QuantMode`, ``"auto"`` by the file's types (:func:`native_mode`).

    Raises:
        ValueError: an unknown mode, naming the choices.
    """
    if mode == AUTO:
        return native_mode(tensor_types)
    try:
        return QuantMode(mode)
    except ValueError:
        choices = ", ".join([AUTO, *(m.value for m in QuantMode)])
        raise ValueError(f"unknown quantization {mode!r}; choose one of {choices}") from None


class LinearWeight(ABC):
    """A weight [N, K] that computes ``x @ W.T`` for ``x`` [..., K] -> [..., N]."""

    out_features: int
    in_features: int

    @abstractmethod
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T`` in ``x``'s dtype; ``x``: [..., K] -> [..., N]."""

    @property
    @abstractmethod
    def nbytes(self) -> int:
        """Bytes of tensor storage this weight holds (codes, scales, zeros)."""

    @abstractmethod
    def dequantize(self) -> torch.Tensor:
        """The fp32 weight [N, K] this object effectively multiplies by."""


class Embedding(ABC):
    """Rows of an embedding matrix [V, K]: ``embedding[tokens]`` -> fp32 [..., K]."""

    @abstractmethod
    def __getitem__(self, tokens: torch.Tensor) -> torch.Tensor:
        """fp32 rows for integer ``tokens`` of any shape: [...] -> [..., K]."""

    @property
    @abstractmethod
    def nbytes(self) -> int:
        """Bytes of tensor storage this embedding holds beyond what it shares."""


# --------------------------------------------------------------------------- fp32


class DenseLinear(LinearWeight):
    """fp32 weight, ``F.linear``."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight.float().contiguous()  # [N, K]
        self.out_features, self.in_features = self.weight.shape

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    @property
    def nbytes(self) -> int:
        return _nbytes(self.weight)

    def dequantize(self) -> torch.Tensor:
        return self.weight


class DenseEmbedding(Embedding):
    """Row gather from an fp32 matrix, shared with its :class:`DenseLinear` head."""

    def __init__(self, weight: torch.Tensor, *, shared: bool = False) -> None:
        self.weight = weight  # [V, K]
        self._shared = shared

    def __getitem__(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.weight[tokens]

    @property
    def nbytes(self) -> int:
        return 0 if self._shared else _nbytes(self.weight)


# --------------------------------------------------------------------------- int8


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: ``weight ~ codes * scale[:, None]``.

    The scale is rounded to bf16 first (the kernel's scale dtype) and the codes are
    computed against the rounded scale, so no extra error comes from that rounding.

    Returns:
        codes: int8 [N, K] in [-127, 127]; scale: bf16 [N].
    """
    w = weight.float()  # [N, K]
    amax = w.abs().amax(dim=1)  # [N]
    scale = (amax / 127).clamp(min=torch.finfo(torch.bfloat16).tiny).to(torch.bfloat16)
    codes = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return codes, scale


class Int8Linear(LinearWeight):
    """Per-output-channel int8 weight; bf16 activations into ``_weight_int8pack_mm``."""

    def __init__(
        self,
        weight: torch.Tensor,
        *,
        wide_prefill: bool = False,
        refine_top: int = 0,
        screen: LinearWeight | None = None,
    ) -> None:
        self.out_features, self.in_features = weight.shape
        self.codes, self.scale = quantize_int8(weight)  # int8 [N, K], bf16 [N]
        self._scale_f32 = self.scale.float()  # [N], for the wide-batch path
        self.wide_prefill = wide_prefill
        self.refine_top = refine_top
        self.screen = screen

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        xb = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()  # [M, K]
        y: torch.Tensor
        if not self.wide_prefill or xb.shape[0] <= INT8_KERNEL_MAX_ROWS:
            y = _INT8_MM(xb, self.codes, self.scale)  # [M, N]
        else:
            y = self._wide(xb)
        y = y.to(x.dtype)
        if self.refine_top:
            y = self._refine(x.reshape(-1, self.in_features), y, self.refine_top)
        return y.view(*x.shape[:-1], self.out_features)

    def _wide(self, xb: torch.Tensor) -> torch.Tensor:
        """Many rows (prefill): bf16 ``F.linear`` on the codes, a block of outputs at a time.

        int8 codes are exact in bf16 and the fp32 scale goes on the output. Blocks keep the
        bf16 temporary small (one for the whole LM head would be 57 MB, and 3x slower).
        """
        y = torch.empty(xb.shape[0], self.out_features)  # [M, N] fp32
        for start in range(0, self.out_features, _INT8_WIDE_BLOCK):
            codes = self.codes[start : start + _INT8_WIDE_BLOCK].to(torch.bfloat16)  # [n, K]
            y[:, start : start + _INT8_WIDE_BLOCK] = F.linear(xb, codes)
        return y.mul_(self._scale_f32)

    @property
    def nbytes(self) -> int:
        screen = self.screen.nbytes if self.screen is not None else 0
        return _nbytes(self.codes) + _nbytes(self.scale) + screen

    def dequantize(self) -> torch.Tensor:
        return self.codes.float() * self.scale.float()[:, None]

    def best(self, x: torch.Tensor) -> torch.Tensor:
        """Only the best outputs of each row: exact for :data:`HEAD_SCREEN_TOP` candidates, -inf
        elsewhere; ``x`` [M, K] -> [M, N]. Without a screen, the same as calling.

        The candidates are the best of the int4 screen; their values are the fp32 dot
        products on the int8 codes that ``__call__`` gives its best outputs. Enough for
        a greedy choice or top-k sampling with k <= :data:`HEAD_REFINE_TOP`, not for a
        full softmax.
        """
        if self.screen is None:
            return self(x)
        x2 = x.reshape(-1, self.in_features)  # [M, K]
        rough = self.screen(x2.to(torch.bfloat16))  # [M, N]
        top = rough.topk(HEAD_SCREEN_TOP, dim=-1).indices  # [M, c]
        rows = self.codes[top].float()  # [M, c, K]
        exact = torch.einsum("mk,mjk->mj", x2.float(), rows) * self._scale_f32[top]
        best = torch.full((x2.shape[0], self.out_features), float("-inf"), dtype=x.dtype)
        return best.scatter_(-1, top, exact.to(x.dtype))

    def _refine(self, x: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
        """Recompute the ``k`` largest outputs of each row of ``y`` (the kernel's) in fp32.

        The kernel's bf16 output rounds logits to steps of ~0.1, turning close calls
        between the best tokens into ties or flips. Re-scoring the top candidates with
        fp32 dot products on the same int8 weights (k rows of K each) makes greedy
        choices as exact as the weights allow, for a negligible cost.
        x: [M, K], y: [M, N] -> y with its top-k entries per row replaced.
        """
        top = y.topk(k, dim=-1).indices  # [M, k]
        rows = self.codes[top].float()  # [M, k, K]
        exact = torch.einsum("mk,mjk->mj", x.float(), rows) * self._scale_f32[top]
        return y.scatter(-1, top, exact.to(y.dtype))


class Int8Embedding(Embedding):
    """Row lookup in per-row int8 codes, usually those of a tied :class:`Int8Linear` head."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, *, shared: bool) -> None:
        self.codes, self.scale = codes, scale  # int8 [V, K], bf16 [V]
        self._shared = shared

    def __getitem__(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.codes[tokens].float() * self.scale[tokens].float().unsqueeze(-1)

    @property
    def nbytes(self) -> int:
        return 0 if self._shared else _nbytes(self.codes) + _nbytes(self.scale)


# --------------------------------------------------------------------------- int4


def quantize_int4(
    weight: torch.Tensor, group_size: int = INT4_GROUP_SIZE
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4 in groups along K: ``w ~ (code - 8) * scale + zero`` per group.

    That is the dequantization ``_weight_int4pack_mm_for_cpu`` applies. Scale and zero
    are rounded to bf16 (the kernel's dtype) before the codes are chosen against them.

    Returns:
        codes: uint8 [N, K] in [0, 15]; scale, zero: bf16 [N, G].
    """
    n, k = weight.shape
    if k % group_size:
        raise ValueError(f"in_features {k} is not a multiple of the int4 group size {group_size}")
    w = weight.float().reshape(n, k // group_size, group_size)  # [N, G, gs]
    codes, scale, zero = four_bit_grid(w, torch.bfloat16)
    return codes.reshape(n, k), scale, zero


def four_bit_grid(
    w: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The 16-level grid ``w ~ d * (q - 8) + c`` of each block of ``w`` [N, G, B] that
    reconstructs it best among three (d and c rounded to ``dtype`` before the codes are
    chosen): the block's min-max grid (GGUF Q4_1's, exact for a Q4_1 block) and the two
    symmetric grids of GGUF Q4_0, whose most negative (or most positive) value is -8 d
    (exact for a Q4_0 block, where min-max misses the grid whenever the block does not
    reach code 15, and re-rounding would add up to half a step to every weight).

    Returns:
        codes uint8 [N, G, B] in [0, 15]; d and c [N, G] in ``dtype``.
    """
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)  # [N, G]
    candidates = (((hi - lo) / 15, lo), (-lo / 8, lo), (hi / 8, hi - 15 * hi / 8))
    best: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    for step, lowest in candidates:
        valid = step >= 0
        d = step.clamp(min=0).to(dtype)
        c = (lowest + 8 * d.float()).to(dtype)
        divisor = torch.where(d.float() > 0, d.float(), 1.0)[..., None]
        codes = torch.round((w - c.float()[..., None]) / divisor + 8).clamp(0, 15)
        error = ((codes - 8) * d.float()[..., None] + c.float()[..., None] - w).square().sum(-1)
        error = torch.where(valid, error, torch.inf)
        if best is None:
            best = (codes, d, c, error)
            continue
        better = error < best[3]
        best = (
            torch.where(better[..., None], codes, best[0]),
            torch.where(better, d, best[1]),
            torch.where(better, c, best[2]),
            torch.minimum(error, best[3]),
        )
    assert best is not None
    return best[0].to(torch.uint8), best[1], best[2]


def dequantize_int4(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """fp32 [..., K] from codes uint8 [..., K] and scale/zero [..., G]."""
    groups = scale.shape[-1]
    w = codes.float().reshape(*codes.shape[:-1], groups, -1)  # [..., G, gs]
    w = (w - 8) * scale.float()[..., None] + zero.float()[..., None]
    return w.reshape(codes.shape)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Two codes a byte, row-major: uint8 [..., K] -> [..., K/2]; even k in the low nibble."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 [..., K/2] -> [..., K]."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2)


class Int4Linear(LinearWeight):
    """Grouped asymmetric int4 weight; bf16 activations into ``_weight_int4pack_mm_for_cpu``."""

    def __init__(self, weight: torch.Tensor, group_size: int = INT4_GROUP_SIZE) -> None:
        self.out_features, self.in_features = weight.shape
        self.group_size = group_size
        codes, scale, zero = quantize_int4(weight, group_size)  # [N, K], [N, G], [N, G]
        pad = -self.out_features % _INT4_N_MULTIPLE
        if pad:  # zero rows (code 8, scale 0, zero 0) whose outputs are sliced off
            codes = F.pad(codes, (0, 0, 0, pad), value=8)
            scale = F.pad(scale, (0, 0, 0, pad))
            zero = F.pad(zero, (0, 0, 0, pad))
        # opaque blocked layout: uint8 [N_padded, K/2]
        self.packed: torch.Tensor = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            codes.to(torch.int32), 1
        )
        # [G, N_padded, 2]: the kernel's scale-and-zero layout
        self.scale_zero = torch.stack((scale, zero), dim=-1).transpose(0, 1).contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        xb = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()  # [M, K]
        y: torch.Tensor = _INT4_MM(xb, self.packed, self.group_size, self.scale_zero)
        if y.shape[1] != self.out_features:  # [M, N_padded] -> [M, N]
            y = y[:, : self.out_features]
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    @property
    def nbytes(self) -> int:
        return _nbytes(self.packed) + _nbytes(self.scale_zero)

    def codes(self) -> torch.Tensor:
        """The uint8 codes [N, K], read back through the kernel (the packed layout is opaque).

        With scale 1 and zero 8 the kernel's dequantization ``(code - 8) * 1 + 8`` is the
        code itself, exact in bf16; multiplying the identity gives ``codes.T``.
        """
        eye = torch.eye(self.in_features, dtype=torch.bfloat16)  # [K, K]
        unit = torch.empty_like(self.scale_zero)  # [G, N_padded, 2]
        unit[..., 0], unit[..., 1] = 1, 8
        y: torch.Tensor = torch.ops.aten._weight_int4pack_mm_for_cpu(
            eye, self.packed, self.group_size, unit
        )  # [K, N_padded] = codes.T
        return y[:, : self.out_features].T.to(torch.uint8).contiguous()  # [N, K]

    def dequantize(self) -> torch.Tensor:
        scale_zero = self.scale_zero[:, : self.out_features].transpose(0, 1)  # [N, G, 2]
        return dequantize_int4(self.codes(), scale_zero[..., 0], scale_zero[..., 1])


class Int4Embedding(Embedding):
    """Row lookup in a row-major nibble-packed copy of a tied :class:`Int4Linear`'s codes."""

    def __init__(self, weight: torch.Tensor, group_size: int = INT4_GROUP_SIZE) -> None:
        codes, self.scale, self.zero = quantize_int4(weight, group_size)  # [V, K], [V, G]
        self.packed = pack_int4(codes)  # uint8 [V, K/2]

    def __getitem__(self, tokens: torch.Tensor) -> torch.Tensor:
        codes = unpack_int4(self.packed[tokens])  # [..., K]
        return dequantize_int4(codes, self.scale[tokens], self.zero[tokens])

    @property
    def nbytes(self) -> int:
        return _nbytes(self.packed) + _nbytes(self.scale) + _nbytes(self.zero)


# --------------------------------------------------------------------------- block kernels

BLOCK = 32
"""Inputs per block of the block-quantized kernels (``meshllm_kernels/cpu/blockquant.cpp``)."""


def block_kernels() -> bool:
    """Whether the block-quantized CPU kernels are built and loaded (:mod:`meshllm_kernels.cpu`)."""
    from meshllm_kernels import cpu

    return cpu.available()


def _require_block_kernels() -> None:
    if not block_kernels():
        raise RuntimeError(
            "the block-quantized CPU kernels are not available: MESHLLM_CPU_KERNELS=off, or "
            "their build failed (the log says why)"
        )


def quantize_q4_blocks(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4 in blocks of 32: ``w ~ d * (q - 8) + c``, q in [0, 15].

    That is GGUF Q4_1's grid (d = (max - min) / 15, from the block's minimum up), or Q4_0's where
    that fits the block better (:func:`four_bit_grid`), with the codes centred: c = min
    + 8 d, so the kernel's rounding of x does not scale with the block's offset. d and c
    are rounded to fp16 (the stored dtype) before the codes are chosen against them.
    Returns the codes packed as the kernel reads them (per block, byte j holds inputs j
    and j + 16 in its low and high nibble): uint8 [N, K/2]; the fp16 scale and offset
    [N, G] each.
    """
    w = _blocks(weight)  # [N, G, 32]
    codes, d, c = four_bit_grid(w, torch.float16)
    packed = codes[..., : BLOCK // 2] | (codes[..., BLOCK // 2 :] << 4)  # [N, G, 16]
    return packed.reshape(weight.shape[0], -1).contiguous(), d.contiguous(), c.contiguous()


def quantize_q8_blocks(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 in blocks of 32, GGUF Q8_0's grid: ``w ~ d * q``, q in [-127, 127].

    Returns codes int8 [N, K] and the fp16 scale [N, G].
    """
    w = _blocks(weight)  # [N, G, 32]
    d = (w.abs().amax(dim=-1) / 127).half()  # [N, G]
    codes = torch.round(w / _step(d)[..., None]).clamp(-127, 127).to(torch.int8)
    return codes.reshape(weight.shape).contiguous(), d.contiguous()


def _blocks(weight: torch.Tensor) -> torch.Tensor:
    """fp32 ``weight`` [N, K] as blocks [N, G, 32]."""
    n, k = weight.shape
    if k % BLOCK:
        raise ValueError(f"in_features {k} is not a multiple of the block size {BLOCK}")
    return weight.float().reshape(n, k // BLOCK, BLOCK)


def _step(scale: torch.Tensor) -> torch.Tensor:
    """fp16 block scales as fp32 divisors (an all-zero block's 0 becomes 1)."""
    return torch.where(scale.float() > 0, scale.float(), 1.0)


def _dequantize_q4_blocks(
    packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor
) -> torch.Tensor:
    """fp32 rows [..., K] from packed codes [..., K/2] and scale/offset [..., G]."""
    return (_q4_codes(packed).float() - 8) * scale.float()[..., None] + offset.float()[..., None]


def _q4_codes(packed: torch.Tensor) -> torch.Tensor:
    """uint8 codes [..., G, 32] in input order from packed blocks [..., K/2]."""
    blocks = packed.view(*packed.shape[:-1], -1, BLOCK // 2)  # [..., G, 16]
    return torch.cat((blocks & 15, blocks >> 4), dim=-1)


def _rows(x: torch.Tensor, in_features: int) -> torch.Tensor:
    """``x`` [..., K] as the fp32 rows [M, K] the block kernels take."""
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} input features; this weight takes {in_features}")
    return x.reshape(-1, in_features).float()


class BlockInt4Linear(LinearWeight):
    """int4 weight in blocks of 32 times int8 activations (``meshllm_kernels.q4_linear``).

    Each row of ``x`` is quantized to int8 per block of 32 inside the kernel, so a block's
    product is an integer dot product of the centred codes; the block's offset multiplies
    the exact fp32 sum of its inputs. Rows are independent: results are batch-invariant.
    """

    def __init__(self, weight: torch.Tensor) -> None:
        _require_block_kernels()
        self.out_features, self.in_features = weight.shape
        # uint8 [N, K/2], fp16 [N, G], fp16 [N, G]
        self.packed, self.scale, self.offset = quantize_q4_blocks(weight)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = torch.ops.meshllm_kernels.q4_linear.default(
            _rows(x, self.in_features), self.packed, self.scale, self.offset
        )
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    @property
    def nbytes(self) -> int:
        return _nbytes(self.packed) + _nbytes(self.scale) + _nbytes(self.offset)

    @property
    def kernel_args(self) -> list[torch.Tensor]:
        """The weight as ``meshllm_kernels.decode_layer`` takes it: codes, scale, offset."""
        return [self.packed, self.scale, self.offset]

    def codes(self) -> torch.Tensor:
        """uint8 codes [N, K] in input order."""
        return _q4_codes(self.packed).reshape(self.out_features, self.in_features)

    def dequantize(self) -> torch.Tensor:
        w = _dequantize_q4_blocks(self.packed, self.scale, self.offset)  # [N, G, 32]
        return w.reshape(self.out_features, self.in_features)


class BlockInt8Linear(LinearWeight):
    """int8 weight in blocks of 32 times int8 activations (``meshllm_kernels.q8_linear``).

    Its output is fp32, so a greedy choice needs no re-scoring. As the LM head it keeps no
    int4 screen: this kernel is as fast as the int4 one on the head (1.5 ms against 1.7 at
    one row, 16 against 20 at sixteen, on the 2-vCPU AVX2 machine), so screening saved
    nothing and cost 18 MB.
    """

    def __init__(self, weight: torch.Tensor) -> None:
        _require_block_kernels()
        self.out_features, self.in_features = weight.shape
        self.codes, self.scale = quantize_q8_blocks(weight)  # int8 [N, K], fp16 [N, G]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = torch.ops.meshllm_kernels.q8_linear.default(
            _rows(x, self.in_features), self.codes, self.scale
        )
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    @property
    def nbytes(self) -> int:
        return _nbytes(self.codes) + _nbytes(self.scale)

    @property
    def kernel_args(self) -> list[torch.Tensor]:
        """The weight as ``meshllm_kernels.decode_layer`` takes it: codes, scale."""
        return [self.codes, self.scale]

    def dequantize(self) -> torch.Tensor:
        w = self.codes.float().view(self.out_features, -1, BLOCK) * self.scale.float()[..., None]
        return w.reshape(self.out_features, self.in_features)


class BlockInt8Embedding(Embedding):
    """Row lookup in block int8 codes, usually those of a tied :class:`BlockInt8Linear` head."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, *, shared: bool) -> None:
        self.codes, self.scale = codes, scale  # int8 [V, K], fp16 [V, G]
        self._shared = shared

    def __getitem__(self, tokens: torch.Tensor) -> torch.Tensor:
        codes = self.codes[tokens].float()  # [..., K]
        blocks = codes.view(*codes.shape[:-1], -1, BLOCK) * self.scale[tokens].float()[..., None]
        return blocks.view(codes.shape)

    @property
    def nbytes(self) -> int:
        return 0 if self._shared else _nbytes(self.codes) + _nbytes(self.scale)


# --------------------------------------------------------------------------- factories


def _use_blocks(weight: torch.Tensor, block: bool | None) -> bool:
    """Block kernels for this weight: ``block`` if given, else whenever they are loaded."""
    if weight.shape[-1] % BLOCK:
        if block:
            raise ValueError(
                f"in_features {weight.shape[-1]} is not a multiple of the block size {BLOCK}"
            )
        return False
    if block is None:
        return block_kernels()
    if block:
        _require_block_kernels()
    return block


@torch.no_grad()
def prepare_linear(
    weight: torch.Tensor, mode: QuantMode | str, *, block: bool | None = None
) -> LinearWeight:
    """Quantize ``weight`` [N, K] for ``mode``; the result computes ``x @ weight.T``.

    ``block``: INT8 and INT4 use the block-quantized kernels (int8 activations) when True,
    torch's weight-only kernels (bf16 activations) when False; None (the default) takes
    the block kernels wherever they built and K is a multiple of 32.

    Raises:
        ValueError: an unknown mode, or INT4 with K not a multiple of the group size.
    """
    mode = QuantMode(mode)
    if weight.dim() != 2:
        raise ValueError(f"a linear weight is 2-D [out, in], got shape {tuple(weight.shape)}")
    if mode is QuantMode.FP32:
        return DenseLinear(weight)
    if mode is QuantMode.INT4 and weight.shape[1] % INT4_GROUP_SIZE:
        raise ValueError(
            f"in_features {weight.shape[1]} is not a multiple of the int4 group size "
            f"{INT4_GROUP_SIZE}"
        )
    if _use_blocks(weight, block):
        return BlockInt8Linear(weight) if mode is QuantMode.INT8 else BlockInt4Linear(weight)
    return Int8Linear(weight) if mode is QuantMode.INT8 else Int4Linear(weight)


HEAD_MODE: dict[QuantMode, QuantMode] = {
    QuantMode.FP32: QuantMode.FP32,
    QuantMode.INT8: QuantMode.INT8,
    QuantMode.INT4: QuantMode.INT8,
}
"""The default quantization of the embedding / LM head for each mode of the other layers."""


@torch.no_grad()
def prepare_embedding(
    weight: torch.Tensor, mode: QuantMode | str, *, block: bool | None = None
) -> Embedding:
    """A token-embedding lookup of ``weight`` [V, K] stored as ``mode`` (use for untied models)."""
    mode = QuantMode(mode)
    if mode is QuantMode.INT8 and _use_blocks(weight, block):
        codes, scale = quantize_q8_blocks(weight)
        return BlockInt8Embedding(codes, scale, shared=False)
    if mode is QuantMode.INT8:
        codes, scale = quantize_int8(weight)
        return Int8Embedding(codes, scale, shared=False)
    if mode is QuantMode.INT4:
        return Int4Embedding(weight)
    return DenseEmbedding(weight.float().contiguous())


HEAD_REFINE_TOP = 16
"""Best tokens per row that an int8 LM head recomputes in fp32 (its kernel's bf16 output
turns close calls between the best tokens into ties or flips)."""

HEAD_SCREEN = True
"""Whether an int8 LM head also keeps an int4 copy of itself, the screen of its ``best``:
a step whose every sequence needs only the best tokens (greedy, or top-k <=
:data:`HEAD_REFINE_TOP`) finds :data:`HEAD_SCREEN_TOP` candidates with it and scores just
those exactly. The head is the largest matrix: at batch 1 its int8 kernel takes ~1.8-3 ms
of a ~13 ms int4 step; the screen about a third of that. Sampling from the full
distribution never uses the screen: its logits are too rough for the tail (KL 0.015 from
the int8 head on a test text, where the int8 head is 0.002 from fp32)."""

HEAD_SCREEN_TOP = 32
"""Candidates the screen hands to exact scoring: twice :data:`HEAD_REFINE_TOP`, so a best
token the int4 screen ranks a little low is still scored exactly."""


@torch.no_grad()
def prepare_head(
    weight: torch.Tensor,
    mode: QuantMode | str,
    *,
    head_mode: QuantMode | str | None = None,
    block: bool | None = None,
) -> LinearWeight:
    """The LM head [V, K] for a model whose other layers are ``mode``.

    Stored as ``head_mode``, by default ``HEAD_MODE[mode]``. With torch's kernels an int8
    head keeps an int4 screen (:data:`HEAD_SCREEN`) and re-scores its
    :data:`HEAD_REFINE_TOP` best outputs in fp32.
    """
    resolved = HEAD_MODE[QuantMode(mode)] if head_mode is None else QuantMode(head_mode)
    if resolved is QuantMode.INT8 and _use_blocks(weight, block):
        return BlockInt8Linear(weight)
    if resolved is QuantMode.INT8:
        screen = None
        if HEAD_SCREEN and weight.shape[1] % INT4_GROUP_SIZE == 0:
            screen = Int4Linear(weight)
        return Int8Linear(weight, refine_top=HEAD_REFINE_TOP, screen=screen)
    return prepare_linear(weight, resolved, block=block)


@torch.no_grad()
def prepare_tied(
    weight: torch.Tensor,
    mode: QuantMode | str,
    *,
    head_mode: QuantMode | str | None = None,
    block: bool | None = None,
) -> tuple[Embedding, LinearWeight]:
    """Token embedding and LM head from one tied matrix [V, K].

    Both are stored as ``head_mode``, by default ``HEAD_MODE[mode]`` (int8 for INT4), and
    the lookup returns the same (dequantized) rows the head multiplies by.
    """
    head = prepare_head(weight, mode, head_mode=head_mode, block=block)
    if isinstance(head, BlockInt8Linear):
        return BlockInt8Embedding(head.codes, head.scale, shared=True), head
    if isinstance(head, Int8Linear):
        return Int8Embedding(head.codes, head.scale, shared=True), head
    if isinstance(head, Int4Linear):
        return Int4Embedding(weight, head.group_size), head
    if isinstance(head, BlockInt4Linear):
        return _BlockInt4Embedding(head), head
    assert isinstance(head, DenseLinear)
    return DenseEmbedding(head.weight, shared=True), head


class _BlockInt4Embedding(Embedding):
    """Row lookup in a tied :class:`BlockInt4Linear` head's own codes."""

    def __init__(self, head: BlockInt4Linear) -> None:
        self.head = head

    def __getitem__(self, tokens: torch.Tensor) -> torch.Tensor:
        head = self.head
        rows = _dequantize_q4_blocks(head.packed[tokens], head.scale[tokens], head.offset[tokens])
        return rows.view(*tokens.shape, head.in_features)

    @property
    def nbytes(self) -> int:
        return 0


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()
