"""What quantizing the input embedding and the output head costs on the embedded models.

Both embedded models tie their embedding and head (one [V, d] tensor). Per width (RTN,
group 32, symmetric), on held-out WikiText-2 test windows against the float model:

- ``tied pair``: the shared tensor quantized once (``quantize_`` with both units planned
  at the same spec), what a tied model can do;
- ``embedding alone`` / ``head alone``: a copy of the model with the head untied (its own
  copy of the weights), then only that unit quantized, what an untied model (Mixtral,
  OLMoE, Qwen-MoE, DeepSeek) can plan per unit;
- ``all linears``: every attention and expert linear at that width, embedding and head
  float, for scale.

Bytes are the tensor's packed size (codes + bf16 scales) against bf16. The real-shape
memory effect is in ``bench_e2e_cpu.py --embed-bits``.

    python benchmarks/bench_embedding_head.py
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _common import Bench, machine  # noqa: E402

import moe_ao  # noqa: E402

WIDTHS = (2, 3, 4, 8)
LINEAR_KINDS = ("attention", "expert", "shared_expert", "dense_mlp")


def untied(model: nn.Module) -> nn.Module:
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    model.config.tie_word_embeddings = False
    return model


def rows_for(bench: Bench, bits: int) -> list[dict]:
    units = moe_ao.units(bench.model)
    emb = next(u for u in units if u.kind == "embedding")
    head = next(u for u in units if u.kind == "lm_head")
    cases = {
        "tied pair": (lambda m: m, {emb.name: bits, head.name: bits}),
        "embedding alone": (untied, {emb.name: bits}),
        "head alone": (untied, {head.name: bits}),
        "all linears": (lambda m: m, {u.name: bits for u in units if u.kind in LINEAR_KINDS}),
    }
    out = []
    for case, (prepare, entries) in cases.items():
        model = prepare(bench.fresh())
        moe_ao.quantize_(model, moe_ao.Plan(entries, group_size=32))
        q = model.get_input_embeddings().weight if case != "head alone" else model.lm_head.weight
        packed = q.nbytes_packed() if isinstance(q, moe_ao.PackedWeight) else None
        out.append({"model": bench.name, "case": case, "bits": bits, **bench.judge(model),
                    "tensor_mb": packed / 1e6 if packed and case != "all linears" else None})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["tiny-mixtral", "tiny-qwen2-moe"])
    ap.add_argument("--windows", type=int, default=48, help="held-out windows of 256 tokens")
    ap.add_argument("--out", default="benchmarks/results/embedding_head.md")
    args = ap.parse_args()
    rows = []
    for name in args.models:
        bench = Bench.load(name, eval_windows_n=args.windows)
        w = bench.model.get_input_embeddings().weight
        bf16_mb = w.numel() * 2 / 1e6
        for bits in WIDTHS:
            for r in rows_for(bench, bits):
                rows.append(r | {"bf16_mb": bf16_mb})
                print(json.dumps(rows[-1]), flush=True)
    lines = ["# Quantized input embedding and output head (embedded models)", "", f"Machine: {machine()}", "",
             f"`python benchmarks/bench_embedding_head.py`: RTN, group 32, symmetric; KL(float || quantized) per "
             f"token, top-1 agreement and perplexity on {args.windows} held-out WikiText-2 test windows of 256 "
             "tokens. Both models tie the embedding and head: `tied pair` quantizes that one tensor; `embedding "
             "alone` and `head alone` untie a copy first and quantize one unit; `all linears` quantizes every "
             "attention and expert linear (embedding and head float), for scale. Tensor MB: packed codes + "
             "scales of the [V, d] table against its bf16 size.", ""]
    for name in args.models:
        mine = [r for r in rows if r["model"] == name]
        lines += [f"## {name} (table {mine[0]['bf16_mb']:.2f} MB in bf16)", "",
                  "| case | bits | KL | top-1 | PPL (float) | tensor MB |", "|---|---:|---:|---:|---:|---:|"]
        for r in mine:
            mb = f"{r['tensor_mb']:.2f}" if r["tensor_mb"] else "-"
            lines.append(f"| {r['case']} | {r['bits']} | {r['kl']:.4f} | {r['top1']:.3f} | {r['ppl']:.2f} "
                         f"({r['ref_ppl']:.2f}) | {mb} |")
        lines.append("")
    Path(args.out).write_text("\n".join(lines))
    Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
