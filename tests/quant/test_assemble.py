"""pack_param and W+A plans: act_bits travels from the plan to the packed tensors and back.

A W4A8 plan quantizes weights to 4 bits and, at run time, every quantized unit's input
activations per token to int8; the packed linear then equals the float64-free reference
F.linear(quantize_activations(x), dequantized W).
"""

from __future__ import annotations

import archs
import pytest
import torch
import torch.nn.functional as F

import moe_ao
from moe_ao.kernels.activations import quantize_activations
from moe_ao.plans import Plan
from moe_ao.tensors.packed import PackedWeight


def w4a8(model, **overrides) -> Plan:
    units = {u.name: 4 for u in moe_ao.units(model) if u.kind in ("expert", "attention")}
    return Plan(units | overrides, group_size=32, act_bits=8)


@torch.no_grad()
def test_w4a8_plan_packs_act_bits_and_round_trips(tmp_path):
    model = archs.build("mixtral", torch.float32)
    moe_ao.quantize_(model, w4a8(model))
    packed = [m for m in model.parameters() if isinstance(m, PackedWeight)]
    assert packed and all(p.act_bits == 8 for p in packed)
    q_proj = model.model.layers[0].self_attn.q_proj
    x = torch.randn(5, q_proj.in_features)
    torch.testing.assert_close(q_proj(x), F.linear(quantize_activations(x, 8), q_proj.weight.dequantize()),
                               rtol=1e-5, atol=1e-5)
    ids = torch.randint(0, archs.VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    before = model(ids).logits
    loaded = moe_ao.load_quantized(moe_ao.save_quantized(model, tmp_path / "ckpt"))
    assert all(p.act_bits == 8 for p in loaded.parameters() if isinstance(p, PackedWeight))
    assert torch.equal(loaded(ids).logits, before)


def test_units_of_one_fused_tensor_share_act_bits():
    model = archs.build("mixtral", torch.float32)
    name = next(u.name for u in moe_ao.units(model) if u.kind == "expert" and u.expert == 1)
    plan = w4a8(model, **{name: {"bits": 4, "act_bits": None}})
    with pytest.raises(ValueError, match="same group_size, symmetric and act_bits"):
        moe_ao.quantize_(model, plan)
