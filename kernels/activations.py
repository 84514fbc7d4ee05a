"""Dynamic activation quantization for weight + activation (W+A) plans.

A packed weight whose plan asks for ``act_bits = 8`` multiplies activations rounded per
token (row of x) to symmetric int8: x ≈ s_m * q_m, s_m = max_k |x_mk| / 127, q in
[-127, 127] (the W8A8/W4A8 scheme of SmoothQuant and the QuantMoE-Bench W+A runs,
without smoothing). The kernels and their references call this same function first, so
both see the same rounded activations; it returns them dequantized, in x's dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["ACT_BITS", "quantize_activations"]

ACT_BITS = (None, 8)  # what a plan's act_bits may be: None keeps activations in the model dtype


def quantize_activations(x: Tensor, act_bits: int | None) -> Tensor:
    """x [..., K] rounded per token to symmetric ``act_bits``-bit integers, dequantized.

    Args:
        x: activations, any float dtype.
        act_bits: None (returns x itself) or 8.

    Returns:
        x, or its per-token int8 rounding in x's dtype (computed in float32).

    Raises:
        ValueError: act_bits is not one of ACT_BITS.
    """
    if act_bits is None:
        return x
    if act_bits != 8:
        raise ValueError(f"act_bits={act_bits!r} is not supported; allowed: {ACT_BITS}")
    qmax = 2 ** (act_bits - 1) - 1
    x32 = x.float()
    amax = x32.abs().amax(-1, keepdim=True)  # [..., 1]
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    q = torch.round(x32 / scale).clamp(-qmax, qmax)
    return (q * scale).to(x.dtype)
