"""Stacking upgrades and walking a ranking to a bit budget."""

from __future__ import annotations

import pytest

from moe_ao.planner.budget import Upgrade, apply, closest_prefix, fit_budget, prefix_averages, unit_steps

# Four units: a, b of 100 params, c of 200, d of 600 (total 1000).
W = {"a": 100, "b": 100, "c": 200, "d": 600}
BASE = {n: 2 for n in W}


def test_apply_takes_max_over_rules_and_never_lowers():
    ups = [Upgrade(("a", "b"), 4, "ab"), Upgrade(("b",), 3, "b lower"), Upgrade(("c",), 8, "c")]
    assert apply({**BASE, "d": 8}, ups) == {"a": 4, "b": 4, "c": 8, "d": 8}


def test_prefix_averages_and_unit_steps():
    ups = [Upgrade(("a", "c"), 4, "ac"), Upgrade(("a",), 4, "again"), Upgrade(("d",), 3, "d")]
    assert prefix_averages(BASE, ups, W) == pytest.approx([2.0, 2.6, 2.6, 3.2])
    steps = unit_steps(BASE, ups)  # the repeated "a" is a no-op and disappears
    assert [s.names for s in steps] == [("a",), ("c",), ("d",)]
    assert prefix_averages(BASE, steps, W) == pytest.approx([2.0, 2.2, 2.6, 3.2])


def test_closest_prefix_prefers_fewer_on_ties():
    assert closest_prefix([2.0, 2.2, 2.4], 2.1) == 0
    assert closest_prefix([2.0, 2.2, 2.4], 2.31) == 2


@pytest.mark.parametrize("budget", [2.0, 2.15, 2.2, 2.45, 2.9, 3.2])
def test_fit_budget_hits_within_one_unit(budget):
    ups = [Upgrade(("a", "c"), 4, "ac"), Upgrade(("d",), 3, "d")]
    bits, info = fit_budget(BASE, ups, W, budget, "test")
    avg = sum(bits[n] * W[n] for n in W) / 1000
    max_share = max((4 - 2) * 100, (4 - 2) * 200, (3 - 2) * 600) / 1000
    assert abs(avg - budget) <= max_share / 2 + 1e-12  # closest prefix: within half a step
    assert info["feasible_range"] == pytest.approx([2.0, 3.2])


@pytest.mark.parametrize("budget", [1.99, 3.21, 8.0])
def test_infeasible_budget_names_the_range(budget):
    ups = [Upgrade(("a", "c"), 4, "ac"), Upgrade(("d",), 3, "d")]
    with pytest.raises(ValueError, match=r"budget_bits=.* is infeasible for strategy 'test'.*\[2\.0000, 3\.2000\]"):
        fit_budget(BASE, ups, W, budget, "test")
