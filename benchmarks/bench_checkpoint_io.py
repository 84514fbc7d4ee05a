"""What a verified checkpoint costs: save, and load with and without sha256 verification.

An OLMoE-1B-7B-shaped model cut to a few layers (hidden 2048, 64 experts of 1024, vocab
50304; random weights) is quantized with RTN (experts 4-bit, attention 8-bit, group 128),
saved, and loaded back with ``verify=True`` (digests checked) and ``verify=False``
(structure only), alternately, after one warm-up load (the file is in the page cache:
this measures the checks, not the disk). Prints seconds, GB/s and the verification
overhead per GB; writes ``benchmarks/results/checkpoint_io.md``.

    python benchmarks/bench_checkpoint_io.py --layers 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import OlmoeConfig, OlmoeForCausalLM

import moe_ao
from moe_ao.checkpoint import file_digest

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine  # noqa: E402


def build(layers: int) -> torch.nn.Module:
    cfg = OlmoeConfig(hidden_size=2048, intermediate_size=1024, num_hidden_layers=layers, num_attention_heads=16,
                      num_key_value_heads=16, num_experts=64, num_experts_per_tok=8, vocab_size=50304,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = OlmoeForCausalLM(cfg).to(torch.bfloat16).eval()
    units = moe_ao.units(model)
    plan = moe_ao.Plan({u.name: 4 for u in units if u.kind == "expert"}
                       | {u.name: 8 for u in units if u.kind == "attention"}, group_size=128)
    return moe_ao.quantize_(model, plan)


def timed_load(path: Path, verify: bool) -> float:
    t = time.perf_counter()
    moe_ao.load_quantized(path, verify=verify)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/checkpoint_io.md")
    args = ap.parse_args()
    model = build(args.layers)
    with tempfile.TemporaryDirectory(dir=".") as d:
        t = time.perf_counter()
        path = moe_ao.save_quantized(model, Path(d) / "c")
        save_s = time.perf_counter() - t
        del model
        gb = sum(p.stat().st_size for p in path.iterdir()) / 1e9
        t = time.perf_counter()
        for p in path.iterdir():
            file_digest(p)
        hash_s = time.perf_counter() - t
        timed_load(path, True)  # warm-up: lazy imports, page cache
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.reps):
            for v in times:
                times[v].append(timed_load(path, v))
        loads = {v: statistics.median(ts) for v, ts in times.items()}
    lines = [
        "# Checkpoint save / verified load", "",
        f"Machine: {machine()}; load average {os.getloadavg()[0]:.1f} at the end (other jobs running shift the "
        "seconds, not what is checked)", "",
        f"OLMoE-shaped, {args.layers} layers, experts 4-bit, attention 8-bit, group 128, RTN; checkpoint {gb:.2f} GB",
        f"(`python benchmarks/bench_checkpoint_io.py --layers {args.layers}`; loads: median of {args.reps}, "
        "in one process after a warm-up load)", "",
        "| step | seconds | GB/s |", "|---|---:|---:|",
        f"| save_quantized (write, fsync, sha256 of every file) | {save_s:.2f} | {gb / save_s:.2f} |",
        f"| sha256 of the checkpoint alone | {hash_s:.2f} | {gb / hash_s:.2f} |",
        f"| load_quantized(verify=False) (structure checks only) | {loads[False]:.2f} | {gb / loads[False]:.2f} |",
        f"| load_quantized(verify=True) (default) | {loads[True]:.2f} | {gb / loads[True]:.2f} |",
        "",
        f"Verification adds {loads[True] - loads[False]:.2f} s, {(loads[True] - loads[False]) / gb:.2f} s per GB.",
    ]
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
