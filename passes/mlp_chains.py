"""MLP chains by dataflow: down(act(gate(x)) * up(x)), down(act(up(x))), fused gate_up.

A chain is a down projection D plus the projections whose outputs reach D and nothing
else before a join (an add of two data branches, e.g. a residual). Roles come from
where the nonlinearity sits: the gate's output passes an activation on its way to D,
the up projection's does not. A fused ``gate_up`` projection has its output split in
two (``chunk``/``split``/slices on the last axis); the half through the activation is
the gate, and the split positions give each half's rows in the stored weight.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch.fx import Node

from moe_ao.passes.dataflow import Flow, is_join, op_name, passes_activation, val_shape
from moe_ao.passes.weight_uses import WeightUse


@dataclass
class Chain:
    """One MLP: ``members`` are (use, role) in role order, the down projection last."""

    members: list[tuple[WeightUse, str]]
    kind: str = "dense_mlp"
    router: Node | None = None
    expert: int | None = None


def find_chains(flow: Flow, uses: list[WeightUse], weight_nodes: set[Node],
                describe: Callable[[str], str]) -> list[Chain]:
    """Chains among ``uses`` (matmuls not yet given a role), in graph order.

    Raises:
        ValueError: a down projection fed by projections in no known MLP pattern.
    """
    by_node = {u.node: u for u in uses}
    claimed: set[Node] = set()
    chains = []
    for d in uses:
        sources = {e for a in d.activations(flow, weight_nodes) for e in flow.past(a).ends}
        inner = [by_node[e] for e in sorted(sources, key=flow.order.__getitem__)
                 if e in by_node and e not in claimed
                 and flow.future(e, stop=lambda n: is_join(flow, n)).ends == [d.node]]
        if inner:
            chains.append(Chain(_roles(flow, inner, describe) + [(d, "down_proj")]))
            claimed.update([d.node, *(u.node for u in inner)])
    return chains


def _roles(flow: Flow, inner: list[WeightUse], describe: Callable[[str], str]) -> list[tuple[WeightUse, str]]:
    if len(inner) == 2:
        act = [passes_activation(flow, u.node) for u in inner]
        if act.count(True) == 1:
            gate, up = (inner[0], inner[1]) if act[0] else (inner[1], inner[0])
            return [(gate, "gate_proj"), (up, "up_proj")]
    if len(inner) == 1:
        return [(inner[0], "gate_up_proj" if gate_up_rows(flow, inner[0]) else "up_proj")]
    names = ", ".join(describe(u.param) for u in inner)
    raise ValueError(f"MLP input projections {names} not understood: expected gate + up, fused gate_up, or up")


def gate_up_rows(flow: Flow, use: WeightUse) -> list[tuple[str, int, int]] | None:
    """[(role, row0, row1)] in storage order when ``use``'s output splits into gate and up."""
    node = use.node
    while len(node.users) == 1 and op_name(next(iter(node.users))) in ("squeeze", "view", "reshape", "to"):
        node = next(iter(node.users))
    shape = val_shape(node)
    if shape is None:
        return None
    n, last = shape[-1], (-1, len(shape) - 1)
    parts = []  # (row0, row1, node of that part)
    for user in node.users:
        name = op_name(user)
        if name in ("chunk", "split", "split_with_sizes") and user.args[-1] in last:
            sizes = ([n // user.args[1]] * user.args[1] if name == "chunk" else
                     [user.args[1]] * (n // user.args[1]) if name == "split" else list(user.args[1]))
            starts = [sum(sizes[:i]) for i in range(len(sizes))]
            parts += [(starts[item.args[1]], starts[item.args[1]] + sizes[item.args[1]], item)
                      for item in user.users]
        elif name == "slice" and user.args[1] in last:
            parts.append((user.args[2], min(user.args[3], n), user))
    if len(parts) != 2:
        return None
    act = [passes_activation(flow, p[2]) for p in parts]
    if act.count(True) != 1:
        return None
    return [
        ("gate_proj" if a else "up_proj", r0, r1) for (r0, r1, _), a in sorted(zip(parts, act), key=lambda pa: pa[0][0])
    ]
