"""Streamed quantization of real-sized checkpoints (random weights) on this machine.

Writes random checkpoints of real models' shapes layer by layer (moe_ao.stream.synthetic):

- ``olmoe``: OLMoE-1B-7B (hidden 2048, 64 experts of 1024, top-8, 16 layers, vocab 50304): 6.9B
  parameters, 13.8 GB in bf16;
- ``qwen``: Qwen1.5-MoE-A2.7B (``Qwen2MoeConfig()``'s defaults: 60 experts of 1408 + a shared
  expert of 5632, 24 layers, vocab 151936): 14.3B parameters, 28.6 GB, larger than this
  machine's 24 GiB;

then quantizes each with RTN and GPTQ (16 x 256 calibration tokens) under a mixed ~2.5-bit
plan, every run in a fresh process: wall time, time per layer, peak RSS (VmHWM), output
size. Depth: the same shape cut to 8 and 16 layers (the first layers' shards, linked).
Decode: the quantized OLMoE-shaped model and its bf16 original, greedy tokens/s.

    python benchmarks/bench_streaming.py --root /work/ckpts --models olmoe qwen --methods rtn gptq
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine  # noqa: E402

RUN = r"""
import json, sys, time, torch
import moe_ao
from moe_ao.stream import StreamedModel, quantize_pretrained

def status(key):
    return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) / 1024

src, out, method = sys.argv[1:4]
units = moe_ao.units(StreamedModel(src).model)
bits = {"attention": 4, "shared_expert": 4, "dense_mlp": 4}
plan = moe_ao.Plan({u.name: (2, 2, 3)[u.expert % 3] if u.kind == "expert" else bits[u.kind]
                    for u in units if u.kind == "expert" or u.kind in bits}, group_size=128)
kw = {}
if method == "gptq":
    g = torch.Generator().manual_seed(0)
    vocab = StreamedModel(src).config.vocab_size
    kw = {"calibration": torch.randint(0, vocab, (16, 256), generator=g), "progress": False}
base = status("VmRSS")
t = time.perf_counter()
quantize_pretrained(src, plan, out, method=method, overwrite=True, **kw)
print(json.dumps({"seconds": time.perf_counter() - t, "base_mib": base, "peak_mib": status("VmHWM"),
                  "avg_bits": plan.avg_bits(units), "true_bits": plan.true_avg_bits(units)}))
"""

DECODE = r"""
import json, sys, time, torch
import moe_ao
from transformers import AutoModelForCausalLM
path, kind, tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
model = moe_ao.load_quantized(path) if kind == "moe_ao" else AutoModelForCausalLM.from_pretrained(path)
ids = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    model.generate(ids, max_new_tokens=2, do_sample=False)
    t = time.perf_counter()
    model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    dt = time.perf_counter() - t
peak = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) / 1024
print(json.dumps({"tokens_per_s": tokens / dt, "peak_mib": peak}))
"""


def config(name: str):
    from transformers import OlmoeConfig, Qwen2MoeConfig

    if name == "olmoe":
        return OlmoeConfig(hidden_size=2048, intermediate_size=1024, num_hidden_layers=16, num_attention_heads=16,
                           num_key_value_heads=16, num_experts=64, num_experts_per_tok=8, vocab_size=50304,
                           max_position_embeddings=4096, tie_word_embeddings=False)
    if name == "qwen":
        return Qwen2MoeConfig()
    raise ValueError(f"model {name!r}; allowed: olmoe, qwen")


def make(root: Path, name: str) -> Path:
    from moe_ao.stream import write_random_checkpoint

    src = root / name
    if not (src / "config.json").is_file():
        t = time.perf_counter()
        write_random_checkpoint(config(name), src)
        print(f"{name}: wrote {gb(src):.1f} GB in {time.perf_counter() - t:.0f} s", flush=True)
    return src


def cut(src: Path, layers: int) -> Path:
    """The first ``layers`` layers of a synthetic checkpoint, its shards linked (no copies)."""
    out = src.with_name(f"{src.name}-{layers}l")
    if out.exists():
        return out
    out.mkdir()
    index = json.loads((src / "model.safetensors.index.json").read_text())
    keep = {f"model-layer-{i:05d}.safetensors" for i in range(layers)} | {"model-rest.safetensors"}
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v in keep}
    for f in keep:
        (out / f).symlink_to(src / f)
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_hidden_layers"] = layers
    if isinstance(cfg.get("layer_types"), list):  # per-layer lists must match the depth
        cfg["layer_types"] = cfg["layer_types"][:layers]
    if isinstance(cfg.get("mlp_only_layers"), list):
        cfg["mlp_only_layers"] = [i for i in cfg["mlp_only_layers"] if i < layers]
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def gb(path: Path) -> float:
    """Size of a checkpoint's files (linked shards counted at their targets' size)."""
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file()) / 1e9


def run(script: str, *args: str) -> dict:
    env = os.environ | {"PYTHONWARNINGS": "ignore"}
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, required=True, help="where the random checkpoints go (tens of GB)")
    ap.add_argument("--models", nargs="+", default=["olmoe", "qwen"])
    ap.add_argument("--methods", nargs="*", default=["rtn", "gptq"], help="none: only the cut depths")
    ap.add_argument("--depths", nargs="*", type=int, default=[8, 16], help="also run these cut depths (qwen, RTN)")
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--out", default="benchmarks/results/streaming.md")
    args = ap.parse_args()
    args.root.mkdir(parents=True, exist_ok=True)
    rows, decode = [], []
    for name in args.models:
        src = make(args.root, name)
        cases = [(src, m) for m in args.methods] + [(cut(src, d), "rtn") for d in args.depths if name == "qwen"]
        for case_src, method in cases:
            out = args.root / f"{case_src.name}-{method}-q"
            r = run(RUN, str(case_src), str(out), method)
            layers = json.loads((case_src / "config.json").read_text())["num_hidden_layers"]
            r |= {"model": case_src.name, "method": method, "layers": layers, "src_gb": gb(case_src),
                  "out_gb": gb(out)}
            rows.append(r)
            print(json.dumps(r), flush=True)
            if name == "olmoe" and method == "rtn":
                for kind, path in (("bf16", case_src), ("moe_ao", out)):
                    decode.append({"model": name, "kind": kind, **run(DECODE, str(path), kind, str(args.decode_tokens))})
                    print(json.dumps(decode[-1]), flush=True)
            shutil.rmtree(out)
    write_report(args, rows, decode)


def write_report(args, rows, decode) -> None:
    lines = ["# Streamed quantization of real-sized checkpoints (random weights)", "",
             f"Machine: {machine()}; load average {os.getloadavg()[0]:.1f} at the end", "",
             f"`python benchmarks/bench_streaming.py --root ROOT --models {' '.join(args.models)} --methods "
             f"{' '.join(args.methods)}`. Plan: experts 2/2/3 bits by expert index, attention, shared and dense "
             "MLPs 4 bits, group 128; GPTQ on 16 x 256 random-token windows (cost only: random weights). Each "
             "run in a fresh process; peak RSS is the process's VmHWM (imports included).", "",
             "| checkpoint | layers | bf16 GB | method | avg bits (true) | wall s | s / layer | peak RSS GiB | "
             "peak / bf16 | output GB |", "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['layers']} | {r['src_gb']:.1f} | {r['method']} | {r['avg_bits']:.2f} "
                     f"({r['true_bits']:.2f}) | {r['seconds']:.0f} | {r['seconds'] / r['layers']:.1f} | "
                     f"{r['peak_mib'] / 1024:.2f} | {r['peak_mib'] / 1024 / (r['src_gb'] / 1.0737):.1%} | "
                     f"{r['out_gb']:.2f} |")
    if decode:
        lines += ["", f"Decode, greedy, {args.decode_tokens} tokens after a 16-token prompt, batch 1 (eager):", "",
                  "| model | weights | tokens/s | peak RSS GiB |", "|---|---|---:|---:|"]
        for d in decode:
            lines.append(f"| {d['model']} | {d['kind']} | {d['tokens_per_s']:.2f} | {d['peak_mib'] / 1024:.2f} |")
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
