"""CPU decode speed: moe_ao's packed kernels vs bf16 and aten int4/int8, same run.

    python benchmarks/bench_cpu_decode.py [--reps 28] [--threads N] [--clock wall|cpu] [--skip-moe]
                                          [--out benchmarks/results/cpu_decode.md]

(a) One 4096x4096 linear, one token (GEMV): bf16 F.linear, aten int4
    (``_weight_int4pack_mm_for_cpu``, group 128), aten int8 (``_weight_int8pack_mm``,
    per channel), and moe_ao packed 2/3/4/8 bits (group 128, symmetric).
(b) A Mixtral-shaped experts layer (hidden 4096, intermediate 14336, 8 experts, top-2),
    one token: transformers' ``MixtralExperts`` in bf16 (eager loop; compiled; compiled
    ``grouped_mm``) vs moe_ao with a mixed 2.5-bit plan (1 in 4 expert slices at 4 bits,
    the rest at 2) and with uniform 4 bits, eager and ``torch.compile(fullgraph=True)``.

Decode streams weights from DRAM, so no weight may sit in cache between calls: (a)
rotates over copies of each weight (>= 256 MB per variant), (b) routes every rep to
another pair of experts (all 28 pairs in turn). Variants run round-robin inside each rep,
so load from other jobs falls on all of them alike; a 512 MB memcpy runs in the same
round-robin as the bandwidth yardstick. Weights are random (codes uniform): speed only.
Reported: median time, bytes of weights (+ scales) read per token, GB/s, % of memcpy.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import os
import platform
import resource
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import torchao
import transformers
from torch import nn

import moe_ao
from moe_ao import experts as experts_impl
from moe_ao.kernels.cpu_packed import packed_linear
from moe_ao.primitives import QuantizedWeight
from moe_ao.tensors.packed import PackedWeight
from moe_ao.tensors.packing import packed_size

ROTATE_BYTES = 256 * 2**20  # per GEMV variant: several times any L2 + the L3 share we measured
MEMCPY_BYTES = 512 * 2**20
BF16 = torch.bfloat16
Variant = tuple[Callable[[int], object], float]  # (call for rep i, bytes read per call)


# ------------------------------------------------------------------------- machine
def machine() -> str:
    cpu = next((line.split(":")[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    gcc = subprocess.run(["g++", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    return (f"{cpu}; {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}; "
            f"Python {platform.python_version()}, torch {torch.__version__}, torchao {torchao.__version__}, "
            f"transformers {transformers.__version__}, moe_ao {moe_ao.__version__}, {gcc}")


def load() -> str:
    return "/".join(f"{a:.1f}" for a in os.getloadavg())


Timer = Callable[[Callable[[], object]], float]  # seconds one call of a function takes


def clock_timer(clock: Callable[[], float]) -> Timer:
    """A Timer reading ``clock`` before and after the call (wall or thread CPU time)."""
    def time_one(fn: Callable[[], object]) -> float:
        t = clock()
        fn()
        return clock() - t
    return time_one


def time_round_robin(variants: dict[str, Variant], reps: int, warmup: int, time_one: Timer) -> dict[str, float]:
    """Median seconds per call (the upper median for even reps); every rep calls each variant once, in turn."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for i in range(warmup + reps):
        for name, (fn, _) in variants.items():
            dt = time_one(lambda fn=fn, i=i: fn(i))
            if i >= warmup:
                times[name].append(dt)
    return {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}


def memcpy_variant() -> Variant:
    src = torch.ones(MEMCPY_BYTES, dtype=torch.uint8)
    dst = torch.empty_like(src)
    return (lambda i: dst.copy_(src)), float(MEMCPY_BYTES)


def random_packed(shape: tuple[int, ...], n_seg: int, slice_bits: list[int], group_size: int,
                  act_bits: int | None = None) -> PackedWeight:
    """A PackedWeight with uniformly random codes, built without packing (slot table from a tiny twin)."""
    *_, N, K = shape
    R, G = N // n_seg, K // group_size
    tiny = [QuantizedWeight(torch.zeros(1, group_size, dtype=torch.uint8), torch.ones(1, 1, dtype=BF16), None, b,
                            group_size) for b in slice_bits]
    twin = PackedWeight.from_slices(tiny, (*shape[:-2], n_seg, group_size), n_seg, BF16)
    buffers = {}
    for b in sorted(set(slice_bits)):
        n = slice_bits.count(b)
        buffers[f"q{b}"] = torch.randint(0, 256, (n, R, packed_size(K, b)), dtype=torch.uint8)
        buffers[f"s{b}"] = (torch.rand(n, R, G) * 1e-3).to(BF16)
    return PackedWeight(twin.slot, shape, slice_bits, n_seg, group_size, True, **buffers, act_bits=act_bits)


def slice_bytes(R: int, K: int, bits: int, group_size: int) -> int:
    return R * (K * 2 if bits == 16 else packed_size(K, bits) + K // group_size * 2)


# -------------------------------------------------------------------------- (a) GEMV
def gemv_variants(N: int, K: int, group_size: int, linear: Callable[[torch.Tensor, PackedWeight], torch.Tensor],
                  rotate_bytes: int = ROTATE_BYTES, device: torch.device = torch.device("cpu"), rows: int = 1,
                  widths: tuple[int, ...] = (2, 3, 4, 8), act_bits: int | None = None,
                  baselines: bool = True) -> dict[str, Variant]:
    """bf16 F.linear, ``linear`` over packed weights of each of ``widths`` (activations at
    ``act_bits``) and, on CPU, aten int4/int8 (``baselines``: bf16 and aten), times ``rows``
    rows of x; each rotates over copies of its weight filling ``rotate_bytes``, so none is
    read from cache."""
    x = torch.randn(rows, K, dtype=BF16, device=device)
    out: dict[str, Variant] = {}

    def rotating(make: Callable[[], object], nbytes: float, call: Callable[[object], object], name: str) -> None:
        copies = [make() for _ in range(max(1, min(64, -(-rotate_bytes // int(nbytes)))))]
        out[name] = (lambda i: call(copies[i % len(copies)])), nbytes

    if baselines:
        rotating(lambda: torch.randn(N, K, dtype=BF16, device=device), N * K * 2, lambda w: F.linear(x, w),
                 "bf16 F.linear")
    if baselines and device.type == "cpu":
        _aten_variants(rotating, x, N, K, group_size)
    act = f"A{act_bits} " if act_bits else ""
    for bits in widths:
        rotating(lambda b=bits: random_packed((N, K), 1, [b], group_size, act_bits).to(device),
                 slice_bytes(N, K, bits, group_size), lambda w: linear(x, w), f"moe_ao {bits}-bit {act}(g{group_size})")
    return out


def _aten_variants(rotating: Callable[..., None], x: torch.Tensor, N: int, K: int, group_size: int) -> None:
    """aten's CPU int4 (group ``group_size``) and int8 (per channel) weight-only GEMVs."""
    G = K // group_size
    int4_codes = lambda: torch.randint(0, 16, (N, K), dtype=torch.int32)  # noqa: E731
    rotating(lambda: (torch.ops.aten._convert_weight_to_int4pack_for_cpu(int4_codes(), 1),
                      (torch.rand(G, N, 2) * 1e-3).to(BF16)),
             N * K / 2 + G * N * 4,
             lambda w: torch.ops.aten._weight_int4pack_mm_for_cpu(x, w[0], group_size, w[1]),
             f"aten int4 (g{group_size})")
    rotating(lambda: (torch.randint(-128, 128, (N, K), dtype=torch.int8), torch.rand(N, dtype=BF16)),
             N * K + N * 2, lambda w: torch.ops.aten._weight_int8pack_mm(x, w[0], w[1]), "aten int8 (per channel)")


# -------------------------------------------------------------------- (b) MoE layer
def mixtral_experts(config, gate_up: torch.Tensor, down: torch.Tensor, implementation: str) -> nn.Module:
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    config = copy.deepcopy(config)
    config._experts_implementation = implementation
    with torch.device("meta"):
        module = MixtralExperts(config)
    module.gate_up_proj = nn.Parameter(gate_up, requires_grad=False)
    module.down_proj = nn.Parameter(down, requires_grad=False)
    return module.eval()


PLANS = {"mixed 2.5-bit": lambda i: 4 if i % 4 == 0 else 2, "uniform 4-bit": lambda i: 4}  # bits of slice i


def bf16_banks(hidden: int, inter: int, E: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random bf16 gate_up [E, 2I, H] and down [E, H, I], expert by expert (no fp32 bank)."""
    gate_up = torch.empty(E, 2 * inter, hidden, dtype=BF16, device=device)
    down = torch.empty(E, hidden, inter, dtype=BF16, device=device)
    for e in range(E):
        gate_up[e].copy_(torch.randn(2 * inter, hidden, device=device) * 0.02)
        down[e].copy_(torch.randn(hidden, inter, device=device) * 0.02)
    return gate_up, down


def packed_layer(config, hidden: int, inter: int, E: int, group_size: int, bits_of: Callable[[int], int],
                 device: torch.device, act_bits: int | None = None
                 ) -> tuple[nn.Module, Callable[[int], float], float]:
    """A moe_ao experts layer with random codes at ``bits_of(slice)`` bits: (module, bytes
    read for expert e, average code bits per weight)."""
    up_bits = [bits_of(i) for i in range(2 * E)]  # slice e*2 + seg: gate, up of expert e
    down_bits = [bits_of(i) for i in range(E)]
    module = mixtral_experts(config, random_packed((E, 2 * inter, hidden), 2, up_bits, group_size, act_bits).to(device),
                             random_packed((E, hidden, inter), 1, down_bits, group_size, act_bits).to(device), "moe_ao")

    def nbytes(e: int) -> float:
        return (slice_bytes(inter, hidden, up_bits[2 * e], group_size)
                + slice_bytes(inter, hidden, up_bits[2 * e + 1], group_size)
                + slice_bytes(hidden, inter, down_bits[e], group_size))

    return module, nbytes, (sum(up_bits) + sum(down_bits)) / (3 * E)


def moe_variants(hidden: int, inter: int, E: int, group_size: int, pairs: list[tuple[int, int]],
                 device: torch.device = torch.device("cpu"), compiled_loop: bool = True
                 ) -> tuple[dict[str, Variant], dict[str, float]]:
    """Variants of one experts layer (``compiled_loop``: also the compiled bf16 eager loop);
    also the average bits per weight of each plan."""
    from transformers import MixtralConfig

    config = MixtralConfig(hidden_size=hidden, intermediate_size=inter, num_local_experts=E, num_experts_per_tok=2)
    experts_impl.register()
    gate_up, down = bf16_banks(hidden, inter, E, device)
    x = torch.randn(1, hidden, dtype=BF16, device=device)
    weights = torch.tensor([[0.6, 0.4]], dtype=BF16, device=device)
    routes = [torch.tensor([p], device=device) for p in pairs]

    def layer(module: nn.Module, bytes_of: Callable[[int], float]) -> Variant:
        mean_bytes = sum(bytes_of(e) for p in pairs for e in p) / len(pairs)
        return (lambda i: module(x, routes[i % len(routes)], weights)), mean_bytes

    bf16_bytes = lambda e: (2 * inter * hidden + hidden * inter) * 2  # noqa: E731
    variants: dict[str, Variant] = {}
    eager = mixtral_experts(config, gate_up, down, "eager")
    variants["bf16 eager (transformers loop)"] = layer(eager, bf16_bytes)
    if compiled_loop:
        variants["bf16 compiled (loop)"] = layer(torch.compile(eager), bf16_bytes)
    grouped = mixtral_experts(config, gate_up, down, "grouped_mm")
    variants["bf16 compiled (grouped_mm)"] = layer(torch.compile(grouped), bf16_bytes)

    avg_bits = {}
    for plan_name, bits_of in PLANS.items():
        packed, nbytes, avg_bits[plan_name] = packed_layer(config, hidden, inter, E, group_size, bits_of, device)
        variants[f"moe_ao {plan_name} eager"] = layer(packed, nbytes)
        variants[f"moe_ao {plan_name} compiled"] = layer(torch.compile(packed, fullgraph=True), nbytes)
    return variants, avg_bits


# ------------------------------------------------------------------------ reporting
def table(times: dict[str, float], variants: dict[str, Variant], memcpy_gbs: float, unit: str,
          baselines: list[str], yardstick: str = "memcpy") -> list[str]:
    """Markdown rows: median time, bytes read, GB/s, % of the ``yardstick`` bandwidth, speed-ups."""
    head = f"| variant | median {unit} | MB read / token | GB/s | % {yardstick} | " + " | ".join(
        f"speedup vs {b}" for b in baselines) + " |"
    lines = [head, "|" + "---|" * (5 + len(baselines))]
    scale = 1e3 if unit == "ms" else 1e6
    for name, t in times.items():
        nbytes = variants[name][1]
        gbs = nbytes / t / 1e9
        speed = " | ".join(f"{times[b] / t:.2f}x" for b in baselines)
        lines.append(f"| {name} | {t * scale:.3f} | {nbytes / 1e6:.1f} | {gbs:.1f} | {100 * gbs / memcpy_gbs:.0f}% "
                     f"| {speed} |")
    return lines


def run_section(variants: dict[str, Variant], reps: int, warmup: int, clock: Callable[[], float]
                ) -> tuple[dict[str, float], float]:
    variants = {"memcpy 512 MB": memcpy_variant(), **variants}
    times = time_round_robin(variants, reps, warmup, clock_timer(clock))
    memcpy_gbs = MEMCPY_BYTES / times.pop("memcpy 512 MB") / 1e9
    return times, memcpy_gbs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=28, help="timed reps (28 = every expert pair once in (b))")
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--threads", type=int, default=0, help="torch (and kernel) threads; 0: torch's default")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: this thread's CPU time, which leaves out time other jobs hold the core; "
                         "needs --threads 1 (for shared machines)")
    ap.add_argument("--skip-moe", action="store_true")
    ap.add_argument("--note", default="", help="a sentence for the report (e.g. how busy the machine was)")
    ap.add_argument("--out", default="benchmarks/results/cpu_decode.md")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and torch.get_num_threads() != 1:
        raise ValueError(f"--clock cpu counts one thread's time; it needs --threads 1, not {torch.get_num_threads()}")
    clock = time.perf_counter if args.clock == "wall" else time.thread_time
    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    lines = ["# CPU decode: packed kernels vs bf16 and aten int4/int8", "",
             f"Machine: {machine()}.", "", f"Load average at start (1/5/15 min): {load()}. Clock: {args.clock}.", ""]
    if args.note:
        lines += [args.note, ""]

    variants = gemv_variants(4096, 4096, 128, packed_linear)
    times, memcpy_gbs = run_section(variants, args.reps, args.warmup, clock)
    lines += [f"## (a) 4096x4096 linear, 1 token (bf16 activations), memcpy {memcpy_gbs:.1f} GB/s", "",
              *table(times, variants, memcpy_gbs, "us", ["bf16 F.linear", "aten int4 (g128)"]), ""]
    print("\n".join(lines), flush=True)
    del variants
    int4_speedup = times["aten int4 (g128)"] / times["moe_ao 4-bit (g128)"]
    targets = [f"- moe_ao 4-bit GEMV vs aten int4: {int4_speedup:.2f}x (target >= 1.3x: "
               f"{'met' if int4_speedup >= 1.3 else 'NOT met'})"]

    if not args.skip_moe:
        E = 8
        pairs = list(itertools.combinations(range(E), 2))
        variants, avg_bits = moe_variants(4096, 14336, E, 128, pairs)
        times, memcpy_gbs = run_section(variants, args.reps, args.warmup, clock)
        bits = ", ".join(f"{k}: {v:.2f} code bits/weight (+0.125 for g128 bf16 scales)" for k, v in avg_bits.items())
        section = [f"## (b) Mixtral-shaped experts layer (hidden 4096, intermediate 14336, 8 experts, top-2), "
                   f"1 token, memcpy {memcpy_gbs:.1f} GB/s", "", f"Plans: {bits}.", "",
                   *table(times, variants, memcpy_gbs, "ms",
                          ["bf16 eager (transformers loop)", "bf16 compiled (loop)", "bf16 compiled (grouped_mm)"]), ""]
        print("\n".join(section), flush=True)
        lines += section
        mixed = min(times["moe_ao mixed 2.5-bit eager"], times["moe_ao mixed 2.5-bit compiled"])
        vs_eager = times["bf16 eager (transformers loop)"] / mixed
        vs_compiled = min(times["bf16 compiled (loop)"], times["bf16 compiled (grouped_mm)"]) / mixed
        targets += [f"- mixed 2.5-bit (best of eager/compiled) vs bf16 eager: {vs_eager:.2f}x (target >= 2.5x: "
                    f"{'met' if vs_eager >= 2.5 else 'NOT met'})",
                    f"- mixed 2.5-bit vs the faster bf16 compiled: {vs_compiled:.2f}x (target >= 2x: "
                    f"{'met' if vs_compiled >= 2 else 'NOT met'})"]
    lines += ["## Targets", "", *targets, ""]
    print("\n".join(lines[-len(targets) - 3:]))
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    lines += [f"Load average at end: {load()}. Peak RSS {peak_gb:.2f} GB.",
              f"Medians of {args.reps} reps after {args.warmup} warm-up reps, variants round-robin within each rep.", ""]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print(lines[-3])


if __name__ == "__main__":
    main()
