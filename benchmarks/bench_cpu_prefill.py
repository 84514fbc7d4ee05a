"""CPU prompts and batches: moe_ao's packed kernels vs bf16 at T tokens per call, same run.

    python benchmarks/bench_cpu_prefill.py [--threads 2] [--tokens 1,2,4,8,16,64,256,1024]
                                           [--skip-linear] [--skip-memory] [--note "..."]
                                           [--out benchmarks/results/cpu_prefill]
    python benchmarks/bench_cpu_prefill.py --switch-over     # GEMV passes vs tiled GEMM, one thread

(a) A Mixtral-shaped experts layer (hidden 4096, intermediate 14336, 8 experts, top-2),
    T tokens routed at random (two distinct experts per token, new routes every rep):
    transformers' ``MixtralExperts`` in bf16 with its ``grouped_mm`` implementation
    (eager) vs moe_ao with a mixed 2.5-bit plan (1 in 4 expert slices at 4 bits, the rest
    at 2), uniform 4 bits, and uniform 4 bits with int8 per-token activations (W4A8);
    ms per call, speed-up over bf16, and the peak RSS a call adds (each variant measured
    alone in a fresh process: peak RSS reset by /proc/self/clear_refs before each call).
(b) 2D linears 4096x4096 and 14336x4096 (out x in) at the same T: bf16 F.linear, aten
    int4/int8 and moe_ao 2/3/4/8 bits and W4A8, rotating over copies of each weight so
    that none is read from cache.
Variants run round-robin inside each rep, so load from other jobs falls on all alike.
Weights are random (codes uniform): speed only. Builders and timers come from
bench_cpu_decode.py. Writes <out>.md and <out>.csv.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import torch
from bench_cpu_decode import (
    PLANS,
    bf16_banks,
    clock_timer,
    gemv_variants,
    load,
    machine,
    mixtral_experts,
    packed_layer,
    time_round_robin,
)
from transformers import MixtralConfig

from moe_ao import experts as experts_impl
from moe_ao.kernels import cpu_packed
from moe_ao.kernels.cpu_packed import packed_linear

logger = logging.getLogger("bench_cpu_prefill")
E, GS = 8, 128
SHAPE = {"hidden": 4096, "inter": 14336}  # the layer's; --small shrinks it for a smoke run
BF16 = torch.bfloat16
LAYER_VARIANTS = ["bf16 grouped_mm", "moe_ao mixed 2.5-bit", "moe_ao uniform 4-bit", "moe_ao W4A8"]


def reps_for(T: int) -> int:
    """Timed reps per T: prompts of thousands of tokens take seconds per call in bf16."""
    return 9 if T <= 16 else 5 if T <= 64 else 3 if T <= 256 else 2


def cpu_flags() -> str:
    flags = set(next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")),
                     "").split())
    wanted = ["avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile"]
    return ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in wanted)


# ---------------------------------------------------------------- (a) experts layer
def build_layer(name: str, hidden: int, inter: int) -> torch.nn.Module:
    config = MixtralConfig(hidden_size=hidden, intermediate_size=inter, num_local_experts=E, num_experts_per_tok=2)
    experts_impl.register()
    if name == "bf16 grouped_mm":
        return mixtral_experts(config, *bf16_banks(hidden, inter, E, torch.device("cpu")), "grouped_mm")
    plan, act_bits = {"moe_ao mixed 2.5-bit": ("mixed 2.5-bit", None), "moe_ao uniform 4-bit": ("uniform 4-bit", None),
                      "moe_ao W4A8": ("uniform 4-bit", 8)}[name]
    return packed_layer(config, hidden, inter, E, GS, PLANS[plan], torch.device("cpu"), act_bits)[0]


def weight_bytes(layer: torch.nn.Module) -> int:
    return sum(w.nbytes_packed() if hasattr(w, "nbytes_packed") else w.numel() * w.element_size()
               for w in (layer.gate_up_proj, layer.down_proj))


def routes(T: int, n: int, seed: int, hidden: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """n random batches: hidden [T, H], top-2 expert ids [T, 2] (distinct), weights [T, 2]."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.rand(T, E, generator=g).topk(2, dim=-1).indices
        out.append((torch.randn(T, hidden, generator=g).to(BF16), ids, torch.full((T, 2), 0.5, dtype=BF16)))
    return out


def time_layer(tokens: list[int]) -> tuple[dict[int, dict[str, float]], dict[str, int]]:
    """Median seconds per call of each layer variant at each T (round-robin within T), and
    each variant's bytes of weights."""
    layers = {name: build_layer(name, **SHAPE) for name in LAYER_VARIANTS}
    sizes = {name: weight_bytes(layer) for name, layer in layers.items()}
    results = {}
    for T in tokens:
        reps, warmup = reps_for(T), 1 if T <= 64 else 0  # a bf16 call at T = 1024 takes minutes
        batches = routes(T, warmup + reps, seed=T, hidden=SHAPE["hidden"])
        variants = {name: ((lambda i, m=m, b=batches: m(*b[i])), 0.0) for name, m in layers.items()}
        results[T] = time_round_robin(variants, reps, warmup, clock_timer(time.perf_counter))
        logger.info("T=%d: %s (load %s)", T, {k: f"{v * 1e3:.1f} ms" for k, v in results[T].items()}, load())
    return results, sizes


def peak_rss_of_calls(name: str, tokens: list[int]) -> dict[int, float]:
    """In this process (meant to be fresh): bytes of peak RSS one call at each T adds."""
    layer = build_layer(name, **SHAPE)
    layer(*routes(1, 1, seed=0, hidden=SHAPE["hidden"])[0])  # loads the kernel library, allocates the thread pool
    extra = {}
    for T in tokens:
        batch = routes(T, 1, seed=T, hidden=SHAPE["hidden"])[0]
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
        before = _status("VmRSS")
        layer(*batch)
        extra[T] = _status("VmHWM") - before
    return extra


def _status(key: str) -> int:
    return next(int(line.split()[1]) * 1024 for line in Path("/proc/self/status").read_text().splitlines()
                if line.startswith(key))


def measure_memory(tokens: list[int], threads: int, small: bool) -> dict[str, dict[int, float]]:
    """Peak RSS added by one call, per variant and T, each variant in a fresh process."""
    out = {}
    for name in LAYER_VARIANTS:
        cmd = [sys.executable, __file__, "--memory-variant", name, "--threads", str(threads),
               "--tokens", ",".join(map(str, tokens)), *(["--small"] if small else [])]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[name] = {int(k): v for k, v in json.loads(res.stdout.strip().splitlines()[-1]).items()}
        logger.info("peak RSS added, %s: %s", name, {k: f"{v / 2**20:.0f} MB" for k, v in out[name].items()})
    return out


# ---------------------------------------------------------------- (b) 2D linears
def time_linears(tokens: list[int], shapes: list[tuple[int, int]]) -> dict[tuple[str, int], dict[str, float]]:
    results = {}
    for N, K in shapes:
        for T in tokens:
            variants = gemv_variants(N, K, GS, packed_linear, rows=T)
            variants |= gemv_variants(N, K, GS, packed_linear, rows=T, widths=(4,), act_bits=8, baselines=False)
            results[(f"{N}x{K}", T)] = time_round_robin(variants, reps_for(T), 1, clock_timer(time.perf_counter))
            del variants
            logger.info("%dx%d T=%d done (load %s)", N, K, T, load())
    return results


# ---------------------------------------------------------------- switch-over
def _best_of_3(f) -> float:
    """Least thread CPU time of 3 calls after a warm-up call."""
    f()
    ts = []
    for _ in range(3):
        t = time.thread_time()
        f()
        ts.append(time.thread_time() - t)
    return min(ts)


def switch_over(out: Path) -> None:
    """GEMV passes vs the tiled GEMM forced at each rows per slice, and the GEMV passes with
    int8 activations (act_bits = 8), one thread, CPU time."""
    from bench_cpu_decode import random_packed

    from moe_ao.kernels._registry import buffers_of

    torch.set_num_threads(1)
    lines = ["# CPU kernel switch-over: GEMV passes vs tiled GEMM", "", f"Machine: {machine()}; {cpu_flags()}.", "",
             f"Load average at start: {load()}. One thread, thread CPU time, best of 3. A8: act_bits = 8 "
             "(x rounded per token to int8), GEMV passes.", "",
             "| weight (out x in) | bits | x dtype | rows | GEMV ms | GEMM ms | GEMV A8 ms | GEMV GMAC/s | GEMM GMAC/s "
             "| GEMV A8 GMAC/s |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for N, K in [(14336, 4096), (4096, 14336)]:
        for bits in (2, 4):
            w = random_packed((N, K), 1, [bits], GS)
            for dtype in (BF16, torch.float32):
                for M in (1, 2, 4, 8, 16, 32, 64, 256):
                    x = torch.randn(M, K, dtype=dtype)
                    best = []
                    for rows, act in ((10**9, 0), (1, 0), (10**9, 8)):
                        with cpu_packed.gemm_min_rows(rows):
                            best.append(_best_of_3(lambda x=x, w=w, N=N, act=act: torch.ops.moe_ao.packed_linear.default(
                                x, w.slot, N, 1, GS, buffers_of(w), act)))
                    rates = " | ".join(f"{M * N * K / t / 1e9:.1f}" for t in best)
                    lines.append(f"| {N}x{K} | {bits} | {str(dtype).removeprefix('torch.')} | {M} | "
                                 + " | ".join(f"{t * 1e3:.1f}" for t in best) + f" | {rates} |")
                    logger.info(lines[-1])
    lines += ["", f"Load average at end: {load()}.", ""]
    out.with_name(out.name + "_switch_over.md").write_text("\n".join(lines))


# ---------------------------------------------------------------- report
def layer_report(times: dict[int, dict[str, float]], memory: dict[str, dict[int, float]],
                 sizes: dict[str, int]) -> tuple[list[str], list[list]]:
    head = "| T | " + " | ".join(f"{n} ms" for n in LAYER_VARIANTS) + " | " + " | ".join(
        f"{n} vs bf16" for n in LAYER_VARIANTS[1:]) + " | " + " | ".join(f"{n} peak +MB" for n in LAYER_VARIANTS) + " |"
    lines = [head, "|" + "---:|" * (1 + len(LAYER_VARIANTS) * 3 - 1)]
    rows = []
    for T, t in times.items():
        base = t["bf16 grouped_mm"]
        mem = [memory.get(n, {}).get(T) for n in LAYER_VARIANTS]
        lines.append(f"| {T} | " + " | ".join(f"{t[n] * 1e3:.1f}" for n in LAYER_VARIANTS) + " | "
                     + " | ".join(f"{base / t[n]:.2f}x" for n in LAYER_VARIANTS[1:]) + " | "
                     + " | ".join("-" if m is None else f"{m / 2**20:.0f}" for m in mem) + " |")
        for n, m in zip(LAYER_VARIANTS, mem):
            rows.append(["experts layer", f"{E}x({2 * SHAPE['inter']}x{SHAPE['hidden']} + {SHAPE['hidden']}x"
                         f"{SHAPE['inter']})", n, T, t[n] * 1e3, base / t[n],
                         "" if m is None else m / 2**20, sizes[n] / 2**20])
    return lines, rows


def targets(times: dict[int, dict[str, float]], memory: dict[str, dict[int, float]], sizes: dict[str, int]) -> list[str]:
    out = []
    for T, t in times.items():
        r = t["bf16 grouped_mm"] / t["moe_ao mixed 2.5-bit"]
        goal = 2.0 if T <= 8 else 1.0
        fast4 = t["moe_ao uniform 4-bit"] <= t["moe_ao mixed 2.5-bit"]
        out.append(f"- T={T}: mixed 2.5-bit {r:.2f}x bf16 (target >= {goal:.1f}x: {'met' if r >= goal else 'NOT met'}); "
                   f"uniform 4-bit {'at least as fast as' if fast4 else 'SLOWER than'} 2.5-bit "
                   f"({t['moe_ao uniform 4-bit'] * 1e3:.1f} vs {t['moe_ao mixed 2.5-bit'] * 1e3:.1f} ms)")
    for name in LAYER_VARIANTS[1:]:
        worst = max(memory.get(name, {0: 0}).values())
        out.append(f"- {name}: peak of a call <= packed {sizes[name] / 2**30:.2f} GB + {worst / 2**30:.2f} GB "
                   f"(target: + 0.5 GB: {'met' if worst <= 0.5 * 2**30 else 'NOT met'})")
    return out


def linear_report(results: dict[tuple[str, int], dict[str, float]]) -> tuple[list[str], list[list]]:
    names = list(next(iter(results.values())))
    lines = ["| weight | T | " + " | ".join(f"{n} ms" for n in names) + " | " + " | ".join(
        f"{n} vs bf16" for n in names[1:]) + " |", "|---|" + "---:|" * (2 * len(names))]
    rows = []
    for (shape, T), t in results.items():
        base = t["bf16 F.linear"]
        lines.append(f"| {shape} | {T} | " + " | ".join(f"{t[n] * 1e3:.2f}" for n in names) + " | "
                     + " | ".join(f"{base / t[n]:.2f}x" for n in names[1:]) + " |")
        rows += [["linear", shape, n, T, t[n] * 1e3, base / t[n], "", ""] for n in names]
    return lines, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", default="1,2,4,8,16,64,256,1024")
    ap.add_argument("--skip-linear", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--switch-over", action="store_true", help="only the GEMV vs GEMM table (one thread)")
    ap.add_argument("--small", action="store_true", help="a 256 / 512 layer and 256x256 linear: a smoke run")
    ap.add_argument("--memory-variant", help=argparse.SUPPRESS)  # internal: one variant's peak RSS, JSON on stdout
    ap.add_argument("--note", default="", help="a sentence for the report (e.g. how busy the machine was)")
    ap.add_argument("--out", default="benchmarks/results/cpu_prefill")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    torch.set_grad_enabled(False)
    torch.manual_seed(0)
    tokens = [int(t) for t in args.tokens.split(",")]
    if args.small:
        SHAPE.update(hidden=256, inter=512)
    linears = [(256, 256)] if args.small else [(4096, 4096), (14336, 4096)]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.switch_over:
        return switch_over(out)
    torch.set_num_threads(args.threads)
    if args.memory_variant:
        print(json.dumps(peak_rss_of_calls(args.memory_variant, tokens)))
        return
    lines = ["# CPU prompts and batches: packed kernels vs bf16 at T tokens per call", "",
             f"Machine: {machine()}.", "", f"CPU flags: {cpu_flags()}; kernel vector lanes: "
             f"{cpu_packed.vector_lanes()} fp32.", "", f"Load average at start (1/5/15 min): {load()}.", ""]
    if args.note:
        lines += [args.note, ""]
    times, sizes = time_layer(tokens)
    memory = {} if args.skip_memory else measure_memory(tokens, args.threads, args.small)
    table, rows = layer_report(times, memory, sizes)
    lines += [f"## (a) Mixtral-shaped experts layer (hidden {SHAPE['hidden']}, intermediate {SHAPE['inter']}, {E} "
              f"experts, top-2), "
              f"{args.threads} threads", "", "Weights: " + ", ".join(f"{n} {b / 2**30:.2f} GB" for n, b in sizes.items())
              + ". Peak +MB: the peak RSS one call adds over the weights (fresh process per variant).", "",
              *table, "", "### Targets", "", *targets(times, memory, sizes), ""]
    if not args.skip_linear:
        lin, lin_rows = linear_report(time_linears(tokens, linears))
        lines += [f"## (b) 2D linears (group {GS}), {args.threads} threads", "", *lin, ""]
        rows += lin_rows
    lines += [f"Load average at end: {load()}. Medians of 9 (T <= 16), 5 (64), 3 (256), 2 (1024) reps (the upper "
              f"median of 2), after one warm-up rep up to T = 64; variants round-robin within each rep.", ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        csv.writer(f).writerows([["section", "shape", "variant", "tokens", "ms", "speedup_vs_bf16", "peak_extra_MB",
                                  "weights_MB"], *rows])
    print("\n".join(lines))


if __name__ == "__main__":
    main()
