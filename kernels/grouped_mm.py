"""Grouped matmul over experts: rows of ``x`` sorted by expert, one weight per expert.

Shapes: S routed (token, expert) pairs, E experts, K in features, N out features.

``grouped_mm(x, w, offs)`` computes ``out[r] = x[r] @ w[e]`` for the rows r of expert e,
where ``offs`` holds the cumulative row counts. It uses ``torch._grouped_mm`` where
that kernel exists for the dtype (bf16 everywhere; on CPU also float32 in eager), and
otherwise an opaque custom op that loops over experts: the loop is data dependent, so
hiding it from Dynamo keeps a compiled model free of graph breaks.
"""

from __future__ import annotations

import torch

__all__ = ["grouped_mm", "grouped_mm_reference"]


def grouped_mm_reference(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Plain loop: x [S, K], w [E, K, N], offs int [E] cumulative -> [S, N]."""
    out = x.new_zeros(x.shape[0], w.shape[-1])
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            out[start:end] = x[start:end] @ w[e]
        start = end
    return out


@torch.library.custom_op("moe_ao::grouped_mm_loop", mutates_args=())
def _grouped_mm_loop(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return grouped_mm_reference(x, w, offs)


@_grouped_mm_loop.register_fake
def _(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    assert x.dim() == 2 and w.dim() == 3 and x.shape[1] == w.shape[1], f"{x.shape=} {w.shape=}"
    return x.new_empty(x.shape[0], w.shape[-1])


def _loop_setup_context(ctx, inputs, output) -> None:
    x, w, offs = inputs
    ctx.save_for_backward(x, w, offs)


def _loop_backward(ctx, grad):
    # Needed even for inference: AOT autograd traces a backward whenever an input
    # requires grad (e.g. hidden states from a trainable embedding), and a custom op
    # without a formula then fails to compile.
    x, w, offs = ctx.saved_tensors
    grad_x = grad_w = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.ops.moe_ao.grouped_mm_loop(grad, w.transpose(1, 2).contiguous(), offs)  # [S, K]
    if ctx.needs_input_grad[1]:
        rows = torch.arange(x.shape[0], device=x.device, dtype=offs.dtype)
        owner = torch.searchsorted(offs, rows, right=True)  # [S]; E = row of no expert
        onehot = torch.nn.functional.one_hot(owner.long(), w.shape[0] + 1)[:, :-1].to(x.dtype)  # [S, E]
        grad_w = torch.einsum("se,sk,sn->ekn", onehot, x, grad)  # [E, K, N]
    return grad_x, grad_w, None


_grouped_mm_loop.register_autograd(_loop_backward, setup_context=_loop_setup_context)


def _native_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    if w.dtype == torch.bfloat16:
        return w.device.type == "cpu" or (
            w.device.type == "cuda" and torch.cuda.get_device_capability(w.device) >= (8, 0)
        )
    # float32 grouped_mm has a CPU kernel but no meta kernel: fine in eager only.
    return w.device.type == "cpu" and w.dtype == torch.float32 and not torch.compiler.is_compiling()


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """x [S, K] sorted by expert, w [E, K, N], offs int32 [E] cumulative -> [S, N]."""
    x = x.to(w.dtype)
    if _native_ok(x, w):
        return torch._grouped_mm(x, w, offs=offs.to(torch.int32))
    return torch.ops.moe_ao.grouped_mm_loop(x, w.contiguous(), offs)
