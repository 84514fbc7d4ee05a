"""Planning a real-sized model on this machine: profile + estimated sensitivities + knapsack.

On the OLMoE-1B-7B-shaped random checkpoint of ``bench_streaming.py`` (hidden 2048, 16
layers of 64 experts top-8, vocab 50304: 6.9B parameters, 13.8 GB in bf16; 3,072 expert
units of each projection), streamed one layer at a time from its files, in a fresh
process: ``profile`` (routing counts), ``estimate_sensitivities`` (two passes: the
estimated KL of every unit at 2/3/4/8 bits, RTN candidates by default) and the knapsack at 2.5 average bits on that
estimate. Reports each step's wall time and the process's peak RSS (VmHWM). Random
weights and random calibration tokens: this measures cost, not quality.

    python benchmarks/bench_plan_at_scale.py --root /work/ckpts               # 8 x 256 tokens
    python benchmarks/bench_plan_at_scale.py --root /work/ckpts --windows 16

Writes ``benchmarks/results/plan_at_scale.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine  # noqa: E402
from bench_streaming import gb, make  # noqa: E402

RUN = r"""
import json, sys, time, torch
import moe_ao
from moe_ao.planner import estimate_sensitivities, plan
from moe_ao.profiling import profile
from moe_ao.stream import StreamedModel

def peak_gib():
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) / 2**20

src = sys.argv[1]
windows, seq_len, threads, group = (int(a) for a in sys.argv[2:6])
quantizer = sys.argv[6]
torch.set_num_threads(threads)
out, t = {}, time.perf_counter()
streamed = StreamedModel(src)
streamed.preflight()
streamed.load_rest()
model = streamed.model
ids = torch.randint(0, model.config.vocab_size, (windows, seq_len), generator=torch.Generator().manual_seed(0))
out["open_s"], t = time.perf_counter() - t, time.perf_counter()
prof = profile(model, ids, hessians=False)
out["profile_s"], out["profile_peak_gib"], t = time.perf_counter() - t, peak_gib(), time.perf_counter()
estimate_sensitivities(model, ids, prof, group_size=group, quantizer=quantizer)
out["estimate_s"], out["estimate_peak_gib"], t = time.perf_counter() - t, peak_gib(), time.perf_counter()
p = plan(model, "knapsack", budget_bits=2.5, stats=prof, group_size=group)
out["knapsack_s"] = time.perf_counter() - t
units = moe_ao.units(model)
out |= {"peak_gib": peak_gib(), "units": len(prof.sensitivity_estimates), "avg_bits": p.avg_bits(units),
        "sensitivity": p.meta.get("details", {}).get("sensitivity"),
        "expert_bits": sorted({s.bits for n, s in p.items() if ".experts." in n})}
print(json.dumps(out))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, required=True, help="where the random checkpoint goes (13.8 GB)")
    ap.add_argument("--windows", type=int, default=8, help="calibration windows")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quantizer", choices=("rtn", "gptq"), default="rtn",
                    help="candidates the estimate prices (gptq: a GPTQ solve per unit and width, ~30 min per "
                         "OLMoE layer on 2 cores)")
    ap.add_argument("--out", default="benchmarks/results/plan_at_scale.md")
    args = ap.parse_args()
    args.root.mkdir(parents=True, exist_ok=True)
    src = make(args.root, "olmoe")
    env = os.environ | {"PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-c", RUN, str(src), str(args.windows), str(args.seq_len),
                           str(args.threads), "128", args.quantizer], capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    total = r["open_s"] + r["profile_s"] + r["estimate_s"] + r["knapsack_s"]
    lines = ["# Profile + estimated sensitivities + knapsack on an OLMoE-1B-7B-shaped checkpoint", "",
             f"Machine: {machine()}, {args.threads} thread(s). Checkpoint: random weights, {gb(src):.1f} GB bf16, "
             f"streamed one layer at a time; {args.windows} x {args.seq_len} random calibration tokens; group 128; "
             f"{r['units']} units estimated at 2/3/4/8 bits with {args.quantizer.upper()} candidates.", "",
             "| step | wall s | peak RSS after it, GiB |", "|---|---:|---:|",
             f"| open (config, embeddings, head) | {r['open_s']:.0f} | |",
             f"| profile (routing counts) | {r['profile_s']:.0f} | {r['profile_peak_gib']:.2f} |",
             f"| estimate_sensitivities (two passes) | {r['estimate_s']:.0f} | {r['estimate_peak_gib']:.2f} |",
             f"| knapsack at 2.5 bits | {r['knapsack_s']:.0f} | {r['peak_gib']:.2f} |",
             f"| **total** | **{total:.0f}** | **{r['peak_gib']:.2f}** |", "",
             f"Plan: {r['avg_bits']:.3f} average bits, sensitivity source `{r['sensitivity']}`, expert widths "
             f"{r['expert_bits']}.", "",
             f"Command: `python benchmarks/bench_plan_at_scale.py {' '.join(sys.argv[1:])}`"]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(json.dumps(r))


if __name__ == "__main__":
    main()
