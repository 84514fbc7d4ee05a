"""moe_ao's experts implementation for transformers' fused experts modules.

transformers 5 dispatches ``Experts.forward`` through ``ExpertsInterface`` by
``config._experts_implementation``. Its built-in ``grouped_mm`` and ``batched_mm`` paths
call ops on the raw weights (``transpose`` + ``torch._grouped_mm``) that a packed tensor
would have to emulate op by op, and its ``eager`` loop breaks the graph on ``nonzero``.
``quantize_`` therefore registers this implementation as ``"moe_ao"`` and selects it.
It touches plain weights only through indexing and packed ones only through the packed
kernels, so it serves both, at any number of tokens:

- packed banks (PackedWeight): one op per projection, whatever the routing. On CPU the
  C++ kernel groups the routed rows by expert and reads each routed slice's codes once per
  call (GEMV passes for few rows, a tiled GEMM for many; ``moe_ao.kernels.cpu_packed``);
  on CUDA the Triton kernel; elsewhere, or when a gradient is needed, the reference, which
  dequantizes one expert at a time. The bank is never expanded whole.
- plain banks: decode multiplies the selected experts with bmm; prefill sorts the tokens
  by expert and runs a grouped matmul.

Shapes: T tokens, k = top-k, S = T*k routed pairs, E experts, H hidden, I intermediate.
"""

from __future__ import annotations

import torch

from moe_ao.kernels import dispatch
from moe_ao.kernels.grouped_mm import grouped_mm
from moe_ao.tensors.packed import PackedWeight

IMPLEMENTATION = "moe_ao"


def _activate(module: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
    return module._apply_gate(h) if module.has_gate else module.act_fn(h)


def _plain_experts(bank: torch.Tensor, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Row s of x [S, K] times expert ids[s] of a plain bank [E, N, K] -> [S, N]."""
    E = bank.shape[0]
    if x.shape[0] <= E:  # decode: the S selected experts and a bmm
        return torch.bmm(bank[ids], x.unsqueeze(-1)).squeeze(-1)
    ids_sorted, perm = torch.sort(ids)
    counts = torch.histc(ids_sorted.float(), bins=E, min=0, max=E - 1)
    offs = torch.cumsum(counts, 0).to(torch.int32)  # [E]
    out_sorted = grouped_mm(x[perm], bank.transpose(1, 2), offs)  # rows grouped by expert
    out = torch.empty_like(out_sorted)
    out[perm] = out_sorted
    return out


def _experts(bank: torch.Tensor, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Row s of x [S, K] times expert ids[s] of a plain or packed bank [E, N, K] -> [S, N]."""
    return dispatch.experts_linear(x, bank, ids) if isinstance(bank, PackedWeight) else _plain_experts(bank, x, ids)


def _dense_experts(module: torch.nn.Module, up_bank: torch.Tensor, hidden: torch.Tensor, ids: torch.Tensor,
                   k: int) -> torch.Tensor:
    """Plain banks: hidden [T, H] -> routed pairs [S, H] in pair order. Prefill sorts once and
    keeps the sorted order through both projections (the gate's nonlinearity directly
    follows its matmul: moe_ao.passes reads the MLP's structure from that dataflow)."""
    if ids.shape[0] <= module.num_experts:
        x = hidden.repeat_interleave(k, dim=0)  # [S, H]
        return _plain_experts(module.down_proj, _activate(module, _plain_experts(up_bank, x, ids)), ids)
    ids_sorted, perm = torch.sort(ids)
    x = hidden[perm // k]  # [S, H], grouped by expert
    counts = torch.histc(ids_sorted.float(), bins=module.num_experts, min=0, max=module.num_experts - 1)
    offs = torch.cumsum(counts, 0).to(torch.int32)  # [E]
    h = _activate(module, grouped_mm(x, up_bank.transpose(1, 2), offs))  # [S, I]
    out_sorted = grouped_mm(h, module.down_proj.transpose(1, 2), offs)  # [S, H]
    out = torch.empty_like(out_sorted)
    out[perm] = out_sorted
    return out


def moe_ao_experts_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """Experts forward over plain or packed weights. hidden [T, H] -> [T, H]."""
    T, H = hidden_states.shape
    k = top_k_index.shape[-1]
    ids = top_k_index.reshape(-1)  # [S]
    up_bank = self.gate_up_proj if self.has_gate else self.up_proj  # [E, 2I or I, H]
    if isinstance(up_bank, PackedWeight) or isinstance(self.down_proj, PackedWeight):
        x = hidden_states.repeat_interleave(k, dim=0)  # [S, H]; the kernels group rows by expert themselves
        h = _activate(self, _experts(up_bank, x, ids))  # [S, 2I] -> [S, I]
        out = _experts(self.down_proj, h, ids)  # [S, H]
    else:
        out = _dense_experts(self, up_bank, hidden_states, ids, k)
    out = out.view(T, k, H) * top_k_weights.unsqueeze(-1).to(out.dtype)
    return out.sum(dim=1).to(hidden_states.dtype)


def register() -> None:
    """Registers the implementation with transformers (idempotent)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if IMPLEMENTATION not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, moe_ao_experts_forward)


def select(model: torch.nn.Module) -> None:
    """Makes every fused experts module of ``model`` dispatch to moe_ao's forward."""
    register()
    if hasattr(model, "set_experts_implementation"):
        try:
            model.set_experts_implementation(IMPLEMENTATION)
            return
        except (ValueError, KeyError):
            pass  # older transformers validate against a fixed list; set configs directly
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_experts_implementation"):
            config._experts_implementation = IMPLEMENTATION
