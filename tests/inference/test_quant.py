"""Weight-only int8 / int4 linears: accuracy against fp32, packing round trips, tied heads."""

from __future__ import annotations

import pytest
import torch

from services.inference.gguf_model import GgufModel
from services.inference.llama import Llama
from services.inference.quant import (
    HEAD_MODE,
    HEAD_REFINE_TOP,
    HEAD_SCREEN_TOP,
    INT4_GROUP_SIZE,
    INT8_KERNEL_MAX_ROWS,
    Int4Linear,
    Int8Linear,
    QuantMode,
    dequantize_int4,
    pack_int4,
    prepare_embedding,
    prepare_head,
    prepare_linear,
    prepare_tied,
    quantize_int4,
    quantize_int8,
    unpack_int4,
)

# Relative error ||y_q - y|| / ||y|| of x @ W.T bounds, per mode. Random Gaussian weights
# measure ~0.008 (int8 per channel) and ~0.078 (int4, groups of 32, 16 levels).
RANDOM_BOUND = {QuantMode.FP32: 1e-6, QuantMode.INT8: 0.012, QuantMode.INT4: 0.09}
# SmolLM2's layers are GGUF Q4_1 (asymmetric int4, groups of 32), so INT4 re-quantizes
# them almost exactly (0.005-0.007, from the bf16 scale/zero and activations); int8 per
# channel measures 0.008-0.012 (layer 0 attn_q is the worst).
REAL_BOUND = {QuantMode.FP32: 1e-6, QuantMode.INT8: 0.016, QuantMode.INT4: 0.01}
# What the bf16 activations and bf16 kernel output cost on their own (~0.0023).
BF16_BOUND = 0.005


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture(scope="module")
def generator() -> torch.Generator:
    torch.set_num_threads(2)
    return torch.Generator().manual_seed(0)


@pytest.mark.parametrize("mode", list(QuantMode))
@pytest.mark.parametrize(("out_features", "in_features"), [(960, 576), (576, 1536), (100, 64)])
def test_random_weights_close_to_fp32(
    mode: QuantMode, out_features: int, in_features: int, generator: torch.Generator
) -> None:
    weight = torch.randn(out_features, in_features, generator=generator) * 0.05  # [N, K]
    linear = prepare_linear(weight, mode)
    for rows in (1, 4, INT8_KERNEL_MAX_ROWS, 40):  # 40: int8's wide-batch path
        x = torch.randn(rows, in_features, generator=generator)  # [M, K]
        y = linear(x)  # [M, N]
        assert y.shape == (rows, out_features)
        assert y.dtype == torch.float32
        assert _rel(y, x @ weight.T) < RANDOM_BOUND[mode]
        # the kernel multiplies by exactly the weight dequantize() reports
        assert _rel(y, x @ linear.dequantize().T) < BF16_BOUND


@pytest.mark.parametrize("mode", list(QuantMode))
def test_leading_dims_and_dtype_are_kept(mode: QuantMode, generator: torch.Generator) -> None:
    weight = torch.randn(192, 576, generator=generator)
    linear = prepare_linear(weight, mode)
    x = torch.randn(2, 3, 576, generator=generator)  # [B, S, K]
    y = linear(x)
    assert y.shape == (2, 3, 192)
    assert torch.allclose(y, linear(x.reshape(6, 576)).view(2, 3, 192))
    if mode is not QuantMode.FP32:
        assert linear(x.bfloat16()).dtype == torch.bfloat16


def test_int8_paths_agree(generator: torch.Generator) -> None:
    """The int8pack kernel (narrow x) and the bf16 F.linear path (wide x) give one answer."""
    weight = torch.randn(320, 576, generator=generator)
    wide = Int8Linear(weight, wide_prefill=True)
    x = torch.randn(2 * INT8_KERNEL_MAX_ROWS, 576, generator=generator)
    step = INT8_KERNEL_MAX_ROWS
    narrow = torch.cat([wide(x[i : i + step]) for i in range(0, len(x), step)])
    assert _rel(wide(x), narrow) < 0.004


@pytest.mark.parametrize("mode", [QuantMode.INT8, QuantMode.INT4])
def test_quantized_rows_do_not_depend_on_their_batch(
    mode: QuantMode, generator: torch.Generator
) -> None:
    """Each row's result is bit-identical alone or among others (greedy is reproducible)."""
    linear = prepare_linear(torch.randn(320, 576, generator=generator), mode)
    x = torch.randn(40, 576, generator=generator)
    together = linear(x)
    for row in (0, 17, 39):
        assert torch.equal(linear(x[row : row + 1])[0], together[row])


def test_nbytes(generator: torch.Generator) -> None:
    n, k = 3072, 576
    weight = torch.randn(n, k, generator=generator)
    assert prepare_linear(weight, QuantMode.FP32).nbytes == n * k * 4
    assert prepare_linear(weight, QuantMode.INT8).nbytes == n * k + 2 * n  # codes + bf16 scales
    groups = k // INT4_GROUP_SIZE
    assert prepare_linear(weight, QuantMode.INT4).nbytes == n * k // 2 + groups * n * 2 * 2


def test_int8_quantization_round_trip(generator: torch.Generator) -> None:
    weight = torch.randn(64, 96, generator=generator)
    codes, scale = quantize_int8(weight)
    assert codes.dtype == torch.int8
    assert scale.dtype == torch.bfloat16
    assert int(codes.abs().max()) <= 127
    step = scale.float()[:, None]
    assert bool(((codes.float() * step - weight).abs() <= step / 2 + 1e-6).all())
    # the int8 codes survive the Int8Linear round trip untouched
    linear = prepare_linear(weight, QuantMode.INT8)
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
    # every weight within half a step of its code's grid point
    error = (dequantize_int4(codes, scale, zero) - weight).abs().view(out_features, -1, 32)
    assert bool((error <= scale.float()[..., None] / 2 + 1e-6).all())
    linear = prepare_linear(weight, QuantMode.INT4)
    assert isinstance(linear, Int4Linear)
    assert torch.equal(linear.codes(), codes)
    assert torch.equal(linear.dequantize(), dequantize_int4(codes, scale, zero))


def test_int4_needs_whole_groups() -> None:
    with pytest.raises(ValueError, match="multiple of the int4 group size"):
        prepare_linear(torch.randn(64, 48), QuantMode.INT4)


@pytest.mark.parametrize("mode", list(QuantMode))
def test_real_weights_close_to_fp32(
    gguf_model: GgufModel, mode: QuantMode, generator: torch.Generator
) -> None:
    t = gguf_model.tensors
    for name in ("blk.0.attn_q.weight", "blk.15.ffn_gate.weight", "blk.29.ffn_down.weight"):
        weight = torch.from_numpy(t[name])
        x = torch.randn(4, weight.shape[1], generator=generator)
        assert _rel(prepare_linear(weight, mode)(x), x @ weight.T) < REAL_BOUND[mode], name


@pytest.mark.parametrize("mode", list(QuantMode))
def test_tied_embedding_and_head(
    gguf_model: GgufModel, mode: QuantMode, generator: torch.Generator
) -> None:
    weight = torch.from_numpy(gguf_model.tensors["token_embd.weight"])  # [V, K], Q8_0
    embed, head = prepare_tied(weight, mode)
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
    weight = torch.from_numpy(gguf_model.tensors["token_embd.weight"])  # [V, K]
    head = prepare_head(weight, QuantMode.INT8)
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


def test_int4_head_and_untied_embeddings(generator: torch.Generator) -> None:
    weight = torch.randn(512, 64, generator=generator)
    tokens = torch.tensor([5, 0, 511])
    embed, head = prepare_tied(weight, QuantMode.INT4, head_mode=QuantMode.INT4)
    assert isinstance(head, Int4Linear)
    assert torch.equal(embed[tokens], head.dequantize()[tokens])
    assert embed.nbytes == head.nbytes  # its own row-major copy of the same codes
    for mode in QuantMode:
        lookup = prepare_embedding(weight, mode)
        assert _rel(lookup[tokens], weight[tokens]) < RANDOM_BOUND[mode]
        assert lookup.nbytes > 0


@pytest.fixture(scope="module")
def quantized(gguf_model: GgufModel) -> dict[QuantMode, Llama]:
    return {mode: Llama(gguf_model, mode, keep_source=True) for mode in QuantMode}


def test_quantized_model_agrees_with_fp32(quantized: dict[QuantMode, Llama]) -> None:
    """The whole model loaded as int8 / int4: next-token logits stay close to fp32's."""
    prompt = torch.tensor([[1, 504, 3458, 282, 4649, 314, 253, 4443, 30, 378, 3458, 282]])

    def log_probs(llama: Llama) -> torch.Tensor:
        return torch.log_softmax(llama.forward(prompt, [0], llama.new_cache(1, 16))[0], -1)

    fp32 = log_probs(quantized[QuantMode.FP32])
    for mode in (QuantMode.INT8, QuantMode.INT4):
        quant = log_probs(quantized[mode])
        kl = float((fp32.exp() * (fp32 - quant)).sum())
        assert kl < 0.02, mode
        assert int(quant.argmax()) == int(fp32.argmax()), mode


def test_quantized_model_is_smaller(quantized: dict[QuantMode, Llama]) -> None:
    sizes = {mode: llama.nbytes for mode, llama in quantized.items()}
    assert sizes[QuantMode.FP32] > 500e6  # 135M parameters x 4 bytes
    assert sizes[QuantMode.INT8] < sizes[QuantMode.FP32] / 3.5
    assert sizes[QuantMode.INT4] < sizes[QuantMode.INT8] * 0.8


def test_unknown_quantization_names_the_choices(gguf_model: GgufModel) -> None:
    with pytest.raises(ValueError, match=r"unknown quantization 'int3'.*fp32"):
        Llama(gguf_model, "int3", keep_source=True)


def test_construction_drops_the_source_tensors(gguf_model: GgufModel) -> None:
    copy = GgufModel(**{**gguf_model.__dict__, "tensors": dict(gguf_model.tensors)})
    Llama(copy, QuantMode.INT8)
    assert copy.tensors == {}


def test_an_int8_head_rescores_its_best_outputs_in_fp32(generator: torch.Generator) -> None:
    weight = torch.randn(1000, 64, generator=generator)
    head = prepare_head(weight, QuantMode.INT8)
    x = torch.randn(3, 64, generator=generator)
    y = head(x)
    exact = x @ head.dequantize().T  # fp32 maths on the same int8 weights
    plain = prepare_linear(weight, QuantMode.INT8)(x)  # the kernel's bf16-rounded output
    top = plain.topk(HEAD_REFINE_TOP, dim=-1).indices  # the candidates the head re-scores
    refined_error = (y.gather(-1, top) - exact.gather(-1, top)).abs().max()
    plain_error = (plain.gather(-1, top) - exact.gather(-1, top)).abs().max()
    assert refined_error < 1e-4  # fp32 rounding only
    assert plain_error > 100 * refined_error
    assert isinstance(prepare_head(weight, QuantMode.INT4), Int8Linear)  # int4 keeps an int8 head
