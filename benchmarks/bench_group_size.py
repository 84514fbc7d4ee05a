"""What a group size costs the CPU kernel: GEMV and small GEMM over one packed linear.

For each shape, width and group size (32: llama.cpp's block, 64, 128) and x rows M, the
time of ``packed_linear`` with bf16 x (the integer path where the build has one) beside
fp32 x (the exact fp32 path, a baseline from the same run), and the bytes each call reads
per second. Weights are rotated over copies so that none is read from cache; best of 5.
Each section opens with the machine's copy bandwidth (``bench_cpu_decode``'s memcpy of
512 MB, counted as read + write).

    python benchmarks/bench_group_size.py --threads 1 2
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine  # noqa: E402
from bench_cpu_decode import memcpy_variant, random_packed, slice_bytes  # noqa: E402

from moe_ao.kernels.cpu_packed import int16_path, packed_linear  # noqa: E402
from moe_ao.tensors.packed import PackedWeight  # noqa: E402


def best_time(ws: list[PackedWeight], x: torch.Tensor) -> float:
    for w in ws:
        packed_linear(x, w)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for w in ws:
            packed_linear(x, w)
        best = min(best, (time.perf_counter() - t) / len(ws))
    return best


def copy_gbs() -> float:
    copy, nbytes = memcpy_variant()
    copy(0)
    t = time.perf_counter()
    for i in range(3):
        copy(i)
    return 2 * nbytes * 3 / (time.perf_counter() - t) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--shapes", nargs="+", default=["4096x4096", "14336x4096"], help="NxK (out x in)")
    ap.add_argument("--bits", nargs="+", type=int, default=[2, 4])
    ap.add_argument("--groups", nargs="+", type=int, default=[32, 64, 128])
    ap.add_argument("--rows", nargs="+", type=int, default=[1, 4, 16])
    ap.add_argument("--copies", type=int, default=4)
    ap.add_argument("--out", default="benchmarks/results/cpu_group_size.md")
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    lines = ["# CPU kernel: what a group size costs", "", f"Machine: {machine()}", "",
             f"`python benchmarks/bench_group_size.py --threads {' '.join(map(str, args.threads))}`: best of 5 over "
             f"{args.copies} copies of each weight; GB/s = packed bytes read (codes + bf16 scales) per second; "
             "int path = whether bf16 x takes the integer GEMV passes at that width and group.", ""]
    for threads in args.threads:
        torch.set_num_threads(threads)
        lines += [f"## {threads} thread(s); copy bandwidth {copy_gbs():.1f} GB/s (read + write)", "",
                  "| shape | bits | group | int path | M | bf16 x | GB/s | fp32 x (fp32 path) | bf16 / fp32 time |",
                  "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
        for shape in args.shapes:
            N, K = (int(v) for v in shape.split("x"))
            for bits in args.bits:
                for gs in args.groups:
                    ws = [random_packed((N, K), 1, [bits], gs) for _ in range(args.copies)]
                    nbytes = slice_bytes(N, K, bits, gs)
                    for M in args.rows:
                        x = torch.randn(M, K, generator=g)
                        t16, t32 = best_time(ws, x.to(torch.bfloat16)), best_time(ws, x)
                        lines.append(f"| {N}x{K} | {bits} | {gs} | {'yes' if int16_path(bits, gs) else 'no'} | {M} | "
                                     f"{t16 * 1e3:.3f} ms | {nbytes / t16 / 1e9:.1f} | {t32 * 1e3:.3f} ms | "
                                     f"{t16 / t32:.2f} |")
                        print(lines[-1], flush=True)
        lines.append("")
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
