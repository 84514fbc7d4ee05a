"""Bases, group sizes and parameter binding."""

from __future__ import annotations

import re

import pytest

from moe_ao.discovery import units
from moe_ao.planner import plan
from moe_ao.planner.context import AUTO_GROUP_SIZES, bound_params, group_sizes, resolve_base
from moe_ao.planner.heuristics import frequency
from moe_ao.unit import Unit


def unit(name: str, in_features: int) -> Unit:
    return Unit(name, "attention", 0, None, "q_proj", (16, in_features), name + ".weight")


def test_group_size_must_divide_every_unit():
    us = [unit("a", 256), unit("b", 96)]
    assert group_sizes(us, 32) == {"a": 32, "b": 32}
    with pytest.raises(ValueError, match=r"b: group_size=64 does not divide in_features=96.*\[32\].*'auto'"):
        group_sizes(us, 64)
    with pytest.raises(ValueError, match="positive int or 'auto'"):
        group_sizes(us, 0)


def test_auto_group_size_picks_largest_divisor():
    us = [unit("a", 256), unit("b", 192), unit("c", 96)]
    assert group_sizes(us, "auto") == {"a": 128, "b": 64, "c": 32}
    with pytest.raises(ValueError, match=re.escape(f"d: none of {AUTO_GROUP_SIZES} divides in_features=48")):
        group_sizes([unit("d", 48)], "auto")


def test_default_group_size_128_rejects_tiny_models(model):
    # The tiny models' in_features are 32 or 64: 128 must fail loudly, naming a unit.
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj: group_size=128"):
        plan(model("mixtral"), "base")
    p = plan(model("qwen2_moe"), "base", group_size="auto")
    sizes = {p[u.name].group_size for u in units(model("qwen2_moe")) if u.name in p}
    assert sizes == {32, 64, 128}  # expert down_proj, hidden 64, dense down_proj
    assert p.defaults.group_size == 64  # the most common one


def test_resolve_base():
    assert resolve_base("experts-low") == {"attention": 4, "expert": 2, "shared_expert": 4, "dense_mlp": 4}
    assert resolve_base({"expert": 3}) == {"expert": 3}
    with pytest.raises(ValueError, match=r"base='low' is not known; allowed: \['experts-low', 'uniform-low'\]"):
        resolve_base("low")
    with pytest.raises(ValueError, match="kind 'mlp'; allowed kinds"):
        resolve_base({"mlp": 4})
    with pytest.raises(ValueError, match=r"base\['expert'\]=5 is not supported"):
        resolve_base({"expert": 5})
    assert resolve_base({"embedding": 8, "lm_head": 4}) == {"embedding": 8, "lm_head": 4}  # priced like any unit


def test_base_mapping_limits_planned_kinds(model):
    m = model("deepseek_moe")
    p = plan(m, "base", base={"expert": 3}, group_size=32)
    assert {u.kind for u in units(m) if u.name in p} == {"expert"}
    assert {s.bits for s in p.values()} == {3}


def test_bound_params_fills_defaults_and_names_unknown():
    assert bound_params(frequency, {"k": 3}, "x") == {"k": 3, "bits": 4}
    msg = r"strategy 'frequency' does not take \['top'\]; allowed parameters: \['k', 'bits'\]"
    with pytest.raises(ValueError, match=msg):
        bound_params(frequency, {"top": 3}, "strategy 'frequency'")
