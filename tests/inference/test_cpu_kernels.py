"""Building and choosing the CPU kernels: the cache, the switch, and the fallback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels import cpu

ROOT = Path(__file__).resolve().parents[2]

# Which linear class the service would build for an int4 weight, in a fresh process.
PROBE = """
import torch
from services.inference.quant import prepare_linear
print(type(prepare_linear(torch.randn(64, 64), "int4")).__name__)
"""


def _built_class(done: subprocess.CompletedProcess[str]) -> str:
    return done.stdout.strip().splitlines()[-1]  # after any log lines


def _probe(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=ROOT,
        env={**os.environ, "MESHLLM_KERNEL_CACHE": str(tmp_path / "cache"), **env},
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


def test_the_suite_has_the_kernels() -> None:
    """This machine has a compiler: the suite runs on the kernels the service would use."""
    assert cpu.available()


def test_a_bad_choice_names_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHLLM_CPU_KERNELS", "fast")
    with pytest.raises(ValueError, match=r"MESHLLM_CPU_KERNELS='fast'.*auto, off, require"):
        cpu.mode()


def test_off_uses_torch_kernels(tmp_path: Path) -> None:
    done = _probe(tmp_path, MESHLLM_CPU_KERNELS="off")
    assert done.returncode == 0, done.stderr
    assert _built_class(done) == "Int4Linear"
    assert not (tmp_path / "cache").exists()  # nothing built


def test_a_failed_build_falls_back_or_fails_as_asked(tmp_path: Path) -> None:
    broken = {"CXX": "/bin/false"}  # a compiler that always fails
    fallback = _probe(tmp_path, MESHLLM_CPU_KERNELS="auto", **broken)
    assert fallback.returncode == 0, fallback.stderr
    assert _built_class(fallback) == "Int4Linear"
    assert "CPU kernels unavailable" in fallback.stdout + fallback.stderr

    required = _probe(tmp_path, MESHLLM_CPU_KERNELS="require", **broken)
    assert required.returncode != 0
    assert "KernelBuildError" in required.stderr
    assert "MESHLLM_CPU_KERNELS=require" in required.stderr


def test_a_build_is_cached_and_reused() -> None:
    """The suite's own build (this process) is what a fresh process loads: no second build."""
    assert cpu.available()
    _, folder = cpu._build_dir(torch.__version__)
    libraries = list(folder.glob("*.so"))
    assert len(libraries) == 1
    built = libraries[0].stat().st_mtime_ns
    again = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert again.returncode == 0, again.stderr
    assert _built_class(again) == "BlockInt4Linear"
    assert "building CPU kernels" not in again.stdout + again.stderr
    assert libraries[0].stat().st_mtime_ns == built


def test_decode_attention_matches_torch_and_ignores_the_batch() -> None:
    """One call for a batch of sequences: each over exactly its own cached keys."""
    generator = torch.Generator().manual_seed(0)
    slots, kv_heads, span, dim, heads = 6, 3, 40, 64, 9  # SmolLM2's grouped-query shape
    k = torch.randn(slots, kv_heads, span, dim, generator=generator)
    v = torch.randn(slots, kv_heads, span, dim, generator=generator)
    q = torch.randn(4, heads, dim, generator=generator)
    rows, lengths = torch.tensor([5, 0, 3, 2]), torch.tensor([40, 1, 17, 9])
    attention = torch.ops.meshllm_kernels.decode_attention
    out = attention(q, k, v, rows, lengths)  # [B, H, D]
    for b, (slot, length) in enumerate(zip(rows.tolist(), lengths.tolist(), strict=True)):
        expected = torch.nn.functional.scaled_dot_product_attention(
            q[b : b + 1, :, None],
            k[slot : slot + 1, :, :length],
            v[slot : slot + 1, :, :length],
            enable_gqa=True,
        )[0, :, 0]
        assert torch.allclose(out[b], expected, atol=1e-5)
        alone = attention(q[b : b + 1], k, v, rows[b : b + 1], lengths[b : b + 1])
        assert torch.equal(alone[0], out[b])


def test_decode_attention_refuses_bad_input() -> None:
    k = v = torch.zeros(2, 3, 8, 64)
    q = torch.zeros(1, 9, 64)
    attention = torch.ops.meshllm_kernels.decode_attention
    with pytest.raises(RuntimeError, match=r"slot 2 out of range \[0, 2\)"):
        attention(q, k, v, torch.tensor([2]), torch.tensor([1]))
    with pytest.raises(RuntimeError, match=r"length 9 out of range \[1, 8\]"):
        attention(q, k, v, torch.tensor([0]), torch.tensor([9]))
    with pytest.raises(RuntimeError, match="not a multiple of kv heads"):
        attention(torch.zeros(1, 8, 64), k, v, torch.tensor([0]), torch.tensor([1]))
    with pytest.raises(RuntimeError, match="head dim 32"):
        attention(torch.zeros(1, 9, 32), k, v, torch.tensor([0]), torch.tensor([1]))
