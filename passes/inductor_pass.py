"""Count MoE nodes in Inductor's post-grad graphs (an analysis pass: graphs are unchanged).

Post-grad graphs are functional and decomposed (``linear`` -> ``mm``, softmax ->
``amax/sub/exp/sum/div``) and weights are anonymous inputs, so this pass counts what
dataflow alone shows, with the primitives of ``dataflow.py``:

- ``routers``: a matmul whose output, through ops that see only its logits and
  constants, reaches a probability op (softmax, sigmoid, or their ``exp``) and a
  routing op (``topk`` by default);
- ``routed_matmuls``: matmuls fed by a router's signals (weights or tokens gathered by
  expert ids, grouped-mm offsets) or whose output is scaled by routing weights before
  it joins another branch;
- ``attention_cores``: scaled-dot-product-attention ops;
- ``graphs``: post-grad graphs seen.

Install it with :func:`count_moe_nodes`, which sets
``torch._inductor.config.post_grad_custom_post_pass`` only inside the ``with`` (added to
any passes already there) and restores it after. ``uuid()`` hashes this file, the
dataflow primitives and the options, so the FX graph cache never serves a graph compiled
under other options. On a cache hit Inductor does not rerun post-grad passes: the counts
cover freshly compiled graphs only, unless ``cache=False``.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections import Counter
from collections.abc import Iterator

from torch._inductor import config as inductor_config
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch.fx import Graph, Node

from moe_ao.passes import dataflow
from moe_ao.passes.dataflow import (
    ATTENTION_OPS,
    Flow,
    combined_with,
    gathered_by,
    is_compute,
    op_name,
    router_signals,
)

_MATMULS = {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "_grouped_mm", "einsum"}


def _is_matmul(node: Node) -> bool:
    return op_name(node) in _MATMULS or (is_compute(node) and op_name(node) not in ATTENTION_OPS
                                        and op_name(node) != "embedding")


def moe_node_counts(graph: Graph, routing_ops: tuple[str, ...] = ("topk",), attention: bool = True) -> Counter:
    """Routers, routed matmuls and attention cores of one graph (see module docstring)."""
    flow = Flow(graph)
    routing = set(routing_ops)
    counts: Counter = Counter()
    signals: set[Node] = set()
    routers = set()
    for m in filter(_is_matmul, flow.nodes):
        sig = router_signals(flow, m, routing)
        if sig is not None:
            routers.add(m)
            signals |= sig
    counts["routers"] = len(routers)

    for m in filter(_is_matmul, flow.nodes):
        if m not in routers:
            routed = any(i in signals or gathered_by(flow, i, signals) for i in flow.inputs(m))
            counts["routed_matmuls"] += routed or combined_with(flow, m, signals) is not None
    if attention:
        counts["attention_cores"] = sum(1 for n in flow.nodes if op_name(n) in ATTENTION_OPS)
    return counts


class MoECountingPass(CustomGraphPass):
    """Post-grad pass that adds each graph's MoE node counts to ``self.counters``.

    Args:
        routing_ops: ops that select experts (``topk``; add ``argmax`` for top-1 routers).
        attention: also count attention cores.
    """

    def __init__(self, *, routing_ops: tuple[str, ...] = ("topk",), attention: bool = True) -> None:
        self.routing_ops = tuple(routing_ops)
        self.attention = attention
        self.counters: Counter = Counter()

    def __call__(self, graph: Graph) -> None:
        self.counters["graphs"] += 1
        self.counters.update(moe_node_counts(graph, self.routing_ops, self.attention))

    def uuid(self) -> str:
        """Hash of the pass's source files and options (the FX graph cache key part)."""
        files = get_hash_for_files((__file__, dataflow.__file__))
        options = repr((self.routing_ops, self.attention)).encode()
        return hashlib.sha256(files + options).hexdigest()


@contextlib.contextmanager
def count_moe_nodes(pass_: MoECountingPass | None = None, *, cache: bool = True) -> Iterator[MoECountingPass]:
    """Counts MoE nodes in every graph Inductor compiles inside the ``with``.

    Compilation is lazy: call the compiled function inside the ``with``.

    Args:
        pass_: the pass to install (default: a new :class:`MoECountingPass`).
        cache: keep the FX graph cache on; False recompiles (and counts) every graph.

    Yields:
        The installed pass; read ``.counters`` after compiling.
    """
    counting = pass_ if pass_ is not None else MoECountingPass()
    existing = inductor_config.post_grad_custom_post_pass
    if isinstance(existing, (list, tuple)):
        installed = [*existing, counting]
    else:
        installed = [existing, counting] if existing is not None else counting
    changes = {"post_grad_custom_post_pass": installed}
    if not cache:
        changes["fx_graph_cache"] = False
    with inductor_config.patch(changes):
        yield counting


__all__ = ["MoECountingPass", "count_moe_nodes", "moe_node_counts"]
