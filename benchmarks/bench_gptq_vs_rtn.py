"""RTN vs GPTQ on the embedded trained models: held-out KL, top-1, perplexity, time, RSS.

Routed experts at 2/3/4 bits, everything else (attention, shared experts, dense MLP)
at 4 bits, group 32, symmetric. Calibration: WikiText-2 valid; evaluation: WikiText-2
test (held out). Peak RSS is the process's high-water mark so far (``--isolate``: one process per
cell, so each cell's own peak).

    python benchmarks/bench_gptq_vs_rtn.py
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _common import Bench, machine, peak_rss_mib  # noqa: E402

import moe_ao  # noqa: E402


def run_cell(bench: Bench, method: str, bits: int, act_order: bool) -> dict:
    model_name = bench.name
    model = bench.fresh()
    units = moe_ao.units(model)
    plan = moe_ao.Plan({u.name: bits for u in units if u.kind == "expert"}
                       | {u.name: 4 for u in units if u.kind in ("attention", "shared_expert", "dense_mlp")},
                       group_size=32)
    rss0 = peak_rss_mib()
    t = time.perf_counter()
    kwargs = {"calibration": bench.calibration, "act_order": act_order, "progress": False} if method == "gptq" else {}
    moe_ao.quantize_(model, plan, method=method, **kwargs)
    seconds = time.perf_counter() - t
    fallbacks = len(moe_ao.quantization_report(model).extra.get("fallbacks", {}))
    return {
        "model": model_name,
        "method": method + ("" if method == "rtn" else (" act-order" if act_order else " natural order")),
        "expert_bits": bits,
        "avg_bits": plan.avg_bits(units),
        "true_bits": plan.true_avg_bits(units),
        "seconds": seconds,
        "peak_rss_mib": peak_rss_mib(),
        "rss_at_start_mib": rss0,
        "fallbacks": fallbacks,
        **bench.judge(model),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["tiny-mixtral", "tiny-qwen2-moe"])
    ap.add_argument("--bits", nargs="+", type=int, default=[2, 3, 4])
    ap.add_argument("--n-calib", type=int, default=128)
    ap.add_argument("--natural-order", action="store_true", help="also run GPTQ without act-order")
    ap.add_argument("--isolate", action="store_true", help="one process per cell, so peak RSS is per cell")
    ap.add_argument("--out", default="benchmarks/results/gptq_vs_rtn")
    ap.add_argument("--cell", nargs=4, help=argparse.SUPPRESS)  # internal: model method bits act_order
    args = ap.parse_args()
    if args.cell:
        m, method, bits, ao = args.cell
        print(json.dumps(run_cell(Bench.load(m, n_calib=args.n_calib), method, int(bits), ao == "1")))
        return
    variants = [("rtn", "0"), ("gptq", "1")] + ([("gptq", "0")] if args.natural_order else [])
    rows = []
    for m in args.models:
        bench = None if args.isolate else Bench.load(m, n_calib=args.n_calib)
        for bits in args.bits:
            for method, ao in variants:
                if bench is None:
                    cmd = [sys.executable, __file__, "--n-calib", str(args.n_calib), "--cell", m, method, str(bits), ao]
                    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                    rows.append(json.loads(out.strip().splitlines()[-1]))
                else:
                    rows.append(run_cell(bench, method, bits, ao == "1"))
                print({k: rows[-1][k] for k in ("model", "method", "expert_bits", "kl", "seconds")}, flush=True)
    lines = [
        f"Machine: {machine()}",
        "",
        "| model | expert bits | method | avg bits (paper) | true bits | KL | vs RTN | top-1 | ppl (bf16 ref) | s | peak RSS MiB | fallbacks |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        rtn = next(
            x
            for x in rows
            if x["model"] == r["model"] and x["expert_bits"] == r["expert_bits"] and x["method"] == "rtn"
        )
        lines.append(
            f"| {r['model']} | {r['expert_bits']} | {r['method']} | {r['avg_bits']:.2f} | {r['true_bits']:.2f} |"
            f" {r['kl']:.4f} | {r['kl'] / rtn['kl']:.2f}x | {r['top1']:.3f} | {r['ppl']:.2f} ({r['ref_ppl']:.2f}) |"
            f" {r['seconds']:.1f} | {r['peak_rss_mib']:.0f} | {r['fallbacks']} |"
        )
    text = "\n".join(lines) + f"\n\nCommand: `python benchmarks/bench_gptq_vs_rtn.py {' '.join(sys.argv[1:])}`\n"
    Path(args.out + ".md").write_text(text)
    Path(args.out + ".json").write_text(json.dumps(rows, indent=1))
    print(text)


if __name__ == "__main__":
    main()
