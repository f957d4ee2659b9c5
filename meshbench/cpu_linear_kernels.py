"""CPU linear kernels for SmolLM2-135M's weight shapes: fp32 vs bf16 vs int8 vs int4.

Run from the repository root::

    python -m meshbench.cpu_linear_kernels            # everything (~1.5 min)
    python -m meshbench.cpu_linear_kernels --quick    # fewer runs, no model section
    python -m meshbench.cpu_linear_kernels --no-compile

Three parts, all with 2 threads:

1. Kernels. ``y = x @ W.T`` for the model's matrices [out, in] (fused qkv, attention
   output, fused gate/up, down, LM head) at 1, 4, 16 and 64 rows of ``x``: fp32 and bf16
   ``F.linear``; ``aten._weight_int8pack_mm`` (per-channel int8); ``aten._weight_int4pack_mm_
   for_cpu`` (grouped int4, groups of 32/64/128); fbgemm dynamic int8 (activations
   quantized per call) and fbgemm fp16 weights; inductor-compiled fused dequant+matmul
   (int8 per-channel, int4 groups of 32); and the engine's own :mod:`services.inference.
   quant` wrappers (fp32 in, fp32 out, conversions included). Every kernel cycles through
   enough distinct copies of its weight (>= 3x the 32 MiB L3) that each call streams its
   weight from DRAM, as in a real decode step. Median of many calls after a warm-up;
   "GB/s" is weight bytes (codes + scales) per call over time.
2. Quality on the real weights: relative error of quantized weights and of ``x @ W.T`` for
   random ``x``, per matrix kind, for int8 per channel, int4 asymmetric/symmetric, groups
   32/64, and fbgemm dynamic int8.
3. The whole model per :class:`QuantMode`: decode tokens/s at batch 1 and aggregate at
   batch 16, and teacher-forced agreement with fp32 (KL, top-1, perplexity) on a text.

Results go to meshbench/results/cpu_linear_kernels.md.
"""

from __future__ import annotations

import argparse
import copy
import functools
import math
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from meshbench.report import results_console
from services.inference.model.gguf_model import GgufModel, load_gguf, smollm2_path
from services.inference.model.llama import Llama
from services.inference.model.quant import (
    QuantMode,
    block_kernels,
    dequantize_int4,
    prepare_embedding,
    prepare_linear,
    prepare_tied,
    quantize_int4,
    quantize_int8,
)
from services.inference.model.tokenizer import Tokenizer

RESULTS = Path(__file__).resolve().parent / "results"
THREADS = 2
BATCHES = (1, 4, 16, 64)
SHAPES: dict[str, tuple[int, int]] = {  # name -> [out, in]
    "qkv": (960, 576),
    "out": (576, 576),
    "gate_up": (3072, 576),
    "down": (576, 1536),
    "lm_head": (49152, 576),
}
LAYERS = 30
COLD_BYTES = 96 << 20  # 3x L3: every call reads its weight from DRAM
MAX_COPIES = 256
SLOW_PATH_MAX_BATCH = 4  # fp32-activation paths of the aten int kernels are scalar
TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes "
    "Gutenberg combined movable metal type, oil-based ink and a screw press adapted from "
    "wine making. Books became cheaper, literacy spread across Europe, and ideas moved "
    "faster than ever before. Scientists could share their results, reformers could reach "
    "ordinary readers, and the modern newspaper eventually grew out of the same machines."
)

State = tuple[Any, ...]


@dataclass
class Kernel:
    """One way to compute ``x @ W.T``: how to prepare a weight and how to call it."""

    name: str
    make: Callable[[torch.Tensor], State]  # fp32 W [N, K] -> prepared state
    run: Callable[[State, torch.Tensor], torch.Tensor]  # (state, x [M, K]) -> [M, N]
    nbytes: Callable[[State], int]
    x_dtype: torch.dtype = torch.float32
    max_batch: int = max(BATCHES)
    applies: Callable[[int, int], bool] = lambda n, k: True
    compiled: bool = False  # run is a torch.compile'd function: one compile per shape


@dataclass
class Cell:
    us: float
    gbps: float


@dataclass
class KernelRow:
    shape: str
    kernel: str
    weight_mb: float
    cells: dict[int, Cell] = field(default_factory=dict)
    note: str = ""


def _tensor_bytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# --------------------------------------------------------------------------- kernels


def _int4_asym(w: torch.Tensor, group: int) -> State:
    """Kernel-ready int4: packed weight and [G, N, 2] bf16 scale/zero."""
    codes, scale, zero = quantize_int4(w, group)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
    return packed, torch.stack((scale, zero), -1).transpose(0, 1).contiguous(), group


def _int4_fp32(w: torch.Tensor) -> State:
    packed, scale_zero, group = _int4_asym(w, 32)
    return packed, scale_zero.float(), group


def _divides(group: int, n: int, k: int) -> bool:
    return k % group == 0


def _int4_run(s: State, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, s[0], s[2], s[1])  # type: ignore[no-any-return]


def _int8_state(w: torch.Tensor, dtype: torch.dtype) -> State:
    codes, scale = quantize_int8(w)
    return codes, scale.to(dtype)


def _fbgemm_dynamic(w: torch.Tensor) -> State:
    scale = (w.abs().amax(1) / 127).clamp(min=1e-8).double()
    zeros = torch.zeros(w.shape[0], dtype=torch.long)
    with warnings.catch_warnings():  # quantized tensors are deprecated, still shipped
        warnings.simplefilter("ignore")
        qw = torch.quantize_per_channel(w, scale, zeros, 0, torch.qint8)
    return (torch.ops.quantized.linear_prepack(qw, None), _tensor_bytes(qw.int_repr(), scale))


def _fused_int8(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # x: [M, K]; codes: int8 [N, K]; scale: [N] -> [M, N]; a reduction inductor fuses
    return (x[:, None, :] * codes.to(x.dtype)[None]).sum(-1) * scale


def _fused_int4(
    x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor
) -> torch.Tensor:
    # packed: uint8 [N, G, gs/2], low nibbles = first half of each group, high = second
    # scale, zero: [N, G]; weight = code * scale + zero
    m = x.shape[0]
    _, g, half = packed.shape
    xg = x.view(m, 1, g, 2, half)
    lo = (packed & 15).to(x.dtype) * scale[..., None] + zero[..., None]  # [N, G, gs/2]
    hi = (packed >> 4).to(x.dtype) * scale[..., None] + zero[..., None]
    return (xg[..., 0, :] * lo[None] + xg[..., 1, :] * hi[None]).sum((-1, -2))  # [M, N]


def _fused_int4_state(w: torch.Tensor) -> State:
    codes, scale, zero = quantize_int4(w, 32)
    n, k = codes.shape
    c = codes.view(n, k // 32, 2, 16)
    packed = c[:, :, 0] | (c[:, :, 1] << 4)  # [N, G, 16]
    return packed.contiguous(), scale.float(), (zero.float() - 8 * scale.float())


def _engine_state(w: torch.Tensor, mode: QuantMode, block: bool) -> State:
    return (prepare_linear(w, mode, block=block),)


def kernels(with_compile: bool) -> list[Kernel]:
    bf16 = torch.bfloat16
    out: list[Kernel] = [
        Kernel("fp32 F.linear", lambda w: (w.clone(),), lambda s, x: F.linear(x, s[0]),
               lambda s: _tensor_bytes(s[0])),
        Kernel("bf16 F.linear (bf16 x)", lambda w: (w.to(bf16),), lambda s, x: F.linear(x, s[0]),
               lambda s: _tensor_bytes(s[0]), x_dtype=bf16),
        Kernel("int8pack_mm (fp32 x)", lambda w: _int8_state(w, torch.float32),
               lambda s, x: torch.ops.aten._weight_int8pack_mm(x, s[0], s[1]),
               lambda s: _tensor_bytes(*s), max_batch=SLOW_PATH_MAX_BATCH),
        Kernel("int8pack_mm (bf16 x)", lambda w: _int8_state(w, bf16),
               lambda s, x: torch.ops.aten._weight_int8pack_mm(x, s[0], s[1]),
               lambda s: _tensor_bytes(*s), x_dtype=bf16),
        Kernel("int4pack_mm g32 (fp32 x)", _int4_fp32, _int4_run,
               lambda s: _tensor_bytes(s[0], s[1]), max_batch=SLOW_PATH_MAX_BATCH),
    ]  # fmt: skip
    for group in (32, 64, 128):
        out.append(
            Kernel(
                f"int4pack_mm g{group} (bf16 x)",
                functools.partial(_int4_asym, group=group),
                _int4_run,
                lambda s: _tensor_bytes(s[0], s[1]),
                x_dtype=bf16,
                applies=functools.partial(_divides, group),
            )
        )
    out += [
        Kernel("fbgemm dynamic int8 (quantizes x)", _fbgemm_dynamic,
               lambda s, x: torch.ops.quantized.linear_dynamic(x, s[0], False),
               lambda s: int(s[1])),
        Kernel("fbgemm fp16 weight",
               lambda w: (torch.ops.quantized.linear_prepack_fp16(w, None), w.numel() * 2),
               lambda s, x: torch.ops.quantized.linear_dynamic_fp16(x, s[0]),
               lambda s: int(s[1])),
    ]  # fmt: skip
    if with_compile:
        int8_fn = torch.compile(_fused_int8, dynamic=False)
        int4_fn = torch.compile(_fused_int4, dynamic=False)
        out += [
            Kernel("inductor fused int8 (fp32 x)", lambda w: _int8_state(w, torch.float32),
                   lambda s, x: int8_fn(x, s[0], s[1]), lambda s: _tensor_bytes(*s),
                   compiled=True),
            Kernel("inductor fused int4 g32 (fp32 x)", _fused_int4_state,
                   lambda s, x: int4_fn(x, *s), lambda s: _tensor_bytes(*s), compiled=True),
        ]  # fmt: skip
    for mode in (QuantMode.INT8, QuantMode.INT4):
        for block in (True, False):
            if block and not block_kernels():
                continue
            out.append(
                Kernel(
                    _engine_kernel(mode, block),
                    functools.partial(_engine_state, mode=mode, block=block),
                    lambda s, x: s[0](x),
                    lambda s: int(s[0].nbytes),
                )
            )
    return out


def _engine_kernel(mode: QuantMode, block: bool) -> str:
    kind = "block kernel, int8 x" if block else "torch kernel"
    return f"quant.py {mode} ({kind}; fp32 in/out)"


# --------------------------------------------------------------------------- timing


def time_call(fn: Callable[[int], object], copies: int, budget_s: float, max_runs: int) -> float:
    """Median µs of ``fn(i)``, cycling i over ``copies``, after warming every copy."""
    start = time.perf_counter()
    fn(0)
    first = time.perf_counter() - start
    for i in range(1, copies if first < 0.01 else min(copies, 2)):
        fn(i)
    runs = max(5, min(max_runs, int(budget_s / max(first, 1e-6))))
    samples = []
    for i in range(runs):
        t0 = time.perf_counter()
        fn(i % copies)
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e6


def _call(
    run: Callable[[State, torch.Tensor], torch.Tensor], states: list[State], x: torch.Tensor, i: int
) -> torch.Tensor:
    return run(states[i], x)


def measure_kernels(args: argparse.Namespace, console: Console) -> list[KernelRow]:
    rows: list[KernelRow] = []
    torch.manual_seed(0)
    for shape_name, (n, k) in SHAPES.items():
        weight = torch.randn(n, k) * 0.05  # [N, K]
        for kernel in kernels(args.compile):
            if not kernel.applies(n, k):
                continue
            started = time.perf_counter()
            first = kernel.make(weight)
            nbytes = kernel.nbytes(first)
            copies = max(2, min(MAX_COPIES, math.ceil(COLD_BYTES / nbytes)))
            states = [first] + [
                kernel.make(weight) if "fbgemm" in kernel.name
                else copy.deepcopy(first) for _ in range(copies - 1)
            ]  # fmt: skip
            row = KernelRow(shape_name, kernel.name, nbytes / 1e6)
            compile_s = 0.0
            for batch in BATCHES:
                if batch > kernel.max_batch:
                    continue
                x = torch.randn(batch, k).to(kernel.x_dtype)  # [M, K]
                if kernel.compiled:
                    t0 = time.perf_counter()
                    kernel.run(states[0], x)
                    compile_s += time.perf_counter() - t0
                us = time_call(
                    functools.partial(_call, kernel.run, states, x),
                    copies,
                    args.budget,
                    args.max_runs,
                )
                row.cells[batch] = Cell(us, nbytes / us / 1e3)
            if kernel.compiled:
                row.note = f"compile {compile_s:.1f} s for {len(row.cells)} batch sizes"
            rows.append(row)
            del states, first
            cells = "  ".join(f"b{b}={c.us:.0f}µs" for b, c in row.cells.items())
            console.log(
                f"{shape_name:8} {kernel.name:34} {copies:3} copies "
                f"{time.perf_counter() - started:5.1f} s  {cells}"
            )
    return rows


# --------------------------------------------------------------------------- quality


@dataclass
class QualityRow:
    kind: str
    scheme: str
    weight_err: float  # ||W_q - W|| / ||W||, mean over sampled layers
    output_err: float  # ||y_q - y|| / ||y|| for x ~ N(0, 1) [8, K]


def _int4_sym(w: torch.Tensor, group: int) -> torch.Tensor:
    n, k = w.shape
    wg = w.view(n, k // group, group)
    scale = (wg.abs().amax(-1, keepdim=True) / 7.5).clamp(min=1e-8)
    return ((wg / scale - 0.5).round().clamp(-8, 7) + 0.5).mul(scale).view(n, k)


def measure_quality(tensors: dict[str, torch.Tensor]) -> list[QualityRow]:
    layers = (0, 10, 20, 29)
    kinds = {
        kind: [tensors[f"blk.{i}.{kind}.weight"] for i in layers]
        for kind in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
    }
    kinds["token_embd"] = [tensors["token_embd.weight"]]
    schemes: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "int8 per-channel sym": lambda w: prepare_linear(w, QuantMode.INT8).dequantize(),
        "int4 g32 asym": lambda w: dequantize_int4(*quantize_int4(w, 32)),
        "int4 g64 asym": lambda w: dequantize_int4(*quantize_int4(w, 64)),
        "int4 g32 sym": lambda w: _int4_sym(w, 32),
        "int4 g64 sym": lambda w: _int4_sym(w, 64),
    }
    rows: list[QualityRow] = []
    generator = torch.Generator().manual_seed(0)
    for kind, weights in kinds.items():
        for scheme, fake_quant in schemes.items():
            w_errs, y_errs = [], []
            for w in weights:
                x = torch.randn(8, w.shape[1], generator=generator)
                wq = fake_quant(w)
                y = x @ w.T
                w_errs.append(float((wq - w).norm() / w.norm()))
                y_errs.append(float((x @ wq.T - y).norm() / y.norm()))
            rows.append(QualityRow(kind, scheme, statistics.mean(w_errs), statistics.mean(y_errs)))
        # the engine's kernels end to end (bf16 activations included) and fbgemm dynamic
        for label, call in (
            ("quant.py int8 kernel", lambda w: prepare_linear(w, QuantMode.INT8)),
            ("quant.py int4 kernel", lambda w: prepare_linear(w, QuantMode.INT4)),
            ("fbgemm dynamic int8", _fbgemm_linear),
        ):
            y_errs = []
            for w in weights:
                x = torch.randn(8, w.shape[1], generator=generator)
                y = x @ w.T
                y_errs.append(float((call(w)(x) - y).norm() / y.norm()))
            rows.append(QualityRow(kind, label, float("nan"), statistics.mean(y_errs)))
    return rows


def _fbgemm_linear(w: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    packed = _fbgemm_dynamic(w)[0]
    return lambda x: torch.ops.quantized.linear_dynamic(x, packed, False)


# --------------------------------------------------------------------------- whole model


@dataclass
class ModelRow:
    mode: str
    weight_mb: float
    decode_tps: float
    batch16_tps: float
    kl: float = 0.0
    top1: float = 1.0
    ppl: float = 0.0


FBGEMM_DYNAMIC = "int8 fbgemm dynamic"  # benchmark-only variant: activations quantized too
INT4_HEAD = "int4 + int4 head"  # INT4 with the tied embedding/head int4 too (not the default)


class _FbgemmDynamicLinear:
    """fbgemm dynamic int8 (x quantized per tensor each call), for comparison only."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.out_features, self.in_features = weight.shape
        self.packed, self.nbytes = _fbgemm_dynamic(weight.float())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)  # [M, K]
        y = torch.ops.quantized.linear_dynamic(x2, self.packed, False)  # [M, N]
        return y.view(*x.shape[:-1], self.out_features)  # type: ignore[no-any-return]


def _model_variant(model: GgufModel, mode: str) -> Llama:
    """The Llama loaded as ``mode``: a :class:`QuantMode`, or a benchmark-only variant."""
    if mode == FBGEMM_DYNAMIC:
        llama = Llama(model, QuantMode.FP32, keep_source=True)
        for layer in llama.layers:
            for name in ("qkv", "out", "gate_up", "down"):
                setattr(layer, name, _FbgemmDynamicLinear(getattr(layer, name).dequantize()))
        tied = llama.output.dequantize()
        llama.embed = prepare_embedding(tied, QuantMode.INT8)
        llama.output = _FbgemmDynamicLinear(tied)  # type: ignore[assignment]
        return llama
    if mode == INT4_HEAD:
        llama = Llama(model, QuantMode.INT4, keep_source=True)
        tied = torch.from_numpy(model.tensors["token_embd.weight"])
        llama.embed, llama.output = prepare_tied(tied, QuantMode.INT4, head_mode=QuantMode.INT4)
        return llama
    return Llama(model, mode, keep_source=True)


def _decode_tps(llama: Llama, prompt: list[int], batch: int, steps: int) -> float:
    """Tokens/s of greedy decode steps for ``batch`` sequences: batch / median step time."""
    cache = llama.new_cache(batch, len(prompt) + steps + 2)
    for slot in range(batch):
        logits = llama.forward(torch.tensor([prompt]), [slot], cache)
    slots = list(range(batch))
    tokens = logits.argmax(-1).repeat(batch).view(batch, 1)  # [B, 1]
    tokens = llama.forward(tokens, slots, cache).argmax(-1).view(batch, 1)  # warm-up step
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        tokens = llama.forward(tokens, slots, cache).argmax(-1).view(batch, 1)
        times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def teacher_forced_logprobs(llama: Llama, ids: list[int]) -> torch.Tensor:
    """Log-probabilities [T - 1, V] after each prefix of ``ids``, one decode step at a time."""
    cache = llama.new_cache(1, len(ids))
    out = [
        torch.log_softmax(llama.forward(torch.tensor([[t]]), [0], cache)[0], -1) for t in ids[:-1]
    ]
    return torch.stack(out)


def measure_model(console: Console, steps: int) -> tuple[list[ModelRow], dict[str, Any]]:
    model = load_gguf(smollm2_path())
    ids = Tokenizer(model.tokenizer).encode(TEXT)
    prompt = ids[:16]
    rows: list[ModelRow] = []
    reference: torch.Tensor | None = None
    for mode in [*QuantMode, INT4_HEAD, FBGEMM_DYNAMIC]:
        llama = _model_variant(model, str(mode))
        logp = teacher_forced_logprobs(llama, ids)  # [T - 1, V]
        targets = torch.tensor(ids[1:])
        nll = -logp.gather(1, targets[:, None]).mean()
        row = ModelRow(
            mode=str(mode),
            weight_mb=llama.nbytes / 1e6,
            decode_tps=_decode_tps(llama, prompt, 1, steps),
            batch16_tps=_decode_tps(llama, prompt, 16, max(8, steps // 4)),
            ppl=float(nll.exp()),
        )
        if reference is None:
            reference = logp
        else:
            row.kl = float(
                (reference.exp() * (reference - logp)).sum(-1).mean()
            )  # KL(fp32 || mode)
            row.top1 = float((reference.argmax(-1) == logp.argmax(-1)).float().mean())
        rows.append(row)
        console.log(
            f"model {mode}: {row.decode_tps:.1f} tok/s b=1, {row.batch16_tps:.1f} b=16, "
            f"ppl {row.ppl:.3f}, KL {row.kl:.5f}, top-1 {row.top1:.3f}"
        )
        del llama
    return rows, {"text_tokens": len(ids), "steps": steps}


# --------------------------------------------------------------------------- report


def estimate_tps(rows: list[KernelRow], mode: str, batch: int = 1) -> float | None:
    """Decode tok/s of ``mode`` if a token cost only its 30 layers' linears plus the LM head."""
    layer_kernel, head_kernel = ENGINE_KERNELS[mode]
    us = {
        r.shape: r.cells[batch].us
        for r in rows
        if batch in r.cells and r.kernel == (head_kernel if r.shape == "lm_head" else layer_kernel)
    }
    if any(s not in us for s in SHAPES):
        return None
    per_layer = us["qkv"] + us["out"] + us["gate_up"] + us["down"]
    return 1e6 / (LAYERS * per_layer + us["lm_head"])


_Q8, _Q4 = (_engine_kernel(m, block_kernels()) for m in (QuantMode.INT8, QuantMode.INT4))
ENGINE_KERNELS = {  # mode -> (kernel of the layers' linears, kernel of the LM head)
    "fp32": ("fp32 F.linear", "fp32 F.linear"),
    "int8": (_Q8, _Q8),
    "int4": (_Q4, _Q8),
    INT4_HEAD: (_Q4, _Q4),
    FBGEMM_DYNAMIC: ("fbgemm dynamic int8 (quantizes x)",) * 2,
}


def kernel_table(rows: list[KernelRow]) -> Table:
    fp32 = {
        (r.shape, b): c.us for r in rows if r.kernel == "fp32 F.linear" for b, c in r.cells.items()
    }
    table = Table(title="x @ W.T, µs per call (median, weights cold in DRAM), GB/s of weight bytes")
    for col in ("matrix", "kernel", "MB"):
        table.add_column(col)
    for b in BATCHES:
        table.add_column(f"b={b} µs", justify="right")
        table.add_column(f"b={b} GB/s", justify="right")
    table.add_column("×fp32 b=1", justify="right")
    table.add_column("×fp32 b=16", justify="right")
    table.add_column("note")
    for r in rows:
        cells: list[str] = [r.shape, r.kernel, f"{r.weight_mb:.2f}"]
        for b in BATCHES:
            c = r.cells.get(b)
            cells += [f"{c.us:.0f}", f"{c.gbps:.1f}"] if c else ["—", "—"]
        for b in (1, 16):
            c = r.cells.get(b)
            cells.append(f"{fp32[(r.shape, b)] / c.us:.2f}" if c else "—")
        table.add_row(*cells, r.note)
    return table


def _markdown(table: Table) -> str:
    header = [str(c.header) for c in table.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    columns = [list(c.cells) for c in table.columns]
    for i in range(table.row_count):
        lines.append("| " + " | ".join(str(col[i]) for col in columns) + " |")
    return "\n".join(lines)


def quality_table(rows: list[QualityRow]) -> Table:
    table = Table(title="Quality on SmolLM2 weights (layers 0/10/20/29): relative error")
    for col in ("matrix", "scheme", "weight err", "x@W.T err"):
        table.add_column(col)
    for r in rows:
        w = "—" if math.isnan(r.weight_err) else f"{r.weight_err:.4f}"
        table.add_row(r.kind, r.scheme, w, f"{r.output_err:.4f}")
    return table


def model_table(rows: list[ModelRow], kernel_rows: list[KernelRow]) -> Table:
    table = Table(title="Whole model (SmolLM2-135M), 2 threads")
    for col in (
        "mode", "weights MB", "linears-only bound tok/s", "decode tok/s b=1",
        "agg tok/s b=16", "perplexity", "KL vs fp32", "top-1 = fp32",
    ):  # fmt: skip
        table.add_column(col)
    for r in rows:
        bound = estimate_tps(kernel_rows, r.mode)
        table.add_row(
            r.mode, f"{r.weight_mb:.0f}", f"{bound:.0f}" if bound else "—",
            f"{r.decode_tps:.1f}", f"{r.batch16_tps:.1f}", f"{r.ppl:.3f}",
            f"{r.kl:.5f}", f"{r.top1:.3f}",
        )  # fmt: skip
    return table


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter timing, no model section")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--no-model", dest="model", action="store_false")
    parser.add_argument("--no-kernels", dest="kernels", action="store_false")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.budget = 0.12 if args.quick else 0.4
    args.max_runs = 100 if args.quick else 400
    if args.quick:
        args.model = False
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(THREADS)
    torch._dynamo.config.cache_size_limit = 64
    console = results_console()
    started = time.monotonic()
    kernel_rows = measure_kernels(args, console) if args.kernels else []
    tables: list[Table] = []
    if kernel_rows:
        tables.append(kernel_table(kernel_rows))
    with torch.inference_mode():
        real = {k: torch.from_numpy(v) for k, v in load_gguf(smollm2_path()).tensors.items()}
        tables.append(quality_table(measure_quality(real)))
        del real
    if args.model:
        model_rows, _ = measure_model(console, steps=64)
        tables.append(model_table(model_rows, kernel_rows))
    for table in tables:
        console.print(table)
    took = time.monotonic() - started
    estimates = [
        f"- {mode}: {tps:.0f} tok/s"
        for mode in ENGINE_KERNELS
        if (tps := estimate_tps(kernel_rows, mode)) is not None
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    sections = "\n\n".join(f"## {t.title}\n\n{_markdown(t)}" for t in tables)
    (args.out / "cpu_linear_kernels.md").write_text(
        f"""# CPU linear kernels (SmolLM2-135M shapes)

Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC. Command: `python -m meshbench.cpu_linear_kernels\
{" --quick" if args.quick else ""}{"" if args.compile else " --no-compile"}\
{"" if args.model else " --no-model"}{"" if args.kernels else " --no-kernels"}`. Took {took:.0f} s.

Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__} \
(CPU capability {torch.backends.cpu.get_cpu_capability()}), Python {platform.python_version()}.
Each kernel cycles through distinct copies of its weight totalling >= 96 MiB (3x L3), so
every call reads its weight from DRAM; µs are medians after a warm-up. "(bf16 x)" kernels
take bf16 activations (the conversion is not timed); the `quant.py` rows are the engine's
wrappers, fp32 in and out, conversions included. fp32-activation paths of the aten int
kernels are scalar code and only run up to batch {SLOW_PATH_MAX_BATCH}.

Batch-1 decode bound from the kernel rows (30 x (qkv + out + gate_up + down) + lm_head,
nothing else):

{chr(10).join(estimates) or "- (kernels not measured)"}

{sections}
""",
        encoding="utf-8",
    )
    console.print(f"took {took:.0f} s; results in {args.out}/cpu_linear_kernels.md")


if __name__ == "__main__":
    main()
