"""The distillation benchmark's data and report: no held-out row is trained on, and the
table states the speed ratio and both KLs."""

from __future__ import annotations

from meshbench.distill_bench import results_text, rows


def test_no_held_out_row_is_trained_on() -> None:
    training, held_out = rows()
    assert len(training) == 240 + 120
    assert len(held_out) == 144 + 40
    prompts = {row["messages"][-2]["content"] for row in training}
    assert not prompts & {row["messages"][-2]["content"] for row in held_out}


def test_the_report_states_speed_and_closeness() -> None:
    job = {"teacher_layers": 30, "layers_kept": list(range(20)), "intermediate_size": 1152,
           "teacher_intermediate_size": 1536, "teacher_parameters": 134.5e6,
           "student_parameters": 85.8e6, "steps": 90, "tokens_per_s": 80.0}  # fmt: skip
    speed = {"tokens_per_s": 50.0, "file_bytes": 145e6, "prompt_tokens": 40, "ttft_s": 0.05}
    report = {
        "when": "now", "quick": False, "machine": ["cpu"], "rows": 360, "held_out_rows": 184,
        "hyperparameters": {"n_epochs": 2, "batch_size": 8, "learning_rate": 1e-4},
        "job": job, "kl": {"cut": 2.5, "trained": 0.8, "tokens": 9000.0},
        "speed": {"teacher": speed, "student": {**speed, "tokens_per_s": 70.0}},
    }  # fmt: skip
    text = results_text(report)
    assert "| 70.0 | 1.40x | 0.800 |" in text
    assert "| student as cut | 20 | 1152 | 85.8 M |  |  |  | 2.500 |" in text
