"""The quantization step shared by GPTQ and the sensitivity measurements: many units at once.

Units with a Hessian get GPTQ, batched into one ``gptq_quantize`` call per weight shape
and spec (e.g. all gate/up slices of a layer's experts at one width); units without one
(rare experts, see ``LayerObserver.hessian_or_fallback``) get RTN.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

import torch

from moe_ao.plans import QuantSpec
from moe_ao.primitives import QuantizedWeight, rtn_quantize
from moe_ao.quant.gptq import gptq_quantize

__all__ = ["quantize_units"]


def quantize_units(
    weights: Mapping[str, torch.Tensor],
    specs: Mapping[str, QuantSpec],
    hessians: Mapping[str, torch.Tensor],
    scale_dtype: torch.dtype,
    *,
    damp: float = 0.01,
    blocksize: int = 128,
    act_order: bool = True,
) -> tuple[dict[str, QuantizedWeight], dict[str, float]]:
    """Quantizes every unit of ``weights`` by its spec.

    Args:
        weights: unit name -> weight [R, K].
        specs: unit name -> its quantized spec.
        hessians: unit name -> mean input Hessian [K, K]; units without one get RTN.
        scale_dtype: dtype the scales are stored in.
        damp, blocksize, act_order: GPTQ options.

    Returns:
        (unit name -> codes and scales, unit name -> GPTQ loss for the GPTQ units).
    """
    results: dict[str, QuantizedWeight] = {}
    losses: dict[str, float] = {}
    batches: dict[tuple, list[str]] = defaultdict(list)
    for name, W in weights.items():
        spec = specs[name]
        if name in hessians:
            batches[(tuple(W.shape), spec)].append(name)
        else:
            results[name] = rtn_quantize(W, spec.bits, spec.group_size, spec.symmetric, scale_dtype)
    for (_, spec), names in batches.items():
        Ws = torch.stack([weights[n] for n in names])  # [B, R, K]
        Hs = torch.stack([hessians[n] for n in names])  # [B, K, K]
        q, stats = gptq_quantize(Ws, Hs, bits=spec.bits, group_size=spec.group_size, symmetric=spec.symmetric,
                                 scale_dtype=scale_dtype, damp=damp, blocksize=blocksize, act_order=act_order)
        for i, n in enumerate(names):
            results[n] = QuantizedWeight(q.codes[i], q.scale[i], None if q.zero is None else q.zero[i], q.bits,
                                         q.group_size)
            losses[n] = float(stats.loss[i])
    return results, losses
