"""The packed CPU kernels against float64 dequantize-then-matmul, plus op registration.

Shapes: M rows of x, K in features, N out features, E experts, R rows per slice. Cases
and tolerances: ``packed_cases``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from packed_cases import OpCalls, assert_matches, dequant64, mixed_bank, random_slice

from moe_ao.kernels import cpu_packed
from moe_ao.kernels._registry import buffers_of
from moe_ao.kernels.cpu_packed import (
    DISABLE_ENV,
    packed_experts_linear,
    packed_experts_linear_reference,
    packed_linear,
    packed_linear_reference,
)
from moe_ao.tensors.packed import PackedWeight


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():  # the kernel serves inference; with grad on, the reference runs
        yield


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packed_linear_vs_float64(bits, group_size, symmetric, dtype):
    g = torch.Generator().manual_seed(bits * 1000 + group_size + symmetric)
    N, K = 40, 384  # 384 codes: 1.5 two-bit blocks (a row tail); 3-bit: the buffer-end block
    s = random_slice(N, K, bits, group_size, symmetric, dtype, g)
    w = PackedWeight.from_slices([s], (N, K), 1, dtype)
    W, mag = dequant64(s)
    for M in (1, 3, 5):  # 5 rows: a pass of 4 x rows, then 1
        x = torch.randn(M, K, generator=g).to(dtype)
        assert_matches(packed_linear(x, w), x, W, mag, group_size=group_size)


@pytest.mark.parametrize(
    "bits, K, group_size",
    [(2, 144, 48), (3, 144, 24), (4, 144, 24), (8, 144, 24), (8, 60, 12), (4, 40, 4)],
)
def test_odd_shapes_and_batched_x(bits, K, group_size):
    """K not a multiple of a block (or of 8 codes), groups straddling blocks, x [2, 3, K]
    (6 rows: passes of 4 and 2); group_size 4 splits 32-bit code words, which only the
    tiled GEMM decodes (it serves such slices at any rows)."""
    g = torch.Generator().manual_seed(bits + K)
    N = 19
    s = random_slice(N, K, bits, group_size, False, torch.float32, g)
    w = PackedWeight.from_slices([s], (N, K), 1, torch.float32)
    x = torch.randn(2, 3, K, generator=g)
    W, mag = dequant64(s)
    y = packed_linear(x, w)
    assert y.shape == (2, 3, N)
    assert_matches(y.reshape(6, N), x.reshape(6, K), W, mag)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("n_seg", [1, 2])
def test_packed_experts_linear_vs_float64(n_seg, symmetric, dtype):
    E, R, K = 5, 24, 256
    w, W, mag = mixed_bank(E, n_seg, R, K, 64, symmetric, dtype, seed=n_seg + 2 * symmetric)
    assert set(w.slice_bits) == {2, 3, 4, 8, 16}
    g = torch.Generator().manual_seed(7)
    for ids in (torch.tensor([3]), torch.tensor([4, 0, 4, 2, 1, 4, 3])):  # repeats: grouped rows
        x = torch.randn(len(ids), K, generator=g).to(dtype)
        assert_matches(packed_experts_linear(x, w, ids), x, W[ids], mag[ids], group_size=64)


def test_integer_path_where_the_cpu_has_avx2_only():
    """The integer path (x rounded to int16 per group) serves 2/3/4/8 bits at groups of 32, 64
    and 128 on AVX2 machines without AVX-512, such as the CI machine; elsewhere the fp32 path."""
    cpuinfo = Path("/proc/cpuinfo")
    flags = set(cpuinfo.read_text().split()) if cpuinfo.exists() else set()
    avx2_only = "avx2" in flags and "avx512f" not in flags
    for bits, gs in [(2, 32), (2, 64), (3, 32), (3, 64), (3, 128), (4, 32), (4, 128), (8, 32), (8, 64)]:
        assert cpu_packed.int16_path(bits, gs) == avx2_only
    for bits, gs in [(2, 32), (3, 32), (4, 32), (4, 64)]:
        assert cpu_packed.int8_path(bits, gs) == avx2_only
    assert not any(cpu_packed.int16_path(b, gs) for b, gs in [(3, 16), (4, 96), (4, 256), (16, 64)])
    assert not cpu_packed.int8_path(8, 32)


@pytest.mark.parametrize("rows, gemm_rows", [(4, 0), (90, 1)], ids=["gemv", "gemm"])
def test_threads_and_many_tiles(rows, gemm_rows):
    """Several OpenMP threads over many row tiles give the one-thread result bit for bit,
    on the GEMV passes and on the tiled GEMM (forced from 1 row)."""
    w, W, mag = mixed_bank(3, 2, 100, 128, 32, True, torch.bfloat16)
    x = torch.randn(rows, 128, dtype=torch.bfloat16)
    ids = torch.randint(0, 3, (rows,), generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    with cpu_packed.gemm_min_rows(gemm_rows):
        one = packed_experts_linear(x, w, ids)
        try:
            torch.set_num_threads(3)
            many = packed_experts_linear(x, w, ids)
        finally:
            torch.set_num_threads(threads)
    assert torch.equal(one, many)
    assert_matches(many, x, W[ids], mag[ids])


def test_matches_plain_reference_paths():
    """The wrappers agree with their plain-PyTorch references (dequantize + matmul)."""
    w, _, _ = mixed_bank(5, 2, 16, 128, 32, False, torch.float32)
    x = torch.randn(3, 128)
    ids = torch.tensor([1, 4, 1])
    torch.testing.assert_close(packed_experts_linear(x, w, ids), packed_experts_linear_reference(x, w, ids),
                               rtol=1e-4, atol=1e-3)
    lin = PackedWeight.from_slices([random_slice(32, 128, 3, 32, True, torch.float32, torch.Generator())],
                                   (32, 128), 1, torch.float32)
    torch.testing.assert_close(packed_linear(x, lin), packed_linear_reference(x, lin), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.nn.functional.linear(x, lin), packed_linear_reference(x, lin),
                               rtol=1e-4, atol=1e-4)


def test_disable_env_uses_reference(monkeypatch):
    w, _, _ = mixed_bank(5, 2, 16, 128, 32, True, torch.float32)
    lin = PackedWeight.from_slices([random_slice(16, 128, 4, 32, True, torch.float32, torch.Generator())],
                                   (16, 128), 1, torch.float32)
    x, ids = torch.randn(2, 128), torch.tensor([0, 3])
    monkeypatch.setenv(DISABLE_ENV, "1")
    with OpCalls() as calls:
        torch.testing.assert_close(packed_experts_linear(x, w, ids), packed_experts_linear_reference(x, w, ids))
        torch.testing.assert_close(packed_linear(x, lin), packed_linear_reference(x, lin))
        torch.testing.assert_close(torch.nn.functional.linear(x, lin), packed_linear_reference(x, lin))
    assert calls.names == []
    monkeypatch.delenv(DISABLE_ENV)
    with OpCalls() as calls:  # the check above can fail
        packed_linear(x, lin)
    assert calls.names == ["packed_linear"]


def test_kernel_for_prefill_reference_for_autograd():
    """Many rows (prefill) use the kernel too; inputs that need a grad go to the differentiable reference."""
    lin = PackedWeight.from_slices([random_slice(16, 64, 4, 32, True, torch.float32, torch.Generator())],
                                   (16, 64), 1, torch.float32)
    x = torch.randn(300, 64)
    with OpCalls() as calls:
        torch.testing.assert_close(packed_linear(x, lin), packed_linear_reference(x, lin), rtol=1e-4, atol=1e-4)
    assert calls.names == ["packed_linear"]
    with OpCalls() as calls, torch.enable_grad():
        xg = torch.randn(1, 64, requires_grad=True)
        packed_linear(xg, lin).sum().backward()
    assert xg.grad is not None
    assert calls.names == []


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_output_is_the_fp32_result_rounded_as_torch_rounds(dtype):
    """The kernel takes x and writes y in x's dtype. Where it computes in fp32 (group 16 and
    16-bit slices: no integer path), a 16-bit x gives exactly its fp32 result rounded to
    nearest even, the way ``Tensor.to`` rounds."""
    g = torch.Generator().manual_seed(3)
    K = 128
    slices = [random_slice(24, K, b, 16, False, dtype, g) for b in (3, 16, 3)]
    w = PackedWeight.from_slices(slices, (3, 24, K), 1, dtype)
    x, ids = (torch.randn(5, K, generator=g) * 40).to(dtype), torch.tensor([0, 1, 2, 1, 0])
    y = packed_experts_linear(x, w, ids)
    assert y.dtype == dtype
    assert torch.equal(y, packed_experts_linear(x.float(), w, ids).to(dtype))


def test_bad_expert_id_raises():
    w, _, _ = mixed_bank(3, 1, 8, 64, 32, True, torch.float32)
    with pytest.raises(RuntimeError, match="expert id out of range"):
        packed_experts_linear(torch.randn(1, 64), w, torch.tensor([3]))


def test_compile_error_is_a_clear_runtime_error(monkeypatch, tmp_path):
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(cpu_packed, "_SOURCES", [broken])
    monkeypatch.setattr(cpu_packed, "_build_dir", lambda: tmp_path / "build")
    with pytest.raises(RuntimeError, match=f"(?s)compiling the CPU kernel .* {DISABLE_ENV}=1.*not C\\+\\+"):
        cpu_packed._load.__wrapped__()  # uncached: the real kernel stays loaded


def test_op_on_another_device_is_refused():
    """Before the library is loaded, a fallback serves the ops: it refuses non-CPU tensors."""
    with pytest.raises(NotImplementedError, match="serve CPU tensors"):
        cpu_packed._first_call(torch.empty(1, 8, device="meta"), None)


def _op_args(w: PackedWeight) -> tuple:
    return (w.slot, w.logical_shape[-2], w.n_seg, w.group_size, buffers_of(w))


def test_opcheck():
    w, _, _ = mixed_bank(3, 2, 8, 64, 32, False, torch.bfloat16)
    x, ids = torch.randn(2, 64, dtype=torch.bfloat16), torch.tensor([2, 0])
    torch.library.opcheck(torch.ops.moe_ao.packed_experts_linear.default, (x, ids, *_op_args(w)))
    lin = PackedWeight.from_slices([random_slice(8, 64, 2, 32, True, torch.float32, torch.Generator())],
                                   (8, 64), 1, torch.float32)
    torch.library.opcheck(torch.ops.moe_ao.packed_linear.default, (torch.randn(3, 64), *_op_args(lin)))


def test_compiled_fullgraph_keeps_the_ops():
    w, W, mag = mixed_bank(5, 2, 16, 64, 32, True, torch.bfloat16)
    lin = PackedWeight.from_slices([random_slice(64, 32, 3, 32, True, torch.bfloat16, torch.Generator())],
                                   (64, 32), 1, torch.bfloat16)

    def f(x, ids):
        return torch.nn.functional.linear(packed_experts_linear(x, w, ids), lin)

    x, ids = torch.randn(2, 64, dtype=torch.bfloat16), torch.tensor([4, 1])
    explained = torch._dynamo.explain(f)(x, ids)
    assert explained.graph_break_count == 0
    targets = {str(n.target) for g in explained.graphs for n in g.graph.nodes}
    assert "moe_ao.packed_experts_linear.default" in targets, targets
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x, ids), f(x, ids))


def test_tiny_mixtral_decode_compiles_without_breaks():
    """A quantized tiny Mixtral decodes one token in one graph (fullgraph: no breaks), and
    both kernels run, in eager and compiled."""
    import archs
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    import moe_ao

    model = archs.build("mixtral", torch.bfloat16)
    plan = moe_ao.Plan({u.name: 2 if u.kind == "expert" else 4 for u in moe_ao.units(model)
                        if u.kind in ("expert", "attention")}, group_size=32)
    moe_ao.quantize_(model, plan)
    token = torch.tensor([[5]])
    with OpCalls() as calls:
        eager = model(token).logits
    n_layers = model.config.num_hidden_layers
    assert sorted(calls.names) == ["packed_experts_linear"] * n_layers * 2 + ["packed_linear"] * n_layers * 4

    # Counted inside the compiled region: dynamo refuses to run under a dispatch mode.
    calls, graphs = OpCalls(), []

    def counting_forward(gm, example_inputs):
        graphs.append(gm)

        def run(*args):
            with calls:
                return gm(*args)

        return make_boxed_func(run)

    compiled = torch.compile(model, fullgraph=True, backend=aot_autograd(fw_compiler=counting_forward))(token).logits
    assert len(graphs) == 1
    assert len(calls.names) == n_layers * 6
    torch.testing.assert_close(compiled, eager)
