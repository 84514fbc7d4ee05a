"""Batched GPTQ over E stacked experts vs a Python loop over the experts.

Both run the same ``gptq_quantize``: once on W [E, R, K] with H [E, K, K], once per
expert on W[e], H[e]. The sweep is K sequential column steps of a few small ops each,
so a loop pays that per-op overhead E times; batching pays it once. Medians over
``--repeats`` runs, batched and loop interleaved so that machine load hits both alike.

    python benchmarks/bench_gptq_batched.py                # E in {8, 64}, R=K in {256, 512}
    python benchmarks/bench_gptq_batched.py --experts 8 --sizes 256 --repeats 2

On a machine shared with other jobs, pass --threads 1: with more runnable processes
than cores, OpenMP barriers in every op of the batched sweep (its tensors are big enough
to be split across threads; the loop's are not) can make it several times slower than
the loop, which measures the contention rather than batching. The header records the
load average for this reason.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from moe_ao.quant.gptq import gptq_quantize

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "gptq_batched.md"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def make_problem(E: int, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """W [E, n, n] and H [E, n, n] = XᵀX of correlated inputs (rank-32 + noise), per expert."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(E, n, n, generator=g)  # [E, R, K]
    Z = torch.randn(E, 2 * n, 32, generator=g)
    A = torch.randn(E, 32, n, generator=g)
    X = Z @ A + 0.1 * torch.randn(E, 2 * n, n, generator=g)  # [E, tokens, K]
    return W, X.transpose(1, 2) @ X  # [E, K, K]


def time_once(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def bench(E: int, n: int, args: argparse.Namespace) -> dict:
    W, H = make_problem(E, n)
    kw = dict(bits=args.bits, group_size=args.group_size, blocksize=args.blocksize, act_order=args.act_order)
    batched_t, loop_t = [], []
    for _ in range(args.repeats):
        t, (qw, _) = time_once(lambda: gptq_quantize(W, H, **kw))
        batched_t.append(t)
        t, per_expert = time_once(lambda: [gptq_quantize(W[e], H[e], **kw)[0] for e in range(E)])
        loop_t.append(t)
    same = all(torch.equal(qw.codes[e], q.codes) for e, q in enumerate(per_expert))
    b, lp = statistics.median(batched_t), statistics.median(loop_t)
    return dict(E=E, n=n, batched=b, loop=lp, speedup=lp / b, same=same)


def to_markdown(rows: list[dict], args: argparse.Namespace, header: str) -> str:
    lines = [
        "# Batched GPTQ vs a loop over experts",
        "",
        header,
        "",
        f"bits={args.bits}, group_size={args.group_size}, blocksize={args.blocksize}, "
        f"act_order={args.act_order}, float32 weights, bf16 scales; median of {args.repeats} runs "
        "(batched and loop interleaved). R = K = n.",
        "",
        "| experts E | R = K | batched (s) | loop (s) | speedup | loop ms / expert | codes equal |",
        "|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['E']} | {r['n']} | {r['batched']:.3f} | {r['loop']:.3f} | {r['speedup']:.1f}x "
            f"| {1e3 * r['loop'] / r['E']:.1f} | {'yes' if r['same'] else 'NO'} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="R = K")
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--blocksize", type=int, default=128)
    parser.add_argument("--act-order", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    header = (
        f"Machine: {cpu_model()}, nproc={os.cpu_count()}, torch threads={torch.get_num_threads()}, "
        f"load average at start {os.getloadavg()[0]:.1f}; torch {torch.__version__}, Python {platform.python_version()}"
    )
    print(header, flush=True)
    gptq_quantize(*make_problem(2, 64), bits=args.bits, group_size=min(args.group_size, 64))  # warm-up
    rows = []
    for n in args.sizes:
        for E in args.experts:
            rows.append(bench(E, n, args))
            r = rows[-1]
            print(f"E={E} n={n}: batched {r['batched']:.3f}s, loop {r['loop']:.3f}s, {r['speedup']:.1f}x", flush=True)
    table = to_markdown(rows, args, header)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table)
    print(table)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
