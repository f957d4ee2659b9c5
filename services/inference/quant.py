"""Weight-only int8 / int4 quantization of the Llama linear layers, for CPU decode.

Decode at batch 1 is memory-bound: every token streams every weight once, so fewer
weight bytes means more tokens per second. Measured on the 2-core AVX-512 box (see
``benchmarks/cpu_linear_kernels.py`` and ``benchmarks/results/cpu_linear_kernels.md``):

- fp32 ``F.linear`` streams weights at only ~16 GB/s at batch 1 (27 tok/s for the model).
- ``aten._weight_int8pack_mm`` and ``aten._weight_int4pack_mm_for_cpu`` are fast **only with
  bfloat16 activations**: their fp32/fp16 paths are scalar, slower than fp32 ``F.linear``
  even on a quarter of the bytes. With bf16 activations they stream 20-31 GB/s at
  batch 1 (5-12x fp32 ``F.linear`` per call) and stay ~3x faster than it at batch 16.
- So both quantized modes cast ``x`` to bf16 for the kernel and the result back to the
  input dtype (~5 µs a call; pass bf16 ``x`` to skip it). That is the only numerical
  change beyond the weights themselves: activations are rounded to bf16 (8-bit mantissa)
  and so is the kernel's output (~0.2% relative error); accumulation is fp32.
  Activations are *not* quantized to integers: fbgemm's dynamic int8 (activations
  quantized per tensor each call) was faster at batch 16 but 5x further from fp32
  in KL divergence on SmolLM2, and it degrades badly with activation outliers.

Whole-model decode at batch 1 (SmolLM2-135M, 2 threads, the benchmark's model section):
fp32 27 tok/s, INT8 ~105, INT4 ~125-130 (llama.cpp on the Q4_1 file, as reported to us: ~109).

Modes:

- ``FP32``: the weight as is, ``F.linear``.
- ``INT8``: symmetric per-output-channel int8, bf16 scale; ``_weight_int8pack_mm`` for any
  number of rows, so each row's result does not depend on the other rows of the call
  (batch-invariant: a prompt prefilled whole, in parts after a prefix-cache hit, or a
  sequence decoded alone or in a batch gives bit-identical logits, so greedy output is
  reproducible and a rerun after a failure streams the same text). ``wide_prefill=True``
  trades that for faster long prefills: above :data:`INT8_KERNEL_MAX_ROWS` rows it runs
  ``F.linear`` in bf16 on the int8 codes (exact in bf16) with the scale applied after,
  1.3-2.7x faster at 32-256 rows but rounded differently.
- ``INT4``: asymmetric int4 in groups of :data:`INT4_GROUP_SIZE` along the input dimension,
  bf16 scale and zero per group, ``_weight_int4pack_mm_for_cpu``. Asymmetric groups of 32
  are the grid GGUF Q4_1 uses, so SmolLM2's Q4_1 weights re-quantize almost exactly.

Embedding and LM head: :func:`prepare_tied` gives the token-embedding lookup and the LM
head from one tied matrix; :func:`prepare_embedding` a lookup alone (untied models). The
head is the largest matrix (49152 x 576) and the most sensitive one: in INT4 mode it stays
int8 by default (:data:`HEAD_MODE`). SmolLM2 ships it as Q8_0; an int4 head raised the KL
divergence from fp32 on a test text from 0.002 to 0.068 (top-1 agreement 98.6% -> 83.6%)
for at most ~4% more decode speed (within run-to-run noise). INT8 lookups gather rows of
the head's int8 codes (no extra storage); INT4's kernel layout is opaque, so an int4
lookup keeps its own row-major nibble-packed copy of the same codes.

Shapes: N output features, K input features, G = K / group size, M rows of ``x``.
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
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)  # [N, G]
    scale = ((hi - lo) / 15).clamp(min=1e-8).to(torch.bfloat16)  # [N, G]
    zero = (lo + 8 * scale.float()).to(torch.bfloat16)  # [N, G]
    codes = torch.round((w - zero.float()[..., None]) / scale.float()[..., None] + 8)
    return codes.clamp(0, 15).to(torch.uint8).reshape(n, k), scale, zero


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


# --------------------------------------------------------------------------- factories


@torch.no_grad()
def prepare_linear(weight: torch.Tensor, mode: QuantMode | str) -> LinearWeight:
    """Quantize ``weight`` [N, K] for ``mode``; the result computes ``x @ weight.T``.

    Raises:
        ValueError: an unknown mode, or INT4 with K not a multiple of the group size.
    """
    mode = QuantMode(mode)
    if weight.dim() != 2:
        raise ValueError(f"a linear weight is 2-D [out, in], got shape {tuple(weight.shape)}")
    if mode is QuantMode.INT8:
        return Int8Linear(weight)
    if mode is QuantMode.INT4:
        return Int4Linear(weight)
    return DenseLinear(weight)


HEAD_MODE: dict[QuantMode, QuantMode] = {
    QuantMode.FP32: QuantMode.FP32,
    QuantMode.INT8: QuantMode.INT8,
    QuantMode.INT4: QuantMode.INT8,
}
"""The default quantization of the embedding / LM head for each mode of the other layers."""


@torch.no_grad()
def prepare_embedding(weight: torch.Tensor, mode: QuantMode | str) -> Embedding:
    """A token-embedding lookup of ``weight`` [V, K] stored as ``mode`` (use for untied models)."""
    mode = QuantMode(mode)
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
"""Whether an int8 LM head also keeps an int4 copy of itself, the screen of
:meth:`Int8Linear.best`: a step whose every sequence needs only the best tokens (greedy,
or top-k <= :data:`HEAD_REFINE_TOP`) finds :data:`HEAD_SCREEN_TOP` candidates with it and
scores just those exactly. The head is the largest matrix: at batch 1 its int8 kernel
takes ~1.8-3 ms of a ~13 ms int4 step; the screen about a third of that. Sampling from
the full distribution never uses the screen: its logits are too rough for the tail
(KL 0.015 from the int8 head on a test text, where the int8 head is 0.002 from fp32)."""

HEAD_SCREEN_TOP = 32
"""Candidates the screen hands to exact scoring: twice :data:`HEAD_REFINE_TOP`, so a best
token the int4 screen ranks a little low is still scored exactly."""


@torch.no_grad()
def prepare_head(
    weight: torch.Tensor, mode: QuantMode | str, *, head_mode: QuantMode | str | None = None
) -> LinearWeight:
    """The LM head [V, K] for a model whose other layers are ``mode``.

    Stored as ``head_mode``, by default ``HEAD_MODE[mode]``; an int8 head re-scores its
    :data:`HEAD_REFINE_TOP` best outputs in fp32.
    """
    resolved = HEAD_MODE[QuantMode(mode)] if head_mode is None else QuantMode(head_mode)
    if resolved is QuantMode.INT8:
        screen = None
        if HEAD_SCREEN and weight.shape[1] % INT4_GROUP_SIZE == 0:
            screen = Int4Linear(weight)
        return Int8Linear(weight, refine_top=HEAD_REFINE_TOP, screen=screen)
    return prepare_linear(weight, resolved)


@torch.no_grad()
def prepare_tied(
    weight: torch.Tensor, mode: QuantMode | str, *, head_mode: QuantMode | str | None = None
) -> tuple[Embedding, LinearWeight]:
    """Token embedding and LM head from one tied matrix [V, K].

    Both are stored as ``head_mode``, by default ``HEAD_MODE[mode]`` (int8 for INT4), and
    the lookup returns the same (dequantized) rows the head multiplies by.
    """
    head = prepare_head(weight, mode, head_mode=head_mode)
    if isinstance(head, Int8Linear):
        return Int8Embedding(head.codes, head.scale, shared=True), head
    if isinstance(head, Int4Linear):
        return Int4Embedding(weight, head.group_size), head
    assert isinstance(head, DenseLinear)
    return DenseEmbedding(head.weight, shared=True), head


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()
