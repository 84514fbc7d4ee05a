"""Op kinds from schemas, in-place writes as edges, and router signals, on tiny exported graphs."""

from __future__ import annotations

import torch
from torch import nn

from moe_ao.passes.dataflow import Flow, is_compute, is_transparent, is_view, mutated_args, op_name, root


class DenseRouting(nn.Module):
    """DeepSeek-MoE style: top-k weights scattered into a dense [N, E] matrix, in place."""

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        probs = (x @ w.t()).softmax(-1)  # [N, E]
        weight, idx = probs.topk(2, dim=-1)
        dense = torch.zeros(x.shape[0], w.shape[0])
        dense.scatter_(1, idx, weight)
        return x.float() * dense[:, 1:2]


def export(module: nn.Module, *args: torch.Tensor) -> torch.fx.Graph:
    with torch.no_grad():
        return torch.export.export(module, args, strict=False).graph


def find(graph: torch.fx.Graph, name: str) -> torch.fx.Node:
    return next(n for n in graph.nodes if op_name(n) == name)


def test_schema_kinds():
    graph = export(DenseRouting(), torch.randn(3, 8), torch.randn(4, 8))
    scatter, zeros, col, matmul = (find(graph, n) for n in ("scatter_", "zeros", "slice", "matmul"))
    assert mutated_args(scatter) == [zeros] and not is_view(scatter)
    assert is_view(col) and is_transparent(col) and is_view(find(graph, "t"))
    assert is_compute(matmul) and not is_compute(find(graph, "softmax"))
    assert not is_transparent(find(graph, "topk"))


def test_signals_follow_in_place_writes():
    graph = export(DenseRouting(), torch.randn(3, 8), torch.randn(4, 8))
    flow = Flow(graph)
    matmul, scatter, col, mul = (find(graph, n) for n in ("matmul", "scatter_", "slice", "mul"))
    sig = flow.signals(matmul)
    # The column of the dense routing matrix is a routing signal; the routed product is not.
    assert {find(graph, "softmax"), find(graph, "topk"), scatter, col} <= sig
    assert mul not in sig and find(graph, "zeros") in flow.const
    assert scatter in flow.inputs(col)  # the slice reads the written matrix
    _, ends = flow.future(matmul)
    assert [e.op for e in ends] == ["output"]  # no compute op after the router here
    x = next(n for n in graph.nodes if n.op == "placeholder" and n.name == "x")
    assert root(mul.args[0]) is x  # x.float() is a cast of x
