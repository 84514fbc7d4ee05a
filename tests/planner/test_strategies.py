"""The registry and ``plan()``: dispatch, budgets, meta, determinism."""

from __future__ import annotations

import pytest

from moe_ao.discovery import units
from moe_ao.planner import STRATEGIES, parse_params, plan, strategy_help, strategy_names
from moe_ao.plans import Plan

GS = "auto"
FAST_ISP = dict(max_epochs=3, batch_size=32)


def kwargs_for(name: str, prof) -> dict:
    """Parameters that make every strategy runnable on the tiny models."""
    kw = {"stats": prof, "group_size": GS}
    if name == "layerisp":
        kw |= dict(k=1, **FAST_ISP)
    if name == "combination":
        kw["rule_params"] = {"layerisp": dict(k=1, **FAST_ISP), "firstl": {"k": 1}}
    if name == "knapsack":
        kw["budget_bits"] = 3.0
    return kw


def test_unknown_strategy_lists_allowed():
    with pytest.raises(ValueError, match=r"strategy='greedy' is not known; allowed: \['attention', .*'uniform'\]"):
        plan([], "greedy")
    assert "optimizer" in strategy_names() and "knapsack" in strategy_names()


def test_unknown_parameter_lists_allowed(model):
    with pytest.raises(ValueError, match=r"strategy 'first-k' does not take \['n'\]; allowed parameters: \['k', 'b"):
        plan(model("mixtral"), "first-k", n=2, group_size=GS)


def test_alias(model, profile):
    m = model("mixtral")
    a = plan(m, "optimizer", budget_bits=2.5, group_size=GS)
    assert a == plan(m, "knapsack", budget_bits=2.5, group_size=GS) and a.meta["strategy"] == "knapsack"


def test_meta_records_provenance(model, profile):
    m = model("deepseek_moe")
    p = plan(m, "frequency", stats=profile(m), seed=3, group_size=GS, k=1)
    meta = p.meta
    assert meta["strategy"] == "frequency" and meta["params"] == {"k": 1, "bits": 4}
    assert meta["seed"] == 3 and meta["budget_bits"] is None and meta["group_size"] == "auto"
    assert meta["base"] == {"attention": 4, "expert": 2, "shared_expert": 4, "dense_mlp": 4}
    assert meta["avg_bits"] == p.avg_bits(m) and meta["true_avg_bits"] == p.true_avg_bits(m)
    assert meta["true_avg_bits"] > meta["avg_bits"]  # scales cost bits
    assert set(meta["details"]["selected"]) == {"1", "2"}


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3"])
def test_every_strategy_is_deterministic_and_round_trips(model, profile, arch):
    m = model(arch)
    for name in sorted(STRATEGIES):
        a = plan(m, name, **kwargs_for(name, profile(m)))
        b = plan(m, name, **kwargs_for(name, profile(m)))
        assert a.to_json() == b.to_json(), name
        back = Plan.from_json(a.to_json())
        assert back == a and back.meta == a.meta and back.to_json() == a.to_json(), name
        back.validate(units(m))


BUDGETED = ["attention", "attention-random", "shared", "frequency", "frequency-global", "frequency-random", "first-k",
            "last-k", "blocks-random", "linear-type", "outlier", "outlier-random", "combination"]


@pytest.mark.parametrize(
    "arch, name",
    [(a, n) for a in ("mixtral", "qwen2_moe", "deepseek_moe") for n in BUDGETED] + [("deepseek_moe", "layerisp")],
)
def test_budget_hit_within_one_unit(model, profile, arch, name):
    m = model(arch)
    prof = profile(m)
    kw = kwargs_for(name, prof)
    first = plan(m, name, budget_bits=plan(m, name, **kw).meta["avg_bits"], **kw)
    lo, hi = first.meta["details"]["feasible_range"]
    low, high = plan(m, name, budget_bits=lo, **kw), plan(m, name, budget_bits=hi, **kw)
    total = sum(u.numel for u in units(m) if u.name in low)
    max_share = max(abs(high[u.name].bits - low[u.name].bits) * u.numel for u in units(m) if u.name in low) / total
    for f in (0.0, 0.37, 0.5, 0.81, 1.0):
        budget = lo + f * (hi - lo)
        p = plan(m, name, budget_bits=budget, **kw)
        assert abs(p.meta["avg_bits"] - budget) <= max_share + 1e-12, (name, f)
        assert p.meta["budget_bits"] == budget and p.meta["details"]["raised_units"] >= 0
    for bad in (lo - 0.05, hi + 0.05):
        with pytest.raises(ValueError, match=rf"budget_bits=.* is infeasible for strategy '{name}': its feasible"):
            plan(m, name, budget_bits=bad, **kw)


def test_budget_follows_the_ranking(model, profile):
    """With a budget, frequency raises experts in ranking order: top-1 everywhere before any second."""
    m = model("mixtral")
    prof = profile(m, {0: [5, 50, 7, 40], 1: [100, 1, 2, 3]})
    top1 = plan(m, "frequency", stats=prof, k=1, group_size=GS)
    p = plan(m, "frequency", stats=prof, budget_bits=top1.meta["avg_bits"], group_size=GS)
    assert p.to_dict()["units"] == top1.to_dict()["units"]
    half = plan(m, "frequency", stats=prof, budget_bits=top1.meta["avg_bits"] + 0.05, group_size=GS)
    raised = [n for n in half if half[n].bits == 4 and top1[n].bits == 2]
    assert raised == ["model.layers.0.mlp.experts.3.gate_proj"]  # layer 0's second expert, first linear


def test_uniform_budget_is_a_point(model):
    m = model("mixtral")
    assert plan(m, "uniform", bits=3, budget_bits=3.0, group_size=GS).meta["avg_bits"] == 3.0
    with pytest.raises(ValueError, match=r"feasible range is \[3\.0000, 3\.0000\]"):
        plan(m, "uniform", bits=3, budget_bits=3.5, group_size=GS)


def test_plan_accepts_unit_lists(model, profile):
    m = model("qwen2_moe")
    prof = profile(m)
    assert plan(units(m), "frequency", stats=prof, group_size=GS) == plan(m, "frequency", stats=prof, group_size=GS)


def test_cli_helpers(model):
    params = parse_params(["k=2", "proj=down_proj", "bits=[2, 4]", "rules=+Attn+Freq", "scale_by_frequency=false"])
    assert params == {"k": 2, "proj": "down_proj", "bits": [2, 4], "rules": "+Attn+Freq", "scale_by_frequency": False}
    with pytest.raises(ValueError, match="parameter 'k' is not KEY=VALUE"):
        parse_params(["k"])
    text = strategy_help()
    assert len(text.splitlines()) == len(STRATEGIES)
    assert "first-k" in text and "[k, bits]" in text and "budget_bits" not in text
    p = plan(model("mixtral"), "linear-type", group_size=GS, **parse_params(["proj=up_proj"]))
    assert p.meta["params"] == {"proj": "up_proj", "bits": 4}
