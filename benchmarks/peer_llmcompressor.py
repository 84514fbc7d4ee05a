"""Peer benchmark: moe_ao RTN / GPTQ vs llm-compressor's GPTQModifier, on the same inputs.

Plan on both sides: routed experts at 3 bits, int, symmetric, group 32; everything else
(attention, routers, shared experts, dense MLPs, embeddings, lm_head) stays bf16.

* moe_ao runs in this environment, on the fused 3-D expert tensors: ``method="rtn"`` and
  ``method="gptq"`` with default options, plus GPTQ with the other ``act_order`` setting
  (act-order with static groups is what llm-compressor's default ``actorder="static"``
  does; the rows say which one is moe_ao's default).
* llm-compressor runs in its own virtualenv (it pins another transformers), in a
  subprocess that re-runs this file with ``--child``: it loads the same bf16 checkpoint
  under ``llmcompressor.utils.load_context`` (experts linearized into ``nn.Linear``s),
  runs ``oneshot`` with a ``GPTQModifier`` that targets only the routed expert Linears,
  on a ``datasets.Dataset`` of the very calibration windows moe_ao used (no shuffling),
  on CPU; checks that exactly the moe_ao expert units were quantized (weights changed, on
  a 3-bit grid, status frozen) and hands the quantized expert weights back. They are
  copied into the fused expert tensors of the main-env bf16 model and scored there, with
  the same forward and metric formula (``moe_ao.eval.metrics.compare``) as the reference
  and the moe_ao rows; llm-compressor's own-env score is reported beside it.

Calibration: 128 x 256 tokens of WikiText-2 valid (seed 0); evaluation: 48 x 256 tokens
of WikiText-2 test (held out). Seconds are the ``quantize_`` / ``oneshot`` call alone
(wall clock, and process CPU time); llm-compressor's model load is reported apart. Each
repeat runs every moe_ao method and every llm-compressor configuration once (alternating
which side goes first); medians are reported. Both sides use ``--threads`` torch threads
(default 1: on a shared, oversubscribed box, multi-threaded OpenMP regions stall on
descheduled threads, which inflated some runs here by 10-60x).

The llm-compressor virtualenv is created on first use (``--venv``, default ``.venv-llmc``
in the repo; keep it out of git) with ``pip install torch==2.13.0 llmcompressor``::

    python benchmarks/peer_llmcompressor.py                       # both embedded models
    python benchmarks/peer_llmcompressor.py --venv /tmp/llmc-venv --models tiny-mixtral
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_VENV = REPO / ".venv-llmc"
DEFAULT_REQUIREMENTS = ("torch==2.13.0", "llmcompressor")
MODELS = ("tiny-mixtral", "tiny-qwen2-moe")
BITS, GROUP_SIZE = 3, 32
# llm-compressor module-name regex for routed expert Linears after linearization:
# model.layers.N.mlp.experts.E.{gate,up,down}_proj (not shared_expert, not the router).
EXPERT_REGEX = r"re:.*\.experts\.\d+\.(gate|up|down)_proj$"


def moe_ao_methods(alt_act_order: bool) -> list[tuple[str, str, dict]]:
    """(label, method, options): RTN, GPTQ with defaults, GPTQ with the non-default act_order."""
    import inspect

    from moe_ao.quant import gptq_driver

    # The default lives on the driver's entry point (whatever it is called): read it, don't assume it.
    defaults = {inspect.signature(f).parameters["act_order"].default for f in vars(gptq_driver).values()
                if inspect.isfunction(f) and f.__module__ == gptq_driver.__name__
                and "act_order" in inspect.signature(f).parameters}
    if len(defaults) != 1 or not isinstance(next(iter(defaults)), bool):
        raise RuntimeError(f"cannot tell moe_ao GPTQ's default act_order (found {defaults})")
    default = defaults.pop()
    out = [("moe_ao RTN", "rtn", {}), (f"moe_ao GPTQ (default: act_order={default})", "gptq", {})]
    if alt_act_order:
        out.append((f"moe_ao GPTQ act_order={not default}", "gptq", {"act_order": not default}))
    return out


def cpu_line() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} logical cores (nproc), load average {os.getloadavg()[0]:.1f} at start"


class Timer:
    """Wall clock, process CPU time (all threads) and the 1-minute load average at the start."""

    def __enter__(self) -> Timer:
        self.load1 = os.getloadavg()[0]
        self._w, self._c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self._w
        self.cpu = time.process_time() - self._c

    def as_dict(self) -> dict[str, float]:
        return {"seconds": self.wall, "cpu_s": self.cpu, "load1": self.load1}


# ----------------------------------------------------------------- metrics (shared formula)


def _metrics(lp, ref_lp, windows) -> dict[str, float]:
    """KL(ref || lp), top-1 agreement, perplexities: the formula of moe_ao.eval.metrics.compare."""
    import math

    import torch.nn.functional as F

    kl = F.kl_div(lp, ref_lp, log_target=True, reduction="none").sum(-1).mean()
    top1 = (lp.argmax(-1) == ref_lp.argmax(-1)).float().mean()

    def ppl(x):
        return math.exp((-x[:, :-1].gather(-1, windows[:, 1:, None]).mean()).item())

    return {"kl": kl.item(), "top1": top1.item(), "ppl": ppl(lp), "ref_ppl": ppl(ref_lp)}


def _logprobs(model, windows, batch_size: int = 8):
    """Same as moe_ao.eval.metrics.logprobs (copied so that the child needs no moe_ao)."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        return torch.cat([F.log_softmax(model(w, use_cache=False).logits.float(), dim=-1).cpu()
                          for w in windows.split(batch_size)])


# --------------------------------------------------------------------- child (llmc venv)


def _patch_transformers_aliases() -> None:
    """transformers 5.17's ``apply_patches`` (used by llm-compressor's linearized load of
    qwen2_moe) calls ``dir()`` on every ``transformers.*`` module, including lazy aliases of
    image processors that import torchvision; without torchvision that raises ImportError
    outside its try. Let those aliases' ``__dir__`` tolerate the missing optional package."""
    for name, mod in list(sys.modules.items()):
        if not name.startswith("transformers") or mod is None or "__dir__" not in vars(mod):
            continue
        orig = vars(mod)["__dir__"]

        def safe_dir(orig=orig):
            try:
                return orig()
            except ImportError:
                return []

        mod.__dir__ = safe_dir


def child(spec: dict) -> dict:
    """Runs in the llm-compressor venv: every configuration in ``spec["variants"]`` once."""
    import importlib.metadata as md

    import torch

    torch.set_num_threads(spec["threads"])
    with Timer() as t:
        import llmcompressor  # noqa: F401  (import cost, reported apart)
    out = {"import_s": t.wall, "variants": [child_variant(spec, v) for v in spec["variants"]]}
    out["versions"] = {k: md.version(k) for k in ("torch", "transformers", "llmcompressor", "compressed-tensors",
                                                   "datasets")}
    out["versions"] |= {"python": platform.python_version(), "torch_threads": torch.get_num_threads()}
    return out


def child_variant(spec: dict, var: dict) -> dict:
    """Load, oneshot GPTQ, verify and score one llm-compressor configuration."""
    import torch
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from llmcompressor.utils import load_context
    from transformers import AutoModelForCausalLM

    _patch_transformers_aliases()
    torch.manual_seed(0)
    tmp = Path(spec["tmp"])
    calib = torch.load(tmp / "calibration.pt")
    windows = torch.load(tmp / "windows.pt")
    ref_lp = torch.load(tmp / "ref_lp.pt")
    expected = set(spec["expert_units"])
    ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})

    with Timer() as t_load:
        with load_context():
            model = AutoModelForCausalLM.from_pretrained(spec["ckpt"], dtype=torch.bfloat16)
        model.eval()
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    if expected - linears:
        raise RuntimeError(f"experts not linearized: {sorted(expected - linears)[:5]}")
    orig = {n: model.get_submodule(n).weight.detach().clone() for n in expected}
    # The linearized bf16 model must reproduce the reference computed in the main env.
    float_quality = _metrics(_logprobs(model, windows), ref_lp, windows) if spec["check_float"] else None

    actorder = {} if var["actorder"] == "default" else {"actorder": None if var["actorder"] == "none"
                                                         else var["actorder"]}
    recipe = GPTQModifier(
        config_groups={"group_0": QuantizationScheme(
            targets=[EXPERT_REGEX],
            weights=QuantizationArgs(num_bits=BITS, type="int", symmetric=True, strategy="group",
                                     group_size=GROUP_SIZE),
        )},
        ignore=["lm_head"],
        **actorder,
    )
    with Timer() as t:
        model = oneshot(
            model=model, dataset=ds, recipe=recipe, num_calibration_samples=len(calib),
            max_seq_length=calib.shape[1], shuffle_calibration_samples=False, batch_size=var["batch_size"],
            moe_calibrate_all_experts=var["all_experts"], pipeline=var["pipeline"],
        )
    print(f"[llmc child] {var}: load {t_load.wall:.2f}s, oneshot {t.wall:.2f}s (cpu {t.cpu:.1f}s,"
          f" load avg {t.load1:.1f})", file=sys.stderr, flush=True)

    # Exactly the expected modules carry a scheme, their weights changed, and each group of 32
    # holds at most 2^bits distinct values, all (up to bf16 rounding) multiples of its scale.
    schemed = {n for n, m in model.named_modules() if getattr(m, "quantization_scheme", None) is not None}
    changed, max_levels, off_grid = 0, 0, 0.0
    for n in sorted(expected):
        mod = model.get_submodule(n)
        changed += int(not torch.equal(mod.weight.detach(), orig[n]))
        g = mod.weight.detach().float().view(mod.weight.shape[0], -1, GROUP_SIZE)
        codes = g / mod.weight_scale.detach().float().unsqueeze(-1)
        off_grid = max(off_grid, (codes - codes.round()).abs().max().item())
        max_levels = max(max_levels, max(len(torch.unique(r)) for r in g.reshape(-1, GROUP_SIZE)[::97]))
    status = sorted({str(getattr(model.get_submodule(n), "quantization_status", None)) for n in schemed})
    # The quantized (fake-quant, bf16) expert weights go back to the parent, which scores them in
    # the main env with the very forward code that produced the reference (see main_env_quality).
    weights = tmp / f"llmc_weights_{spec['variants'].index(var)}.pt"
    torch.save({n: model.get_submodule(n).weight.detach().clone() for n in sorted(expected)}, weights)
    return {
        "variant": var, "load_s": t_load.wall, **t.as_dict(), "float_linearized": float_quality,
        "weights": str(weights), "llmc_env": _metrics(_logprobs(model, windows), ref_lp, windows),
        "check": {
            "scheme_modules": len(schemed), "expected_modules": len(expected),
            "scheme_modules_equal_expected": schemed == expected, "weights_changed": changed,
            "max_distinct_values_per_group": max_levels, "max_off_grid": off_grid, "quantization_status": status,
        },
    }


# ------------------------------------------------------------------------ parent (main)


def git_state() -> str:
    """HEAD, plus whether moe_ao/ differs from it (read-only git calls)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "moe_ao"], cwd=REPO, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" + uncommitted changes in moe_ao/" if dirty else "")


def ensure_venv(venv: Path, requirements: list[str]) -> Path:
    py = venv / "bin" / "python"
    if not py.exists():
        print(f"creating {venv} and installing {' '.join(requirements)} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "--upgrade", "pip"], check=True)
        subprocess.run([str(py), "-m", "pip", "install", *requirements], check=True)
    return py


def run_moe_ao(model, calib, windows, ref_lp, method: str, **kwargs) -> dict:
    import moe_ao

    m = copy.deepcopy(model)
    plan = moe_ao.Plan({u.name: BITS for u in moe_ao.units(m) if u.kind == "expert"}, group_size=GROUP_SIZE)
    if method == "gptq":
        kwargs = {"calibration": calib, "progress": False, **kwargs}
    with Timer() as t:
        moe_ao.quantize_(m, plan, method=method, **kwargs)
    fallbacks = len(moe_ao.quantization_report(m).extra.get("fallbacks", {}))
    out = {**t.as_dict(), "fallbacks": fallbacks, **_metrics(_logprobs(m, windows), ref_lp, windows)}
    # The same weights through the plain bf16 forward (as the llm-compressor rows are scored), so that
    # any difference of moe_ao's packed-weight kernels from that forward shows apart from the weights.
    plain = _dequantized_copy(model, m)
    out["plain_fwd_kl"] = None if plain is None else _metrics(_logprobs(plain, windows), ref_lp, windows)["kl"]
    return out


def _dequantized_copy(model, quantized):
    """The float ``model`` with every packed parameter of ``quantized`` dequantized into it (None if none)."""
    import torch

    from moe_ao.tensors.packed import PackedWeight

    plain, n = copy.deepcopy(model), 0
    with torch.no_grad():
        for name, p in quantized.named_parameters():
            if isinstance(p, PackedWeight):
                dst = plain.get_parameter(name)
                dst.copy_(p.dequantize(dst.dtype))
                n += 1
    return plain if n else None


def main_env_quality(model, weights_path: str, windows, ref_lp) -> dict:
    """Writes llm-compressor's quantized expert weights into a copy of the main-env float model
    (the fused expert tensors, via moe_ao's unit views) and scores it like the moe_ao rows."""
    import torch

    import moe_ao
    from moe_ao.discovery import unit_weight

    weights = torch.load(weights_path)
    m = copy.deepcopy(model)
    changed = 0
    with torch.no_grad():
        for u in moe_ao.units(m):
            if u.kind != "expert":
                continue
            W = unit_weight(m, u)
            q = weights.pop(u.name)
            if q.shape != W.shape:
                raise RuntimeError(f"{u.name}: llm-compressor weight {tuple(q.shape)} vs {tuple(W.shape)}")
            changed += int(not torch.equal(W, q.to(W.dtype)))
            W.copy_(q)
    if weights:
        raise RuntimeError(f"llm-compressor weights with no moe_ao expert unit: {sorted(weights)[:5]}")
    q = _metrics(_logprobs(m, windows), ref_lp, windows)
    return {**q, "plain_fwd_kl": q["kl"], "units_changed_in_main_env": changed}


def llmc_variants(args) -> list[dict]:
    """llm-compressor configurations: its defaults first, then other batch sizes / routing."""
    return [{"batch_size": bs, "all_experts": ae, "actorder": args.llmc_actorder, "pipeline": args.llmc_pipeline}
            for bs in args.llmc_batch_size for ae in ((True, False) if args.llmc_routed_only else (True,))]


def variant_label(v: dict) -> str:
    return ("llm-compressor GPTQ (bs " + str(v["batch_size"])
            + (", all experts" if v["all_experts"] else ", routed tokens")
            + ("" if v["actorder"] == "default" else f", actorder {v['actorder']}")
            + ("" if v["pipeline"] == "independent" else f", {v['pipeline']}") + ")")


def aggregate(runs: list[dict]) -> dict:
    """Median wall / CPU seconds over repeats; quality from the first run (and whether all agree)."""
    out = dict(runs[0])
    for k in ("seconds", "cpu_s"):
        out[k + "_all"] = [r[k] for r in runs]
        out[k] = statistics.median(out[k + "_all"])
    out["load1_all"] = [r["load1"] for r in runs]
    if "load_s" in out:
        out["load_s_all"] = [r["load_s"] for r in runs]
    out["kl_all"] = [r["kl"] for r in runs]
    return out


def bench_model(name: str, args, py: Path) -> dict:
    import torch

    import moe_ao
    from moe_ao import models
    from moe_ao.calibration import load_calibration, load_eval_tokens
    from moe_ao.eval.metrics import compare, eval_windows, logprobs

    model, tok = models.load(name)
    ckpt = Path(name) if Path(name).is_dir() else models.path(name)
    calib = load_calibration("wikitext2-valid", tok, n_samples=args.n_calib, seq_len=args.seq_len, seed=0,
                             model_config=model.config)
    windows = eval_windows(load_eval_tokens(tok), args.seq_len, args.eval_windows)
    ref_lp = logprobs(model, windows)
    expert_units = [u.name for u in moe_ao.units(model) if u.kind == "expert"]

    # The copied metric formula must agree with moe_ao's own compare().
    m = copy.deepcopy(model)
    moe_ao.quantize_(m, moe_ao.Plan({u: BITS for u in expert_units}, group_size=GROUP_SIZE), method="rtn")
    own, mine = compare(ref_lp, m, windows).kl, _metrics(_logprobs(m, windows), ref_lp, windows)["kl"]
    assert abs(own - mine) <= 1e-6 * max(1.0, own), (own, mine)
    # Yardstick for the KL magnitudes: the same bf16 weights run in float32 vs the bf16 reference.
    fp32_floor = compare(ref_lp, copy.deepcopy(model).float(), windows).as_dict()
    del m

    methods = moe_ao_methods(args.alt_act_order)
    variants = llmc_variants(args)
    runs: dict[str, list[dict]] = {label: [] for label, _, _ in methods}
    runs |= {variant_label(v): [] for v in variants}
    extra: dict = {}
    with tempfile.TemporaryDirectory(prefix="peer_llmc_") as tmp:
        torch.save(calib, Path(tmp) / "calibration.pt")
        torch.save(windows, Path(tmp) / "windows.pt")
        torch.save(ref_lp, Path(tmp) / "ref_lp.pt")

        def ours():
            for label, method, kw in methods:
                runs[label].append(run_moe_ao(model, calib, windows, ref_lp, method, **kw))
                print(f"{name} {label}: {runs[label][-1]}", flush=True)

        def theirs(rep: int):
            spec = {"ckpt": str(ckpt), "tmp": tmp, "expert_units": expert_units, "variants": variants,
                    "threads": args.threads, "check_float": rep == 0}
            (Path(tmp) / "spec.json").write_text(json.dumps(spec))
            env = {**os.environ, "PYTHONNOUSERSITE": "1", "OMP_NUM_THREADS": str(args.threads),
                   "MKL_NUM_THREADS": str(args.threads)}
            with Timer() as t:  # child output passes through: llm-compressor logs its progress
                proc = subprocess.run([str(py), __file__, "--child", str(Path(tmp) / "spec.json")], env=env)
            if proc.returncode != 0:
                raise RuntimeError(f"llm-compressor child failed for {name} (rc {proc.returncode})")
            out = json.loads((Path(tmp) / "result.json").read_text())
            extra.setdefault("llmc_child_wall_s", []).append(t.wall)
            extra.setdefault("llmc_import_s", []).append(out["import_s"])
            extra["llmc_versions"] = out["versions"]
            for v in out["variants"]:
                if v["float_linearized"] is not None:
                    extra["llmc_float_linearized"] = v["float_linearized"]
                v |= main_env_quality(model, v.pop("weights"), windows, ref_lp)
                runs[variant_label(v["variant"])].append(v)
                print(f"{name} {variant_label(v['variant'])}: { {k: x for k, x in v.items() if k != 'check'} }",
                      flush=True)

        for rep in range(args.repeats):
            if rep % 2 == 0:
                ours(), theirs(rep)
            else:
                theirs(rep), ours()
    return {"model": name, "checkpoint": str(ckpt), "expert_units": len(expert_units), "fp32_floor": fp32_floor,
            "calibration": list(calib.shape), "eval_windows": list(windows.shape),
            "rows": {label: aggregate(r) for label, r in runs.items()}, **extra}


def verdicts(result: dict) -> list[str]:
    rows = result["rows"]
    out = []
    for ours in (label for label in rows if label.startswith("moe_ao GPTQ")):
        for label, llmc in rows.items():
            if not label.startswith("llm-compressor"):
                continue
            x = rows[ours]
            kl = "match/beat" if x["kl"] <= llmc["kl"] else "WORSE"
            t = "match/beat" if x["seconds"] <= llmc["seconds"] else "SLOWER"
            out.append(f"{ours} vs {label}: KL {x['kl']:.4g} vs {llmc['kl']:.4g} ({x['kl'] / llmc['kl']:.2f}x, {kl});"
                       f" wall {x['seconds']:.1f}s vs {llmc['seconds']:.1f}s ({x['seconds'] / llmc['seconds']:.2f}x,"
                       f" {t})")
    return out


def report(results: list[dict], args, machine: str, main_v: dict, cmd: str) -> str:
    llmc_v = results[0]["llmc_versions"]
    lines = [
        "# moe_ao vs llm-compressor GPTQModifier (peer benchmark)", "",
        f"Machine: {machine}; shared with other work, so seconds are indicative.",
        "Main env: " + ", ".join(f"{k} {v}" for k, v in main_v.items()) + ".",
        "llm-compressor env: " + ", ".join(f"{k} {v}" for k, v in llmc_v.items()) + ".", "",
        f"Plan: routed experts {BITS}-bit int, symmetric, group {GROUP_SIZE}; everything else bf16."
        f" Calibration: {args.n_calib} x {args.seq_len} tokens of WikiText-2 valid (seed 0), the same tensor on"
        f" both sides. Evaluation: {args.eval_windows} x {args.seq_len} tokens of WikiText-2 test (held out), KL"
        " and top-1 against the bf16 model's log-probs. Seconds: the `moe_ao.quantize_` / `oneshot` call"
        f" alone (wall clock; CPU = process CPU time), median of {args.repeats} interleaved repeat(s);"
        f" {args.threads} torch thread(s) on both sides.",
        "Scoring: every KL/top-1/ppl in the table comes from the main env's forward (the one that made the"
        " reference): llm-compressor's quantized expert weights are copied into the fused expert tensors of"
        " the main-env bf16 model. 'KL llmc env' is the same llm-compressor model scored in its own env"
        " (linearized experts, transformers 5.17), whose bf16 forward differs from the reference by itself"
        " (floor given below), so it is not comparable with the moe_ao rows. 'KL plain bf16 fwd': the"
        " moe_ao rows' packed weights dequantized into the plain bf16 model, i.e. scored exactly like the"
        " llm-compressor rows (isolates moe_ao's kernels from its weights).",
        f"llm-compressor: `GPTQModifier` targets `{EXPERT_REGEX}` (ignore lm_head), actorder"
        f" {args.llmc_actorder} (its default: static), dampening 0.01, block 128, min-max scale observer;"
        f" `oneshot(..., shuffle_calibration_samples=False, pipeline={args.llmc_pipeline!r})`, batch size and"
        " `moe_calibrate_all_experts` as labelled (its defaults: bs 1, all experts: every expert sees every"
        " token for its Hessian, outputs still routed). moe_ao GPTQ: damp 0.01, block 128, act_order as"
        " labelled, routed tokens only (rare experts fall back to the layer's pooled Hessian, counted"
        " under fallbacks), sequential over layers on quantized outputs, forward batch 8.", "",
        "| model | method | KL to bf16 | vs moe_ao RTN | top-1 | ppl (bf16) | wall s | CPU s | fallbacks |"
        " KL plain bf16 fwd | KL llmc env |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        rtn = r["rows"]["moe_ao RTN"]["kl"]
        for label, x in r["rows"].items():
            fb = x.get("fallbacks", "-")
            lines.append(f"| {r['model']} | {label} | {x['kl']:.4g} | {x['kl'] / rtn:.2f}x | {x['top1']:.4f} |"
                         f" {x['ppl']:.2f} ({x['ref_ppl']:.2f}) | {x['seconds']:.1f} | {x['cpu_s']:.1f} | {fb} |"
                         + (" - |" if x.get("plain_fwd_kl") is None else f" {x['plain_fwd_kl']:.4g} |")
                         + (f" {x['llmc_env']['kl']:.4g} |" if "llmc_env" in x else " - |"))
    lines += ["", "Comparisons and checks:", ""]
    for r in results:
        ckpt = Path(r["checkpoint"])
        lines.append(f"- {r['model']} (`{ckpt.relative_to(REPO) if ckpt.is_relative_to(REPO) else ckpt}`):")
        lines += [f"  - {v}" for v in verdicts(r)]
        best = min(x["kl"] for label, x in r["rows"].items() if "GPTQ" in label)
        lines.append(f"  - Yardstick: the unquantized bf16 weights run in float32 vs the bf16 reference: KL"
                     f" {r['fp32_floor']['kl']:.3g} ({r['fp32_floor']['kl'] / best:.2f}x the lowest GPTQ KL above),"
                     f" top-1 {r['fp32_floor']['top1']:.4f}.")
        fl = r.get("llmc_float_linearized")
        lines.append("  - llm-compressor env floor: its linearized bf16 model before oneshot vs the reference:"
                     + (f" KL {fl['kl']:.2e}, top-1 {fl['top1']:.4f}" if fl else " n/a")
                     + f"; llmcompressor import {statistics.median(r['llmc_import_s']):.1f}s, child process"
                     f" {', '.join(f'{s:.0f}' for s in r['llmc_child_wall_s'])}s.")
        for label, x in r["rows"].items():
            times = ", ".join(f"{w:.1f}" for w in x["seconds_all"])
            loads = ", ".join(f"{w:.1f}" for w in x["load1_all"])
            same = len(set(x["kl_all"])) == 1
            line = f"  - {label}: wall {times}s (load avg {loads}); KL identical across repeats: {same}"
            if "check" in x:
                c = x["check"]
                line += (f"; model load {', '.join(f'{y:.1f}' for y in x['load_s_all'])}s; {c['scheme_modules']}"
                         f" modules carry a quant scheme (the same set as the {c['expected_modules']} moe_ao expert"
                         f" units: {c['scheme_modules_equal_expected']}), {c['weights_changed']} weights changed,"
                         f" <= {c['max_distinct_values_per_group']} distinct values per sampled group,"
                         f" max |w/scale - round(w/scale)| {c['max_off_grid']:.1e} (bf16 storage),"
                         f" status {', '.join(c['quantization_status'])}; {x['units_changed_in_main_env']} expert"
                         " units changed when copied into the main-env model")
            lines.append(line + ".")
    lines += ["", f"Command: `{cmd}`", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), help="embedded names or checkpoint dirs")
    ap.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="llm-compressor virtualenv (created if missing)")
    ap.add_argument("--requirements", nargs="+", default=list(DEFAULT_REQUIREMENTS),
                    help="what to pip install into a new --venv")
    ap.add_argument("--n-calib", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=48)
    ap.add_argument("--threads", type=int, default=1, help="torch threads on both sides")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved timed runs per method (median reported)")
    ap.add_argument("--no-alt-act-order", dest="alt_act_order", action="store_false",
                    help="skip the extra moe_ao GPTQ row with the non-default act_order")
    ap.add_argument("--llmc-batch-size", type=int, nargs="+", default=[1, 8],
                    help="oneshot batch sizes, one llm-compressor run each (its default 1; moe_ao forwards 8)")
    ap.add_argument("--llmc-routed-only", action="store_true",
                    help="also run each llm-compressor batch size with moe_calibrate_all_experts=False")
    ap.add_argument("--llmc-actorder", default="default", choices=["default", "static", "group", "weight", "none"],
                    help="GPTQModifier actorder (its default: static)")
    ap.add_argument("--llmc-pipeline", default="independent", help="oneshot pipeline (its default: independent)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "peer_llmcompressor"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        spec = json.loads(Path(args.child).read_text())
        (Path(spec["tmp"]) / "result.json").write_text(json.dumps(child(spec), indent=1))
        return

    import torch
    import transformers

    import moe_ao

    torch.set_num_threads(args.threads)
    machine = cpu_line()
    py = ensure_venv(args.venv, args.requirements)
    results = [bench_model(m, args, py) for m in args.models]
    main_v = {"git": git_state(), "python": platform.python_version(), "torch": torch.__version__,
              "transformers": transformers.__version__, "moe_ao": moe_ao.__version__,
              "torch_threads": torch.get_num_threads()}
    cmd = "python benchmarks/peer_llmcompressor.py" + "".join(f" {shlex.quote(a)}" for a in sys.argv[1:])
    text = report(results, args, machine, main_v, cmd)
    Path(args.out + ".md").write_text(text)
    Path(args.out + ".json").write_text(json.dumps(
        {"machine": machine, "main_env": main_v, "llmc_env": results[0]["llmc_versions"], "command": cmd,
         "args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
