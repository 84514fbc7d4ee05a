"""Budgeted bit allocation as a multiple-choice knapsack (beyond the paper).

Each unit i picks one width b from its options; picking costs ``c_ib = b * params_i``
bits and loses ``l_ib``, a sensitivity (see :mod:`moe_ao.planner.scorers`): the
measured output KL of quantizing unit i alone at b bits (the default when the Profile
holds one; on both embedded models it cut the held-out KL to 0.2-0.3x the best paper
heuristic's at the same bits), the Hessian-weighted RTN error (one profiling pass; it
misranks units of different kinds and depths), or any table supplied from outside.
The planner solves

    minimise Σ_i l_i,b(i)   subject to   Σ_i c_i,b(i) <= budget_bits * Σ_i params_i

Solvers (``method``):

- ``dp``: exact dynamic programming over the budget in units of g = gcd of all costs
  and the capacity. Exact because every cost is a multiple of g; O(n · C/g · m) time.
- ``lagrangian``: bisection on λ of the relaxation ``min Σ l + λ c`` (each unit picks
  independently), then a greedy fill of the leftover budget by best loss-per-bit
  moves. Reports the Lagrangian dual bound, a lower bound on the optimum, so
  ``gap = objective - dual_bound`` bounds the distance to optimal. In practice the gap
  is at most one unit's step, tiny next to the total over hundreds of units.
- ``auto``: ``dp`` when the table has at most ``max_states`` cells, else ``lagrangian``.

``greedy`` (from the cheapest options, best loss-per-bit moves while they fit) is the
baseline the tests compare against.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import reduce
from typing import Any

import torch

from moe_ao.choices import Choice
from moe_ao.planner.budget import accounting_weights, check_feasible
from moe_ao.planner.context import Context, check_bits
from moe_ao.planner.scorers import sensitivity_table
from moe_ao.planner.serving import get_target, tie_groups
from moe_ao.unit import Unit


class Sensitivity(Choice):
    """Where the knapsack's per-unit losses come from (see :func:`knapsack`)."""

    AUTO = "auto"
    KL = "kl"
    ESTIMATE = "estimate"
    HESSIAN = "hessian"


METHODS = ("auto", "dp", "lagrangian", "greedy")
SENSITIVITIES = tuple(s.value for s in Sensitivity)
MAX_DP_STATES = 50_000_000  # n_units x (capacity / gcd + 1) cells: ~50 MB of choices


@dataclass(frozen=True)
class Solution:
    """A knapsack solution.

    Attributes:
        choice: per unit, the index of the chosen option.
        objective: Σ loss of the choice.
        cost: Σ cost of the choice.
        method: the solver that produced it.
        dual_bound: a lower bound on the optimum (the objective itself for ``dp``;
            None for ``greedy``, which proves nothing).
    """

    choice: list[int]
    objective: float
    cost: int
    method: str
    dual_bound: float | None

    @property
    def gap(self) -> float | None:
        """objective - dual_bound (>= 0; 0 means proven optimal; None without a bound)."""
        return None if self.dual_bound is None else max(0.0, self.objective - self.dual_bound)


def _tables(losses: Sequence[Sequence[float]], costs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded [n, m] loss (inf where no option) and cost tensors."""
    if len(losses) != len(costs) or any(len(a) != len(b) or not a for a, b in zip(losses, costs)):
        raise ValueError("losses and costs must give every unit the same, non-empty list of options")
    m = max(len(a) for a in losses)
    L = torch.full((len(losses), m), math.inf, dtype=torch.float64)
    C = torch.zeros((len(losses), m), dtype=torch.int64)
    for i, (a, b) in enumerate(zip(losses, costs)):
        L[i, : len(a)] = torch.tensor(a, dtype=torch.float64)
        C[i, : len(b)] = torch.tensor(b, dtype=torch.int64)
    return L, C


def _solution(L: torch.Tensor, C: torch.Tensor, choice: torch.Tensor, method: str, bound: float | None) -> Solution:
    idx = torch.arange(L.shape[0])
    obj = float(L[idx, choice].sum())
    return Solution(choice.tolist(), obj, int(C[idx, choice].sum()), method, bound)


def _check_capacity(L: torch.Tensor, C: torch.Tensor, capacity: int) -> None:
    cheapest = int(torch.where(torch.isinf(L), torch.iinfo(torch.int64).max, C).amin(1).sum())
    if cheapest > capacity:
        raise ValueError(f"capacity={capacity} is below the cheapest assignment's cost {cheapest}")


def solve_dp(losses: Sequence[Sequence[float]], costs: Sequence[Sequence[int]], capacity: int) -> Solution:
    """Exact minimum by dynamic programming over the budget (see module doc)."""
    L, C = _tables(losses, costs)
    _check_capacity(L, C, capacity)
    g = reduce(math.gcd, [int(c) for c in C.flatten().tolist() if c] + [capacity]) or 1
    W, cap = C // g, capacity // g  # [n, m] costs and the capacity in units of g
    n, m = L.shape
    best = torch.zeros(cap + 1, dtype=torch.float64)  # best[c]: min loss of units so far with cost <= c
    picks = torch.zeros((n, cap + 1), dtype=torch.int8)
    for i in range(n):
        cand = torch.full((m, cap + 1), math.inf, dtype=torch.float64)
        for j in range(m):
            w = int(W[i, j])
            if math.isfinite(L[i, j]) and w <= cap:
                cand[j, w:] = best[: cap + 1 - w] + L[i, j]
        best, picks[i] = cand.min(0)
    choice = torch.zeros(n, dtype=torch.int64)
    c = cap
    for i in range(n - 1, -1, -1):
        choice[i] = int(picks[i, c])
        c -= int(W[i, choice[i]])
    return _solution(L, C, choice, "dp", float(L[torch.arange(n), choice].sum()))


def _fill(L: torch.Tensor, C: torch.Tensor, choice: torch.Tensor, capacity: int) -> torch.Tensor:
    """Greedy: repeatedly the move with the best loss decrease per extra bit that fits."""
    idx = torch.arange(L.shape[0])
    choice = choice.clone()
    while True:
        slack = capacity - int(C[idx, choice].sum())
        dl = L[idx, choice].unsqueeze(1) - L  # [n, m] loss decrease of moving unit i to option j
        dc = C - C[idx, choice].unsqueeze(1)  # [n, m] extra cost
        ok = (dl > 0) & (dc <= slack) & torch.isfinite(L)
        if not ok.any():
            return choice
        # Free improvements (dc <= 0) first, then the best ratio; ties: first unit, option.
        ratio = torch.where(dc > 0, dl / dc.clamp_min(1).double(), math.inf)
        ratio = torch.where(ok, ratio, -math.inf)
        flat = int(torch.argmax(ratio))
        choice[flat // L.shape[1]] = flat % L.shape[1]


def solve_greedy(losses: Sequence[Sequence[float]], costs: Sequence[Sequence[int]], capacity: int) -> Solution:
    """Baseline: cheapest options, then :func:`_fill`. No optimality guarantee."""
    L, C = _tables(losses, costs)
    _check_capacity(L, C, capacity)
    start = torch.where(torch.isinf(L), torch.iinfo(torch.int64).max, C).argmin(1)
    return _solution(L, C, _fill(L, C, start, capacity), "greedy", None)


def _relaxed(L: torch.Tensor, C: torch.Tensor, lam: float) -> tuple[torch.Tensor, float]:
    """Per-unit argmin of l + λc (ties: cheaper) and Σ min (l + λc)."""
    total = L + lam * C.double()  # [n, m]
    key = torch.where(torch.isinf(total), math.inf, total)
    best = key.amin(1, keepdim=True)
    cheap = torch.where(key <= best, C, torch.iinfo(torch.int64).max)  # cheapest among the minima
    return cheap.argmin(1), float(best.sum())


def solve_lagrangian(
    losses: Sequence[Sequence[float]], costs: Sequence[Sequence[int]], capacity: int, iters: int = 100
) -> Solution:
    """Lagrangian relaxation + bisection on λ + greedy fill (see module doc)."""
    L, C = _tables(losses, costs)
    _check_capacity(L, C, capacity)
    idx = torch.arange(L.shape[0])
    cost_of = lambda ch: int(C[idx, ch].sum())  # noqa: E731
    choice, value = _relaxed(L, C, 0.0)
    bound = value
    if cost_of(choice) > capacity:
        lo, hi = 0.0, 1.0
        while cost_of(_relaxed(L, C, hi)[0]) > capacity:
            hi *= 2
        for _ in range(iters):
            mid = (lo + hi) / 2
            ch, value = _relaxed(L, C, mid)
            bound = max(bound, value - mid * capacity)
            lo, hi = (mid, hi) if cost_of(ch) > capacity else (lo, mid)
        choice, value = _relaxed(L, C, hi)
        bound = max(bound, value - hi * capacity)
    return _solution(L, C, _fill(L, C, choice, capacity), "lagrangian", bound)


def solve(
    losses: Sequence[Sequence[float]],
    costs: Sequence[Sequence[int]],
    capacity: int,
    method: str = "auto",
    max_states: int = MAX_DP_STATES,
) -> Solution:
    """Minimises Σ loss subject to Σ cost <= capacity, one option per unit.

    Args:
        losses: per unit, the loss of each option.
        costs: per unit, the integer cost of each option (same lengths).
        capacity: the integer budget.
        method: one of METHODS.
        max_states: ``auto`` uses ``dp`` up to this many table cells.

    Returns:
        The Solution.

    Raises:
        ValueError: unknown method, malformed tables, or a capacity below the cheapest
            assignment.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r}; allowed: {METHODS}")
    if method == "auto":
        costs_flat = [int(c) for row in costs for c in row if c] + [capacity]
        g = reduce(math.gcd, costs_flat) or 1
        method = "dp" if len(costs) * (capacity // g + 1) <= max_states else "lagrangian"
    return {"dp": solve_dp, "lagrangian": solve_lagrangian, "greedy": solve_greedy}[method](losses, costs, capacity)


def _external_table(table: Mapping[str, Mapping[Any, float]], names: list[str]) -> dict[str, dict[int, float]]:
    missing = [n for n in names if n not in table]
    if missing:
        raise ValueError(f"sensitivities lack {len(missing)} planned units, e.g. {missing[:3]}")
    return {n: {int(b): float(v) for b, v in table[n].items()} for n in names}


def _profile_table(ctx: Context, free: list[Unit], estimated: bool) -> tuple[dict[str, dict[int, float]],
                                                                           dict[str, Any]]:
    """The Profile's measured (or estimated) KL table, checked to match the plan's group sizes and symmetry."""
    stats = ctx.stats
    table = None if stats is None else stats.sensitivity_estimates if estimated else stats.sensitivities
    what = "estimated" if estimated else "measured"
    if not table:
        call = "estimate_sensitivities" if estimated else "measure_sensitivities"
        raise ValueError(f"sensitivity={'estimate' if estimated else 'kl'!r} needs a Profile with {what}"
                         f" sensitivities; pass stats=moe_ao.planner.{call}(model, calibration, group_size=...)")
    setup = stats.estimate_setup if estimated else stats.sensitivity_setup
    if setup.get("symmetric", ctx.symmetric) != ctx.symmetric:
        raise ValueError(f"the profile's sensitivities were {what} with symmetric={setup['symmetric']},"
                         f" the plan asks for symmetric={ctx.symmetric}; {what[:-1]} them again")
    sizes = setup.get("group_sizes", {})
    wrong = [u.name for u in free if u.name in sizes and sizes[u.name] != ctx.group_sizes[u.name]]
    if wrong:
        u = wrong[0]
        raise ValueError(f"{u}: the profile's sensitivities were {what} at group_size={sizes[u]}, the plan uses"
                         f" {ctx.group_sizes[u]} ({len(wrong)} units differ); plan with that group size or"
                         f" {what[:-1]} again")
    if estimated:
        info = {"sensitivity": f"estimate-{setup.get('estimator', 'unknown')}-{setup.get('quantizer', 'unknown')}",
                "estimate_tokens": setup.get("tokens")}
    else:
        info = {"sensitivity": f"kl-{setup.get('quantizer', 'unknown')}", "kl_tokens": setup.get("kl_tokens")}
    return _external_table(table, [u.name for u in free]), info


def resolve_sensitivity(sensitivity: str, stats: Any) -> str:
    """``auto`` -> ``kl`` when the Profile holds a measured table, else ``estimate`` when it holds an
    estimated one, else ``hessian``; any other choice is returned checked."""
    sensitivity = Sensitivity.parse(sensitivity, "sensitivity")
    if sensitivity != "auto":
        return sensitivity
    if stats is not None and stats.sensitivities:
        return "kl"
    if stats is not None and stats.sensitivity_estimates:
        return "estimate"
    return "hessian"


SOURCES = {"kl": "measured", "estimate": "estimate", "hessian": "hessian-proxy"}


def knapsack(
    ctx: Context,
    budget_bits: float | None = None,
    bits: Sequence[int] = (2, 3, 4, 8),
    kinds: Sequence[str] | None = None,
    sensitivities: Mapping[str, Mapping[Any, float]] | None = None,
    sensitivity: str = "auto",
    hessian: str = "full",
    scale_by_frequency: bool = True,
    method: str = "auto",
    serving: str | None = None,
) -> tuple[dict[str, int], dict[str, Any]]:
    """Bits per unit minimising Σ sensitivity within the budget.

    Args:
        ctx: planning context (model weights needed unless ``sensitivities`` is given).
        budget_bits: paper-accounting average bits not to exceed.
        bits: the width options.
        kinds: unit kinds to optimise (default: every planned kind); the others keep
            their base bits and their cost comes off the budget.
        sensitivities: ``{unit name: {bits: loss}}`` from outside; overrides
            ``sensitivity``.
        sensitivity: ``kl``: the measured output KL of each unit alone, from the
            Profile (:func:`moe_ao.planner.measure_sensitivities`); ``hessian``: the
            Hessian-weighted RTN error proxy
            (:func:`moe_ao.planner.scorers.sensitivity_table`, needs only
            ``profile(..., hessians=True)``); ``auto``: ``kl`` when the Profile has a
            measured table, else ``hessian``.
        hessian: ``full`` or ``diag`` Hessian weighting of the RTN error (proxy only).
        scale_by_frequency: scale expert losses by their token share (proxy only).
        method: knapsack solver (see :func:`solve`).
        serving: an engine's constraint (:mod:`moe_ao.planner.serving`): the units it
            ties share one width (one knapsack item, its losses summed) and only the
            widths it runs are options.

    Returns:
        (unit name -> bits, JSON-ready meta).

    Raises:
        ValueError: no budget, an infeasible budget (with the feasible range), bad
            options, kinds or sensitivity, a sensitivity table missing units, or a
            measured table taken at other group sizes or symmetry.
    """
    if budget_bits is None:
        raise ValueError("the knapsack optimizer needs budget_bits (e.g. 2.5)")
    options = sorted({check_bits(b) for b in bits})
    planned_kinds = sorted({u.kind for u in ctx.units})
    kinds = planned_kinds if kinds is None else list(kinds)
    if not set(kinds) <= set(planned_kinds):
        raise ValueError(f"kinds={kinds}: allowed are the planned kinds {planned_kinds}")
    free = [u for u in ctx.units if u.kind in kinds and u.kind != "router"]
    weights = accounting_weights(ctx.units)
    requested = sensitivity
    sensitivity = resolve_sensitivity(sensitivity, ctx.stats)
    if sensitivities is not None:
        table, info = _external_table(sensitivities, [u.name for u in free]), {"sensitivity": "external"}
        info["sensitivity_source"] = "external"
    elif sensitivity in ("kl", "estimate"):
        table, info = _profile_table(ctx, free, estimated=sensitivity == "estimate")
    else:
        W = {u.name: ctx.weight(u) for u in free}
        table, info = sensitivity_table(
            W, free, ctx.stats, ctx.group_sizes, options, ctx.symmetric, hessian, scale_by_frequency
        )
        kind = "frobenius" if info["fallback_units"] == len(free) else f"{hessian}-hessian"
        info["sensitivity"] = f"rtn-{kind}" + ("+frequency" if info["frequency_scaled_units"] else "")
    info.setdefault("sensitivity_source", SOURCES[sensitivity])
    info["sensitivity_requested"] = "external" if sensitivities is not None else str(requested)
    groups = [[u] for u in free] if serving is None else tie_groups(free, get_target(serving))
    target = None if serving is None else get_target(serving)
    opts = [[b for b in options if all(b in table[u.name] and (target is None or b in target.widths(u))
                                       for u in g)] for g in groups]
    empty = [g[0].name for g, o in zip(groups, opts) if not o]
    if empty:
        raise ValueError(f"sensitivities give none of the options {options} for {empty[:3]}"
                         + ("" if target is None else f" within what {target.engine} runs"))
    group_weight = [sum(weights[u.name] for u in g) for g in groups]
    free_names = {u.name for u in free}
    fixed = {n: b for n, b in ctx.base.items() if n not in free_names}
    fixed_cost = sum(b * weights[n] for n, b in fixed.items())
    total = sum(weights[n] for n in ctx.base)
    cheapest = sum(o[0] * w for o, w in zip(opts, group_weight))
    low = (fixed_cost + cheapest) / total
    high = (fixed_cost + sum(o[-1] * w for o, w in zip(opts, group_weight))) / total
    check_feasible(budget_bits, low, high, "knapsack")
    capacity = max(0, math.floor(budget_bits * total + 1e-6) - fixed_cost)
    capacity = max(capacity, cheapest)  # budget == low, rounding
    losses = [[sum(table[u.name][b] for u in g) for b in o] for g, o in zip(groups, opts)]
    costs = [[b * w for b in o] for o, w in zip(opts, group_weight)]
    sol = solve(losses, costs, capacity, method)
    out = dict(ctx.base) | {u.name: o[j] for g, o, j in zip(groups, opts, sol.choice) for u in g}
    meta = info | {"method": sol.method, "objective": sol.objective, "dual_bound": sol.dual_bound,
                   "gap": sol.gap, "optimized_units": len(free), "options": options, "serving": serving,
                   "tied_groups": len(groups)}
    return out, meta
