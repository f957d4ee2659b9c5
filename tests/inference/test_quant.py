"""Quantized linears: accuracy against fp32, packing round trips, tied heads.

Every int8/int4 check runs on both kernel families: torch's weight-only kernels (bf16
activations, ``block=False``) and the block-quantized kernels of ``meshllm_kernels/cpu`` (int8
activations per block of 32, ``block=True``), which the suite builds on first use.
"""

from __future__ import annotations

import pytest
import torch

from services.inference.model.gguf_model import GgufModel
from services.inference.model.llama import Llama
from services.inference.model.quant import (
    BLOCK,
    HEAD_MODE,
    HEAD_REFINE_TOP,
    HEAD_SCREEN_TOP,
    INT4_GROUP_SIZE,
    INT8_KERNEL_MAX_ROWS,
    BlockInt4Linear,
    BlockInt8Linear,
    Int4Linear,
    Int8Linear,
    QuantMode,
    dequantize_int4,
    native_mode,
    pack_int4,
    prepare_embedding,
    prepare_head,
    prepare_linear,
    prepare_tied,
    quantize_int4,
    quantize_int8,
    quantize_q4_blocks,
    quantize_q8_blocks,
    resolve_mode,
    unpack_int4,
)

# Relative error ||y_q - y|| / ||y|| of x @ W.T bounds, per mode. Random Gaussian weights
# measure ~0.008 (int8 per channel) and 0.075-0.091 (int4, groups of 32, 16 levels).
RANDOM_BOUND = {QuantMode.FP32: 1e-6, QuantMode.INT8: 0.012, QuantMode.INT4: 0.1}
# SmolLM2's layers are GGUF Q4_1 (asymmetric int4, groups of 32), so INT4 re-quantizes
# them almost exactly (0.005-0.007, from the bf16 scale/zero and activations); int8 per
# channel measures 0.008-0.012 (layer 0 attn_q is the worst).
REAL_BOUND = {QuantMode.FP32: 1e-6, QuantMode.INT8: 0.016, QuantMode.INT4: 0.01}
# What the bf16 activations and bf16 kernel output cost on their own (~0.0023).
BF16_BOUND = 0.005
# What int8 activations in blocks of 32 cost on their own, on Gaussian x: ~0.005 against an
# int8 weight, up to ~0.013 against an int4 one (the block kernels).
ACTIVATION_BOUND = 0.02
# The block kernels' extra error on SmolLM2's layers: int8 activations (~0.005-0.01).
BLOCK_EXTRA = 0.012

KERNELS = pytest.mark.parametrize("block", [False, True], ids=["torch", "block"])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture(scope="module")
def generator() -> torch.Generator:
    torch.set_num_threads(2)
    return torch.Generator().manual_seed(0)


@KERNELS
@pytest.mark.parametrize("mode", list(QuantMode))
@pytest.mark.parametrize(("out_features", "in_features"), [(960, 576), (576, 1536), (100, 64)])
def test_random_weights_close_to_fp32(
    mode: QuantMode, out_features: int, in_features: int, block: bool, generator: torch.Generator
) -> None:
    weight = torch.randn(out_features, in_features, generator=generator) * 0.05  # [N, K]
    linear = prepare_linear(weight, mode, block=block)
    if mode is not QuantMode.FP32:
        assert isinstance(linear, BlockInt8Linear | BlockInt4Linear) == block
    own_bound = ACTIVATION_BOUND if block and mode is not QuantMode.FP32 else BF16_BOUND
    for rows in (1, 4, INT8_KERNEL_MAX_ROWS, 40):  # 40: int8's wide-batch path
        x = torch.randn(rows, in_features, generator=generator)  # [M, K]
        y = linear(x)  # [M, N]
        assert y.shape == (rows, out_features)
        assert y.dtype == torch.float32
        assert _rel(y, x @ weight.T) < RANDOM_BOUND[mode]
        # the kernel multiplies by exactly the weight dequantize() reports
        assert _rel(y, x @ linear.dequantize().T) < own_bound


@KERNELS
@pytest.mark.parametrize("mode", list(QuantMode))
def test_leading_dims_and_dtype_are_kept(
    mode: QuantMode, block: bool, generator: torch.Generator
) -> None:
    weight = torch.randn(192, 576, generator=generator)
    linear = prepare_linear(weight, mode, block=block)
    x = torch.randn(2, 3, 576, generator=generator)  # [B, S, K]
    y = linear(x)
    assert y.shape == (2, 3, 192)
    assert torch.allclose(y, linear(x.reshape(6, 576)).view(2, 3, 192))
    if mode is not QuantMode.FP32:
        assert linear(x.bfloat16()).dtype == torch.bfloat16


def test_int8_paths_agree(generator: torch.Generator) -> None:
    """The int8pack kernel (narrow x) and the bf16 F.linear path (wide x) give one answer."""
    weight = torch.randn(320, 576, generator=generator)
    wide = Int8Linear(weight, wide_prefill=True)  # torch's kernels only
    x = torch.randn(2 * INT8_KERNEL_MAX_ROWS, 576, generator=generator)
    step = INT8_KERNEL_MAX_ROWS
    narrow = torch.cat([wide(x[i : i + step]) for i in range(0, len(x), step)])
    assert _rel(wide(x), narrow) < 0.004


@KERNELS
@pytest.mark.parametrize("mode", [QuantMode.INT8, QuantMode.INT4])
def test_quantized_rows_do_not_depend_on_their_batch(
    mode: QuantMode, block: bool, generator: torch.Generator
) -> None:
    """Each row's result is bit-identical alone or among others (greedy is reproducible)."""
    linear = prepare_linear(torch.randn(322, 576, generator=generator), mode, block=block)
    x = torch.randn(40, 576, generator=generator)
    together = linear(x)
    for rows in (1, 2, 3, 4, 5, 9, 16):  # every tile shape of the block kernels
        assert torch.equal(linear(x[:rows]), together[:rows]), rows
    for row in (0, 17, 39):
        assert torch.equal(linear(x[row : row + 1])[0], together[row])


def test_nbytes(generator: torch.Generator) -> None:
    n, k = 3072, 576
    weight = torch.randn(n, k, generator=generator)
    assert prepare_linear(weight, QuantMode.FP32).nbytes == n * k * 4
    # codes + bf16 scales
    assert prepare_linear(weight, QuantMode.INT8, block=False).nbytes == n * k + 2 * n
    groups = k // INT4_GROUP_SIZE
    int4 = prepare_linear(weight, QuantMode.INT4, block=False)
    assert int4.nbytes == n * k // 2 + groups * n * 2 * 2
    # block kernels: codes + an fp16 scale a block (and an fp16 offset for int4)
    blocks = k // BLOCK
    assert prepare_linear(weight, QuantMode.INT8, block=True).nbytes == n * k + blocks * n * 2
    assert prepare_linear(weight, QuantMode.INT4, block=True).nbytes == n * k // 2 + blocks * n * 4


def test_int8_quantization_round_trip(generator: torch.Generator) -> None:
    weight = torch.randn(64, 96, generator=generator)
    codes, scale = quantize_int8(weight)
    assert codes.dtype == torch.int8
    assert scale.dtype == torch.bfloat16
    assert int(codes.abs().max()) <= 127
    step = scale.float()[:, None]
    assert bool(((codes.float() * step - weight).abs() <= step / 2 + 1e-6).all())
    # the int8 codes survive the Int8Linear round trip untouched
    linear = prepare_linear(weight, QuantMode.INT8, block=False)
    assert isinstance(linear, Int8Linear)
    assert torch.equal(linear.codes, codes)


def test_int4_packing_round_trip(generator: torch.Generator) -> None:
    codes = torch.randint(0, 16, (48, 128), dtype=torch.uint8, generator=generator)
    packed = pack_int4(codes)
    assert packed.shape == (48, 64)
    assert torch.equal(unpack_int4(packed), codes)
    assert torch.equal(unpack_int4(packed[[3, 7]]), codes[[3, 7]])


@pytest.mark.parametrize("out_features", [64, 100])  # 100: padded to the kernel's multiple of 16
def test_int4_kernel_layout_round_trip(out_features: int, generator: torch.Generator) -> None:
    """Codes written into the kernel's opaque packed layout read back exactly."""
    weight = torch.randn(out_features, 96, generator=generator)
    codes, scale, zero = quantize_int4(weight)
    assert int(codes.max()) <= 15
    # every block at most as far from the weights as on its own min-max grid
    error = (dequantize_int4(codes, scale, zero) - weight).view(out_features, -1, 32)
    assert bool((error.square().sum(-1) <= min_max_error(weight, torch.bfloat16) + 1e-6).all())
    linear = prepare_linear(weight, QuantMode.INT4, block=False)
    assert isinstance(linear, Int4Linear)
    assert torch.equal(linear.codes(), codes)
    assert torch.equal(linear.dequantize(), dequantize_int4(codes, scale, zero))


def min_max_error(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Each block's squared error [N, G] on its min-max grid (GGUF Q4_1's), rounded as stored."""
    w = weight.float().view(weight.shape[0], -1, BLOCK)
    lo, hi = w.amin(-1), w.amax(-1)
    d = ((hi - lo) / 15).to(dtype).float()
    c = (lo + 8 * d).to(dtype).float()
    codes = torch.round((w - c[..., None]) / d[..., None] + 8).clamp(0, 15)
    return ((codes - 8) * d[..., None] + c[..., None] - w).square().sum(-1)


def test_a_q4_0_block_is_read_exactly() -> None:
    """A block on GGUF Q4_0's grid (d * (q - 8), its largest magnitude at code 0) that does
    not reach code 15 is kept exactly; min-max would re-round it onto another grid."""
    d = 2.0**-6  # exact in fp16 (a Q4_0 file) and bf16 (torch's int4 kernel)
    codes = torch.tensor([0, 3, 8, 11, 12, 9, 5, 8] * 4, dtype=torch.float32)  # never 15
    weight = ((codes - 8) * d).view(1, BLOCK)
    assert float(min_max_error(weight, torch.float16).max()) > 1e-6
    back = BlockInt4Linear(weight).dequantize()
    torch.testing.assert_close(back, weight, atol=1e-6, rtol=0)
    codes4, scale, zero = quantize_int4(weight)
    torch.testing.assert_close(dequantize_int4(codes4, scale, zero), weight, atol=1e-6, rtol=0)
    mirrored = -weight  # the largest magnitude positive: the other Q4_0 grid
    codes4, scale, zero = quantize_int4(mirrored)
    torch.testing.assert_close(dequantize_int4(codes4, scale, zero), mirrored, atol=1e-6, rtol=0)


def test_block_quantization_round_trips(generator: torch.Generator) -> None:
    """Block codes read back exactly; no block is further from its weights than on its
    min-max grid."""
    weight = torch.randn(40, 96, generator=generator) + 0.3  # an offset the int4 blocks carry
    packed, scale, offset = quantize_q4_blocks(weight)
    assert packed.shape == (40, 48)
    assert scale.dtype == offset.dtype == torch.float16
    assert scale.shape == offset.shape == (40, 96 // BLOCK)
    linear = BlockInt4Linear(weight)
    codes = linear.codes()  # [N, K] in input order
    assert int(codes.max()) <= 15
    expected = (codes.float().view(40, -1, BLOCK) - 8) * scale.float()[..., None]
    assert torch.equal(linear.dequantize(), (expected + offset.float()[..., None]).view(40, 96))
    error = (linear.dequantize() - weight).view(40, -1, BLOCK).square().sum(-1)
    assert bool((error <= min_max_error(weight, torch.float16) + 1e-5).all())
    # byte j of a block holds inputs j and j + 16
    first = packed.view(40, -1, BLOCK // 2)[:, 0]  # [N, 16]
    assert torch.equal(first & 15, codes[:, :16])
    assert torch.equal(first >> 4, codes[:, 16:32])

    codes8, scale8 = quantize_q8_blocks(weight)
    assert int(codes8.abs().max()) <= 127
    int8 = BlockInt8Linear(weight)
    assert torch.equal(int8.codes, codes8)
    assert torch.equal(int8.scale, scale8)
    step8 = scale8.float().repeat_interleave(BLOCK, dim=1)
    assert bool(((int8.dequantize() - weight).abs() <= step8 / 2 + 1e-5).all())


def test_block_kernels_refuse_bad_shapes() -> None:
    """Checks in the kernel name what is wrong rather than reading past a tensor."""
    linear = BlockInt4Linear(torch.randn(64, 64))
    with pytest.raises(RuntimeError, match="K must be a multiple of 32"):
        torch.ops.meshllm_kernels.q4_linear(
            torch.randn(2, 48), linear.packed, linear.scale, linear.offset
        )
    with pytest.raises(ValueError, match="x has 32 input features; this weight takes 64"):
        linear(torch.randn(2, 32))
    with pytest.raises(RuntimeError, match="codes must be contiguous bytes"):
        torch.ops.meshllm_kernels.q4_linear(
            torch.randn(2, 32), linear.packed, linear.scale, linear.offset
        )
    with pytest.raises(RuntimeError, match="float16"):
        torch.ops.meshllm_kernels.q4_linear(
            torch.randn(2, 64), linear.packed, linear.scale.float(), linear.offset
        )
    head = BlockInt8Linear(torch.randn(64, 64))
    with pytest.raises(RuntimeError, match=r"float16 \[N, 2\]"):
        torch.ops.meshllm_kernels.q8_linear(torch.randn(1, 64), head.codes, head.scale.T)


def test_int4_needs_whole_groups() -> None:
    with pytest.raises(ValueError, match="multiple of the int4 group size"):
        prepare_linear(torch.randn(64, 48), QuantMode.INT4)
    with pytest.raises(ValueError, match="multiple of the block size"):
        prepare_linear(torch.randn(64, 48), QuantMode.INT8, block=True)
    # where the block kernels can't take a shape, int8 falls back to torch's kernel
    assert isinstance(prepare_linear(torch.randn(64, 48), QuantMode.INT8), Int8Linear)


@KERNELS
@pytest.mark.parametrize("mode", list(QuantMode))
def test_real_weights_close_to_fp32(
    gguf_model: GgufModel, mode: QuantMode, block: bool, generator: torch.Generator
) -> None:
    t = gguf_model.tensors
    bound = REAL_BOUND[mode] + (BLOCK_EXTRA if block and mode is not QuantMode.FP32 else 0)
    for name in ("blk.0.attn_q.weight", "blk.15.ffn_gate.weight", "blk.29.ffn_down.weight"):
        weight = torch.from_numpy(t[name])
        x = torch.randn(4, weight.shape[1], generator=generator)
        assert _rel(prepare_linear(weight, mode, block=block)(x), x @ weight.T) < bound, name


@KERNELS
@pytest.mark.parametrize("mode", list(QuantMode))
def test_tied_embedding_and_head(
    gguf_model: GgufModel, mode: QuantMode, block: bool, generator: torch.Generator
) -> None:
    weight = torch.from_numpy(gguf_model.tensors["token_embd.weight"])  # [V, K], Q8_0
    embed, head = prepare_tied(weight, mode, block=block)
    tokens = torch.tensor([[0, 2, 49151], [17, 17, 1000]])
    rows = embed[tokens]  # [2, 3, K]
    assert rows.shape == (2, 3, 576)
    assert rows.dtype == torch.float32
    # the lookup returns the rows the head multiplies by
    assert torch.equal(rows, head.dequantize()[tokens])
    bound = {QuantMode.FP32: 1e-6, QuantMode.INT8: 0.02}[HEAD_MODE[mode]]
    assert _rel(rows, weight[tokens]) < bound
    x = torch.randn(2, 576, generator=generator)
    assert _rel(head(x), x @ weight.T) < bound
    assert embed.nbytes == 0  # the lookup shares the head's storage
    if mode is not QuantMode.FP32:
        # int8 codes + scales, and the int4 screen (half a byte a weight, scales and zeros per 32)
        assert head.nbytes < weight.numel() * 1.7


def test_screened_head_scores_its_candidates_exactly(
    gguf_model: GgufModel, generator: torch.Generator
) -> None:
    """torch's int8 head: an int4 screen picks candidates, scored exactly in fp32."""
    weight = torch.from_numpy(gguf_model.tensors["token_embd.weight"])  # [V, K]
    head = prepare_head(weight, QuantMode.INT8, block=False)
    assert isinstance(head, Int8Linear)
    assert head.screen is not None
    x = torch.randn(3, 576, generator=generator)
    full, best = head(x), head.best(x)  # [3, V]
    candidates = torch.isfinite(best)
    assert candidates.sum(-1).tolist() == [HEAD_SCREEN_TOP] * 3
    # the candidates carry the same exact fp32 scores the full head gives its best tokens
    exact = x @ head.dequantize().T
    assert torch.allclose(best[candidates], exact[candidates], rtol=1e-5, atol=1e-4)
    # and the best token is the full head's best token
    assert torch.equal(best.argmax(-1), full.argmax(-1))
    # the block head has no screen: its int8 kernel is as fast as an int4 screen
    assert prepare_head(weight, QuantMode.INT8, block=True).nbytes < weight.numel() * 1.1


@KERNELS
def test_int4_head_and_untied_embeddings(block: bool, generator: torch.Generator) -> None:
    weight = torch.randn(512, 64, generator=generator)
    tokens = torch.tensor([5, 0, 511])
    embed, head = prepare_tied(weight, QuantMode.INT4, head_mode=QuantMode.INT4, block=block)
    assert isinstance(head, BlockInt4Linear if block else Int4Linear)
    assert torch.equal(embed[tokens], head.dequantize()[tokens])
    # torch's layout is opaque, so its lookup keeps a row-major copy; the block one reads the
    # head's own codes
    assert embed.nbytes == (0 if block else head.nbytes)
    for mode in QuantMode:
        lookup = prepare_embedding(weight, mode, block=block)
        assert _rel(lookup[tokens], weight[tokens]) < RANDOM_BOUND[mode]
        assert lookup.nbytes > 0


@pytest.fixture(scope="module")
def quantized(gguf_model: GgufModel) -> dict[QuantMode, Llama]:
    """Each mode as the service loads it (block kernels, where they built)."""
    return {mode: Llama(gguf_model, mode, keep_source=True) for mode in QuantMode}


def test_quantized_model_agrees_with_fp32(
    gguf_model: GgufModel, quantized: dict[QuantMode, Llama]
) -> None:
    """The whole model loaded as int8 / int4: next-token logits stay close to fp32's."""
    prompt = torch.tensor([[1, 504, 3458, 282, 4649, 314, 253, 4443, 30, 378, 3458, 282]])

    def log_probs(llama: Llama) -> torch.Tensor:
        return torch.log_softmax(llama.forward(prompt, [0], llama.new_cache(1, 16))[0], -1)

    fp32 = log_probs(quantized[QuantMode.FP32])
    for mode in (QuantMode.INT8, QuantMode.INT4):
        assert isinstance(quantized[mode].layers[0].qkv, BlockInt8Linear | BlockInt4Linear)
        torch_kernels = Llama(gguf_model, mode, keep_source=True, block=False)
        for llama in (quantized[mode], torch_kernels):
            quant = log_probs(llama)
            kl = float((fp32.exp() * (fp32 - quant)).sum())
            assert kl < 0.02, mode
            assert int(quant.argmax()) == int(fp32.argmax()), mode


def test_quantized_models_keep_a_half_precision_cache(
    quantized: dict[QuantMode, Llama],
) -> None:
    """The decode kernel's models hold keys and values in float16 (half the memory); fp32
    keeps float32, so it still matches the reference exactly."""
    for mode, dtype in (
        (QuantMode.FP32, torch.float32),
        (QuantMode.INT8, torch.float16),
        (QuantMode.INT4, torch.float16),
    ):
        cache = quantized[mode].new_cache(2, 16)
        assert cache.k.dtype == cache.v.dtype == dtype, mode
    fp32, int4 = (quantized[m].new_cache(2, 16) for m in (QuantMode.FP32, QuantMode.INT4))
    assert int4.nbytes() * 2 == fp32.nbytes()


def test_quantized_model_is_smaller(quantized: dict[QuantMode, Llama]) -> None:
    sizes = {mode: llama.nbytes for mode, llama in quantized.items()}
    assert sizes[QuantMode.FP32] > 500e6  # 135M parameters x 4 bytes
    assert sizes[QuantMode.INT8] < sizes[QuantMode.FP32] / 3.2  # fp16 scale per 32
    assert sizes[QuantMode.INT4] < sizes[QuantMode.INT8] * 0.8


def test_unknown_quantization_names_the_choices(gguf_model: GgufModel) -> None:
    with pytest.raises(ValueError, match=r"unknown quantization 'int3'.*auto, fp32, int8, int4"):
        Llama(gguf_model, "int3", keep_source=True)


@pytest.mark.parametrize(
    ("types", "mode"),
    [
        ({"blk.0.attn_q.weight": "Q4_0", "blk.0.attn_norm.weight": "F32"}, QuantMode.INT4),
        ({"blk.0.attn_q.weight": "Q4_K", "blk.0.ffn_down.weight": "Q6_K"}, QuantMode.INT8),
        ({"blk.0.attn_q.weight": "Q8_0", "token_embd.weight": "Q4_0"}, QuantMode.INT8),
        ({"blk.0.attn_q.weight": "F16"}, QuantMode.INT8),
        ({}, QuantMode.INT8),
    ],
)
def test_auto_follows_the_layers_of_the_file(types: dict[str, str], mode: QuantMode) -> None:
    """int4 only where every layer weight is stored in 4 bits or fewer; int8 otherwise."""
    assert resolve_mode("auto", types) is mode
    assert resolve_mode("fp32", types) is QuantMode.FP32


def test_auto_keeps_the_bundled_files_precision(
    gguf_model: GgufModel, quantized: dict[QuantMode, Llama]
) -> None:
    """SmolLM2's layers are Q4_1 and its tied embedding Q8_0: int4 layers, an int8 head."""
    assert gguf_model.tensor_types["blk.0.ffn_up.weight"] == "Q4_1"
    assert gguf_model.tensor_types["token_embd.weight"] == "Q8_0"
    assert native_mode(gguf_model.tensor_types) is QuantMode.INT4
    int4 = quantized[QuantMode.INT4]
    assert isinstance(int4.layers[0].gate_up, BlockInt4Linear)
    assert isinstance(int4.output, BlockInt8Linear)


def test_construction_drops_the_source_tensors(gguf_model: GgufModel) -> None:
    copy = GgufModel(**{**gguf_model.__dict__, "tensors": dict(gguf_model.tensors)})
    Llama(copy, QuantMode.INT8)
    assert copy.tensors == {}


def test_an_int8_head_rescores_its_best_outputs_in_fp32(generator: torch.Generator) -> None:
    """torch's int8 kernel rounds its output to bf16; its head re-scores the best in fp32."""
    weight = torch.randn(1000, 64, generator=generator)
    head = prepare_head(weight, QuantMode.INT8, block=False)
    x = torch.randn(3, 64, generator=generator)
    y = head(x)
    exact = x @ head.dequantize().T  # fp32 maths on the same int8 weights
    plain = prepare_linear(weight, QuantMode.INT8, block=False)(x)  # bf16-rounded output
    top = plain.topk(HEAD_REFINE_TOP, dim=-1).indices  # the candidates the head re-scores
    refined_error = (y.gather(-1, top) - exact.gather(-1, top)).abs().max()
    plain_error = (plain.gather(-1, top) - exact.gather(-1, top)).abs().max()
    assert refined_error < 1e-4  # fp32 rounding only
    assert plain_error > 100 * refined_error
    # int4 keeps an int8 head
    assert isinstance(prepare_head(weight, QuantMode.INT4, block=False), Int8Linear)
    assert isinstance(prepare_head(weight, QuantMode.INT4, block=True), BlockInt8Linear)
