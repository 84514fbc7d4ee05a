"""From a strategy's ranking to bits: stacking upgrades and fitting a bit budget.

A rule (see :mod:`moe_ao.planner.heuristics`) proposes an ordered list of
:class:`Upgrade` records, best first, and how many of them its own parameters pick
(``Rule.default``). Without a budget the planner applies that many. With a budget it
walks the same ranking one *unit* at a time (an upgrade of a whole expert is three
steps: its linears in model order) and stops at the prefix whose average bits is
closest to the budget, so the error is at most one unit's share of bits.

Average bits follow the paper: Σ bits·params / Σ params over the planned linears,
routers excluded (see :meth:`moe_ao.plans.Plan.avg_bits`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from moe_ao.unit import Unit


@dataclass(frozen=True)
class Upgrade:
    """Raise a group of units to ``bits`` (never lowers a unit).

    Attributes:
        names: the units raised together (e.g. the three linears of one expert).
        bits: their new width.
        label: human-readable, e.g. ``layer 3 expert 5``.
        score: the rule's score for this group (None for random controls).
    """

    names: tuple[str, ...]
    bits: int
    label: str
    score: float | None = None


@dataclass
class Rule:
    """A rule's proposal.

    Attributes:
        upgrades: ranked upgrades, the most important first.
        default: how many leading upgrades the rule's parameters select.
        meta: JSON-ready provenance (scores, selected groups, ...).
        base: replaces the context's base bits when set (``uniform``).
    """

    upgrades: list[Upgrade]
    default: int
    meta: dict[str, Any] = field(default_factory=dict)
    base: dict[str, int] | None = None

    def __post_init__(self) -> None:
        assert 0 <= self.default <= len(self.upgrades), f"{self.default=} {len(self.upgrades)=}"


def accounting_weights(units: Sequence[Unit]) -> dict[str, int]:
    """Unit name -> params counted in the paper's average (routers count 0)."""
    return {u.name: (0 if u.kind == "router" else u.numel) for u in units}


def apply(base: Mapping[str, int], upgrades: Sequence[Upgrade]) -> dict[str, int]:
    """Bits after stacking ``upgrades`` on ``base``: a unit's bits = max over the rules."""
    bits = dict(base)
    for up in upgrades:
        for name in up.names:
            assert name in bits, f"{name=} is not planned"
            bits[name] = max(bits[name], up.bits)
    return bits


def average(bits: Mapping[str, int], weights: Mapping[str, int]) -> float:
    """Σ bits·params / Σ params."""
    den = sum(weights[n] for n in bits)
    if den == 0:
        raise ValueError("no planned unit counts towards average bits (only routers planned?)")
    return sum(b * weights[n] for n, b in bits.items()) / den


def unit_steps(base: Mapping[str, int], upgrades: Sequence[Upgrade]) -> list[Upgrade]:
    """The ranking one unit at a time, without steps that change nothing."""
    current = dict(base)
    steps = []
    for up in upgrades:
        for name in up.names:
            if up.bits > current[name]:
                steps.append(Upgrade((name,), up.bits, up.label, up.score))
                current[name] = up.bits
    return steps


def prefix_averages(base: Mapping[str, int], upgrades: Sequence[Upgrade], weights: Mapping[str, int]) -> list[float]:
    """Average bits after the first n upgrades, for n = 0 .. len(upgrades)."""
    current = dict(base)
    den = sum(weights[n] for n in current)
    if den == 0:
        raise ValueError("no planned unit counts towards average bits (only routers planned?)")
    num = sum(b * weights[n] for n, b in current.items())
    out = [num / den]
    for up in upgrades:
        for name in up.names:
            if up.bits > current[name]:
                num += (up.bits - current[name]) * weights[name]
                current[name] = up.bits
        out.append(num / den)
    return out


def closest_prefix(averages: Sequence[float], target: float) -> int:
    """The n whose average is closest to ``target`` (the smallest n on ties)."""
    return min(range(len(averages)), key=lambda n: (abs(averages[n] - target), n))


def check_feasible(budget_bits: float, low: float, high: float, strategy: str) -> None:
    """Raises ValueError with the feasible range when ``budget_bits`` is outside it."""
    eps = 1e-9
    if not (low - eps <= budget_bits <= high + eps):
        raise ValueError(
            f"budget_bits={budget_bits} is infeasible for strategy {strategy!r}: its feasible range is"
            f" [{low:.4f}, {high:.4f}] average bits (paper accounting, routers excluded)"
        )


def fit_budget(
    base: Mapping[str, int],
    upgrades: Sequence[Upgrade],
    weights: Mapping[str, int],
    budget_bits: float,
    strategy: str,
) -> tuple[dict[str, int], dict[str, Any]]:
    """Raises units along the ranking until the average is closest to the budget.

    Args:
        base: unit name -> starting bits.
        upgrades: the strategy's full ranking.
        weights: unit name -> params counted (see :func:`accounting_weights`).
        budget_bits: target paper-accounting average bits.
        strategy: name for error messages.

    Returns:
        (unit name -> bits, {"raised_units": n, "feasible_range": [lo, hi]}).

    Raises:
        ValueError: the budget is below the base or above the fully raised ranking.
    """
    steps = unit_steps(base, upgrades)
    averages = prefix_averages(base, steps, weights)
    check_feasible(budget_bits, averages[0], averages[-1], strategy)
    n = closest_prefix(averages, budget_bits)
    info = {"raised_units": n, "feasible_range": [averages[0], averages[-1]]}
    return apply(base, steps[:n]), info
