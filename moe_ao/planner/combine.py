"""Stacking heuristics: ``+Attn+Shared+Freq+FirstL+LinearOSP+LayerISP``.

Each named rule runs with its own parameters; a unit's bits are the maximum over the
stacked rules. The combined ranking, for budgets, is every rule's own selection (in
the order the rules are listed) followed by every rule's remaining ranked upgrades
(same order): a budget below the full stack cuts the last-listed rules first, and a
budget above it extends them in turn.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from moe_ao.planner import heuristics as H
from moe_ao.planner.budget import Rule
from moe_ao.planner.context import Context, bound_params

COMBO_RULES = {
    "attn": H.attention,
    "shared": H.shared,
    "freq": H.frequency,
    "firstl": H.first_k,
    "lastl": H.last_k,
    "linearosp": H.outlier,
    "lineartype": H.linear_type,
    "layerisp": H.layerisp,
}
DEFAULT_RULES = "+Attn+Shared+Freq+FirstL+LinearOSP+LayerISP"


def parse_rules(rules: str | Sequence[str]) -> list[str]:
    """``"+Attn+Freq"`` or ``["attn", "Freq"]`` -> ``["attn", "freq"]``.

    Raises:
        ValueError: an unknown or repeated rule name, or no rule at all.
    """
    names = rules.split("+") if isinstance(rules, str) else list(rules)
    names = [n.strip().lower() for n in names if n.strip()]
    unknown = [n for n in names if n not in COMBO_RULES]
    if unknown or not names or len(set(names)) != len(names):
        raise ValueError(
            f"rules={rules!r}: need distinct names from {sorted(COMBO_RULES)} (case-insensitive, '+'-joined),"
            f" got unknown {unknown}" if unknown else f"rules={rules!r}: need one or more distinct rule names"
        )
    return names


def combination(
    ctx: Context, rules: str | Sequence[str] = DEFAULT_RULES, rule_params: Mapping[str, Mapping[str, Any]] | None = None
) -> Rule:
    """The stack of ``rules``; ``rule_params`` maps a rule name to its parameters.

    Example: ``rules="+Attn+Freq+LinearOSP", rule_params={"freq": {"k": 4}}``.

    Raises:
        ValueError: unknown rule names or parameters, or a rule's own errors.
    """
    names = parse_rules(rules)
    params = {k.lower(): dict(v) for k, v in (rule_params or {}).items()}
    extra = sorted(set(params) - set(names))
    if extra:
        raise ValueError(f"rule_params names {extra}, which are not among the stacked rules {names}")
    subs = {}
    for name in names:
        kwargs = bound_params(COMBO_RULES[name], params.get(name, {}), f"rule {name!r}")
        subs[name] = COMBO_RULES[name](ctx, **kwargs)
    selected = [u for r in subs.values() for u in r.upgrades[: r.default]]
    rest = [u for r in subs.values() for u in r.upgrades[r.default :]]
    meta = {"rules": names, "rule_meta": {name: r.meta for name, r in subs.items()}}
    return Rule(selected + rest, len(selected), meta)
