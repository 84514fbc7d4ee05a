"""moe_ao's experts implementation for transformers' fused experts modules.

transformers 5 dispatches ``Experts.forward`` through ``ExpertsInterface`` by
``config._experts_implementation``. Its built-in ``grouped_mm`` and ``batched_mm`` paths
call ops on the raw weights (``transpose`` + ``torch._grouped_mm``) that a packed tensor
would have to emulate op by op, and its ``eager`` loop breaks the graph on ``nonzero``.
``quantize_`` therefore registers this implementation as ``"moe_ao"`` and selects it.
It touches weights only through indexing (``w[ids]``), which a PackedWeight answers
with dense dequantized experts, so it serves plain and packed weights alike:

- decode (few routed pairs): a packed bank is read directly by a kernel, with no dense
  copy (``moe_ao.kernels.triton_packed`` on CUDA, ``moe_ao.kernels.cpu_packed`` on CPU);
  plain weights use the selected experts and bmm;
- prefill: dequantize the bank once and run a grouped matmul over sorted tokens.

Shapes: T tokens, k = top-k, S = T*k routed pairs, E experts, H hidden, I intermediate.
"""

from __future__ import annotations

import torch

from moe_ao.kernels import triton_packed
from moe_ao.kernels._registry import device_and_dtype
from moe_ao.kernels.cpu_packed import packed_experts_linear
from moe_ao.kernels.grouped_mm import grouped_mm
from moe_ao.tensors.packed import PackedWeight

IMPLEMENTATION = "moe_ao"


def dense_bank(w: torch.Tensor) -> torch.Tensor:
    """All experts of a (possibly packed) [E, N, K] bank as a dense tensor."""
    return w.dequantize() if isinstance(w, PackedWeight) else w


def _experts_matvec(bank: torch.Tensor, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Row s of x [S, K] times expert ids[s] of bank [E, N, K] -> [S, N]."""
    if isinstance(bank, PackedWeight):  # kernels read the packed codes: no dense copy
        if triton_packed.triton_ok(x, bank, x.shape[0]):
            return triton_packed.packed_experts_linear(x, bank, ids)
        if device_and_dtype(bank)[0] == "cpu":
            return packed_experts_linear(x, bank, ids)  # the C++ kernel, or its reference
    return torch.bmm(bank[ids], x.unsqueeze(-1)).squeeze(-1)


def _activate(module: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
    return module._apply_gate(h) if module.has_gate else module.act_fn(h)


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
    if T * k <= self.num_experts:
        # Decode: reading S experts beats dequantizing all E of them.
        x = hidden_states.repeat_interleave(k, dim=0)  # [S, H]
        h = _experts_matvec(up_bank, x, ids)  # [S, 2I]
        h = _activate(self, h)
        out = _experts_matvec(self.down_proj, h, ids)  # [S, H]
    else:
        ids_sorted, perm = torch.sort(ids)
        x = hidden_states[perm // k]  # [S, H], grouped by expert
        counts = torch.histc(ids_sorted.float(), bins=self.num_experts, min=0, max=self.num_experts - 1)
        offs = torch.cumsum(counts, 0).to(torch.int32)  # [E]
        h = grouped_mm(x, dense_bank(up_bank).transpose(1, 2), offs)  # [S, 2I]
        h = _activate(self, h)
        out_sorted = grouped_mm(h, dense_bank(self.down_proj).transpose(1, 2), offs)  # [S, H]
        out = torch.empty_like(out_sorted)
        out[perm] = out_sorted
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
