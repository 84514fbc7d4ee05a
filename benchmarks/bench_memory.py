"""Storage and eager-vs-compiled logits of a 2-bit-experts / 4-bit-attention plan.

For each embedded model: quantize with RTN (experts 2-bit, attention/shared/dense
4-bit, group 64, symmetric), print ``memory_report`` before and after, and the largest
absolute logit difference between the eager and the ``torch.compile``'d quantized model.

    python benchmarks/bench_memory.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import moe_ao
from moe_ao import models

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["tiny-mixtral", "tiny-qwen2-moe"])
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--out", default="benchmarks/results/memory.md")
    args = ap.parse_args()
    lines = [f"Machine: {machine()}", ""]
    for name in args.models:
        model, tok = models.load(name)
        units = moe_ao.units(model)
        plan = moe_ao.Plan({u.name: 2 for u in units if u.kind == "expert"}
                           | {u.name: 4 for u in units if u.kind in ("attention", "shared_expert", "dense_mlp")},
                           group_size=args.group_size)
        before = moe_ao.memory_report(model)
        moe_ao.quantize_(model, plan)
        after = moe_ao.memory_report(model)
        ids = tok("The history of the city", return_tensors="pt").input_ids
        with torch.no_grad():
            eager = model(ids).logits.float()
            compiled = torch.compile(model, fullgraph=True)(ids).logits.float()
        diff = (eager - compiled).abs().max().item()
        expert = after.rows["expert"]
        lines += [
            f"## {name}: plan {plan.avg_bits(units):.3f} avg bits (paper), {plan.true_avg_bits(units):.3f} true",
            "",
            "Before:",
            "",
            str(before),
            "",
            "After:",
            "",
            str(after),
            "",
            f"- routed experts: {expert.bits_per_weight:.3f} bits/weight, {16 / expert.bits_per_weight:.2f}x smaller than bf16",
            f"- whole model: {before.total_bytes / after.total_bytes:.2f}x smaller",
            f"- max |eager - compiled| logits: {diff:.3g} (logit scale {eager.abs().max().item():.1f})",
            "",
        ]
    text = "\n".join(lines) + "\nCommand: `python benchmarks/bench_memory.py`\n"
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
