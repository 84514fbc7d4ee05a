"""GPTQ (Frantar et al., 2023, Algorithm 1) for one weight or a stack of experts, as a pure function.

GPTQ quantizes W one input column at a time and spreads each column's rounding error
over the columns not yet quantized, so that the layer output X Wᵀ changes as little as
possible. The updates come from the inverse Hessian of that loss, H⁻¹ with H = XᵀX (any
positive scaling): its upper Cholesky factor ``Hinv`` holds, in row j, the update that
column j's error sends to columns j+1, j+2, ... . "Lazy batch" updates apply the errors
of a block of ``blocksize`` columns to the rest of W in one matmul.

The result is written in the project's one numeric scheme (``primitives``): codes,
scale and zero per (row, group of ``group_size`` columns), so RTN and GPTQ weights are
packed alike. Departures from the reference code (IST-DASLab/gptq, AutoGPTQ), and why:

- Batched: stacked experts [E, R, K] share one sweep, with batched Cholesky and
  batched column updates, instead of a Python loop over experts.
- Dead columns (H_ii == 0) keep their weight. The reference zeroes W[:, dead]; for a
  rarely routed expert that destroys weights the calibration set merely missed. With
  H_ii = 1 and a zero row/column, a dead column neither sends nor receives updates, so it
  is rounded to nearest under its group's parameters.
- Damping is relative to the mean diagonal *before* dead entries are set to 1, so it
  does not depend on how H is scaled. A failed Cholesky is retried per batch element
  with 10x damping and reported in ``GPTQStats``, never ignored.
- The group parameters chosen at a group's first column see every update from earlier
  columns, also for columns past the current block (the reference reads stale ones).
- The error fed back is w minus what the stored codes and scales dequantize to.

Shapes: B = batch (W's leading dims flattened, e.g. experts), R = out features,
K = in features, G = K // group_size, b = columns in the current block.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from moe_ao.primitives import (
    SUPPORTED_BITS,
    QuantizedWeight,
    check_finite,
    choose_qparams,
    dequantize_codes,
    quantize_with_qparams,
)

logger = logging.getLogger(__name__)

# Each retry multiplies the relative damping by 10, so 4 retries reach 1e4 x the request
# (100 x mean(diag H) for the default 0.01): beyond that GPTQ has degenerated into RTN,
# and an H that still fails is broken, not ill-conditioned.
_MAX_DAMP_RETRIES = 4
# A retry after damp=0 starts at the paper's default relative damping.
_RETRY_DAMP_FROM_ZERO = 0.01


@dataclass
class GPTQStats:
    """Diagnostics of one ``gptq_quantize`` call, each shaped like W's leading dims.

    Attributes:
        loss: Hessian-weighted reconstruction error tr((W - Q) H (W - Q)ᵀ) with the H
            passed in (undamped), Q the dequantized result. When H = XᵀX this is exactly
            ||X Wᵀ - X Qᵀ||², so it compares directly with RTN's error on the same H.
        damp: relative damping actually used: the ``damp`` argument, or 10x, 100x, ...
            of it where the Cholesky factorization had to be retried.
        dead_columns: number of input columns with H_ii == 0 (never activated).
    """

    loss: torch.Tensor
    damp: torch.Tensor
    dead_columns: torch.Tensor


def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    *,
    bits: int,
    group_size: int,
    symmetric: bool = True,
    scale_dtype: torch.dtype = torch.bfloat16,
    damp: float = 0.01,
    blocksize: int = 128,
    act_order: bool = False,
) -> tuple[QuantizedWeight, GPTQStats]:
    """Quantizes W with GPTQ, group-wise, in the scheme of ``primitives``.

    Args:
        W: weight [..., R, K]; leading dims are a batch (e.g. the E experts of one MoE
            layer). Computed in float32, or float64 if W is float64.
        H: [..., K, K], the sum of x xᵀ over calibration inputs (any positive scaling),
            same leading dims as W.
        bits: bit width, one of SUPPORTED_BITS.
        group_size: input columns per (scale, zero) group; must divide K.
        symmetric: symmetric (implicit zero) or asymmetric (stored zero) groups.
        scale_dtype: dtype the scales are stored in.
        damp: ``percdamp``: damp * mean(diag H) is added to H's diagonal.
        blocksize: columns per lazy-batch block (changes speed, not the result beyond
            floating-point rounding).
        act_order: process columns in order of decreasing diag(H). Group parameters are
            then "static": chosen upfront from the original W, so the stored layout stays
            plain group-wise over the natural column order.

    Returns:
        (QuantizedWeight with codes [..., R, K] in the natural column order, scale and
        zero [..., R, G]; GPTQStats).

    Raises:
        ValueError: on mismatched shapes, unsupported bits, a group_size that does not
            divide K, bad damp/blocksize, NaN/Inf inputs, or an H whose damped Cholesky
            factorization fails even after the retries.
        TypeError: if W or H is not floating point.
    """
    _check_gptq_args(W, H, bits, group_size, damp, blocksize)
    check_finite(W, "gptq_quantize: W")
    check_finite(H, "gptq_quantize: H")
    work = torch.float64 if W.dtype == torch.float64 else torch.float32
    *batch, R, K = W.shape
    W0 = W.to(work).reshape(-1, R, K)  # [B, R, K]
    H0 = H.to(work).reshape(-1, K, K)  # [B, K, K], cast to W's working dtype
    B = W0.shape[0]

    diag = H0.diagonal(dim1=-2, dim2=-1)  # [B, K]
    dead = diag == 0  # [B, K]
    Hfix = H0.clone()  # [B, K, K]
    Hfix.diagonal(dim1=-2, dim2=-1)[dead] = 1

    Wp, static = W0.clone(), None  # Wp: W in sweep order, error-updated by the sweep
    if act_order:
        # Stable sort: ties (dead columns, duplicated inputs) keep their natural order.
        perm = torch.argsort(diag, dim=-1, descending=True, stable=True)  # [B, K]
        Wp, Hfix = _permute_columns(W0, perm), _permute_columns(_permute_rows(Hfix, perm), perm)
        scale, zero = choose_qparams(W0, bits, group_size, symmetric, scale_dtype)  # [B, R, G]
        static = tuple(
            None if p is None else _permute_columns(p.repeat_interleave(group_size, dim=-1), perm)
            for p in (scale, zero)
        )  # per column, sweep order: [B, R, K]

    Hinv, used_damp = _damped_inverse_cholesky(Hfix, diag.mean(-1), damp)  # [B, K, K], [B]
    codes, swept_scale, swept_zero = _sweep(
        Wp, Hinv, bits=bits, group_size=group_size, symmetric=symmetric,
        scale_dtype=scale_dtype, blocksize=blocksize, static=static,
    )  # codes [B, R, K] in sweep order
    if act_order:
        codes = torch.empty_like(codes).scatter_(-1, perm[:, None, :].expand(B, R, K), codes)
    else:
        scale, zero = swept_scale, swept_zero

    D = W0 - dequantize_codes(codes, scale, zero, bits, group_size, work)  # [B, R, K]
    loss = ((D @ H0) * D).sum((-2, -1))  # [B]

    def unbatch(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.reshape(*batch, *t.shape[1:])

    qw = QuantizedWeight(unbatch(codes), unbatch(scale), unbatch(zero), bits, group_size)
    stats = GPTQStats(
        loss=loss.reshape(batch), damp=used_damp.reshape(batch), dead_columns=dead.sum(-1).reshape(batch)
    )
    return qw, stats


def _sweep(
    W: torch.Tensor,
    Hinv: torch.Tensor,
    *,
    bits: int,
    group_size: int,
    symmetric: bool,
    scale_dtype: torch.dtype,
    blocksize: int,
    static: tuple[torch.Tensor, torch.Tensor | None] | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The column sweep of Algorithm 1 with lazy batch updates (kept whole: it is the paper).

    Args:
        W: [B, R, K] weight in sweep order; overwritten with the error-updated weight.
        Hinv: [B, K, K] upper Cholesky factor of the damped H⁻¹, in sweep order.
        static: act_order's per-column (scale, zero) [B, R, K] in sweep order, or None to
            choose each group's parameters when the sweep reaches its first column.

    Returns:
        (codes uint8 [B, R, K] in sweep order, scale [B, R, G], zero [B, R, G] or None);
        scale and zero are only filled in when ``static`` is None.
    """
    B, R, K = W.shape
    codes = torch.empty(B, R, K, dtype=torch.uint8, device=W.device)
    scale = torch.empty(B, R, K // group_size, dtype=scale_dtype, device=W.device)
    zero = None if symmetric else torch.empty(B, R, K // group_size, dtype=torch.uint8, device=W.device)
    for i1 in range(0, K, blocksize):
        i2 = min(i1 + blocksize, K)
        W1 = W[..., i1:i2].clone()  # [B, R, b]
        Err1 = torch.zeros_like(W1)  # [B, R, b]
        Hinv1 = Hinv[:, i1:i2, i1:i2]  # [B, b, b]
        for i in range(i2 - i1):
            j = i1 + i
            if static is not None:
                s = static[0][..., j : j + 1]  # [B, R, 1]
                z = None if static[1] is None else static[1][..., j : j + 1]
            elif j % group_size == 0:
                g = j // group_size
                current = _group_columns_now(W, W1, Err1, Hinv, i1, i2, j, group_size)
                s, z = choose_qparams(current, bits, group_size, symmetric, scale_dtype)  # [B, R, 1]
                scale[..., g : g + 1] = s
                if z is not None:
                    zero[..., g : g + 1] = z
            w = W1[..., i : i + 1]  # [B, R, 1]
            q = quantize_with_qparams(w, s, z, bits, 1)  # [B, R, 1]
            codes[..., j : j + 1] = q
            err1 = (w - dequantize_codes(q, s, z, bits, 1, w.dtype)) / Hinv1[:, i, i, None, None]
            # W1[:, i:] -= err1 Hinv1[i, i:], fused in place: the hot loop, 2.5x faster
            # on CPU than the product plus subtraction.
            W1[..., i:].addcmul_(err1, Hinv1[:, i : i + 1, i:], value=-1)  # [B, R, 1] * [B, 1, b - i]
            Err1[..., i : i + 1] = err1
        W[..., i2:] -= Err1 @ Hinv[:, i1:i2, i2:]  # the lazy batch update
    return codes, scale, zero


def _group_columns_now(
    W: torch.Tensor,
    W1: torch.Tensor,
    Err1: torch.Tensor,
    Hinv: torch.Tensor,
    i1: int,
    i2: int,
    j: int,
    group_size: int,
) -> torch.Tensor:
    """Columns [j, j + group_size) with every update from the columns before j applied.

    Columns inside the block are up to date in W1 (updated eagerly). Columns past the
    block still owe the block's lazy update; Err1 is zero from column j on, so the
    whole block's product gives exactly the part owed by columns i1..j-1.

    Returns:
        [B, R, group_size].
    """
    end = j + group_size
    inside = W1[..., j - i1 : min(end, i2) - i1]
    if end <= i2:
        return inside
    past = W[..., i2:end] - Err1 @ Hinv[:, i1:i2, i2:end]
    return torch.cat([inside, past], dim=-1)


def _damped_inverse_cholesky(
    H: torch.Tensor, mean_diag: torch.Tensor, damp: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor U of (H + λI)⁻¹ = UᵀU, λ = damp * mean(diag H), per batch element.

    Elements whose factorization fails (H indefinite, or too ill-conditioned for the
    working dtype) are retried alone with 10x damping, at most _MAX_DAMP_RETRIES times.

    Args:
        H: [B, K, K] symmetric, dead diagonal entries already set to 1.
        mean_diag: [B] mean of H's original diagonal.
        damp: requested relative damping.

    Returns:
        (U [B, K, K], relative damping used [B]).

    Raises:
        ValueError: naming the batch elements that still fail after the last retry.
    """
    B, K, _ = H.shape
    eye = torch.eye(K, dtype=H.dtype, device=H.device)
    U = torch.empty_like(H)
    rel = torch.full((B,), float(damp), dtype=H.dtype, device=H.device)
    todo = torch.arange(B, device=H.device)
    for attempt in range(_MAX_DAMP_RETRIES + 1):
        if attempt > 0:
            rel[todo] = torch.where(rel[todo] > 0, rel[todo] * 10, _RETRY_DAMP_FROM_ZERO)
            logger.warning(
                "GPTQ: Cholesky failed for batch elements %s; retrying with relative damping %s",
                todo.tolist(), rel[todo].tolist(),
            )
        Hd = H[todo] + (rel[todo] * mean_diag[todo])[:, None, None] * eye  # [b, K, K]
        L, info = torch.linalg.cholesky_ex(Hd)
        Ut, info_inv = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
        ok = (info == 0) & (info_inv == 0) & torch.isfinite(Ut).flatten(1).all(1)
        U[todo[ok]] = Ut[ok]
        todo = todo[~ok]
        if todo.numel() == 0:
            return U, rel
    raise ValueError(
        f"GPTQ: Cholesky of the damped Hessian failed for batch elements {todo.tolist()} even with "
        f"relative damping {rel[todo].tolist()}; H must be (close to) positive semi-definite"
    )


def _permute_columns(X: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """X[b, :, perm[b]]: X [B, N, K], perm [B, K] -> [B, N, K]."""
    return X.gather(-1, perm[:, None, :].expand(X.shape))


def _permute_rows(X: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """X[b, perm[b], :]: X [B, K, N], perm [B, K] -> [B, K, N]."""
    return X.gather(-2, perm[:, :, None].expand(X.shape))


def _check_gptq_args(
    W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int, damp: float, blocksize: int
) -> None:
    if not (W.is_floating_point() and H.is_floating_point()):
        raise TypeError(f"W and H must be floating point, got W {W.dtype} and H {H.dtype}")
    if W.dim() < 2:
        raise ValueError(f"W must be [..., R, K], got shape {tuple(W.shape)}")
    K = W.shape[-1]
    expected = (*W.shape[:-2], K, K)
    if tuple(H.shape) != expected:
        raise ValueError(
            f"H has shape {tuple(H.shape)}, but W of shape {tuple(W.shape)} needs H of shape {expected}"
        )
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} is not supported; allowed: {SUPPORTED_BITS}")
    if group_size <= 0 or K % group_size != 0:
        raise ValueError(f"group_size={group_size} must be positive and divide in_features={K}")
    if blocksize < 1:
        raise ValueError(f"blocksize={blocksize} must be >= 1")
    if not damp >= 0:  # also catches NaN
        raise ValueError(f"damp={damp} must be >= 0")
