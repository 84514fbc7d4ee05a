"""The QuantMoE-Bench study, rerun on moe_ao's planner: each paper heuristic vs its control.

Per model, one calibration profile (routing counts, block similarities, Hessians)
feeds the data-driven strategies; the knapsack optimizer also gets every unit's
measured KL sensitivity (``moe_ao.planner.measure_sensitivities``, cached on disk). Each grid cell is plan -> GPTQ (or RTN) -> KL to the
bf16 model, top-1 agreement and perplexity on held-out WikiText-2 test windows, plus
the shipped lm-eval task if asked. Random controls run once per seed and report
mean ± std. Finished cells are cached as JSON under ``--cache-dir``, keyed by the
checkpoint files' hash, the plan's hash (sha256 of ``plan.to_json()``), the method and
the calibration/evaluation setup. A rerun skips them.

    python benchmarks/paper_table.py                      # both embedded models, GPTQ
    python benchmarks/paper_table.py --dry-run            # plans and bits only, no quantization
    python benchmarks/paper_table.py --model tiny-mixtral --method rtn --strategies outlier outlier-random
    python benchmarks/paper_table.py --act-bits 8 --out benchmarks/results/w8a/paper_table  # W+A twins

Writes ``<out>_<model>.md/.json/.png`` (table, raw numbers, true bits vs KL with the
Pareto front) and ``findings.md`` in the same folder.

Defaults sized for a shared 2-core CPU (~11 min per embedded model with GPTQ for the
heuristics, plus 6-22 min for the knapsack's KL sensitivities, cached on disk): 64
calibration windows of 256 tokens (half the other benchmarks' 128; GPTQ time is mostly
the layer-wise forwards, so it halves too) and one torch thread (OpenMP spin-waits made
two threads ~10x slower on a loaded machine). lm-eval is off by default: each cell
costs ~45 s more for 300 documents, and the bf16 embedded models score below chance on
the shipped task (tiny-mixtral acc 0.153), so it separates nothing here.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))

from _common import machine  # noqa: E402
from paper_findings import findings_md, fmt  # noqa: E402

import moe_ao  # noqa: E402
from moe_ao import models  # noqa: E402
from moe_ao.calibration import load_calibration, load_eval_tokens  # noqa: E402
from moe_ao.eval.metrics import compare, eval_windows, logprobs  # noqa: E402
from moe_ao.planner import estimate_sensitivities, measure_sensitivities, plan  # noqa: E402
from moe_ao.profiling import profile  # noqa: E402
from moe_ao.sensitivity_estimate import ESTIMATOR  # noqa: E402

logger = logging.getLogger("paper_table")

GROUP_SIZE = 32  # divides every in_features of the embedded models
NEEDS_STATS = {"frequency", "frequency-global", "layerisp", "combination", "knapsack"}
EXPERIMENTS = ("uniform", "base", "attention", "shared", "frequency", "blocks", "linear-type", "outlier",
               "layerisp", "combination", "optimizer")


@dataclass
class Cell:
    """One grid row: ``plan(model, strategy, budget, seed=seed, base=base, **params)``.

    ``id`` is the stable short name the findings refer to (e.g. ``attn4-rand``), ``experiment``
    one of EXPERIMENTS; a random control (``random``) is one Cell per seed of ``--seeds``.
    """

    id: str
    experiment: str
    label: str
    strategy: str
    params: dict[str, Any] = field(default_factory=dict)
    budget: float | None = None
    base: str | None = None
    seed: int = 0
    random: bool = False
    within: tuple[str, ...] = ()  # cell ids whose achieved average bits cap this cell's budget


@dataclass(frozen=True)
class Facts:
    """What the grid needs to know about a model's MoE layout."""

    n_experts: int
    moe_layers: tuple[int, ...]
    ffn_layers: tuple[int, ...]
    has_shared: bool

    @classmethod
    def of(cls, units: list[moe_ao.Unit]) -> Facts:
        experts = [u for u in units if u.kind == "expert"]
        ffn = sorted({u.layer for u in units if u.kind in ("expert", "shared_expert", "dense_mlp")})
        return cls(max(u.expert for u in experts) + 1, tuple(sorted({u.layer for u in experts})), tuple(ffn),
                   any(u.kind == "shared_expert" for u in units))


def grid(facts: Facts, units: list[moe_ao.Unit], seeds: list[int], budgets: list[float]) -> list[Cell]:
    """The paper's grid, its per-block counts scaled to this model by the paper's ratios.

    Frequency raises the top n_experts/4 per block (Mixtral: top-2 of 8); block rules take
    1/8 and 1/4 of the MoE blocks (the paper's k = 4 and 8 of 32). first-k / last-k get k
    plus the dense layers before / after the MoE blocks: the planner walks those too, and
    they sit at 4 bits already in the experts-low base, so without the offset first-k
    would raise fewer MoE blocks than last-k. Random controls run once per seed.
    """
    M = len(facts.moe_layers)
    kf = max(1, round(facts.n_experts / 4))  # top-2 of 8 (paper); the same 1/4 share of 16 experts is top-4
    k_small, k_large = max(1, round(M / 8)), max(1, round(M / 4))  # the paper's k = 4 and 8 of 32 blocks
    lead = sum(1 for layer in facts.ffn_layers if layer < facts.moe_layers[0])  # dense layers before the MoE ones
    trail = sum(1 for layer in facts.ffn_layers if layer > facts.moe_layers[-1])
    combo = {"rule_params": {"freq": {"k": kf}, "firstl": {"k": lead + k_small}}}
    cells: list[Cell] = []

    def add(id_, exp, label, strategy, params=None, rand=False, **kw):
        for s in (seeds if rand else [0]):
            cells.append(Cell(id_, exp, label, strategy, dict(params or {}), seed=s, random=rand, **kw))

    for b in (2, 3, 4):
        add(f"uniform{b}", "uniform", f"uniform {b}-bit", "uniform", {"bits": b})
    add("base", "base", "base: experts 2, rest 4", "base")
    for b in (4, 8):
        add(f"attn{b}", "attention", f"attention 2→{b}, rest 2", "attention", {"bits": b})
        add(f"attn{b}-rand", "attention", f"  random experts at 4 (bits of attention 2→{b})", "attention-random",
            {"bits": b}, rand=True)
    if facts.has_shared:
        shared_bits = plan(units, "shared", group_size=GROUP_SIZE).meta["avg_bits"]
        add("shared", "shared", "shared experts 2→4, rest 2", "shared", {"bits": 4})
        add("attn+shared", "shared", "+Attn+Shared (attention and shared 4, rest 2)", "combination",
            {"rules": "+Attn+Shared"})
        add("shared-freq", "shared", "  most-routed experts at 4 (bits of shared)", "frequency", {"k": kf},
            budget=shared_bits, base="uniform-low")
        add("shared-rand", "shared", "  random routed experts at 4 (bits of shared)", "frequency-random", {"k": kf},
            rand=True, budget=shared_bits, base="uniform-low")
    add("freq", "frequency", f"frequency: top-{kf} per block (+Freq)", "frequency", {"k": kf})
    add("freq-rand", "frequency", f"  random {kf} per block", "frequency-random", {"k": kf}, rand=True)
    for k in sorted({k_small, k_large}):
        add(f"first{k}", "blocks", f"first {k} MoE block(s) (+FirstL)", "first-k", {"k": lead + k})
        add(f"last{k}", "blocks", f"last {k} MoE block(s)", "last-k", {"k": trail + k})
        add(f"blocks{k}-rand", "blocks", f"  random {k} MoE block(s)", "blocks-random", {"k": k}, rand=True)
    for proj in ("gate_proj", "up_proj", "down_proj"):
        add(f"lin-{proj[:-5]}", "linear-type", f"linear type: all {proj}", "linear-type", {"proj": proj})
    add("outlier", "outlier", "outlier scorer top 25% (+LinearOSP)", "outlier", {"fraction": 0.25})
    add("outlier-rand", "outlier", "  random 25% of expert linears", "outlier-random", {"fraction": 0.25}, rand=True)
    add("layerisp", "layerisp", f"block predictor: {k_large} block(s) (+LayerISP)", "layerisp", {"k": k_large})
    add("layerisp-rand", "layerisp", f"  random {k_large} MoE block(s)", "blocks-random", {"k": k_large}, rand=True)
    add("combination", "combination", "+Attn+Shared+Freq+FirstL+LinearOSP+LayerISP", "combination", combo)
    heuristic_at_budget = [("attn", "attention", {"bits": 8}), ("freq", "frequency", {"k": kf}),
                           ("firstk", "first-k", {}), ("lin-down", "linear-type", {"proj": "down_proj"}),
                           ("outlier", "outlier", {}), ("layerisp", "layerisp", {}),
                           ("combination", "combination", combo)]
    for B in budgets:
        # The heuristics first: each lands on the average closest to B, maybe just below it, and
        # the knapsacks then get no more bits than the best of them (the optimizer claim's terms).
        rivals = tuple(f"{id_}@{B}" for id_, _, _ in heuristic_at_budget)
        for id_, strategy, params in heuristic_at_budget:
            add(f"{id_}@{B}", "optimizer", f"  {strategy} @ {B}", strategy, params, budget=B)
        add(f"knapsack@{B}", "optimizer", f"knapsack optimizer, measured KL @ {B}", "knapsack",
            {"sensitivity": "kl"}, budget=B, within=rivals)
        add(f"knapsack-estimate@{B}", "optimizer", f"knapsack optimizer, estimated KL (two passes) @ {B}",
            "knapsack", {"sensitivity": "estimate"}, budget=B, within=rivals)
        # Not rivals in the findings: the scalable Hessian proxy, and the KL knapsack kept off attention.
        add(f"knapsack-hessian@{B}", "optimizer", f"  knapsack optimizer, Hessian proxy @ {B}", "knapsack",
            {"sensitivity": "hessian"}, budget=B, within=rivals)
        add(f"knapsack-experts@{B}", "optimizer", f"  knapsack over experts only (rest at base) @ {B}", "knapsack",
            {"sensitivity": "kl", "kinds": ["expert"]}, budget=B, within=rivals)
    return cells


def with_act_bits(p: moe_ao.Plan, act_bits: int) -> moe_ao.Plan:
    """``p`` with int8 per-token activations (``act_bits``) on every quantized unit: its W+A twin,
    the same weights and bits (the paper's W+A experiments)."""
    specs = {n: replace(s, act_bits=act_bits) if s.quantized else s for n, s in p.items()}
    return moe_ao.Plan(specs, group_size=p.defaults.group_size, symmetric=p.defaults.symmetric,
                       allow_low_bit_router=p.allow_low_bit_router, meta=p.meta | {"act_bits": act_bits})


def file_hash(path: Path) -> str:
    """sha256 over a checkpoint folder's files (relative names and contents)."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode() + f.read_bytes())
    return h.hexdigest()


def _sha(obj: Any) -> str:  # of a string, or of a JSON-able object in canonical form
    return hashlib.sha256((obj if isinstance(obj, str) else json.dumps(obj, sort_keys=True)).encode()).hexdigest()


class ModelRun:
    """A float model with its calibration, held-out windows and lazily computed reference/profile."""

    def __init__(self, name: str, args: argparse.Namespace, cache_dir: Path) -> None:
        self.args, self.cache_dir = args, cache_dir
        self.path = models.path(name) if name in models.available() else Path(name)
        self.tag = self.path.name if name not in models.available() else name
        self.model_hash = file_hash(self.path)
        self.model, self.tokenizer = models.load(name)
        self.units = moe_ao.units(self.model)
        self.facts = Facts.of(self.units)
        self.windows = eval_windows(load_eval_tokens(self.tokenizer), args.seq_len, args.eval_windows)
        self.calibration = load_calibration(args.calibration, self.tokenizer, args.n_calib, args.seq_len, 0,
                                            self.model.config)
        self.setup = {"calibration": args.calibration, "n_calib": args.n_calib, "seq_len": args.seq_len,
                      "calib_seed": 0, "eval": "wikitext2-test", "eval_windows": int(self.windows.shape[0]),
                      "group_size": GROUP_SIZE, "lm_eval_limit": args.lm_eval_limit}

    @cached_property
    def ref_lp(self) -> torch.Tensor:
        return logprobs(self.model, self.windows)

    @cached_property
    def stats(self):
        t = time.perf_counter()
        out = profile(self.model, self.calibration, hessians=True, progress=False)
        logger.info("%s: profiled %d calibration windows in %.1f s", self.tag, self.calibration.shape[0],
                    time.perf_counter() - t)
        return out

    @cached_property
    def kl_stats(self):
        """The profile plus measured KL sensitivities, cached on disk (the grid's slowest step)."""
        key = _sha({"model": self.model_hash, "setup": self.setup, "kl_windows": self.args.kl_windows,
                    "quantizer": self.args.method})
        path = self.cache_dir / f"{self.tag}-kl-sensitivities-{key[:24]}.json"
        stats = copy.copy(self.stats)
        if path.exists():
            record = json.loads(path.read_text())
            stats.sensitivities = {u: {int(b): v for b, v in d.items()} for u, d in record["sensitivities"].items()}
            stats.sensitivity_setup = record["setup"]
            return stats
        t = time.perf_counter()
        measure_sensitivities(self.model, self.calibration, stats, group_size=GROUP_SIZE,
                              quantizer=self.args.method, kl_windows=self.args.kl_windows, progress=False)
        stats.sensitivity_setup["seconds"] = time.perf_counter() - t
        logger.info("%s: measured KL sensitivities of %d units in %.0f s", self.tag, len(stats.sensitivities),
                    stats.sensitivity_setup["seconds"])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"sensitivities": stats.sensitivities, "setup": stats.sensitivity_setup}))
        return stats

    @cached_property
    def est_stats(self):
        """The profile plus estimated KL sensitivities (two passes), cached on disk with their time."""
        a = self.args
        key = _sha({"model": self.model_hash, "setup": self.setup, "quantizer": a.method, "estimator": ESTIMATOR,
                    "samples": a.est_samples, "windows": a.est_windows, "seed": 0, "labels": "per-window generator"})
        path = self.cache_dir / f"{self.tag}-kl-estimates-{key[:24]}.json"
        stats = copy.copy(self.stats)
        if path.exists():
            record = json.loads(path.read_text())
            stats.sensitivity_estimates = {u: {int(b): v for b, v in d.items()}
                                           for u, d in record["sensitivities"].items()}
            stats.estimate_setup = record["setup"]
            return stats
        t = time.perf_counter()
        estimate_sensitivities(self.model, self.calibration, stats, group_size=GROUP_SIZE, quantizer=a.method,
                               windows=a.est_windows, samples=a.est_samples, progress=False)
        stats.estimate_setup["seconds"] = time.perf_counter() - t
        logger.info("%s: estimated KL sensitivities of %d units in %.0f s", self.tag,
                    len(stats.sensitivity_estimates), stats.estimate_setup["seconds"])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"sensitivities": stats.sensitivity_estimates, "setup": stats.estimate_setup}))
        return stats

    def plan(self, cell: Cell) -> moe_ao.Plan:
        stats = self.stats if cell.strategy in NEEDS_STATS else None
        if cell.params.get("sensitivity") == "kl":
            stats = self.kl_stats
        elif cell.params.get("sensitivity") == "estimate":
            stats = self.est_stats
        p = plan(self.model, cell.strategy, cell.budget, stats, cell.seed, group_size=GROUP_SIZE,
                 base=cell.base, **cell.params)
        return with_act_bits(p, self.args.act_bits) if self.args.act_bits else p

    def lm_acc(self, model: torch.nn.Module) -> float:
        from moe_ao.eval import lm_eval

        res = lm_eval(model, self.tokenizer, limit=self.args.lm_eval_limit)
        return next(iter(res.values()))["acc"]

    def evaluate(self, p: moe_ao.Plan) -> dict[str, Any]:
        """Quantizes a fresh copy with ``p`` and measures it."""
        model = copy.deepcopy(self.model)
        t = time.perf_counter()
        kwargs = {"calibration": self.calibration, "progress": False} if self.args.method == "gptq" else {}
        moe_ao.quantize_(model, p, method=self.args.method, **kwargs)
        seconds = time.perf_counter() - t
        report = moe_ao.quantization_report(model)
        out = compare(self.ref_lp, model, self.windows).as_dict()
        out["lm_acc"] = self.lm_acc(model) if self.args.lm_eval_limit else None
        out |= {"quantize_s": seconds, "fallbacks": len(report.extra.get("fallbacks", {}))}
        return out


def _plan_summary(p: moe_ao.Plan) -> dict[str, Any]:
    d = p.meta.get("details", {})
    keep = ("k", "blocks", "ranking", "experts", "selected_by_proj", "raised_units", "feasible_range",
            "matched_avg_bits", "objective", "sensitivity", "method", "proj")
    return {k: d[k] for k in keep if k in d}


def run_cell(run: ModelRun, cell: Cell, cache_dir: Path, dry_run: bool,
             achieved: dict[str, tuple[float, float | None]]) -> dict[str, Any]:
    """Plans, then quantizes and measures unless the cache holds the cell. Infeasible plans give an error row.

    ``achieved``: (average bits, KL or None) of the cells run so far, by id. A cell with
    ``within`` gets at most the average bits of the lowest-KL of those cells (of the fewest
    bits among them when none was measured, as in a dry run).
    """
    done = [achieved[i] for i in cell.within if i in achieved]
    if done and cell.budget is not None:
        measured = [d for d in done if d[1] is not None]
        cap = min(measured, key=lambda d: d[1])[0] if measured else min(d[0] for d in done)
        cell = replace(cell, budget=min(cell.budget, cap))
    row: dict[str, Any] = {"model": run.tag, **asdict(cell)}
    try:
        p = run.plan(cell)
    except ValueError as e:
        return row | {"error": str(e)}
    plan_hash = _sha(p.to_json())
    key = _sha({"model": run.model_hash, "plan": plan_hash, "method": run.args.method, "setup": run.setup})
    row |= {"avg_bits": p.meta["avg_bits"], "true_bits": p.meta["true_avg_bits"], "plan_hash": plan_hash,
            "cache_key": key, "plan": _plan_summary(p)}
    path = cache_dir / f"{run.tag}-{key[:24]}.json"
    if path.exists():
        return row | json.loads(path.read_text())["metrics"] | {"cached": True}
    if dry_run:
        return row | {"cached": False, "dry_run": True}
    metrics = run.evaluate(p)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"model_hash": run.model_hash, "plan_hash": plan_hash, "method": run.args.method, "setup": run.setup,
              "metrics": metrics, "plan": json.loads(p.to_json())}
    path.write_text(json.dumps(record, indent=1))
    return row | metrics | {"cached": False}


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (experiment, id): metrics' mean and std over seeds (std 0 for single runs)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["experiment"], r["id"]), []).append(r)
    out = []
    for rs in groups.values():
        first = rs[0]
        entry = {k: first[k] for k in ("model", "experiment", "id", "label", "strategy", "params", "budget", "random")}
        entry["seeds"] = [r["seed"] for r in rs]
        if "error" in first:
            out.append(entry | {"error": first["error"]})
            continue
        for k in ("avg_bits", "true_bits", "ref_ppl", "kl", "top1", "ppl", "lm_acc", "quantize_s"):
            vals = [r[k] for r in rs if r.get(k) is not None]
            if vals:
                entry[k] = statistics.fmean(vals)
                entry[k + "_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        entry["plan"] = first.get("plan", {})
        out.append(entry)
    return out


def table_md(run: ModelRun, table: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """The paper-shaped table: strategy, paper and true average bits, KL, top-1, ppl [, lm-eval acc]."""
    lm = args.lm_eval_limit > 0
    head = ["experiment", "strategy", "avg bits (paper)", "true bits", "KL ×10³ ↓", "top-1 ↑", "ppl ↓"]
    head += ["lm-eval acc ↑"] if lm else []
    f = run.facts
    secs = statistics.median([e["quantize_s"] for e in table if "quantize_s" in e] or [0])
    ref_ppl = next((e["ref_ppl"] for e in table if "ref_ppl" in e), float("nan"))
    wa = f", activations int{args.act_bits} per token" if args.act_bits else ""
    lines = [f"# QuantMoE-Bench grid on `{run.tag}` ({args.method.upper()}{wa})", "", f"Machine: {machine()}", "",
             f"Model: {run.path} (sha256 {run.model_hash[:16]}), {len(f.moe_layers)} MoE blocks of {f.n_experts}"
             f" experts{', shared expert' if f.has_shared else ''}. Calibration: {args.n_calib} × {args.seq_len}"
             f" tokens of {args.calibration}; evaluation: {run.windows.shape[0]} × {args.seq_len} tokens of"
             f" WikiText-2 test (held out). Group size {GROUP_SIZE}, symmetric. Random controls (↳ rows): mean ±"
             f" std (n-1) over seeds {args.seeds}. {args.method.upper()} time per cell: median {secs:.1f} s"
             f" ({torch.get_num_threads()} thread(s)). bf16 reference: ppl {ref_ppl:.2f}"
             + (f", lm-eval acc {run.lm_acc(run.model):.3f}." if lm else "."), "",
             "| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for e in table:
        label = e["label"].replace("  ", "↳ ", 1)
        if "error" in e:
            lines.append(f"| {e['experiment']} | {label} | infeasible: {e['error'].split(':', 1)[-1].strip()} |")
            continue
        cells = [e["experiment"], label, f"{e['avg_bits']:.3f}", f"{e['true_bits']:.3f}", fmt(e, "kl", 3, 1e3),
                 fmt(e, "top1", 3), fmt(e, "ppl", 2)] + ([fmt(e, "lm_acc", 3)] if lm else [])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both bits and KL, by bits ascending."""
    order = sorted(range(len(points)), key=lambda i: points[i])
    front, best = [], float("inf")
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def plot(table: list[dict[str, Any]], title: str, path: Path) -> None:
    """True bits vs KL, one colour per experiment; random controls hollow with ±std bars and
    left off the Pareto front (they are controls, not strategies one would pick)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("the plot needs matplotlib: pip install 'moe_ao[plot]'") from e
    pts = [e for e in table if "kl" in e]
    fig, ax = plt.subplots(figsize=(9, 6))
    for i, exp in enumerate(EXPERIMENTS):
        for rand in (False, True):
            es = [e for e in pts if e["experiment"] == exp and e["random"] == rand]
            if es:
                ax.errorbar([e["true_bits"] for e in es], [e["kl"] for e in es], [e["kl_std"] for e in es], fmt="o",
                            color=plt.cm.tab20(i / len(EXPERIMENTS)), mfc="none" if rand else None, capsize=3,
                            label=exp + (" (random)" if rand else ""), ms=5, alpha=0.85)
    picks = [e for e in pts if not e["random"]]
    front = [picks[i] for i in pareto([(e["true_bits"], e["kl"]) for e in picks])]
    ax.step([e["true_bits"] for e in front], [e["kl"] for e in front], where="post", color="k", lw=1,
            label="Pareto front")
    for e in front:
        ax.annotate(e["id"], (e["true_bits"], e["kl"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set(yscale="log", xlabel="true average bits (scales and router included)", title=title,
           ylabel="KL(bf16 || quantized) per token, held-out WikiText-2")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", help="embedded name or local HF checkpoint (repeatable;"
                    " default: tiny-mixtral and tiny-qwen2-moe)")
    ap.add_argument("--calibration", default="wikitext2-valid")
    ap.add_argument("--n-calib", type=int, default=64, help="calibration windows (64 x 256 tokens by default)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=48, help="held-out WikiText-2 test windows")
    ap.add_argument("--strategies", nargs="+", help=f"experiments {EXPERIMENTS} or planner strategy names"
                    " (rows using them); default: the whole grid")
    ap.add_argument("--budgets", nargs="+", type=float, default=[2.5, 3.0])
    ap.add_argument("--kl-windows", type=int, default=16, help="calibration windows the knapsack's KL"
                    " sensitivities are measured on (GPTQ's Hessians for them use all --n-calib)")
    ap.add_argument("--est-windows", type=int, default=None, help="calibration windows the estimated KL"
                    " sensitivities take gradients on (default: all --n-calib)")
    ap.add_argument("--est-samples", type=int, default=1, help="sampled label sequences per window for the"
                    " estimate")
    ap.add_argument("--seeds", nargs="+", type=int, default=[42, 43, 44], help="seeds of the random controls")
    ap.add_argument("--method", choices=("gptq", "rtn"), default="gptq")
    ap.add_argument("--act-bits", type=int, choices=(8,), default=None,
                    help="W+A: int8 per-token activations on every quantized unit of every plan (their W+A twins);"
                         " findings go to findings_a8.md")
    ap.add_argument("--lm-eval-limit", type=int, default=0, help="documents of the local lm-eval task (0: off)")
    ap.add_argument("--out", default="benchmarks/results/paper_table", help="output prefix")
    ap.add_argument("--cache-dir", help="default: <out folder>/cache")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: fastest on a shared machine)")
    ap.add_argument("--dry-run", action="store_true", help="plan every cell and print bits; quantize nothing")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.model = args.model or ["tiny-mixtral", "tiny-qwen2-moe"]
    return args


def run_model(name: str, args: argparse.Namespace, cache_dir: Path) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """All selected cells of one model; writes its markdown, JSON and PNG; returns (table, counts)."""
    t0 = time.perf_counter()
    run = ModelRun(name, args, cache_dir)
    want = args.strategies  # an experiment name selects its rows; another name, the rows using that strategy
    cells = [c for c in grid(run.facts, run.units, args.seeds, args.budgets) if want is None
             or c.experiment in want or (c.strategy in want and c.strategy not in EXPERIMENTS)]
    rows, counts = [], {"cells": len(cells), "ran": 0, "cached": 0, "infeasible": 0}
    achieved: dict[str, tuple[float, float | None]] = {}
    for i, cell in enumerate(cells, 1):
        t = time.perf_counter()
        row = run_cell(run, cell, cache_dir, args.dry_run, achieved)
        rows.append(row)
        if "avg_bits" in row and not cell.random:
            achieved[cell.id] = (row["avg_bits"], row.get("kl"))
        state = ("infeasible" if "error" in row else "cached" if row.get("cached")
                 else "planned" if args.dry_run else "ran")
        counts[state] = counts.get(state, 0) + 1
        kl = f"KL {row['kl']:.4f}" if "kl" in row else row.get("error", "")[:90]
        logger.info("[%s %d/%d] %-45s seed %-3d %s %.3f b  %s  (%.1f s)", run.tag, i, len(cells),
                    cell.label.strip(), cell.seed, state, row.get("avg_bits", float("nan")), kl,
                    time.perf_counter() - t)
    table = aggregate(rows)
    out = Path(f"{args.out}_{run.tag}")
    if not args.dry_run:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".md").write_text(table_md(run, table, args) + _command_line(args))
        out.with_suffix(".json").write_text(json.dumps(
            {"model": run.tag, "model_hash": run.model_hash, "machine": machine(), "setup": run.setup,
             "method": args.method, "seeds": args.seeds, "seconds": time.perf_counter() - t0, "rows": rows,
             "table": table}, indent=1, default=str))
        plot(table, f"{run.tag}: true bits vs KL ({args.method.upper()})", out.with_suffix(".png"))
    counts["seconds"] = time.perf_counter() - t0
    logger.info("%s done in %.0f s: %s", run.tag, counts["seconds"], counts)
    return table, counts


def _command_line(args: argparse.Namespace) -> str:
    return f"\nCommand: `{' '.join(['python benchmarks/paper_table.py', *args.argv])}`\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the grid on every model and writes the tables and findings.

    Returns:
        {"tables": model -> aggregated rows, "counts": model -> {cells, ran, cached, infeasible, seconds}}.
    """
    args = parse_args(argv)
    cache_dir = Path(args.cache_dir) if args.cache_dir else Path(args.out).parent / "cache"
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        tables, counts = {}, {}
        for name in args.model:
            table, count = run_model(name, args, cache_dir)
            tag = table[0]["model"] if table else name
            tables[tag], counts[tag] = table, count
    finally:
        torch.set_num_threads(threads)
    if not args.dry_run:
        text = findings_md(tables, args) + _command_line(args)
        name = f"findings_a{args.act_bits}.md" if args.act_bits else "findings.md"
        (Path(args.out).parent / name).write_text(text)
    return {"tables": tables, "counts": counts}


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    main()
