"""The Triton kernel behind ``moe_ao.kernels.triton_packed`` (see its docstring).

Imported only at first use: ``triton.jit`` reads ``TRITON_INTERPRET`` when it decorates,
and Triton is an optional dependency. Shapes as in ``triton_packed``.
"""

import triton
import triton.language as tl


@triton.jit
def _dequant(q_ptr, s_ptr, z_ptr, d_ptr, pos, r, k, R, K, G, GS, BITS: tl.constexpr, HAS_ZERO: tl.constexpr):
    """The slice's rows r [BN] x columns k [BK], dequantized to fp32 [BN, BK]."""
    row = pos * R + r  # [BN] row of the width's buffer
    inside = (r < R)[:, None] & (k < K)[None, :]
    if BITS == 16:
        return tl.load(d_ptr + row[:, None] * K + k[None, :], mask=inside, other=0.0).to(tl.float32)
    Kb = (K + 7) // 8 * BITS  # packed bytes per row
    bit = (k % 8) * BITS
    byte = (k // 8) * BITS + bit // 8  # [BK]
    at = q_ptr + row[:, None] * Kb + byte[None, :]
    word = tl.load(at, mask=inside, other=0).to(tl.int32)
    if BITS == 3:  # may straddle into the next byte (the run's 3 bytes keep it in the row)
        word = word | (tl.load(at + 1, mask=inside & (byte + 1 < Kb)[None, :], other=0).to(tl.int32) << 8)
    code = ((word >> (bit % 8)[None, :]) & ((1 << BITS) - 1)).to(tl.float32)
    g = row[:, None] * G + (k // GS)[None, :]  # [BN, BK] group of each weight
    scale = tl.load(s_ptr + g, mask=inside, other=0.0).to(tl.float32)
    if HAS_ZERO:
        zero = tl.load(z_ptr + g, mask=inside, other=0).to(tl.float32)
    else:
        zero = 2.0 ** (BITS - 1)
    return (code - zero) * scale

@triton.jit
def packed_mm_kernel(x_ptr, ids_ptr, slot_ptr, out_ptr,
              q2, s2, z2, q3, s3, z3, q4, s4, z4, q8, s8, z8, d16,
              tiles_ptr, perm_ptr,
              M, K, R, G, GS, n_seg, tiles_per_slice,
              HAS_IDS: tl.constexpr, GROUPED: tl.constexpr, HAS_ZERO: tl.constexpr,
              BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """out[m, n] = x[m] . W[expert of m][n]. Program (pid_m, pid_n) computes BM rows of x times
    BN rows of one slice: rows pid_m*BM.. (2D weights), row pid_m and its expert (HAS_IDS,
    BM = 1), or with GROUPED the rows of tile pid_m of the expert-sorted order (tiles_ptr:
    int32 [tiles, 3] of expert, first row, end row; perm_ptr: sorted -> original row)."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    seg = pid_n // tiles_per_slice
    r = (pid_n % tiles_per_slice) * BN + tl.arange(0, BN)  # [BN] rows of the slice
    if GROUPED:
        expert = tl.load(tiles_ptr + pid_m * 3)
        row0 = tl.load(tiles_ptr + pid_m * 3 + 1)
        row_end = tl.load(tiles_ptr + pid_m * 3 + 2)
        sorted_rows = row0 + tl.arange(0, BM)  # [BM]
        m_ok = sorted_rows < row_end  # tiles past the routed ones have no rows
        m = tl.load(perm_ptr + sorted_rows, mask=m_ok, other=0)  # [BM] rows of x and out
    else:
        m = pid_m * BM + tl.arange(0, BM)  # [BM] rows of x
        m_ok = m < M
        expert = tl.load(ids_ptr + pid_m) if HAS_IDS else 0  # HAS_IDS launches BM = 1
    sl = expert * n_seg + seg
    bits = tl.load(slot_ptr + sl * 3)
    pos = tl.load(slot_ptr + sl * 3 + 1)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        k = k0 + tl.arange(0, BK)  # [BK]
        xk = tl.load(x_ptr + m[:, None] * K + k[None, :], mask=m_ok[:, None] & (k < K)[None, :],
                     other=0.0).to(tl.float32)  # [BM, BK]
        if bits == 2:
            w = _dequant(q2, s2, z2, d16, pos, r, k, R, K, G, GS, 2, HAS_ZERO)
        elif bits == 3:
            w = _dequant(q3, s3, z3, d16, pos, r, k, R, K, G, GS, 3, HAS_ZERO)
        elif bits == 4:
            w = _dequant(q4, s4, z4, d16, pos, r, k, R, K, G, GS, 4, HAS_ZERO)
        elif bits == 8:
            w = _dequant(q8, s8, z8, d16, pos, r, k, R, K, G, GS, 8, HAS_ZERO)
        else:
            w = _dequant(q8, s8, z8, d16, pos, r, k, R, K, G, GS, 16, HAS_ZERO)
        if BM >= 16:
            acc += tl.dot(xk, tl.trans(w), input_precision="ieee")
        else:
            acc += tl.sum(xk[:, None, :] * w[None, :, :], axis=2)
    n = seg * R + r
    tl.store(out_ptr + m[:, None] * (n_seg * R) + n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & (r < R)[None, :])
