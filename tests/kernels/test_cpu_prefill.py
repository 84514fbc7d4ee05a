"""Prompts and batches on the CPU kernel: the tiled GEMM and the GEMV passes at any rows.

Shapes: M rows of x, K in features, N out features, E experts, R rows per slice, S routed
rows. Every path is checked against float64 dequantize-then-matmul (``packed_cases``),
at row counts just below and above each switch-over, the tiled GEMM and the GEMV passes
also forced at the same shapes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from packed_cases import OpCalls, assert_matches, dequant64, mixed_bank, random_slice

from moe_ao.kernels import cpu_packed
from moe_ao.kernels.activations import quantize_activations
from moe_ao.kernels.cpu_packed import packed_experts_linear, packed_experts_linear_reference, packed_linear
from moe_ao.tensors.packed import PackedWeight

FORCE = {"gemm": 1, "gemv": 10**9}  # gemm_min_rows that forces each path where it can serve a slice


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def switch_rows() -> list[int]:
    """Rows per slice around the default switch-over (fp32 slices) and the GEMV's 4-row passes."""
    n = cpu_packed.default_gemm_min_rows()
    return [1, 4, 5, n - 1, n, n + 1]


@pytest.mark.parametrize("path", list(FORCE))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4, 8, 16])
def test_linear_paths_vs_float64(bits, symmetric, dtype, path):
    """K = 1000: two 512-code chunks, the second partial and not a multiple of a vector."""
    g = torch.Generator().manual_seed(bits * 10 + symmetric)
    N, K, gs = 70, 1000, 40 if bits in (3, 4, 8, 16) else 200  # groups straddle GEMM vectors
    s = random_slice(N, K, bits, gs, symmetric, dtype, g)
    w = PackedWeight.from_slices([s], (N, K), 1, dtype)
    W, mag = dequant64(s)
    for M in (1, 7, 33):
        x = torch.randn(M, K, generator=g).to(dtype)
        with cpu_packed.gemm_min_rows(FORCE[path]):
            assert_matches(packed_linear(x, w), x, W, mag)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_linear_default_switch_over(bits, dtype):
    """Group 64: the integer GEMV passes serve bf16 x on AVX2 at any rows; fp32 x changes
    path at the switch-over. Rows just below and above it agree with float64."""
    g = torch.Generator().manual_seed(bits)
    N, K = 48, 256
    s = random_slice(N, K, bits, 64, False, dtype, g)
    w = PackedWeight.from_slices([s], (N, K), 1, dtype)
    W, mag = dequant64(s)
    for M in switch_rows():
        x = torch.randn(M, K, generator=g).to(dtype)
        assert_matches(packed_linear(x, w), x, W, mag, group_size=64)


@pytest.mark.parametrize("path", ["default", *FORCE])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_seg", [1, 2])
def test_mixed_bank_any_rows(n_seg, dtype, path):
    """A bank mixing 2/3/4/8/16-bit slices, rows routed unevenly (one expert gets none),
    at row counts per expert around every switch-over."""
    E, R, K = 5, 24, 256
    w, W, mag = mixed_bank(E, n_seg, R, K, 64, False, dtype, seed=n_seg)
    g = torch.Generator().manual_seed(3)
    for rows in switch_rows():
        ids = torch.tensor([0, 1, 2, 4]).repeat_interleave(torch.tensor([rows, 1, 2 * rows, rows + 3]))
        ids = ids[torch.randperm(len(ids), generator=g)]
        x = torch.randn(len(ids), K, generator=g).to(dtype)
        with cpu_packed.gemm_min_rows(FORCE.get(path, 0)):
            y = packed_experts_linear(x, w, ids)
        assert_matches(y, x, W[ids], mag[ids], group_size=64)


@pytest.mark.parametrize("compiled", [False, True])
def test_experts_reference_beyond_decode(compiled):
    """The reference groups rows by expert in eager and masks in compiled code (S > E);
    both dequantize one expert at a time and match float64."""
    w, W, mag = mixed_bank(4, 2, 16, 128, 32, True, torch.float32)
    x, ids = torch.randn(11, 128), torch.tensor([3, 0, 3, 1, 1, 3, 0, 0, 3, 1, 0])  # expert 2: no rows
    fn = torch.compile(packed_experts_linear_reference, fullgraph=True, backend="aot_eager") if compiled else \
        packed_experts_linear_reference
    assert_matches(fn(x, w, ids), x, W[ids], mag[ids])


@pytest.mark.parametrize("act_bits", [None, 8])
def test_w_a8_kernel_and_reference_vs_float64(act_bits):
    """W+A: x is rounded per token to int8 before both the kernel and the reference."""
    w, W, mag = mixed_bank(3, 1, 32, 128, 32, False, torch.float32)
    w = PackedWeight(w.slot, w.logical_shape, w.slice_bits, w.n_seg, w.group_size, w.symmetric,
                     **{n: getattr(w, n) for n in w.__tensor_flatten__()[0][1:]}, act_bits=act_bits)
    x, ids = torch.randn(40, 128) * 3, torch.randint(0, 3, (40,), generator=torch.Generator().manual_seed(1))
    xq = quantize_activations(x, act_bits)
    assert (xq is x) == (act_bits is None)
    if act_bits:  # at most half a step of each row's max |x| / 127
        assert ((xq - x).abs() <= x.abs().amax(-1, keepdim=True) / 254 * (1 + 1e-6)).all()
        assert torch.unique(xq[0] / (x[0].abs().max() / 127)).round().sub(
            torch.unique(xq[0] / (x[0].abs().max() / 127))).abs().max() < 1e-3  # integer multiples
    for path in FORCE.values():
        with cpu_packed.gemm_min_rows(path):
            assert_matches(packed_experts_linear(x, w, ids), xq, W[ids], mag[ids])
    assert_matches(packed_experts_linear_reference(x, w, ids), xq, W[ids], mag[ids])
    lin = PackedWeight.from_slices([random_slice(16, 128, 4, 32, True, torch.float32, torch.Generator())],
                                   (16, 128), 1, torch.float32, act_bits=act_bits)
    torch.testing.assert_close(F.linear(x, lin), F.linear(xq, lin.dequantize()), rtol=1e-5, atol=1e-4)


def int8_rounded(x: torch.Tensor) -> torch.Tensor:
    """x rounded per token to int8 as the kernels and quantize_activations round it, exactly (float64)."""
    x32 = x.float()
    amax = x32.abs().amax(-1, keepdim=True)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    return torch.round(x32 / scale).clamp(-127, 127).double() * scale.double()


@pytest.mark.parametrize("path", list(FORCE))
@pytest.mark.parametrize("gs", [32, 64, 128])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_int8_activations_vs_float64(bits, symmetric, gs, path):
    """act_bits = 8 on the GEMV passes (on AVX2: int8 x codes in vpmaddubsw for 2-4 bits, the
    int16 path for 8) and on the tiled GEMM, at bf16 and fp32 x, against float64 of the
    int8-rounded x."""
    g = torch.Generator().manual_seed(bits + gs + symmetric)
    N, K = 40, 384
    s = random_slice(N, K, bits, gs, symmetric, torch.bfloat16, g)
    w = PackedWeight.from_slices([s], (N, K), 1, torch.bfloat16, act_bits=8)
    W, mag = dequant64(s)
    for M in (1, 5, 9):
        for dtype in (torch.float32, torch.bfloat16):
            x = (torch.randn(M, K, generator=g) * 4).to(dtype)
            with cpu_packed.gemm_min_rows(FORCE[path]):
                y = packed_linear(x, w)
            _assert_close_to(y, int8_rounded(x), W, mag)


def _assert_close_to(y: torch.Tensor, x64: torch.Tensor, W: torch.Tensor, mag: torch.Tensor) -> None:
    """y [M, N] (fp32 or bf16) vs float64 x64 @ W.T, the packed_cases tolerance."""
    ref = x64 @ W.T
    bound = x64.abs() @ mag.T
    allowed = 1e-5 * bound + (2.0**-8 if y.dtype == torch.bfloat16 else 0) * ref.abs() + 1e-30
    err = (y.double() - ref).abs()
    assert (err <= allowed).all(), f"max err/allowed {(err / allowed).max().item():.3g}"


@pytest.mark.parametrize("act_bits", [None, 8])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_group_32_rows_not_whole_chunks(bits, act_bits):
    """Group size 32 takes the integer paths only for rows of whole 64-code chunks: a row of
    96 codes (3 groups) falls back to the fp32 path, still matching float64, and a row of 160
    (5 groups: two chunks and a half) too; with and without int8 activations."""
    g = torch.Generator().manual_seed(bits + (act_bits or 0))
    for K in (96, 160):
        s = random_slice(12, K, bits, 32, False, torch.bfloat16, g)
        w = PackedWeight.from_slices([s], (12, K), 1, torch.bfloat16, act_bits=act_bits)
        W, mag = dequant64(s)
        x = torch.randn(5, K, generator=g).to(torch.bfloat16)
        if act_bits:
            _assert_close_to(packed_linear(x, w), int8_rounded(x), W, mag)
        else:
            assert_matches(packed_linear(x, w), x, W, mag, group_size=32)


def test_int8_path_where_the_cpu_has_avx2_only():
    from pathlib import Path

    flags = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() else set()
    avx2_only = "avx2" in flags and "avx512f" not in flags
    assert all(cpu_packed.int8_path(b, gs) == avx2_only for b in (2, 3, 4) for gs in (32, 64, 128, 256))
    assert not any(cpu_packed.int8_path(b, gs) for b, gs in [(8, 64), (4, 16), (4, 96), (16, 64)])


def test_act_bits_rejects_other_widths():
    with pytest.raises(ValueError, match=r"act_bits=4 .*allowed: \(None, 8\)"):
        quantize_activations(torch.randn(2, 8), 4)
    s = random_slice(8, 32, 4, 32, True, torch.float32, torch.Generator())
    with pytest.raises(ValueError, match=r"act_bits=16 .*allowed"):
        PackedWeight.from_slices([s], (8, 32), 1, torch.float32, act_bits=16)


def test_prefill_compiles_without_breaks():
    """A compiled prefill (many rows per expert) keeps the packed op in one graph."""
    w, W, mag = mixed_bank(4, 2, 16, 64, 32, True, torch.bfloat16)
    lin = PackedWeight.from_slices([random_slice(64, 32, 3, 32, True, torch.bfloat16, torch.Generator())],
                                   (64, 32), 1, torch.bfloat16, act_bits=8)

    def f(x, ids):
        return F.linear(packed_experts_linear(x, w, ids), lin)

    x, ids = torch.randn(50, 64, dtype=torch.bfloat16), torch.randint(0, 4, (50,))
    explained = torch._dynamo.explain(f)(x, ids)
    assert explained.graph_break_count == 0
    targets = {str(n.target) for g in explained.graphs for n in g.graph.nodes}
    assert "moe_ao.packed_experts_linear.default" in targets, targets  # F.linear on lin dispatches below Dynamo
    with OpCalls() as calls:
        eager = f(x, ids)
    assert calls.names == ["packed_experts_linear", "packed_linear"]
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x, ids), eager)


MEMORY_SCRIPT = r"""
import torch
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralExperts
from moe_ao import experts as experts_impl
from moe_ao.tensors.packed import PackedWeight
from moe_ao.tensors.packing import packed_size

def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))

def bank(E, N, K, n_seg, bits=4, gs=128):
    # random codes written in place (no temporaries); the slot table maps slice i to row i
    R = N // n_seg
    slot = torch.tensor([[bits, i, i] for i in range(E * n_seg)], dtype=torch.int32)
    q = torch.empty(E * n_seg, R, packed_size(K, bits), dtype=torch.uint8).random_(0, 256)
    s = torch.full((E * n_seg, R, K // gs), 1e-3, dtype=torch.bfloat16)
    return PackedWeight(slot, (E, N, K), (bits,) * (E * n_seg), n_seg, gs, True, **{f"q{bits}": q, f"s{bits}": s})

torch.set_grad_enabled(False)
torch.set_num_threads(1)
E, H, I, T = 8, 2048, 8192, 100
config = MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=2)
config._experts_implementation = experts_impl.IMPLEMENTATION
experts_impl.register()
with torch.device("meta"):
    module = MixtralExperts(config)
module.gate_up_proj = torch.nn.Parameter(bank(E, 2 * I, H, 2), requires_grad=False)
module.down_proj = torch.nn.Parameter(bank(E, H, I, 1), requires_grad=False)
packed = module.gate_up_proj.nbytes_packed() + module.down_proj.nbytes_packed()
g = torch.Generator().manual_seed(0)
x = torch.randn(T, H, generator=g).bfloat16()
ids = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(T)])
w = torch.full((T, 2), 0.5, dtype=torch.bfloat16)
module(x[:1], ids[:1], w[:1])  # loads the kernel library
open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM to the current RSS
before = status("VmRSS")
y = module(x, ids, w)
assert y.shape == (T, H) and torch.isfinite(y).all()
print(packed, status("VmHWM") - before)
"""


def test_prefill_memory_stays_near_packed_size(tmp_path):
    """A 100-token forward through a 4-bit bank of ~200 MB (1.6 GB in bf16) raises peak RSS
    by a few MB of activations, never by a dense copy of the bank. Measured in a fresh
    process (peak RSS reset through /proc/self/clear_refs just before the call)."""
    import subprocess
    import sys
    from pathlib import Path

    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc to reset and read the peak RSS")
    script = tmp_path / "memory.py"
    script.write_text(MEMORY_SCRIPT)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    packed, extra = map(int, out.stdout.split()[-2:])
    assert packed > 150 * 2**20, packed
    # Activations: x, h [200, 16384] and the kernel's fp32 / int16 copies of them, ~30 MB.
    assert extra < 96 * 2**20, f"peak RSS grew by {extra / 2**20:.0f} MB for a {packed / 2**20:.0f} MB bank"
