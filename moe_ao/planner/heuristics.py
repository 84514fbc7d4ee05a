"""The paper's heuristics as rules: each ranks groups of units to raise above the base.

A rule takes a :class:`~moe_ao.planner.context.Context` plus its own parameters and
returns a :class:`~moe_ao.planner.budget.Rule`: ranked upgrades, best first, and how
many of them its parameters select. The planner applies that many, or walks the
ranking to a bit budget. Ties in any score break by model order, so rankings are
deterministic; random controls draw from ``Context.rng`` (seeded).

"Block" rules (first-k, last-k, random blocks, predictor) raise every FFN unit of a
block: its routed experts, and its shared experts / dense MLP where the base left
those low. Layer indices are decoder-layer indices (a dense layer 0 counts).
"""

from __future__ import annotations

from moe_ao.discovery import PROJ_ALIASES
from moe_ao.planner.budget import Rule, Upgrade, accounting_weights, closest_prefix, prefix_averages
from moe_ao.planner.context import FFN_KINDS, QUANT_BITS, Context, check_bits
from moe_ao.planner.predictor import PredictorConfig, block_scores, config_dict
from moe_ao.planner.scorers import outlier_score


def _round(x: float) -> float:
    return round(float(x), 6)


def _check_count(name: str, k: int, high: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= high:
        raise ValueError(f"{name}={k!r}; allowed: an int in [0, {high}]")
    return k


def _round_robin(per_layer: dict[int, list[Upgrade]]) -> list[Upgrade]:
    """Rank 0 of every layer (layers ascending), then rank 1, ..."""
    depth = max((len(v) for v in per_layer.values()), default=0)
    return [ups[r] for r in range(depth) for ups in per_layer.values() if r < len(ups)]


def _expert_upgrade(ctx: Context, layer: int, expert: int, bits: int, score: float | None = None) -> Upgrade:
    return Upgrade(ctx.experts()[(layer, expert)], bits, f"layer {layer} expert {expert}", score)


def _block_upgrades(ctx: Context, layers: list[int], bits: int, scores: list[float] | None = None) -> list[Upgrade]:
    blocks = ctx.by_layer(*FFN_KINDS)
    scores = scores or [None] * len(layers)
    return [Upgrade(blocks[layer], bits, f"layer {layer} FFN", s) for layer, s in zip(layers, scores)]


def uniform(ctx: Context, bits: int = 4) -> Rule:
    """Every planned unit at ``bits`` (replaces the base; nothing to rank)."""
    check_bits(bits)
    return Rule([], 0, base={u.name: bits for u in ctx.units})


def base(ctx: Context) -> Rule:
    """The base itself (default: routed experts 2-bit, everything else 4-bit)."""
    return Rule([], 0)


def attention(ctx: Context, bits: int = 4) -> Rule:
    """Attention raised to ``bits`` (paper: 2 -> 4 or 2 -> 8), layer by layer."""
    check_bits(bits)
    ups = [Upgrade(names, bits, f"layer {layer} attention") for layer, names in ctx.by_layer("attention").items()]
    return Rule(ups, len(ups))


def attention_random(ctx: Context, bits: int = 4, expert_bits: int = 4) -> Rule:
    """Control for :func:`attention`: the same bits spent on random whole experts.

    The number of experts is the one whose average bits is closest to the attention
    plan's (paper, Mixtral: 8 experts for attention 2 -> 4, 23 for 2 -> 8).
    """
    check_bits(expert_bits, "expert_bits")
    weights = accounting_weights(ctx.units)
    target = prefix_averages(ctx.base, attention(ctx, bits).upgrades, weights)[-1]
    keys = list(ctx.experts())
    ctx.rng("attention-random").shuffle(keys)
    ups = [_expert_upgrade(ctx, layer, e, expert_bits) for layer, e in keys]
    averages = prefix_averages(ctx.base, ups, weights)
    if averages[-1] < target - 1e-9:
        raise ValueError(
            f"attention-random: experts at expert_bits={expert_bits} reach at most {averages[-1]:.4f} average bits,"
            f" below the attention plan's {target:.4f}; allowed: a larger expert_bits from {QUANT_BITS}"
        )
    n = closest_prefix(averages, target)
    return Rule(ups, n, {"matched_avg_bits": _round(target), "experts": n})


def shared(ctx: Context, bits: int = 4) -> Rule:
    """Shared experts raised to ``bits``, layer by layer (nothing on models without them)."""
    check_bits(bits)
    ups = [Upgrade(names, bits, f"layer {layer} shared") for layer, names in ctx.by_layer("shared_expert").items()]
    return Rule(ups, len(ups))


def routing_ranks(ctx: Context) -> dict[int, list[tuple[int, int]]]:
    """Per MoE layer, (expert, count) most-routed first (ties: lower expert index)."""
    stats = ctx.require("routing_counts")
    experts = ctx.experts()
    out = {}
    for layer in ctx.moe_layers():
        counts = [int(c) for c in stats.routing_counts[layer].tolist()]
        have = sorted(e for (lay, e) in experts if lay == layer)
        if have and have[-1] >= len(counts):
            raise ValueError(
                f"stats.routing_counts[{layer}] has {len(counts)} experts but the model's layer {layer}"
                f" has expert {have[-1]}"
            )
        out[layer] = sorted(((e, counts[e]) for e in have), key=lambda ec: (-ec[1], ec[0]))
    return out


def frequency(ctx: Context, k: int = 2, bits: int = 4) -> Rule:
    """Per block, the ``k`` experts with the most top-k routing selections (+Freq)."""
    check_bits(bits)
    ranks = routing_ranks(ctx)
    _check_count("k", k, min((len(r) for r in ranks.values()), default=0))
    per_layer = {
        layer: [_expert_upgrade(ctx, layer, e, bits, float(c)) for e, c in r] for layer, r in ranks.items()
    }
    selected = {str(layer): [e for e, _ in r[:k]] for layer, r in ranks.items()}
    return Rule(_round_robin(per_layer), k * len(ranks), {"selected": selected})


def frequency_global(ctx: Context, n: int | None = None, bits: int = 4) -> Rule:
    """The ``n`` experts with the largest routing share over all blocks.

    The share is per layer (counts / Σ counts of that layer), so layers that saw
    different token counts compare fairly. ``n`` defaults to 2 per MoE layer (the
    budget of the per-layer top-2).
    """
    check_bits(bits)
    ranks = routing_ranks(ctx)
    flat = []
    for layer, r in ranks.items():
        total = max(1, sum(c for _, c in r))
        flat += [(c / total, layer, e) for e, c in r]
    flat.sort(key=lambda t: (-t[0], t[1], t[2]))
    n = 2 * len(ranks) if n is None else n
    _check_count("n", n, len(flat))
    ups = [_expert_upgrade(ctx, layer, e, bits, _round(share)) for share, layer, e in flat]
    return Rule(ups, n, {"n": n, "selected": [u.label for u in ups[:n]]})


def frequency_random(ctx: Context, k: int = 2, bits: int = 4) -> Rule:
    """Control for :func:`frequency`: ``k`` random experts per block (seeded)."""
    check_bits(bits)
    by_layer: dict[int, list[int]] = {}
    for layer, e in ctx.experts():
        by_layer.setdefault(layer, []).append(e)
    _check_count("k", k, min((len(v) for v in by_layer.values()), default=0))
    rng = ctx.rng("frequency-random")
    per_layer = {}
    for layer, experts in by_layer.items():
        rng.shuffle(experts)
        per_layer[layer] = [_expert_upgrade(ctx, layer, e, bits) for e in experts]
    selected = {str(layer): sorted(v[:k]) for layer, v in by_layer.items()}
    return Rule(_round_robin(per_layer), k * len(by_layer), {"selected": selected})


def _default_blocks(ctx: Context, k: int | None, per_32: int) -> int:
    # The paper's k is for 32-block Mixtral; scale it to this model's block count.
    return max(1, round(per_32 * len(ctx.moe_layers()) / 32)) if k is None else k


def _edge_blocks(ctx: Context, layers: list[int], k: int | None) -> int:
    """k for first-k / last-k walking ``layers`` from one end: given, or by default 4 per 32
    MoE blocks *plus* the dense blocks met before the first MoE one (DeepSeek's dense layer
    0), so that the default raises that many MoE blocks rather than spending one step on a
    dense MLP the experts-low base already holds at 4 bits."""
    if k is not None:
        return _check_count("k", k, len(layers))
    moe = set(ctx.moe_layers())
    lead = next((i for i, layer in enumerate(layers) if layer in moe), len(layers))
    return min(len(layers), lead + _default_blocks(ctx, None, 4))


def first_k(ctx: Context, k: int | None = None, bits: int = 4) -> Rule:
    """All FFN units of blocks 0 .. k-1 (+FirstL); see :func:`_edge_blocks` for the default k."""
    check_bits(bits)
    layers = list(ctx.by_layer(*FFN_KINDS))
    k = _edge_blocks(ctx, layers, k)
    return Rule(_block_upgrades(ctx, layers, bits), k, {"k": k, "blocks": layers[:k]})


def last_k(ctx: Context, k: int | None = None, bits: int = 4) -> Rule:
    """All FFN units of the last k blocks; see :func:`_edge_blocks` for the default k."""
    check_bits(bits)
    layers = list(ctx.by_layer(*FFN_KINDS))[::-1]
    k = _edge_blocks(ctx, layers, k)
    return Rule(_block_upgrades(ctx, layers, bits), k, {"k": k, "blocks": layers[:k]})


def blocks_random(ctx: Context, k: int | None = None, bits: int = 4) -> Rule:
    """Control for the block rules: k random MoE blocks (seeded). k: 8 per 32 blocks."""
    check_bits(bits)
    layers = ctx.moe_layers()
    k = _check_count("k", _default_blocks(ctx, k, 8), len(layers))
    ctx.rng("blocks-random").shuffle(layers)
    return Rule(_block_upgrades(ctx, layers, bits), k, {"k": k, "blocks": sorted(layers[:k])})


def linear_type(ctx: Context, proj: str = "down_proj", bits: int = 4) -> Rule:
    """Every routed expert's ``proj`` linear (gate_proj / up_proj / down_proj; w1/w3/w2 too)."""
    check_bits(bits)
    proj = PROJ_ALIASES.get(proj, proj)
    experts = ctx.of_kind("expert")
    have = sorted({u.proj for u in experts})
    if proj not in have:
        raise ValueError(f"proj={proj!r}: the planned experts have no such linear; allowed: {have}")
    ups = [Upgrade((u.name,), bits, u.name) for u in experts if u.proj == proj]
    return Rule(ups, len(ups), {"proj": proj})


def _fraction_count(fraction: float, total: int) -> int:
    if isinstance(fraction, bool) or not 0 <= fraction <= 1:
        raise ValueError(f"fraction={fraction!r}; allowed: a number in [0, 1]")
    return int(fraction * total + 0.5)  # round half up (Python's round() is half-to-even)


def outlier(ctx: Context, fraction: float = 0.25, bits: int = 4) -> Rule:
    """The routed-expert linears with the largest outlier score (+LinearOSP).

    Reads weights only, no calibration data. The meta records how many picks fall on
    each projection (paper, Mixtral: 191 of 192 were down_proj).
    """
    check_bits(bits)
    experts = ctx.of_kind("expert")
    scored = [(outlier_score(ctx.weight(u)), i, u) for i, u in enumerate(experts)]
    scored.sort(key=lambda t: (-t[0], t[1]))
    n = _fraction_count(fraction, len(scored))
    by_proj: dict[str, int] = {}
    for _, _, u in scored[:n]:
        by_proj[u.proj] = by_proj.get(u.proj, 0) + 1
    ups = [Upgrade((u.name,), bits, u.name, _round(s)) for s, _, u in scored]
    meta = {"selected": n, "selected_by_proj": dict(sorted(by_proj.items())),
            "threshold_score": _round(scored[n - 1][0]) if n else None}
    return Rule(ups, n, meta)


def outlier_random(ctx: Context, fraction: float = 0.25, bits: int = 4) -> Rule:
    """Control for :func:`outlier`: a seeded random ``fraction`` of routed-expert linears.

    Same count as the outlier rule, hence the same bits whenever expert linears share
    one size (true of every MoE here: gate/up are [I, H], down is [H, I]).
    """
    check_bits(bits)
    experts = ctx.of_kind("expert")
    ctx.rng("outlier-random").shuffle(experts)
    n = _fraction_count(fraction, len(experts))
    return Rule([Upgrade((u.name,), bits, u.name) for u in experts], n, {"selected": n})


def layerisp(
    ctx: Context,
    k: int | None = None,
    bits: int = 4,
    hidden: int = 1024,
    lr: float = 1e-4,
    weight_decay: float = 1e-2,
    val_fraction: float = 0.1,
    max_epochs: int = 50,
    patience: int = 5,
    batch_size: int = 256,
) -> Rule:
    """The k MoE blocks with the lowest predicted input/output similarity (+LayerISP).

    Trains one predictor per block (see :mod:`moe_ao.planner.predictor`). k defaults to
    8 per 32 MoE blocks.
    """
    check_bits(bits)
    stats = ctx.require("block_inputs", "block_cos")
    config = PredictorConfig(hidden, lr, weight_decay, val_fraction, max_epochs, patience, batch_size)
    scores = block_scores(stats, ctx.moe_layers(), config, seed=ctx.seed)
    order = sorted(scores.values(), key=lambda s: (s.score, s.layer))
    k = _check_count("k", _default_blocks(ctx, k, 8), len(order))
    ups = _block_upgrades(ctx, [s.layer for s in order], bits, [_round(s.score) for s in order])
    meta = {
        "k": k,
        "blocks": sorted(s.layer for s in order[:k]),
        "ranking": [s.layer for s in order],
        "scores": {str(s.layer): _round(s.score) for s in scores.values()},
        "val_mse": {str(s.layer): _round(s.val_mse) for s in scores.values()},
        "predictor": config_dict(config),
    }
    return Rule(ups, k, meta)
