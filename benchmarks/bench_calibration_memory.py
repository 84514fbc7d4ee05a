"""Peak memory of layer-wise GPTQ calibration across model depth.

Each depth runs in a fresh subprocess (so ru_maxrss is that run's own peak) on a
random Mixtral-shaped model; the float model itself grows with depth, so the table
also reports the peak *above* the loaded model, which is what layer-wise
calibration promises to keep flat.

    python benchmarks/bench_calibration_memory.py --depths 2 4 8 16
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

import torch

CHILD = r"""
import json, resource, sys, time, torch
from transformers import AutoModelForCausalLM, MixtralConfig
import moe_ao
depth, hidden, n, L = (int(a) for a in sys.argv[1:5])
torch.manual_seed(0)
cfg = MixtralConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=depth,
                    num_attention_heads=8, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2)
model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
units = moe_ao.units(model)
plan = moe_ao.Plan({u.name: 3 for u in units if u.kind in ("expert", "attention")}, group_size=64)
calib = torch.randint(0, 1024, (n, L))
t = time.perf_counter()
moe_ao.quantize_(model, plan, method="gptq", calibration=calib, progress=False)
dt = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"depth": depth, "model_mib": sum(p.numel() * 2 for p in model.parameters()) / 2**20,
                  "base_mib": base / 1024, "peak_mib": peak / 1024, "seconds": dt}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depths", type=int, nargs="+", default=[2, 4, 8, 16])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--n-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--out", default="benchmarks/results/calibration_memory.md")
    args = ap.parse_args()
    rows = []
    for d in args.depths:
        cmd = [sys.executable, "-c", CHILD, str(d), str(args.hidden), str(args.n_samples), str(args.seq_len)]
        rows.append(
            json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        )
    cpu = next(
        (l.split(":")[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in l), "?"
    )
    lines = [
        f"Machine: {platform.machine()}, {cpu}, torch {torch.__version__}. Mixtral-shaped random bf16 model, hidden "
        f"{args.hidden}, 8 experts top-2; GPTQ 3-bit experts+attention, {args.n_samples} x {args.seq_len} tokens.",
        "",
        "| layers | model MiB | RSS after load MiB | peak RSS MiB | peak above load MiB | GPTQ s |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['depth']} | {r['model_mib']:.1f} | {r['base_mib']:.0f} | {r['peak_mib']:.0f} |"
            f" {r['peak_mib'] - r['base_mib']:.0f} | {r['seconds']:.1f} |"
        )
    text = (
        "\n".join(lines)
        + "\n\nCommand: `python benchmarks/bench_calibration_memory.py "
        + " ".join(sys.argv[1:])
        + "`\n"
    )
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
