"""Weight paths: gathers by expert ids, and the [out, in] layout check, per consumer op."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moe_ao.passes.dataflow import Flow, op_name
from moe_ao.passes.weight_uses import weight_uses


class Uses(nn.Module):
    """One weight per way of applying it; ``w_in_out`` is stored [in, out]."""

    def __init__(self) -> None:
        super().__init__()
        self.w_linear = nn.Parameter(torch.randn(6, 8))
        self.w_matmul = nn.Parameter(torch.randn(6, 8))
        self.w_in_out = nn.Parameter(torch.randn(8, 6))
        self.bank = nn.Parameter(torch.randn(4, 6, 8))  # [E, out, in]
        self.bank_t = nn.Parameter(torch.randn(4, 6, 8))
        self.unused = nn.Parameter(torch.randn(3, 3))

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        a = F.linear(x, self.w_linear)
        b = x @ self.w_matmul.float().t()
        c = x @ self.w_in_out
        d = torch.einsum("noh,nh->no", self.bank[ids], x)
        e = torch.bmm(x.unsqueeze(1), self.bank_t[ids].transpose(1, 2)).squeeze(1)
        return a + b + c + d + e


@pytest.fixture(scope="module")
def uses():
    module = Uses()
    with torch.no_grad():
        program = torch.export.export(module, (torch.randn(5, 8), torch.tensor([0, 1, 3, 1, 2])), strict=False)
    fqn = program.graph_signature.inputs_to_parameters
    params = {n: fqn[n.name] for n in program.graph.nodes if n.op == "placeholder" and n.name in fqn}
    found, unused = weight_uses(Flow(program.graph), params)
    return {u.param: u for u in found}, unused


@pytest.mark.parametrize("param, consumer, transposed, gathered", [
    ("w_linear", "linear", False, False),
    ("w_matmul", "matmul", False, False),
    ("w_in_out", "matmul", True, False),
    ("bank", "einsum", False, True),
    ("bank_t", "bmm", False, True),
])
def test_consumer_layout_and_gathers(uses, param, consumer, transposed, gathered):
    found, _ = uses
    use = found[param]
    assert op_name(use.node) == consumer
    assert use.transposed is transposed
    assert bool(use.gathers) is gathered


def test_unused_weight_is_reported(uses):
    _, unused = uses
    assert unused == {"unused"}
