"""Sequential MoE-aware GPTQ over whole models (moe_ao.quant.gptq_driver)."""

from __future__ import annotations

import copy

import archs
import pytest
import torch
import torch.nn.functional as F

import moe_ao
from moe_ao.api import quantization_report
from moe_ao.primitives import rtn_quantize
from moe_ao.profiling import profile
from moe_ao.quant.gptq import gptq_quantize
from moe_ao.tensors.packed import PackedWeight


def _plan(model, bits=3, kinds=("expert", "attention", "shared_expert", "dense_mlp")):
    return moe_ao.Plan({u.name: bits for u in moe_ao.units(model) if u.kind in kinds}, group_size=32)


def _kl(model, ref_logp, x):
    with torch.no_grad():
        lp = model(x).logits.log_softmax(-1)
    return F.kl_div(lp, ref_logp, log_target=True, reduction="batchmean").item()


def _snapshot(model):
    return {n: (p, p.detach().clone()) for n, p in model.named_parameters()}


@pytest.mark.parametrize("arch", archs.ARCHS)
def test_gptq_beats_rtn_on_every_arch(arch):
    torch.manual_seed(0)
    model = archs.build(arch)
    calib = torch.randint(0, archs.VOCAB, (16, 32))
    x = torch.randint(0, archs.VOCAB, (4, 32))
    with torch.no_grad():
        ref = model(x).logits.log_softmax(-1)
    rtn = moe_ao.quantize_(copy.deepcopy(model), _plan(model))
    gptq = moe_ao.quantize_(model, _plan(model), method="gptq", calibration=calib, progress=False)
    assert _kl(gptq, ref, x) < 0.8 * _kl(rtn, ref, x)
    assert any(isinstance(p, PackedWeight) for p in gptq.parameters())


def test_first_layer_matches_direct_gptq_on_observed_hessian():
    model = archs.build("mixtral")
    calib = torch.randint(0, archs.VOCAB, (8, 16))
    inputs = []
    hook = model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda m, a: inputs.append(a[0]))
    with torch.no_grad():
        model(calib, use_cache=False)
    hook.remove()
    X = torch.cat(inputs).reshape(-1, 64).double()
    H = (X.T @ X / X.shape[0]).float()
    W = model.model.layers[0].self_attn.q_proj.weight.detach()
    expected, _ = gptq_quantize(W, H, bits=3, group_size=32, scale_dtype=torch.float32)
    name = "model.layers.0.self_attn.q_proj"
    plan = moe_ao.Plan({name: 3}, group_size=32)
    q = moe_ao.quantize_(model, plan, method="gptq", calibration=calib, act_order=False, progress=False)
    got = q.model.layers[0].self_attn.q_proj.weight.dequantize()
    torch.testing.assert_close(got, expected.dequantize(torch.float32), rtol=0, atol=1e-5)


def test_expert_hessian_sees_only_routed_tokens():
    model = archs.build("mixtral")
    calib = torch.randint(0, archs.VOCAB, (4, 16))
    seen = {}

    def grab(mod, args, kwargs):
        seen["x"], seen["idx"] = args[0], args[1]

    experts = model.model.layers[0].mlp.experts
    h = experts.register_forward_pre_hook(grab, with_kwargs=True)
    prof = profile(model, calib, hessians=True, progress=False)
    h.remove()
    for e in range(4):
        rows = (seen["idx"] == e).any(-1)
        X = seen["x"][rows].double()
        ref = X.T @ X / max(int(rows.sum()), 1)
        got = prof.hessians[f"model.layers.0.mlp.experts.{e}.gate_proj"]
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-5)
    assert prof.routing_counts[0].sum() == 4 * 16 * 2


def test_almost_no_data_falls_back_to_rtn_and_is_listed():
    model = archs.build("qwen2_moe")
    calib = torch.randint(0, archs.VOCAB, (1, 8))  # 8 tokens: no Hessian can be trusted
    plan = _plan(model)
    rtn = moe_ao.quantize_(copy.deepcopy(model), plan)
    gptq = moe_ao.quantize_(model, plan, method="gptq", calibration=calib, progress=False)
    fallbacks = quantization_report(gptq).extra["fallbacks"]
    assert set(fallbacks) == {u for u in plan} and set(fallbacks.values()) == {"rtn"}
    for (n, a), (_, b) in zip(gptq.named_parameters(), rtn.named_parameters()):
        if isinstance(a, PackedWeight):
            assert torch.equal(a.dequantize(), b.dequantize()), n


def test_rare_experts_use_pooled_hessian():
    model = archs.build("mixtral")
    calib = torch.randint(0, archs.VOCAB, (4, 32))
    plan = _plan(model, kinds=("expert",))
    q = moe_ao.quantize_(model, plan, method="gptq", calibration=calib, min_tokens=100, progress=False)
    extra = quantization_report(q).extra
    assert "pooled" in set(extra["fallbacks"].values())
    assert "rtn" not in set(extra["fallbacks"].values())
    assert all(extra["tokens"][u] < 100 for u in extra["fallbacks"])


def test_weights_are_never_zeroed_for_dead_experts():
    model = archs.build("mixtral")
    gate = model.model.layers[0].mlp.gate

    def never_route_3(hidden):  # Mixtral's router with expert 3 masked out
        logits = F.linear(hidden.reshape(-1, gate.hidden_dim), gate.weight)
        logits[:, 3] = float("-inf")
        top, idx = torch.topk(logits.float().softmax(-1), gate.top_k, dim=-1)
        return logits, top / top.sum(-1, keepdim=True), idx

    gate.forward = never_route_3
    calib = torch.randint(0, archs.VOCAB, (8, 32))
    W = model.model.layers[0].mlp.experts.down_proj[3].detach().clone()
    q = moe_ao.quantize_(model, _plan(model, kinds=("expert",)), method="gptq", calibration=calib, progress=False)
    got = q.model.layers[0].mlp.experts.down_proj.dequantize()[3]
    expected = rtn_quantize(W, 3, 32, True, torch.float32).dequantize()
    extra = quantization_report(q).extra
    assert extra["tokens"]["model.layers.0.mlp.experts.3.down_proj"] == 0
    assert extra["fallbacks"]["model.layers.0.mlp.experts.3.down_proj"] == "pooled"
    assert (got.abs().sum(0) > 0).all()  # no input column zeroed (AutoGPTQ zeroes "dead" ones)
    assert (got - W).norm() <= 1.5 * (expected - W).norm()  # a real quantization of W


@pytest.mark.parametrize(
    "calib, match",
    [
        (None, "needs calibration"),
        (torch.zeros(0, 8, dtype=torch.long), "calibration=.*allowed: non-empty int64"),
        (torch.zeros(2, 8), "int64"),
        (torch.full((2, 8), archs.VOCAB), "vocab_size"),
    ],
)
def test_bad_calibration_leaves_model_untouched(calib, match):
    model = archs.build("mixtral")
    before = _snapshot(model)
    with pytest.raises(ValueError, match=match):
        moe_ao.quantize_(model, _plan(model), method="gptq", calibration=calib, progress=False)
    for n, p in model.named_parameters():
        assert p is before[n][0] and torch.equal(p, before[n][1])


def test_one_pass_mode_also_beats_rtn_and_differs_from_true_sequential():
    model = archs.build("mixtral")
    calib = torch.randint(0, archs.VOCAB, (16, 32))
    x = torch.randint(0, archs.VOCAB, (4, 32))
    with torch.no_grad():
        ref = model(x).logits.log_softmax(-1)
    rtn = moe_ao.quantize_(copy.deepcopy(model), _plan(model))
    seq = moe_ao.quantize_(copy.deepcopy(model), _plan(model), method="gptq", calibration=calib, progress=False)
    one = moe_ao.quantize_(model, _plan(model), method="gptq", calibration=calib, true_sequential=False,
                           progress=False)
    assert _kl(one, ref, x) < 0.8 * _kl(rtn, ref, x)
    down = "model.layers.1.mlp.experts"
    a = seq.get_submodule(down).down_proj.dequantize()
    b = one.get_submodule(down).down_proj.dequantize()
    assert not torch.equal(a, b)  # down_proj saw quantized vs float gate/up activations


def test_units_outside_the_layers_get_rtn_in_a_gptq_run():
    """lm_head has no decoder-layer inputs to calibrate on: a GPTQ plan that names it gets its RTN
    codes (the same bits as method='rtn' gives it), listed in the report; the layers get GPTQ."""
    torch.manual_seed(0)
    model = archs.build("mixtral")
    if getattr(model.config, "tie_word_embeddings", False):
        pytest.skip("tied lm_head")
    head = next(u for u in moe_ao.units(model) if u.kind == "lm_head")
    plan = moe_ao.Plan({**{u.name: 3 for u in moe_ao.units(model) if u.kind == "expert"}, head.name: 4},
                       group_size=32)
    calib = torch.randint(0, archs.VOCAB, (8, 32))
    rtn = moe_ao.quantize_(copy.deepcopy(model), moe_ao.Plan({head.name: 4}, group_size=32))
    gptq = moe_ao.quantize_(model, plan, method="gptq", calibration=calib, progress=False)
    assert quantization_report(gptq).extra["rtn_outside_layers"] == [head.name]
    got, want = gptq.get_parameter(head.param), rtn.get_parameter(head.param)
    assert isinstance(got, PackedWeight)
    for name in got.__tensor_flatten__()[0]:
        assert torch.equal(getattr(got, name), getattr(want, name)), name
