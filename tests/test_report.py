"""memory_report: real bytes per unit kind, checked against what is actually stored."""

from __future__ import annotations

import archs
import pytest
import torch
from safetensors import safe_open

import moe_ao
from moe_ao.plans import Plan

SLOT_BYTES = 3 * 4  # one int32 row (bits, buffer row, concat row) per slice


def expert_group(model) -> int:
    """64 where it divides every expert's in_features, else 32."""
    ins = {u.shape[1] for u in moe_ao.units(model) if u.kind == "expert"}
    return 64 if all(k % 64 == 0 for k in ins) else 32


def stored_bytes(path) -> int:
    with safe_open(str(path), "pt") as f:
        return sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())


@pytest.mark.parametrize("arch", archs.ARCHS)
def test_float_model(arch):
    model = archs.build(arch, torch.bfloat16)
    report = moe_ao.memory_report(model)
    units = moe_ao.units(model)
    for kind, row in report.rows.items():
        mine = [u for u in units if u.kind == kind]
        assert row.units == len(mine) and row.params == sum(u.numel for u in mine)
        # Mostly bf16; transformers >= 5.24 keeps DeepSeek-V3's router weight in float32.
        stored = sum(u.numel * model.get_parameter(u.param).element_size() for u in mine)
        assert row.bytes == stored and row.bits_per_weight == 8 * stored / row.params and row.quantized_units == 0
        if kind != "router":
            assert row.bytes == 2 * row.params
    assert report.avg_bits_quantized is None
    state = {id(t): t for t in model.state_dict(keep_vars=True).values()}
    assert report.total_bytes == sum(t.numel() * t.element_size() for t in state.values())
    assert report.total_bytes == sum(r.bytes for r in report.rows.values()) + report.other_bytes
    assert "1.00x" in str(report) and "| expert |" in str(report)


@pytest.mark.parametrize("arch", archs.ARCHS)
def test_quantized_model(arch, tmp_path):
    model = archs.build(arch, torch.bfloat16)
    units = moe_ao.units(model)
    g = expert_group(model)
    plan = Plan({u.name: 2 for u in units if u.kind == "expert"}
                | {u.name: 4 for u in units if u.kind == "attention"}, group_size=g)
    float_report = moe_ao.memory_report(model)
    moe_ao.quantize_(model, plan)
    report = moe_ao.memory_report(model)
    experts = report.rows["expert"]
    assert experts.quantized_units == experts.units == sum(u.kind == "expert" for u in units)
    # 2-bit codes + one bf16 scale per g weights + the slot row of each R x K slice.
    R_K = {u.numel for u in units if u.kind == "expert"}
    assert len(R_K) == 1  # all expert slices have I*H weights
    expected = 2 + 16 / g + 8 * SLOT_BYTES / R_K.pop()
    assert experts.bits_per_weight == pytest.approx(expected, rel=1e-12)
    if g == 64:
        assert 2.25 < experts.bits_per_weight < 2.3
    # Untouched kinds keep their float bytes.
    for kind in ("router", "embedding", "lm_head"):
        assert report.rows[kind].bytes == float_report.rows[kind].bytes
        assert report.rows[kind].quantized_units == 0
    assert report.rows["attention"].quantized_units == report.rows["attention"].units
    # Totals: rows + other add up to every stored tensor, counted from the checkpoint file.
    assert report.total_bytes == pytest.approx(sum(r.bytes for r in report.rows.values()) + report.other_bytes)
    out = moe_ao.save_quantized(model, tmp_path / "c")
    assert report.total_bytes == stored_bytes(out / "model.safetensors")
    assert report.other_bytes == float_report.other_bytes
    # Compression vs 16 bits: the table's ratio is 16 / bits per weight.
    text = str(report)
    for row in report.rows.values():
        assert f"| {row.bits_per_weight:.3f} | {16 / row.bits_per_weight:.2f}x |" in text
    assert float_report.rows["expert"].bytes / experts.bytes == pytest.approx(16 / experts.bits_per_weight)
    # avg over quantized units: Σ bytes / Σ params of experts and attention.
    q_rows = [report.rows["expert"], report.rows["attention"]]
    assert report.avg_bits_quantized == pytest.approx(
        8 * sum(r.bytes for r in q_rows) / sum(r.params for r in q_rows))


def test_per_kind_bytes_follow_exact_slices():
    """In a mixed fused tensor each unit is charged its own slice's bytes (+ slot share)."""
    model = archs.build("mixtral", torch.bfloat16)  # E=4, H=I=64
    units = [u for u in moe_ao.units(model) if u.kind == "expert" and u.layer == 0]
    plan = Plan({u.name: (8 if u.proj == "gate_proj" else 2) for u in units}, group_size=64)
    moe_ao.quantize_(model, plan)
    rows = moe_ao.memory_report(model).rows
    w = 64 * 64  # weights per slice
    slices = [(8, 12)] * 4 + [(2, 12)] * 8  # (bits, slot bytes): 4 gate, 4 up, 4 down
    codes_and_scales = sum(w * b / 8 + 64 * 2 for b, _ in slices)
    quantized = codes_and_scales + sum(s for _, s in slices)
    float_layer1 = 12 * w * 2
    assert rows["expert"].bytes == pytest.approx(quantized + float_layer1)
    assert rows["expert"].quantized_units == 12
