"""Typed quantizer configs: validation, the keyword form, and GPTQ through torchao's quantize_."""

from __future__ import annotations

import archs
import pytest
import torch
from torchao.quantization import quantize_ as ao_quantize_

import moe_ao
from moe_ao.quant.configs import GPTQConfig, Method, RTNConfig, make_config

IDS = torch.randint(0, archs.VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("field, value, allowed", [
    ("damp", -0.1, r"a float in \[0, 1\)"), ("damp", True, "a float"), ("blocksize", 0, "an int >= 1"),
    ("batch_size", 2.0, "an int >= 1"), ("min_tokens", -1, "None or an int"), ("act_order", "yes", "True or False"),
    ("compute_dtype", torch.int32, "None or a floating torch.dtype"), ("calibration", IDS.float(), "non-empty int64"),
])
def test_gptq_config_validates_each_field(field, value, allowed):
    args = {"calibration": IDS, field: value}
    with pytest.raises(ValueError, match=rf"GPTQConfig: {field}=.*allowed: {allowed}"):
        GPTQConfig(**args)


def test_keyword_form_builds_the_same_config():
    cfg = make_config("gptq", calibration=IDS, act_order=False, damp=0.05)
    assert isinstance(cfg, GPTQConfig) and cfg.act_order is False and cfg.damp == 0.05 and cfg.method is Method.GPTQ
    assert isinstance(make_config(Method.RTN), RTNConfig)
    with pytest.raises(
        ValueError, match=r"method 'gptq' takes no option\(s\) \['dampening'\]; allowed: \['calibration'"
    ):
        make_config("gptq", calibration=IDS, dampening=0.1)
    with pytest.raises(ValueError, match="needs calibration"):
        make_config("gptq")
    with pytest.raises(ValueError, match=r"method='awq'; allowed: \('rtn', 'gptq'\)"):
        make_config("awq")


def _codes(model) -> dict[str, list[torch.Tensor]]:
    out = {}
    for name, p in model.named_parameters():
        if isinstance(p, moe_ao.PackedWeight):
            flat, _ = p.__tensor_flatten__()
            out[name] = [getattr(p, n) for n in flat]
    return out


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_gptq_through_torchao_equals_moe_ao(arch):
    ref, theirs = archs.build(arch), archs.build(arch)
    units = moe_ao.units(ref)
    plan = moe_ao.Plan(
        {u.name: 3 for u in units if u.kind == "expert"} | {u.name: 4 for u in units if u.kind == "attention"},
        group_size=32,
    )
    config = GPTQConfig(calibration=IDS, progress=False)
    moe_ao.quantize_(ref, plan, config)
    ao_quantize_(theirs, moe_ao.MoEPlanConfig(plan, config), filter_fn=moe_ao.whole_model)
    mine, other = _codes(ref), _codes(theirs)
    assert mine.keys() == other.keys() and mine
    assert all(all(torch.equal(a, b) for a, b in zip(mine[k], other[k])) for k in mine)
    assert moe_ao.quantization_report(theirs).method == "gptq"
    keyword = archs.build(arch)
    moe_ao.quantize_(keyword, plan, method="gptq", calibration=IDS, progress=False)
    assert all(all(torch.equal(a, b) for a, b in zip(mine[k], v)) for k, v in _codes(keyword).items())


def test_moe_plan_config_refuses_other_quantizers():
    with pytest.raises(TypeError, match="must be RTNConfig or GPTQConfig, got str"):
        moe_ao.MoEPlanConfig(moe_ao.Plan({"a": 4}), "gptq")
