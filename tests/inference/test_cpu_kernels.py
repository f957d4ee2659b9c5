"""Building and choosing the CPU kernels: the cache, the switch, and the fallback."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch

from meshllm_kernels import cpu
from services.inference.model.quant import BlockInt4Linear, BlockInt8Linear, LinearWeight

ROOT = Path(__file__).resolve().parents[2]

# Which linear class the service would build for an int4 weight, in a fresh process.
PROBE = """
import torch
from services.inference.model.quant import prepare_linear
print(type(prepare_linear(torch.randn(64, 64), "int4")).__name__)
"""


# Every code path's products on fixed inputs, in a fresh process built for MESHLLM_KERNEL_ARCH.
PRODUCTS = """
import sys, torch
from meshllm_kernels import cpu
from services.inference.model.quant import BlockInt4Linear, BlockInt8Linear
assert cpu.available()
generator = torch.Generator().manual_seed(5)
weight = torch.randn(72, 160, generator=generator)
x = torch.randn(5, 160, generator=generator)
torch.save(
    {
        "isa": torch.ops.meshllm_kernels.isa(),
        "int8": BlockInt8Linear(weight)(x),
        "int4": BlockInt4Linear(weight)(x),
    },
    sys.argv[1],
)
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


def test_the_target_cpu_is_a_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """native by default; a named CPU for a fleet; anything else is refused, named."""
    monkeypatch.delenv("MESHLLM_KERNEL_ARCH", raising=False)
    assert any(flag.endswith("=native") for flag in cpu.flags())
    monkeypatch.setenv("MESHLLM_KERNEL_ARCH", "x86-64-v3")
    assert any(flag.endswith("=x86-64-v3") for flag in cpu.flags())
    monkeypatch.setenv("MESHLLM_KERNEL_ARCH", "native; rm -rf /")
    with pytest.raises(ValueError, match=r"MESHLLM_KERNEL_ARCH='native; rm -rf /'"):
        cpu.flags()


@pytest.mark.skipif(
    platform.machine() not in {"x86_64", "AMD64"}, reason="the code paths are x86's"
)
def test_every_code_path_computes_the_same_products(tmp_path: Path) -> None:
    """AVX-512 VNNI, AVX2 and plain C++ builds agree: within float rounding, as their sums
    run in other orders (each build is exercised on machines of its own in production)."""
    results = {}
    for arch in ("native", "haswell", "x86-64"):
        out = tmp_path / f"{arch}.pt"
        done = subprocess.run(
            [sys.executable, "-c", PRODUCTS, str(out)],
            cwd=ROOT,
            env={
                **os.environ,
                "MESHLLM_KERNEL_CACHE": str(tmp_path / "cache"),
                "MESHLLM_KERNEL_ARCH": arch,
                "MESHLLM_CPU_KERNELS": "require",
            },
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        results[arch] = torch.load(out)
    assert results["haswell"]["isa"] in {"avx2", "avx2-vnni"}
    assert results["x86-64"]["isa"] == "portable"
    for arch in ("haswell", "x86-64"):
        for kind in ("int8", "int4"):
            assert torch.allclose(
                results[arch][kind], results["native"][kind], rtol=1e-5, atol=1e-4
            )


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


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
def test_decode_attention_matches_torch_and_ignores_the_batch(cache_dtype: torch.dtype) -> None:
    """One call for a batch of sequences: each over exactly its own cached keys."""
    generator = torch.Generator().manual_seed(0)
    slots, kv_heads, span, dim, heads = 6, 3, 40, 64, 9  # SmolLM2's grouped-query shape
    k = torch.randn(slots, kv_heads, span, dim, generator=generator).to(cache_dtype)
    v = torch.randn(slots, kv_heads, span, dim, generator=generator).to(cache_dtype)
    q = torch.randn(4, heads, dim, generator=generator)
    rows, lengths = torch.tensor([5, 0, 3, 2]), torch.tensor([40, 1, 17, 9])
    attention = torch.ops.meshllm_kernels.decode_attention
    out = attention(q, k, v, rows, lengths)  # [B, H, D]
    for b, (slot, length) in enumerate(zip(rows.tolist(), lengths.tolist(), strict=True)):
        expected = torch.nn.functional.scaled_dot_product_attention(
            q[b : b + 1, :, None],
            k[slot : slot + 1, :, :length].float(),
            v[slot : slot + 1, :, :length].float(),
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
    for wrong in (k.half(), k.bfloat16()):  # dtypes that differ, or neither float32 nor 16
        with pytest.raises(RuntimeError, match=r"float32 or float16 caches .* one shape and dtype"):
            attention(q, k, wrong, torch.tensor([0]), torch.tensor([1]))
    with pytest.raises(RuntimeError, match=r"length 9 out of range \[1, 8\]"):
        attention(q, k, v, torch.tensor([0]), torch.tensor([9]))
    with pytest.raises(RuntimeError, match="not a multiple of kv heads"):
        attention(torch.zeros(1, 8, 64), k, v, torch.tensor([0]), torch.tensor([1]))
    with pytest.raises(RuntimeError, match="head dim 32"):
        attention(torch.zeros(1, 9, 32), k, v, torch.tensor([0]), torch.tensor([1]))


# A small grouped-query layer for the fused decode layer: hidden 64, 4 query heads over 2 kv
# heads of 16, a 96-wide feed-forward; cache of 3 slots x 12 positions.
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, SLOTS, SPAN = 64, 4, 2, 16, 96, 3, 12
EPS = 1e-5


@dataclass
class _Layer:
    attn_norm: torch.Tensor
    qkv: LinearWeight
    out: LinearWeight
    ffn_norm: torch.Tensor
    gate_up: LinearWeight
    down: LinearWeight
    cos: torch.Tensor  # the model's tables: (cos, cos) and (-sin, sin) over interleaved pairs
    sin: torch.Tensor

    def args(self) -> tuple[object, ...]:
        return (
            self.attn_norm,
            _args(self.qkv),
            _args(self.out),
            self.ffn_norm,
            _args(self.gate_up),
            _args(self.down),
        )


def _args(weight: LinearWeight) -> list[torch.Tensor]:
    assert isinstance(weight, BlockInt4Linear | BlockInt8Linear)
    return weight.kernel_args


def _layer(int4: bool, generator: torch.Generator) -> _Layer:
    block = BlockInt4Linear if int4 else BlockInt8Linear

    def linear(n: int, k: int) -> LinearWeight:
        return block(torch.randn(n, k, generator=generator) / k**0.5)

    def norm() -> torch.Tensor:
        return 1 + 0.1 * torch.randn(HIDDEN, generator=generator)

    angles = torch.outer(torch.arange(SPAN).float(), torch.rand(HEAD_DIM // 2, generator=generator))
    return _Layer(
        attn_norm=norm(),
        qkv=linear((HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN),
        out=linear(HIDDEN, HEADS * HEAD_DIM),
        ffn_norm=norm(),
        gate_up=linear(2 * FFN, HIDDEN),
        down=linear(HIDDEN, FFN),
        cos=torch.stack((angles.cos(), angles.cos()), -1).flatten(-2).contiguous(),
        sin=torch.stack((-angles.sin(), angles.sin()), -1).flatten(-2).contiguous(),
    )


def _cache(
    generator: torch.Generator, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (SLOTS, KV_HEADS, SPAN, HEAD_DIM)
    k, v = (torch.randn(shape, generator=generator).to(dtype) for _ in range(2))
    return k, v


def _run(
    layer: _Layer,
    x: torch.Tensor,
    cache: tuple[torch.Tensor, torch.Tensor],
    slots: list[int],
    positions: list[int],
) -> None:
    """One decode step of ``layer`` in the kernel: x and the cache are updated in place."""
    torch.ops.meshllm_kernels.decode_layer(
        x,
        *layer.args(),
        *cache,
        torch.tensor(slots),
        torch.tensor(positions),
        layer.cos,
        layer.sin,
        EPS,
        HEADS,
        KV_HEADS,
    )


def _reference(
    layer: _Layer, x: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor], slot: int, pos: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same step in fp32 torch ops on the dequantized weights: x after it, the new k, v."""
    f = torch.nn.functional

    def rotate(t: torch.Tensor) -> torch.Tensor:  # [heads, D]
        swapped = t.view(t.shape[0], -1, 2).flip(-1).view(t.shape)
        return t * layer.cos[pos] + swapped * layer.sin[pos]

    q_end, k_end = HEADS * HEAD_DIM, (HEADS + KV_HEADS) * HEAD_DIM
    qkv = f.rms_norm(x, (HIDDEN,), layer.attn_norm, EPS) @ layer.qkv.dequantize().T
    q = rotate(qkv[:q_end].view(HEADS, HEAD_DIM))
    new_k = rotate(qkv[q_end:k_end].view(KV_HEADS, HEAD_DIM))
    new_v = qkv[k_end:].view(KV_HEADS, HEAD_DIM)
    keys = torch.cat((cache[0][slot, :, :pos].float(), new_k[:, None]), dim=1)  # [KV, pos + 1, D]
    values = torch.cat((cache[1][slot, :, :pos].float(), new_v[:, None]), dim=1)
    attn = f.scaled_dot_product_attention(
        q[None, :, None], keys[None], values[None], enable_gqa=True
    )
    x = x + attn.reshape(-1) @ layer.out.dequantize().T
    h = f.rms_norm(x, (HIDDEN,), layer.ffn_norm, EPS)
    gate, up = (h @ layer.gate_up.dequantize().T).chunk(2)
    return x + (f.silu(gate) * up) @ layer.down.dequantize().T, new_k, new_v


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("int4", [False, True], ids=["int8", "int4"])
def test_decode_layer_matches_the_layer_in_torch(int4: bool, cache_dtype: torch.dtype) -> None:
    """One decode step of a layer in one call: the same numbers as the layer in torch ops,
    up to the int8 rounding of the activations (and float16's of the cache); k and v land
    at each sequence's position."""
    generator = torch.Generator().manual_seed(1)
    layer = _layer(int4, generator)
    k, v = _cache(generator, cache_dtype)
    x = torch.randn(2, HIDDEN, generator=generator)
    slots, positions = [2, 0], [7, 0]
    expected = [
        _reference(layer, x[b], (k, v), slot, pos)
        for b, (slot, pos) in enumerate(zip(slots, positions, strict=True))
    ]
    out, k_after, v_after = x.clone(), k.clone(), v.clone()
    _run(layer, out, (k_after, v_after), slots, positions)
    for b, (slot, pos) in enumerate(zip(slots, positions, strict=True)):
        want_x, want_k, want_v = expected[b]
        # the layer's contribution, within the int8 rounding of its inputs
        delta, want_delta = out[b] - x[b], want_x - x[b]
        assert (delta - want_delta).norm() < 0.03 * want_delta.norm()
        assert (k_after[slot, :, pos].float() - want_k).norm() < 0.02 * want_k.norm()
        assert (v_after[slot, :, pos].float() - want_v).norm() < 0.02 * want_v.norm()
        # nothing else in the cache moved
        k_after[slot, :, pos], v_after[slot, :, pos] = k[slot, :, pos], v[slot, :, pos]
    assert torch.equal(k_after, k)
    assert torch.equal(v_after, v)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("int4", [False, True], ids=["int8", "int4"])
def test_decode_layer_ignores_the_batch(int4: bool, cache_dtype: torch.dtype) -> None:
    """Each sequence's results are bit-identical alone or in a batch of any size."""
    generator = torch.Generator().manual_seed(2)
    layer = _layer(int4, generator)
    k, v = _cache(generator, cache_dtype)
    x = torch.randn(3, HIDDEN, generator=generator)
    slots, positions = [1, 2, 0], [11, 3, 5]
    together, k_together, v_together = x.clone(), k.clone(), v.clone()
    _run(layer, together, (k_together, v_together), slots, positions)
    for b, slot in enumerate(slots):
        alone, k_alone, v_alone = x[b : b + 1].clone(), k.clone(), v.clone()
        _run(layer, alone, (k_alone, v_alone), [slot], positions[b : b + 1])
        assert torch.equal(alone[0], together[b])
        assert torch.equal(k_alone[slot], k_together[slot])
        assert torch.equal(v_alone[slot], v_together[slot])


def test_decode_layer_refuses_bad_input() -> None:
    layer = _layer(False, torch.Generator().manual_seed(3))
    cache = (
        torch.zeros(SLOTS, KV_HEADS, SPAN, HEAD_DIM),
        torch.zeros(SLOTS, KV_HEADS, SPAN, HEAD_DIM),
    )
    x = torch.zeros(1, HIDDEN)
    with pytest.raises(RuntimeError, match=r"position 12 out of range \[0, 11\]"):
        _run(layer, x, cache, [0], [SPAN])
    with pytest.raises(RuntimeError, match=r"slot 3 out of range \[0, 3\)"):
        _run(layer, x, cache, [SLOTS], [0])
    with pytest.raises(RuntimeError, match="x must be contiguous float32"):
        _run(layer, x.double(), cache, [0], [0])
    with pytest.raises(RuntimeError, match=r"qkv must have 128 output rows"):
        _run(replace(layer, qkv=layer.gate_up), x, cache, [0], [0])
    with pytest.raises(RuntimeError, match=r"out's codes must be contiguous bytes \[N, 64\]"):
        _run(replace(layer, out=layer.down), x, cache, [0], [0])
    args = list(layer.args())
    args[1] = _args(layer.qkv)[:1]  # qkv's codes without their scales
    with pytest.raises(RuntimeError, match=r"qkv must be \[codes, scale\] \(int8\)"):
        torch.ops.meshllm_kernels.decode_layer(
            x, *args, *cache, torch.tensor([0]), torch.tensor([0]), layer.cos, layer.sin,
            EPS, HEADS, KV_HEADS,
        )  # fmt: skip
