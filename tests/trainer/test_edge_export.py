"""The edge export: a registered model re-quantized to Q4_0 (or Q8_0), compared with the
registered file in our engine before it is written (``meshllm export``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from meshllm.cli import app
from services.inference.loading import build_llama
from services.inference.model.gguf_model import load_gguf, smollm2_path
from services.inference.model.quant import QuantMode
from services.inference.registry import ModelRegistry, ensure_default
from services.trainer.export import requantize_gguf, tensor_type
from services.trainer.quant_check import (
    GENERAL_PROMPTS,
    Thresholds,
    check_prompts,
    divergence,
    run_check,
)

FEW = [[{"role": "user", "content": text}] for text in GENERAL_PROMPTS[:4]]


@pytest.fixture(scope="module")
def q4_0(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("edge") / "edge.Q4_0.gguf"
    return requantize_gguf(smollm2_path(), out, quant="q4_0", name="edge test")


def test_q4_0_holds_the_layers_in_four_bits_and_loads_in_our_engine(q4_0: Path) -> None:
    original, edge = load_gguf(smollm2_path()), load_gguf(q4_0)
    assert edge.name == "edge test"
    assert edge.tokenizer == original.tokenizer
    assert edge.config == original.config
    layers = {k for n, k in edge.tensor_types.items() if n.startswith("blk.") and "norm" not in n}
    assert layers == {"Q4_0"}
    assert edge.tensor_types["token_embd.weight"] == "Q8_0"  # also the (tied) output head
    for name, array in original.tensors.items():
        if edge.tensor_types[name] == "F32":
            np.testing.assert_array_equal(edge.tensors[name], array, err_msg=name)
    assert build_llama(edge, "auto").quant is QuantMode.INT4
    assert q4_0.stat().st_size < smollm2_path().stat().st_size  # Q4_0 blocks: 18 bytes, Q4_1: 20


def test_an_unknown_precision_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"quant must be one of q8_0, q4_0, f32; got 'q3'"):
        tensor_type("blk.0.attn_q.weight", (576, 576), "q3")
    with pytest.raises(ValueError, match="quant must be one of"):
        requantize_gguf(smollm2_path(), tmp_path / "x.gguf", quant="int4")
    assert not list(tmp_path.iterdir())


def test_divergence_counts_kl_and_top1() -> None:
    import torch

    ref = torch.log_softmax(torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0]]), -1)
    same_kl, same_top = divergence(ref, ref)
    assert same_kl == pytest.approx(0.0, abs=1e-6)
    assert same_top == 2
    other = torch.log_softmax(torch.tensor([[0.0, 2.0, 0.0], [0.0, 3.0, 0.0]]), -1)
    kl, top = divergence(ref, other)
    assert kl > 0.5
    assert top == 1


def test_the_check_passes_a_close_file_and_names_what_fails(q4_0: Path, tmp_path: Path) -> None:
    """Q8_0 of the bundled Q4_1 model is within rounding of it; Q4_0 of it is not (a 4-bit
    grid on another 4-bit grid: measured KL ~0.25 nats, top-1 ~84% on the general prompts),
    and the check says so rather than assuming 4 bits are fine."""
    q8_0 = requantize_gguf(smollm2_path(), tmp_path / "q8.gguf", quant="q8_0")
    close = run_check(smollm2_path(), q8_0, FEW, max_tokens=12)
    assert close.prompts == 4
    assert close.positions > 4
    assert close.kl < 0.02
    assert close.top1 > 0.9
    assert close.passed, close.reasons()
    assert close.reasons() == []
    far = run_check(smollm2_path(), q4_0, FEW, max_tokens=12)
    assert not far.passed
    assert far.kl > 0.05
    assert f"KL {far.kl:.4f} nats is above max_kl 0.05" in far.reasons()
    assert far.as_dict()["passed"] is False
    lenient = run_check(
        smollm2_path(), q4_0, FEW, max_tokens=12, thresholds=Thresholds(max_kl=5, min_top1=0.5)
    )
    assert lenient.passed


def test_check_prompts_take_a_validation_file_up_to_its_last_answer(tmp_path: Path) -> None:
    rows = [
        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "Payday?"},
                      {"role": "assistant", "content": "The 26th."}]},
    ]  # fmt: skip
    path = tmp_path / "valid.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts = check_prompts(path)
    assert len(prompts) == len(GENERAL_PROMPTS) + 1
    assert prompts[-1] == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Payday?"}
    ]  # fmt: skip
    path.write_text('{"messages": [{"role": "user", "content": "no answer"}]}\n')
    with pytest.raises(ValueError, match="line 1"):
        check_prompts(path)


def test_thresholds_are_checked() -> None:
    with pytest.raises(ValueError, match="max_kl must be above 0"):
        Thresholds(max_kl=0)
    with pytest.raises(ValueError, match="min_top1"):
        Thresholds(min_top1=1.5)


def test_meshllm_export_writes_a_checked_file_or_nothing(tmp_path: Path) -> None:
    registry = tmp_path / "models"
    entry = ensure_default(ModelRegistry(registry))
    runner = CliRunner()
    base = ["export", entry.ref, "--model-dir", str(registry)]

    refused = runner.invoke(app, [*base, "--quant", "q2_k"])
    assert refused.exit_code == 2
    assert "--quant must be one of q4_0, q8_0" in refused.output
    unknown = runner.invoke(app, ["export", "nope:1", "--model-dir", str(registry)])
    assert unknown.exit_code == 1
    assert "model 'nope' is not registered" in unknown.output

    out = tmp_path / "edge.gguf"
    failed = runner.invoke(app, [*base, "--out", str(out)])  # Q4_0 of a Q4_1 model: too far
    assert failed.exit_code == 1, failed.output
    assert "not exported: KL" in failed.output
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["models"]  # nothing left behind

    done = runner.invoke(app, [*base, "--out", str(out), "--max-kl", "5", "--min-top1", "0.5"])
    assert done.exit_code == 0, done.output
    report = json.loads(Path(f"{out}.json").read_text())
    assert report["source"] == entry.ref
    assert report["source_sha256"] == entry.sha256
    assert report["check"]["passed"] is True
    assert report["bytes"] == out.stat().st_size
    assert report["engine"]["tokens"] > 0
    assert report["engine"]["answer"].strip()
    assert load_gguf(out).tensor_types["blk.0.ffn_up.weight"] == "Q4_0"


def test_our_q4_0_blocks_decode_as_gguf_says_and_our_engine_reads_them_exactly() -> None:
    """The layout is GGUF's (its own decoder reads it), the scale search has less error
    than llama.cpp's reference rounding, and every block keeps its extreme at code 0, so
    the engine's grid inference reproduces each value."""
    import gguf
    import torch
    from gguf.quants import dequantize, quantize

    from services.inference.model.quant import four_bit_grid
    from services.trainer.export import quantize_q4_0

    q4_0 = gguf.GGMLQuantizationType.Q4_0
    weight = load_gguf(smollm2_path()).tensors["blk.0.ffn_up.weight"]
    ours = dequantize(quantize_q4_0(weight), q4_0)
    reference = dequantize(quantize(weight, q4_0), q4_0)
    assert ours.shape == weight.shape
    assert ((ours - weight) ** 2).sum() < 0.9 * ((reference - weight) ** 2).sum()
    blocks = torch.from_numpy(ours).float().reshape(ours.shape[0], -1, 32)
    codes, d, c = four_bit_grid(blocks, torch.float16)
    read = (codes.float() - 8) * d.float()[..., None] + c.float()[..., None]
    torch.testing.assert_close(read, blocks, atol=1e-6, rtol=0)
    zeros = np.zeros((2, 64), dtype=np.float32)
    assert not dequantize(quantize_q4_0(zeros), q4_0).any()
