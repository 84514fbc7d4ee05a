"""Assemble per-unit quantization results into packed parameter tensors.

Quantizers produce one :class:`QuantizedWeight` per unit; a stored parameter may hold
many units (a fused experts bank holds 3·E of them). ``pack_param`` turns the results
of one parameter's units into its ``PackedWeight`` (units not quantized stay as float
slices) and measures each unit's relative error, so callers can drop the unpacked
codes right away: memory stays bounded by one parameter's codes, not the model's.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from moe_ao.discovery import packed_shape, unit_weight
from moe_ao.primitives import QuantizedWeight, dequantize_codes
from moe_ao.tensors.packed import PackedWeight
from moe_ao.unit import Unit

logger = logging.getLogger(__name__)

HIGH_ERROR = 0.9  # relative error from which a unit counts as lost (2-bit RTN of Gaussian weights: ~0.5)


def units_by_param(all_units: Iterable[Unit]) -> dict[str, list[Unit]]:
    """Units grouped by the parameter that stores them, in model order."""
    out: dict[str, list[Unit]] = defaultdict(list)
    for u in all_units:
        out[u.param].append(u)
    return out


def pack_param(
    model: nn.Module, fqn: str, param_units: list[Unit], results: Mapping[str, QuantizedWeight]
) -> tuple[PackedWeight, dict[str, float]]:
    """Packs one parameter; returns it with {unit name: relative error} of its quantized units.

    Args:
        model: the float model (read only).
        fqn: the parameter's name.
        param_units: every unit stored in that parameter.
        results: quantized units (others are kept as float slices).
    """
    param = model.get_parameter(fqn)
    shape = packed_shape(param, param_units)
    if param_units[0].fused:
        n_seg = max(u.segment for u in param_units) + 1
        by_slot = {(u.expert, u.segment): u for u in param_units}
        R = shape[-2] // n_seg
        # Slices without a unit (LongCat's zero-compute experts in gate_up_proj) stay in float.
        order = [by_slot.get((e, g)) or (e, g) for e in range(shape[0]) for g in range(n_seg)]
    else:
        n_seg, order, R = 1, param_units, None
    slices, errors = [], {}
    act_bits = {results[u.name].act_bits for u in param_units if u.name in results}
    if len(act_bits) > 1:
        raise ValueError(f"{fqn}: the units stored in this parameter ask for different act_bits "
                         f"{sorted(act_bits, key=str)}; one packed tensor quantizes its activations one way")
    for u in order:
        if isinstance(u, tuple):
            assert param_units[0].layout == "rows", f"{fqn=} {param_units[0].layout=}"
            slices.append(param[u[0]][u[1] * R:(u[1] + 1) * R].detach())
            continue
        W = unit_weight(model, u).detach()
        q = results.get(u.name)
        if q is None:
            slices.append(W)
            continue
        slices.append(q)
        # In float32 from the stored scales: exact, and able to show values the model dtype overflows on.
        Wf, Wq = W.float(), dequantize_codes(q.codes, q.scale.float(), q.zero, q.bits, q.group_size)
        _check_storable(u, Wq, param.dtype)
        errors[u.name] = ((Wq - Wf).norm() / Wf.norm().clamp_min(1e-12)).item()
    packed = PackedWeight.from_slices(slices, shape, n_seg, param.dtype,
                                      act_bits=next(iter(act_bits), None))
    return packed, errors


def _check_storable(u: Unit, Wq: torch.Tensor, dtype: torch.dtype) -> None:
    """Refuses a unit whose dequantized weights the model's dtype cannot hold (they would be inf).

    Symmetric codes reach -2**(bits-1) steps, i.e. up to 2**bits / (2**bits - 1) of the
    group's max |w| (4/3 of it at 2 bits), which overflows float16 near its limit.
    """
    if not dtype.is_floating_point or dtype.itemsize >= 4:
        return
    peak = Wq.abs().max().item() if Wq.numel() else 0.0
    if not torch.isfinite(Wq.to(dtype)).all():
        raise ValueError(f"{u.name}: its dequantized weights reach |w| = {peak:.6g}, beyond {dtype}'s largest value "
                         f"{torch.finfo(dtype).max:.6g} (they would be inf); quantize a bfloat16 or float32 copy, or "
                         f"give this unit more bits")


def record_units(report, todo: list[Unit], results: Mapping[str, QuantizedWeight], errors: Mapping[str, float]) -> None:
    """Adds per-unit lines (kind, bits, relative error) to a report's ``quantized`` dict.

    Units whose relative error reaches HIGH_ERROR (their weights are mostly lost, e.g.
    below what the scale dtype resolves) are also listed in ``report.extra["high_error"]``
    and logged: nothing is dropped without saying so.
    """
    for u in todo:
        err = errors[u.name]
        report.quantized[u.name] = {"kind": u.kind, "bits": results[u.name].bits, "rel_error": round(err, 6)}
        if not err < HIGH_ERROR:
            report.extra.setdefault("high_error", {})[u.name] = round(err, 6)
            logger.warning("%s: relative weight error %.3f at %d bits", u.name, err, results[u.name].bits)
