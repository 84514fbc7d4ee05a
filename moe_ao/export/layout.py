"""What both exporters read from a quantized model: each unit's codes, and on-disk names.

Shapes: R rows (out features), K in features, G = K / group_size groups per row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moe_ao.discovery import unit_weight
from moe_ao.tensors.packed import PackedWeight
from moe_ao.tensors.packing import unpack_codes
from moe_ao.unit import Unit


@dataclass
class UnitCodes:
    """One unit as stored: packed codes plus group parameters, or a float weight.

    Attributes:
        bits: 2, 3, 4, 8, or 16 for a float unit.
        packed: uint8 [R, K*bits/8] codes in moe_ao's packing (None at 16 bits).
        scale: [R, G] scales in the model dtype (None at 16 bits).
        zero: uint8 [R, G] zero points (asymmetric), else None.
        group_size: columns per group.
        dense: the float weight [R, K] (16 bits), else None.
        shape: (R, K).
    """

    bits: int
    packed: torch.Tensor | None
    scale: torch.Tensor | None
    zero: torch.Tensor | None
    group_size: int
    dense: torch.Tensor | None
    shape: tuple[int, int]

    def codes(self) -> torch.Tensor:
        """uint8 codes [R, K] (quantized units only)."""
        assert self.packed is not None, f"{self.bits=}"
        return unpack_codes(self.packed, self.bits, self.shape[1])

    def dequantize(self) -> torch.Tensor:
        """The weight [R, K] exactly as moe_ao computes with it."""
        if self.dense is not None:
            return self.dense
        q = self.codes().unflatten(-1, (-1, self.group_size)).to(self.scale.dtype)
        z = (self.zero.to(self.scale.dtype) if self.zero is not None
             else torch.full_like(self.scale, 2 ** (self.bits - 1)))
        return ((q - z.unsqueeze(-1)) * self.scale.unsqueeze(-1)).flatten(-2)


def unit_codes(model: nn.Module, unit: Unit) -> UnitCodes:
    """The stored form of ``unit`` (one slice of its packed parameter, or its float weight)."""
    param = model.get_parameter(unit.param)
    if not isinstance(param, PackedWeight):
        w = unit_weight(model, unit).detach()
        return UnitCodes(16, None, None, None, unit.shape[1], w, unit.shape)
    index = (unit.expert or 0) * param.n_seg + unit.segment if unit.fused else 0
    bits, row, _ = (int(v) for v in param.slot[index])
    if bits == 16:
        return UnitCodes(16, None, None, None, unit.shape[1], param.d16[row], unit.shape)
    zero = getattr(param, f"z{bits}")
    return UnitCodes(bits, getattr(param, f"q{bits}")[row], getattr(param, f"s{bits}")[row],
                     None if zero is None else zero[row], param.group_size, None, unit.shape)


def disk_names(model: nn.Module) -> dict[tuple[str, int | None, int], str]:
    """Where each weight goes in a transformers checkpoint (``save_pretrained``'s names).

    transformers 5 stores experts fused in memory and writes them per expert on disk
    (Mixtral: ``block_sparse_moe.experts.3.w1.weight``), reversing its load-time
    conversions. Here those reversals run on marker tensors whose values encode
    (parameter, expert, row), so the names come from transformers' own mapping for any
    architecture and each is traced back exactly.

    Returns:
        (param FQN, expert or None, first row) -> on-disk key.
    """
    from transformers.core_model_loading import revert_weight_conversion

    names = list(model.state_dict(keep_vars=True).items())
    markers: dict[str, torch.Tensor] = {}
    for i, (name, t) in enumerate(names):
        base = float(i * _MARK)
        if t.ndim == 3:  # [E, N, 1]: value = base + e * N + row
            markers[name] = base + torch.arange(t.shape[0] * t.shape[1], dtype=torch.float64).reshape(*t.shape[:2], 1)
        else:
            markers[name] = torch.full((1,), base, dtype=torch.float64)
    out: dict[tuple[str, int | None, int], str] = {}
    # A model from from_pretrained carries the conversions its load used; a moe_ao
    # checkpoint is stored fused, so those would keep experts fused. Use the default mapping.
    loaded = model.__dict__.pop("_weight_conversions", None)
    try:
        reverted = revert_weight_conversion(model, markers)
    finally:
        if loaded is not None:
            model._weight_conversions = loaded
    for key, marker in reverted.items():
        value = int(marker.flatten()[0])
        name, t = names[value // _MARK]
        if t.ndim == 3:
            e, row = divmod(value % _MARK, t.shape[1])
            out[(name, e, row)] = key
        else:
            out[(name, None, 0)] = key
    return out


_MARK = 2**32  # marker values: parameter index * _MARK + offset (exact in float64)
