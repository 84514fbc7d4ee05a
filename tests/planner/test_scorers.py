"""Outlier score and sensitivities against float64 references."""

from __future__ import annotations

import pytest
import torch

from moe_ao.planner.scorers import outlier_score, rtn_error, sensitivity_table, token_share, weighted_error
from moe_ao.primitives import rtn_quantize
from moe_ao.profile_stats import Profile
from moe_ao.unit import Unit


def reference_outlier(W: torch.Tensor) -> float:
    """max over columns j of max_i |W_ij| / mean_i |W_ij|, by explicit loops in float64."""
    W = W.to(torch.float64)
    best = 0.0
    for j in range(W.shape[1]):
        col = [abs(float(W[i, j])) for i in range(W.shape[0])]
        mean = sum(col) / len(col)
        if mean > 0:
            best = max(best, max(col) / mean)
    return best


def test_outlier_score_hand_made():
    W = torch.tensor([[1.0, -2.0, 0.0, 4.0], [3.0, 1.0, 0.0, -1.0], [-1.0, 1.0, 0.0, 1.0]])
    # columns: 3/(5/3) = 1.8, 2/(4/3) = 1.5, all-zero -> 0, 4/2 = 2
    assert outlier_score(W) == 2.0
    assert outlier_score(W) == reference_outlier(W)
    assert outlier_score(torch.zeros(3, 4)) == 0.0  # no NaN from dead columns


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_outlier_score_matches_reference(dtype):
    g = torch.Generator().manual_seed(0)
    W = (torch.randn(24, 16, generator=g, dtype=torch.float64) ** 3).to(dtype)
    assert outlier_score(W) == pytest.approx(reference_outlier(W), rel=1e-12)
    assert outlier_score(W) == pytest.approx(float((W.double().abs().amax(0) / W.double().abs().mean(0)).max()))


def test_token_share():
    prof = Profile(routing_counts={0: torch.tensor([30, 10, 0, 60])}, tokens=50)
    assert [token_share(prof, 0, e) for e in range(4)] == [0.6, 0.2, 0.0, 1.0]
    prof.tokens = 0  # unknown token count: share of selections
    assert token_share(prof, 0, 3) == 0.6
    with pytest.raises(ValueError, match="expert 4 is out of range"):
        token_share(prof, 0, 4)


def test_weighted_error_reference(ref_rtn):
    g = torch.Generator().manual_seed(1)
    W = torch.randn(8, 32, generator=g)
    X = torch.randn(100, 32, generator=g, dtype=torch.float64)
    H = X.T @ X / 100
    E = rtn_error(W, 3, 16)
    codes = rtn_quantize(W, 3, 16, True, torch.float32).codes  # guides the reference only on exact ties
    ref_E = W.double() - ref_rtn(W, 3, 16, True, torch.float32, guide=codes).deq
    torch.testing.assert_close(E, ref_E, rtol=0, atol=1e-6)
    # tr(E H Eᵀ) = mean over inputs of ||E x||²
    assert weighted_error(E, H) == pytest.approx(float(((X @ E.T) ** 2).sum(1).mean()), rel=1e-9)
    assert weighted_error(E, torch.eye(32)) == pytest.approx(weighted_error(E, None), rel=1e-12)
    assert weighted_error(E, H, "diag") == pytest.approx(float((E**2 * H.diagonal()).sum()), rel=1e-9)


def test_sensitivity_table_hessian_fallback_and_frequency():
    g = torch.Generator().manual_seed(2)
    us = [
        Unit("e0", "expert", 0, 0, "down_proj", (8, 32), "p0"),
        Unit("e1", "expert", 0, 1, "down_proj", (8, 32), "p1"),
        Unit("att", "attention", 0, None, "q_proj", (8, 32), "p2"),
    ]
    Ws = {u.name: torch.randn(8, 32, generator=g) for u in us}
    H = torch.eye(32) * 4
    prof = Profile(routing_counts={0: torch.tensor([10, 30])}, tokens=20, hessians={"e0": H, "att": H})
    table, info = sensitivity_table(Ws, us, prof, {u.name: 16 for u in us}, bits=(2, 4))
    assert info == {"fallback_units": 1, "frequency_scaled_units": 2}
    frob = {n: {b: float((rtn_error(W, b, 16) ** 2).sum()) for b in (2, 4)} for n, W in Ws.items()}
    assert table["e0"][2] == pytest.approx(0.5 * 4 * frob["e0"][2])  # share 10/20, H = 4 I
    assert table["e1"][4] == pytest.approx(1.0 * frob["e1"][4])  # no Hessian: plain error, share min(1, 30/20)
    assert table["att"][2] == pytest.approx(4 * frob["att"][2])  # attention: never frequency-scaled
    assert all(t[2] > t[4] for t in table.values())
    unscaled, _ = sensitivity_table(Ws, us, prof, {u.name: 16 for u in us}, bits=(2,), scale_by_frequency=False)
    assert unscaled["e0"][2] == pytest.approx(4 * frob["e0"][2])
    with pytest.raises(ValueError, match=r"hessian='low'; allowed: \('full', 'diag'\)"):
        sensitivity_table(Ws, us, prof, {u.name: 16 for u in us}, hessian="low")
