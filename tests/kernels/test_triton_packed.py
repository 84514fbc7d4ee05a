"""The Triton packed kernels against float64 dequantize-then-matmul (CPU: TRITON_INTERPRET=1).

Shapes: M rows of x, K in features, N out features, E experts, R rows per slice. Cases
and tolerances: ``packed_cases``. The interpreter runs the kernels' own code (masks,
byte addressing, the per-slot width branch, ``tl.dot`` for BM >= 16) on CPU tensors, so
these tests need Triton but no GPU; without Triton they are skipped. On a GPU machine
(no interpreter) the same tests run the compiled kernels on CUDA tensors.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton")

from packed_cases import OUT_ULP, dequant64, mixed_bank, random_slice  # noqa: E402
from packed_cases import assert_matches as _assert_matches  # noqa: E402

from moe_ao.kernels import triton_packed  # noqa: E402
from moe_ao.kernels._registry import buffers_of  # noqa: E402
from moe_ao.kernels.triton_packed import packed_experts_linear, packed_linear, triton_ok  # noqa: E402
from moe_ao.tensors.packed import PackedWeight  # noqa: E402

# On CPU, tests/conftest.py turns on Triton's interpreter before Triton is imported.
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("no GPU, and TRITON_INTERPRET=1 was not set before Triton was imported", allow_module_level=True)


# Triton's interpreter truncates float32 -> bfloat16 (compiled kernels round to nearest):
# allow a whole bf16 ulp of the result there, not half of one.
ULP = OUT_ULP | ({torch.bfloat16: 2.0**-7} if DEVICE == "cpu" else {})


def on(*tensors):
    return [t.to(DEVICE) for t in tensors]


def assert_matches(y, x, W, mag):
    _assert_matches(y, x, W, mag, ULP)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4, 8, 16])
def test_linear_vs_float64(bits, symmetric, dtype):
    """K = 320: two full 128-column steps and a masked one; N = 80: a masked second row tile;
    M = 1 and 3 take the broadcast-sum path, M = 17 the tl.dot path with a masked x tile."""
    g = torch.Generator().manual_seed(bits * 10 + symmetric)
    N, K = 80, 320
    s = random_slice(N, K, bits, 32, symmetric, dtype, g)
    w = PackedWeight.from_slices([s], (N, K), 1, dtype).to(DEVICE)
    W, mag = dequant64(s)
    for M in (1, 3, 17):
        x = torch.randn(M, K, generator=g).to(dtype)
        assert_matches(packed_linear(x.to(DEVICE), w), x, W, mag)


@pytest.mark.parametrize(("bits", "K", "group_size"), [(3, 72, 24), (2, 40, 40), (4, 96, 12), (8, 200, 8)])
def test_odd_shapes_groups_and_batched_x(bits, K, group_size):
    """K not a power of two (nor of 8 codes per group), groups of 8-40, x [2, 3, K]."""
    g = torch.Generator().manual_seed(bits + K)
    N = 19
    s = random_slice(N, K, bits, group_size, False, torch.float32, g)
    w = PackedWeight.from_slices([s], (N, K), 1, torch.float32).to(DEVICE)
    x = torch.randn(2, 3, K, generator=g)
    W, mag = dequant64(s)
    y = packed_linear(x.to(DEVICE), w).cpu()
    assert y.shape == (2, 3, N)
    assert_matches(y.reshape(6, N), x.reshape(6, K), W, mag)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("n_seg", [1, 2])
def test_experts_mixed_widths_vs_float64(n_seg, symmetric, dtype):
    """Every slice at its own width (2, 3, 4, 8, 16 cycling); repeated and unused experts."""
    E, R, K = 5, 24, 96
    w, W, mag = mixed_bank(E, n_seg, R, K, 32, symmetric, dtype, seed=n_seg + 2 * symmetric)
    ids = torch.tensor([3, 0, 3, 1, 4, 4, 2])
    x = torch.randn(len(ids), K, generator=torch.Generator().manual_seed(1)).to(dtype)
    assert_matches(packed_experts_linear(*on(x, w, ids)), x, W[ids], mag[ids])


@pytest.mark.parametrize("rows_per_expert", [1, 2, 3, 9, 16, 21])
def test_grouped_experts_at_any_rows_vs_float64(rows_per_expert):
    """Beyond decode (S > E) rows are sorted by expert into tiles of BM rows of one expert
    (BM = 2, 4, 16: the broadcast-sum and tl.dot paths), uneven counts, an unused expert."""
    E, R, K = 5, 24, 96
    w, W, mag = mixed_bank(E, 2, R, K, 32, False, torch.float32, seed=rows_per_expert)
    g = torch.Generator().manual_seed(rows_per_expert)
    counts = torch.tensor([rows_per_expert, 2 * rows_per_expert + 1, 0, 1, rows_per_expert])
    ids = torch.repeat_interleave(torch.arange(E), counts)
    ids = ids[torch.randperm(len(ids), generator=g)]
    x = torch.randn(len(ids), K, generator=g)
    assert len(ids) > E
    assert_matches(packed_experts_linear(*on(x, w, ids)).cpu(), x, W[ids], mag[ids])


def test_tile_table_covers_every_row_once():
    ids = torch.tensor([4, 0, 4, 4, 1, 0, 4, 4, 4])
    tiles, perm, n = triton_packed._tile_table(ids, 6, 2)
    assert n == 5 + 6 and tiles.shape == (n, 3)
    used = tiles[tiles[:, 2] > tiles[:, 1]]  # tiles with rows
    assert used[:, 0].tolist() == [0, 1, 4, 4, 4]  # expert 0: 2 rows, 1: 1 row, 4: 6 rows in 3 tiles
    rows = torch.cat([torch.arange(a, b).clamp(max=c - 1).unique() for _, a, c in used.tolist()
                      for b in [min(a + 2, c)]])
    assert sorted(rows.tolist()) == list(range(len(ids)))
    assert torch.equal(ids[perm.long()], ids.sort().values)


def test_a_2d_weight_with_segments():
    """A 2D weight stored as two slices of different widths (e.g. a fused gate/up linear)."""
    g = torch.Generator().manual_seed(7)
    R, K = 16, 64
    slices = [random_slice(R, K, 3, 32, True, torch.float32, g), random_slice(R, K, 8, 32, True, torch.float32, g)]
    w = PackedWeight.from_slices(slices, (2 * R, K), 2, torch.float32)
    W = torch.cat([dequant64(s)[0] for s in slices])
    mag = torch.cat([dequant64(s)[1] for s in slices])
    x = torch.randn(2, K, generator=g)
    assert_matches(packed_linear(*on(x, w)), x, W, mag)


def test_ops_pass_opcheck_and_compile_fullgraph():
    w, _, _ = mixed_bank(3, 2, 16, 64, 32, True, torch.float32)
    x, w, ids = on(torch.randn(2, 64), w, torch.tensor([2, 0]))
    args = (w.slot, w.logical_shape[1], w.n_seg, w.group_size, buffers_of(w))
    torch.library.opcheck(torch.ops.moe_ao.triton_packed_experts_linear.default, (x, ids, *args),
                          test_utils=("test_schema", "test_faketensor"))

    def f(x, ids):
        return torch.ops.moe_ao.triton_packed_experts_linear(x, ids, *args) * 2

    explain = torch._dynamo.explain(f)(x, ids)
    assert explain.graph_break_count == 0 and explain.graph_count == 1
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x, ids), f(x, ids))


def test_dispatch_rule_is_cuda_and_inference_only(monkeypatch):
    w, _, _ = mixed_bank(2, 1, 8, 32, 32, True, torch.float32)
    assert not triton_ok(torch.randn(1, 32), w, 1)  # CPU tensors: the C++ kernel or the reference serve them
    # The rule reads only devices, dtypes and requires_grad: stand-ins play CUDA tensors.
    cuda = SimpleNamespace(device=torch.device("cuda"), dtype=torch.bfloat16, requires_grad=False)
    packed = SimpleNamespace(slot=cuda, s2=cuda, s3=None, s4=None, s8=None, d16=None)
    monkeypatch.setattr(triton_packed, "available", lambda: True)
    assert triton_ok(cuda, packed, 1)
    assert not triton_ok(cuda, packed, triton_packed.MAX_ROWS + 1)  # 2D prefill: dequantize + cuBLAS
    assert triton_ok(cuda, packed, None)  # an experts bank: the grouped kernel at any rows
    assert not triton_ok(SimpleNamespace(**{**vars(cuda), "dtype": torch.int8}), packed, 1)
    with torch.enable_grad():
        assert not triton_ok(SimpleNamespace(**{**vars(cuda), "requires_grad": True}), packed, 1)
    monkeypatch.setenv(triton_packed.DISABLE_ENV, "1")
    assert not triton_ok(cuda, packed, 1)


@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU the dispatch needs no stand-in")
def test_quantized_model_decodes_through_the_kernels(monkeypatch):
    """A quantized tiny Mixtral with CPU tensors routed to the Triton kernels (as CUDA tensors
    would be) gives the reference path's logits; both ops really run."""
    import archs

    import moe_ao
    from moe_ao.kernels.cpu_packed import DISABLE_ENV

    model = archs.build("mixtral")
    units = moe_ao.units(model)
    plan = moe_ao.Plan({u.name: (2, 3, 4, 8)[i % 4] for i, u in enumerate(units)
                        if u.kind in ("attention", "expert")}, group_size=32)
    moe_ao.quantize_(model, plan)
    ids = torch.tensor([[5, 17, 3]])
    with torch.no_grad():
        monkeypatch.setenv(DISABLE_ENV, "1")  # the dequantize-then-matmul reference everywhere
        want = model(ids[:, :1]).logits
        calls = []
        for name in ("packed_linear", "packed_experts_linear"):
            real = getattr(triton_packed, name)
            monkeypatch.setattr(triton_packed, name, lambda *a, _real=real, _n=name: calls.append(_n) or _real(*a))
        monkeypatch.setattr(triton_packed, "triton_ok",
                            lambda x, w, rows: rows is None or rows <= triton_packed.MAX_ROWS)
        got = model(ids[:, :1]).logits
    assert {"packed_linear", "packed_experts_linear"} <= set(calls)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
