"""``plan(model, strategy, budget_bits, stats, seed, **params) -> Plan``: the registry.

Every strategy is a named rule (see :mod:`moe_ao.planner.heuristics`) plus the base
it starts from, or the knapsack optimizer. Without a budget a rule's parameters
decide the plan; with one, the planner walks the rule's ranking unit by unit to the
closest average bits (:func:`moe_ao.planner.budget.fit_budget`). The plan's meta
records the strategy, every parameter (defaults filled in), the seed, the base, the
budget, and both the paper's and the true average bits.
"""

from __future__ import annotations

import inspect
import json
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from moe_ao.discovery import as_units
from moe_ao.planner import heuristics as H
from moe_ao.planner.budget import accounting_weights, apply, fit_budget
from moe_ao.planner.combine import combination
from moe_ao.planner.context import Context, bound_params, group_sizes, resolve_base
from moe_ao.planner.optimizer import knapsack
from moe_ao.planner.serving import check_plan, get_target, lift
from moe_ao.plans import Plan, QuantSpec
from moe_ao.profile_stats import Profile
from moe_ao.unit import Unit


@dataclass(frozen=True)
class Strategy:
    """A registered strategy.

    Attributes:
        name: registry key.
        fn: the rule (ctx, **params) -> Rule, or the optimizer.
        base: default base name (see :data:`moe_ao.planner.context.BASES`).
        summary: one line for ``--help`` listings.
        optimizer: True for the knapsack (needs a budget, returns bits directly).
    """

    name: str
    fn: Callable[..., Any]
    base: str
    summary: str
    optimizer: bool = False


_S = Strategy
STRATEGIES: dict[str, Strategy] = {s.name: s for s in (
    _S("uniform", H.uniform, "experts-low", "every planned unit at `bits`"),
    _S("base", H.base, "experts-low", "routed experts 2-bit, attention/shared/dense 4-bit"),
    _S("attention", H.attention, "uniform-low", "attention 2 -> `bits` (4 or 8), everything else 2"),
    _S("attention-random", H.attention_random, "uniform-low", "control: attention's bits on random experts"),
    _S("shared", H.shared, "uniform-low", "shared experts 2 -> `bits`"),
    _S("frequency", H.frequency, "experts-low", "per block the top-k most routed experts at 4 (+Freq)"),
    _S("frequency-global", H.frequency_global, "experts-low", "the top-n experts by routing share, any block"),
    _S("frequency-random", H.frequency_random, "experts-low", "control: k random experts per block"),
    _S("first-k", H.first_k, "experts-low", "all FFN units of blocks 0..k-1 at 4 (+FirstL)"),
    _S("last-k", H.last_k, "experts-low", "all FFN units of the last k blocks at 4"),
    _S("blocks-random", H.blocks_random, "experts-low", "control: k random MoE blocks at 4"),
    _S("linear-type", H.linear_type, "experts-low", "every expert's `proj` linear at 4"),
    _S("outlier", H.outlier, "experts-low", "top `fraction` expert linears by outlier score at 4 (+LinearOSP)"),
    _S("outlier-random", H.outlier_random, "experts-low", "control: a random `fraction` of expert linears"),
    _S("layerisp", H.layerisp, "experts-low", "k blocks of lowest predicted similarity at 4 (+LayerISP)"),
    _S("combination", combination, "uniform-low", "stack of +Attn+Shared+Freq+FirstL+LinearOSP+LayerISP"),
    _S("knapsack", knapsack, "experts-low", "minimise Σ sensitivity within the budget (needs budget)", True),
)}
ALIASES = {"optimizer": "knapsack", "experts-low": "base", "block-predictor": "layerisp"}
_NOT_PARAMS = ("budget_bits",)


def strategy_names() -> list[str]:
    """Registered names and aliases, sorted."""
    return sorted([*STRATEGIES, *ALIASES])


def get_strategy(name: str) -> Strategy:
    """The registered strategy, by name or alias.

    Raises:
        ValueError: unknown name (lists the allowed ones).
    """
    key = ALIASES.get(name, name)
    if key not in STRATEGIES:
        raise ValueError(f"strategy={name!r} is not known; allowed: {strategy_names()}")
    return STRATEGIES[key]


def strategy_help() -> str:
    """One line per strategy (``name  summary [params]``), for a CLI's ``--help``."""
    lines = []
    for name, spec in STRATEGIES.items():
        params = [p for p in list(inspect.signature(spec.fn).parameters)[1:] if p not in _NOT_PARAMS]
        lines.append(f"{name:17s} {spec.summary} [{', '.join(params)}]")
    return "\n".join(lines)


def parse_params(items: Iterable[str]) -> dict[str, Any]:
    """``["k=2", "proj=down_proj", "bits=[2,4]"]`` -> ``{"k": 2, "proj": "down_proj", "bits": [2, 4]}``.

    Values are read as JSON when they parse (numbers, lists, objects, true/false/null),
    else kept as strings: the form a CLI's repeated ``--param KEY=VALUE`` gives.

    Raises:
        ValueError: an item without ``=``.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"parameter {item!r} is not KEY=VALUE (e.g. k=2, proj=down_proj, rules=+Attn+Freq)")
        try:
            out[key.strip()] = json.loads(text)
        except json.JSONDecodeError:
            out[key.strip()] = text
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _meta_params(params: dict[str, Any]) -> dict[str, Any]:
    out = dict(params)
    if out.get("sensitivities") is not None:  # can be huge: record its size, not its content
        out["sensitivities"] = f"external table of {len(out['sensitivities'])} units"
    return _jsonable(out)


def _default_group_size(sizes: Mapping[str, int]) -> int:
    counts = Counter(sizes.values())
    return max(counts, key=lambda g: (counts[g], g))


def plan(
    model: nn.Module | Iterable[Unit],
    strategy: str,
    budget_bits: float | None = None,
    stats: Profile | None = None,
    seed: int = 0,
    *,
    group_size: int | str = 128,
    symmetric: bool = True,
    base: str | Mapping[str, int] | None = None,
    serving: str | None = None,
    **params: Any,
) -> Plan:
    """Builds a Plan with a named strategy.

    Args:
        model: the model, or its unit list (strategies that read weights need the model).
        strategy: a name from :func:`strategy_names`.
        budget_bits: target paper-accounting average bits; None: the strategy's own
            parameters decide (the knapsack requires a budget).
        stats: calibration Profile, for data-driven strategies.
        seed: seed of random controls and the block predictor.
        group_size: an int dividing every planned unit's in_features, or ``"auto"``
            (per unit, the largest of 128, 64, 32 that divides it).
        symmetric: symmetric quantization.
        base: the starting bits, a base name or a mapping kind -> bits (default: the
            strategy's; kinds absent from it are not planned).
        serving: plan only what an engine runs (``"vllm"``, ``"vllm-humming"``,
            ``"llama.cpp"``; see :mod:`moe_ao.planner.serving`): the knapsack optimises
            over tied groups and allowed widths; a rule's bits are lifted to them.
        **params: the strategy's parameters (e.g. ``k=2``, ``fraction=0.25``).

    Returns:
        The Plan, validated against the model's units. ``meta`` holds strategy,
        params (defaults filled in), seed, base, group_size, budget_bits, details (the
        rule's scores / selections, and with a budget the feasible range and how many
        units were raised), avg_bits (paper accounting) and true_avg_bits (with scales).

    Raises:
        ValueError: unknown strategy or parameter, missing statistics or weights, a
            group size not dividing some unit, or an infeasible budget (with the range).
    """
    spec = get_strategy(strategy)
    all_units = as_units(model)
    base_bits = resolve_base(spec.base if base is None else base)
    planned = [u for u in all_units if u.kind in base_bits]
    if not planned:
        raise ValueError(f"the model has no units of the planned kinds {sorted(base_bits)}")
    sizes = group_sizes(planned, group_size)
    module = model if isinstance(model, nn.Module) else None
    ctx = Context(planned, {u.name: base_bits[u.kind] for u in planned}, module, stats, seed, sizes, symmetric)
    target = None if serving is None else get_target(serving)
    if spec.optimizer and serving is not None:
        params = dict(params) | {"serving": serving}
    kwargs = bound_params(spec.fn, params, f"strategy {spec.name!r}", skip=_NOT_PARAMS)
    meta: dict[str, Any] = {"strategy": spec.name, "params": _meta_params(kwargs), "seed": seed,
                            "base": dict(base_bits), "group_size": group_size, "budget_bits": budget_bits}
    if spec.optimizer:
        bits, details = spec.fn(ctx, budget_bits, **kwargs)
    else:
        rule = spec.fn(ctx, **kwargs)
        start = rule.base if rule.base is not None else ctx.base
        if budget_bits is None:
            bits, details = apply(start, rule.upgrades[: rule.default]), {}
        else:
            bits, details = fit_budget(start, rule.upgrades, accounting_weights(planned), budget_bits, spec.name)
        details = rule.meta | details
    if target is not None and not spec.optimizer:
        bits = lift(bits, planned, target)
    meta["details"] = _jsonable(details)
    if serving is not None:
        meta["serving"] = serving
    specs = {u.name: QuantSpec(bits[u.name], sizes[u.name], symmetric) for u in planned}
    result = Plan(specs, group_size=_default_group_size(sizes), symmetric=symmetric, meta=meta)
    result.validate(all_units)
    if target is not None:
        check_plan(result, all_units, target)  # group sizes and symmetry the engine runs
    result.meta["avg_bits"] = result.avg_bits(all_units)
    result.meta["true_avg_bits"] = result.true_avg_bits(all_units)
    return result
