"""GPU decode speed: moe_ao's Triton kernels vs bf16, against the device's copy bandwidth.

    python benchmarks/bench_gpu_decode.py [--reps 50] [--out benchmarks/results/gpu_decode.md]
    TRITON_INTERPRET=1 python benchmarks/bench_gpu_decode.py --device cpu --small   # smoke run, no GPU

(a) One 4096x4096 linear, 1 token: bf16 F.linear vs moe_ao packed 2/3/4/8 bits (group 128).
(b) A Mixtral-shaped experts layer (hidden 4096, intermediate 14336, 8 experts, top-2), one
    token: transformers' experts in bf16 (eager loop; ``grouped_mm``, compiled) vs moe_ao's
    experts forward over a mixed 2.5-bit bank (1 in 4 expert slices at 4 bits, the rest at
    2) and a uniform 4-bit one, eager and ``torch.compile(fullgraph=True)``; the packed
    banks go through the grouped Triton kernel, which reads each expert's own width.

Timing: CUDA events around each call, median over reps; every rep routes to another pair
of experts and the GEMVs rotate over copies of their weights, so no weight is in L2 when
read. The yardstick is a device-to-device copy of 1 GiB in the same run: its bandwidth is
(bytes read + bytes written) / time, and a kernel's is the bytes of weights (+ scales) it
must read / time. ``--small`` shrinks every shape so that Triton's interpreter can run the
script on CPU (for tests); its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))

from bench_cpu_decode import mixtral_experts, random_packed, slice_bytes  # noqa: E402

import moe_ao  # noqa: E402
from moe_ao import experts as experts_impl  # noqa: E402
from moe_ao.kernels.triton_packed import packed_linear  # noqa: E402

BF16 = torch.bfloat16
Variant = tuple[Callable[[int], object], float]  # (call for rep i, bytes read per call)


def machine(device: torch.device) -> str:
    import transformers
    import triton

    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton interpreter)"
    return (f"{card}; torch {torch.__version__}, triton {triton.__version__}, transformers {transformers.__version__},"
            f" moe_ao {moe_ao.__version__}")


def timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    """Seconds one call takes: CUDA events on a GPU, the wall clock elsewhere."""
    if device.type != "cuda":
        def wall(fn: Callable[[], object]) -> float:
            t = time.perf_counter()
            fn()
            return time.perf_counter() - t
        return wall

    def events(fn: Callable[[], object]) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    return events


def median_times(variants: dict[str, Variant], reps: int, warmup: int, time_one) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in variants}
    for i in range(warmup + reps):
        for name, (fn, _) in variants.items():
            dt = time_one(lambda: fn(i))
            if i >= warmup:
                times[name].append(dt)
    return {k: statistics.median(v) for k, v in times.items()}


def copy_gbs(device: torch.device, nbytes: int, reps: int, time_one) -> float:
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    return 2 * nbytes / statistics.median(time_one(lambda: dst.copy_(src)) for _ in range(reps)) / 1e9


def gemv_variants(N: int, K: int, group_size: int, device: torch.device, rotate_bytes: int) -> dict[str, Variant]:
    x = torch.randn(1, K, dtype=BF16, device=device)
    out: dict[str, Variant] = {}

    def rotating(make, nbytes: float, call, name: str) -> None:
        copies = [make() for _ in range(max(1, min(64, -(-rotate_bytes // int(nbytes)))))]
        out[name] = (lambda i: call(copies[i % len(copies)])), nbytes

    rotating(lambda: torch.randn(N, K, dtype=BF16, device=device), N * K * 2, lambda w: F.linear(x, w),
             "bf16 F.linear")
    for bits in (2, 3, 4, 8):
        rotating(lambda b=bits: random_packed((N, K), 1, [b], group_size).to(device),
                 slice_bytes(N, K, bits, group_size), lambda w: packed_linear(x, w), f"moe_ao {bits}-bit (g{group_size})")
    return out


def moe_variants(hidden: int, inter: int, E: int, group_size: int, device: torch.device) -> dict[str, Variant]:
    from transformers import MixtralConfig

    config = MixtralConfig(hidden_size=hidden, intermediate_size=inter, num_local_experts=E, num_experts_per_tok=2)
    experts_impl.register()
    gate_up = (torch.randn(E, 2 * inter, hidden, device=device) * 0.02).to(BF16)
    down = (torch.randn(E, hidden, inter, device=device) * 0.02).to(BF16)
    x = torch.randn(1, hidden, dtype=BF16, device=device)
    weights = torch.tensor([[0.6, 0.4]], dtype=BF16, device=device)
    pairs = list(itertools.combinations(range(E), 2))
    routes = [torch.tensor([p], device=device) for p in pairs]

    def layer(module, bytes_of) -> Variant:
        mean_bytes = sum(bytes_of(e) for p in pairs for e in p) / len(pairs)
        return (lambda i: module(x, routes[i % len(routes)], weights)), mean_bytes

    bf16_bytes = lambda e: 3 * inter * hidden * 2  # noqa: E731
    variants = {"bf16 eager (transformers loop)": layer(mixtral_experts(config, gate_up, down, "eager"), bf16_bytes),
                "bf16 compiled (grouped_mm)": layer(torch.compile(mixtral_experts(config, gate_up, down, "grouped_mm")),
                                                    bf16_bytes)}
    plans = {"mixed 2.5-bit": lambda i: 4 if i % 4 == 0 else 2, "uniform 4-bit": lambda i: 4}
    for name, bits_of in plans.items():
        up_bits, down_bits = [bits_of(i) for i in range(2 * E)], [bits_of(i) for i in range(E)]
        module = mixtral_experts(config, random_packed((E, 2 * inter, hidden), 2, up_bits, group_size).to(device),
                                 random_packed((E, hidden, inter), 1, down_bits, group_size).to(device), "moe_ao")

        def nbytes(e: int, up_bits=up_bits, down_bits=down_bits) -> float:
            return (slice_bytes(inter, hidden, up_bits[2 * e], group_size)
                    + slice_bytes(inter, hidden, up_bits[2 * e + 1], group_size)
                    + slice_bytes(hidden, inter, down_bits[e], group_size))

        variants[f"moe_ao {name} eager"] = layer(module, nbytes)
        variants[f"moe_ao {name} compiled"] = layer(torch.compile(module, fullgraph=True), nbytes)
    return variants


def table(times: dict[str, float], variants: dict[str, Variant], copy: float, baselines: list[str]) -> list[str]:
    lines = ["| variant | median us | MB read | GB/s | % of copy bandwidth | "
             + " | ".join(f"vs {b}" for b in baselines) + " |", "|---|" + "---:|" * (4 + len(baselines))]
    for name, t in times.items():
        nbytes = variants[name][1]
        gbs = nbytes / t / 1e9
        lines.append(f"| {name} | {t * 1e6:.1f} | {nbytes / 1e6:.1f} | {gbs:.0f} | {100 * gbs / copy:.0f}% | "
                     + " | ".join(f"{times[b] / t:.2f}x" for b in baselines) + " |")
    return lines


def main(argv: list[str] | None = None) -> list[str]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--small", action="store_true", help="tiny shapes, for a smoke run under TRITON_INTERPRET=1")
    ap.add_argument("--out", default="benchmarks/results/gpu_decode.md")
    args = ap.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    device = torch.device(args.device)
    torch.manual_seed(0)
    with torch.no_grad():
        lines = run(args, device)
    print("\n".join(lines))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    return lines


def run(args: argparse.Namespace, device: torch.device) -> list[str]:
    """Every section of the report, as markdown lines."""
    d, inter, gs, rotate, copy_bytes = (64, 96, 32, 2**16, 2**20) if args.small else (4096, 14336, 128, 2**30, 2**30)
    time_one = timer(device)
    copy = copy_gbs(device, copy_bytes, 10, time_one)
    lines = ["# GPU decode: moe_ao's Triton kernels vs bf16", "", f"Device: {machine(device)}.", "",
             f"Copy bandwidth (read + write): {copy:.0f} GB/s. Medians of {args.reps} reps after {args.warmup}.", ""]
    gemv = gemv_variants(d, d, gs, device, rotate)
    times = median_times(gemv, args.reps, args.warmup, time_one)
    lines += [f"## (a) {d}x{d} linear, 1 token", "", *table(times, gemv, copy, ["bf16 F.linear"]), ""]
    moe = moe_variants(d, inter, 8, gs, device)
    times = median_times(moe, args.reps, args.warmup, time_one)
    lines += [f"## (b) Mixtral-shaped experts layer (hidden {d}, intermediate {inter}, 8 experts, top-2), 1 token", "",
              *table(times, moe, copy, ["bf16 eager (transformers loop)", "bf16 compiled (grouped_mm)"]), ""]
    lines.append(f"Command: `python benchmarks/bench_gpu_decode.py {' '.join(args.argv)}`")
    return lines


if __name__ == "__main__":
    main()
