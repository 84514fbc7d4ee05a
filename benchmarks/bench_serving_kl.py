"""What serving costs: KL of moe_ao's free plan vs the vLLM- and llama.cpp-constrained plans.

For each embedded model the knapsack optimizer plans at the same average bits three
ways, on the same measured KL sensitivities (group 32, symmetric; measured with the
quantizer the plans are then quantized with, ``--method``):

- ``free``: moe_ao's own plan (a width per expert and per gate/up half);
- ``vllm``: experts of a layer share one width, q/k/v and gate/up share theirs, widths {4, 8}
  (``vllm-humming`` adds 2/3-bit experts);
- ``llama.cpp``: a layer's experts share a type per projection (gate/up/down tensors).

Each plan is quantized (GPTQ, or RTN with --method rtn) and judged by its KL to the float model on held-out
WikiText-2 test. The llama.cpp plans are also exported to GGUF and run in llama.cpp
(llama-cpp-python, from this process or the interpreter in MOE_AO_LLAMA_CPP_PYTHON):
KL(moe_ao || llama.cpp) on the same windows, and the file's size, whose bits are the
real ones (2/3-bit codes whose rows are not a multiple of 256 are stored as Q4_0).

    python benchmarks/bench_serving_kl.py [--models tiny-mixtral tiny-qwen2-moe] [--budgets 3.0 4.0 4.5 5.0]

Writes benchmarks/results/serving.md and serving.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import Bench, machine

import moe_ao
from moe_ao.export import export
from moe_ao.export.verify import kl_per_token, llama_cpp_python, llama_cpp_run
from moe_ao.planner import measure_sensitivities
from moe_ao.profile_stats import Profile
from moe_ao.profiling import profile

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = (None, "vllm", "vllm-humming", "llama.cpp")
GROUP = 32


def _plan(bench: Bench, stats, budget: float, serving: str | None):
    try:
        return moe_ao.plan(bench.model, "knapsack", budget_bits=budget, stats=stats, group_size=GROUP,
                           serving=serving)
    except ValueError as e:  # e.g. below vLLM's cheapest plan (all 4-bit)
        logging.info("%s at %.2f with serving=%s: %s", bench.name, budget, serving, e)
        return None


def _llama_cpp(bench: Bench, model, tmp: Path) -> dict:
    """GGUF size and KL(moe_ao || llama.cpp) on the benchmark's windows."""
    path = export(model, tmp / f"{bench.name}.gguf", format="gguf", tokenizer=bench.tokenizer)
    out = {"gguf_mib": path.stat().st_size / 2**20}
    if llama_cpp_python() is None:
        return out
    got = llama_cpp_run(path, bench.windows, threads=torch.get_num_threads())["logits"]
    with torch.no_grad():
        mine = torch.cat([model(w).logits.float() for w in bench.windows.split(8)])
    out["kl_llama_cpp"] = kl_per_token(mine, got).mean().item()
    out["kl_float_llama_cpp"] = kl_per_token(bench.ref_lp, got).mean().item()  # ref_lp are log-probs
    return out


def _row(bench: Bench, stats, budget: float, serving: str | None, tmp: Path, method: str) -> dict | None:
    p = _plan(bench, stats, budget, serving)
    if p is None:
        return None
    t = time.perf_counter()
    kwargs = {"calibration": bench.calibration} if method == "gptq" else {}
    model = moe_ao.quantize_(bench.fresh(), p, method=method, **kwargs)
    row = {"model": bench.name, "budget": budget, "serving": serving or "free", "avg_bits": p.meta["avg_bits"],
           "true_avg_bits": p.meta["true_avg_bits"], "quantize_s": time.perf_counter() - t} | bench.judge(model)
    if serving == "llama.cpp":
        row |= _llama_cpp(bench, model, tmp)
    return row


def _q4_q8_row(bench: Bench, tmp: Path) -> dict:
    """The all-Q4_0/Q8_0 plan (experts 4-bit, the rest 8-bit, RTN): the GGUF exactness check."""
    planned = [u for u in moe_ao.units(bench.model) if u.kind in ("expert", "attention", "shared_expert", "dense_mlp")]
    p = moe_ao.Plan({u.name: 4 if u.kind == "expert" else 8 for u in planned}, group_size=GROUP,
                    meta={"strategy": "q4_0 experts, q8_0 rest"})
    model = moe_ao.quantize_(bench.fresh(), p)
    row = {"model": bench.name, "budget": None, "serving": "all Q4_0/Q8_0 (RTN)", "avg_bits": p.avg_bits(model),
           "true_avg_bits": p.true_avg_bits(model), "quantize_s": 0.0} | bench.judge(model)
    return row | _llama_cpp(bench, model, tmp)


def _table(rows: list[dict]) -> str:
    head = ("| model | budget | plan | avg bits | true bits | 10³ KL vs float | top-1 | KL vs free |"
            " GGUF MiB | KL(moe_ao ‖ llama.cpp) |")
    lines = [head, "|" + "---|" * 10]
    free = {(r["model"], r["budget"]): r["kl"] for r in rows if r["serving"] == "free"}
    for r in rows:
        ratio = r["kl"] / free[(r["model"], r["budget"])] if (r["model"], r["budget"]) in free else None
        cells = [r["model"], "—" if r["budget"] is None else f"{r['budget']:.2f}", r["serving"],
                 f"{r['avg_bits']:.3f}", f"{r['true_avg_bits']:.3f}", f"{1e3 * r['kl']:.3f}", f"{r['top1']:.3f}",
                 "—" if ratio is None else f"{ratio:.2f}x", f"{r['gguf_mib']:.2f}" if "gguf_mib" in r else "—",
                 f"{r['kl_llama_cpp']:.2e}" if "kl_llama_cpp" in r else "—"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny-mixtral", "tiny-qwen2-moe"])
    parser.add_argument("--budgets", nargs="+", type=float, default=[3.0, 4.0, 4.5, 5.0])
    parser.add_argument("--kl-windows", type=int, default=8)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--method", choices=("gptq", "rtn"), default="gptq", help="how each plan is quantized")
    parser.add_argument("--constraint-models", nargs="+", default=None,
                        help="models that get the free/vllm/llama.cpp plans (default: all; the others only the"
                             " all-Q4_0/Q8_0 llama.cpp check, which needs no sensitivities)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            bench = Bench.load(name, eval_windows_n=args.eval_windows)
            rows.append(_q4_q8_row(bench, Path(tmp)))
            logging.info("%s", rows[-1])
            if args.constraint_models is not None and name not in args.constraint_models:
                continue
            cache = Path(tempfile.gettempdir()) / f"moe_ao_serving_{name}_{args.kl_windows}_{args.method}.pt"
            if cache.is_file():  # the sensitivities take minutes; a rerun (e.g. with llama.cpp) reuses them
                stats = Profile.load(str(cache))
            else:
                stats = profile(bench.model, bench.calibration, hessians=True)
                measure_sensitivities(bench.model, bench.calibration, stats, group_size=GROUP,
                                      kl_windows=args.kl_windows, quantizer=args.method)
                stats.save(str(cache))
            for budget in args.budgets:
                for serving in TARGETS:
                    row = _row(bench, stats, budget, serving, Path(tmp), args.method)
                    if row is not None:
                        rows.append(row)
                        logging.info("%s", row)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "serving.json").write_text(json.dumps(rows, indent=1) + "\n")
    text = (f"# Serving constraints: KL cost at equal bits\n\nMachine: {machine()}\n"
            f"llama.cpp: {'llama-cpp-python via ' + llama_cpp_python() if llama_cpp_python() else 'not available'}\n\n"
            f"`python benchmarks/bench_serving_kl.py {' '.join(sys.argv[1:])}`; knapsack on"
            f" measured KL sensitivities ({args.method}, group {GROUP}, {args.kl_windows} windows), {args.method} quantization,"
            f" {args.eval_windows} x 256 held-out WikiText-2 test tokens.\n\n" + _table(rows))
    (RESULTS / "serving.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
