"""Prompts and decode end to end on the CPU: 2-layer Mixtral- and OLMoE-shaped models.

Random weights at real models' shapes, written layer by layer (``moe_ao.stream.synthetic``):

- ``mixtral2``: Mixtral-8x7B's layer (hidden 4096, 8 experts of 14336, top-2, 32/8 heads),
  2 layers, vocab 32000: 3.16B parameters, 6.3 GB in bf16;
- ``olmoe2``: OLMoE-1B-7B's layer (hidden 2048, 64 experts of 1024, top-8, 16 heads),
  2 layers, vocab 50304: 1.0B parameters, 2.1 GB in bf16.

Each is quantized with RTN (streamed, ``quantize_pretrained``) under two plans, both at
group 32, symmetric, so that llama.cpp's formats hold the same codes:

- ``4bit``: every linear 4 bits (llama.cpp: Q4_0, the same bits);
- ``2bit-exp``: routed experts 2 bits, attention 4 bits (llama.cpp: the experts
  requantized to Q2_K, attention Q4_0).

``--head-bits`` (default 4) quantizes the output head too, as llama.cpp's quantizers do
(Q4_0 here: the same codes; 16 keeps it bf16 in every engine); ``--embed-bits`` (default 16)
the input embedding likewise (GGUF token_embd). Every run is a fresh
process with 2 threads: load, then a 512-token prompt (one forward, batch B) and 64
greedy decode steps, after a warm-up on a short prompt; every forward computes the
logits of the last position only (``logits_to_keep=1``, as ``generate`` and llama.cpp
do); torch.compile'd runs compile in the warm-up (dynamic shapes). llama.cpp runs through
llama-cpp-python (batch 1), from the interpreter in ``MOE_AO_LLAMA_CPP_PYTHON`` or this one.

    python benchmarks/bench_e2e_cpu.py --root /work/e2e --models mixtral2 olmoe2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine  # noqa: E402

TORCH_RUN = r"""
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[6]))
import moe_ao
from transformers import AutoModelForCausalLM, DynamicCache

def vm(key):
    return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) / 1024

path, kind, batch, mode, prompt = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
steps = int(sys.argv[7])
base = vm("VmRSS")
t = time.perf_counter()
model = (AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16) if kind == "bf16"
         else moe_ao.load_quantized(path))
load_s = time.perf_counter() - t
fwd = torch.compile(model, dynamic=True) if mode == "compiled" else model

def run(n_prompt, n_steps):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, n_prompt), generator=g)
    cache = DynamicCache(config=model.config)
    t0 = time.perf_counter()
    out = fwd(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    t1 = time.perf_counter()
    tok = out.logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(n_steps):
        out = fwd(input_ids=tok, past_key_values=cache, use_cache=True, logits_to_keep=1)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
    return t1 - t0, time.perf_counter() - t1

with torch.inference_mode():
    t = time.perf_counter()
    run(16, 3)
    warm_s = time.perf_counter() - t
    prefill_s, decode_s = run(prompt, steps)
print(json.dumps({"load_s": load_s, "warmup_s": warm_s, "prefill_tok_s": batch * prompt / prefill_s,
                  "decode_tok_s": batch * steps / decode_s, "ms_per_step": decode_s / steps * 1e3,
                  "base_mib": base, "peak_mib": vm("VmHWM")}))
"""

LLAMA_RUN = r"""
import json, sys, time
import numpy as np
from llama_cpp import Llama

def vm(key):
    return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) / 1024

path, prompt, steps, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
base = vm("VmRSS")
t = time.perf_counter()
llm = Llama(model_path=path, n_ctx=prompt + steps + 32, n_batch=prompt, n_threads=threads,
            n_threads_batch=threads, verbose=False, seed=0)
load_s = time.perf_counter() - t
rng = np.random.default_rng(0)
vocab = llm.n_vocab()

def run(n_prompt, n_steps):
    llm.reset()
    ids = [int(i) for i in rng.integers(0, vocab, n_prompt)]
    t0 = time.perf_counter()
    llm.eval(ids)
    t1 = time.perf_counter()
    for _ in range(n_steps):
        tok = int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))))  # last position
        llm.eval([tok])
    return t1 - t0, time.perf_counter() - t1

t = time.perf_counter()
run(16, 3)
warm_s = time.perf_counter() - t
prefill_s, decode_s = run(prompt, steps)
print(json.dumps({"load_s": load_s, "warmup_s": warm_s, "prefill_tok_s": prompt / prefill_s,
                  "decode_tok_s": steps / decode_s, "ms_per_step": decode_s / steps * 1e3,
                  "base_mib": base, "peak_mib": vm("VmHWM")}))
"""


def config(name: str):
    from transformers import MixtralConfig, OlmoeConfig

    if name == "mixtral2":
        return MixtralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=2, num_attention_heads=32,
                             num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000,
                             max_position_embeddings=4096, tie_word_embeddings=False)
    if name == "olmoe2":
        return OlmoeConfig(hidden_size=2048, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=16,
                           num_key_value_heads=16, num_experts=64, num_experts_per_tok=8, vocab_size=50304,
                           max_position_embeddings=4096, tie_word_embeddings=False)
    raise ValueError(f"model {name!r}; allowed: mixtral2, olmoe2")


def plan_for(name: str, units, head_bits: int, embed_bits: int = 16):
    import moe_ao

    linears = [u for u in units if u.kind in ("attention", "expert", "shared_expert", "dense_mlp")]
    head = {u.name: head_bits for u in units if u.kind == "lm_head" and head_bits != 16}
    head |= {u.name: embed_bits for u in units if u.kind == "embedding" and embed_bits != 16}
    if name == "4bit":
        return moe_ao.Plan({u.name: 4 for u in linears} | head, group_size=32)
    if name == "2bit-exp":
        return moe_ao.Plan({u.name: 2 if u.kind == "expert" else 4 for u in linears} | head, group_size=32)
    raise ValueError(f"plan {name!r}; allowed: 4bit, 2bit-exp")


def make(root: Path, name: str, plans: list[str], head_bits: int, embed_bits: int = 16) -> tuple[Path, dict[str, Path]]:
    """The random bf16 checkpoint (with the embedded tokenizer, padded to the vocab) and its quantized twins."""
    import moe_ao
    from moe_ao.stream import StreamedModel, quantize_pretrained, write_random_checkpoint

    src = root / name
    if not (src / "config.json").is_file():
        write_random_checkpoint(config(name), src)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(moe_ao.models.path("tiny-mixtral") / f, src / f)
    units = moe_ao.units(StreamedModel(src).model)
    out = {}
    for p in plans:
        out[p] = root / (f"{name}-{p}" + ("" if head_bits == 16 else f"-head{head_bits}")
                         + ("" if embed_bits == 16 else f"-emb{embed_bits}"))
        if not (out[p] / "moe_ao.json").is_file():
            quantize_pretrained(src, plan_for(p, units, head_bits, embed_bits), out[p], method="rtn", overwrite=True)
    return src, out


def gguf_of(ckpt: Path) -> Path:
    from transformers import AutoTokenizer

    import moe_ao

    path = ckpt.with_suffix(".gguf")
    if not path.is_file():
        moe_ao.export(moe_ao.load_quantized(ckpt), path, "gguf", tokenizer=AutoTokenizer.from_pretrained(ckpt))
    return path


def run(cmd: list[str], threads: int) -> dict:
    env = os.environ | {"PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd[:2])} ... failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, required=True, help="where the checkpoints go (~12 GB)")
    ap.add_argument("--models", nargs="+", default=["mixtral2", "olmoe2"])
    ap.add_argument("--plans", nargs="+", default=["4bit", "2bit-exp"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--modes", nargs="+", default=["eager", "compiled"])
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--head-bits", type=int, default=4, choices=[4, 8, 16], help="output head (16: bf16)")
    ap.add_argument("--embed-bits", type=int, default=16, choices=[4, 8, 16],
                    help="input embedding (16: bf16; llama.cpp's quantizers store it at the model's type)")
    ap.add_argument("--no-llama-cpp", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/e2e_cpu.md")
    args = ap.parse_args()
    args.root.mkdir(parents=True, exist_ok=True)
    llama_py = os.environ.get("MOE_AO_LLAMA_CPP_PYTHON", sys.executable)
    rows = []
    for name in args.models:
        src, quantized = make(args.root, name, args.plans, args.head_bits, args.embed_bits)
        cases = [("bf16", "bf16", src)] + [(f"moe_ao {p}", "moe_ao", q) for p, q in quantized.items()]
        for label, kind, path in cases:
            for mode in args.modes:
                for batch in args.batches:
                    r = run([sys.executable, "-c", TORCH_RUN, str(path), kind, str(batch), mode, str(args.prompt),
                             str(args.threads), str(args.steps)], args.threads)
                    rows.append({"model": name, "engine": label, "mode": mode, "batch": batch, **r})
                    print(json.dumps(rows[-1]), flush=True)
        if not args.no_llama_cpp:
            for p, q in quantized.items():
                gguf = gguf_of(q)
                r = run([llama_py, "-c", LLAMA_RUN, str(gguf), str(args.prompt), str(args.steps), str(args.threads)], args.threads)
                label = {"4bit": "llama.cpp Q4_0", "2bit-exp": "llama.cpp Q2_K experts"}[p]
                rows.append({"model": name, "engine": label, "mode": "-", "batch": 1, **r})
                print(json.dumps(rows[-1]), flush=True)
    write_report(args, rows)


def write_report(args, rows) -> None:
    lines = ["# End-to-end CPU prompts and decode (2-layer real-shaped models, random weights)", "",
             f"Machine: {machine()}; {args.threads} threads per run; load average {os.getloadavg()[0]:.1f} at the "
             "end", "",
             f"`python benchmarks/bench_e2e_cpu.py --root ROOT --models {' '.join(args.models)} --head-bits "
             f"{args.head_bits} --embed-bits {args.embed_bits}`: output head "
             f"{'bf16' if args.head_bits == 16 else f'{args.head_bits}-bit'}, input embedding "
             f"{'bf16' if args.embed_bits == 16 else f'{args.embed_bits}-bit'}; a "
             f"{args.prompt}-token prompt per sequence (one forward of batch x {args.prompt} tokens), then "
             f"{args.steps} greedy steps; tokens/s count every sequence of the batch. Peak RSS is the process's "
             "VmHWM (imports and the loaded model included). Ratios are against bf16 in the same mode and batch.",
             ""]
    for name in args.models:
        lines += [f"## {name}", "", "| engine | mode | batch | prefill tok/s | x bf16 | decode tok/s | ms / step | "
                  "x bf16 | peak RSS GiB | load s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        base = {(r["mode"], r["batch"]): r for r in rows if r["model"] == name and r["engine"] == "bf16"}
        for r in (r for r in rows if r["model"] == name):
            b = base.get((r["mode"], r["batch"])) or base.get(("eager", r["batch"]))
            px = f"{r['prefill_tok_s'] / b['prefill_tok_s']:.2f}" if b else "-"
            dx = f"{r['decode_tok_s'] / b['decode_tok_s']:.2f}" if b else "-"
            lines.append(f"| {r['engine']} | {r['mode']} | {r['batch']} | {r['prefill_tok_s']:.1f} | {px} | "
                         f"{r['decode_tok_s']:.2f} | {r['ms_per_step']:.0f} | {dx} | {r['peak_mib'] / 1024:.2f} | "
                         f"{r['load_s']:.1f} |")
        lines.append("")
    Path(args.out).write_text("\n".join(lines))
    Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
