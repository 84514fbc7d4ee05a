"""gptq_quantize against a textbook float64 GPTQ, a loop over experts, and RTN."""

from __future__ import annotations

import pytest
import torch

from moe_ao.primitives import choose_qparams, quantize_with_qparams, rtn_quantize
from moe_ao.quant.gptq import gptq_quantize

R, K = 16, 64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These problems are tiny: with several threads on a busy machine, OpenMP spin-waits
    make a 64x64 Cholesky take milliseconds instead of microseconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def correlated_inputs(n: int, k: int, *, rank: int = 8, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """Calibration inputs X [n, k] with a low-rank + noise covariance, like real activations."""
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(n, rank, generator=g, dtype=dtype)
    A = torch.randn(rank, k, generator=g, dtype=dtype)
    return Z @ A + 0.1 * torch.randn(n, k, generator=g, dtype=dtype)


def random_weight(*shape: int, seed: int = 1, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def layer_error(X: torch.Tensor, W: torch.Tensor, Q: torch.Tensor) -> float:
    """||X Wᵀ - X Qᵀ||²."""
    return ((X @ (W - Q).T) ** 2).sum().item()


def textbook_gptq(W, H, *, bits, group_size, symmetric, damp, act_order, guide=None):
    """Algorithm 1 of the GPTQ paper, float64, one column at a time, no lazy batches.

    Written independently of gptq.py; only the scheme's ``choose_qparams`` is shared,
    as it defines the group parameters. The project's conventions: a dead column
    (H_jj == 0) keeps its weight with H_jj = 1; damping is relative to the original
    mean diagonal; act_order uses static groups from the original W.

    Ties: in the symmetric scheme, a column whose value is its group's -max|W| lands
    exactly on the rounding tie between codes 0 and 1 when it is the group's first column
    (quantized with the parameters just chosen from it), or for act_order a column that
    no update reached. Which way it goes is decided by rounding in the last bits, which
    differ between blocked and unblocked summation order.
    Wherever the value to round is within 1e-9 of a half-integer, the reference follows
    ``guide`` (the codes under test, if given) and counts the tie; elsewhere it decides
    alone. A tie decided the other way changes that code's error by a full step and
    every later column with it, so without the guide whole tails of codes would differ.

    Returns:
        (codes [R, K] int64, scale [R, G], zero [R, G] or None, number of ties followed).
    """
    W, H = W.clone(), H.clone()
    Rr, Kk = W.shape
    maxq = 2**bits - 1
    d = H.diag().clone()
    dead = d == 0
    H[dead, dead] = 1
    H += damp * d.mean() * torch.eye(Kk, dtype=H.dtype)
    perm = torch.argsort(d, descending=True, stable=True) if act_order else torch.arange(Kk)
    if act_order:
        static_scale, static_zero = choose_qparams(W, bits, group_size, symmetric, torch.float64)
    W, H = W[:, perm], H[perm][:, perm]
    Hinv = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)

    G = Kk // group_size
    codes = torch.zeros(Rr, Kk, dtype=torch.int64)
    scale = torch.zeros(Rr, G, dtype=torch.float64)
    zero = None if symmetric else torch.zeros(Rr, G, dtype=torch.uint8)
    ties = 0
    for j in range(Kk):
        c = perm[j].item()
        if act_order:
            s, z = static_scale[:, c // group_size], None if symmetric else static_zero[:, c // group_size]
        elif j % group_size == 0:
            s, z = choose_qparams(W[:, j : j + group_size], bits, group_size, symmetric, torch.float64)
            s, z = s[:, 0], None if symmetric else z[:, 0]
            scale[:, j // group_size] = s
            if z is not None:
                zero[:, j // group_size] = z
        zf = torch.full_like(s, 2 ** (bits - 1)) if z is None else z.double()
        x = W[:, j] / s
        q = (torch.round(x) + zf).clamp(0, maxq)
        tie = ((x - x.floor()) - 0.5).abs() < 1e-9
        if guide is not None:
            q = torch.where(tie, guide[:, c].double(), q)
        ties += int(tie.sum())
        codes[:, c] = q.long()
        err = (W[:, j] - (q - zf) * s) / Hinv[j, j]
        W[:, j:] -= torch.outer(err, Hinv[j, j:])
    return codes, (static_scale if act_order else scale), (static_zero if act_order else zero), ties


def hessian_with_dead_column(X: torch.Tensor, col: int) -> torch.Tensor:
    X = X.clone()
    X[:, col] = 0
    return X.T @ X


@pytest.mark.parametrize(
    "group_size,blocksize,act_order",
    # (16, 24): group 16..31 starts mid-block and runs past the block's end, so its
    # parameters need both the in-block updates and the block's pending lazy update;
    # blocksize does not divide K. (32, 8): groups span several whole blocks. (64, 64): one block.
    [(16, 24, False), (32, 8, False), (64, 64, False), (16, 24, True)],
)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_matches_textbook_gptq(bits, symmetric, group_size, blocksize, act_order):
    W = random_weight(R, K)
    H = hessian_with_dead_column(correlated_inputs(200, K), col=5)
    qw, stats = gptq_quantize(
        W, H, bits=bits, group_size=group_size, symmetric=symmetric, scale_dtype=torch.float64,
        blocksize=blocksize, act_order=act_order,
    )
    codes, scale, zero, ties = textbook_gptq(
        W, H, bits=bits, group_size=group_size, symmetric=symmetric, damp=0.01, act_order=act_order, guide=qw.codes
    )
    # At most one per (row, group) first column, plus act_order's unupdated columns.
    assert ties <= R * K // group_size + 2 * R, f"{ties=}"
    assert torch.equal(qw.codes.long(), codes)
    torch.testing.assert_close(qw.scale, scale, rtol=1e-10, atol=0)
    if symmetric:
        assert qw.zero is None
    else:
        assert torch.equal(qw.zero, zero)
    zf = torch.tensor(2.0 ** (bits - 1)) if symmetric else zero.double().repeat_interleave(group_size, -1)
    ref_Q = (codes.double() - zf) * scale.repeat_interleave(group_size, -1)
    torch.testing.assert_close(qw.dequantize(torch.float64), ref_Q, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(stats.loss, ((W - ref_Q) @ H * (W - ref_Q)).sum())
    assert stats.dead_columns.item() == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("symmetric", [True, False])
def test_batched_equals_loop_over_experts(dtype, act_order, symmetric):
    E, k = 4, 48
    W = random_weight(E, 8, k, dtype=dtype)  # [E, R, K]
    Xs = [correlated_inputs(64, k, seed=e, dtype=dtype) for e in range(E)]
    H = torch.stack([X.T @ X for X in Xs])  # [E, K, K]
    H[1, :, 7] = H[1, 7, :] = 0  # a dead column in one expert
    H[2] = 0  # an expert never routed
    H[3] -= 0.05 * H[3].diagonal().mean() * torch.eye(k, dtype=dtype)  # indefinite: needs a retry
    kw = dict(bits=3, group_size=16, symmetric=symmetric, blocksize=20, act_order=act_order)
    qw, stats = gptq_quantize(W, H, **kw)
    for e in range(E):
        qe, se = gptq_quantize(W[e], H[e], **kw)
        assert torch.equal(qw.codes[e], qe.codes), f"expert {e}"
        assert torch.equal(qw.scale[e], qe.scale), f"expert {e}"
        assert symmetric or torch.equal(qw.zero[e], qe.zero), f"expert {e}"
        assert stats.damp[e] == se.damp and stats.dead_columns[e] == se.dead_columns
        torch.testing.assert_close(stats.loss[e], se.loss)
    assert stats.damp[3] > stats.damp[0]


def test_batched_over_two_leading_dims():
    W = random_weight(2, 3, 8, 32, dtype=torch.float32)
    X = correlated_inputs(64, 32, dtype=torch.float32)
    H = (X.T @ X).expand(2, 3, 32, 32)
    qw, stats = gptq_quantize(W, H, bits=4, group_size=16)
    assert qw.codes.shape == (2, 3, 8, 32) and qw.scale.shape == (2, 3, 8, 2) and stats.loss.shape == (2, 3)
    assert torch.equal(qw.codes[1, 2], gptq_quantize(W[1, 2], H[1, 2], bits=4, group_size=16)[0].codes)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_beats_rtn_on_correlated_inputs(bits, symmetric):
    X = correlated_inputs(256, 64, dtype=torch.float32)
    W = random_weight(32, 64, dtype=torch.float32)
    qw, stats = gptq_quantize(W, X.T @ X, bits=bits, group_size=32, symmetric=symmetric, blocksize=16)
    rtn = rtn_quantize(W, bits, 32, symmetric, torch.bfloat16)
    gptq_err = layer_error(X, W, qw.dequantize(torch.float32))
    assert gptq_err < 0.5 * layer_error(X, W, rtn.dequantize(torch.float32))
    assert stats.loss.item() == pytest.approx(gptq_err, rel=1e-3)  # loss is ||XWᵀ - XQᵀ||²


def test_act_order_natural_order_and_static_groups():
    g = torch.Generator().manual_seed(3)
    X = correlated_inputs(256, 64, dtype=torch.float32) * torch.logspace(-2, 1, 64)[torch.randperm(64, generator=g)]
    W = random_weight(32, 64, dtype=torch.float32)
    H = X.T @ X
    qw, _ = gptq_quantize(W, H, bits=3, group_size=16, blocksize=16, act_order=True)
    rtn = rtn_quantize(W, 3, 16, True, torch.bfloat16)
    assert torch.equal(qw.scale, rtn.scale)  # static groups: parameters of the original W
    first = H.diagonal().argmax()  # swept first, before any update: plain rounding
    assert torch.equal(qw.codes[:, first], rtn.codes[:, first])
    # Codes in sweep order would not reconstruct W at all.
    assert layer_error(X, W, qw.dequantize(torch.float32)) < 0.5 * layer_error(X, W, rtn.dequantize(torch.float32))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_act_order_helps_with_uneven_hessian(bits, seed):
    # Per-column input scales spanning 3 decades, shuffled: the natural order sweeps
    # important columns late, after less important ones pushed error into them.
    g = torch.Generator().manual_seed(seed)
    X = correlated_inputs(256, 64, seed=seed, dtype=torch.float32)
    X = X * torch.logspace(-2, 1, 64)[torch.randperm(64, generator=g)]
    W = random_weight(32, 64, seed=seed + 10, dtype=torch.float32)
    kw = dict(bits=bits, group_size=16, blocksize=16)
    _, with_order = gptq_quantize(W, X.T @ X, act_order=True, **kw)
    _, without = gptq_quantize(W, X.T @ X, act_order=False, **kw)
    # Beats or matches; in practice by far (<= 0.17x over 30 seeds x bits 2-4).
    assert with_order.loss.item() <= without.loss.item()


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("symmetric", [True, False])
def test_dead_column_keeps_weight(symmetric, act_order):
    X = correlated_inputs(128, 64, dtype=torch.float32)
    X[:, 3] = 0  # input feature 3 never fires: H[3, :] = H[:, 3] = 0
    W = random_weight(16, 64, dtype=torch.float32)
    qw, stats = gptq_quantize(W, X.T @ X, bits=4, group_size=16, symmetric=symmetric, act_order=act_order)
    assert stats.dead_columns.item() == 1
    Q = qw.dequantize(torch.float32)
    assert (Q[:, 3] != 0).any()  # the reference GPTQ would have zeroed it
    # Rounded to nearest under its group's stored parameters, since it gets no updates.
    z = None if symmetric else qw.zero[:, :1]
    assert torch.equal(qw.codes[:, 3:4], quantize_with_qparams(W[:, 3:4], qw.scale[:, :1], z, 4, 16))


@pytest.mark.parametrize("act_order", [False, True])
def test_never_routed_expert_is_rtn(act_order):
    W = random_weight(16, 64, dtype=torch.float32)
    qw, stats = gptq_quantize(W, torch.zeros(64, 64), bits=3, group_size=32, act_order=act_order)
    rtn = rtn_quantize(W, 3, 32, True, torch.bfloat16)
    assert torch.equal(qw.codes, rtn.codes) and torch.equal(qw.scale, rtn.scale)
    assert stats.dead_columns.item() == 64 and stats.loss.item() == 0


def test_indefinite_hessian_retries_damping():
    X = correlated_inputs(8, 64, dtype=torch.float32)  # 8 samples: H has rank <= 8
    H = X.T @ X
    H -= 0.05 * H.diagonal().mean() * torch.eye(64)  # negative eigenvalues of -0.05 mean(diag)
    W = random_weight(2, 16, 64, dtype=torch.float32)
    qw, stats = gptq_quantize(W, torch.stack([H, X.T @ X]), bits=4, group_size=16)
    assert stats.damp.tolist() == pytest.approx([0.1, 0.01])
    assert torch.isfinite(qw.dequantize(torch.float32)).all() and torch.isfinite(stats.loss).all()
    assert int(qw.codes.max()) <= 15


def test_damp_zero_retries_from_paper_default():
    X = correlated_inputs(8, 32, dtype=torch.float64)
    H = X.T @ X - 1e-3 * torch.eye(32, dtype=torch.float64)  # indefinite
    _, stats = gptq_quantize(random_weight(8, 32), H, bits=4, group_size=16, damp=0.0)
    assert stats.damp.item() >= 0.01


def test_hopeless_hessian_raises():
    with pytest.raises(ValueError, match="Cholesky"):
        gptq_quantize(random_weight(8, 32), -torch.eye(32, dtype=torch.float64), bits=4, group_size=16)


@pytest.mark.parametrize(
    "W_shape,H_shape,kw,match",
    [
        ((8, 32), (32, 32), dict(bits=5, group_size=16), "bits=5"),
        ((8, 32), (32, 32), dict(bits=1, group_size=16), "bits=1"),
        ((8, 32), (32, 32), dict(bits=4, group_size=24), "group_size=24"),
        ((8, 32), (32, 32), dict(bits=4, group_size=0), "group_size=0"),
        ((8, 32), (33, 33), dict(bits=4, group_size=16), r"\(33, 33\)"),
        ((2, 8, 32), (3, 32, 32), dict(bits=4, group_size=16), r"\(2, 32, 32\)"),
        ((2, 8, 32), (32, 32), dict(bits=4, group_size=16), r"\(32, 32\)"),
        ((32,), (32, 32), dict(bits=4, group_size=16), "R, K"),
        ((8, 32), (32, 32), dict(bits=4, group_size=16, blocksize=0), "blocksize"),
        ((8, 32), (32, 32), dict(bits=4, group_size=16, damp=-0.1), "damp"),
    ],
)
def test_bad_arguments_raise(W_shape, H_shape, kw, match):
    with pytest.raises(ValueError, match=match):
        gptq_quantize(torch.randn(W_shape), torch.eye(H_shape[-1]).expand(H_shape), **kw)


def test_integer_input_raises():
    with pytest.raises(TypeError, match="floating point"):
        gptq_quantize(torch.ones(8, 32, dtype=torch.int32), torch.eye(32), bits=4, group_size=16)


def test_nan_input_raises():
    H = torch.eye(32)
    H[0, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        gptq_quantize(torch.randn(8, 32), H, bits=4, group_size=16)
