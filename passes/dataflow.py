"""Dataflow primitives over ATen FX graphs: what an op is, and where values flow.

The MoE structure pass (``moe_structure.py``) and the Inductor counting pass
(``inductor_pass.py``) both ask the same questions of a graph: which nodes are matmuls,
which values are pure routing signals, where does a value go before the next matmul.
They work on export's pre-dispatch graphs (``aten.linear``, ``aten.softmax``, in-place
ops still present) and on Inductor's post-grad graphs (functional, decomposed). Ops are
named without overloads (``bmm``), and views and in-place writes are read from schemas
(a view's output aliases its input, an in-place op writes an argument), so both graph
flavours and custom ops need no per-overload tables.

Vocabulary:
    compute op: a matmul-like or attention op (``linear``, ``mm``, ``bmm``, ``einsum``,
        grouped mm, sdpa, embedding) or any opaque custom op. Walks stop there:
        everything between two compute ops is "pointwise" (elementwise, views,
        reductions, gathers, top-k).
    transparent op: keeps the value (views, dtype casts, copies).
    const: built from no data (factories, buffers, lifted constants).
    signal: derived only from the router logits and consts (probabilities, top-k ids
        and weights, sort permutations, group offsets, dense routing matrices).
"""

from __future__ import annotations

import operator
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

import torch
from torch.fx import Graph, Node

_COMPUTE = {
    "linear", "mm", "addmm", "bmm", "baddbmm", "matmul", "einsum", "_grouped_mm", "embedding",
    "scaled_dot_product_attention", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "convolution", "conv1d", "conv2d",
}
ATTENTION_OPS = {n for n in _COMPUTE if "scaled_dot_product" in n}
ACTIVATIONS = {"silu", "gelu", "relu", "sigmoid", "tanh", "softplus", "elu", "leaky_relu", "mish",
               "hardswish", "hardsigmoid", "selu", "celu", "glu"}
PROBABILITY_OPS = {"softmax", "_softmax", "sigmoid", "exp"}  # exp: softmax after decomposition
GATHERS = {"index", "_unsafe_index", "index_select", "gather", "take", "repeat_interleave"}
# Ops that weight or place a routed result by routing signals (out * w, out[perm] = ...).
COMBINES = {"mul", "div", "index_put", "index_put_", "_unsafe_index_put", "index_add", "index_add_",
            "scatter_add", "scatter_add_", "index_copy", "index_copy_"}
_JOINS = {"add", "add_", "sub", "sub_"}
_COPIES = {"_to_copy", "clone", "detach", "lift_fresh_copy", "_assert_tensor_metadata"}
_FACTORIES = {"zeros", "ones", "empty", "full", "arange", "zeros_like", "ones_like", "empty_like",
              "full_like", "new_zeros", "new_ones", "new_empty", "new_full", "scalar_tensor", "rand",
              "randn", "eye", "empty_strided"}


def op_name(node: Node) -> str:
    """The ATen op name without overload (``aten.bmm.default`` -> ``bmm``); '' for others."""
    if node.op != "call_function":
        return ""
    if node.target is operator.getitem:
        return "getitem"
    packet = getattr(node.target, "overloadpacket", None)
    if packet is not None:
        return packet.__name__
    return getattr(node.target, "__name__", "")


def _namespace(node: Node) -> str:
    return getattr(node.target, "namespace", "") if node.op == "call_function" else ""


def is_compute(node: Node) -> bool:
    """Matmul-like, attention or embedding ops, and opaque custom ops (kernels)."""
    if node.op != "call_function":
        return False
    if op_name(node) in _COMPUTE:
        return True
    ns = _namespace(node)
    if ns and ns not in ("aten", "prims", "_operator"):
        return True  # e.g. moe_ao::grouped_mm_loop, transformers::grouped_mm_fallback
    return isinstance(node.target, torch._ops.HigherOrderOperator)


def _schema(node: Node):
    return getattr(node.target, "_schema", None) if node.op == "call_function" else None


def is_view(node: Node) -> bool:
    """True when the output aliases arg 0 without writing it (view, reshape, split items, to)."""
    if node.target is operator.getitem:
        src = node.args[0]
        return isinstance(src, Node) and is_view(src)
    schema = _schema(node)
    if schema is None or not schema.returns or not schema.arguments:
        return False
    ret = schema.returns[0].alias_info
    arg = schema.arguments[0].alias_info
    return ret is not None and not ret.is_write and arg is not None and not arg.is_write


def mutated_args(node: Node) -> list[Node]:
    """The nodes an in-place op writes (``scatter_``'s self, ``index_put_``'s self, ...)."""
    schema = _schema(node)
    if schema is None:
        return []
    out = []
    for i, arg in enumerate(schema.arguments):
        if arg.alias_info is not None and arg.alias_info.is_write:
            value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
            if isinstance(value, Node):
                out.append(value)
    return out


def is_transparent(node: Node) -> bool:
    """Views and copies: the output holds the input's values (maybe recast or reshaped)."""
    return is_view(node) or op_name(node) in _COPIES or op_name(node) in ("to", "contiguous", "alias")


def tensor_inputs(node: Node) -> list[Node]:
    """Input nodes, flattening list arguments (``index``'s indices, ``cat``'s tensors)."""
    return list(node.all_input_nodes)


def val_shape(node: Node) -> tuple[int, ...] | None:
    """Static shape from the node's fake value (export and AOT both record ``meta['val']``)."""
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        try:
            return tuple(int(s) for s in val.shape)
        except TypeError:  # symbolic sizes
            return None
    return None


class Reach(NamedTuple):
    """What a walk from a node reached: the nodes it crossed and those it stopped at."""

    seen: set[Node]
    ends: list[Node]


class Flow:
    """Forward/backward adjacency of a graph, with in-place writes turned into edges.

    An in-place op ``scatter_(dense, ...)`` returns ``dense``; later readers may use the
    in-place node or the original buffer (``new_empty`` filled by ``copy_`` on slices).
    So a node reading a written tensor also reads the earlier writes (backward edges),
    and a write leads forward to the written base and its readers.

    Args:
        graph: the FX graph (export or post-grad).
        consts: placeholders that hold constants (buffers, lifted tensors), not data.
    """

    def __init__(self, graph: Graph, consts: Iterable[Node] = ()) -> None:
        self.graph = graph
        self.nodes = list(graph.nodes)
        self.order = {n: i for i, n in enumerate(self.nodes)}
        self.const_inputs = set(consts)
        self.writers: dict[Node, list[Node]] = {}  # written base -> in-place ops, in order
        self.fwd_extra: dict[Node, list[Node]] = {}
        for n in self.nodes:
            for target in mutated_args(n):
                base = self.view_base(target)
                self.writers.setdefault(base, []).append(n)
                self.fwd_extra.setdefault(n, []).append(base)
        self._inputs: dict[Node, list[Node]] = {}
        self.const = self._consts()

    def view_base(self, node: Node) -> Node:
        """The tensor a chain of views starts from."""
        while node.op == "call_function" and is_view(node) and isinstance(node.args[0], Node):
            node = node.args[0]
        return node

    def users(self, node: Node) -> list[Node]:
        return list(node.users) + self.fwd_extra.get(node, [])

    def inputs(self, node: Node) -> list[Node]:
        """Inputs, plus the earlier in-place ops that wrote them (their written values)."""
        if node not in self._inputs:
            ins = tensor_inputs(node)
            extra = [w for i in ins for w in self.writers.get(self.view_base(i), [])
                     if w is not node and self.order[w] < self.order[node]]
            self._inputs[node] = ins + [w for w in dict.fromkeys(extra) if w not in ins]
        return self._inputs[node]

    def _consts(self) -> set[Node]:
        const: set[Node] = set()
        for n in self.nodes:
            if n.op == "get_attr" or op_name(n) in _FACTORIES:
                const.add(n)
            elif n in self.const_inputs:
                const.add(n)
            elif n.op == "call_function" and not is_compute(n):
                ins = self.inputs(n)
                if ins and all(i in const for i in ins):
                    const.add(n)
        return const

    def future(self, start: Node, stop: Callable[[Node], bool] = is_compute) -> Reach:
        """Nodes reached forward from ``start`` without crossing ``stop`` nodes.

        Returns:
            The pointwise nodes walked (``seen``) and the stop nodes and ``output``
            reached (``ends``, in graph order).
        """
        seen: set[Node] = set()
        ends: set[Node] = set()
        todo = deque(self.users(start))
        while todo:
            n = todo.popleft()
            if n in seen or n in ends:
                continue
            if n.op == "output" or stop(n):
                ends.add(n)
                continue
            seen.add(n)
            todo.extend(self.users(n))
        return Reach(seen, sorted(ends, key=self.order.__getitem__))

    def past(self, start: Node, stop: Callable[[Node], bool] = is_compute) -> Reach:
        """Backward counterpart of :meth:`future`; placeholders also end the walk."""
        seen: set[Node] = set()
        ends: set[Node] = set()
        todo = deque([start])
        while todo:
            n = todo.popleft()
            if n in seen or n in ends:
                continue
            if n is not start and (n.op == "placeholder" or stop(n)):
                ends.add(n)
                continue
            seen.add(n)
            todo.extend(self.inputs(n))
        return Reach(seen, sorted(ends, key=self.order.__getitem__))

    def signals(self, seed: Node) -> set[Node]:
        """Nodes computed only from ``seed`` (router logits) and consts, in one forward sweep."""
        sig = {seed}
        for n in self.nodes[self.order[seed] + 1:]:
            if n.op != "call_function" or is_compute(n) or n in self.const:
                continue
            ins = self.inputs(n)
            if any(i in sig for i in ins) and all(i in sig or i in self.const for i in ins):
                sig.add(n)
        return sig


def router_signals(flow: Flow, matmul: Node, routing_ops: set[str]) -> set[Node] | None:
    """The routing signals of ``matmul`` if it is a router, else None.

    A router's output, through ops that see nothing but its logits and constants
    (:meth:`Flow.signals`), reaches both a probability op (softmax/sigmoid) and a
    routing op (``topk``). The one definition the graph pass and the Inductor counter share.
    """
    if not any(op_name(n) in routing_ops for n in flow.future(matmul).seen):
        return None  # cheap test first: most matmuls never reach a top-k
    sig = flow.signals(matmul)
    names = {op_name(n) for n in sig}
    return sig if names & routing_ops and names & PROBABILITY_OPS else None


def is_join(flow: Flow, node: Node) -> bool:
    """Compute ops, and adds joining two data branches (a residual, shared + routed output)."""
    if is_compute(node):
        return True
    return op_name(node) in _JOINS and sum(1 for i in flow.inputs(node) if i not in flow.const) >= 2


def gathered_by(flow: Flow, value: Node, sig: set[Node]) -> bool:
    """``value`` is (a view or cast of) a gather whose indices are in ``sig``."""
    node = value
    while node.op == "call_function" and not is_compute(node):
        if op_name(node) in GATHERS and any(i in sig for i in flow.inputs(node)[1:]):
            return True
        if not node.args or not isinstance(node.args[0], Node):
            return False
        node = node.args[0]
    return False


def combined_with(flow: Flow, start: Node, sig: set[Node]) -> Node | None:
    """The first signal that weights or places ``start``'s output before it joins another branch."""
    seen = flow.future(start, stop=lambda n: is_join(flow, n)).seen
    for n in sorted(seen, key=flow.order.__getitem__):
        if op_name(n) in COMBINES:
            hits = [i for i in flow.inputs(n) if i in sig]
            if hits:
                return hits[0]
    return None


def root(node: Node) -> Node:
    """Strips transparent ops (views, casts, copies) off a value."""
    while node.op == "call_function" and is_transparent(node) and node.args and isinstance(node.args[0], Node):
        node = node.args[0]
    return node


def passes_activation(flow: Flow, start: Node) -> bool:
    """True when a nonlinearity lies between ``start`` and the next compute op."""
    seen = flow.future(start).seen
    return any(op_name(n) in ACTIVATIONS for n in seen)


def iter_calls(graph: Graph, names: set[str]) -> Iterator[Node]:
    """call_function nodes whose op name is in ``names``."""
    return (n for n in graph.nodes if op_name(n) in names)
