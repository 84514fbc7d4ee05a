"""Serving constraints (moe_ao.planner.serving): plans the engines can hold, and refusals naming the layer."""

from __future__ import annotations

import pytest

from moe_ao.discovery import units
from moe_ao.planner import plan
from moe_ao.planner.serving import TARGETS, check_plan, get_target, lift, tie_groups
from moe_ao.plans import Plan

BITS = (2, 3, 4, 8)


def table_for(m, seed_layer: int = 1):
    """Losses where one expert of ``seed_layer`` is very sensitive: a free plan would give it alone 8 bits."""
    us = [u for u in units(m) if u.kind in ("attention", "expert", "shared_expert", "dense_mlp")]
    table = {u.name: {b: 1.0 / b for b in BITS} for u in us}
    hot = next(u for u in us if u.kind == "expert" and u.layer == seed_layer and u.expert == 0)
    table[hot.name] = {2: 1000.0, 3: 500.0, 4: 100.0, 8: 0.0}
    return table, hot


def test_free_knapsack_splits_a_layer_and_vllm_does_not(model):
    m = model("qwen2_moe")
    table, hot = table_for(m)
    free = plan(m, "knapsack", budget_bits=3.0, sensitivities=table, group_size=32)
    layer = {free[u.name].bits for u in units(m) if u.kind == "expert" and u.layer == hot.layer}
    assert len(layer) > 1  # moe_ao itself holds a width per expert
    p = plan(m, "knapsack", budget_bits=5.0, sensitivities=table, group_size=32, serving="vllm")
    check_plan(p, units(m), get_target("vllm"))
    for layer in {u.layer for u in units(m) if u.kind == "expert"}:
        assert len({p[u.name].bits for u in units(m) if u.kind == "expert" and u.layer == layer}) == 1
    assert {s.bits for s in p.values()} <= {4, 8} and p.meta["serving"] == "vllm"
    assert p.meta["avg_bits"] <= 5.0
    assert p[hot.name].bits == 8  # the hot expert still wins its layer 8 bits
    qkv = {p[u.name].bits for u in units(m) if u.kind == "attention" and u.layer == 0 and u.proj != "o_proj"}
    assert len(qkv) == 1


def test_llama_cpp_ties_experts_per_projection(model):
    m = model("mixtral")
    table, hot = table_for(m)
    p = plan(m, "knapsack", budget_bits=3.0, sensitivities=table, group_size=32, serving="llama.cpp")
    check_plan(p, units(m), get_target("llama.cpp"))
    experts = [u for u in units(m) if u.kind == "expert" and u.layer == hot.layer]
    for proj in ("gate_proj", "up_proj", "down_proj"):
        assert len({p[u.name].bits for u in experts if u.proj == proj}) == 1
    assert p.meta["details"]["tied_groups"] < len([u for u in units(m) if u.name in p])


def test_rules_are_lifted_to_what_the_engine_runs(model):
    m = model("mixtral")
    p = plan(m, "linear-type", proj="down_proj", group_size=32, serving="vllm")
    assert {s.bits for s in p.values()} <= {4, 8}
    check_plan(p, units(m), get_target("vllm"))
    us = units(m)
    assert lift({u.name: 2 for u in us if u.kind == "expert"}, us, get_target("vllm-humming")) == \
        {u.name: 2 for u in us if u.kind == "expert"}


def test_check_plan_names_the_layer(model):
    m = model("mixtral")
    us = units(m)
    mixed = Plan({u.name: 8 if u.expert == 0 else 4 for u in us if u.kind == "expert"}, group_size=32)
    expected = r"layer 0 routed experts \(vLLM: one scheme per MoE layer\).*\['4-bit g32', '8-bit g32'\]"
    with pytest.raises(ValueError, match=expected):
        check_plan(mixed, us, get_target("vllm"))
    check_plan(Plan({u.name: 4 for u in us if u.kind == "expert"}, group_size=32), us, get_target("vllm"))
    with pytest.raises(ValueError, match=r"group_size=16 is not supported by vLLM.*\(32, 64, 128\)"):
        check_plan(Plan({u.name: 4 for u in us if u.kind == "expert"}, group_size=16), us, get_target("vllm"))
    with pytest.raises(ValueError, match=r"3-bit expert is not supported by vLLM.*allowed: \(4, 8\)"):
        check_plan(Plan({u.name: 3 for u in us if u.kind == "expert"}, group_size=32), us, get_target("vllm"))
    check_plan(Plan({u.name: 3 for u in us if u.kind == "expert"}, group_size=32), us, get_target("vllm-humming"))
    with pytest.raises(ValueError, match=r"asymmetric codes are not supported by llama.cpp"):
        check_plan(Plan({u.name: 4 for u in us if u.kind == "expert"}, group_size=32, symmetric=False), us,
                   get_target("llama.cpp"))
    for kind, name in (("lm_head", "lm_head"), ("embedding", r"model\.embed_tokens")):
        outside = Plan({u.name: 4 for u in us if u.kind in ("expert", kind)}, group_size=32)
        assert any(u.kind == kind for u in us)
        check_plan(outside, us, get_target("llama.cpp"))  # GGUF's output / token_embd are quantized like any linear
        with pytest.raises(ValueError, match=rf"{name}: vLLM .* keeps {kind}s unquantized; plan it at 16 bits"):
            check_plan(outside, us, get_target("vllm"))
    with pytest.raises(ValueError, match=r"serving='sglang' is not known; allowed: \['llama.cpp', 'vllm'"):
        get_target("sglang")


def test_tie_groups_cover_every_unit_once(model):
    for arch in ("qwen2_moe", "deepseek_moe"):
        us = units(model(arch))
        for target in TARGETS.values():
            groups = tie_groups(us, target)
            assert sorted(u.name for g in groups for u in g) == sorted(u.name for u in us)
