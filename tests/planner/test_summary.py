"""Plan summaries: the markdown table and the heatmap."""

from __future__ import annotations

import sys

import pytest

from moe_ao.discovery import units
from moe_ao.planner import heatmap, plan, summarize
from moe_ao.planner.summary import expert_grid
from moe_ao.plans import Plan


def test_summarize_table(model, profile):
    m = model("deepseek_moe")
    p = plan(m, "frequency", stats=profile(m, {1: [9, 1, 8, 1, 1], 2: [1, 1, 1, 1, 9]}), k=1, group_size="auto")
    text = summarize(p, m)
    lines = text.splitlines()
    assert lines[0].startswith(f"strategy `frequency`: {p.avg_bits(m):.3f} average bits")
    assert lines[2] == "| layer | attention | experts (mean) | shared | dense MLP | 2-bit units | 4-bit units |"
    assert lines[4] == "| 0 | 4 | — | — | 4 | 0 | 7 |"  # dense layer: 4 attention + 3 MLP linears
    # layer 1: expert 0 raised -> mean (4 * 3 + 2 * 12) / 15 = 2.4; 12 low linears; 4+3+3 at 4
    assert lines[5] == "| 1 | 4 | 2.40 | 4 | — | 12 | 10 |"
    assert lines[6] == "| 2 | 4 | 2.40 | 4 | — | 12 | 10 |"
    assert len(lines) == 7


def test_expert_grid(model):
    m = model("mixtral")
    us = units(m)
    p = Plan({u.name: (8 if u.expert == 1 and u.proj == "down_proj" else 2) for u in us if u.kind == "expert"},
             group_size=32)
    layers, grid = expert_grid(p, us)
    assert layers == [0, 1]
    assert grid[0] == [2, 4, 2, 2]  # (8 + 2 + 2) / 3
    partial = Plan({u.name: 4 for u in us if u.kind == "expert" and u.layer == 1}, group_size=32)
    assert expert_grid(partial, us)[1][0] == [None] * 4


def test_heatmap_writes_png(model, tmp_path):
    m = model("qwen2_moe")
    p = plan(m, "linear-type", group_size="auto")
    path = heatmap(p, m, str(tmp_path / "plan.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_heatmap_errors(model, tmp_path, monkeypatch):
    m = model("mixtral")
    p = plan(m, "base", group_size="auto")
    no_experts = [u for u in units(m) if u.kind != "expert"]
    with pytest.raises(ValueError, match="no routed experts"):
        heatmap(p, no_experts, str(tmp_path / "x.png"))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"heatmap needs matplotlib: pip install 'moe_ao\[plot\]'"):
        heatmap(p, m, str(tmp_path / "x.png"))
