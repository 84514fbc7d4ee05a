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

sys.path.insert(0, str(Path(__file__).parent))

from bench_cpu_decode import Timer, clock_timer, gemv_variants, moe_variants, table, time_round_robin  # noqa: E402

import moe_ao  # noqa: E402
from moe_ao.kernels.triton_packed import packed_linear  # noqa: E402


def machine(device: torch.device) -> str:
    import transformers
    import triton

    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton interpreter)"
    return (f"{card}; torch {torch.__version__}, triton {triton.__version__}, transformers {transformers.__version__},"
            f" moe_ao {moe_ao.__version__}")


def timer(device: torch.device) -> Timer:
    """Seconds one call takes: CUDA events on a GPU, the wall clock elsewhere."""
    if device.type != "cuda":
        return clock_timer(time.perf_counter)

    def events(fn: Callable[[], object]) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    return events


def copy_gbs(device: torch.device, nbytes: int, reps: int, time_one: Timer) -> float:
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    return 2 * nbytes / statistics.median(time_one(lambda: dst.copy_(src)) for _ in range(reps)) / 1e9


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
    gemv = gemv_variants(d, d, gs, packed_linear, rotate, device)
    times = time_round_robin(gemv, args.reps, args.warmup, time_one)
    lines += [f"## (a) {d}x{d} linear, 1 token", "",
              *table(times, gemv, copy, "us", ["bf16 F.linear"], "copy bandwidth"), ""]
    pairs = list(itertools.combinations(range(8), 2))
    moe, _ = moe_variants(d, inter, 8, gs, pairs, device, compiled_loop=False)
    times = time_round_robin(moe, args.reps, args.warmup, time_one)
    lines += [f"## (b) Mixtral-shaped experts layer (hidden {d}, intermediate {inter}, 8 experts, top-2), 1 token", "",
              *table(times, moe, copy, "us", ["bf16 eager (transformers loop)", "bf16 compiled (grouped_mm)"],
                     "copy bandwidth"), ""]
    lines.append(f"Command: `python benchmarks/bench_gpu_decode.py {' '.join(args.argv)}`")
    return lines


if __name__ == "__main__":
    main()
