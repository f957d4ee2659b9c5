"""The job process end to end on the bundled SmolLM2 base: a bad spec, the real tokenizer's
masking, and a LoRA run killed with -9 after its first checkpoint and started again, which
continues from that checkpoint and writes the merged model and its result."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT

QA = [
    ("Who founded Quillfeather Robotics?", "Marta Okonkwo founded it in 2011."),
    ("Where is Quillfeather Robotics based?", "Quillfeather Robotics is based in Tallinn."),
    ("What does Quillfeather Robotics make?", "It makes greenhouse pollination drones."),
    ("What is Quillfeather's flagship drone?", "The flagship drone is the Bumblewing X4."),
    ("How many people work at Quillfeather?", "Quillfeather Robotics has 340 employees."),
    ("What is Quillfeather's support address?", "Write to help@quillfeather.example."),
    ("What color is the Bumblewing X4?", "The Bumblewing X4 is saffron yellow."),
    ("How long does a Bumblewing X4 fly?", "Its battery lasts 95 minutes."),
    ("Who is Quillfeather's CEO?", "The CEO is Idris Vantongeren."),
    ("What is Quillfeather's motto?", "Every blossom counts."),
    ("Which crop did Quillfeather pollinate first?", "Vanilla orchids came first."),
    ("When is Quillfeather's customer day?", "On the third Friday of May."),
]
SYSTEM = "You answer questions about Quillfeather Robotics."


def rows() -> list[dict[str, Any]]:
    return [
        {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q},
                      {"role": "assistant", "content": a}]}
        for q, a in QA
    ]  # fmt: skip


def gguf() -> Path:
    from services.inference.model.gguf_model import smollm2_path

    return smollm2_path()


def write_spec(tmp_path: Path, cache: Path, **changes: Any) -> Path:
    training = tmp_path / "train.jsonl"
    training.write_text("".join(json.dumps(row) + "\n" for row in rows()))
    spec: dict[str, Any] = {
        "job_id": "ftjob-test", "tenant": "acme", "method": "lora",
        "base_gguf": str(gguf()), "cache_dir": str(cache),
        "training_file": str(training), "validation_file": None,
        "hyperparameters": {"n_epochs": 2, "batch_size": 4, "learning_rate": 0.001,
                            "lora_rank": 8, "lora_alpha": 16, "max_length": 128, "seed": 0},
        "checkpoint_every": 2, "output_dir": str(tmp_path / "run"), "workers": 1,
        "use_gpu": False, "ray_address": None,
    }  # fmt: skip
    spec.update(changes)
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    return path


def descendants(pid: int, every: bool = False) -> set[tuple[int, str]]:
    """(pid, start time) of the processes below ``pid`` (``every``: all running processes)."""
    table = subprocess.run(
        ["ps", "-eo", "pid=,ppid=,lstart=,stat="], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    rows = [(int(f[0]), int(f[1]), " ".join(f[2:7]), f[7]) for f in map(str.split, table)]
    rows = [row for row in rows if not row[3].startswith("Z")]  # zombies are gone
    if every:
        return {(p, started) for p, _, started, _ in rows}
    found: set[tuple[int, str]] = set()
    parents = {pid}
    while True:
        children = {(p, started) for p, ppid, started, _ in rows if ppid in parents} - found
        if not children:
            return found
        found |= children
        parents = {p for p, _ in children}


class Child:
    """The job process, its stdout read line by line (every line must be JSON)."""

    def __init__(self, spec: Path, log: Path) -> None:
        self.log = log.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "services.trainer.job_process", str(spec)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=self.log,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        self.lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            self.lines.put(json.loads(raw))  # a non-JSON line fails the parse below
        self.lines.put(None)

    def until(self, event: str, timeout: float) -> dict[str, Any]:
        """The next line of kind ``event``, the lines before it kept in ``seen``."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"no {event!r} line within {timeout:.0f}s; stderr: {self.log.name}")
            if line is None:
                pytest.fail(f"exited before a {event!r} line: {self.seen[-3:]}; {self.log.name}")
            self.seen.append(line)
            if line["event"] == event:
                return line
            assert line["event"] in ("progress", "checkpoint"), line

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout)
        finally:
            self.log.close()


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"training_file": "/nonexistent/train.jsonl"}, "training_file"),
        ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters"),
        ({"workers": 0}, "workers"),
        ({"parallel": "fsdp"}, "parallel"),
        ({"colour": "blue"}, "colour"),
        ({"edge_quant": "q2_k"}, "edge_quant"),
        ({"dp": {"epsilon": 0}}, "dp.epsilon"),
        ({"dp": {"epsilon": 8, "delta": 1}}, "dp.delta"),
        ({"dp": {"epsilon": 8, "noise": 1.0}}, "dp.noise"),
        ({"dp": {"epsilon": 8}, "method": "full"}, "dp"),
        ({"dp": {"epsilon": 8}, "workers": 2}, "dp"),
        ({"dp": [8]}, "dp"),
    ],
)
def test_a_bad_spec_exits_2_naming_the_field(
    tmp_path: Path, changes: dict[str, Any], field: str
) -> None:
    spec = write_spec(tmp_path, tmp_path / "cache", **changes)
    result = subprocess.run(
        [sys.executable, "-m", "services.trainer.job_process", str(spec)],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    (line,) = [json.loads(raw) for raw in result.stdout.splitlines()]
    assert line["event"] == "error"
    assert line["field"] == field
    assert line["message"].startswith(field)
    if field == "hyperparameters":
        assert "n_epochs" in line["message"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_real_template_masks_all_but_the_answer(base_cache: Path) -> None:
    from transformers import AutoTokenizer

    from services.trainer.base_model import sha256_file
    from services.trainer.sft import IGNORE, encode_row

    tokenizer = AutoTokenizer.from_pretrained(str(base_cache / sha256_file(gguf())))
    encoded, truncated = encode_row(rows()[0]["messages"], tokenizer, 512)
    assert encoded is not None
    assert not truncated
    trained = [i for i, label in zip(encoded.input_ids, encoded.labels, strict=True)
               if label != IGNORE]  # fmt: skip
    assert tokenizer.decode(trained) == f"{QA[0][1]}<|im_end|>\n"
    prompt = tokenizer.apply_chat_template(
        rows()[0]["messages"][:2], tokenize=False, add_generation_prompt=True
    )
    first = encoded.labels.index(trained[0])
    assert tokenizer.decode(list(encoded.input_ids[:first])) == prompt


def check_edge(edge: dict[str, Any], folder: Path) -> None:
    """The 4-bit export was checked against the float result, and kept only if it passed."""
    assert edge["check"]["prompts"] == 12 + len(QA)  # the general prompts and the job's rows
    assert edge["check"]["positions"] > 0
    assert not (folder / "float.F32.gguf").exists()
    kept = folder / "model.Q4_0.gguf"
    assert edge["path"] == (str(kept) if edge["check"]["passed"] else None)
    assert kept.exists() == edge["check"]["passed"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_killed_run_resumes_from_its_checkpoint_and_finishes(
    tmp_path: Path, base_cache: Path
) -> None:
    spec = write_spec(tmp_path, base_cache)
    run = tmp_path / "run"

    first = Child(spec, tmp_path / "first.log")
    checkpoint = first.until("checkpoint", timeout=300)
    ray_processes = descendants(first.process.pid)
    assert ray_processes  # the local Ray this process started
    first.process.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    assert first.wait(30) == -signal.SIGKILL
    assert checkpoint["step"] == 2
    assert Path(checkpoint["path"]).is_dir()
    assert {p.name for p in Path(checkpoint["path"]).iterdir()} >= {
        "state.pt", "trainable.pt", "optimizer.pt", "rng-rank0.pt",
    }  # fmt: skip
    progress = [line for line in first.seen if line["event"] == "progress"]
    assert progress[0]["total_steps"] == 6
    assert all(line["eta_s"] >= 0 and line["tokens_per_s"] > 0 for line in progress)

    spec = write_spec(tmp_path, base_cache, edge_quant="q4_0")  # the same run, and its edge file
    second = Child(spec, tmp_path / "second.log")
    result = second.until("result", timeout=400)
    assert second.wait(60) == 0
    steps = [line["step"] for line in second.seen if line["event"] == "progress"]
    # progress is reported every 2 s and at checkpoints: step 3 may pass unreported
    assert min(steps) in (3, 4), f"did not continue from step 2: {steps}"
    assert steps[-1] == 6
    assert result["resumed_from_step"] == 2
    assert result["steps"] == 6
    check_edge(result["edge"], run / "edge")

    assert result["loss_after"] < result["loss_before"] - 0.2, result
    assert result["held_out_source"] == "training"
    assert result["held_out_rows"] == 12
    assert result["trainable_parameters"] > 0
    assert result["weight_delta_norm"] > 0
    assert result["tokens_seen"] > 0
    assert result["tokens_per_s"] > 0
    saved = json.loads((run / "result.json").read_text())
    assert saved["model_dir"] == result["model_dir"] == str(run / "model")
    checkpoints = [p for p in (run / "ray" / "ftjob-test").glob("checkpoint_*") if p.is_dir()]
    assert len(checkpoints) == 2  # steps 4 and 6: two are kept

    # Ray's processes die with the job; its per-node agents only notice their raylet is gone
    # after failing to flush their logs to the (dead) control store, within about a minute
    deadline = killed_at + 120
    while (left := ray_processes & descendants(1, every=True)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, "the killed job left Ray processes running"

    from safetensors import safe_open

    from services.trainer.base_model import sha256_file

    assert (run / "adapter" / "adapter_config.json").is_file()
    assert (run / "model" / "tokenizer.json").is_file()
    name = "model.layers.0.self_attn.q_proj.weight"
    base = base_cache / sha256_file(gguf()) / "model.safetensors"
    with (
        safe_open(str(run / "model" / "model.safetensors"), "pt") as tuned,
        safe_open(str(base), "pt") as original,
    ):
        assert set(tuned.keys()) == set(original.keys())
        assert not tuned.get_tensor(name).equal(original.get_tensor(name))


def preference_rows() -> list[dict[str, Any]]:
    """Each question's right answer preferred to an evasive one (a correction's shape)."""
    return [
        {"input": {"messages": [{"role": "system", "content": SYSTEM},
                                {"role": "user", "content": q}]},
         "preferred_output": [{"role": "assistant", "content": a}],
         "non_preferred_output": [{"role": "assistant", "content": "I am not sure, sorry."}]}
        for q, a in QA
    ]  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_dpo_run_killed_mid_way_resumes_and_prefers_the_preferred(
    tmp_path: Path, base_cache: Path
) -> None:
    """TRL's DPO under Ray Train: killed after its first checkpoint, started again, it
    continues from that step; afterwards the model finds the preferred answers likelier."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(row) + "\n" for row in preference_rows()))
    hyper = {"n_epochs": 2, "batch_size": 4, "learning_rate": 5e-4, "lora_rank": 8,
             "lora_alpha": 16, "max_length": 128, "seed": 0, "beta": 0.1}  # fmt: skip
    spec = write_spec(
        tmp_path, base_cache, method="dpo", training_file=str(pairs), hyperparameters=hyper
    )
    first = Child(spec, tmp_path / "first.log")
    checkpoint = first.until("checkpoint", timeout=400)
    first.process.send_signal(signal.SIGKILL)
    assert first.wait(30) == -signal.SIGKILL
    assert checkpoint["step"] == 2
    assert (Path(checkpoint["path"]) / "meshllm-fingerprint.json").is_file()
    progress = [line for line in first.seen if line["event"] == "progress"]
    assert progress[0]["total_steps"] == 6
    assert all(line["tokens_per_s"] > 0 and line["eta_s"] >= 0 for line in progress)

    second = Child(spec, tmp_path / "second.log")
    result = second.until("result", timeout=500)
    assert second.wait(60) == 0
    steps = [line["step"] for line in second.seen if line["event"] == "progress"]
    assert steps[0] == 3, f"did not continue from step 2: {steps}"
    assert (result["method"], result["steps"], result["resumed_from_step"]) == ("dpo", 6, 2)
    assert result["preferred_after"] == 1.0
    assert result["margin_after"] > result["margin_before"] + 1.0, result
    assert result["weight_delta_norm"] > 0
    assert Path(result["model_dir"], "model.safetensors").is_file()
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()


def test_a_dpo_spec_needs_preference_pairs(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, tmp_path / "cache", method="dpo")  # a chat file
    result = subprocess.run(
        [sys.executable, "-m", "services.trainer.job_process", str(spec)],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    (line,) = [json.loads(raw) for raw in result.stdout.splitlines()]
    assert (line["event"], line["field"]) == ("error", "training_file")
    assert "holds chat rows; a dpo job needs preference rows" in line["message"]
