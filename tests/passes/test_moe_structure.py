"""The dataflow MoE pass against name-based units, on every arch and on a model with no known names."""

from __future__ import annotations

import copy

import archs
import pytest
import torch
import toy_moe
from test_architectures import fake_quant_reference
from torch import nn

import moe_ao
import moe_ao.experts
from moe_ao.discovery import decoder_layers, unit_weight
from moe_ao.passes import find_moe_structure, find_moe_units

# Counts written from tests/archs.py configs. attention_linears: 4 per layer (q/k/v/o;
from moe_ao.unit import KINDS

# DeepSeek-V3 MLA: q_a, q_b, kv_a, kv_b, o); routed_weights: parameters holding routed
# experts (a fused bank pair per MoE layer; DeepSeek-MoE: 3 linears x 5 experts x 2 layers).
EXPECTED = {
    "mixtral": dict(attention_cores=2, attention_linears=8, routers=2, shared_gates=0, routed_banks=2,
                    routed_weights=4, shared_linears=0, dense_linears=0, embeddings=1, lm_heads=1, units=36),
    "qwen2_moe": dict(attention_cores=3, attention_linears=12, routers=2, shared_gates=2, routed_banks=2,
                      routed_weights=4, shared_linears=6, dense_linears=3, embeddings=1, lm_heads=1, units=63),
    "deepseek_v3": dict(attention_cores=3, attention_linears=15, routers=2, shared_gates=0, routed_banks=2,
                        routed_weights=4, shared_linears=6, dense_linears=3, embeddings=1, lm_heads=1, units=76),
    "deepseek_moe": dict(attention_cores=3, attention_linears=12, routers=2, shared_gates=0, routed_banks=2,
                         routed_weights=30, shared_linears=6, dense_linears=3, embeddings=1, lm_heads=1, units=55),
}


def by_name(units):
    return sorted(units, key=lambda u: u.name)


@pytest.fixture(scope="module", params=archs.ARCHS)
def arch_structure(request):
    model = archs.build(request.param)
    return request.param, model, find_moe_structure(model)


def test_agrees_with_name_based_units(arch_structure):
    _, model, structure = arch_structure
    assert by_name(structure.units) == by_name(moe_ao.units(model))  # every field of every unit


def test_counters_exact(arch_structure):
    arch, _, structure = arch_structure
    assert dict(structure.counters) == EXPECTED[arch]


def test_roles_and_restored_implementation(arch_structure):
    arch, model, structure = arch_structure
    assert set(structure.roles.values()) <= set(KINDS)
    if hasattr(model.config, "_experts_implementation"):  # switched for the capture only
        assert model.config._experts_implementation == archs.build(arch).config._experts_implementation


@pytest.mark.parametrize("tokens", [1, 8], ids=["decode_bmm", "prefill_grouped_mm"])
def test_moe_ao_experts_implementation(tokens):
    """moe_ao's implementation traces to index+bmm (decode) or sort+grouped_mm (prefill)."""
    moe_ao.experts.register()
    model = archs.build("mixtral")
    ids = torch.arange(tokens).reshape(1, tokens)
    structure = find_moe_structure(model, ids, implementation=moe_ao.experts.IMPLEMENTATION)
    assert by_name(structure.units) == by_name(moe_ao.units(model))
    assert dict(structure.counters) == EXPECTED["mixtral"]


def toy_units() -> list[moe_ao.Unit]:
    """What the toy holds, written by hand from toy_moe.py (not from any discovery)."""
    H, I, E, S, V = toy_moe.H, toy_moe.I, toy_moe.E, toy_moe.S, toy_moe.V
    U = moe_ao.Unit
    out = [U("tok", "embedding", None, None, "weight", (V, H), "tok.weight")]
    for L in range(3):
        out += [U(f"stack.{L}.mix.{w}", "attention", L, None, w, (H, H), f"stack.{L}.mix.{w}.weight")
                for w in ("wq", "wk", "wv", "wo")]
        p = f"stack.{L}.ffn"
        if L == 0:
            out += [U(f"{p}.gate_proj", "dense_mlp", 0, None, "gate_proj", (2 * H, H), f"{p}.left.weight"),
                    U(f"{p}.up_proj", "dense_mlp", 0, None, "up_proj", (2 * H, H), f"{p}.right.weight"),
                    U(f"{p}.down_proj", "dense_mlp", 0, None, "down_proj", (H, 2 * H), f"{p}.back.weight")]
            continue
        out.append(U(f"{p}.w_route", "router", L, None, "weight", (E, H), f"{p}.w_route"))
        for e in range(E):
            out += [U(f"{p}.{e}.gate_proj", "expert", L, e, "gate_proj", (I, H), f"{p}.bank", True, (0, I), 0),
                    U(f"{p}.{e}.up_proj", "expert", L, e, "up_proj", (I, H), f"{p}.bank", True, (I, 2 * I), 1),
                    U(f"{p}.{e}.down_proj", "expert", L, e, "down_proj", (H, I), f"{p}.bank_out", True, (0, H), 0)]
        out += [U(f"{p}.always.up_proj", "shared_expert", L, None, "up_proj", (S, H), f"{p}.always.0.weight"),
                U(f"{p}.always.down_proj", "shared_expert", L, None, "down_proj", (H, S), f"{p}.always.2.weight")]
    return out + [U("out", "lm_head", None, None, "weight", (V, H), "out.weight")]


def test_toy_model_only_the_graph_pass_reads():
    model = toy_moe.ToyLM()
    structure = find_moe_structure(model, toy_moe.toy_ids())
    assert structure.units == toy_units()  # also in model order
    assert dict(structure.counters) == dict(
        attention_cores=3, attention_linears=12, routers=2, shared_gates=0, routed_banks=2, routed_weights=4,
        shared_linears=4, dense_linears=3, embeddings=1, lm_heads=1, units=47)
    with pytest.raises(ValueError, match="decoder layer list"):  # name-based discovery cannot start
        decoder_layers(model)
    # moe_ao.units falls back to the pass; unit weights are views of the stored banks.
    fallback = moe_ao.units(model)
    assert fallback == structure.units
    up = next(u for u in fallback if u.name == "stack.2.ffn.3.up_proj")
    assert torch.equal(unit_weight(model, up), model.stack[2].ffn.bank[3, toy_moe.I:])


def test_tied_embedding_and_head_keep_their_own_names():
    structure = find_moe_structure(toy_moe.ToyLM(tie=True), toy_moe.toy_ids())
    assert structure.units == toy_units()  # export lists the tied weight once; both units remain
    assert structure.counters["embeddings"] == structure.counters["lm_heads"] == 1


class SideLinear(nn.Module):
    """A block followed by a residual linear that is none of the known roles."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block, self.side = block, nn.Linear(toy_moe.H, toy_moe.H, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block(x)
        return x + self.side(x)


class Scaled(nn.Module):
    """A block whose output is scaled by a row of a 2D parameter (no matmul)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block, self.table = block, nn.Parameter(torch.ones(2, toy_moe.H))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x) * self.table[0]


def _side(m):
    m.stack[1] = SideLinear(m.stack[1])


def _scaled(m):
    m.stack[1] = Scaled(m.stack[1])


def _unused(m):
    m.stack[1].ffn.spare = nn.Linear(toy_moe.H, toy_moe.H)


def _router_in_out(m):
    m.stack[1].ffn = toy_moe.Switchboard(use_bmm=False, router_in_out=True)


@pytest.mark.parametrize("break_it, message", [
    (_side, r"stack\.1\.side\.weight in stack\.1\.side \(Linear\): a linear that is not"),
    (_scaled, r"stack\.1\.table in stack\.1 \(Scaled\): consumed by aten\.mul"),
    (_unused, r"stack\.1\.ffn\.spare\.weight in stack\.1\.ffn\.spare \(Linear\): never used"),
    (_router_in_out, r"stack\.1\.ffn\.w_route in stack\.1\.ffn \(Switchboard\): used as \[in, out\]"),
], ids=["lone_linear", "elementwise_weight", "unused_weight", "router_in_out"])
def test_unknown_structure_names_the_module(break_it, message):
    model = toy_moe.ToyLM()
    break_it(model)
    with pytest.raises(ValueError, match=message):
        find_moe_units(model, toy_moe.toy_ids())


def test_units_fallback_reports_both_reasons():
    model = toy_moe.ToyLM()
    _side(model)
    with pytest.raises(ValueError, match=r"decoder layer list.*; graph pass: stack\.1\.side\.weight"):
        moe_ao.units(model)


class HiddenLM(nn.Module):
    """ToyLM's blocks and head fed hidden states [B, T, H] instead of token ids: no embedding."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stack = nn.ModuleList([toy_moe.Block(toy_moe.Dense()), toy_moe.Block(toy_moe.Switchboard(True))])
        self.norm = nn.LayerNorm(toy_moe.H)
        self.out = nn.Linear(toy_moe.H, toy_moe.V, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        for block in self.stack:
            hidden = block(hidden)
        return self.out(self.norm(hidden))


def test_units_with_example_inputs_for_a_custom_forward(tmp_path):
    model = HiddenLM()
    x = torch.randn(1, 6, toy_moe.H, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match=r"no single nn\.Embedding.*pass example_inputs"):
        moe_ao.units(model)
    found = moe_ao.units(model, example_inputs=(x,))
    assert found == find_moe_units(model, {"hidden": x})  # positional or keyword
    experts = [u for u in found if u.kind == "expert"]
    assert len(experts) == 3 * toy_moe.E and {u.param for u in experts} == {"stack.1.ffn.bank", "stack.1.ffn.bank_out"}
    plan = moe_ao.Plan({u.name: 4 for u in found if u.kind in ("expert", "attention")}, group_size=16)
    float_model = copy.deepcopy(model)
    moe_ao.quantize_(model, plan)  # units(model) inside traces with the remembered inputs
    ref = fake_quant_reference(float_model, model, [u for u in found if u.name in plan])
    with torch.no_grad():
        got, want, base = model(x), ref(x), float_model(x)
    assert ((got - want).norm() / want.norm()).item() < 1e-5
    assert ((got - base).norm() / base.norm()).item() > 1e-3
    with pytest.raises(TypeError, match="HiddenLM: save_quantized .* needs a model with a transformers config"):
        moe_ao.save_quantized(model, tmp_path / "q")
    assert not (tmp_path / "q").exists()
