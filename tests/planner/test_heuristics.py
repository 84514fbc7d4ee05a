"""Every heuristic picks the units it must, on the tiny models of tests/archs.py."""

from __future__ import annotations

import archs
import pytest
import torch

from moe_ao.discovery import unit_weight, units
from moe_ao.planner import plan

GS = "auto"


def bits_by(p, m, kind):
    return {u.name: p[u.name].bits for u in units(m) if u.kind == kind}


def raised_experts(p, m) -> set[tuple[int, int]]:
    """(layer, expert) pairs whose linears are all above 2 bits."""
    out: dict[tuple[int, int], bool] = {}
    for u in units(m):
        if u.kind == "expert":
            key = (u.layer, u.expert)
            out[key] = out.get(key, True) and p[u.name].bits > 2
    return {k for k, v in out.items() if v}


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_moe", "qwen2_moe"])
def test_base_is_experts_2_others_4(model, arch):
    m = model(arch)
    p = plan(m, "base", group_size=GS)
    for u in units(m):
        expected = {"expert": 2, "attention": 4, "shared_expert": 4, "dense_mlp": 4}.get(u.kind)
        assert (p[u.name].bits if u.name in p else None) == expected, u.name  # routers etc. unplanned


def test_uniform(model):
    m = model("deepseek_v3")
    p = plan(m, "uniform", bits=3, group_size=GS)
    assert {s.bits for s in p.values()} == {3}
    assert {u.kind for u in units(m) if u.name in p} == {"attention", "expert", "shared_expert", "dense_mlp"}


@pytest.mark.parametrize("bits", [4, 8])
def test_attention_from_uniform_2(model, bits):
    m = model("mixtral")
    p = plan(m, "attention", bits=bits, group_size=GS)
    assert set(bits_by(p, m, "attention").values()) == {bits}
    assert set(bits_by(p, m, "expert").values()) == {2}


def test_attention_random_matches_attention_budget(model):
    m = model("mixtral")  # attention is 20% of the planned params, one expert 10%
    a = plan(m, "attention", bits=4, group_size=GS)
    r = plan(m, "attention-random", bits=4, group_size=GS, seed=42)
    assert a.meta["avg_bits"] == pytest.approx(2.4)
    assert r.meta["avg_bits"] == pytest.approx(2.4)
    assert len(raised_experts(r, m)) == 2 and set(bits_by(r, m, "attention").values()) == {2}
    assert plan(m, "attention-random", group_size=GS, seed=42) == r  # seeded
    seeds = {frozenset(raised_experts(plan(m, "attention-random", group_size=GS, seed=s), m)) for s in range(6)}
    assert len(seeds) > 1  # and actually random


def test_attention_random_budget_within_one_expert(model):
    m = model("deepseek_v3")  # expert and attention sizes do not divide: closest count
    a = plan(m, "attention", bits=4, group_size=GS)
    r = plan(m, "attention-random", bits=4, group_size=GS)
    expert_share = 3 * 32 * 64 * (4 - 2) / sum(u.numel for u in units(m) if u.name in r)
    assert 0 < abs(a.meta["avg_bits"] - r.meta["avg_bits"]) <= expert_share / 2
    # attention at 8 costs more than all experts at 4 can match: say so instead of a silent miss
    with pytest.raises(ValueError, match=r"reach at most 3\.1130 average bits, below the attention plan's 3\.4087"):
        plan(m, "attention-random", bits=8, group_size=GS)
    r8 = plan(m, "attention-random", bits=8, expert_bits=8, group_size=GS)
    a8 = plan(m, "attention", bits=8, group_size=GS)
    assert abs(a8.meta["avg_bits"] - r8.meta["avg_bits"]) <= 3 * expert_share / 2  # one 2 -> 8 expert is 3 shares


def test_shared(model):
    m = model("deepseek_moe")
    p = plan(m, "shared", group_size=GS)
    for u in units(m):
        if u.name in p:
            assert p[u.name].bits == (4 if u.kind == "shared_expert" else 2), u.name
    assert {s.bits for s in plan(model("mixtral"), "shared", group_size=GS).values()} == {2}  # none to raise


COUNTS = {0: [5, 50, 7, 40], 1: [100, 1, 2, 3]}


@pytest.mark.parametrize("k, expected", [(1, {(0, 1), (1, 0)}), (2, {(0, 1), (0, 3), (1, 0), (1, 3)}), (0, set())])
def test_frequency_picks_most_routed(model, profile, k, expected):
    m = model("mixtral")
    p = plan(m, "frequency", stats=profile(m, COUNTS), k=k, group_size=GS)
    assert raised_experts(p, m) == expected
    assert set(bits_by(p, m, "expert").values()) <= {2, 4}


def test_frequency_ties_break_by_expert_index(model, profile):
    m = model("mixtral")
    p = plan(m, "frequency", stats=profile(m, {0: [3, 7, 7, 7], 1: [1, 1, 1, 1]}), k=2, group_size=GS)
    assert raised_experts(p, m) == {(0, 1), (0, 2), (1, 0), (1, 1)}


def test_frequency_errors(model, profile):
    m = model("mixtral")
    with pytest.raises(ValueError, match=r"k=5; allowed: an int in \[0, 4\]"):
        plan(m, "frequency", stats=profile(m, COUNTS), k=5, group_size=GS)
    with pytest.raises(ValueError, match="needs a Profile with \\['routing_counts'\\]"):
        plan(m, "frequency", group_size=GS)
    prof = profile(m, COUNTS)
    del prof.routing_counts[1]
    with pytest.raises(ValueError, match=r"stats.routing_counts lacks MoE layers \[1\]; it has \[0\]"):
        plan(m, "frequency", stats=prof, group_size=GS)
    prof.routing_counts[1] = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="has 2 experts but the model's layer 1 has expert 3"):
        plan(m, "frequency", stats=prof, group_size=GS)


def test_frequency_global_uses_per_layer_shares(model, profile):
    m = model("qwen2_moe")  # MoE layers 1 and 2, 6 experts each
    counts = {1: [10, 10, 10, 10, 10, 50], 2: [300, 100, 100, 100, 100, 100]}
    p = plan(m, "frequency-global", stats=profile(m, counts), n=2, group_size=GS)
    # shares: layer 1 expert 5 = 0.5, layer 2 expert 0 = 0.375; raw counts would pick layer 2 twice
    assert raised_experts(p, m) == {(1, 5), (2, 0)}
    assert plan(m, "frequency-global", stats=profile(m, counts), group_size=GS).meta["details"]["n"] == 4


def test_frequency_random_is_seeded_and_same_budget(model, profile):
    m = model("deepseek_moe")
    prof = profile(m)
    f = plan(m, "frequency", stats=prof, k=2, group_size=GS)
    r1 = plan(m, "frequency-random", k=2, seed=1, group_size=GS)
    assert r1 == plan(m, "frequency-random", k=2, seed=1, group_size=GS)
    assert r1.meta["avg_bits"] == f.meta["avg_bits"]
    per_layer = {}
    for layer, _ in raised_experts(r1, m):
        per_layer[layer] = per_layer.get(layer, 0) + 1
    assert per_layer == {1: 2, 2: 2}
    draws = {frozenset(raised_experts(plan(m, "frequency-random", seed=s, group_size=GS), m)) for s in range(6)}
    assert len(draws) > 1


@pytest.mark.parametrize("arch, k", [("mixtral", 1), ("deepseek_moe", 2), ("qwen2_moe", 1)])
def test_first_and_last_k(model, arch, k):
    m = model(arch)
    n_layers = m.config.num_hidden_layers
    for name, chosen in (("first-k", set(range(k))), ("last-k", set(range(n_layers - k, n_layers)))):
        p = plan(m, name, k=k, base="uniform-low", group_size=GS)
        for u in units(m):
            if u.name in p:
                ffn = u.kind in ("expert", "shared_expert", "dense_mlp")
                assert p[u.name].bits == (4 if ffn and u.layer in chosen else 2), (name, u.name)
        assert p.meta["details"]["blocks"] == sorted(chosen, reverse=name == "last-k")


def test_first_k_default_scales_with_depth(model):
    p = plan(model("mixtral"), "first-k", group_size=GS)  # 4 of 32 blocks -> 1 of 2
    assert p.meta["details"]["k"] == 1


def test_first_k_default_counts_moe_blocks_past_a_dense_layer_0(model):
    m = model("qwen2_moe")  # layer 0 dense, layers 1-2 MoE
    first = plan(m, "first-k", group_size=GS)
    assert first.meta["details"]["blocks"] == [0, 1]  # dense layer 0 plus one MoE block
    assert raised_experts(first, m) == {(1, e) for e in range(6)}
    last = plan(m, "last-k", group_size=GS)
    assert last.meta["details"]["blocks"] == [2] and raised_experts(last, m) == {(2, e) for e in range(6)}


def test_blocks_random(model):
    m = model("deepseek_moe")
    p = plan(m, "blocks-random", k=1, seed=3, group_size=GS)
    [layer] = p.meta["details"]["blocks"]
    assert layer in (1, 2)
    assert raised_experts(p, m) == {(layer, e) for e in range(5)}
    assert p == plan(m, "blocks-random", k=1, seed=3, group_size=GS)
    assert p.meta["avg_bits"] == plan(m, "last-k", k=1, group_size=GS).meta["avg_bits"]  # same budget as k blocks


@pytest.mark.parametrize("proj, canonical", [("down_proj", "down_proj"), ("gate_proj", "gate_proj"), ("w3", "up_proj")])
def test_linear_type_picks_only_that_projection(model, proj, canonical):
    m = model("deepseek_v3")
    p = plan(m, "linear-type", proj=proj, group_size=GS)
    for u in units(m):
        if u.kind == "expert":
            assert p[u.name].bits == (4 if u.proj == canonical else 2), u.name
    assert p.meta["avg_bits"] == pytest.approx(plan(m, "linear-type", proj="up_proj", group_size=GS).meta["avg_bits"])


def test_linear_type_rejects_unknown_projection(model):
    with pytest.raises(ValueError, match=r"proj='o_proj'.*allowed: \['down_proj', 'gate_proj', 'up_proj'\]"):
        plan(model("mixtral"), "linear-type", proj="o_proj", group_size=GS)


@pytest.fixture(scope="module")
def planted():
    """A Mixtral copy where 6 of its 24 expert linears carry one large outlier each."""
    m = archs.build("mixtral")
    experts = [u for u in units(m) if u.kind == "expert"]
    chosen = [experts[i] for i in (0, 4, 8, 13, 17, 23)]
    with torch.no_grad():
        for j, u in enumerate(chosen):
            unit_weight(m, u)[3, 5 + j] = 5.0 + j
    return m, {u.name for u in chosen}


def test_outlier_top_quarter_is_the_planted_units(planted):
    m, chosen = planted
    p = plan(m, "outlier", group_size=GS)  # 25% of 24 = 6
    assert {n for n, b in bits_by(p, m, "expert").items() if b == 4} == chosen
    assert sum(p.meta["details"]["selected_by_proj"].values()) == 6


def test_outlier_fraction_and_unit_list(planted):
    m, chosen = planted
    p = plan(m, "outlier", fraction=0.125, group_size=GS)  # the 3 largest of the planted: 5+5, 5+4, 5+3
    top = {n for n, b in bits_by(p, m, "expert").items() if b == 4}
    assert len(top) == 3 and top <= chosen
    with pytest.raises(ValueError, match="reads weights; pass the model, not a unit list"):
        plan(units(m), "outlier", group_size=GS)
    with pytest.raises(ValueError, match=r"fraction=1.5; allowed: a number in \[0, 1\]"):
        plan(m, "outlier", fraction=1.5, group_size=GS)


def test_outlier_random_is_seeded_and_same_budget(planted):
    m, _ = planted
    o = plan(m, "outlier", group_size=GS)
    r = plan(m, "outlier-random", seed=7, group_size=GS)
    assert r == plan(m, "outlier-random", seed=7, group_size=GS)
    assert r.meta["avg_bits"] == o.meta["avg_bits"]
    draws = {tuple(sorted(n for n, b in bits_by(plan(m, "outlier-random", seed=s, group_size=GS), m, "expert").items()
                          if b == 4)) for s in range(4)}
    assert len(draws) > 1


def test_layerisp_raises_lowest_similarity_blocks(model, profile):
    m = model("deepseek_moe")  # MoE layers 1 and 2
    prof = profile(m, cos={1: 0.1, 2: 0.8}, n=256)
    p = plan(m, "layerisp", stats=prof, k=1, max_epochs=40, batch_size=32, group_size=GS)
    assert raised_experts(p, m) == {(1, e) for e in range(5)}
    d = p.meta["details"]
    assert d["ranking"] == [1, 2] and d["blocks"] == [1]
    assert d["scores"]["1"] < d["scores"]["2"]
    with pytest.raises(ValueError, match=r"needs a Profile with \['block_inputs', 'block_cos'\]"):
        plan(m, "layerisp", k=1, group_size=GS)


def test_combination_is_max_over_rules(model, profile, planted):
    m, _ = planted
    prof = profile(m, COUNTS)
    combo = plan(m, "combination", stats=prof, rules="+Attn+Freq+LinearOSP", rule_params={"freq": {"k": 1}},
                 group_size=GS)
    low = dict(base="uniform-low", group_size=GS)
    parts = [plan(m, "attention", **low), plan(m, "frequency", stats=prof, k=1, **low), plan(m, "outlier", **low)]
    for name in combo:
        assert combo[name].bits == max(p[name].bits for p in parts), name
    assert combo.meta["details"]["rules"] == ["attn", "freq", "linearosp"]


def test_combination_errors(model, profile):
    m = model("mixtral")
    with pytest.raises(ValueError, match=r"need distinct names from \[.*'attn'.*\].*unknown \['attention'\]"):
        plan(m, "combination", rules="+Attention", group_size=GS)
    with pytest.raises(ValueError, match=r"rule_params names \['shared'\], which are not among"):
        plan(m, "combination", rules="+Attn", rule_params={"shared": {"bits": 8}}, group_size=GS)
    with pytest.raises(ValueError, match=r"rule 'freq' does not take \['n'\]"):
        plan(m, "combination", stats=profile(m), rules=["attn", "FREQ"], rule_params={"Freq": {"n": 2}}, group_size=GS)
