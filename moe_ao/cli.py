"""The ``moe-ao`` command line (also ``python -m moe_ao``).

Subcommands: ``demo`` (the main job), ``units``, ``profile``, ``plan``, ``quantize``, ``export``.
User mistakes print one line (``error: ...``) and exit 2, without a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys

from moe_ao.demo import DemoConfig


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="quantize the embedded default model end to end and report")
    d = DemoConfig()
    p.add_argument("--model", default=d.model, help="embedded model name or local HF checkpoint dir")
    p.add_argument("--method", default=d.method, choices=("gptq", "rtn"))
    p.add_argument("--strategy", default=d.strategy, help="planner strategy (see `moe-ao plan --help`)")
    p.add_argument("--budget", type=float, default=d.budget, help="average bits (paper accounting)")
    p.add_argument("--group-size", type=int, default=d.group_size)
    p.add_argument("--kl-windows", type=int, default=d.kl_windows,
                   help="calibration windows the knapsack's KL sensitivities are measured on")
    p.add_argument("--calibration", default=d.calibration, help="named source or text file")
    p.add_argument("--n-samples", type=int, default=d.n_samples)
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--out", default=d.out, help="where the quantized checkpoint and report go")


def _add_sensitivity_args(p: argparse.ArgumentParser, plan_command: bool) -> None:
    if plan_command:
        what = ("knapsack only: kl = measured output KL per unit (best; when profiling now, minutes on the embedded"
                " models; the default), estimate = the same KL estimated in two passes (a forward and a backward),"
                " hessian = Hessian-weighted error proxy (one pass). With --profile it picks the profile's table"
                " (default: measured KL if the profile has one, then the estimate, then the proxy)")
        p.add_argument("--sensitivity", choices=("kl", "estimate", "hessian"), default=None, help=what)
    else:
        what = ("kl: measure every unit's KL sensitivity for the knapsack optimizer (a forward pass per unit and"
                " width: minutes on the embedded models); estimate: estimate it in two passes")
        p.add_argument("--sensitivity", choices=("kl", "estimate"), default=None, help=what)
    p.add_argument("--kl-windows", type=int, default=16, help="calibration windows the KL is measured on")


def _add_model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="embedded model name or local HF checkpoint dir")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-ao", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="cmd", required=True)
    _add_demo(sub)
    p = sub.add_parser("units", help="list a model's quantizable units")
    _add_model_arg(p)
    p = sub.add_parser("profile", help="routing counts, router entropy and block similarity on calibration text")
    _add_model_arg(p)
    p.add_argument("--calibration", default="wikitext2-valid")
    p.add_argument("--n-samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--hessians", action="store_true", help="also keep every unit's input Hessian")
    _add_sensitivity_args(p, plan_command=False)
    p.add_argument("--group-size", default="auto", help="group size the KL sensitivities are measured at"
                   " (int or 'auto'); plan with the same one")
    p.add_argument("-o", "--output", required=True, help="profile file (.pt)")
    p = sub.add_parser("plan", help="build a bit plan with a named strategy, optionally at a budget",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="strategies:\n" + _strategy_help())
    _add_model_arg(p)
    p.add_argument("--strategy", required=True, help="strategy name (listed below)")
    p.add_argument("--budget", type=float, default=None, help="average bits (paper accounting) to hit")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="strategy parameter, repeatable (values read as JSON), e.g. --param k=2")
    p.add_argument("--group-size", default="auto", help="int or 'auto' (largest of 128/64/32 dividing each unit)")
    p.add_argument("--profile", help="profile file from `moe-ao profile` (else profiled now when needed)")
    _add_sensitivity_args(p, plan_command=True)
    p.add_argument("--calibration", default="wikitext2-valid")
    p.add_argument("--n-samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--serving", choices=("vllm", "vllm-humming", "llama.cpp"), default=None,
                   help="plan only what this engine runs (one width per MoE layer for vLLM, per experts tensor for"
                        " llama.cpp; see README 'Serving')")
    p.add_argument("--heatmap", help="also write a layer x expert heatmap PNG here")
    p.add_argument("-o", "--output", required=True, help="plan.json")
    p = sub.add_parser("quantize", help="quantize a model with a plan and save it")
    _add_model_arg(p)
    p.add_argument("--plan", required=True, help="plan.json")
    p.add_argument("--method", default="gptq", choices=("gptq", "rtn"))
    p.add_argument("--calibration", default="wikitext2-valid")
    p.add_argument("--n-samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--no-act-order", dest="act_order", action="store_false",
                   help="process columns in natural order (the paper's Mixtral setting)")
    p.add_argument("--split-calibration", action="store_true",
                   help="under torchrun: each rank runs only its share of the calibration batches, Hessians summed"
                        " over ranks (faster; codes may differ from one process's in rare roundings)")
    p.add_argument("-o", "--output", required=True, help="output checkpoint dir (new, empty, or see --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing moe_ao checkpoint at --output (never a folder holding other files)")
    _add_export(sub)
    return parser


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a quantized checkpoint for vLLM (compressed-tensors) or llama.cpp (GGUF)")
    p.add_argument("--checkpoint", required=True, help="a moe_ao checkpoint dir (from `moe-ao quantize`)")
    p.add_argument("--format", required=True, choices=("compressed-tensors", "gguf"))
    p.add_argument("--humming", action="store_true",
                   help="compressed-tensors: allow 2/3-bit experts (vLLM's --moe-backend humming)")
    p.add_argument("-o", "--output", required=True, help="output dir (compressed-tensors) or .gguf file")


def _cmd_demo(args: argparse.Namespace) -> None:
    from moe_ao.demo import run_demo

    fields = {f.name for f in dataclasses.fields(DemoConfig)}
    cfg = DemoConfig(**{k: v for k, v in vars(args).items() if k in fields})
    r = run_demo(cfg)
    print(f"model {r['model']}: {r['strategy']} plan at {r['plan_avg_bits']:.2f} avg bits"
          f" ({r['true_avg_bits']:.2f} true, scales included), {r['method']}")
    print(f"memory   {r['bytes_before'] / 2**20:8.2f} MiB -> {r['bytes_after'] / 2**20:.2f} MiB "
          f"({r['bytes_before'] / r['bytes_after']:.2f}x smaller)")
    print(
        f"held-out KL {r['kl']:.4f}  top-1 agreement {r['top1']:.3f}  perplexity {r['ref_ppl']:.2f} -> {r['ppl']:.2f}"
    )
    print(f"decode   {r['tokens_per_s_before']:.1f} -> {r['tokens_per_s_after']:.1f} tokens/s (eager)")
    print(f"reload bit-exact: {r['reload_bit_exact']}   quantization: {r['quantize_seconds']:.1f} s")
    print(f"sample, prompt {r['prompt']!r}, greedy (float, then quantized):")
    for text in (r["sample_before"], r["sample_after"]):
        print("  | " + text.replace("\n", "\n  | "))
    print(f"report: {cfg.out}/demo_report.md")


def _streamed(name_or_path: str, weights: bool = True):
    """The model streamed from its checkpoint (see moe_ao.stream) and its tokenizer: the float
    model is never whole in memory. ``weights=False`` skips loading even the embeddings."""
    from transformers import AutoTokenizer

    from moe_ao import models
    from moe_ao.stream import StreamedModel

    path = models.resolve(name_or_path)
    streamed = StreamedModel(path)
    if weights:
        streamed.preflight()
        streamed.load_rest()
    return streamed, AutoTokenizer.from_pretrained(path, local_files_only=True)


def _cmd_units(args: argparse.Namespace) -> None:
    from moe_ao.discovery import units

    streamed, _ = _streamed(args.model, weights=False)  # names and shapes need no weights
    for u in units(streamed.model):
        print(f"{u.name}\t{u.kind}\t{u.shape[0]}x{u.shape[1]}")


def _cmd_profile(args: argparse.Namespace) -> None:
    from moe_ao import models
    from moe_ao.calibration import load_calibration
    from moe_ao.distributed import is_writer
    from moe_ao.planner import estimate_sensitivities, measure_sensitivities
    from moe_ao.profiling import profile

    if args.sensitivity == "kl":  # measures on float32 copies of every layer: in memory
        model, tok = models.load(args.model)
    else:  # streamed one layer at a time from the checkpoint
        streamed, tok = _streamed(args.model)
        model = streamed.model
    calib = load_calibration(args.calibration, tok, args.n_samples, args.seq_len, model_config=model.config)
    prof = profile(model, calib, hessians=args.hessians)
    if args.sensitivity == "kl":
        measure_sensitivities(model, calib, prof, group_size=_group_size(args.group_size), kl_windows=args.kl_windows)
    elif args.sensitivity == "estimate":  # layer by layer, so it streams too
        estimate_sensitivities(model, calib, prof, group_size=_group_size(args.group_size))
    prof.meta["source"] = args.calibration
    if is_writer():  # under torchrun every rank holds the same profile; rank 0 writes it
        prof.save(args.output)
        print(json.dumps({str(k): v.tolist() for k, v in prof.routing_counts.items()}))


def _strategy_help() -> str:
    from moe_ao.planner import strategy_help

    return strategy_help()


# Strategies that read calibration statistics (profile); the rest need only weights.
DATA_STRATEGIES = (
    "frequency",
    "frequency-global",
    "layerisp",
    "block-predictor",
    "combination",
    "knapsack",
    "optimizer",
)


def _cmd_plan(args: argparse.Namespace) -> None:
    from moe_ao import models
    from moe_ao.calibration import load_calibration
    from moe_ao.distributed import is_writer
    from moe_ao.planner import (
        estimate_sensitivities,
        get_strategy,
        heatmap,
        measure_sensitivities,
        parse_params,
        plan,
        summarize,
    )
    from moe_ao.planner.context import resolve_base
    from moe_ao.profile_stats import Profile
    from moe_ao.profiling import profile

    spec = get_strategy(args.strategy)  # fail on a typo before loading anything
    params = parse_params(args.param)
    group = _group_size(args.group_size)
    stats = None
    sensitivity = args.sensitivity
    if args.profile:  # the plan needs the profile and the model's structure: its skeleton, no weights
        stats = Profile.load(args.profile)
        model, tok = _streamed(args.model, weights=False)[0].model, None
    else:
        model, tok = models.load(args.model)
    if not args.profile and args.strategy in DATA_STRATEGIES:
        sensitivity = sensitivity or "kl"
        # the planned kinds: the base's (lm_head too when a base mapping names it), or the kinds optimised
        kinds = params.get("kinds") or [k for k in resolve_base(params.get("base") or spec.base) if k != "router"]
        calib = load_calibration(args.calibration, tok, args.n_samples, args.seq_len, args.seed, model.config)
        stats = profile(model, calib, hessians=spec.optimizer and sensitivity == "hessian", seed=args.seed)
        if spec.optimizer and sensitivity == "estimate" and "sensitivities" not in params:
            estimate_sensitivities(model, calib, stats, group_size=group, kinds=kinds)
        if spec.optimizer and sensitivity == "kl" and "sensitivities" not in params:
            measure_sensitivities(
                model,
                calib,
                stats,
                group_size=group,
                kinds=kinds,
                kl_windows=args.kl_windows,
            )
    if spec.optimizer and sensitivity and "sensitivities" not in params:
        params.setdefault("sensitivity", sensitivity)
    options = dict(budget_bits=args.budget, stats=stats, seed=args.seed, group_size=group, serving=args.serving)
    try:
        p = plan(model, args.strategy, **options, **params)
    except ValueError as e:
        if "reads weights" not in str(e):
            raise
        model, _ = models.load(args.model)  # this strategy reads the weights: load them after all
        p = plan(model, args.strategy, **options, **params)
    if not is_writer():  # under torchrun every rank computed the same plan; rank 0 writes it
        return
    p.to_json(args.output)
    print(summarize(p, model))
    print(f"avg bits {p.avg_bits(model):.3f} (paper accounting), {p.true_avg_bits(model):.3f} true -> {args.output}")
    if args.heatmap:
        print(heatmap(p, model, args.heatmap))


def _group_size(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"--group-size={text!r}; allowed: a positive int or 'auto'") from None


def _cmd_quantize(args: argparse.Namespace) -> None:
    from transformers import AutoConfig, AutoTokenizer

    from moe_ao import models
    from moe_ao.calibration import load_calibration
    from moe_ao.distributed import is_writer
    from moe_ao.plans import Plan
    from moe_ao.stream import quantize_pretrained

    path = models.resolve(args.model)
    plan = Plan.from_json(args.plan)
    kwargs = {}
    if args.method == "gptq":
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        calib = load_calibration(args.calibration, tok, args.n_samples, args.seq_len, model_config=config)
        kwargs = {"calibration": calib, "act_order": args.act_order, "split_calibration": args.split_calibration}
    # Streamed layer by layer from the checkpoint files (resumable; the float model is never whole
    # in memory); the same codes as moe_ao.quantize_ on the model loaded whole.
    out = quantize_pretrained(path, plan, args.output, method=args.method, overwrite=args.overwrite, **kwargs)
    if is_writer():  # under torchrun the ranks split GPTQ by expert; rank 0 writes the checkpoint
        print(out)


def _cmd_export(args: argparse.Namespace) -> None:
    from pathlib import Path

    from transformers import AutoTokenizer

    from moe_ao.checkpoint import load_quantized
    from moe_ao.export import export

    model = load_quantized(args.checkpoint)
    has_tokenizer = (Path(args.checkpoint) / "tokenizer_config.json").is_file()
    tok = AutoTokenizer.from_pretrained(args.checkpoint, local_files_only=True) if has_tokenizer else None
    options = {"humming": True} if args.humming else {}
    if args.humming and args.format != "compressed-tensors":
        raise ValueError("--humming applies to --format compressed-tensors only")
    print(export(model, args.output, format=args.format, tokenizer=tok, **options))


COMMANDS = {
    "demo": _cmd_demo,
    "units": _cmd_units,
    "profile": _cmd_profile,
    "plan": _cmd_plan,
    "quantize": _cmd_quantize,
    "export": _cmd_export,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("moe_ao.progress").setLevel(logging.INFO)  # a line per stage when stderr is not a terminal
    if args.cmd in ("profile", "plan", "quantize"):  # under torchrun: join the other ranks (gloo / nccl)
        from moe_ao.distributed import init_from_env

        init_from_env()
    try:
        COMMANDS[args.cmd](args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        if args.verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
