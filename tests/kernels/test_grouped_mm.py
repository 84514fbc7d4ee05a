"""grouped_mm against a float64 loop over experts, eager and compiled.

Shapes: S routed rows sorted by expert, E experts, K in features, N out features.
"""

from __future__ import annotations

import pytest
import torch

from moe_ao.kernels.grouped_mm import grouped_mm, grouped_mm_reference

K, N = 32, 16
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1.6e-2, atol=2e-2),
       torch.float64: dict(rtol=1e-12, atol=1e-12)}
# rows per expert; zeros are experts that got no token
COUNTS = {"even": [3, 3, 3, 3], "empty_first": [0, 5, 2, 4], "empty_middle": [4, 0, 0, 3, 2],
          "empty_last": [2, 6, 0], "one_expert": [7], "all_in_one": [0, 0, 9, 0]}


def problem(counts: list[int], dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    S, E = sum(counts), len(counts)
    x = torch.randn(S, K, generator=g, dtype=torch.float64).to(dtype)
    w = (torch.randn(E, K, N, generator=g, dtype=torch.float64) / K**0.5).to(dtype)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    return x, w, offs


def float64_loop(x: torch.Tensor, w: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """out[r] = x[r] @ w[e] for the rows r of expert e, in float64."""
    out, start = [], 0
    for e, c in enumerate(counts):
        out.append(x[start:start + c].double() @ w[e].double())
        start += c
    return torch.cat(out)


@pytest.mark.parametrize("counts", list(COUNTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_matches_float64_loop(counts, dtype):
    x, w, offs = problem(COUNTS[counts], dtype)
    out = grouped_mm(x, w, offs)
    assert out.dtype == dtype and out.shape == (x.shape[0], N)
    torch.testing.assert_close(out.double(), float64_loop(x, w, COUNTS[counts]), **TOL[dtype])
    # The library's own reference loop agrees as well.
    torch.testing.assert_close(grouped_mm_reference(x, w, offs).double(), float64_loop(x, w, COUNTS[counts]),
                               **TOL[dtype])


def test_input_is_cast_to_weight_dtype():
    x, w, offs = problem(COUNTS["even"], torch.float32)
    out = grouped_mm(x, w.to(torch.bfloat16), offs)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), float64_loop(x.bfloat16(), w.bfloat16(), COUNTS["even"]),
                               **TOL[torch.bfloat16])


def test_transposed_weight_view():
    """The experts path passes w as a transposed view ([E, N, K] -> [E, K, N])."""
    x, w, offs = problem(COUNTS["empty_middle"], torch.float32)
    w_nk = w.transpose(1, 2).contiguous()
    torch.testing.assert_close(grouped_mm(x, w_nk.transpose(1, 2), offs),
                               float64_loop(x, w, COUNTS["empty_middle"]).float(), **TOL[torch.float32])


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compiled_matches_float64_loop(backend, dtype):
    fn = torch.compile(grouped_mm, fullgraph=True, backend=backend)
    for name in ("empty_first", "empty_middle"):
        x, w, offs = problem(COUNTS[name], dtype, seed=1)
        torch.testing.assert_close(fn(x, w, offs).double(), float64_loop(x, w, COUNTS[name]), **TOL[dtype])


def test_loop_op_gradients():
    """The opaque loop op has an autograd formula (gradcheck in float64, empty experts included)."""
    x, w, offs = problem([2, 0, 3, 1], torch.float64)
    x.requires_grad_(True)
    w.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, w: torch.ops.moe_ao.grouped_mm_loop(x, w, offs), (x, w))


def test_compile_with_inputs_requiring_grad():
    """Under grad mode AOT autograd traces a backward; the float32 loop op must support it."""
    counts = COUNTS["empty_middle"]
    x, w, offs = problem(counts, torch.float32)
    x.requires_grad_(True)
    w.requires_grad_(True)
    fn = torch.compile(grouped_mm, fullgraph=True, backend="aot_eager")
    out = fn(x, w, offs)
    x64, w64 = x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    ref = float64_loop(x64, w64, counts)
    torch.testing.assert_close(out.detach().double(), ref.detach(), **TOL[torch.float32])
    out.square().sum().backward()
    ref.square().sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, **TOL[torch.float32])
    torch.testing.assert_close(w.grad.double(), w64.grad, **TOL[torch.float32])
    assert torch.equal(w.grad[1], torch.zeros_like(w.grad[1]))  # expert 1 got no rows
