"""End-to-end decode speed of the embedded trained models: bf16 vs moe_ao, eager and compiled.

    python benchmarks/bench_decode_models.py [--models tiny-mixtral tiny-qwen2-moe] [--budget 2.5]
                                             [--new-tokens 64] [--reps 5] [--threads N]
                                             [--out benchmarks/results/decode_models.md]

Per model, four variants generate the same greedy continuation of one prompt with
``model.generate`` (``min_new_tokens`` = ``max_new_tokens``, so every rep decodes the
same number of tokens): bf16 eager (dynamic cache), bf16 compiled, moe_ao eager and
moe_ao compiled. "Compiled" is transformers' own path: a static KV cache plus
``CompileConfig(fullgraph=True)``, which compiles the one-token forward once. moe_ao's
model is quantized with RTN (speed depends on the plan's bits, not on GPTQ) to a
``first-k`` plan fitted to ``--budget`` average bits, a weights-only strategy, so no
calibration run is needed (from all-2-bit, so that both models can reach 2.5 bits).

Reported: median tokens/s over reps (variants round-robin within each rep), the bytes
of weights one decode step reads (attention, dense and shared MLPs, routers, the
top-k routed experts' share of each expert bank, lm_head; read from ``memory_report``),
and the implied bandwidth next to a memcpy measured in the same run. At these sizes
(10-12 MB of weights) the weights stay in cache and per-token overheads dominate, so
this measures framework overhead more than bandwidth; the Mixtral-shaped layer in
``bench_cpu_decode.py`` measures the bandwidth-bound regime. To show how much of a
token any weight format can save at all, one more bf16 compiled decode runs under
torch.profiler and reports the share of its wall time spent in matmul ops (the
Amdahl ceiling on a speed-up from lighter weights).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import CompileConfig

sys.path.insert(0, str(Path(__file__).parent))

from _common import machine  # noqa: E402

import moe_ao  # noqa: E402
from moe_ao import models  # noqa: E402

PROMPT = "The history of the"
MEMCPY_BYTES = 256 * 2**20


def bytes_per_token(model: torch.nn.Module) -> float:
    """Weight bytes one decode step reads: everything but the unselected routed experts."""
    report = moe_ao.memory_report(model)
    cfg = model.config
    share = cfg.num_experts_per_tok / getattr(cfg, "num_local_experts", getattr(cfg, "num_experts", 1))
    total = 0.0
    for kind, row in report.rows.items():
        if kind == "embedding":
            continue  # one row per token
        total += row.bytes * (share if kind == "expert" else 1.0)
    return total


def memcpy_gbs(reps: int = 5) -> float:
    src = torch.ones(MEMCPY_BYTES, dtype=torch.uint8)
    dst = torch.empty_like(src)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t)
    return MEMCPY_BYTES / statistics.median(times) / 1e9


def compiled(model: torch.nn.Module) -> torch.nn.Module:
    """The model with transformers' compiled decode: static cache, fullgraph forward."""
    model.generation_config.cache_implementation = "static"
    config = CompileConfig(fullgraph=True)
    config._compile_all_devices = True  # transformers compiles only on accelerators unless told
    model.generation_config.compile_config = config
    return model


def variants(name: str, budget: float) -> tuple[dict[str, torch.nn.Module], dict[str, float], float]:
    model, _ = models.load(name)
    # From all-2-bit, the first blocks' FFNs at 4 bits: a weights-only plan that reaches
    # --budget on both embedded models (Qwen2-MoE's 4-bit shared experts and attention in
    # the experts-low base already sum to 2.55 bits).
    plan = moe_ao.plan(model, "first-k", budget_bits=budget, base="uniform-low", group_size="auto")
    quant = moe_ao.quantize_(copy.deepcopy(model), plan)
    out = {"bf16 eager": model, "bf16 compiled": compiled(copy.deepcopy(model)),
           "moe_ao eager": quant, "moe_ao compiled": compiled(copy.deepcopy(quant))}
    nbytes = {k: bytes_per_token(m) for k, m in out.items()}
    return out, nbytes, plan.meta["avg_bits"]


MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_grouped_mm", "aten::linear", "aten::matmul")


@torch.no_grad()
def matmul_share(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int) -> float:
    """Share of a decode's wall time spent in matmuls (outermost matmul ops, children included),
    under torch.profiler: the part of the time that lighter weights could shorten."""
    t = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    wall_us = (time.perf_counter() - t) * 1e6

    def outermost(e) -> bool:
        p = e.cpu_parent
        while p is not None:
            if p.name in MATMULS:
                return False
            p = p.cpu_parent
        return True

    busy = sum(e.cpu_time_total for e in prof.events() if e.name in MATMULS and outermost(e))
    return busy / wall_us


@torch.no_grad()
def tokens_per_s(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int) -> tuple[float, torch.Tensor]:
    t = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return new_tokens / (time.perf_counter() - t), out


def run_model(name: str, args: argparse.Namespace) -> list[str]:
    ms, nbytes, avg_bits = variants(name, args.budget)
    _, tok = models.load(name)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    outputs = {}
    for label, m in ms.items():  # warm-up: compiles the compiled variants
        outputs[label] = tokens_per_s(m, ids, args.new_tokens)[1]
    speeds: dict[str, list[float]] = {k: [] for k in ms}
    for _ in range(args.reps):
        for label, m in ms.items():
            speeds[label].append(tokens_per_s(m, ids, args.new_tokens)[0])
    med = {k: statistics.median(v) for k, v in speeds.items()}
    gbs = memcpy_gbs()
    share = matmul_share(ms["bf16 compiled"], ids, args.new_tokens)
    same = {q: torch.equal(outputs[q], outputs[q.replace("compiled", "eager")]) for q in ms if "compiled" in q}
    lines = [f"## {name}: first-k plan (all 2-bit, first blocks' FFN 4-bit) at {avg_bits:.2f} average bits"
             f" (RTN), memcpy {gbs:.1f} GB/s", "",
             "| variant | tokens/s | MB read / token | GB/s | % memcpy | vs bf16 eager | vs bf16 compiled |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for label, tps in med.items():
        bw = nbytes[label] * tps / 1e9
        lines.append(f"| {label} | {tps:.1f} | {nbytes[label] / 1e6:.2f} | {bw:.2f} | {100 * bw / gbs:.0f}% |"
                     f" {tps / med['bf16 eager']:.2f}x | {tps / med['bf16 compiled']:.2f}x |")
    lines += ["", "Compiled decode gives the same tokens as eager: "
              + ", ".join(f"{k}: {'yes' if v else 'no'}" for k, v in same.items()) + ".", "",
              f"Matmuls take {100 * share:.0f}% of bf16 compiled decode (torch.profiler, one run): even free"
              f" weight matmuls would make it at most {1 / (1 - share):.2f}x faster.", ""]
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["tiny-mixtral", "tiny-qwen2-moe"])
    ap.add_argument("--budget", type=float, default=2.5, help="average bits of moe_ao's plan (paper accounting)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads; 0: torch's default")
    ap.add_argument("--out", default="benchmarks/results/decode_models.md")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    lines = ["# End-to-end decode: embedded models, bf16 vs moe_ao", "", f"Machine: {machine()}.", "",
             f"Greedy `generate` of {args.new_tokens} new tokens after the prompt {PROMPT!r}; medians of"
             f" {args.reps} reps, variants round-robin.", ""]
    for name in args.models:
        section = run_model(name, args)
        print("\n".join(section), flush=True)
        lines += section
    lines.append(f"Command: `python benchmarks/bench_decode_models.py {' '.join(argv or sys.argv[1:])}`")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
