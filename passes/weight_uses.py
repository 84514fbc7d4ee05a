"""Where each weight goes: from a parameter placeholder to the matmul that consumes it.

A weight reaches its matmul through views and casts (``w.t()``, ``w.float()``,
``bank.transpose(1, 2)``) and, for routed experts, through gathers by expert ids
(``bank[ids]``, ``index_select``). :func:`weight_uses` follows every such path and
records, per use, the consuming node, the gathers on the way (their index tensors are
what makes a bank "routed") and whether the weight is contracted on its last axis, as
a ``[out, in]`` weight must be. Axis bookkeeping: ``in_axis`` is the (negative) axis
that holds the parameter's last dimension after the views on the way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.fx import Node

from moe_ao.passes.dataflow import GATHERS, Flow, is_compute, is_transparent, op_name, val_shape


@dataclass
class WeightUse:
    """One path from a parameter to the op that consumes it.

    Attributes:
        param: parameter FQN.
        node: the consuming op (a compute op, or any other op for unknown uses).
        operand: the value of the weight as the consumer sees it.
        gathers: index tensors of gathers on the way (``bank[ids]`` -> ``ids``).
        in_axis: axis holding the parameter's in-features at the consumer (None: unknown).
        transposed: True when the consumer contracts the out-features axis (the weight
            is stored ``[in, out]``), None when that cannot be told.
    """

    param: str
    node: Node
    operand: Node
    gathers: list[Node] = field(default_factory=list)
    in_axis: int | None = -1
    transposed: bool | None = None

    @property
    def is_matmul(self) -> bool:
        return is_compute(self.node) and op_name(self.node) != "embedding"

    @property
    def is_embedding(self) -> bool:
        return op_name(self.node) == "embedding" and self.node.args[0] is self.operand

    def activations(self, flow: Flow, weight_nodes: set[Node]) -> list[Node]:
        """The consumer's data inputs: everything but weights and consts."""
        return [i for i in flow.inputs(self.node)
                if i is not self.operand and i not in weight_nodes and i not in flow.const]


def _neg(d: int, nd: int) -> int:
    return d - nd if d >= 0 else d


def _next_axis(node: Node, prev: Node, axis: int | None) -> int | None:
    """``in_axis`` after the view/gather ``node`` applied to ``prev``."""
    if axis is None:
        return None
    name, shape_in, shape_out = op_name(node), val_shape(prev), val_shape(node)
    if shape_in is None or shape_out is None:
        return axis if name not in ("transpose", "t", "permute", "view", "reshape", "_unsafe_view") else None
    nd, nd_out = len(shape_in), len(shape_out)
    if name == "t" or name == "transpose":
        d0, d1 = (-1, -2) if name == "t" else (_neg(node.args[1], nd), _neg(node.args[2], nd))
        return d1 if axis == d0 else d0 if axis == d1 else axis
    if name == "permute":
        dims = [d % nd for d in node.args[1]]
        return dims.index(axis % nd) - nd
    if name in ("view", "reshape", "_unsafe_view", "unsqueeze", "squeeze", "select", "expand"):
        # Same trailing sizes up to the axis: the axis kept its negative index.
        k = -axis
        if k <= min(nd, nd_out) and shape_in[-k:] == shape_out[-k:]:
            return axis
        return None
    return axis if nd == nd_out or name in GATHERS else None


def _contracted(use: WeightUse) -> bool | None:
    """True when the consumer contracts ``use.in_axis`` (the layout of an [out, in] weight)."""
    node, name, axis = use.node, op_name(use.node), use.in_axis
    if axis is None or name == "embedding":
        return None
    args = list(node.args)
    if name == "linear":
        return axis == -1 if len(args) > 1 and args[1] is use.operand else None
    if name in ("mm", "bmm", "matmul", "_grouped_mm", "addmm", "baddbmm"):
        mats = args[1:3] if name in ("addmm", "baddbmm") else args[:2]
        if use.operand not in mats:
            return None
        return axis == (-1 if mats.index(use.operand) == 0 else -2)
    if name == "einsum":
        lhs, out = node.args[0].replace(" ", "").split("->")
        subs = lhs.split(",")
        ops = list(node.args[1])
        if "." in lhs or use.operand not in ops:
            return None
        mine = subs[ops.index(use.operand)]
        letter = mine[axis]
        others = "".join(s for i, s in enumerate(subs) if i != ops.index(use.operand))
        return letter not in out and letter in others
    # Opaque kernels: tell the contracted axis from the sizes when they are unambiguous.
    w, xs = val_shape(use.operand), [val_shape(a) for a in args if isinstance(a, Node) and a is not use.operand]
    ks = {s[-1] for s in xs if s and len(s) >= 2}
    if w is None or len(w) < 2 or len(ks) != 1:
        return None
    (k,) = ks
    hits = [a for a in (-1, -2) if w[a] == k]
    return (axis in hits) if len(hits) == 1 else None


def weight_uses(flow: Flow, params: dict[Node, str]) -> tuple[list[WeightUse], set[str]]:
    """Every use of every weight in ``params`` (placeholder -> FQN).

    Returns:
        (the uses in graph order, the FQNs of weights with no use in the graph).
    """
    uses: list[WeightUse] = []
    unused = set()
    for placeholder, fqn in params.items():
        todo = [(user, placeholder, -1, []) for user in flow.users(placeholder)]
        found = False
        while todo:
            node, prev, axis, gathers = todo.pop()
            name = op_name(node)
            if name == "_assert_tensor_metadata":
                continue
            is_gather = name in GATHERS and node.args and node.args[0] is prev
            if (is_transparent(node) or is_gather) and not is_compute(node):
                extra = [i for i in flow.inputs(node) if i is not prev] if is_gather else []
                nxt = _next_axis(node, prev, axis)
                todo.extend((user, node, nxt, gathers + extra) for user in flow.users(node))
                continue
            use = WeightUse(fqn, node, prev, gathers, axis)
            contracted = _contracted(use)
            use.transposed = None if contracted is None else not contracted
            uses.append(use)
            found = True
        if not found:
            unused.add(fqn)
    uses.sort(key=lambda u: flow.order[u.node])
    return uses, unused


def is_weight_placeholder(node: Node, fqn_of: dict[str, str]) -> bool:
    """A placeholder that holds a parameter with two or more dimensions."""
    val = node.meta.get("val")
    return node.op == "placeholder" and node.name in fqn_of and isinstance(val, torch.Tensor) and val.ndim >= 2
