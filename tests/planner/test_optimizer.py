"""The knapsack solvers against brute force, and the budgeted optimizer strategy."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_ao.discovery import units
from moe_ao.planner import measure_sensitivities, plan
from moe_ao.planner.optimizer import solve, solve_dp, solve_greedy, solve_lagrangian

BITS = (2, 3, 4, 8)


def brute_force(losses, costs, capacity) -> float:
    best = float("inf")
    for choice in itertools.product(*(range(len(o)) for o in losses)):
        if sum(c[j] for c, j in zip(costs, choice)) <= capacity:
            best = min(best, sum(lo[j] for lo, j in zip(losses, choice)))
    return best


@st.composite
def instances(draw, n_units=6):
    """n_units x 4 widths; costs = bits x params; losses fall with bits (mostly) or are arbitrary."""
    params = [64 * draw(st.integers(1, 6)) for _ in range(n_units)]
    monotone = draw(st.booleans())
    losses = []
    for _ in range(n_units):
        vals = [draw(st.floats(0, 100, allow_nan=False)) for _ in BITS]
        losses.append(sorted(vals, reverse=True) if monotone else vals)
    costs = [[b * p for b in BITS] for p in params]
    lo, hi = sum(c[0] for c in costs), sum(c[-1] for c in costs)
    capacity = draw(st.integers(lo, hi))
    return losses, costs, capacity


@settings(max_examples=60, deadline=None)
@given(instances())
def test_dp_is_exact_and_lagrangian_within_its_gap(inst):
    losses, costs, capacity = inst
    opt = brute_force(losses, costs, capacity)
    dp = solve_dp(losses, costs, capacity)
    assert dp.cost <= capacity
    assert dp.objective == pytest.approx(opt, abs=1e-9)
    assert dp.gap == 0
    lag = solve_lagrangian(losses, costs, capacity)
    assert lag.cost <= capacity
    assert lag.dual_bound <= opt + 1e-9  # a true lower bound
    assert opt - 1e-9 <= lag.objective <= opt + lag.gap + 1e-9
    greedy = solve_greedy(losses, costs, capacity)
    assert greedy.cost <= capacity and dp.objective <= greedy.objective + 1e-9


def test_dp_beats_greedy_where_greedy_is_myopic():
    # Unit 0's step has the better ratio (10 per 2 bits) but then unit 1's big win (100 per 21) no longer fits.
    losses = [[10.0, 0.0], [100.0, 0.0]]
    costs = [[1, 3], [1, 22]]
    greedy, dp = solve_greedy(losses, costs, 23), solve_dp(losses, costs, 23)
    assert (greedy.objective, greedy.choice) == (100.0, [1, 0])
    assert (dp.objective, dp.choice) == (10.0, [0, 1])
    lag = solve_lagrangian(losses, costs, 23)
    assert 10.0 <= lag.objective <= 10.0 + lag.gap
    assert solve(losses, costs, 23).method == "dp"
    assert solve(losses, costs, 23, max_states=1).method == "lagrangian"


def test_solver_errors():
    with pytest.raises(ValueError, match=r"method='exact'; allowed: \('auto', 'dp', 'lagrangian', 'greedy'\)"):
        solve([[1.0]], [[1]], 1, method="exact")
    with pytest.raises(ValueError, match="capacity=1 is below the cheapest assignment's cost 2"):
        solve_dp([[1.0], [1.0]], [[1], [1]], 1)


def test_knapsack_plan_respects_budget_and_is_optimal_against_heuristics(model, profile):
    m = model("mixtral")
    prof = profile(m)
    us = [u for u in units(m) if u.kind in ("attention", "expert")]
    prof.hessians = {u.name: torch.eye(u.shape[1]) * (1 + i % 3) for i, u in enumerate(us)}
    freq = plan(m, "frequency", stats=prof, k=1, group_size="auto")
    budget = freq.meta["avg_bits"]
    ks = plan(m, "knapsack", budget_bits=budget, stats=prof, group_size="auto")
    assert ks.meta["avg_bits"] <= budget + 1e-12
    d = ks.meta["details"]
    assert d["method"] == "dp" and d["gap"] == 0 and d["sensitivity"] == "rtn-full-hessian+frequency"
    assert d["fallback_units"] == 0 and d["optimized_units"] == 32
    # the heuristic plan is feasible at its own budget, so its proxy loss cannot be lower
    from moe_ao.discovery import unit_weight
    from moe_ao.planner.scorers import sensitivity_table

    table, _ = sensitivity_table({u.name: unit_weight(m, u) for u in us}, us, prof, {u.name: 64 for u in us})
    assert d["objective"] == pytest.approx(sum(table[n][ks[n].bits] for n in table))
    assert d["objective"] <= sum(table[n][freq[n].bits] for n in table) + 1e-9


def test_knapsack_with_external_table_and_fixed_kinds(model):
    m = model("deepseek_moe")
    experts = [u for u in units(m) if u.kind == "expert"]
    table = {u.name: {str(b): 1.0 / b for b in BITS} for u in experts}  # JSON-style string keys
    hot = experts[7].name
    table[hot] = {"2": 1000.0, "3": 10.0, "4": 1.0, "8": 0.0}
    base = plan(m, "base", group_size="auto")
    step = 2048 / 147456  # one expert linear's share of the planned params: 0.0139 bits per bit
    p = plan(m, "knapsack", budget_bits=base.meta["avg_bits"] + 2.2 * step, sensitivities=table, kinds=["expert"],
             group_size="auto")
    assert p[hot].bits == 4  # 2 -> 4 costs 2 steps and saves 999; nothing else fits in the 0.2 left
    assert all(p[u.name].bits == 2 for u in experts if u.name != hot)
    assert all(p[u.name].bits == 4 for u in units(m) if u.kind in ("attention", "shared_expert", "dense_mlp"))
    assert p.meta["params"]["sensitivities"] == f"external table of {len(table)} units"
    assert p.meta["details"]["sensitivity"] == "external"
    with pytest.raises(ValueError, match=r"sensitivities lack 1 planned units, e.g. \['model.layers.1.mlp.experts.0"):
        plan(m, "knapsack", budget_bits=3.0, sensitivities={k: v for k, v in table.items() if k != experts[0].name},
             kinds=["expert"], group_size="auto")


def test_knapsack_errors(model):
    m = model("mixtral")
    with pytest.raises(ValueError, match="needs budget_bits"):
        plan(m, "knapsack", group_size="auto")
    with pytest.raises(ValueError, match=r"budget_bits=1.5 is infeasible for strategy 'knapsack'.*\[2\.0000, 8\.0"):
        plan(m, "knapsack", budget_bits=1.5, group_size="auto")
    with pytest.raises(ValueError, match=r"budget_bits=4.5 is infeasible.*\[2\.0000, 4\.0000\]"):
        plan(m, "knapsack", budget_bits=4.5, bits=(2, 4), group_size="auto")
    with pytest.raises(ValueError, match=r"kinds=\['router'\]: allowed are the planned kinds \['attention', 'expert"):
        plan(m, "knapsack", budget_bits=3, kinds=["router"], group_size="auto")
    with pytest.raises(ValueError, match=r"bits=5 is not supported"):
        plan(m, "knapsack", budget_bits=3, bits=(2, 5), group_size="auto")


def test_knapsack_params_exclude_the_budget(model):
    with pytest.raises(ValueError, match=r"does not take \['budget'\]; allowed parameters: \['bits', 'kinds',"):
        plan(model("mixtral"), "knapsack", budget_bits=3, budget=3, group_size="auto")


def test_knapsack_plans_on_the_measured_kl_table(model, profile):
    m = model("mixtral")
    ids = torch.randint(0, m.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    prof = measure_sensitivities(m, ids, profile(m), group_size=32, bits=(2, 4), quantizer="rtn", kl_windows=2,
                                 progress=False)
    setup = prof.sensitivity_setup
    assert setup["quantizer"] == "rtn" and setup["bits"] == [2, 4] and setup["kl_tokens"] == 32
    assert set(prof.sensitivities) == {u.name for u in units(m) if u.kind in ("attention", "expert")}
    assert set(setup["group_sizes"].values()) == {32}
    auto = plan(m, "knapsack", budget_bits=3.0, stats=prof, bits=(2, 4), group_size=32)
    assert auto.meta["details"]["sensitivity"] == "kl-rtn" and auto.meta["details"]["kl_tokens"] == 32
    same = plan(m, "knapsack", budget_bits=3.0, sensitivities=prof.sensitivities, bits=(2, 4), group_size=32)
    assert {n: s.bits for n, s in auto.items()} == {n: s.bits for n, s in same.items()}
    proxy = plan(m, "knapsack", budget_bits=3.0, stats=profile(m), bits=(2, 4), group_size=32)  # no table: proxy
    assert proxy.meta["details"]["sensitivity"].startswith("rtn-frobenius")


def test_measured_table_must_match_the_plan(model, profile):
    m = model("mixtral")
    ids = torch.randint(0, m.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    prof = measure_sensitivities(m, ids, group_size=32, bits=(2, 4), quantizer="rtn", kinds=["attention"],
                                 progress=False)
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj: the profile's sensitivities were"
                                         r" measured at group_size=32, the plan uses 64 \(8 units differ\)"):
        plan(m, "knapsack", budget_bits=3.0, stats=prof, kinds=["attention"], group_size=64)
    with pytest.raises(ValueError, match="measured with symmetric=True, the plan asks for symmetric=False"):
        plan(m, "knapsack", budget_bits=3.0, stats=prof, kinds=["attention"], group_size=32, symmetric=False)
    with pytest.raises(ValueError, match=r"sensitivities lack 24 planned units"):
        plan(m, "knapsack", budget_bits=3.0, stats=prof, group_size=32)  # experts were not measured
    with pytest.raises(ValueError, match=r"sensitivity='kl' needs a Profile with measured sensitivities"):
        plan(m, "knapsack", budget_bits=3.0, stats=profile(m), sensitivity="kl", group_size=32)
    with pytest.raises(ValueError, match=r"sensitivity='fisher'; allowed: \('auto', 'kl', 'estimate', 'hessian'\)"):
        plan(m, "knapsack", budget_bits=3.0, sensitivity="fisher", group_size=32)
    with pytest.raises(ValueError, match=r"the model has no units of kinds \['router'\] to measure"):
        measure_sensitivities(m, ids, kinds=["router"], progress=False)


def test_knapsack_prices_lm_head_like_any_unit(model, profile):
    """With lm_head in the base, its measured KL competes for the budget, and the plan quantizes it."""
    import copy

    import moe_ao

    m = model("mixtral")  # an untied head
    ids = torch.randint(0, m.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    prof = measure_sensitivities(m, ids, profile(m), group_size=32, bits=(2, 4), quantizer="rtn", kl_windows=2,
                                 kinds=["attention", "expert", "lm_head"], progress=False)
    head = next(u for u in units(m) if u.kind == "lm_head")
    assert prof.sensitivities[head.name][2] > prof.sensitivities[head.name][4] > 0
    base = {"attention": 4, "expert": 2, "lm_head": 4}
    common = dict(budget_bits=3.0, bits=(2, 4), group_size=32, base=base)
    measured = plan(m, "knapsack", stats=prof, **common)
    assert measured[head.name].bits in (2, 4)
    table = dict(prof.sensitivities)
    assert plan(m, "knapsack", sensitivities=table | {head.name: {2: 1e3, 4: 0.0}}, **common)[head.name].bits == 4
    assert plan(m, "knapsack", sensitivities=table | {head.name: {2: 0.0, 4: 0.0}}, **common)[head.name].bits == 2
    q = copy.deepcopy(m)
    moe_ao.quantize_(q, measured)
    assert head.name in moe_ao.quantization_report(q).quantized
