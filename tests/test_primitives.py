"""Group-wise RTN (moe_ao.primitives) against the float64 reference in conftest."""

from __future__ import annotations

import pytest
import torch

from moe_ao.primitives import (
    SUPPORTED_BITS,
    check_finite,
    choose_qparams,
    dequantize_codes,
    quantize_with_qparams,
    rtn_quantize,
)

R, K = 6, 128


def weight(*shape: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * 0.05).to(dtype)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("scale_dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_rtn_float64_input_matches_reference(ref_rtn, bits, group_size, symmetric, scale_dtype):
    """Same precision as the reference: codes, scales and zeros are equal, no tie needs a guide."""
    W = weight(3, R, K)  # a stack of 3 experts
    q = rtn_quantize(W, bits, group_size, symmetric, scale_dtype)
    ref = ref_rtn(W, bits, group_size, symmetric, scale_dtype)
    assert q.codes.dtype == torch.uint8 and q.codes.shape == W.shape
    assert q.scale.dtype == scale_dtype and q.scale.shape == (3, R, K // group_size)
    assert torch.equal(q.codes.long(), ref.codes)
    assert torch.equal(q.scale.double(), ref.scale)
    if symmetric:
        assert q.zero is None
    else:
        assert q.zero.dtype == torch.uint8 and torch.equal(q.zero.double(), ref.zero)
    assert int(q.codes.max()) <= 2**bits - 1
    deq = q.dequantize(torch.float64)
    if scale_dtype == torch.float64:
        torch.testing.assert_close(deq, ref.deq, rtol=0, atol=4 * torch.finfo(torch.float64).eps)
    else:
        # Dequantized in the scale dtype: exactly the float64 values, rounded once.
        assert torch.equal(deq, ref.deq.to(scale_dtype).double())


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("group_size", [32, 128])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rtn_model_dtype_matches_reference_up_to_ties(ref_rtn, bits, group_size, symmetric, dtype):
    """float32/bf16 weights are rounded in float32: codes agree except on exact rounding ties.

    Scales are stored in the weight's 16-bit dtype (bf16) or float32; the reference
    rounds its float64 scale to that dtype before choosing codes.
    """
    W = weight(R, K, seed=1, dtype=dtype)
    q = rtn_quantize(W, bits, group_size, symmetric, dtype)
    ref = ref_rtn(W, bits, group_size, symmetric, dtype, guide=q.codes)
    n_groups = R * K // group_size
    assert ref.ties <= n_groups  # at most one group extreme per group lands on a tie
    assert torch.equal(q.codes.long(), ref.codes)
    # Scales: the same up to one rounding step of the storage dtype (float32 vs float64 arithmetic).
    torch.testing.assert_close(q.scale.double(), ref.scale, rtol=2 * torch.finfo(dtype).eps, atol=0)
    torch.testing.assert_close(
        q.dequantize(torch.float64), ref.deq, rtol=2 * torch.finfo(dtype).eps, atol=1e-30
    )


def test_symmetric_scale_convention():
    """s = 2·max|W| / (2**bits - 1) and z = 2**(bits-1): max|W| is reachable up to half a step."""
    W = torch.tensor([[0.5, -1.0, 0.25, 0.0]], dtype=torch.float64)
    q = rtn_quantize(W, 2, 4, True, torch.float64)
    assert q.scale.item() == pytest.approx(2 / 3)
    # values / s = [0.75, -1.5, 0.375, 0] -> round -> [1, -2, 0, 0] -> + 2
    assert q.codes.tolist() == [[3, 0, 2, 2]]


def test_asymmetric_convention():
    W = torch.tensor([[0.1, 0.7, 0.3, 0.5]], dtype=torch.float64)  # all positive: min clamps to 0
    q = rtn_quantize(W, 3, 4, False, torch.float64)
    assert q.scale.item() == pytest.approx(0.1) and q.zero.item() == 0
    assert q.codes.tolist() == [[1, 7, 3, 5]]
    torch.testing.assert_close(q.dequantize(), W)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_constant_and_zero_groups(bits, symmetric, dtype):
    W = torch.zeros(4, 64, dtype=dtype)
    W[1, :32] = 0.3  # constant positive group
    W[2, 32:] = -0.7  # constant negative group
    W[3] = torch.linspace(-1, 1, 64, dtype=dtype)
    q = rtn_quantize(W, bits, 32, symmetric, dtype)
    deq = q.dequantize()
    assert torch.isfinite(q.scale).all() and (q.scale > 0).all()
    assert torch.isfinite(deq).all()
    assert torch.equal(deq[0], torch.zeros(64, dtype=dtype))  # all-zero row: exactly 0
    assert torch.equal(deq[1, 32:], torch.zeros(32, dtype=dtype))
    assert torch.equal(deq[2, :32], torch.zeros(32, dtype=dtype))
    # A constant group keeps its sign and lands within one step of its value.
    step1, step2 = q.scale[1, 0].float(), q.scale[2, 1].float()
    assert ((deq[1, :32].float() - 0.3).abs() <= step1 + 1e-3).all() and (deq[1, :32] > 0).all()
    assert ((deq[2, 32:].float() + 0.7).abs() <= step2 + 1e-3).all() and (deq[2, 32:] < 0).all()


def test_qparams_then_codes_equals_rtn():
    W = weight(5, 64, seed=3)
    scale, zero = choose_qparams(W, 3, 32, False, torch.bfloat16)
    codes = quantize_with_qparams(W, scale, zero, 3, 32)
    q = rtn_quantize(W, 3, 32, False, torch.bfloat16)
    assert torch.equal(codes, q.codes) and torch.equal(scale, q.scale) and torch.equal(zero, q.zero)
    assert torch.equal(dequantize_codes(codes, scale, zero, 3, 32), q.dequantize())


def test_single_group_column_block():
    """A column block with [R, 1] parameters (as GPTQ uses) gives the full-matrix codes."""
    W = weight(4, 64, seed=4)
    q = rtn_quantize(W, 4, 32, True, torch.float32)
    block = quantize_with_qparams(W[:, 32:40], q.scale[:, 1:2], None, 4, 32)
    assert torch.equal(block, q.codes[:, 32:40])


@pytest.mark.parametrize("bits, group_size, match", [(5, 32, r"bits=5.*\(2, 3, 4, 8\)"), (4, 48, "group_size=48"),
                                                     (4, 0, "group_size=0")])
def test_bad_arguments(bits, group_size, match):
    with pytest.raises(ValueError, match=match):
        rtn_quantize(weight(2, 64), bits, group_size, True, torch.float32)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_check_finite_names_unit(bad):
    W = weight(4, 8, dtype=torch.float32)
    check_finite(W, "model.layers.0.mlp.experts.3.down_proj")  # finite: no error
    W[2, 5] = bad
    W[0, 1] = bad
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.experts\.3\.down_proj: weight has 2 NaN/Inf"):
        check_finite(W, "model.layers.0.mlp.experts.3.down_proj")
