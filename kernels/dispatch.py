"""The one choice of kernel for a product with a packed weight: Triton, C++ CPU, or reference.

- CUDA tensors: the Triton kernels where :func:`triton_packed.triton_ok` says so (2D
  weights up to ``triton_packed.MAX_ROWS`` rows, experts banks at any rows);
- CPU tensors: the C++ kernels, which fall back to their references themselves where
  ``cpu_packed.kernel_ok`` says no (gradients, dtypes the kernel does not take);
- anything else: the dequantize-then-matmul references (activations rounded first for
  W+A), which never build more than one expert's dense weight once rows exceed experts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from moe_ao.kernels import cpu_packed, triton_packed
from moe_ao.kernels._registry import device_and_dtype

if TYPE_CHECKING:  # typing only: kernels sit below tensors and never import them at runtime
    from moe_ao.tensors.packed import PackedWeight

__all__ = ["experts_linear", "linear"]


def linear(x: Tensor, w: PackedWeight) -> Tensor:
    """x [..., K] times a 2D packed weight [N, K] -> [..., N], in x's dtype."""
    if triton_packed.triton_ok(x, w, x.numel() // x.shape[-1]):
        return triton_packed.packed_linear(x, w)
    if x.device.type == "cpu":
        return cpu_packed.packed_linear(x, w)
    return cpu_packed.packed_linear_reference(x, w)


def experts_linear(x: Tensor, w: PackedWeight, ids: Tensor) -> Tensor:
    """Row s of x [S, K] times expert ids[s] of a 3D packed bank [E, N, K] -> [S, N], any S."""
    if triton_packed.triton_ok(x, w, None):
        return triton_packed.packed_experts_linear(x, w, ids)
    if device_and_dtype(w)[0] == "cpu":
        return cpu_packed.packed_experts_linear(x, w, ids)
    return cpu_packed.packed_experts_linear_reference(x, w, ids)
