"""Smoke test of benchmarks/paper_table.py: a two-strategy RTN grid on tiny-mixtral, twice.

The second run must find every cell in the cache (same checkpoint, plans, method and
setup) and quantize nothing.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.slow
def test_paper_table_runs_and_resumes_from_cache(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import paper_table

    argv = ["--model", "tiny-mixtral", "--method", "rtn", "--strategies", "outlier", "outlier-random",
            "--seeds", "42", "--eval-windows", "2", "--n-calib", "2", "--out", str(tmp_path / "paper_table")]
    first = paper_table.main(argv)
    counts = first["counts"]["tiny-mixtral"]
    assert counts["cells"] == 2 and counts["ran"] == 2 and counts["cached"] == 0, counts
    for suffix in (".md", ".json", ".png"):
        assert (tmp_path / f"paper_table_tiny-mixtral{suffix}").stat().st_size > 0
    findings = (tmp_path / "findings.md").read_text()
    assert "Outlier scorer > random linears" in findings
    assert len(list((tmp_path / "cache").glob("*.json"))) == 2
    data = json.loads((tmp_path / "paper_table_tiny-mixtral.json").read_text())
    assert {r["strategy"] for r in data["rows"]} == {"outlier", "outlier-random"}
    assert all(r["kl"] > 0 for r in data["rows"])

    again = paper_table.main(argv)["counts"]["tiny-mixtral"]
    assert again["cached"] == 2 and again.get("ran", 0) == 0, again
    sys.modules.pop("paper_table", None)


def test_act_bits_twin_keeps_weights_and_quantizes_activations(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import paper_table

    import moe_ao

    p = moe_ao.Plan({"a": 2, "b": {"bits": 4, "group_size": 16}, "c": 16}, group_size=32, meta={"strategy": "x"})
    twin = paper_table.with_act_bits(p, 8)
    assert [(n, s.bits, s.group_size) for n, s in twin.items()] == [(n, s.bits, s.group_size) for n, s in p.items()]
    assert (twin["a"].act_bits, twin["b"].act_bits, twin["c"].act_bits) == (8, 8, None)
    assert twin.meta == {"strategy": "x", "act_bits": 8} and p.meta == {"strategy": "x"}
    assert twin.to_json() != p.to_json()  # another plan hash: its own cache entries
    sys.modules.pop("paper_table", None)
