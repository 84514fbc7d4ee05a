"""Group-wise integer quantization: the one numeric scheme every quantizer writes.

A weight W of shape [..., R, K] (R output rows, K input columns) is split along K
into groups of ``group_size`` columns. Each (row, group) has a scale s and an
integer zero point z, and each weight an unsigned code q in [0, 2**bits - 1]:

    W ≈ (q - z) * s

- symmetric: z = 2**(bits-1) for every group (so it is never stored) and
  s = 2 * max|W| / (2**bits - 1), the convention of GPTQ/AutoGPTQ and torchao.
- asymmetric: the range [min(W, 0), max(W, 0)] is spread over the 2**bits codes,
  z = round(-min / s), stored as uint8.

Scales are rounded to the storage dtype (the model's 16-bit dtype) *before*
codes are chosen, so that the codes are optimal for the scales actually stored.
RTN and GPTQ both use ``choose_qparams`` + ``quantize_with_qparams``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_BITS = (2, 3, 4, 8)


@dataclass
class QuantizedWeight:
    """Integer codes plus group parameters of one weight (or a stack of them).

    Shapes use R = rows (out features), K = in features, G = K // group_size.

    Attributes:
        codes: uint8 [..., R, K], values in [0, 2**bits - 1].
        scale: [..., R, G] in the storage dtype.
        zero: uint8 [..., R, G] for asymmetric, None for symmetric.
        bits: bit width.
        group_size: columns per group.
        act_bits: None, or 8 when the plan quantizes this unit's input activations per
            token to int8 (W+A); carried to the packed weight, unused by quantizers.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    bits: int
    group_size: int
    act_bits: int | None = None

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Returns the dequantized weight [..., R, K]."""
        return dequantize_codes(self.codes, self.scale, self.zero, self.bits, self.group_size, dtype)


def _check_args(W: torch.Tensor, bits: int, group_size: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} is not supported; allowed: {SUPPORTED_BITS}")
    K = W.shape[-1]
    if group_size <= 0 or K % group_size != 0:
        raise ValueError(f"group_size={group_size} must divide in_features={K}")


def choose_qparams(
    W: torch.Tensor, bits: int, group_size: int, symmetric: bool, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Min-max scale and zero point per (row, group).

    Args:
        W: weight [..., R, K] (any float dtype; computed in float32 or float64).
        bits: bit width in SUPPORTED_BITS.
        group_size: columns per group, must divide K.
        symmetric: symmetric (implicit zero) or asymmetric (stored zero).
        scale_dtype: dtype the scales are stored in.

    Returns:
        (scale [..., R, G] in scale_dtype, zero uint8 [..., R, G] or None).
    """
    _check_args(W, bits, group_size)
    work = torch.float64 if W.dtype == torch.float64 else torch.float32
    Wg = W.to(work).unflatten(-1, (-1, group_size))  # [..., R, G, group_size]
    maxq = 2**bits - 1
    if symmetric:
        amax = Wg.abs().amax(-1)
        scale = 2 * amax / maxq
        # An all-zero group gets scale 1: its codes all equal z, dequantizing to exact 0.
        scale = torch.where(amax == 0, torch.ones_like(scale), scale)
        return _storable(scale, scale_dtype), None
    wmin = Wg.amin(-1).clamp(max=0)
    wmax = Wg.amax(-1).clamp(min=0)
    scale = (wmax - wmin) / maxq
    scale = _storable(torch.where(scale == 0, torch.ones_like(scale), scale), scale_dtype)
    zero = torch.round(-wmin / scale.to(work)).clamp(0, maxq).to(torch.uint8)
    return scale, zero


def _storable(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """scale in ``dtype``; a positive scale too small for it (e.g. a float16 group of weights
    ~1e-7 at 8 bits) becomes the dtype's smallest value instead of 0, which would zero
    the whole group."""
    return scale.clamp(min=smallest_scale(dtype)).to(dtype)


def zero_point(zero: torch.Tensor | None, bits: int, like: torch.Tensor) -> torch.Tensor:
    """The zero point as a float tensor shaped like ``like`` (implicit for symmetric)."""
    if zero is None:
        return torch.full_like(like, 2 ** (bits - 1))
    return zero.to(like.dtype)


def quantize_with_qparams(
    W: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int, group_size: int
) -> torch.Tensor:
    """Rounds W to the nearest code under fixed group parameters.

    Args:
        W: weight [..., R, K], or a column block [..., R, k] whose columns all fall in
            one group when scale/zero are given as [..., R, 1].
        scale: [..., R, G] (or [..., R, 1] for a single-group block).
        zero: uint8 like scale, or None for symmetric.
        bits: bit width.
        group_size: columns per group of W.

    Returns:
        uint8 codes [..., R, K].
    """
    work = torch.float64 if W.dtype == torch.float64 else torch.float32
    s = scale.to(work).repeat_interleave(group_size, dim=-1)[..., : W.shape[-1]]
    z = zero_point(zero, bits, scale.to(work)).repeat_interleave(group_size, dim=-1)[..., : W.shape[-1]]
    q = torch.round(W.to(work) / s) + z
    return q.clamp(0, 2**bits - 1).to(torch.uint8)


def dequantize_codes(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    bits: int,
    group_size: int,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """(q - z) * s, group-wise. Returns [..., R, K] in ``dtype`` (default: scale's)."""
    dtype = dtype or scale.dtype
    q = codes.unflatten(-1, (-1, group_size)).to(scale.dtype)  # [..., R, G, group]
    z = zero_point(zero, bits, scale).unsqueeze(-1)
    return ((q - z) * scale.unsqueeze(-1)).flatten(-2).to(dtype)


def scale_dtype_for(stored: torch.dtype) -> torch.dtype:
    """Scales are stored in the model's 16-bit dtype; float32/64 models get float32 scales."""
    return stored if stored in (torch.bfloat16, torch.float16) else torch.float32


def check_finite(W: torch.Tensor, name: str) -> None:
    """Raises ValueError naming the unit when W holds NaN or Inf."""
    if not torch.isfinite(W).all():
        bad = (~torch.isfinite(W)).sum().item()
        raise ValueError(f"{name}: weight has {bad} NaN/Inf values; cannot quantize it")


def check_finite_params(model, prefix: str = "") -> None:
    """Raises ValueError naming the first parameter or buffer of ``model`` holding NaN/Inf.

    Calibration runs every layer, so one non-finite weight anywhere (planned or not)
    poisons the Hessians of every unit it feeds. Tensors on the meta device (not loaded
    yet, in a streamed model) are skipped. ``prefix`` is prepended to the names.
    """
    for name, t in [*model.named_parameters(prefix), *model.named_buffers(prefix)]:
        if t.is_floating_point() and not t.is_meta and not torch.isfinite(t).all():
            bad = (~torch.isfinite(t)).sum().item()
            raise ValueError(f"{name}: {bad} NaN/Inf values; calibration runs through it, so the Hessians of the "
                             f"units it feeds would not be finite")


def smallest_scale(dtype: torch.dtype) -> float:
    """The smallest positive value ``dtype`` holds (its smallest subnormal)."""
    info = torch.finfo(dtype)
    return info.smallest_normal * info.eps


def rtn_quantize(
    W: torch.Tensor, bits: int, group_size: int, symmetric: bool, scale_dtype: torch.dtype
) -> QuantizedWeight:
    """Round-to-nearest quantization of W [..., R, K] with min-max group parameters."""
    scale, zero = choose_qparams(W, bits, group_size, symmetric, scale_dtype)
    codes = quantize_with_qparams(W, scale, zero, bits, group_size)
    return QuantizedWeight(codes, scale, zero, bits, group_size)
