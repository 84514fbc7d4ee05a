"""The Inductor counting pass: cache-safe uuid, install/restore, counts on real graphs."""

from __future__ import annotations

import uuid as uuidlib

import pytest
import torch
import torch._inductor.config as inductor_config
import toy_moe
from torch._dynamo.utils import counters
from torch._inductor.codecache import compiled_fx_graph_hash
from torch.fx.experimental.proxy_tensor import make_fx

from moe_ao.passes.inductor_pass import MoECountingPass, count_moe_nodes, moe_node_counts


def router_and_bank(x: torch.Tensor, w: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """Top-2 router over 4 experts, then the selected [E, 8, 8] experts by index + bmm."""
    v, i = (x @ w.t()).softmax(-1).topk(2, -1)  # [N, 2]
    y = torch.bmm(bank[i.reshape(-1)], x.repeat_interleave(2, 0).unsqueeze(-1)).squeeze(-1)  # [2N, 8]
    return (y.view(-1, 2, 8) * v.unsqueeze(-1)).sum(1)


ARGS = (torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 8, 8))


def test_uuid_stable_and_option_sensitive():
    a, b = MoECountingPass(), MoECountingPass()
    assert isinstance(a.uuid(), str) and a.uuid() == b.uuid()
    assert a.uuid() != MoECountingPass(attention=False).uuid()
    assert a.uuid() != MoECountingPass(routing_ops=("topk", "argmax")).uuid()


def test_fx_graph_cache_key_follows_the_uuid():
    # A lambda: string annotations (from __future__) would make the GraphModule unpicklable.
    gm = make_fx(lambda x, w, bank: router_and_bank(x, w, bank))(*ARGS)

    def key() -> str:
        return compiled_fx_graph_hash(gm, list(ARGS), {}, [])[0]

    plain = key()
    with count_moe_nodes():
        first = key()
    with count_moe_nodes(MoECountingPass()):
        again = key()
    with count_moe_nodes(MoECountingPass(attention=False)):
        other = key()
    assert first == again and len({plain, first, other}) == 3


def test_installed_only_inside_the_with_and_composes():
    assert inductor_config.post_grad_custom_post_pass is None
    with count_moe_nodes() as outer:
        assert inductor_config.post_grad_custom_post_pass is outer
        with count_moe_nodes() as inner:
            assert inductor_config.post_grad_custom_post_pass == [outer, inner]
        assert inductor_config.post_grad_custom_post_pass is outer
    assert inductor_config.post_grad_custom_post_pass is None


def test_counts_on_an_aten_graph():
    counts = moe_node_counts(make_fx(router_and_bank)(*ARGS).graph)
    assert dict(counts) == {"routers": 1, "routed_matmuls": 1, "attention_cores": 0}
    block = toy_moe.Switchboard(use_bmm=True)  # router, two gathered banks, shared MLP (not routed)
    with torch.no_grad():
        graph = torch.export.export(block, (torch.randn(1, 3, toy_moe.H),), strict=False).graph
    assert dict(moe_node_counts(graph, attention=False)) == {"routers": 1, "routed_matmuls": 2}


@pytest.mark.slow
def test_post_grad_counts_and_fx_graph_cache():
    """Real compiles: counted on a miss; a hit with the same uuid skips the pass; new options miss."""
    nonce = ("topk", f"never_an_op_{uuidlib.uuid4().hex}")  # a fresh key, whatever the cache holds
    counters.clear()
    seen = []
    for options in ({}, {}, {"attention": False}):
        torch._dynamo.reset()
        with count_moe_nodes(MoECountingPass(routing_ops=nonce, **options)) as counting:
            torch.compile(router_and_bank)(*ARGS)
        seen.append(dict(counting.counters))
    assert seen[0] == {"graphs": 1, "routers": 1, "routed_matmuls": 1, "attention_cores": 0}
    assert seen[1] == {}  # served from the FX graph cache: post-grad passes do not run
    assert seen[2] == {"graphs": 1, "routers": 1, "routed_matmuls": 1}
    assert counters["inductor"]["fxgraph_cache_miss"] == 2 and counters["inductor"]["fxgraph_cache_hit"] == 1
