"""Expert banks held by modules of their own (issue 16): JetMoE and Inkling.

JetMoE's MoE block has no ``experts`` child: its banks are two JetMoeParallelExperts
modules, ``input_linear.weight`` [E, 2I, H] (gate; up) and ``output_linear.weight``
[E, H, I], called with expert-sorted rows and per-expert counts; its attention is a
mixture of attention experts (JetMoeMoA, 3D banks too), kept in float. Inkling's shared
experts are 3D banks ``gate_proj`` / ``up_proj`` [S, I, H], ``down_proj`` [S, H, I]
that every token goes through, scaled per token.

Checked: the unit records, packed forwards against float64 references, the GPTQ
observer's Hessians against a direct float64 computation, and 64-byte aligned tensors
after ``load_quantized`` (reloaded logits are then bit-identical, see
test_architectures.py).
"""

from __future__ import annotations

import copy

import moe_archs
import pytest
import torch
import torch.nn.functional as F
from test_architectures import fake_quant_reference
from test_gpt_oss_llama4 import _float64

import moe_ao
from moe_ao.discovery import decoder_layers
from moe_ao.experts import parallel_experts_forward
from moe_ao.quant.observers import LayerObserver
from moe_ao.tensors.packed import PackedWeight


def _ids() -> torch.Tensor:
    return torch.randint(2, moe_archs.VOCAB, (2, 10), generator=torch.Generator().manual_seed(5))


def test_jetmoe_units_name_banks_like_every_other_layout():
    found = moe_ao.units(moe_archs.build("jetmoe"))
    by_name = {u.name: u for u in found}
    gate, up = by_name["model.layers.1.mlp.experts.3.gate_proj"], by_name["model.layers.1.mlp.experts.3.up_proj"]
    down = by_name["model.layers.1.mlp.experts.3.down_proj"]
    I = down.shape[1]
    assert gate.param == up.param == "model.layers.1.mlp.input_linear.weight"
    assert (gate.rows, up.rows, gate.segment, up.segment) == ((0, I), (I, 2 * I), 0, 1)
    assert down.param == "model.layers.1.mlp.output_linear.weight" and down.shape == (moe_archs.HIDDEN, I)
    assert {u.kind for u in found if ".mlp." in u.name} == {"expert", "router"}
    assert by_name["model.layers.0.mlp.router.layer"].kind == "router"
    # the attention experts stay in float, their router is no attention unit
    assert "model.layers.0.self_attention.experts" in found.kept
    assert not any(u.name.startswith("model.layers.0.self_attention.experts") for u in found)
    assert by_name["model.layers.0.self_attention.kv_proj"].kind == "attention"


def test_attention_with_3d_parameters_but_no_router_is_not_taken_for_experts():
    # Kimi Linear's forget gate holds A_log (1, 1, 4, 1) next to two linears: attention, not experts
    found = moe_ao.units(moe_archs.build("kimi_linear"))
    assert not found.kept
    assert {u.kind for u in found if ".self_attn.forget_gate." in u.name} == {"attention"}


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_jetmoe_packed_parallel_experts_match_float64(bits):
    model = moe_archs.build("jetmoe")
    plan = moe_ao.Plan({u.name: bits for u in moe_ao.units(model) if u.kind == "expert"}, group_size=16)
    moe_ao.quantize_(model, plan)
    bank = model.model.layers[0].mlp.input_linear
    assert isinstance(bank.weight, PackedWeight)
    sizes = [3, 0, 5, 1, 2, 0, 4, 1]  # an expert with no rows included
    x = torch.randn(sum(sizes), moe_archs.HIDDEN, generator=torch.Generator().manual_seed(2))
    W = bank.weight.dequantize().double()
    want = torch.cat([xe @ W[e].T for e, xe in enumerate(x.double().split(sizes))])
    got = parallel_experts_forward(bank, x, sizes)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_inkling_quantized_shared_banks_match_the_fake_quant_reference():
    model = moe_archs.build("inkling")
    found = moe_ao.units(model)
    shared = [u for u in found if u.kind == "shared_expert"]
    assert {(u.proj, u.param.rsplit(".", 1)[-1], u.expert) for u in shared if u.layer == 0} == {
        ("gate_proj", "gate_proj", 0), ("up_proj", "up_proj", 0), ("down_proj", "down_proj", 0)}
    assert all(u.fused and u.rows == (0, u.shape[0]) for u in shared)
    plan = moe_ao.Plan({u.name: 4 for u in shared} | {u.name: 8 for u in found if u.kind == "expert"}, group_size=16)
    float_model = copy.deepcopy(model)
    moe_ao.quantize_(model, plan)
    assert isinstance(model.model.layers[0].mlp.shared_experts.down_proj, PackedWeight)
    ref = _float64(fake_quant_reference(float_model, model, [u for u in found if u.name in plan]))
    with torch.no_grad():
        want, got = ref(_ids()).logits, model(_ids()).logits.double()
        assert ((got - want).norm() / want.norm()).item() < 2e-3
        base = _float64(float_model)(_ids()).logits
        assert ((got - base).norm() / base.norm()).item() > 1e-3  # the shared banks really changed


def _observed(model: torch.nn.Module, layer: int, names: set[str], x: torch.Tensor,
              block: str = "mlp") -> LayerObserver:
    """The observer of decoder layer ``layer`` after its MoE block ``block`` ran on ``x``."""
    list_name, layers = decoder_layers(model)
    layer_units = [u for u in moe_ao.units(model) if u.layer == layer]
    with LayerObserver(f"{list_name}.{layer}", layers[layer], layer_units, hessian_units=names) as obs, \
            torch.no_grad():
        layers[layer].get_submodule(block)(x)
    return obs


def test_observer_hessians_of_jetmoe_banks_equal_float64():
    model = moe_archs.build("jetmoe")
    found = {u.name: u for u in moe_ao.units(model)}
    x = torch.randn(2, 9, moe_archs.HIDDEN, generator=torch.Generator().manual_seed(4))
    obs = _observed(model, 1, set(found), x)
    mlp = model.model.layers[1].mlp
    x2 = x.reshape(-1, x.shape[-1])
    _, batch_index, _, expert_size, _ = mlp.router(x2)
    xs = x2[batch_index].double().split(expert_size)
    assert obs.routing_counts.tolist() == expert_size
    W_up = mlp.input_linear.weight.double()
    for e in (0, 5):
        H, n = obs.hessian(found[f"model.layers.1.mlp.experts.{e}.up_proj"])
        assert n == expert_size[e]
        torch.testing.assert_close(H.double(), xs[e].T @ xs[e] / n, rtol=1e-5, atol=1e-6)
        g, u = (xs[e] @ W_up[e].T).chunk(2, dim=-1)
        h = F.silu(g) * u
        H, _ = obs.hessian(found[f"model.layers.1.mlp.experts.{e}.down_proj"])
        torch.testing.assert_close(H.double(), h.T @ h / n, rtol=1e-5, atol=1e-6)


def test_observer_hessians_of_inkling_shared_banks_equal_float64():
    model = moe_archs.build("inkling")
    found = {u.name: u for u in moe_ao.units(model)}
    shared = model.model.layers[0].mlp.shared_experts
    seen = {}
    shared.register_forward_pre_hook(lambda m, a, kw: seen.update(x=a[0], g=kw["gammas"]), with_kwargs=True)
    x = torch.randn(1, 7, moe_archs.HIDDEN, generator=torch.Generator().manual_seed(6))
    obs = _observed(model, 0, set(found), x)
    xin = seen["x"].reshape(-1, moe_archs.HIDDEN).double()
    T = xin.shape[0]
    H, n = obs.hessian(found["model.layers.0.mlp.shared_experts.0.gate_proj"])
    assert n == T
    torch.testing.assert_close(H.double(), xin.T @ xin / T, rtol=1e-5, atol=1e-6)
    gate, up = shared.gate_proj[0].double(), shared.up_proj[0].double()
    h = F.silu(xin @ gate.T) * (xin @ up.T) * seen["g"].reshape(T, 1).double()
    H, _ = obs.hessian(found["model.layers.0.mlp.shared_experts.0.down_proj"])
    torch.testing.assert_close(H.double(), h.T @ h / T, rtol=1e-5, atol=1e-6)


def test_load_quantized_hands_out_aligned_tensors(tmp_path):
    model = moe_archs.build("jetmoe")
    plan = moe_ao.Plan({u.name: 4 for u in moe_ao.units(model) if u.kind == "expert"}, group_size=16)
    moe_ao.quantize_(model, plan)
    moe_ao.save_quantized(model, tmp_path / "q")
    loaded = moe_ao.load_quantized(tmp_path / "q")
    tensors = []
    for t in [*loaded.parameters(), *loaded.buffers()]:
        inner = t.data if isinstance(t.data, PackedWeight) else None
        tensors += [getattr(inner, n) for n in inner.__tensor_flatten__()[0]] if inner is not None else [t]
    misaligned = [tuple(t.shape) for t in tensors if t.numel() and t.data_ptr() % 64]
    assert not misaligned


def _gpt_oss_down_input(mod, e: int, x: torch.Tensor) -> torch.Tensor:
    """gpt-oss's clamped swiglu written out in float64: interleaved columns of x @ W [H, 2I] + b."""
    gu = x @ mod.gate_up_proj[e].double() + mod.gate_up_proj_bias[e].double()
    gate, up = gu[:, ::2].clamp(max=mod.limit), gu[:, 1::2].clamp(-mod.limit, mod.limit)
    return (up + 1) * gate * torch.sigmoid(gate * mod.alpha)


def _dbrx_down_input(mod, e: int, x: torch.Tensor) -> torch.Tensor:
    I = mod.ffn_hidden_size
    w1, v1 = mod.mlp.w1[e * I:(e + 1) * I].double(), mod.mlp.v1[e * I:(e + 1) * I].double()
    return F.silu(x @ w1.T) * (x @ v1.T)


@pytest.mark.parametrize("arch, down_input", [("gpt_oss", _gpt_oss_down_input), ("dbrx", _dbrx_down_input)])
def test_observer_down_hessians_read_each_layout(arch, down_input):
    """The down_proj Hessian of transposed + interleaved + biased (gpt-oss) and flat (DBRX) banks."""
    model = moe_archs.build(arch)
    found = {u.name: u for u in moe_ao.units(model)}
    block = "ffn" if arch == "dbrx" else "mlp"
    experts = decoder_layers(model)[1][0].get_submodule(f"{block}.experts")
    seen = {}
    experts.register_forward_pre_hook(lambda m, a, kw: seen.update(args=list(a) + list(kw.values())),
                                      with_kwargs=True)
    x = torch.randn(2, 9, moe_archs.HIDDEN, generator=torch.Generator().manual_seed(8))
    obs = _observed(model, 0, set(found), x, block)
    hidden, top_k_index = seen["args"][0].reshape(-1, moe_archs.HIDDEN).double(), seen["args"][1]
    down = next(u for u in found.values() if u.layer == 0 and u.kind == "expert" and u.proj == "down_proj"
                and u.expert == 0)
    xe = hidden[(top_k_index == 0).any(-1)]
    h = down_input(experts, 0, xe)
    H, n = obs.hessian(down)
    assert n == xe.shape[0] > 0
    torch.testing.assert_close(H.double(), h.T @ h / n, rtol=1e-5, atol=1e-6)


def test_observer_hessians_of_llama4_experts_are_of_the_scaled_copies():
    model = moe_archs.build("llama4", num_experts_per_tok=1)
    found = {u.name: u for u in moe_ao.units(model)}
    experts = model.model.layers[0].feed_forward.experts
    seen = {}
    experts.register_forward_pre_hook(lambda m, a: seen.update(x=a[0]))
    x = torch.randn(1, 11, moe_archs.HIDDEN, generator=torch.Generator().manual_seed(9))
    obs = _observed(model, 0, set(found), x, "feed_forward")
    copies = seen["x"].reshape(experts.num_experts, -1, moe_archs.HIDDEN).double()  # [E, T, H]
    e = int(obs.routing_counts.argmax())
    xe = copies[e][copies[e].ne(0).any(-1)]
    assert obs.routing_counts.sum() == x.shape[1]  # top-1: every token once
    gate, up = (xe @ experts.gate_up_proj[e].double()).chunk(2, dim=-1)
    h = up * F.silu(gate)
    name = f"model.layers.0.feed_forward.experts.{e}"
    H, n = obs.hessian(found[f"{name}.gate_proj"])
    torch.testing.assert_close(H.double(), xe.T @ xe / n, rtol=1e-5, atol=1e-6)
    H, n = obs.hessian(found[f"{name}.down_proj"])
    torch.testing.assert_close(H.double(), h.T @ h / n, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["gpt_oss", "aria", "llama4", "dbrx", "jetmoe", "inkling"])
def test_gptq_on_every_bank_layout_beats_rtn(arch):
    """GPTQ (4-bit routed and shared experts) through each layout's observer: it runs and its KL is below RTN's."""
    model = moe_archs.build(arch)
    kinds = ("expert", "shared_expert")
    plan = moe_ao.Plan({u.name: 4 for u in moe_ao.units(model) if u.kind in kinds}, group_size=16)
    calib = torch.randint(2, moe_archs.VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
    gptq, rtn = copy.deepcopy(model), copy.deepcopy(model)
    moe_ao.quantize_(gptq, plan, method="gptq", calibration=calib)
    moe_ao.quantize_(rtn, plan)
    with torch.no_grad():
        want = model(calib).logits.log_softmax(-1)

        def kl(q):
            return F.kl_div(q(calib).logits.log_softmax(-1), want, log_target=True, reduction="batchmean").item()

        assert kl(gptq) < kl(rtn)


def test_weight_by_routing_on_jetmoe_banks_is_refused_by_name_and_leaves_no_hook():
    model = moe_archs.build("jetmoe")
    found = moe_ao.units(model)
    layer = model.model.layers[0]
    names = {u.name for u in found if u.layer == 0}
    with pytest.raises(NotImplementedError, match=r"model\.layers\.0\.mlp\.input_linear: weight_by_routing"):
        with LayerObserver("model.layers.0", layer, [u for u in found if u.layer == 0], names, weight_by_routing=True):
            pass
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in layer.modules())
