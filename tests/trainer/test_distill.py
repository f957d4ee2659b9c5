"""Distillation with structured pruning: which layers and channels are cut (on a small random
Llama, exactly), the loss, the settings refused by name, and a real distillation run of
the bundled base through the job process whose student is exported, loads in our engine and
is closer to its teacher after training than before."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from services.trainer.pruning import StudentShape, choose_layers
from shared.openai_protocol import InvalidRequestError
from shared.training_requests import parse_distill, parse_job_request
from tests.conftest import ROOT
from tests.trainer.test_job_process import Child, write_spec


def tiny_llama(layers: int = 4) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=True,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def test_a_students_width_is_a_multiple_of_32_and_layers_keep_both_ends() -> None:
    assert StudentShape(20, 0.75).channels(1536) == 1152
    assert StudentShape(20, 0.7).channels(1536) == 1056
    assert StudentShape(20, 0.001).channels(1536) == 32
    assert StudentShape(20).channels(1536) == 1536
    scores = [0.9, 0.1, 0.5, 0.05, 0.3, 0.8]
    assert choose_layers(scores, 4) == [0, 2, 4, 5]
    assert choose_layers(scores, 2) == [0, 5]
    assert choose_layers(scores, 6) == [0, 1, 2, 3, 4, 5]
    for keep in (1, 7):
        with pytest.raises(ValueError, match="keeps 2 to 6 layers"):
            choose_layers(scores, keep)


def test_a_layer_that_changes_nothing_scores_zero() -> None:
    import torch

    from services.trainer.pruning import layer_scores

    same = torch.randn(2, 5, 8)
    flipped = -same
    mask = torch.ones(2, 5)
    scores = layer_scores([same, same, flipped], mask)
    assert scores[0] == pytest.approx(0.0, abs=1e-6)
    assert scores[1] == pytest.approx(2.0)


def test_pruning_nothing_keeps_the_model_and_cut_channels_are_exactly_removed() -> None:
    import torch

    from services.trainer.pruning import calibrate, prune, top_channels

    teacher = tiny_llama()
    ids = torch.randint(0, 96, (2, 12))
    mask = torch.ones_like(ids)
    expected = teacher(input_ids=ids, attention_mask=mask).logits
    same = prune(copy.deepcopy(teacher), [0, 1, 2, 3], None)
    torch.testing.assert_close(same(input_ids=ids, attention_mask=mask).logits, expected)

    layer_scores, channel_scores = calibrate(teacher, [{"input_ids": ids, "attention_mask": mask}])
    assert len(layer_scores) == 4
    assert all(s.shape == (128,) for s in channel_scores)
    keep = [top_channels(channel_scores[i], 64) for i in range(4)]
    student = prune(copy.deepcopy(teacher), [0, 1, 2, 3], keep)
    assert student.config.intermediate_size == 64
    assert student.model.layers[0].mlp.gate_proj.weight.shape == (64, 64)
    zeroed = copy.deepcopy(teacher)  # the teacher with the cut channels silenced
    with torch.no_grad():
        for layer, kept in zip(zeroed.model.layers, keep, strict=True):
            cut = torch.ones(128, dtype=torch.bool)
            cut[kept] = False
            layer.mlp.down_proj.weight[:, cut] = 0
    torch.testing.assert_close(
        student(input_ids=ids, attention_mask=mask).logits,
        zeroed(input_ids=ids, attention_mask=mask).logits,
    )


def test_a_cut_copy_is_the_pruned_copy_and_leaves_the_teacher_whole() -> None:
    import torch

    from services.trainer.pruning import cut_copy, prune

    teacher = tiny_llama()
    ids = torch.randint(0, 96, (1, 8))
    channels = [torch.arange(0, 128, 2), torch.arange(1, 128, 2)]
    cut = cut_copy(teacher, [0, 2], channels)
    pruned = prune(copy.deepcopy(teacher), [0, 2], channels)
    torch.testing.assert_close(cut(input_ids=ids).logits, pruned(input_ids=ids).logits)
    assert len(teacher.model.layers) == teacher.config.num_hidden_layers == 4
    assert teacher.model.layers[0].mlp.gate_proj.weight.shape == (128, 64)
    assert cut.model.layers[1].mlp.gate_proj.weight.data_ptr() != (
        teacher.model.layers[2].mlp.gate_proj.weight.data_ptr()
    )


def test_a_student_without_some_layers_generates_with_its_cache() -> None:
    import torch

    from services.trainer.pruning import prune

    teacher = tiny_llama()
    student = prune(copy.deepcopy(teacher), [0, 3], None)
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1]
    assert student.config.num_hidden_layers == 2
    ids = torch.randint(0, 96, (1, 6))
    cached = student.generate(ids, max_new_tokens=5, do_sample=False)
    step = ids  # the same greedy tokens without a cache: the layers index it right
    for _ in range(5):
        logits = student(input_ids=step, use_cache=False).logits[:, -1]
        step = torch.cat([step, logits.argmax(-1, keepdim=True)], dim=1)
    assert cached.tolist() == step.tolist()


def test_the_loss_is_the_answers_cross_entropy_when_the_student_matches() -> None:
    import torch

    from services.trainer.distill_loop import ALPHA, distill_loss, token_kl
    from services.trainer.sft import IGNORE

    torch.manual_seed(0)
    logits = torch.randn(2, 6, 20)
    labels = torch.randint(0, 20, (2, 6))
    labels[:, :3] = IGNORE
    mask = torch.ones(2, 6)
    assert float(token_kl(logits, logits, 2.0).abs().max()) < 1e-5
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 20), labels[:, 1:].reshape(-1), ignore_index=IGNORE
    )
    assert float(distill_loss(logits, logits, labels, mask)) == pytest.approx(
        (1 - ALPHA) * float(ce), rel=1e-5
    )
    assert float(distill_loss(logits, logits.flip(0), labels, mask)) > float(
        distill_loss(logits, logits, labels, mask)
    )


@pytest.mark.parametrize(
    ("given", "param"),
    [
        ({}, "distill.student"),
        ({"student": {"layers": 1}}, "distill.student.layers"),
        ({"student": {"layers": "20"}}, "distill.student.layers"),
        ({"student": {"layers": 20, "ffn_keep": 0}}, "distill.student.ffn_keep"),
        ({"student": {"layers": 20, "ffn_keep": 1.5}}, "distill.student.ffn_keep"),
        ({"student": {"layers": 20, "heads": 3}}, "distill.student.heads"),
        ({"student": {"layers": 20}, "teacher": "other-model"}, "distill.teacher"),
        ({"student": {"layers": 20}, "alpha": 0.5}, "distill.alpha"),
        ("small", "distill"),
    ],
)
def test_bad_distill_settings_are_refused_by_name(given: Any, param: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        parse_distill(given, "smollm2")
    assert caught.value.param == param


def test_a_distill_job_has_its_own_method_and_no_dp() -> None:
    student = {"layers": 20, "ffn_keep": 0.75}
    body = {"model": "smollm2", "training_file": "file-" + "a" * 24,
            "distill": {"teacher": "smollm2", "student": student}}  # fmt: skip
    request = parse_job_request(body)
    assert (request.tuning, request.distill) == ("distill", {"layers": 20, "ffn_keep": 0.75})
    for extra, param in (({"method": "lora"}, "method"), ({"dp": {"epsilon": 8}}, "dp")):
        with pytest.raises(InvalidRequestError) as caught:
            parse_job_request(body | extra)
        assert caught.value.param == param


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"method": "distill"}, "distill"),
        ({"distill": {"layers": 20}}, "distill"),
        ({"method": "distill", "distill": {"layers": 0}}, "distill.layers"),
        ({"method": "distill", "distill": {"layers": 20, "ffn_keep": 2}}, "distill.ffn_keep"),
    ],
)
def test_a_bad_distill_spec_exits_2_naming_the_field(
    tmp_path: Path, changes: dict[str, Any], field: str
) -> None:
    spec = write_spec(tmp_path, tmp_path / "cache", **changes)
    result = subprocess.run(
        [sys.executable, "-m", "services.trainer.job_process", str(spec)],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    (line,) = [json.loads(raw) for raw in result.stdout.splitlines()]
    assert (line["event"], line["field"]) == ("error", field)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_pruned_student_learns_from_its_teacher_and_serves(
    tmp_path: Path, base_cache: Path
) -> None:
    from services.inference.model.gguf_model import read_gguf_header, smollm2_path
    from services.trainer import export
    from services.trainer.quant_check import greedy, load_file

    spec = write_spec(tmp_path, base_cache, method="distill",
                      distill={"layers": 20, "ffn_keep": 0.75})  # fmt: skip
    child = Child(spec, tmp_path / "run.log")
    result = child.until("result", timeout=600)
    assert child.wait(60) == 0
    distill = result["distill"]
    assert len(distill["layers_kept"]) == 20
    assert {0, 29} <= set(distill["layers_kept"])
    assert distill["intermediate_size"] == 1152
    assert distill["student_parameters"] < 0.7 * distill["teacher_parameters"]
    assert distill["kl_after"] < distill["kl_before"]
    assert result["weight_delta_norm"] is None

    weights = export.load_weights(Path(result["model_dir"]))
    with pytest.raises(export.ExportError, match="has shape"):  # not without its shape
        export.export_gguf(weights, smollm2_path(), tmp_path / "x.gguf")
    out = export.export_gguf(weights, smollm2_path(), tmp_path / "s.gguf", layers=20, ffn=1152)
    header = read_gguf_header(out)
    assert (header.config.num_layers, header.config.intermediate_size) == (20, 1152)
    loaded = load_file(out, "auto")
    prompt = loaded.tokenizer.encode(
        loaded.tokenizer.render_chat([{"role": "user", "content": "Where is Quillfeather?"}])
    )
    assert len(greedy(loaded, [prompt], 8)[0]) > 0
