"""Numerics that used to fail without a word: float16 limits, non-finite Hessians, bad ids, commit failures."""

from __future__ import annotations

from itertools import chain

import archs
import pytest
import torch

import moe_ao
from moe_ao import experts as experts_impl
from moe_ao.discovery import unit_weight
from moe_ao.plans import Plan
from moe_ao.quant import assemble


def _untouched(model, snap, impl) -> bool:
    now = dict(chain(model.named_parameters(), model.named_buffers()))
    same = all(now[n] is t and torch.equal(t.view(torch.uint8), c.view(torch.uint8)) for n, (t, c) in snap.items())
    return (now.keys() == snap.keys() and same
            and moe_ao.quantized_plan(model) is None and model.config._experts_implementation == impl)


def _snapshot(model):
    return {n: (t, t.detach().clone()) for n, t in chain(model.named_parameters(), model.named_buffers())}


def _expert(model, i: int = 0):
    return [u for u in moe_ao.units(model) if u.kind == "expert"][i]


def test_float16_overflow_of_dequantized_weights_is_refused():
    """2-bit symmetric codes reach -2 steps = 4/3 of max|w|: 80000 for -60000, beyond float16's 65504."""
    model = archs.build("mixtral", torch.float16)
    victim = _expert(model, 5)
    with torch.no_grad():
        unit_weight(model, victim)[2, 7] = -60000.0
    snap, impl = _snapshot(model), model.config._experts_implementation
    with pytest.raises(ValueError, match=rf"{victim.name}: its dequantized weights reach \|w\| = 80000.*float16"):
        moe_ao.quantize_(model, Plan({victim.name: 2}, group_size=32))
    assert _untouched(model, snap, impl)
    moe_ao.quantize_(model, Plan({victim.name: 8}, group_size=32))  # 8 bits: 128/127 of it fits
    assert torch.isfinite(model.get_parameter(victim.param).dequantize()).all()


def test_float16_tiny_weights_keep_nonzero_scales():
    """Weights ~1e-7 at 8 bits: their min-max scales underflow float16; the smallest float16 is kept instead."""
    model = archs.build("mixtral", torch.float16)
    victim = _expert(model, 2)
    W = unit_weight(model, victim)
    with torch.no_grad():
        W.copy_(torch.randn(W.shape, generator=torch.Generator().manual_seed(0)) * 1e-7)
    original = W.detach().float().clone()
    moe_ao.quantize_(model, Plan({victim.name: 8}, group_size=32))
    packed = model.get_parameter(victim.param)
    assert packed.s8.min() > 0 and packed.s8.min() == torch.finfo(torch.float16).smallest_normal * 2**-10
    Wq = packed.dequantize_experts(torch.tensor([victim.expert]))[0][slice(*victim.rows)].float()
    assert Wq.abs().sum() > 0
    err = ((Wq - original).norm() / original.norm()).item()
    assert moe_ao.quantization_report(model).quantized[victim.name]["rel_error"] == pytest.approx(err, rel=1e-4)
    assert err < 0.5  # float16 itself resolves these weights to ~6e-8


def test_lossy_units_are_listed_and_logged(monkeypatch, caplog):
    monkeypatch.setattr(assemble, "HIGH_ERROR", 0.0)
    model = archs.build("mixtral")
    victim = _expert(model)
    moe_ao.quantize_(model, Plan({victim.name: 2}, group_size=32))
    report = moe_ao.quantization_report(model)
    assert set(report.extra["high_error"]) == {victim.name}
    assert f"{victim.name}: relative weight error" in caplog.text


def test_gptq_names_the_non_finite_parameter_upstream():
    model = archs.build("mixtral")
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[3] = float("nan")
    snap, impl = _snapshot(model), model.config._experts_implementation
    ids = torch.randint(0, archs.VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    plan = Plan({_expert(model).name: 4}, group_size=32)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.input_layernorm\.weight: 1 NaN/Inf values"):
        moe_ao.quantize_(model, plan, method="gptq", calibration=ids)
    assert _untouched(model, snap, impl)


@pytest.mark.parametrize("bad", [-1, archs.VOCAB])
def test_calibration_ids_out_of_range_are_named(bad):
    model = archs.build("mixtral")
    ids = torch.zeros(2, 8, dtype=torch.long)
    ids[1, 3] = bad
    plan = Plan({_expert(model).name: 4}, group_size=32)
    with pytest.raises(ValueError, match=rf"calibration holds token id {bad}; allowed: 0 <= id < vocab_size=96"):
        moe_ao.quantize_(model, plan, method="gptq", calibration=ids)
    from moe_ao.profiling import profile

    with pytest.raises(ValueError, match=rf"token id {bad}"):
        profile(model, ids)


def test_failure_while_committing_leaves_model_untouched(monkeypatch):
    """An error in the last step (selecting the experts implementation) puts every parameter back."""
    model = archs.build("qwen2_moe")
    units = moe_ao.units(model)
    plan = Plan({u.name: 2 for u in units if u.kind in ("expert", "attention")}, group_size=32)
    snap, impl = _snapshot(model), model.config._experts_implementation

    def broken(model):
        model.config._experts_implementation = "half-set"
        raise RuntimeError("registry unavailable")

    monkeypatch.setattr(experts_impl, "select", broken)
    with pytest.raises(RuntimeError, match="registry unavailable"):
        moe_ao.quantize_(model, plan)
    assert _untouched(model, snap, impl)
    monkeypatch.undo()
    moe_ao.quantize_(model, plan)
    assert moe_ao.quantized_plan(model) is plan
