"""One named builder per strategy: ``first_k(model, k=8)`` is ``plan(model, "first-k", k=8)``.

Every builder also takes :func:`moe_ao.planner.plan`'s keywords: ``budget_bits``,
``stats``, ``seed``, ``group_size``, ``symmetric``, ``base``. Each returns a Plan whose
meta records the strategy and its parameters.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from torch import nn

from moe_ao.planner.combine import DEFAULT_RULES
from moe_ao.planner.strategies import plan
from moe_ao.plans import Plan
from moe_ao.unit import Unit

Model = nn.Module | Iterable[Unit]


def uniform(model: Model, bits: int = 4, **kw: Any) -> Plan:
    """Every planned unit (attention, experts, shared, dense MLP) at ``bits``."""
    return plan(model, "uniform", bits=bits, **kw)


def base(model: Model, **kw: Any) -> Plan:
    """Routed experts 2-bit, attention / shared experts / dense MLP 4-bit."""
    return plan(model, "base", **kw)


def attention(model: Model, bits: int = 4, **kw: Any) -> Plan:
    """Attention 2 -> ``bits`` (4 or 8), everything else 2-bit."""
    return plan(model, "attention", bits=bits, **kw)


def attention_random(model: Model, bits: int = 4, expert_bits: int = 4, **kw: Any) -> Plan:
    """Control: attention's extra bits spent on seeded random experts instead."""
    return plan(model, "attention-random", bits=bits, expert_bits=expert_bits, **kw)


def shared(model: Model, bits: int = 4, **kw: Any) -> Plan:
    """Shared experts 2 -> ``bits``, everything else 2-bit."""
    return plan(model, "shared", bits=bits, **kw)


def frequency(model: Model, stats: Any, k: int = 2, bits: int = 4, **kw: Any) -> Plan:
    """Per block, the ``k`` most routed experts at ``bits`` (needs routing counts)."""
    return plan(model, "frequency", stats=stats, k=k, bits=bits, **kw)


def frequency_global(model: Model, stats: Any, n: int | None = None, bits: int = 4, **kw: Any) -> Plan:
    """The ``n`` experts of largest routing share over all blocks at ``bits``."""
    return plan(model, "frequency-global", stats=stats, n=n, bits=bits, **kw)


def frequency_random(model: Model, k: int = 2, bits: int = 4, **kw: Any) -> Plan:
    """Control: ``k`` seeded random experts per block at ``bits``."""
    return plan(model, "frequency-random", k=k, bits=bits, **kw)


def first_k(model: Model, k: int | None = None, bits: int = 4, **kw: Any) -> Plan:
    """All FFN units of blocks 0 .. k-1 at ``bits``."""
    return plan(model, "first-k", k=k, bits=bits, **kw)


def last_k(model: Model, k: int | None = None, bits: int = 4, **kw: Any) -> Plan:
    """All FFN units of the last k blocks at ``bits``."""
    return plan(model, "last-k", k=k, bits=bits, **kw)


def blocks_random(model: Model, k: int | None = None, bits: int = 4, **kw: Any) -> Plan:
    """Control: all FFN units of k seeded random MoE blocks at ``bits``."""
    return plan(model, "blocks-random", k=k, bits=bits, **kw)


def linear_type(model: Model, proj: str = "down_proj", bits: int = 4, **kw: Any) -> Plan:
    """Every routed expert's ``proj`` linear at ``bits``."""
    return plan(model, "linear-type", proj=proj, bits=bits, **kw)


def outlier(model: nn.Module, fraction: float = 0.25, bits: int = 4, **kw: Any) -> Plan:
    """The top ``fraction`` routed-expert linears by outlier score at ``bits``."""
    return plan(model, "outlier", fraction=fraction, bits=bits, **kw)


def outlier_random(model: Model, fraction: float = 0.25, bits: int = 4, **kw: Any) -> Plan:
    """Control: a seeded random ``fraction`` of routed-expert linears at ``bits``."""
    return plan(model, "outlier-random", fraction=fraction, bits=bits, **kw)


def layerisp(model: Model, stats: Any, k: int | None = None, bits: int = 4, **kw: Any) -> Plan:
    """The k blocks of lowest predicted similarity at ``bits`` (predictor keywords too)."""
    return plan(model, "layerisp", stats=stats, k=k, bits=bits, **kw)


def combination(
    model: Model,
    rules: str | Sequence[str] = DEFAULT_RULES,
    rule_params: Mapping[str, Mapping[str, Any]] | None = None,
    **kw: Any,
) -> Plan:
    """The stack of ``rules`` (e.g. ``"+Attn+Shared+Freq"``); a unit's bits = max over them."""
    return plan(model, "combination", rules=rules, rule_params=rule_params, **kw)


def knapsack(model: nn.Module | Iterable[Unit], budget_bits: float, **kw: Any) -> Plan:
    """Minimum Σ sensitivity within ``budget_bits`` (see :mod:`moe_ao.planner.optimizer`)."""
    return plan(model, "knapsack", budget_bits=budget_bits, **kw)
