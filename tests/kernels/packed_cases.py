"""Shared cases for the packed-kernel tests: random slices and banks, and the float64 check.

Codes are drawn uniformly over the whole range (not from RTN) so every code value, the
highest bits of each packed word included, reaches a kernel. The reference dequantizes
from those codes in float64, independently of ``moe_ao.tensors.packing``.

Tolerance: a kernel sums in fp32 in another order than the reference, so an output may
be off by a few fp32 ulps of the *magnitudes* summed, not of the result (sum q x and
z sum x nearly cancel). ``bound`` = sum_k (q + z) s |x| bounds those magnitudes; 1e-5 of
it allows ~K/8 ulps. A wrong code, scale or group is off by O(s |x|) instead, 10^3 times more.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moe_ao.primitives import QuantizedWeight
from moe_ao.tensors.packed import PackedWeight

FP32_TOL = 1e-5
# rounding the fp32 result to the output dtype
OUT_ULP = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-10}


def random_slice(R: int, K: int, bits: int, group_size: int, symmetric: bool, dtype: torch.dtype,
                 g: torch.Generator) -> QuantizedWeight | torch.Tensor:
    """One slice [R, K]: uniform codes, positive scales, uniform zeros; or a float slice."""
    if bits == 16:
        return torch.randn(R, K, generator=g).to(dtype)
    G = K // group_size
    codes = torch.randint(0, 2**bits, (R, K), generator=g, dtype=torch.uint8)
    scale = (torch.rand(R, G, generator=g) + 0.05).to(dtype)
    zero = None if symmetric else torch.randint(0, 2**bits, (R, G), generator=g, dtype=torch.uint8)
    return QuantizedWeight(codes, scale, zero, bits, group_size)


def dequant64(s: QuantizedWeight | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, |q| + |z| magnitudes times s) of one slice in float64, [R, K] each."""
    if not isinstance(s, QuantizedWeight):
        return s.double(), s.double().abs()
    q = s.codes.double().unflatten(-1, (-1, s.group_size))  # [R, G, g]
    z = torch.full_like(s.scale, 2 ** (s.bits - 1), dtype=torch.float64) if s.zero is None else s.zero.double()
    scale = s.scale.double().unsqueeze(-1)
    return ((q - z.unsqueeze(-1)) * scale).flatten(-2), ((q + z.unsqueeze(-1)) * scale).flatten(-2)


def assert_matches(y: torch.Tensor, x: torch.Tensor, W: torch.Tensor, mag: torch.Tensor,
                   out_ulp: dict[torch.dtype, float] = OUT_ULP, group_size: int | None = None) -> None:
    """y [M, N] vs x [M, K] @ W.T in float64, W/mag [M or 1, N, K].

    With ``group_size``, a kernel may also round x to 16-bit fixed point per group of that
    size (the CPU kernel's integer path): |δx| <= max|x_g| / 65534 adds Σ_k |W_k| |δx_k|.
    """
    x64 = x.double()
    ref = torch.einsum("mk,mnk->mn", x64, W.expand(x.shape[0], -1, -1))
    bound = torch.einsum("mk,mnk->mn", x64.abs(), mag.expand(x.shape[0], -1, -1))
    err = (y.double() - ref).abs()
    allowed = FP32_TOL * bound + out_ulp[y.dtype] * ref.abs() + 1e-30
    if group_size is not None:
        g = x64.abs().unflatten(-1, (-1, group_size)).amax(-1, keepdim=True)  # [M, G, 1]
        dx = g.expand(-1, -1, group_size).flatten(-2) / 65534  # [M, K]
        allowed = allowed + torch.einsum("mk,mnk->mn", dx, W.abs().expand(x.shape[0], -1, -1))
    assert y.dtype == x.dtype and y.shape == ref.shape
    assert (err <= allowed).all(), f"max err/allowed {(err / allowed).max().item():.3g}"


def mixed_bank(E: int, n_seg: int, R: int, K: int, group_size: int, symmetric: bool, dtype: torch.dtype,
               seed: int = 0) -> tuple[PackedWeight, torch.Tensor, torch.Tensor]:
    """A 3D bank [E, n_seg*R, K] whose slices cycle through 2, 3, 4, 8 and 16 bits."""
    g = torch.Generator().manual_seed(seed)
    widths = (2, 3, 4, 8, 16, 2, 4)
    slices = [random_slice(R, K, widths[i % len(widths)], group_size, symmetric, dtype, g) for i in range(E * n_seg)]
    w = PackedWeight.from_slices(slices, (E, n_seg * R, K), n_seg, dtype)
    deq = [dequant64(s) for s in slices]
    W = torch.stack([d[0] for d in deq]).reshape(E, n_seg * R, K)
    mag = torch.stack([d[1] for d in deq]).reshape(E, n_seg * R, K)
    return w, W, mag


class OpCalls(TorchDispatchMode):
    """Records the moe_ao ops that run while active (``names``), in call order."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "moe_ao":
            self.names.append(func._opname)
        return func(*args, **(kwargs or {}))
