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

import types

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


def _bank_linear(module: torch.nn.Module, bank: torch.Tensor, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Row s of x [S, K] times expert ids[s] of a bank -> [S, N], columns in the module's own order.

    A packed bank is always [E, N, K] with [gate; up] rows (transposed banks are repacked at
    quantize time); for a module whose gate and up columns are interleaved (gpt-oss) its
    output is interleaved back, so the module's ``_apply_gate`` and biases apply unchanged.
    A plain bank is read in the module's own layout.
    """
    if isinstance(bank, PackedWeight):
        out = dispatch.experts_linear(x, bank, ids)
        if not getattr(module, "is_concatenated", True) and bank is _up_bank(module):
            out = torch.stack(out.chunk(2, dim=-1), dim=-1).flatten(-2)  # [g; u] -> g0 u0 g1 u1 ...
        return out
    if getattr(module, "is_transposed", False):  # [E, K, N]
        return torch.bmm(x.unsqueeze(1), bank[ids]).squeeze(1)
    return _plain_experts(bank, x, ids)


def _up_bank(module: torch.nn.Module) -> torch.Tensor:
    return module.gate_up_proj if module.has_gate else module.up_proj


def _simple_layout(module: torch.nn.Module) -> bool:
    """[E, out, in] banks, [gate; up], no biases: the sorted grouped-mm path for plain banks applies."""
    return not (getattr(module, "is_transposed", False) or getattr(module, "has_bias", False)
                or not getattr(module, "is_concatenated", True))


def moe_ao_experts_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """Experts forward over plain or packed weights. hidden [T, H] -> [T, H].

    Expert biases (gpt-oss) stay in float and are added after the packed matmul; the
    module's own gate (gpt-oss's clamped swiglu) applies to the up projection's output.
    """
    T, H = hidden_states.shape
    k = top_k_index.shape[-1]
    ids = top_k_index.reshape(-1)  # [S]
    up_bank = _up_bank(self)  # [E, 2I or I, H] (packed, or plain in the module's layout)
    if isinstance(up_bank, PackedWeight) or isinstance(self.down_proj, PackedWeight) or not _simple_layout(self):
        x = hidden_states.repeat_interleave(k, dim=0)  # [S, H]; the kernels group rows by expert themselves
        h = _bank_linear(self, up_bank, x, ids)  # [S, 2I]
        if getattr(self, "has_bias", False):
            h = h + (self.gate_up_proj_bias if self.has_gate else self.up_proj_bias)[ids].to(h.dtype)
        h = _activate(self, h)  # [S, I]
        out = _bank_linear(self, self.down_proj, h, ids)  # [S, H]
        if getattr(self, "has_bias", False):
            out = out + self.down_proj_bias[ids].to(out.dtype)
    else:
        out = _dense_experts(self, up_bank, hidden_states, ids, k)
    if getattr(self, "has_post_expert_norm", False):
        out = self.post_expert_norm(out)
    out = out.view(T, k, H) * top_k_weights.unsqueeze(-1).to(out.dtype)
    return out.sum(dim=1).to(hidden_states.dtype)


def llama4_experts_forward(self: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """Llama 4's experts: every expert on its own block of rows, [E*T, H] -> [E*T, H].

    Llama4TextMoe scales each expert's copy of the tokens by its routing score (0 for
    experts not chosen), as Llama4TextExperts.forward expects; its banks are [E, H, 2I]
    and [E, I, H] in float, [E, 2I, H] and [E, H, I] once packed.
    """
    E = self.num_experts
    x = hidden_states.reshape(-1, self.hidden_size)  # [E*T, H]
    ids = torch.arange(E, device=x.device).repeat_interleave(x.shape[0] // E)  # [E*T]
    gate_up = _any_bank(self.gate_up_proj, x, ids)  # [E*T, 2I]
    gate, up = gate_up.chunk(2, dim=-1)
    return _any_bank(self.down_proj, up * self.act_fn(gate), ids).to(hidden_states.dtype)


def _any_bank(bank: torch.Tensor, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Packed [E, N, K] or plain transposed [E, K, N] bank (Llama 4's float layout) -> [S, N]."""
    if isinstance(bank, PackedWeight):
        return dispatch.experts_linear(x, bank, ids)
    return torch.bmm(x.unsqueeze(1), bank[ids]).squeeze(1)


def dbrx_experts_forward(self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                         top_k_weights: torch.Tensor) -> torch.Tensor:
    """DBRX's experts over its packed banks w1, v1 [E, I, H] and w2 [E, H, I] (repacked from [E*I, H])."""
    B = hidden_states.shape[0]
    x = hidden_states.reshape(-1, self.hidden_size)  # [T, H]
    k = top_k_index.shape[-1]
    ids = top_k_index.reshape(-1)  # [S]
    xs = x.repeat_interleave(k, dim=0)  # [S, H]
    mlp, shape = self.mlp, (self.num_experts, self.ffn_hidden_size, self.hidden_size)

    def bank(w: torch.Tensor, inp: torch.Tensor, transposed: bool) -> torch.Tensor:
        if isinstance(w, PackedWeight):
            return dispatch.experts_linear(inp, w, ids)
        w = w.view(shape)[ids]  # [S, I, H]
        return torch.bmm(inp.unsqueeze(1), w).squeeze(1) if transposed else torch.bmm(w, inp.unsqueeze(-1)).squeeze(-1)

    h = mlp.activation_fn(bank(mlp.w1, xs, False)) * bank(mlp.v1, xs, False)  # [S, I]
    out = bank(mlp.w2, h, True)  # [S, H]
    out = (out.view(-1, k, self.hidden_size) * top_k_weights.unsqueeze(-1).to(out.dtype)).sum(dim=1)
    return out.to(hidden_states.dtype).view(B, -1, self.hidden_size)


def parallel_experts_forward(self: torch.nn.Module, inputs: torch.Tensor, expert_size: list[int]) -> torch.Tensor:
    """JetMoE's JetMoeParallelExperts: rows of ``inputs`` [S, K] sorted by expert, ``expert_size[e]``
    of them for expert e, times the bank ``weight`` [E, N, K] -> [S, N]; packed banks go through the
    grouped kernels, plain ones through the module's own loop."""
    if not isinstance(self.weight, PackedWeight):
        return type(self).forward(self, inputs, expert_size)
    counts = torch.as_tensor(expert_size, device=inputs.device)
    ids = torch.repeat_interleave(torch.arange(self.weight.shape[0], device=inputs.device), counts)
    return dispatch.experts_linear(inputs, self.weight, ids)


def shared_banks_forward(self: torch.nn.Module, hidden_states: torch.Tensor, gammas: torch.Tensor) -> torch.Tensor:
    """Inkling's InklingSharedExperts: S shared experts in 3D banks ``gate_proj`` / ``up_proj`` [S, I, H]
    and ``down_proj`` [S, H, I], every token through each, expert s's output scaled by gammas[..., s],
    summed in float32 as the module does."""
    banks = (self.gate_proj, self.up_proj, self.down_proj)
    if not any(isinstance(b, PackedWeight) for b in banks):
        return type(self).forward(self, hidden_states, gammas)
    shape, S = hidden_states.shape, self.n_shared_experts
    x = hidden_states.reshape(-1, shape[-1])  # [T, H]
    T = x.shape[0]
    ids = torch.arange(S, device=x.device).repeat_interleave(T)  # [S*T]: expert s's copy of every token
    xs = x.repeat(S, 1)
    scale = gammas.reshape(T, S).T.reshape(-1, 1).to(x.dtype)  # [S*T, 1]
    h = self.act_fn(_experts(self.gate_proj, xs, ids)) * _experts(self.up_proj, xs, ids) * scale
    out = _experts(self.down_proj, h, ids).view(S, T, -1)
    return out.float().sum(dim=0).to(hidden_states.dtype).view(shape)


# Experts classes transformers does not dispatch through ExpertsInterface whose own forward
# would call raw-tensor ops (bmm, view) on a packed bank: class name -> moe_ao's forward.
CUSTOM_FORWARDS = {"Llama4TextExperts": llama4_experts_forward, "DbrxExperts": dbrx_experts_forward,
                   "JetMoeParallelExperts": parallel_experts_forward, "InklingSharedExperts": shared_banks_forward}


def register() -> None:
    """Registers the implementation with transformers (idempotent)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if IMPLEMENTATION not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, moe_ao_experts_forward)


def select(model: torch.nn.Module) -> None:
    """Makes every fused experts module of ``model`` dispatch to moe_ao's forward."""
    register()
    for module in model.modules():
        forward = CUSTOM_FORWARDS.get(type(module).__name__)
        if forward is not None:
            module.forward = types.MethodType(forward, module)
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
