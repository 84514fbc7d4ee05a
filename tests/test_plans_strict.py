"""Plan JSON is checked field by field: typos, wrong types and empty plans are named errors.

The property test feeds mutated and random JSON to ``Plan.from_json``: it must return a
plan that round-trips, or raise ValueError; never another exception.
"""

from __future__ import annotations

import json

import archs
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import moe_ao
from moe_ao.plans import Plan, QuantSpec

Q = "model.layers.0.self_attn.q_proj"
GATE = "model.layers.0.mlp.gate"


def doc(**changes) -> dict:
    base = {"format": "moe_ao.plan", "version": 1, "defaults": {"group_size": 32, "symmetric": True},
            "allow_low_bit_router": False, "units": {Q: 4}, "meta": {}}
    return {k: v for k, v in (base | changes).items() if v is not ...}


@pytest.mark.parametrize("data, match", [
    (doc(allow_low_bit_router="false"), r"allow_low_bit_router='false' must be true or false"),
    (doc(units=...), r"no 'units'"),
    (doc(units=..., unit={Q: 4}), r"unknown key 'unit'; did you mean 'units'"),
    (doc(foo=1), r"plan: unknown key 'foo'"),
    (doc(defaults={"group-size": 32}), r"plan defaults: unknown key 'group-size'; did you mean 'group_size'"),
    (doc(defaults={"bits": 4}), r"plan defaults: unknown key 'bits'"),
    (doc(units=[Q]), r"'units' must be an object, got list"),
    (doc(defaults=None), r"'defaults' must be an object, got NoneType"),
    (doc(meta=[1]), r"'meta' must be an object, got list"),
    (doc(units={Q: {"bits": 4, "group-size": 32}}), rf"plan entry '{Q}': spec: unknown key 'group-size'"),
    (doc(units={Q: 4.0}), rf"plan entry '{Q}': bits=4.0 must be an int"),
    (doc(units={Q: "4"}), rf"plan entry '{Q}': bits='4' must be an int"),
    (doc(units={Q: None}), rf"plan entry '{Q}'"),
    (doc(defaults={"group_size": "32"}), r"plan defaults: group_size='32' must be an int"),
    (doc(defaults={"symmetric": 1}), r"symmetric=1 must be true or false"),
    (doc(version=True), r"version True is not supported"),
    ([1, 2], r"a plan is a JSON object"),
])
def test_malformed_plan_json_is_named(data, match):
    with pytest.raises(ValueError, match=match):
        Plan.from_json(json.dumps(data))


def test_plan_file_errors_name_the_file(tmp_path):
    f = tmp_path / "plan.json"
    f.write_text(json.dumps(doc(foo=1)))
    with pytest.raises(ValueError, match=rf"plan file {f}: plan: unknown key 'foo'"):
        Plan.from_json(str(f))
    f.write_text('{"format": NaN}')
    with pytest.raises(ValueError, match=rf"plan file {f} is not valid JSON"):
        Plan.from_json(str(f))


@pytest.mark.parametrize("bits", [np.int64(4), np.int32(4), torch.tensor(4)], ids=["np64", "np32", "torch"])
def test_numpy_and_torch_bits_are_normalised(bits, tmp_path):
    plan = Plan({Q: bits, GATE: {"bits": 8, "group_size": np.int64(64)}}, group_size=torch.tensor(32))
    assert type(plan[Q].bits) is int and plan[Q] == QuantSpec(4, 32) and type(plan[GATE].group_size) is int
    model = moe_ao.quantize_(archs.build("mixtral"), plan)
    moe_ao.save_quantized(model, tmp_path / "c")  # the plan saves as JSON
    assert moe_ao.quantized_plan(moe_ao.load_quantized(tmp_path / "c")) == plan


@pytest.mark.parametrize("bad", [torch.tensor(4.0), torch.tensor([4]), np.float64(4.0), True])
def test_non_integer_bits_are_refused(bad):
    with pytest.raises(ValueError, match=rf"plan entry '{Q}'"):
        Plan({Q: bad})


def test_meta_must_be_json():
    with pytest.raises(ValueError, match="JSON values only"):
        Plan({Q: 4}, meta={"scores": torch.ones(2)})
    with pytest.raises(TypeError, match="meta must be a mapping"):
        Plan({Q: 4}, meta=[1])


@pytest.mark.parametrize("plan", [Plan({}), Plan({Q: 16}), Plan.from_json(json.dumps(doc(units={})))],
                         ids=["empty", "all-16", "json-empty"])
def test_plan_that_quantizes_nothing_is_an_error(plan):
    model = archs.build("mixtral")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"quantizes none of the model's \d+ units"):
        moe_ao.quantize_(model, plan)
    assert moe_ao.quantized_plan(model) is None  # not marked quantized: a later quantize_ works
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    moe_ao.quantize_(model, Plan({Q: 4}, group_size=32))


# ----------------------------------------------------------------- property test
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 300) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12) | st.sampled_from(["units", "bits", "group_size", Q, "moe_ao.plan"]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10) | st.sampled_from(
        ["bits", "group_size", "symmetric", Q, GATE]), children, max_size=4),
    max_leaves=12,
)


@st.composite
def mutated_plans(draw):
    data = doc(units={Q: 4, GATE: {"bits": 8, "group_size": 64}})
    for _ in range(draw(st.integers(1, 3))):
        target = data
        path = draw(st.lists(st.sampled_from(["units", "defaults", "meta", Q, GATE, "bits", "group_size"]),
                             max_size=2))
        for key in path:
            if isinstance(target, dict) and isinstance(target.get(key), dict):
                target = target[key]
        key = draw(st.sampled_from(sorted(target) + ["extra"]) if target else st.just("extra"))
        if draw(st.booleans()):
            target.pop(key, None)
        else:
            target[key] = draw(json_values)
    return data


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(mutated_plans(), json_values))
def test_any_json_gives_a_plan_or_a_value_error(data):
    text = json.dumps(data)
    try:
        plan = Plan.from_json(text)
    except ValueError:
        return
    assert Plan.from_json(plan.to_json()) == plan  # what parsed is a real plan: it round-trips
    assert all(isinstance(s.bits, int) and not isinstance(s.bits, bool) for s in plan.values())
