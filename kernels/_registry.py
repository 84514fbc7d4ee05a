"""What the packed-weight kernels share: the buffer list they take and their op registration.

Ops cannot take the PackedWeight subclass, so every kernel op takes its inner buffers as a
fixed list (BUFFER_NAMES, None for absent widths).

``torch.library.custom_op`` wraps an op in autograd and argument handling that cost, per
call, ~20 us for one tensor argument and ~55 us for the packed ops' list of 13 optional
buffers (measured on the CI-class CPU): more than the decode GEMV of a small expert
takes. The kernels serve inference only (their callers route anything that needs a
gradient to the differentiable reference), so they are defined with
``torch.library.Library`` directly, ~5 us a call, and stay visible to torch.compile and
export through a registered fake implementation. The CPU ops go one step further: their
CPU kernels are registered from C++ (``csrc/packed_ops.cpp``), since a Python
implementation made a call on a 192-wide linear take ~76 us instead of ~20 us (argument
boxing, ctypes, checks and dtype conversions).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:  # typing only: kernels sit below tensors and never import them at runtime
    from moe_ao.tensors.packed import PackedWeight

BUFFER_NAMES = ("q2", "s2", "z2", "q3", "s3", "z3", "q4", "s4", "z4", "q8", "s8", "z8", "d16")
_LIB = torch.library.Library("moe_ao", "FRAGMENT")  # the registrations live as long as this object
_ARGS = "Tensor slot, int out_features, int n_seg, int group_size, Tensor?[] buffers, int act_bits=0"


def buffers_of(w: PackedWeight) -> list[Tensor | None]:
    """w's inner buffers, as the kernel ops take them.

    Args:
        w: a packed weight.

    Returns:
        Its buffers in BUFFER_NAMES order, None where w has no slice of that width.
    """
    return [getattr(w, name) for name in BUFFER_NAMES]


def device_and_dtype(w: PackedWeight) -> tuple[str, torch.dtype]:
    """w's device type and float dtype, read from its inner tensors.

    The wrapper's own ``.device`` and ``.dtype`` go through ``__torch_function__`` (~5 us
    each, on every decode call).

    Args:
        w: a packed weight.

    Returns:
        (device type, e.g. ``"cpu"``; dtype of its scales and float slices).
    """
    for t in (w.s4, w.s2, w.s3, w.s8, w.d16):  # every packed weight has one of them
        if t is not None:
            return w.slot.device.type, t.dtype
    raise AssertionError("a PackedWeight without scales or float slices")


def _linear_fake(x, slot, out_features, n_seg, group_size, buffers, act_bits=0):
    return x.new_empty(x.shape[0], out_features)


def _experts_fake(x, ids, slot, out_features, n_seg, group_size, buffers, act_bits=0):
    assert ids.shape == x.shape[:1], f"{ids.shape=} {x.shape=}"
    return x.new_empty(x.shape[0], out_features)


def define_packed_ops(prefix: str, run: Callable[..., Tensor], devices: Sequence[str]) -> None:
    """Defines ``moe_ao::<prefix>packed_linear`` and ``moe_ao::<prefix>packed_experts_linear``.

    - ``<prefix>packed_linear(x, slot, out_features, n_seg, group_size, buffers, act_bits=0)``:
      x [M, K] times a 2D packed weight [N, K] given by its buffers -> [M, N] in x's dtype,
      x first rounded per token to int8 when act_bits = 8 (the CPU op; callers of the
      Triton op round x themselves and pass 0);
    - ``<prefix>packed_experts_linear(x, ids, ...)``: row s of x [S, K] times expert ids[s]
      of a 3D packed weight [E, N, K] -> [S, N].

    Args:
        prefix: op name prefix (``""`` for the CPU kernel, ``"triton_"``).
        run: ``run(x, ids or None, slot, out_features, n_seg, group_size, buffers, act_bits)``.
        devices: dispatch keys served by ``run`` (``"CompositeExplicitAutograd"``: every
            key without a kernel of its own, e.g. until a C++ library registers one).
    """
    schemas = {f"{prefix}packed_linear(Tensor x, {_ARGS}) -> Tensor": (lambda x, *a: run(x, None, *a), _linear_fake),
               f"{prefix}packed_experts_linear(Tensor x, Tensor ids, {_ARGS}) -> Tensor": (run, _experts_fake)}
    for schema, (impl, fake) in schemas.items():
        name = schema.split("(", 1)[0]
        _LIB.define(schema)
        for device in devices:
            _LIB.impl(name, impl, device)
        torch.library.register_fake(f"moe_ao::{name}", fake, lib=_LIB)
