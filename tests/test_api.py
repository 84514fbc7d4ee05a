"""moe_ao.quantize_ end to end on every supported architecture, and its atomicity.

The reference for a quantized model is the same float model whose planned weights were
replaced by the float64 reference RTN (conftest.reference_rtn) dequantized values: both
then compute in float32, so their logits agree to float32 rounding.
"""

from __future__ import annotations

from itertools import chain

import archs
import pytest
import torch
import torch.nn.functional as F

import moe_ao
from moe_ao import experts as experts_impl
from moe_ao.discovery import unit_weight
from moe_ao.plans import Plan
from moe_ao.primitives import rtn_quantize
from moe_ao.tensors.packed import PackedWeight

GROUP = 32
F32_TOL = dict(rtol=1e-5, atol=2e-5)  # float32 compute, different summation orders
FUSED_ARCHS = [a for a in archs.ARCHS if a != "deepseek_moe"]


def standard_plan(units) -> Plan:
    """Experts at 2 bits; attention, shared experts and dense MLPs at 4 bits; group 32."""
    bits = {"expert": 2, "attention": 4, "shared_expert": 4, "dense_mlp": 4}
    return Plan({u.name: bits[u.kind] for u in units if u.kind in bits}, group_size=GROUP)


def mixed_plan(units) -> Plan:
    """Different bits per expert and for gate vs up of one expert; expert 1 kept at 16 bits."""
    cycle = {"gate_proj": (2, 3, 4, 8), "up_proj": (3, 8, 2, 4), "down_proj": (4, 2, 8, 3)}
    entries = {}
    for u in units:
        if u.kind == "expert":
            entries[u.name] = 16 if u.expert == 1 else cycle[u.proj][u.expert % 4]
        elif u.kind in ("attention", "shared_expert", "dense_mlp"):
            entries[u.name] = 3
    return Plan(entries, group_size=GROUP)


def input_ids(batch: int = 2, seq: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, archs.VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def scale_dtype(W: torch.Tensor) -> torch.dtype:
    # The documented rule: 16-bit models keep 16-bit scales, wider models float32 scales.
    return W.dtype if W.dtype in (torch.bfloat16, torch.float16) else torch.float32


def reference_model(arch: str, plan: Plan, ref_rtn):
    """The float model with every planned weight replaced by its float64 reference RTN."""
    model = archs.build(arch)
    ties = 0
    with torch.no_grad():
        for u in moe_ao.units(model):
            spec = plan.get(u.name)
            if spec is None or not spec.quantized:
                continue
            W = unit_weight(model, u)  # a view: writing it writes the parameter
            guide = rtn_quantize(W, spec.bits, spec.group_size, spec.symmetric, scale_dtype(W)).codes
            ref = ref_rtn(W, spec.bits, spec.group_size, spec.symmetric, scale_dtype(W), guide=guide)
            ties += ref.ties
            W.copy_(ref.deq.to(W.dtype))
    return model, ties


def quantized(arch: str, make_plan=standard_plan):
    model = archs.build(arch)
    plan = make_plan(moe_ao.units(model))
    assert moe_ao.quantize_(model, plan) is model
    return model, plan


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits


def snapshot(model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {n: (t, t.detach().clone()) for n, t in chain(model.named_parameters(), model.named_buffers())}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.detach().reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))


def assert_untouched(model, snap, experts_impl_before) -> None:
    now = dict(chain(model.named_parameters(), model.named_buffers()))
    assert now.keys() == snap.keys()
    for name, (obj, copy) in snap.items():
        assert now[name] is obj, f"{name} was replaced"
        assert same_bits(obj, copy), f"{name} changed"
    assert moe_ao.quantized_plan(model) is None and moe_ao.quantization_report(model) is None
    assert model.config._experts_implementation == experts_impl_before


# ---------------------------------------------------------------- end to end
@pytest.mark.parametrize("arch", archs.ARCHS)
def test_logits_match_reference(arch, ref_rtn):
    model, plan = quantized(arch)
    ref, ties = reference_model(arch, plan, ref_rtn)
    # Every planned unit is packed; the weights dequantize exactly to the reference values.
    for u in moe_ao.units(model):
        if u.name in plan:
            w = model.get_parameter(u.param)
            assert isinstance(w, PackedWeight), u.name
            assert torch.equal(unit_weight(ref, u), w.dequantize()[u.expert][u.rows[0]:u.rows[1]] if u.fused
                               else w.dequantize()), u.name
    ids = input_ids()
    out, expected = logits(model, ids), logits(ref, ids)
    torch.testing.assert_close(out, expected, **F32_TOL)
    # ... and the quantization changed the model: the float model's logits are far away.
    assert (logits(archs.build(arch), ids) - out).abs().max() > 1e-2


@pytest.mark.parametrize("arch", archs.ARCHS)
def test_generate(arch, ref_rtn):
    model, plan = quantized(arch)
    ref, _ = reference_model(arch, plan, ref_rtn)
    ids = input_ids(seq=5)
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, pad_token_id=0)
    out = model.generate(ids, **kwargs)
    assert out.shape == (2, 9) and torch.equal(out[:, :5], ids)
    assert torch.equal(out, ref.generate(ids, **kwargs))


@pytest.mark.parametrize("arch", archs.ARCHS)
def test_no_graph_breaks(arch):
    model, _ = quantized(arch)
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(input_ids())
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.slow
@pytest.mark.parametrize("arch", archs.ARCHS)
def test_compiled_logits_match_eager(arch):
    model, _ = quantized(arch)
    ids = input_ids()
    eager = logits(model, ids)
    with torch.no_grad():
        compiled = torch.compile(model)(ids).logits
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_compile_with_grad_mode_on():
    """A freshly loaded HF model has trainable norms and embeddings, so without no_grad
    AOT autograd traces a backward through the float32 grouped-matmul custom op."""
    model, _ = quantized("mixtral")
    ids = input_ids()
    compiled = torch.compile(model)(ids).logits
    assert compiled.requires_grad
    torch.testing.assert_close(compiled.detach(), logits(model, ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", archs.ARCHS)
def test_torchao_quantize_equals_moe_ao(arch):
    from torchao.quantization import quantize_ as ao_quantize_

    ours, plan = quantized(arch)
    theirs = archs.build(arch)
    ao_quantize_(theirs, moe_ao.MoEPlanConfig(plan), filter_fn=moe_ao.whole_model)
    assert moe_ao.quantized_plan(theirs) == plan
    ids = input_ids()
    assert torch.equal(logits(theirs, ids), logits(ours, ids))


@pytest.mark.parametrize("arch", archs.ARCHS)
def test_mixed_bits_inside_fused_tensors(arch, ref_rtn):
    model, plan = quantized(arch, mixed_plan)
    ref, _ = reference_model(arch, plan, ref_rtn)
    layer = next(u.layer for u in moe_ao.units(model) if u.kind == "expert")
    experts = model.model.layers[layer].mlp.experts
    if arch in FUSED_ARCHS:
        gate_up, down = experts.gate_up_proj, experts.down_proj
        assert isinstance(gate_up, PackedWeight) and isinstance(down, PackedWeight)
        E = gate_up.shape[0]
        want = []
        for e in range(E):
            want += [16, 16] if e == 1 else [(2, 3, 4, 8)[e % 4], (3, 8, 2, 4)[e % 4]]
        assert gate_up.slice_bits == tuple(want) and gate_up.n_seg == 2
        assert down.slice_bits == tuple(16 if e == 1 else (4, 2, 8, 3)[e % 4] for e in range(E))
        # The 16-bit expert is the original float weight, exactly.
        assert torch.equal(gate_up[1], archs.build(arch).model.layers[layer].mlp.experts.gate_up_proj[1])
    else:
        assert isinstance(experts[0].gate_proj.weight, PackedWeight)
        assert experts[0].gate_proj.weight.slice_bits == (2,)
        assert experts[2].up_proj.weight.slice_bits == (2,)
        assert not isinstance(experts[1].down_proj.weight, PackedWeight)  # 16 bits: left as is
    ids = input_ids()
    torch.testing.assert_close(logits(model, ids), logits(ref, ids), **F32_TOL)
    # Both the decode path (T*k <= E) and the prefill path agree with the reference.
    one = input_ids(batch=1, seq=1, seed=3)
    torch.testing.assert_close(logits(model, one), logits(ref, one), **F32_TOL)


@pytest.mark.parametrize("arch", archs.ARCHS)
def test_16_bit_and_unplanned_units_untouched(arch):
    model = archs.build(arch)
    units = moe_ao.units(model)
    plan = standard_plan(units)
    first_attn = next(u for u in units if u.kind == "attention")
    entries = {n: plan[n] for n in plan} | {first_attn.name: 16}
    plan = Plan(entries, group_size=GROUP)
    unplanned = [u for u in units if u.name not in plan]
    assert {u.kind for u in unplanned} >= {"embedding", "lm_head", "router"}
    before = snapshot(model)
    moe_ao.quantize_(model, plan)
    report = moe_ao.quantization_report(model)
    w16 = model.get_parameter(first_attn.param)
    assert w16 is before[first_attn.param][0] and not isinstance(w16, PackedWeight)
    assert report.kept[first_attn.name] == "planned at 16 bits"
    for u in unplanned:
        assert model.get_parameter(u.param) is before[u.param][0], u.name
        assert same_bits(model.get_parameter(u.param), before[u.param][1])
        assert report.kept[u.name] == "not in plan"
    # Norms and other non-unit parameters are untouched too.
    unit_params = {u.param for u in units}
    for name, (obj, _) in before.items():
        if name not in unit_params:
            assert dict(chain(model.named_parameters(), model.named_buffers()))[name] is obj
    quantized_units = {n for n in plan if plan[n].quantized}
    assert set(report.quantized) == quantized_units
    assert all(0 < r["rel_error"] < 1 for r in report.quantized.values())
    assert moe_ao.quantized_plan(model) is plan


# ---------------------------------------------------------------- atomicity
@pytest.mark.parametrize("arch", ["mixtral", "deepseek_moe"])
def test_invalid_plan_leaves_model_untouched(arch):
    model = archs.build(arch)
    units = moe_ao.units(model)
    entries = dict(standard_plan(units))
    bad = next(u for u in reversed(units) if u.kind == "expert")
    entries[bad.name] = {"bits": 4, "group_size": 24}  # does not divide in_features
    snap, impl = snapshot(model), model.config._experts_implementation
    with pytest.raises(ValueError, match=bad.name.replace(".", r"\.")):
        moe_ao.quantize_(model, Plan(entries, group_size=GROUP))
    assert_untouched(model, snap, impl)
    with pytest.raises(ValueError, match="does not have"):
        moe_ao.quantize_(model, Plan({"model.layers.9.mlp.experts.0.up_proj": 4}))
    assert_untouched(model, snap, impl)


@pytest.mark.parametrize("arch", archs.ARCHS)
def test_nan_weight_names_unit_and_leaves_model_untouched(arch):
    model = archs.build(arch)
    units = moe_ao.units(model)
    experts = [u for u in units if u.kind == "expert"]
    victim = experts[len(experts) // 2 + 1]
    with torch.no_grad():
        unit_weight(model, victim)[3, 5] = float("nan")
    snap, impl = snapshot(model), model.config._experts_implementation
    with pytest.raises(ValueError, match=victim.name.replace(".", r"\.") + ".*NaN"):
        moe_ao.quantize_(model, standard_plan(units))
    assert_untouched(model, snap, impl)


@pytest.mark.parametrize("arch", archs.ARCHS)
def test_quantizer_failing_halfway_leaves_model_untouched(arch, monkeypatch):
    model = archs.build(arch)
    plan = standard_plan(moe_ao.units(model))
    real = moe_ao.api.rtn_unit
    calls = []

    def failing(W, spec):
        calls.append(spec)
        if len(calls) == len(plan) // 2:
            raise RuntimeError(f"quantizer failed on unit {len(calls)}")
        return real(W, spec)

    monkeypatch.setattr(moe_ao.api, "rtn_unit", failing)
    snap, impl = snapshot(model), model.config._experts_implementation
    with pytest.raises(RuntimeError, match="quantizer failed"):
        moe_ao.quantize_(model, plan)
    assert len(calls) == len(plan) // 2 > 1
    assert_untouched(model, snap, impl)
    monkeypatch.setattr(moe_ao.api, "rtn_unit", real)
    moe_ao.quantize_(model, plan)  # and the model can still be quantized afterwards
    assert moe_ao.quantized_plan(model) is plan


def test_quantizing_twice_raises():
    model, plan = quantized("mixtral")
    snap = snapshot(model)
    with pytest.raises(ValueError, match="already quantized"):
        moe_ao.quantize_(model, plan)
    now = dict(chain(model.named_parameters(), model.named_buffers()))
    assert now.keys() == snap.keys() and all(now[n] is obj for n, (obj, _) in snap.items())


def test_bad_arguments():
    model = archs.build("mixtral")
    with pytest.raises(TypeError, match="moe_ao.Plan"):
        moe_ao.quantize_(model, {"model.layers.0.self_attn.q_proj": 4})
    plan = Plan({"model.layers.0.self_attn.q_proj": 4}, group_size=GROUP)
    with pytest.raises(ValueError, match=r"method='awq'.*\('rtn', 'gptq'\)"):
        moe_ao.quantize_(model, plan, method="awq")
    with pytest.raises(ValueError, match=r"method 'rtn' takes no option\(s\) \['damp'\]"):
        moe_ao.quantize_(model, plan, damp=0.1)
    with pytest.raises(ValueError, match="either a config object or"):
        moe_ao.quantize_(model, plan, moe_ao.RTNConfig(), method="rtn")
    with pytest.raises(TypeError, match="config must be RTNConfig, GPTQConfig or a method name"):
        moe_ao.quantize_(model, plan, 4)
    assert moe_ao.quantized_plan(model) is None


# ------------------------------------------------- experts implementation
def routed_inputs(T: int, E: int, k: int, H: int, dtype, seed: int, skip_last: bool = False):
    """hidden [T, H], top_k_index [T, k] (distinct experts per token), top_k_weights [T, k]."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=g, dtype=torch.float64).to(dtype)
    n = E - 1 if skip_last else E  # skip_last: the last expert gets no token
    idx = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(T)])
    weights = torch.rand(T, k, generator=g, dtype=torch.float64).softmax(-1).to(dtype)
    return hidden, idx, weights


def eager_experts(module, hidden, idx, weights):
    """transformers' own "eager" loop over experts."""
    before = module.config._experts_implementation
    module.config._experts_implementation = "eager"
    try:
        return module(hidden, idx, weights)
    finally:
        module.config._experts_implementation = before


@pytest.mark.parametrize("arch", FUSED_ARCHS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("path", ["decode", "prefill"])
def test_experts_forward_matches_transformers_eager(arch, dtype, path, monkeypatch):
    model = archs.build(arch, dtype)
    layer = next(u.layer for u in moe_ao.units(model) if u.kind == "expert")
    module = model.model.layers[layer].mlp.experts
    E, k, H = module.num_experts, model.config.num_experts_per_tok, model.config.hidden_size
    T = E // k if path == "decode" else 3 * E
    assert (T * k <= E) == (path == "decode")
    hidden, idx, weights = routed_inputs(T, E, k, H, dtype, seed=1, skip_last=path == "prefill")
    grouped_calls = []
    real_grouped_mm = experts_impl.grouped_mm

    def counting_grouped_mm(*args):
        grouped_calls.append(1)
        return real_grouped_mm(*args)

    monkeypatch.setattr(experts_impl, "grouped_mm", counting_grouped_mm)
    with torch.no_grad():
        ours = experts_impl.moe_ao_experts_forward(module, hidden, idx, weights)
        theirs = eager_experts(module, hidden, idx, weights)
    assert len(grouped_calls) == (0 if path == "decode" else 2)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    assert ours.dtype == dtype and ours.shape == (T, H)
    torch.testing.assert_close(ours, theirs, **tol)


@pytest.mark.parametrize("path", ["decode", "prefill"])
def test_experts_forward_on_packed_weights(path):
    """Packed banks give the result of the eager loop on their dequantized weights."""
    model = archs.build("qwen2_moe", torch.float32)
    module = model.model.layers[1].mlp.experts
    E, k, H = module.num_experts, model.config.num_experts_per_tok, model.config.hidden_size
    units = [u for u in moe_ao.units(model) if u.layer == 1 and u.kind == "expert"]
    plan = Plan({u.name: (2, 3, 4, 8, 16)[(u.expert + u.segment) % 5] for u in units}, group_size=GROUP)
    moe_ao.quantize_(model, plan)
    assert isinstance(module.gate_up_proj, PackedWeight) and len(module.gate_up_proj.present_bits) == 5
    T = E // k if path == "decode" else 4 * E
    hidden, idx, weights = routed_inputs(T, E, k, H, torch.float32, seed=2)
    with torch.no_grad():
        ours = experts_impl.moe_ao_experts_forward(module, hidden, idx, weights)
        dense = archs.build("qwen2_moe", torch.float32).model.layers[1].mlp.experts
        dense.gate_up_proj.data = module.gate_up_proj.dequantize()
        dense.down_proj.data = module.down_proj.dequantize()
        theirs = eager_experts(dense, hidden, idx, weights)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_select_registers_implementation():
    model, _ = quantized("deepseek_v3")
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    assert model.config._experts_implementation == experts_impl.IMPLEMENTATION
    assert ALL_EXPERTS_FUNCTIONS[experts_impl.IMPLEMENTATION] is experts_impl.moe_ao_experts_forward
    # A ModuleList model has no fused experts: nothing to select.
    listed, _ = quantized("deepseek_moe")
    assert listed.config._experts_implementation != experts_impl.IMPLEMENTATION


def test_linear_units_use_packed_f_linear():
    """A packed nn.Linear weight computes F.linear with its dequantized weight."""
    model, _ = quantized("deepseek_moe")
    lin = model.model.layers[1].mlp.experts[2].down_proj
    for rows in (3, 40):
        x = torch.randn(rows, lin.in_features)
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight.dequantize()), **F32_TOL)
