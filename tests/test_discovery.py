"""moe_ao.discovery (moe_ao.units): logical linears of every supported architecture, in both expert layouts."""

from __future__ import annotations

import re
from collections import Counter

import archs
import pytest
import torch
from torch import nn

import moe_ao
from moe_ao.discovery import describe, unit_weight


def expected_layout(arch: str, cfg) -> dict:
    """What the config says the model holds, written per architecture from its config fields."""
    L = cfg.num_hidden_layers
    if arch == "mixtral":
        return dict(moe_layers=list(range(L)), E=cfg.num_local_experts, I=cfg.intermediate_size,
                    routers_per_moe=1, shared_I=None, dense_I=None,
                    attention=("q_proj", "k_proj", "v_proj", "o_proj"))
    if arch == "qwen2_moe":
        moe = [i for i in range(L) if i not in cfg.mlp_only_layers]
        # gate + shared_expert_gate (a 1-row sigmoid gate on the shared expert)
        return dict(moe_layers=moe, E=cfg.num_experts, I=cfg.moe_intermediate_size, routers_per_moe=2,
                    shared_I=cfg.shared_expert_intermediate_size, dense_I=cfg.intermediate_size,
                    attention=("q_proj", "k_proj", "v_proj", "o_proj"))
    if arch == "deepseek_v3":
        return dict(moe_layers=list(range(cfg.first_k_dense_replace, L)), E=cfg.n_routed_experts,
                    I=cfg.moe_intermediate_size, routers_per_moe=1,
                    shared_I=cfg.moe_intermediate_size * cfg.n_shared_experts, dense_I=cfg.intermediate_size,
                    attention=("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"))
    if arch == "deepseek_moe":
        return dict(moe_layers=list(range(cfg.first_k_dense_replace, L)), E=cfg.num_local_experts,
                    I=cfg.moe_intermediate_size, routers_per_moe=1,
                    shared_I=cfg.moe_intermediate_size * cfg.n_shared_experts, dense_I=cfg.intermediate_size,
                    attention=("q_proj", "k_proj", "v_proj", "o_proj"))
    raise AssertionError(f"no expectation written for {arch}")


@pytest.fixture(scope="module", params=archs.ARCHS)
def arch_model(request):
    return request.param, archs.build(request.param)


def test_kind_counts_match_config(arch_model):
    arch, model = arch_model
    cfg = model.config
    exp = expected_layout(arch, cfg)
    L, n_moe = cfg.num_hidden_layers, len(exp["moe_layers"])
    n_dense = L - n_moe
    found = Counter(u.kind for u in moe_ao.units(model))
    assert found["expert"] == 3 * exp["E"] * n_moe
    assert found["router"] == exp["routers_per_moe"] * n_moe
    assert found["shared_expert"] == (3 * n_moe if exp["shared_I"] else 0)
    assert found["dense_mlp"] == 3 * n_dense
    assert found["attention"] == len(exp["attention"]) * L
    assert found["embedding"] == 1 and found["lm_head"] == 1
    assert sum(found.values()) == len(moe_ao.units(model))
    assert describe(moe_ao.units(model))["expert"]["units"] == found["expert"]


def test_names_shapes_and_params(arch_model):
    arch, model = arch_model
    cfg = model.config
    exp = expected_layout(arch, cfg)
    H, I, E = cfg.hidden_size, exp["I"], exp["E"]
    by_name = {u.name: u for u in moe_ao.units(model)}
    for layer in range(cfg.num_hidden_layers):
        attn = [n for n, u in by_name.items() if u.kind == "attention" and u.layer == layer]
        assert attn == [f"model.layers.{layer}.self_attn.{p}" for p in exp["attention"]]
        for name in attn:
            u = by_name[name]
            assert u.shape == tuple(model.get_parameter(u.param).shape) and u.param == f"{name}.weight"
        if layer in exp["moe_layers"]:
            for e in range(E):
                for proj, shape in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
                    u = by_name[f"model.layers.{layer}.mlp.experts.{e}.{proj}"]
                    assert (u.kind, u.layer, u.expert, u.proj, u.shape) == ("expert", layer, e, proj, shape)
                    assert u.numel == shape[0] * shape[1]
            assert f"model.layers.{layer}.mlp.experts.{E}.gate_proj" not in by_name
            assert by_name[f"model.layers.{layer}.mlp.gate"].shape == (E, H)
        else:
            for proj, shape in (("gate_proj", (exp["dense_I"], H)), ("up_proj", (exp["dense_I"], H)),
                                ("down_proj", (H, exp["dense_I"]))):
                u = by_name[f"model.layers.{layer}.mlp.{proj}"]
                assert (u.kind, u.shape) == ("dense_mlp", shape)
    shared = [u for u in by_name.values() if u.kind == "shared_expert"]
    for u in shared:
        assert u.shape == ((exp["shared_I"], H) if u.proj != "down_proj" else (H, exp["shared_I"]))
    # Every unit's weight has the unit's shape.
    for u in by_name.values():
        assert tuple(unit_weight(model, u).shape) == u.shape, u.name


def test_dsv3_mla_names():
    model = archs.build("deepseek_v3")
    cfg = model.config
    names = {u.name: u for u in moe_ao.units(model) if u.layer == 0 and u.kind == "attention"}
    head = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    H, n = cfg.hidden_size, cfg.num_attention_heads
    assert names["model.layers.0.self_attn.q_a_proj"].shape == (cfg.q_lora_rank, H)
    assert names["model.layers.0.self_attn.q_b_proj"].shape == (n * head, cfg.q_lora_rank)
    assert names["model.layers.0.self_attn.kv_a_proj_with_mqa"].shape == (cfg.kv_lora_rank + cfg.qk_rope_head_dim, H)
    assert names["model.layers.0.self_attn.kv_b_proj"].shape == (
        n * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank)
    assert names["model.layers.0.self_attn.o_proj"].shape == (H, n * cfg.v_head_dim)


def test_both_layouts_share_names():
    """Fused (transformers 5) and ModuleList experts give names of one pattern."""
    fused = archs.build("mixtral")
    listed = archs.build("deepseek_moe")
    fused_units = [u for u in moe_ao.units(fused) if u.kind == "expert"]
    list_units = [u for u in moe_ao.units(listed) if u.kind == "expert"]
    assert all(u.fused for u in fused_units) and not any(u.fused for u in list_units)
    pattern = r"model\.layers\.\d+\.mlp\.experts\.\d+\.(gate_proj|up_proj|down_proj)"
    for u in fused_units + list_units:
        assert re.fullmatch(pattern, u.name), u.name
    u = next(u for u in list_units if u.name == "model.layers.1.mlp.experts.3.up_proj")
    assert u.param == "model.layers.1.mlp.experts.3.up_proj.weight"
    assert unit_weight(listed, u) is listed.model.layers[1].mlp.experts[3].up_proj.weight


@pytest.mark.parametrize("arch", [a for a in archs.ARCHS if a != "deepseek_moe"])
def test_fused_unit_weight_rows(arch):
    """gate_up_proj[e] is [gate; up]: gate rows first, then up rows; views, not copies."""
    model = archs.build(arch)
    by_name = {u.name: u for u in moe_ao.units(model)}
    layer = next(u.layer for u in by_name.values() if u.kind == "expert")
    experts = model.model.layers[layer].mlp.experts
    E, two_I, H = experts.gate_up_proj.shape
    I = two_I // 2
    for e in (0, E - 1):
        prefix = f"model.layers.{layer}.mlp.experts.{e}"
        gate, up, down = (by_name[f"{prefix}.{p}"] for p in ("gate_proj", "up_proj", "down_proj"))
        assert (gate.rows, gate.segment, up.rows, up.segment) == ((0, I), 0, (I, two_I), 1)
        assert torch.equal(unit_weight(model, gate), experts.gate_up_proj[e, :I])
        assert torch.equal(unit_weight(model, up), experts.gate_up_proj[e, I:])
        assert torch.equal(unit_weight(model, down), experts.down_proj[e])
        # A view: writing through it changes the stored parameter.
        w = unit_weight(model, up)
        assert w.untyped_storage().data_ptr() == experts.gate_up_proj.untyped_storage().data_ptr()
        with torch.no_grad():
            w[0, 0] = 123.0
        assert experts.gate_up_proj[e, I, 0].item() == 123.0


@pytest.mark.parametrize("where", ["decoder_layer", "moe_block"])
def test_unknown_module_is_kept_in_float_and_named(where):
    model = archs.build("mixtral")
    if where == "decoder_layer":
        model.model.layers[1].adapter = nn.Sequential(nn.Linear(64, 64))
        name = "model.layers.1.adapter"
    else:
        model.model.layers[0].mlp.adapter = nn.Linear(64, 64)
        name = "model.layers.0.mlp.adapter"
    found = moe_ao.units(model)
    assert list(found.kept) == [name] and "kept in floating point" in found.kept[name]
    assert not any(u.param.startswith(name) for u in found)
    assert [u.name for u in found] == [u.name for u in moe_ao.units(archs.build("mixtral"))]


@pytest.mark.parametrize("where", ["decoder_layer", "moe_block"])
def test_unknown_module_that_may_be_moe_raises(where):
    model = archs.build("mixtral")
    bank = nn.Module()
    bank.w = nn.Parameter(torch.zeros(4, 64, 64))  # a 3D weight: maybe an experts bank, never kept silently
    if where == "decoder_layer":
        model.model.layers[1].adapter = bank
        name = "model.layers.1.adapter"
    else:
        model.model.layers[0].mlp.adapter = bank
        name = "model.layers.0.mlp.adapter"
    with pytest.raises(ValueError, match=name.replace(".", r"\.") + r".*3D parameter w \(4, 64, 64\)"):
        moe_ao.units(model)


def test_weightless_extra_module_is_fine():
    model = archs.build("mixtral")
    model.model.layers[1].extra_act = nn.SiLU()
    model.model.layers[1].extra_norm = nn.LayerNorm(64)  # 1-D weights only: not a linear
    assert len(moe_ao.units(model)) == len(moe_ao.units(archs.build("mixtral")))


def test_transposed_fused_experts_raise():
    model = archs.build("qwen2_moe")
    model.model.layers[1].mlp.experts.is_transposed = True
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.experts.*is_transposed=True"):
        moe_ao.units(model)


def test_unit_is_frozen_and_embedding_listed():
    model = archs.build("mixtral")
    us = moe_ao.units(model)
    emb = next(u for u in us if u.kind == "embedding")
    assert (emb.name, emb.shape, emb.layer) == ("model.embed_tokens", (archs.VOCAB, 64), None)
    head = next(u for u in us if u.kind == "lm_head")
    assert (head.name, head.shape) == ("lm_head", (archs.VOCAB, 64))
    with pytest.raises(AttributeError):
        emb.bits = 4  # frozen dataclass
