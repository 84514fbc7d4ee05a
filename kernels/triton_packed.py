"""Triton kernels that read PackedWeight buffers directly: mixed-bit GEMV / small GEMM on GPU.

Legend: M rows of x, K in features, N out features, S routed (token, expert) pairs,
E experts, R rows per slice, G = K / group_size groups per row, BM x BN x BK a tile.

Decode is bound by the bytes of weights it reads. Dequantizing a bank to 16 bits and
calling cuBLAS writes and re-reads every weight at 16 bits; these kernels instead load
the packed codes, expand them in registers and multiply:

    y[m, n] = Σ_k x[m, k] * (q[n, k] - z[n, k // gs]) * s[n, k // gs]     (fp32 accumulate)

One kernel serves every width and both shapes of weight:

- ``moe_ao::triton_packed_linear``: x [M, K] times a 2D PackedWeight [N, K] -> [M, N]; a
  program computes a BM x BN tile (``tl.dot`` once BM >= 16), so each weight tile is
  read once for all M rows (small-batch GEMM);
- ``moe_ao::triton_packed_experts_linear``: row s of x [S, K] times expert ids[s] of a
  3D PackedWeight [E, N, K] -> [S, N] (grouped GEMV). A program reads its expert's slot
  (bit width, row in that width's buffer) on the device and branches on the width, so
  experts at 2, 3, 4, 8 or 16 bits mix in one launch, with no host sync and no sorting:
  the launch is the same for any routing, which CUDA graphs need.

Codes follow ``moe_ao.tensors.packing``: a run of 8 codes is ``bits`` bytes and code j
of a run sits at bit ``bits * j``; a 3-bit code may straddle two bytes, so it is read
as a 16-bit little-endian pair. Each op has a plain-PyTorch reference beside it in
``moe_ao.kernels.cpu_packed`` (dequantize, then matmul), which the tests compare with
under ``TRITON_INTERPRET=1`` on CPU. Triton is optional: it is imported, and the kernels
are compiled, at first use (so ``TRITON_INTERPRET`` is read then).
"""

from __future__ import annotations

import functools
import logging
import os
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from moe_ao.kernels._registry import BUFFER_NAMES, buffers_of, define_packed_ops, device_and_dtype

if TYPE_CHECKING:  # typing only: kernels sit below tensors and never import them at runtime
    from moe_ao.tensors.packed import PackedWeight

logger = logging.getLogger(__name__)

__all__ = ["DISABLE_ENV", "MAX_ROWS", "available", "packed_experts_linear", "packed_linear", "triton_ok"]

DISABLE_ENV = "MOE_AO_DISABLE_TRITON"
# Rows of x up to which the kernels serve a call (decode and small batches). Beyond it a
# dequantized bank plus a cuBLAS GEMM wins: the weight read is amortised over many rows.
MAX_ROWS = 64
_BK = 128  # columns per step: a multiple of every packed run (8 codes)
_BN = 64  # output rows per program


@functools.cache
def available() -> bool:
    """Whether Triton can be imported (asked for CUDA tensors only; says once when not)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        logger.warning("Triton is not installed: packed weights on CUDA use dequantize + matmul (slow decode);"
                       " pip install triton")
        return False
    return True


def _require() -> None:
    if not available():
        raise ImportError("moe_ao's GPU kernels need Triton: pip install triton (CUDA builds of torch ship it)")


@functools.cache
def _kernel() -> Any:
    """(triton, the jitted kernel), imported at first use so that TRITON_INTERPRET is read then."""
    _require()
    import triton

    from moe_ao.kernels._triton_kernels import packed_mm_kernel

    return triton, packed_mm_kernel


def _launch(x: Tensor, ids: Tensor | None, slot: Tensor, out_features: int, n_seg: int, group_size: int,
            buffers: list[Tensor | None]) -> Tensor:
    """Runs the kernel; x [M, K] -> [M, out_features] in x's dtype."""
    triton, kernel = _kernel()
    M, K = x.shape
    R = out_features // n_seg
    assert len(buffers) == len(BUFFER_NAMES) and out_features % n_seg == 0, f"{len(buffers)=} {out_features=}"
    assert all(t is None or (t.is_contiguous() and t.device == x.device) for t in buffers), "buffers"
    dummy = slot  # never read: stands in for the widths this weight does not have
    args = [t if t is not None else dummy for t in buffers]
    has_zero = any(t is not None for t in buffers[2:12:3])  # z2, z3, z4, z8
    out = torch.empty(M, out_features, dtype=x.dtype, device=x.device)
    x = x.contiguous()
    tiles = triton.cdiv(R, _BN)
    if ids is None:
        bm = 16 if M >= 16 else triton.next_power_of_2(M)
        grid = (triton.cdiv(M, bm), n_seg * tiles)
        kernel[grid](x, slot, slot, out, *args, M, K, R, K // group_size, group_size, n_seg, tiles,
                     HAS_IDS=False, HAS_ZERO=has_zero, BM=bm, BN=_BN, BK=_BK)
    else:
        ids = ids.to(torch.int32).contiguous()
        kernel[(M, n_seg * tiles)](x, ids, slot, out, *args, M, K, R, K // group_size, group_size, n_seg, tiles,
                                   HAS_IDS=True, HAS_ZERO=has_zero, BM=1, BN=_BN, BK=_BK)
    return out


# CPU too: under TRITON_INTERPRET=1 the same kernel runs on CPU tensors (the tests).
define_packed_ops("triton_", _launch, ("CUDA", "CPU"))


def triton_ok(x: Tensor, w: PackedWeight, rows: int) -> bool:
    """Whether the Triton kernels serve ``x`` times ``w``: CUDA tensors, few rows, inference.

    Static properties only (device, shapes, grad mode), so compiled models specialise on
    them without graph breaks.

    Args:
        x: the activations [..., K].
        w: the packed weight.
        rows: rows of x per weight (per expert, on average, for an experts bank).

    Returns:
        True to call the Triton op, False for another path.
    """
    return (
        x.device.type == "cuda"
        and device_and_dtype(w)[0] == "cuda"
        and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and 1 <= rows <= MAX_ROWS
        and not (x.requires_grad and torch.is_grad_enabled())
        and os.environ.get(DISABLE_ENV, "") in ("", "0")
        and available()
    )


def packed_linear(x: Tensor, w: PackedWeight) -> Tensor:
    """x [..., K] times a 2D PackedWeight [N, K] -> [..., N] with the Triton kernel.

    Raises:
        ImportError: Triton is not installed.
    """
    assert len(w.logical_shape) == 2 and x.shape[-1] == w.logical_shape[-1], f"{w.logical_shape=} {x.shape=}"
    _require()
    N = w.logical_shape[0]
    out = torch.ops.moe_ao.triton_packed_linear(x.reshape(-1, x.shape[-1]), w.slot, N, w.n_seg, w.group_size,
                                                buffers_of(w))
    return out.reshape(*x.shape[:-1], N)


def packed_experts_linear(x: Tensor, w: PackedWeight, ids: Tensor) -> Tensor:
    """Row s of x [S, K] times expert ids[s] of a 3D PackedWeight [E, N, K] -> [S, N] with the Triton kernel.

    Raises:
        ImportError: Triton is not installed.
    """
    assert len(w.logical_shape) == 3 and x.dim() == 2 and ids.shape == x.shape[:1], (
        f"{w.logical_shape=} {x.shape=} {ids.shape=}"
    )
    _require()
    return torch.ops.moe_ao.triton_packed_experts_linear(x, ids, w.slot, w.logical_shape[1], w.n_seg, w.group_size,
                                                         buffers_of(w))
