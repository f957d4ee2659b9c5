"""Export to GGUF: a model in Hugging Face's layout written on the base file's template loads
in our engine with the same weights (to Q8_0's precision) and answers as the base does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from services.inference.model.gguf_model import load_gguf, smollm2_path
from services.trainer.export import ExportError, export_gguf, hf_name, interleave_rotary


def hf_layout(path: Path) -> dict[str, np.ndarray]:
    """The bundled model's weights as Hugging Face names and lays them out."""
    model = load_gguf(path)
    heads, kv_heads = model.config.num_heads, model.config.num_kv_heads
    weights = {}
    for name, stored in model.tensors.items():
        array = stored
        if name.endswith(("attn_q.weight", "attn_k.weight")):
            n = heads if "attn_q" in name else kv_heads
            rows = array.shape[0]
            array = array.reshape(n, rows // n // 2, 2, -1).swapaxes(1, 2).reshape(array.shape)
        weights[hf_name(name)] = array
    return weights


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    weights = hf_layout(smollm2_path())
    out = tmp_path_factory.mktemp("export") / "model.Q8_0.gguf"
    export_gguf(weights, smollm2_path(), out, name="export test")
    return out, weights


def test_interleaving_is_undone_exactly() -> None:
    weight = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)  # 2 heads of 4 rows
    interleaved = interleave_rotary(weight, 2)
    # head 0: rows 0,1 are the first rotary half, 2,3 the second -> 0,2,1,3
    assert interleaved[:4, 0].tolist() == [0.0, 6.0, 3.0, 9.0]
    back = interleaved.reshape(2, 2, 2, 3).swapaxes(1, 2).reshape(8, 3)
    np.testing.assert_array_equal(back, weight)


def test_the_export_holds_the_weights_in_llama_cpps_layout(
    exported: tuple[Path, dict[str, np.ndarray]],
) -> None:
    out, _ = exported
    original, again = load_gguf(smollm2_path()), load_gguf(out)
    assert again.tokenizer == original.tokenizer
    assert again.config == original.config
    assert again.name == "export test"
    assert set(again.tensors) == set(original.tensors)
    for name, array in original.tensors.items():
        step = np.abs(array).max() / 127  # Q8_0's step is at most the largest value's / 127
        np.testing.assert_allclose(again.tensors[name], array, atol=step, err_msg=name)
    kinds = set(again.tensor_types.values())
    assert kinds == {"Q8_0", "F32"}


def test_a_missing_or_misshapen_weight_is_named(
    exported: tuple[Path, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    _, weights = exported
    missing = {k: v for k, v in weights.items() if k != "model.layers.3.mlp.up_proj.weight"}
    with pytest.raises(ExportError, match=r"model.layers.3.mlp.up_proj.weight \(for blk.3"):
        export_gguf(missing, smollm2_path(), tmp_path / "x.gguf")
    wrong = dict(weights)
    wrong["model.norm.weight"] = np.zeros(7, dtype=np.float32)
    with pytest.raises(ExportError, match=r"model\.norm\.weight has shape"):
        export_gguf(wrong, smollm2_path(), tmp_path / "y.gguf")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_our_engine_reads_the_export_as_the_base(
    exported: tuple[Path, dict[str, np.ndarray]],
) -> None:
    """Teacher-forced over a text: the next-token choice and distribution agree (Q8_0 of
    the base's Q4_1 values is within rounding of them)."""
    import torch

    from services.inference.model.llama import Llama
    from services.inference.model.tokenizer import Tokenizer

    out, _ = exported
    text = (
        "The annual leave policy gives every employee twenty-seven days a year. Unused days "
        "may be carried over to the first quarter of the next year, with a manager's approval."
    )
    logprobs = []
    for path in (smollm2_path(), out):
        gguf = load_gguf(path)
        ids = Tokenizer(gguf.tokenizer).encode(text)
        llama = Llama(gguf, "fp32")
        cache = llama.new_cache(1, len(ids))
        steps = [llama.forward(torch.tensor([[t]]), [0], cache)[0] for t in ids[:-1]]
        logprobs.append(torch.log_softmax(torch.stack(steps), -1))  # [T - 1, V]
    base, again = logprobs
    agreement = (base.argmax(-1) == again.argmax(-1)).float().mean().item()
    kl = (base.exp() * (base - again)).sum(-1).mean().item()
    assert agreement >= 0.95, agreement
    assert kl < 0.01, kl
