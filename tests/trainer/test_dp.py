"""DP-SGD: the sampling and the accounting, each example's gradient being its own and
clipped (Opacus on the real base with LoRA adapters), a private run killed with -9 and
resumed through the job process, the settings refused by name, and the model card."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest

from services.inference import model_card
from services.trainer.privacy import (
    PrivacyBudgetError,
    default_delta,
    plan,
    poisson_rows,
    sample_rate,
    spent_epsilon,
)
from shared.openai_protocol import InvalidRequestError
from shared.training_requests import Privacy, parse_dp
from tests.trainer.test_job_process import QA, Child, rows, write_spec


def test_a_steps_batch_is_a_poisson_sample_fixed_by_the_secret_and_step() -> None:
    assert poisson_rows(1000, 0.1, secret=3, step=7) == poisson_rows(1000, 0.1, secret=3, step=7)
    assert poisson_rows(1000, 0.1, secret=3, step=7) != poisson_rows(1000, 0.1, secret=3, step=8)
    assert poisson_rows(1000, 0.1, secret=3, step=7) != poisson_rows(1000, 0.1, secret=4, step=7)
    sizes = [len(poisson_rows(1000, 0.05, secret=1, step=s)) for s in range(200)]
    assert 45 < sum(sizes) / len(sizes) < 55  # expected 50
    assert len(set(sizes)) > 5  # the size varies, as Poisson sampling's does
    assert sample_rate(4, 12) == pytest.approx(1 / 3)
    assert sample_rate(64, 12) == 1.0


def test_the_noise_spends_the_target_and_the_accountant_says_so() -> None:
    from opacus.accountants import PRVAccountant

    planned = plan(Privacy(epsilon=4.0), rows=480, batch_size=16, steps=90)
    assert planned.delta == 1e-5  # the default: min(1e-5, 1/(10 n))
    assert plan(Privacy(epsilon=4.0), rows=20, batch_size=4, steps=9).delta == 1e-5
    assert default_delta(50_000) == pytest.approx(2e-6)
    assert planned.sample_rate == pytest.approx(16 / 480)
    spent = spent_epsilon(planned.noise_multiplier, planned.sample_rate, 90, planned.delta)
    accountant = PRVAccountant()
    accountant.history = [(planned.noise_multiplier, planned.sample_rate, 90)]
    assert spent == pytest.approx(accountant.get_epsilon(delta=planned.delta))
    assert 3.9 < spent <= 4.0
    # half the steps spend less; more noise for a smaller budget
    assert spent_epsilon(planned.noise_multiplier, planned.sample_rate, 45, planned.delta) < spent
    tighter = plan(Privacy(epsilon=1.0, delta=1e-5), rows=480, batch_size=16, steps=90)
    assert tighter.noise_multiplier > planned.noise_multiplier


def test_a_budget_no_noise_meets_and_a_delta_of_1_over_n_are_refused() -> None:
    with pytest.raises(PrivacyBudgetError, match=r"dp\.epsilon 0\.001 cannot be met"):
        plan(Privacy(epsilon=0.001, delta=1e-9), rows=10, batch_size=10, steps=10_000)
    with pytest.raises(PrivacyBudgetError, match=r"dp\.delta 0\.001 must be below 1/n"):
        plan(Privacy(epsilon=8, delta=1e-3), rows=1000, batch_size=10, steps=100)


def test_a_step_without_rows_still_adds_the_noise() -> None:
    import torch
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    from services.trainer.dp_loop import empty_step

    layer = GradSampleModule(torch.nn.Linear(4, 3))
    before = [p.detach().clone() for p in layer.parameters()]
    noise = torch.Generator().manual_seed(1)
    optimizer = DPOptimizer(
        torch.optim.SGD(layer.parameters(), lr=1.0), noise_multiplier=1.0, max_grad_norm=1.0,
        expected_batch_size=4, generator=noise, secure_mode=True,
    )  # fmt: skip
    empty_step(optimizer, list(layer.parameters()))
    moved = [float((p.detach() - b).abs().max()) for p, b in zip(layer.parameters(), before,
                                                                   strict=True)]  # fmt: skip
    assert all(m > 0 for m in moved)  # noise of std 1/4 per weight, nothing else


@pytest.mark.parametrize(
    ("given", "tuning", "param"),
    [
        ({}, "lora", "dp.epsilon"),
        ({"epsilon": -1}, "lora", "dp.epsilon"),
        ({"epsilon": float("nan")}, "lora", "dp.epsilon"),
        ({"epsilon": True}, "lora", "dp.epsilon"),
        ({"epsilon": 1000}, "lora", "dp.epsilon"),
        ({"epsilon": 8, "delta": 0}, "lora", "dp.delta"),
        ({"epsilon": 8, "delta": 0.01}, "lora", "dp.delta"),
        ({"epsilon": 8, "delta": "1e-5"}, "lora", "dp.delta"),
        ({"epsilon": 8, "max_grad_norm": 0}, "lora", "dp.max_grad_norm"),
        ({"epsilon": 8, "noise_multiplier": 0.1}, "lora", "dp.noise_multiplier"),
        ({"epsilon": 8}, "full", "dp"),
        ({"epsilon": 8}, "dpo", "dp"),
        ("8", "lora", "dp"),
    ],
)
def test_bad_dp_settings_are_refused_by_name(given: Any, tuning: str, param: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        parse_dp(given, tuning)
    assert caught.value.param == param


def test_good_dp_settings_are_kept_with_their_defaults() -> None:
    assert parse_dp({"epsilon": 8}, "lora") == {
        "epsilon": 8, "delta": None, "max_grad_norm": 1.0,
    }  # fmt: skip
    assert parse_dp(None, "lora") is None


def test_a_rows_loss_does_not_depend_on_its_batch_or_padding() -> None:
    import torch

    from services.trainer.dp_loop import per_row_loss
    from services.trainer.sft import IGNORE

    torch.manual_seed(0)
    logits = torch.randn(3, 9, 50)
    labels = torch.randint(0, 50, (3, 9))
    labels[:, :3] = IGNORE  # the prompt
    labels[1, 6:] = IGNORE  # row 1 is shorter: padded
    together = per_row_loss(logits, labels)
    alone = per_row_loss(logits[1:2, :6], labels[1:2, :6])
    assert together[1].item() == pytest.approx(alone.item(), rel=1e-6)
    assert torch.isfinite(together).all()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_each_examples_gradient_is_its_own_and_clipped(base_cache: Path) -> None:
    """Opacus on the real base with adapters: in a padded batch, each row's per-example
    gradient equals that row's gradient alone; the step applies the clipped mean."""
    import torch
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    from services.inference.model.gguf_model import smollm2_path
    from services.trainer import base_model
    from services.trainer.dp_loop import per_row_loss
    from services.trainer.sft import LORA_TARGETS, encode_row
    from services.trainer.sft_loop import collate, trainable_parameters

    base = base_model.load_base(base_cache / base_model.sha256_file(smollm2_path()))
    torch.manual_seed(0)
    model = base_model.with_lora(base.model, 4, 8, 0.0, LORA_TARGETS)
    params = trainable_parameters(model)
    with torch.no_grad():  # adapters that already do something: every weight has a gradient
        for name, param in params.items():
            if "lora_B" in name:
                param.normal_(0, 0.01)
    encoded = [encode_row(row["messages"], base.tokenizer, 128)[0] for row in rows()[:3]]
    assert len({len(row.input_ids) for row in encoded if row}) > 1  # the batch is padded
    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    pad = base.tokenizer.eos_token_id

    def loss_of(batch_rows: list[Any]) -> Any:
        batch = collate(batch_rows, pad, "cpu")
        logits = wrapped(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return per_row_loss(logits.logits, batch["labels"]).mean()

    alone = []
    for row in encoded:
        wrapped.zero_grad(set_to_none=True)
        loss_of([row]).backward()
        alone.append({name: p.grad.clone() for name, p in params.items()})
    wrapped.zero_grad(set_to_none=True)
    for p in params.values():
        p.grad_sample = None
    loss_of(encoded).backward()
    for name, param in params.items():
        for i in range(3):
            torch.testing.assert_close(param.grad_sample[i], alone[i][name], rtol=1e-3, atol=1e-6)

    before = {name: p.detach().clone() for name, p in params.items()}
    clip = 1e-3
    optimizer = DPOptimizer(
        torch.optim.SGD(list(params.values()), lr=1.0), noise_multiplier=0.0,
        max_grad_norm=clip, expected_batch_size=3,
    )  # fmt: skip
    norms = [sum(float(g.pow(2).sum()) for g in grads.values()) ** 0.5 for grads in alone]
    assert min(norms) > 10 * clip  # every example is clipped
    optimizer.step()
    moved = sum(float((p.detach() - before[n]).pow(2).sum()) for n, p in params.items()) ** 0.5
    assert 0 < moved <= clip * (1 + 1e-4)  # the mean of three vectors of norm `clip`


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_private_run_killed_mid_way_resumes_and_reports_the_accountants_epsilon(
    tmp_path: Path, base_cache: Path
) -> None:
    spec = write_spec(tmp_path, base_cache, dp={"epsilon": 8})
    first = Child(spec, tmp_path / "first.log")
    checkpoint = first.until("checkpoint", timeout=300)
    first.process.send_signal(signal.SIGKILL)
    assert first.wait(30) == -signal.SIGKILL
    assert checkpoint["step"] == 2

    second = Child(spec, tmp_path / "second.log")
    result = second.until("result", timeout=400)
    assert second.wait(60) == 0
    assert result["resumed_from_step"] == 2
    dp = result["dp"]
    n = len(QA)
    assert dp["delta"] == 1e-5
    assert dp["sample_rate"] == pytest.approx(4 / n)
    assert dp["steps"] == dp["steps_taken"] == result["steps"] == 6
    assert dp["epsilon_spent"] == pytest.approx(
        spent_epsilon(dp["noise_multiplier"], dp["sample_rate"], 6, 1e-5)
    )
    assert 7.5 < dp["epsilon_spent"] <= 8.0
    assert dp["accountant"] == "prv"
    assert result["weight_delta_norm"] > 0  # the guard passed: the adapters changed the model
    written = json.loads((tmp_path / "run" / "result.json").read_text())
    assert written["dp"] == dp


def test_the_model_card_states_what_a_private_run_spent() -> None:
    manifest = {
        "name": "smollm2", "version": "q4_1-ft-x", "status": "candidate",
        "file_name": "m.Q8_0.gguf", "architecture": "llama", "quantization": "Q8_0",
        "size": 1000, "sha256": "ab" * 32, "created_at": "2026-12-07T12:00:00+00:00",
        "source": "fine-tune ftjob-x",
        "lineage": {
            "base": "smollm2:q4_1", "base_sha256": "cd" * 32, "method": "lora",
            "job_id": "ftjob-x", "tenant": "acme", "created_by": "alice",
            "files": {"training_file": {"id": "file-x", "rows": 480, "sha256": "ef" * 32}},
            "hyperparameters": {"n_epochs": 3, "dp": {"epsilon": 8}},
            "metrics": {"loss_after": 1.25},
            "dp": {
                "epsilon": 8, "delta": 1e-5, "max_grad_norm": 1.0, "sample_rate": 1 / 30,
                "steps": 90, "noise_multiplier": 0.4871, "accountant": "prv",
                "steps_taken": 90, "epsilon_spent": 7.9914,
            },
        },
    }  # fmt: skip
    card = model_card.render(manifest)
    assert "(7.991, 1e-05)-differentially private" in card
    assert "Noise multiplier: 0.4871; per-example clipping norm 1" in card
    assert "training\\_file: file\\-x (480 rows" in card
    manifest["lineage"]["dp"] = None
    assert "Not trained with differential privacy." in model_card.render(manifest)
    del manifest["lineage"]
    assert "No lineage is recorded" in model_card.render(manifest)


def test_the_card_shows_tenant_text_as_text() -> None:
    manifest = {
        "name": "m", "version": "1", "file_name": "m.gguf", "architecture": "llama",
        "quantization": "Q8_0", "size": 1, "sha256": "ab", "created_at": "now",
        "lineage": {"job_id": "ftjob-x", "tenant": "acme",
                    "created_by": "eve](http://evil.example) <script>\n# Approved"},
    }  # fmt: skip
    card = model_card.render(manifest)
    assert "\n# Approved" not in card
    assert "](http" not in card
    assert "<script>" not in card
