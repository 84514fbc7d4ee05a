"""Bit packing of integer codes along the last dimension.

One layout for every width: each run of 8 codes becomes ``bits`` bytes, code j of the
run sitting at bit offset ``bits * j`` of that little-endian 8·bits-bit word. For 2, 4
and 8 bits this is the familiar "codes little-endian within a byte" layout; for 3 bits
it packs 8 codes into 3 bytes, so 3-bit weights really take 3 bits. A last dimension
that is not a multiple of 8 is zero-padded (and trimmed again on unpack).

Everything is plain tensor arithmetic, so Inductor can fuse unpacking into consumers.
"""

from __future__ import annotations

import torch

PACK_RUN = 8  # codes per packed run: the smallest run that is whole bytes for every width


def packed_size(K: int, bits: int) -> int:
    """Bytes per row for K codes of ``bits`` bits."""
    return -(-K // PACK_RUN) * bits


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Packs uint8 codes [..., K] (values < 2**bits) into uint8 [..., ceil(K/8) * bits]."""
    assert 1 <= bits <= 8, f"{bits=}"
    K = codes.shape[-1]
    pad = -K % PACK_RUN
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    codes = codes.to(torch.uint8)
    if bits == 8:
        return codes.contiguous()
    if 8 % bits == 0:
        # 1, 2 and 4 bits: whole codes per byte, so pack bytewise without widening
        # (a fused experts bank can hold billions of codes).
        per_byte = 8 // bits
        lanes = codes.unflatten(-1, (-1, per_byte))  # [..., K/per_byte, per_byte]
        out = lanes[..., 0].clone()
        for j in range(1, per_byte):
            out |= lanes[..., j] << (bits * j)
        return out
    wide = torch.int32 if bits * PACK_RUN <= 31 else torch.int64
    runs = codes.to(wide).unflatten(-1, (-1, PACK_RUN))  # [..., K/8, 8]
    shifts = torch.arange(PACK_RUN, device=codes.device, dtype=wide) * bits
    word = (runs << shifts).sum(-1, keepdim=True, dtype=wide)  # [..., K/8, 1]
    byte_shifts = torch.arange(bits, device=codes.device, dtype=wide) * 8
    packed = (word >> byte_shifts) & 0xFF  # [..., K/8, bits]
    return packed.flatten(-2).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, K: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 [..., ceil(K/8) * bits] -> uint8 codes [..., K]."""
    assert 1 <= bits <= 8, f"{bits=}"
    assert packed.shape[-1] == packed_size(K, bits), f"{packed.shape=} {K=} {bits=}"
    if bits == 8:
        return packed[..., :K]
    mask = 2**bits - 1
    if 8 % bits == 0:
        # 1, 2 and 4 bits: whole codes per byte, unpacked bytewise (no wider temporaries).
        lanes = [(packed >> (bits * j)) & mask for j in range(8 // bits)]  # uint8 [..., Kb] each
        return torch.stack(lanes, -1).flatten(-2)[..., :K]
    # Other widths: a run's word (8 * bits bits) in int32 for 3 bits, int64 for 5-7 (unused by PackedWeight).
    wide = torch.int32 if bits * PACK_RUN <= 31 else torch.int64
    by = packed.to(wide).unflatten(-1, (-1, bits))  # [..., K/8, bits]
    byte_shifts = torch.arange(bits, device=packed.device, dtype=wide) * 8
    word = (by << byte_shifts).sum(-1, keepdim=True, dtype=wide)  # [..., K/8, 1]
    shifts = torch.arange(PACK_RUN, device=packed.device, dtype=wide) * bits
    codes = (word >> shifts) & mask  # [..., K/8, 8]
    return codes.flatten(-2)[..., :K].to(torch.uint8)
