"""Human views of a plan: a per-layer markdown table and a layer x expert heatmap."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from moe_ao.discovery import as_units
from moe_ao.plans import Plan
from moe_ao.unit import Unit

COLUMN_KINDS = ("attention", "expert", "shared_expert", "dense_mlp")


def _mean_bits(plan: Plan, units: list[Unit]) -> float | None:
    """Param-weighted mean bits of the planned ``units`` (None when none is planned)."""
    planned = [u for u in units if u.name in plan]
    den = sum(u.numel for u in planned)
    return sum(plan[u.name].bits * u.numel for u in planned) / den if den else None


def _fmt(bits: float | None) -> str:
    if bits is None:
        return "—"
    return str(int(bits)) if float(bits).is_integer() else f"{bits:.2f}"


def summarize(plan: Plan, units: nn.Module | Iterable[Unit]) -> str:
    """A markdown table: per layer, attention / mean expert / shared / dense bits and
    how many units sit at each width, under a line with the strategy and average bits.

    Args:
        plan: the plan.
        units: the model or its unit list.

    Returns:
        The markdown text.
    """
    all_units = as_units(units)
    widths = sorted({plan[u.name].bits for u in all_units if u.name in plan})
    rows: dict[Any, list[Unit]] = {}
    for u in all_units:
        rows.setdefault(u.layer if u.layer is not None else "—", []).append(u)
    meta = plan.meta
    head = (f"strategy `{meta.get('strategy', '?')}`: {plan.avg_bits(all_units):.3f} average bits"
            f" (paper accounting), {plan.true_avg_bits(all_units):.3f} with scales")
    cols = ["layer", "attention", "experts (mean)", "shared", "dense MLP"] + [f"{b}-bit units" for b in widths]
    lines = [head, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    order = sorted(k for k in rows if k != "—") + (["—"] if "—" in rows else [])
    for key in order:
        us = rows[key]
        if not any(u.name in plan for u in us):
            continue
        kind = {k: _mean_bits(plan, [u for u in us if u.kind == k]) for k in COLUMN_KINDS}
        counts = [sum(1 for u in us if u.name in plan and plan[u.name].bits == b) for b in widths]
        cells = [str(key)] + [_fmt(v) for v in kind.values()] + [str(c) for c in counts]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def expert_grid(plan: Plan, units: nn.Module | Iterable[Unit]) -> tuple[list[int], list[list[float | None]]]:
    """(layers, grid) with grid[i][e] = mean bits of expert e's linears in layers[i]."""
    groups: dict[tuple[int, int], list[Unit]] = {}
    for u in as_units(units):
        if u.kind == "expert":
            groups.setdefault((u.layer, u.expert), []).append(u)
    layers = sorted({layer for layer, _ in groups})
    n_experts = max((e for _, e in groups), default=-1) + 1
    grid = [[_mean_bits(plan, groups.get((layer, e), [])) for e in range(n_experts)] for layer in layers]
    return layers, grid


def heatmap(plan: Plan, units: nn.Module | Iterable[Unit], path: str) -> str:
    """Writes a PNG heatmap, layer x routed expert, coloured by each expert's mean bits.

    Args:
        plan: the plan.
        units: the model or its unit list.
        path: where the PNG goes.

    Returns:
        ``path``.

    Raises:
        ImportError: matplotlib is not installed.
        ValueError: the model has no routed experts.
    """
    try:
        from matplotlib import colormaps
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("heatmap needs matplotlib: pip install 'moe_ao[plot]' (or matplotlib)") from e
    all_units = as_units(units)
    layers, grid = expert_grid(plan, all_units)
    if not layers:
        raise ValueError("the model has no routed experts: nothing to draw")
    values = [[float("nan") if v is None else v for v in row] for row in grid]
    n_experts = len(values[0])
    fig = Figure(figsize=(min(16, 2.5 + 0.3 * n_experts), min(12, 1.5 + 0.3 * len(layers))))
    ax = fig.add_subplot()
    # Continuous colours: an expert with only some linears raised shows its true mean.
    cmap = colormaps["viridis"].with_extremes(bad="#dddddd")  # grey: not planned
    im = ax.imshow(values, cmap=cmap, vmin=2, vmax=8, aspect="auto", interpolation="nearest")
    if n_experts * len(layers) <= 512:  # small enough to read the numbers
        for i, row in enumerate(grid):
            for e, v in enumerate(row):
                if v is not None:
                    ax.text(e, i, _fmt(v), ha="center", va="center", fontsize=7, color="white" if v < 5 else "black")
    if n_experts <= 64:
        ax.set_xticks(range(n_experts))
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    ax.set_title(f"{plan.meta.get('strategy', 'plan')}: {plan.avg_bits(all_units):.2f} avg bits")
    fig.colorbar(im, ax=ax, label="mean bits over the expert's linears")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path
