"""The DP benchmark's data and scoring: no test ticket, nor its phrase or its template, is in
the training rows; an answer counts only when it names the right category and no other."""

from __future__ import annotations

import json
from pathlib import Path

from meshbench.dp_bench import load_tickets, results_text, right, write_training


def test_the_test_tickets_share_neither_phrase_nor_template_with_training(
    tmp_path: Path,
) -> None:
    system, train, test = load_tickets()
    assert len(train) == 240
    assert len(test) == 6 * 8 * 3
    assert {t.category for t in train} == {t.category for t in test}
    data = json.loads(Path("meshbench/data/dp_tickets.json").read_text())
    for category, phrases in data["categories"].items():
        seen = [p for p in phrases[:16] if any(p in t.text for t in train)]
        assert seen  # training rows come from the first 16 phrases only
        assert not any(p in t.text for p in phrases[16:] for t in train if t.category == category)
    assert not {t.text for t in train} & {t.text for t in test}
    write_training(system, train, tmp_path / "train.jsonl")
    from shared.finetune_format import check_jsonl

    assert check_jsonl((tmp_path / "train.jsonl").read_bytes()).rows == 240


def test_an_answer_is_right_only_naming_its_category_alone() -> None:
    categories = ["access", "email", "hardware", "network", "password", "printer"]
    assert right("network", "network", categories)
    assert right("Category: Network.", "network", categories)
    assert not right("network or password", "network", categories)
    assert not right("networking", "network", categories)
    assert not right("", "network", categories)


def test_the_results_state_the_gap_and_the_epsilon_spent() -> None:
    run = {"training": {"tokens_per_s": 90.0, "losses": [[1, 2.0]]}, "steps": 30,
           "loss_after": 0.5}  # fmt: skip
    dp = {"epsilon_spent": 7.99, "noise_multiplier": 0.61}
    report = {
        "when": "now", "quick": False, "machine": ["cpu"], "opacus": "1.6.0", "rows": 240,
        "test_prompts": 4, "hyperparameters": {"n_epochs": 3, "batch_size": 24,
                                               "learning_rate": 0.002, "lora_rank": 8},
        "runs": {"non-private": run, "DP ε=8": {**run, "dp": dp}},
        "scores": {"base": [True, False, False, False], "non-private": [True] * 4,
                   "DP ε=8": [True, True, True, False]},
    }  # fmt: skip
    text = results_text(report)
    assert "| DP ε=8 | 3/4 = 75.0% (95% CI" in text
    assert "| -25.0 | 7.990 | 0.610 | 30 | 90 |" in text
