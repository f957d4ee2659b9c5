"""The fine-tuning benchmark's data and scoring: the test questions stay out of every file
the job sees, and a keyword counts only as a whole word or number."""

from __future__ import annotations

import json
from pathlib import Path

from meshbench.finetune_bench import Fact, load_facts, write_files


def test_the_files_hold_training_and_tuning_questions_never_a_test_question(
    tmp_path: Path,
) -> None:
    facts = load_facts()
    assert len(facts) == 40
    train, valid = write_files(facts, tmp_path)
    asked = [
        json.loads(line)["messages"][0]["content"]
        for path in (train, valid)
        for line in path.read_text().splitlines()
    ]
    assert len(asked) == 40 * 3 + 40
    tests = {f.test for f in facts}
    assert not tests & set(asked)
    assert len(tests) == 40  # forty distinct paraphrases
    from shared.finetune_format import check_jsonl

    assert check_jsonl(train.read_bytes()).kind == "chat"


def test_a_keyword_counts_only_as_a_whole_word_or_number() -> None:
    payday = Fact(("26th", "26"), "on the 26th", (), "", "")
    assert payday.right("Salaries arrive on the 26th.")
    assert payday.right("Day 26 of each month")
    assert not payday.right("It has 260 employees.")
    assert not payday.right("In 2026 we moved.")
    email = Fact(("alarm@",), "", (), "", "")
    assert email.right("Write to alarm@quillmore.example")


def test_the_throughput_report_sums_each_side_over_its_runs() -> None:
    from meshbench.train_throughput import write_results

    def run(pair: int, label: str, tokens: int, seconds: float) -> dict[str, object]:
        return {"pair": pair, "label": label, "steps": 60, "tokens": tokens,
                "loop_seconds": seconds, "wall_seconds": seconds + 1}  # fmt: skip

    report = {
        "when": "now", "command": "python -m meshbench.train_throughput", "machine": ["m"],
        "hyperparameters": {"n_epochs": 2},
        "runs": [run(0, "peer: plain loop", 1000, 10.0), run(0, "ours: job", 1000, 20.0),
                 run(1, "peer: plain loop", 1000, 30.0), run(1, "ours: job", 1000, 20.0)],
    }  # fmt: skip
    text = write_results(report)
    # peer 2000 tokens in 40 s = 50/s; ours 2000 in 40 s = 50/s: the sums, not the mean rate
    assert "peer 50.0 tokens/s, ours 50.0 tokens/s: **1.00x**" in text
    assert text.count("| 1 |") == 2
    assert text.count("| 2 |") == 2
