"""Estimated vs measured KL sensitivities: rank agreement, the knapsack's KL on each, and their cost.

Same models, grid and setup as ``benchmarks/paper_table.py``'s optimizer rows (GPTQ,
group 32, 64 x 256 calibration tokens, 48 x 256 held-out tokens; measured sensitivities on
the first 16 windows). Per model and budget: the best paper heuristic fitted to the
budget, the knapsack on measured sensitivities and the knapsack on the two-pass estimate
(``moe_ao.planner.estimate_sensitivities``), each capped at the heuristic's average bits;
Spearman rank correlation of the estimate with the measured table per unit kind (all
widths pooled, and per width); the seconds each table took.

    python benchmarks/bench_sensitivity_estimate.py                  # both embedded models
    python benchmarks/bench_sensitivity_estimate.py --est-samples 2  # another estimator setting

Cells, tables and their seconds are cached in paper_table's cache (a rerun reuses them;
``--fresh-timing`` times both tables again, one after the other in this process).
Writes ``benchmarks/results/sensitivity_estimate.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).parent))

import paper_table as pt  # noqa: E402
from _common import machine  # noqa: E402

from moe_ao.planner import estimate_sensitivities, measure_sensitivities  # noqa: E402

logger = logging.getLogger("bench_sensitivity_estimate")
WIDTHS = (2, 3, 4, 8)


def rank_agreement(measured: dict, estimated: dict, units: list) -> dict[str, dict[str, float]]:
    """Per kind: Spearman over every (unit, width) cell, and per width over units."""
    out = {}
    for kind in sorted({u.kind for u in units if u.name in measured}):
        names = [u.name for u in units if u.kind == kind and u.name in measured]
        row = {"units": len(names), "pooled": spearmanr([measured[n][b] for n in names for b in WIDTHS],
                                                        [estimated[n][b] for n in names for b in WIDTHS])[0]}
        for b in WIDTHS:
            row[f"{b}-bit"] = spearmanr([measured[n][b] for n in names], [estimated[n][b] for n in names])[0]
        out[kind] = {k: float(v) for k, v in row.items()}
    return out


def fresh_seconds(run: pt.ModelRun) -> dict[str, float]:
    """Both tables timed again in this process, one after the other."""
    a, out = run.args, {}
    t = time.perf_counter()
    estimate_sensitivities(run.model, run.calibration, None, group_size=pt.GROUP_SIZE, quantizer=a.method,
                           windows=a.est_windows, samples=a.est_samples, progress=False)
    out["estimate"] = time.perf_counter() - t
    t = time.perf_counter()
    measure_sensitivities(run.model, run.calibration, None, group_size=pt.GROUP_SIZE, quantizer=a.method,
                          kl_windows=a.kl_windows, progress=False)
    out["measured"] = time.perf_counter() - t
    return out


def run_model(name: str, args: argparse.Namespace, cache_dir: Path, fresh: bool) -> dict[str, Any]:
    run = pt.ModelRun(name, args, cache_dir)
    cells = [c for c in pt.grid(run.facts, run.units, args.seeds, args.budgets) if c.experiment == "optimizer"]
    achieved: dict[str, tuple[float, float | None]] = {}
    rows: dict[str, dict[str, Any]] = {}
    for cell in cells:
        row = pt.run_cell(run, cell, cache_dir, False, achieved)
        if "avg_bits" in row:
            achieved[cell.id] = (row["avg_bits"], row.get("kl"))
        rows[cell.id] = row
        logger.info("%s %-28s %s", run.tag, cell.id, f"KL {row['kl']:.5f}" if "kl" in row else "infeasible")
    budgets = []
    for B in args.budgets:
        heur = [r for i, r in rows.items() if i.endswith(f"@{B}") and not i.startswith("knapsack") and "kl" in r]
        best = min(heur, key=lambda r: r["kl"])
        meas, est, hess = rows[f"knapsack@{B}"], rows[f"knapsack-estimate@{B}"], rows[f"knapsack-hessian@{B}"]
        budgets.append({"budget": B, "heuristic": best["strategy"], "heuristic_bits": best["avg_bits"],
                        "heuristic_kl": best["kl"], "measured_kl": meas["kl"], "estimate_kl": est["kl"],
                        "estimate_bits": est["avg_bits"], "hessian_kl": hess["kl"],
                        "estimate_vs_heuristic": est["kl"] / best["kl"], "estimate_vs_measured": est["kl"] / meas["kl"],
                        "measured_vs_heuristic": meas["kl"] / best["kl"]})
    kl, es = run.kl_stats, run.est_stats
    seconds = {"measured": kl.sensitivity_setup.get("seconds"), "estimate": es.estimate_setup.get("seconds"),
               "source": "cache (each timed when first computed)"}
    if fresh:
        seconds = fresh_seconds(run) | {"source": "this run, one after the other"}
    return {"model": run.tag, "units": len(kl.sensitivities), "budgets": budgets, "seconds": seconds,
            "spearman": rank_agreement(kl.sensitivities, es.sensitivity_estimates, run.units),
            "estimate_setup": {k: v for k, v in es.estimate_setup.items() if k != "group_sizes"}}


def to_md(results: list[dict[str, Any]], args: argparse.Namespace, argv: list[str]) -> str:
    lines = ["# KL sensitivities: two-pass estimate vs measured", "", f"Machine: {machine()} "
             f"({torch.get_num_threads()} torch thread). The machine was shared with other jobs (load 2-4 on 2 "
             "cores): seconds are indicative.", "",
             f"Setup as paper_table's optimizer rows: {args.method.upper()}, group {pt.GROUP_SIZE}, {args.n_calib} x "
             f"{args.seq_len} calibration tokens, {args.eval_windows} x {args.seq_len} held-out tokens; measured KL on "
             f"{args.kl_windows} windows; estimate on {args.est_windows or args.n_calib} windows x "
             f"{args.est_samples} sampled label sequence(s). 10³ KL per token vs the bf16 model.", "",
             "| model | budget | best heuristic (avg bits) | its 10³ KL | knapsack, measured | knapsack, estimate "
             "| estimate / heuristic (target ≤ 0.6) | estimate / measured (target ≤ 1.3) | knapsack, Hessian proxy |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        for b in r["budgets"]:
            lines.append(f"| {r['model']} | {b['budget']} | {b['heuristic']} ({b['heuristic_bits']:.3f}) | "
                         f"{1e3 * b['heuristic_kl']:.3f} | {1e3 * b['measured_kl']:.3f} | "
                         f"**{1e3 * b['estimate_kl']:.3f}** | {b['estimate_vs_heuristic']:.2f}x | "
                         f"{b['estimate_vs_measured']:.2f}x | {1e3 * b['hessian_kl']:.3f} |")
    lines += ["", "| model | units x widths | measured s | estimate s | ratio (target ≤ 0.1) | timing |",
              "|---|---:|---:|---:|---:|---|"]
    for r in results:
        s = r["seconds"]
        ratio = s["estimate"] / s["measured"] if s.get("measured") and s.get("estimate") else float("nan")
        lines.append(f"| {r['model']} | {r['units']} x {len(WIDTHS)} | {s['measured']:.0f} | {s['estimate']:.0f} | "
                     f"{ratio:.3f} | {s['source']} |")
    lines += ["", "Spearman rank correlation of the estimate with the measured table, per kind:", "",
              "| model | kind | units | all widths pooled | " + " | ".join(f"{b}-bit" for b in WIDTHS) + " |",
              "|---|---|---:|---:|" + "---:|" * len(WIDTHS)]
    for r in results:
        for kind, s in r["spearman"].items():
            lines.append(f"| {r['model']} | {kind} | {s['units']:.0f} | {s['pooled']:.3f} | "
                         + " | ".join(f"{s[f'{b}-bit']:.3f}" for b in WIDTHS) + " |")
    lines += ["", f"Command: `{' '.join(['python benchmarks/bench_sensitivity_estimate.py', *argv])}`"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fresh-timing", action="store_true", help="time both tables again in this process")
    ap.add_argument("--result", default="benchmarks/results/sensitivity_estimate", help="output prefix")
    own, rest = ap.parse_known_args(argv)
    args = pt.parse_args(rest)
    cache_dir = Path(args.cache_dir) if args.cache_dir else Path(args.out).parent / "cache"
    torch.set_num_threads(args.threads)
    results = [run_model(name, args, cache_dir, own.fresh_timing) for name in args.model]
    out = Path(own.result)
    out.parent.mkdir(parents=True, exist_ok=True)
    all_argv = list(sys.argv[1:] if argv is None else argv)
    out.with_suffix(".md").write_text(to_md(results, args, all_argv))
    out.with_suffix(".json").write_text(json.dumps({"machine": machine(), "results": results}, indent=1))
    return results


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    main()
