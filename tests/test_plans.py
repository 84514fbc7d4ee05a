"""moe_ao.plans: plans as data (JSON round trip), validation errors, bit accounting."""

from __future__ import annotations

import json

import archs
import pytest

import moe_ao
from moe_ao.plans import ALLOWED_BITS, Plan, QuantSpec

EXPERT = "model.layers.0.mlp.experts.{}.{}"


@pytest.fixture(scope="module")
def mixtral_units():
    # mixtral: 2 layers, 4 experts of 64x64 per projection, H = I = 64, routers [4, 64]
    return moe_ao.units(archs.build("mixtral"))


def example_plan() -> Plan:
    return Plan(
        {
            "model.layers.0.self_attn.q_proj": 4,
            EXPERT.format(0, "gate_proj"): 2,
            EXPERT.format(0, "up_proj"): QuantSpec(bits=3, group_size=64),
            "model.layers.1.self_attn.o_proj": {"bits": 8, "group_size": 32, "symmetric": False},
            "model.layers.1.self_attn.k_proj": 16,
            "model.layers.1.mlp.gate": 8,
        },
        group_size=64,
        meta={"strategy": "hand", "budget_bits": 2.5, "scores": [1.0, 2.0]},
    )


def test_specs_from_plain_bits_and_overrides():
    plan = example_plan()
    assert plan["model.layers.0.self_attn.q_proj"] == QuantSpec(4, 64, True)
    assert plan[EXPERT.format(0, "up_proj")] == QuantSpec(3, 64, True)
    assert plan["model.layers.1.self_attn.o_proj"] == QuantSpec(8, 32, False)
    assert plan["model.layers.1.self_attn.k_proj"].bits == 16
    assert not plan["model.layers.1.self_attn.k_proj"].quantized
    assert plan["model.layers.0.self_attn.q_proj"].quantized
    assert list(plan) == list(example_plan())  # ordered
    assert len(plan) == 6 and "nope" not in plan


def test_json_round_trip_string_and_file(tmp_path):
    plan = example_plan()
    text = plan.to_json()
    data = json.loads(text)
    assert data["format"] == "moe_ao.plan" and data["version"] == 1
    assert data["defaults"] == {"group_size": 64, "symmetric": True}
    # Plain bits where the spec equals the defaults, an object where it overrides them.
    assert data["units"]["model.layers.0.self_attn.q_proj"] == 4
    assert data["units"]["model.layers.1.self_attn.k_proj"] == 16
    assert data["units"]["model.layers.1.self_attn.o_proj"] == {"bits": 8, "group_size": 32, "symmetric": False}
    back = Plan.from_json(text)
    assert back == plan
    assert back.meta == plan.meta and back.defaults == plan.defaults
    assert back.to_json() == text  # deterministic
    path = tmp_path / "plan.json"
    assert plan.to_json(str(path)) == text
    assert path.read_text() == text
    from_file = Plan.from_json(str(path))
    assert from_file == plan and from_file.meta == plan.meta


def test_allow_low_bit_router_round_trips():
    plan = Plan({"model.layers.0.mlp.gate": 4}, allow_low_bit_router=True)
    back = Plan.from_json(plan.to_json())
    assert back.allow_low_bit_router and back == plan
    assert back != Plan({"model.layers.0.mlp.gate": 4})


def test_equality_sees_specs_and_order():
    a = Plan({"x": 2, "y": 4})
    assert a == Plan({"x": 2, "y": 4})
    assert a != Plan({"x": 2, "y": 3})
    assert a != Plan({"x": 2, "y": 4}, group_size=64)


@pytest.mark.parametrize(
    "data, match",
    [
        ({"format": "other", "version": 1}, r"not a moe_ao plan.*'other'.*moe_ao\.plan"),
        ({"version": 1}, r"not a moe_ao plan"),
        ({"format": "moe_ao.plan", "version": 2}, r"version 2 .*allowed: \(1,\)"),
    ],
)
def test_format_and_version_errors(data, match):
    with pytest.raises(ValueError, match=match):
        Plan.from_json(json.dumps(data))


def test_bad_json_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="not valid JSON"):
        Plan.from_json("{not json")
    missing = tmp_path / "nope.json"
    with pytest.raises(ValueError, match="nope.json"):
        Plan.from_json(str(missing))


@pytest.mark.parametrize("bits", [0, 1, 5, 6, 7, 32, True])
def test_unsupported_bits_named(bits):
    name = EXPERT.format(1, "down_proj")
    with pytest.raises(ValueError) as e:
        Plan({name: bits})
    assert name in str(e.value) and str(ALLOWED_BITS) in str(e.value)


@pytest.mark.parametrize(
    "value, match",
    [
        ({"bits": 4, "groupsize": 32}, "groupsize"),
        ({"group_size": 32}, "bits"),
        ({"bits": 4, "group_size": 0}, "group_size=0"),
        ({"bits": 4, "symmetric": "yes"}, "symmetric='yes'"),
    ],
)
def test_malformed_override_named(value, match):
    with pytest.raises(ValueError, match=match) as e:
        Plan({"model.layers.0.self_attn.v_proj": value})
    assert "model.layers.0.self_attn.v_proj" in str(e.value)


def test_validate_accepts_a_good_plan(mixtral_units):
    example_plan().validate(mixtral_units)


def test_validate_unknown_unit_with_suggestion(mixtral_units):
    plan = Plan({"model.layers.0.mlp.experts.0.gate_prj": 4})
    with pytest.raises(ValueError) as e:
        plan.validate(mixtral_units)
    msg = str(e.value)
    assert "'model.layers.0.mlp.experts.0.gate_prj'" in msg
    assert "did you mean" in msg and "model.layers.0.mlp.experts.0.gate_proj" in msg


def test_validate_group_size_must_divide(mixtral_units):
    name = EXPERT.format(2, "down_proj")  # in_features 64
    with pytest.raises(ValueError) as e:
        Plan({name: 4}, group_size=128).validate(mixtral_units)
    msg = str(e.value)
    assert name in msg and "group_size=128" in msg and "in_features=64" in msg and "[32, 64]" in msg
    with pytest.raises(ValueError, match=r"group_size=48"):
        Plan({name: {"bits": 4, "group_size": 48}}).validate(mixtral_units)
    # A 16-bit unit has no groups: any group size is fine.
    Plan({name: 16}, group_size=128).validate(mixtral_units)


def test_validate_low_bit_router(mixtral_units):
    name = "model.layers.1.mlp.gate"
    with pytest.raises(ValueError) as e:
        Plan({name: 4}, group_size=64).validate(mixtral_units)
    msg = str(e.value)
    assert name in msg and "allow_low_bit_router" in msg and "[8, 16]" in msg
    Plan({name: 4}, group_size=64, allow_low_bit_router=True).validate(mixtral_units)
    Plan({name: 8}, group_size=64).validate(mixtral_units)


def test_validate_embedding_like_any_linear(mixtral_units):
    Plan({"model.embed_tokens": 4}, group_size=64).validate(mixtral_units)  # rows of the table, groups of hidden
    Plan({"model.embed_tokens": 16}).validate(mixtral_units)
    with pytest.raises(ValueError, match=r"model\.embed_tokens: group_size=48 does not divide in_features=64"):
        Plan({"model.embed_tokens": 4}, group_size=48).validate(mixtral_units)


def test_validate_fused_units_must_agree(mixtral_units):
    a, b = EXPERT.format(0, "gate_proj"), EXPERT.format(3, "up_proj")  # both in gate_up_proj
    plan = Plan({a: {"bits": 2, "group_size": 32}, b: {"bits": 4, "group_size": 64}})
    with pytest.raises(ValueError) as e:
        plan.validate(mixtral_units)
    msg = str(e.value)
    assert a in msg and b in msg and "model.layers.0.mlp.experts.gate_up_proj" in msg
    with pytest.raises(ValueError, match="symmetric"):
        Plan({a: {"bits": 2, "symmetric": False}, b: 4}, group_size=32).validate(mixtral_units)
    # Different bits, same group size: fine; different group size in another tensor: fine.
    Plan({a: 2, b: 4, EXPERT.format(0, "down_proj"): {"bits": 3, "group_size": 64}}, group_size=32).validate(
        mixtral_units
    )
    # A 16-bit slice carries no groups and may differ.
    Plan({a: 2, b: {"bits": 16, "group_size": 64}}, group_size=32).validate(mixtral_units)


def test_avg_bits_by_hand(mixtral_units):
    experts = [u for u in mixtral_units if u.kind == "expert"]
    attention = [u for u in mixtral_units if u.kind == "attention"]
    routers = [u for u in mixtral_units if u.kind == "router"]
    plan = Plan(
        {u.name: 2 for u in experts} | {u.name: 4 for u in attention} | {u.name: 8 for u in routers},
        group_size=64,
    )
    # experts: 2 layers x 4 experts x 3 projections x 64x64 = 98,304 params at 2 bits
    # attention: 2 layers x (q 64x64 + k 32x64 + v 32x64 + o 64x64) = 24,576 params at 4 bits
    # routers (2 x 4x64 = 512 params) are excluded from avg_bits
    assert plan.avg_bits(mixtral_units) == pytest.approx((2 * 98_304 + 4 * 24_576) / (98_304 + 24_576))
    assert plan.avg_bits(mixtral_units) == pytest.approx(2.4)
    # true_avg_bits: + 16-bit scale per 64 weights, routers included
    true = (2.25 * 98_304 + 4.25 * 24_576 + 8.25 * 512) / (98_304 + 24_576 + 512)
    assert plan.true_avg_bits(mixtral_units) == pytest.approx(true)
    asym = Plan({u.name: 2 for u in experts}, group_size=32, symmetric=False)
    assert asym.true_avg_bits(mixtral_units) == pytest.approx(2 + 16 / 32 + 8 / 32)
    assert asym.avg_bits(mixtral_units) == 2


def test_avg_bits_counts_16_bit_units_and_ignores_unplanned(mixtral_units):
    q = "model.layers.0.self_attn.q_proj"  # 4096
    k = "model.layers.0.self_attn.k_proj"  # 2048
    plan = Plan({q: 2, k: 16})
    assert plan.avg_bits(mixtral_units) == pytest.approx((2 * 4096 + 16 * 2048) / 6144)
    assert plan.true_avg_bits(mixtral_units) == pytest.approx(((2 + 16 / 128) * 4096 + 16 * 2048) / 6144)
    with pytest.raises(ValueError, match="none of the model"):
        Plan({"model.layers.0.mlp.gate": 8}).avg_bits(mixtral_units)


def test_accounting_accepts_a_model():
    model = archs.build("mixtral")
    plan = Plan({"model.layers.0.self_attn.q_proj": 3})
    assert plan.avg_bits(model) == 3


def test_storage_bits():
    assert QuantSpec(2, 64).storage_bits() == 2.25
    assert QuantSpec(3, 32, symmetric=False).storage_bits() == 3 + 0.5 + 0.25
    assert QuantSpec(16).storage_bits() == 16.0


def test_repr_shows_histogram():
    assert repr(Plan({"a": 2, "b": 2, "c": 4})) == "Plan(3 units, bits histogram {2: 2, 4: 1})"


# ------------------------------------------------------------------ act_bits (W+A)
def test_act_bits_per_unit_and_default_round_trip():
    plan = Plan({"a": 4, "b": {"bits": 2, "act_bits": 8}, "c": 16}, group_size=32)
    assert plan["a"].act_bits is None and plan["b"].act_bits == 8 and plan["c"].act_bits is None
    assert Plan.from_json(plan.to_json()) == plan
    assert "act_bits" not in plan.to_dict()["defaults"] and plan.to_dict()["units"]["a"] == 4
    w4a8 = Plan({"a": 4, "b": {"bits": 2, "act_bits": None}, "c": 16}, act_bits=8)
    assert w4a8["a"].act_bits == 8 and w4a8["b"].act_bits is None
    assert w4a8["c"].act_bits is None  # float units keep float activations
    assert w4a8.to_dict()["defaults"]["act_bits"] == 8 and w4a8.to_dict()["units"]["a"] == 4
    back = Plan.from_json(w4a8.to_json())
    assert back == w4a8 and back["a"].act_bits == 8 and back["b"].act_bits is None


def test_act_bits_rejects_bad_values():
    with pytest.raises(ValueError, match=r"act_bits=4 is not supported; allowed: \(None, 8\)"):
        Plan({"a": {"bits": 4, "act_bits": 4}})
    with pytest.raises(ValueError, match="act_bits=8 needs quantized weights; bits=16"):
        QuantSpec(16, act_bits=8)
    with pytest.raises(ValueError, match="act_bits=True"):
        QuantSpec(4, act_bits=True)
