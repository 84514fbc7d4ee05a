"""Triton kernels that read PackedWeight buffers directly: mixed-bit GEMV / GEMM on GPU.

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
  3D PackedWeight [E, N, K] -> [S, N]. A program reads its expert's slot (bit width, row
  in that width's buffer) on the device and branches on the width, so experts at 2, 3,
  4, 8 or 16 bits mix in one launch, with no host sync: the launch is the same for any
  routing, which CUDA graphs need. Decode (S <= E) runs a program per routed row
  (grouped GEMV); beyond, the rows are sorted by expert on the device into tiles of up
  to 16 rows of one expert (``_tile_table``; at most S / BM + E tiles, a bound known
  without a sync) and each program multiplies one tile with a BN x BK weight tile
  (grouped GEMM, ``tl.dot`` from 16 rows), so an expert's codes are read once per tile
  of its rows, never dequantized as a bank.

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
from moe_ao.kernels.activations import quantize_activations

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


def _tile_table(ids: Tensor, n_experts: int, bm: int) -> tuple[Tensor, Tensor, int]:
    """Tiles of at most bm rows of one expert over the expert-sorted rows, on the device.

    Returns (tiles int32 [n_tiles, 3]: expert, first and end row in sorted order (tiles
    past the last routed one: expert 0 and no rows); perm: sorted row -> original row;
    n_tiles). n_tiles =
    S / bm + E bounds the tile count of any routing, so the launch needs no host sync.
    """
    S = ids.shape[0]
    ids_sorted, perm = torch.sort(ids.long())
    counts = torch.bincount(ids_sorted, minlength=n_experts)  # [E]
    first_row = torch.cumsum(counts, 0) - counts  # [E]
    tile_end = torch.cumsum((counts + bm - 1) // bm, 0)  # [E] cumulative tiles
    n_tiles = -(-S // bm) + n_experts
    t = torch.arange(n_tiles, device=ids.device)
    expert = torch.searchsorted(tile_end, t, right=True)  # [n_tiles]; E past the routed tiles
    valid = expert < n_experts
    e = expert.clamp(max=n_experts - 1)
    row0 = first_row[e] + (t - (tile_end[e] - (counts[e] + bm - 1) // bm)) * bm
    end = torch.where(valid, first_row[e] + counts[e], row0)
    tiles = torch.stack([torch.where(valid, e, 0), row0, end], 1).to(torch.int32)
    return tiles.contiguous(), perm.to(torch.int32).contiguous(), n_tiles


def _launch(x: Tensor, ids: Tensor | None, slot: Tensor, out_features: int, n_seg: int, group_size: int,
            buffers: list[Tensor | None], act_bits: int = 0) -> Tensor:
    """Runs the kernel; x [M, K] -> [M, out_features] in x's dtype (x already rounded for W+A:
    the wrappers call quantize_activations, so act_bits must be 0)."""
    assert act_bits == 0, f"{act_bits=}: round x with quantize_activations before the Triton op"
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
    shape = (M, K, R, K // group_size, group_size, n_seg, tiles)
    E = slot.shape[0] // n_seg
    if ids is None:
        bm = 16 if M >= 16 else triton.next_power_of_2(M)
        kernel[(triton.cdiv(M, bm), n_seg * tiles)](x, slot, slot, out, *args, slot, slot, *shape, HAS_IDS=False,
                                                     GROUPED=False, HAS_ZERO=has_zero, BM=bm, BN=_BN, BK=_BK)
    elif M <= E:  # decode: a program per routed row, no sorting
        ids = ids.to(torch.int32).contiguous()
        kernel[(M, n_seg * tiles)](x, ids, slot, out, *args, slot, slot, *shape, HAS_IDS=True, GROUPED=False,
                                   HAS_ZERO=has_zero, BM=1, BN=_BN, BK=_BK)
    else:  # prefill: tiles of BM rows of one expert (a grouped GEMM), each expert's tile read once per tile
        bm = min(16, triton.next_power_of_2(-(-M // E)))
        table, perm, n_tiles = _tile_table(ids, E, bm)
        kernel[(n_tiles, n_seg * tiles)](x, slot, slot, out, *args, table, perm, *shape, HAS_IDS=True, GROUPED=True,
                                         HAS_ZERO=has_zero, BM=bm, BN=_BN, BK=_BK)
    return out


# CPU too: under TRITON_INTERPRET=1 the same kernel runs on CPU tensors (the tests).
define_packed_ops("triton_", _launch, ("CUDA", "CPU"))


def triton_ok(x: Tensor, w: PackedWeight, rows: int | None) -> bool:
    """Whether the Triton kernels serve ``x`` times ``w``: CUDA tensors, inference.

    Static properties only (device, shapes, grad mode), so compiled models specialise on
    them without graph breaks.

    Args:
        x: the activations [..., K].
        w: the packed weight.
        rows: rows of x of a 2D weight (served up to MAX_ROWS: beyond, dequantizing the
            one weight for a cuBLAS GEMM wins); None for an experts bank, which the
            grouped kernel serves at any rows (a bank is never dequantized whole).

    Returns:
        True to call the Triton op, False for another path.
    """
    return (
        x.device.type == "cuda"
        and device_and_dtype(w)[0] == "cuda"
        and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and (rows is None or 1 <= rows <= MAX_ROWS)
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
    x = quantize_activations(x, w.act_bits)
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
    x = quantize_activations(x, w.act_bits)
    return torch.ops.moe_ao.triton_packed_experts_linear(x, ids, w.slot, w.logical_shape[1], w.n_seg, w.group_size,
                                                         buffers_of(w))
