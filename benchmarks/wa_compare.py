"""W+A vs weight-only: the KL of each plan with int8 per-token activations next to its weight-only twin.

Reads two ``paper_table.py`` runs that differ only in ``--act-bits 8`` (the same cells, seeds,
calibration and evaluation windows) and writes one markdown table per model::

    ARGS="--strategies uniform base attention shared frequency outlier --seeds 42"
    python benchmarks/paper_table.py $ARGS --out benchmarks/results/w8a/weight_only/paper_table
    python benchmarks/paper_table.py $ARGS --act-bits 8 --out benchmarks/results/w8a/paper_table
    python benchmarks/wa_compare.py            # -> benchmarks/results/w8a/compare.md

Whether the paper's findings hold under W+A is in ``findings_a8.md`` next to the W+A run
(the same checks ``findings.md`` makes, on the W+A numbers).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def rows(path: Path) -> dict[str, dict]:
    """Aggregated grid rows by cell id."""
    return {e["id"]: e for e in json.loads(path.read_text())["table"] if "kl" in e}


def compare_md(model: str, weight_only: dict[str, dict], wa: dict[str, dict]) -> str:
    lines = [f"## {model}", "", "| cell | avg bits | KL ×10³ weight-only | KL ×10³ W+A8 | W+A8 / weight-only |",
             "|---|---:|---:|---:|---:|"]
    for cell, w in weight_only.items():
        a = wa.get(cell)
        if a is None:
            continue
        lines.append(f"| {w['label'].strip()} | {w['avg_bits']:.3f} | {w['kl'] * 1e3:.3f} | {a['kl'] * 1e3:.3f} | "
                     f"{a['kl'] / w['kl']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weight-only", default="benchmarks/results/w8a/weight_only/paper_table")
    ap.add_argument("--wa", default="benchmarks/results/w8a/paper_table")
    ap.add_argument("--models", nargs="+", default=["tiny-mixtral", "tiny-qwen2-moe"])
    ap.add_argument("--out", default="benchmarks/results/w8a/compare.md")
    args = ap.parse_args(argv)
    parts = ["# W+A (int8 per-token activations) vs weight-only, same plans", "",
             "GPTQ weights; KL(bf16 || quantized) per token on held-out WikiText-2 test windows (paper_table.py's "
             "setup). The W+A twin of a plan has the same weights and bits, with `act_bits: 8` on every quantized "
             "unit.", ""]
    for m in args.models:
        parts.append(compare_md(m, rows(Path(f"{args.weight_only}_{m}.json")), rows(Path(f"{args.wa}_{m}.json"))))
    text = "\n".join(parts) + f"\nCommand: `python benchmarks/wa_compare.py {' '.join(sys.argv[1:])}`\n"
    Path(args.out).write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
