"""The quantization step shared by GPTQ and the sensitivity measurements: many units at once.

Units with a Hessian get GPTQ, batched into one ``gptq_quantize`` call per weight shape
and spec (e.g. all gate/up slices of a layer's experts at one width); units without one
(rare experts, see ``LayerObserver.hessian_or_fallback``) get RTN.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import replace

import torch

from moe_ao.plans import QuantSpec
from moe_ao.primitives import QuantizedWeight, rtn_quantize
from moe_ao.quant.gptq import gptq_quantize

__all__ = ["quantize_units"]

BATCH_BYTES = 256 * 2**20
GPTQ_COPIES = 4  # rough count of [K, K] and [R, K] float32 arrays gptq_quantize holds per unit


def quantize_units(
    weights: Mapping[str, torch.Tensor],
    specs: Mapping[str, QuantSpec],
    hessians: Mapping[str, torch.Tensor],
    scale_dtype: torch.dtype,
    *,
    damp: float = 0.01,
    blocksize: int = 128,
    act_order: bool = True,
    batch_bytes: int = BATCH_BYTES,
) -> tuple[dict[str, QuantizedWeight], dict[str, float]]:
    """Quantizes every unit of ``weights`` by its spec.

    Args:
        weights: unit name -> weight [R, K].
        specs: unit name -> its quantized spec.
        hessians: unit name -> mean input Hessian [K, K]; units without one get RTN.
        scale_dtype: dtype the scales are stored in.
        damp, blocksize, act_order: GPTQ options.
        batch_bytes: working memory one batched GPTQ call may take; larger batches are
            split (the 120 gate/up slices of a Qwen1.5-MoE layer would otherwise stack 4 GB
            of Hessians and inverses at once).

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
            q = rtn_quantize(W, spec.bits, spec.group_size, spec.symmetric, scale_dtype)
            results[name] = replace(q, act_bits=spec.act_bits)
    for (shape, spec), names in batches.items():
        R, K = shape
        per_unit = 4 * GPTQ_COPIES * (K * K + R * K)  # float32 H, its inverse and their work copies; W, Q, errors
        step = max(1, batch_bytes // per_unit)
        for start in range(0, len(names), step):
            chunk = names[start : start + step]
            Ws = torch.stack([weights[n] for n in chunk])  # [B, R, K]
            Hs = torch.stack([hessians[n] for n in chunk])  # [B, K, K]
            q, stats = gptq_quantize(Ws, Hs, bits=spec.bits, group_size=spec.group_size, symmetric=spec.symmetric,
                                     scale_dtype=scale_dtype, damp=damp, blocksize=blocksize, act_order=act_order)
            for i, n in enumerate(chunk):
                results[n] = QuantizedWeight(q.codes[i], q.scale[i], None if q.zero is None else q.zero[i], q.bits,
                                             q.group_size, spec.act_bits)
                losses[n] = float(stats.loss[i])
            del Ws, Hs, q
    return results, losses
