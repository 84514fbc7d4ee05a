"""A tiny MoE language model that uses none of transformers' names or layouts.

Only the graph pass can read it: the decoder layers live in ``self.stack`` (not
``layers``/``h``/``blocks``), attention is ``wq/wk/wv/wo`` written out as
matmul -> softmax -> matmul, the router is a bare ``w_route`` parameter, the routed
experts are 3D parameters ``bank`` [E, 2I, H] ([gate; up] rows) and ``bank_out``
[E, H, I] applied to experts gathered by the top-k ids (einsum in one layer, bmm in the
other), and the shared MLP is ``always`` (Linear -> GELU -> Linear).

Shapes: N tokens, k top-k, E experts, H hidden, I expert intermediate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

V, H, I, E, K, S, HEADS = 50, 32, 16, 4, 2, 24, 2


class Mixer(nn.Module):
    """Causal self-attention written out (no sdpa)."""

    def __init__(self) -> None:
        super().__init__()
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(H, H, bias=False) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = (w(x).view(B, T, HEADS, H // HEADS).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        scores = q @ k.transpose(-1, -2) / (H // HEADS) ** 0.5  # [B, heads, T, T]
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        attn = scores.masked_fill(causal, float("-inf")).softmax(-1) @ v
        return self.wo(attn.transpose(1, 2).reshape(B, T, H))


class Dense(nn.Module):
    """Gated MLP under unusual names: back(silu(left(x)) * right(x))."""

    def __init__(self) -> None:
        super().__init__()
        self.left = nn.Linear(H, 2 * H, bias=False)
        self.right = nn.Linear(H, 2 * H, bias=False)
        self.back = nn.Linear(2 * H, H, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.back(F.silu(self.left(x)) * self.right(x))


class Switchboard(nn.Module):
    """Top-k MoE over a 3D expert bank, plus a shared MLP that sees every token."""

    def __init__(self, use_bmm: bool, router_in_out: bool = False) -> None:
        super().__init__()
        self.use_bmm, self.router_in_out = use_bmm, router_in_out
        # router_in_out: the router stored [H, E] and used as x @ w (a layout units reject)
        self.w_route = nn.Parameter(torch.randn(H, E) * 0.3 if router_in_out else torch.randn(E, H) * 0.3)
        self.bank = nn.Parameter(torch.randn(E, 2 * I, H) * 0.2)  # [E, 2I, H]
        self.bank_out = nn.Parameter(torch.randn(E, H, I) * 0.2)  # [E, H, I]
        self.always = nn.Sequential(nn.Linear(H, S, bias=False), nn.GELU(), nn.Linear(S, H, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, H)  # [N, H]
        logits = flat @ self.w_route if self.router_in_out else flat @ self.w_route.t()  # [N, E]
        probs = torch.softmax(logits, dim=-1)
        weight, idx = probs.topk(K, dim=-1)  # [N, k]
        if self.use_bmm:
            ids = idx.reshape(-1)  # [N*k]
            h = torch.bmm(self.bank[ids], flat.repeat_interleave(K, 0).unsqueeze(-1)).squeeze(-1)  # [N*k, 2I]
            gate, up = h.chunk(2, dim=-1)
            y = torch.bmm(self.bank_out[ids], (F.silu(gate) * up).unsqueeze(-1)).squeeze(-1)  # [N*k, H]
            y = y.view(-1, K, H)
        else:
            h = torch.einsum("nkoh,nh->nko", self.bank[idx], flat)  # [N, k, 2I]
            gate, up = h.chunk(2, dim=-1)
            y = torch.einsum("nkhi,nki->nkh", self.bank_out[idx], F.silu(gate) * up)  # [N, k, H]
        routed = (y * weight.unsqueeze(-1)).sum(1)  # [N, H]
        return (routed + self.always(flat)).reshape(x.shape)


class Block(nn.Module):
    def __init__(self, ffn: nn.Module) -> None:
        super().__init__()
        self.norm_a, self.mix, self.norm_b, self.ffn = nn.LayerNorm(H), Mixer(), nn.LayerNorm(H), ffn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mix(self.norm_a(x))
        return x + self.ffn(self.norm_b(x))


class ToyLM(nn.Module):
    """Embedding ``tok``, blocks ``stack`` (0: dense, 1: einsum MoE, 2: bmm MoE), head ``out`` (maybe tied)."""

    def __init__(self, seed: int = 0, tie: bool = False) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.tok = nn.Embedding(V, H)
        self.stack = nn.ModuleList([Block(Dense()), Block(Switchboard(False)), Block(Switchboard(True))])
        self.norm = nn.LayerNorm(H)
        self.out = nn.Linear(H, V, bias=False)
        if tie:
            self.out.weight = self.tok.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.tok(input_ids)
        for block in self.stack:
            x = block(x)
        return self.out(self.norm(x))


def toy_ids(tokens: int = 6) -> torch.Tensor:
    return (torch.arange(tokens) * 7 % V).reshape(1, tokens)
