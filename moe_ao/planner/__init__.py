"""The planner: scores + budget -> Plan.

Strategies (the paper's heuristics, their random controls, and a budgeted knapsack
optimizer) are registered by name; :func:`plan` dispatches::

    from moe_ao import planner
    p = planner.plan(model, "frequency", stats=profile, k=2)            # the rule's own k
    p = planner.plan(model, "outlier", budget_bits=2.5, group_size="auto")  # walk to a budget
    stats = planner.measure_sensitivities(model, calibration, profile, group_size=128)
    p = planner.plan(model, "knapsack", budget_bits=2.5, stats=stats)   # measured KL
    stats = planner.estimate_sensitivities(model, calibration, profile, group_size=128)  # two passes
    print(planner.summarize(p, model))

Modules, in dependency order: context (units, bases, group sizes), budget (ranking ->
bits), scorers (outlier score, Hessian-proxy and measured-KL sensitivities), predictor (block importance MLP),
heuristics (the rules), combination (stacked rules), optimizer (knapsack),
strategies (registry + :func:`plan`), builders (one function per strategy), summary.
"""

from moe_ao.planner.budget import Rule, Upgrade, fit_budget
from moe_ao.planner.builders import (
    attention,
    attention_random,
    base,
    blocks_random,
    combination,
    first_k,
    frequency,
    frequency_global,
    frequency_random,
    knapsack,
    last_k,
    layerisp,
    linear_type,
    outlier,
    outlier_random,
    shared,
    uniform,
)
from moe_ao.planner.context import BASES, PLANNED_KINDS, Context
from moe_ao.planner.optimizer import Solution, solve
from moe_ao.planner.predictor import BlockScore, PredictorConfig, block_scores
from moe_ao.planner.scorers import estimate_sensitivities, measure_sensitivities, outlier_score, sensitivity_table
from moe_ao.planner.strategies import STRATEGIES, get_strategy, parse_params, plan, strategy_help, strategy_names
from moe_ao.planner.summary import heatmap, summarize

__all__ = [
    "BASES",
    "PLANNED_KINDS",
    "STRATEGIES",
    "BlockScore",
    "Context",
    "PredictorConfig",
    "Rule",
    "Solution",
    "Upgrade",
    "attention",
    "attention_random",
    "base",
    "block_scores",
    "blocks_random",
    "combination",
    "estimate_sensitivities",
    "first_k",
    "fit_budget",
    "frequency",
    "frequency_global",
    "frequency_random",
    "get_strategy",
    "heatmap",
    "knapsack",
    "last_k",
    "layerisp",
    "linear_type",
    "measure_sensitivities",
    "outlier",
    "outlier_random",
    "outlier_score",
    "parse_params",
    "plan",
    "sensitivity_table",
    "shared",
    "solve",
    "strategy_help",
    "strategy_names",
    "summarize",
    "uniform",
]
