"""ggml block formats, packed by moe_ao (its own code, written from the formats' definitions).

Shapes: R rows, K weights per row (the row is cut into blocks along K), n = K / block.

- Q8_0, blocks of 32: ``{fp16 d; int8 q[32]}`` (34 bytes), w = d * q.
- Q4_0, blocks of 32: ``{fp16 d; uint8 qs[16]}`` (18 bytes), w = d * (q - 8), weight j of
  the block in the low nibble of ``qs[j]`` for j < 16 and in the high nibble of ``qs[j - 16]``.
- Q3_K, super-blocks of 256 = 16 sub-blocks of 16: ``{uint8 hmask[32]; uint8 qs[64];
  uint8 scales[12]; fp16 d}`` (110 bytes), w = d * (s_j - 32) * q with q in [-4, 3] and 6-bit
  sub-block scales s_j.
- Q2_K, super-blocks of 256 = 16 sub-blocks of 16: ``{uint8 scales[16]; uint8 qs[64];
  fp16 d; fp16 dmin}`` (84 bytes), w = d * sc_j * q - dmin * m_j with q in [0, 3] and
  4-bit sc_j (low nibble) and m_j (high nibble).

In both K-quants weight i of a super-block sits in half h = i // 128 at r = i % 128, with
j = r // 32, t = (r % 32) // 16, l = r % 16: its two low bits in ``qs[32h + 16t + l]`` at bit
2j, and (Q3_K) its third bit in ``hmask[16t + l]`` at bit 4h + j.

moe_ao's symmetric codes (w = s * (q - 2^(b-1)), group size a multiple of 32) map onto
Q4_0 (b <= 4) and Q8_0 (b <= 8) exactly, up to rounding the scale to fp16; the K-quants
re-quantize moe_ao's dequantized weights (:func:`quantize_q2_k`, :func:`quantize_q3_k`).
"""

from __future__ import annotations

import torch

QK = 32  # Q4_0 / Q8_0 block
QK_K = 256  # K-quant super-block
SUB = 16  # K-quant sub-block
BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q3_K": 110, "Q2_K": 84}


def _fp16_bytes(d: torch.Tensor) -> torch.Tensor:
    """fp16 values [...] -> their little-endian bytes [..., 2]."""
    return d.to(torch.float16).contiguous().view(torch.uint8).reshape(*d.shape, 2)


def block_scales(scale: torch.Tensor, group_size: int, block: int = QK) -> torch.Tensor:
    """Group scales [R, K/group_size] -> one scale per block of ``block`` weights [R, K/block]."""
    assert group_size % block == 0, f"{group_size=} is not a multiple of {block=}"
    return scale.repeat_interleave(group_size // block, dim=-1)


def pack_q8_0(q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Signed codes int [R, K] in [-128, 127] and block scales [R, K/32] -> Q8_0 bytes [R, K/32*34]."""
    R, K = q.shape
    assert K % QK == 0 and -128 <= int(q.min()) and int(q.max()) <= 127, f"{q.shape=}"
    qs = q.to(torch.int8).reshape(R, K // QK, QK).view(torch.uint8)
    return torch.cat([_fp16_bytes(d), qs], dim=-1).reshape(R, -1)


def pack_q4_0(q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Unsigned codes [R, K] in [0, 15] (w = d * (q - 8)) and block scales [R, K/32] -> Q4_0 bytes."""
    R, K = q.shape
    assert K % QK == 0 and int(q.max()) <= 15 and int(q.min()) >= 0, f"{q.shape=}"
    blocks = q.to(torch.uint8).reshape(R, K // QK, QK)
    qs = blocks[..., :16] | (blocks[..., 16:] << 4)
    return torch.cat([_fp16_bytes(d), qs], dim=-1).reshape(R, -1)


def _superblocks(w: torch.Tensor) -> torch.Tensor:
    R, K = w.shape
    if K % QK_K:
        raise ValueError(f"K-quants need rows of a multiple of {QK_K} weights; got {K}")
    return w.to(torch.float32).reshape(R, K // QK_K, QK_K // SUB, SUB)  # [R, n, 16, 16]


def _low_bits(u: torch.Tensor) -> torch.Tensor:
    """2-bit values [..., 256] (super-block order) -> qs bytes [..., 64] (see module doc)."""
    x = u.to(torch.uint8).reshape(*u.shape[:-1], 2, 4, 2, 16)  # [..., h, j, t, l]
    shifted = x << (2 * torch.arange(4, dtype=torch.uint8)).reshape(4, 1, 1)
    return (shifted[..., 0, :, :] | shifted[..., 1, :, :] | shifted[..., 2, :, :] | shifted[..., 3, :, :]).reshape(
        *u.shape[:-1], 64)


def _best_scale(x: torch.Tensor, lo: int, hi: int, signed_max: bool) -> torch.Tensor:
    """Per sub-block scale minimising the squared error of round(x / s) clamped to [lo, hi].

    A small grid around the max-magnitude scale (x [..., 16] -> s [...]); no weighting.
    """
    if signed_max:  # map the largest-magnitude value onto the wider (negative) end, lo
        ref = x.gather(-1, x.abs().argmax(-1, keepdim=True)).squeeze(-1)
        base = ref / lo
    else:
        base = x.amax(-1) / hi
    best, best_err = base, None
    for f in torch.linspace(0.8, 1.2, 21):
        s = base * f
        safe = torch.where(s == 0, torch.ones_like(s), s)
        q = (x / safe.unsqueeze(-1)).round().clamp(lo, hi)
        err = ((q * s.unsqueeze(-1) - x) ** 2).sum(-1)
        if best_err is None:
            best_err = err
        else:
            better = err < best_err
            best, best_err = torch.where(better, s, best), torch.minimum(err, best_err)
    return best


def quantize_q3_k(w: torch.Tensor) -> torch.Tensor:
    """Q3_K bytes [R, K/256*110] of float weights w [R, K] (a requantization; K % 256 == 0)."""
    x = _superblocks(w)  # [R, n, 16, 16]
    s = _best_scale(x, -4, 3, signed_max=True)  # [R, n, 16] sub-block scales
    smax = s.gather(-1, s.abs().argmax(-1, keepdim=True)).squeeze(-1)  # [R, n]
    d = (smax / -32).to(torch.float16).to(torch.float32)
    safe_d = torch.where(d == 0, torch.ones_like(d), d)
    sc = (s / safe_d.unsqueeze(-1)).round().clamp(-32, 31)  # [R, n, 16]
    eff = (d.unsqueeze(-1) * sc).unsqueeze(-1)  # [R, n, 16, 1]
    q = torch.where(eff == 0, torch.zeros_like(x), x / torch.where(eff == 0, torch.ones_like(eff), eff))
    u = (q.round().clamp(-4, 3) + 4).to(torch.uint8).flatten(-2)  # [R, n, 256] in [0, 7]
    qs = _low_bits(u & 3)
    hbit = (u >> 2).reshape(*u.shape[:-1], 2, 4, 2, 16)  # [R, n, h, j, t, l]
    shifts = (torch.arange(2, dtype=torch.uint8).reshape(2, 1, 1, 1) * 4
              + torch.arange(4, dtype=torch.uint8).reshape(1, 4, 1, 1))
    hmask = (hbit << shifts).sum((-4, -3), dtype=torch.int32).to(torch.uint8).reshape(*u.shape[:-1], 32)
    S = (sc + 32).to(torch.uint8)  # [R, n, 16] 6-bit
    lo = S & 15
    first = lo[..., 0:4] | (lo[..., 8:12] << 4)
    second = lo[..., 4:8] | (lo[..., 12:16] << 4)
    hi = S >> 4
    third = hi[..., 0:4] | (hi[..., 4:8] << 2) | (hi[..., 8:12] << 4) | (hi[..., 12:16] << 6)
    scales = torch.cat([first, second, third], dim=-1)  # [R, n, 12]
    out = torch.cat([hmask, qs, scales, _fp16_bytes(d)], dim=-1)  # [R, n, 110]
    return out.reshape(w.shape[0], -1)


def quantize_q2_k(w: torch.Tensor) -> torch.Tensor:
    """Q2_K bytes [R, K/256*84] of float weights w [R, K] (a requantization; K % 256 == 0)."""
    x = _superblocks(w)  # [R, n, 16, 16]
    mn = x.amin(-1).clamp(max=0)  # [R, n, 16]; w = scale * q - m with m = -min >= 0
    s = _best_scale(x - mn.unsqueeze(-1), 0, 3, signed_max=False)  # [R, n, 16]
    d = (s.amax(-1) / 15).to(torch.float16).to(torch.float32)  # [R, n]
    dmin = ((-mn).amax(-1) / 15).to(torch.float16).to(torch.float32)
    one = torch.ones_like(d)
    sc = (s / torch.where(d == 0, one, d).unsqueeze(-1)).round().clamp(0, 15)
    m = (-mn / torch.where(dmin == 0, one, dmin).unsqueeze(-1)).round().clamp(0, 15)
    eff = (d.unsqueeze(-1) * sc).unsqueeze(-1)  # [R, n, 16, 1]
    off = (dmin.unsqueeze(-1) * m).unsqueeze(-1)
    q = torch.where(eff == 0, torch.zeros_like(x), (x + off) / torch.where(eff == 0, torch.ones_like(eff), eff))
    u = q.round().clamp(0, 3).to(torch.uint8).flatten(-2)  # [R, n, 256]
    scales = sc.to(torch.uint8) | (m.to(torch.uint8) << 4)  # [R, n, 16]
    out = torch.cat([scales, _low_bits(u), _fp16_bytes(d), _fp16_bytes(dmin)], dim=-1)  # [R, n, 84]
    return out.reshape(w.shape[0], -1)
